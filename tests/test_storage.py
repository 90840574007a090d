"""Locations by path or URI: write-once objects, listings, and errors that name the URI and the fix."""

from __future__ import annotations

import pyarrow as pa
import pytest

from limits_ray.storage.location import StorageError, check_writable, open_location


def test_local_paths_and_file_uris_are_the_same_absolute_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIMITS_RAY_ROOT", raising=False)
    assert open_location("runs/x").path == str(tmp_path / "runs" / "x")
    assert open_location(f"file://{tmp_path}/runs/x").path == str(tmp_path / "runs" / "x")


def test_relative_paths_resolve_below_limits_ray_root(tmp_path, monkeypatch, s3_bucket):
    uri, endpoint = s3_bucket
    monkeypatch.setenv("LIMITS_RAY_ROOT", str(tmp_path / "root"))
    assert open_location("runs/x").path == str(tmp_path / "root" / "runs" / "x")
    assert open_location("/abs/x").path == "/abs/x"
    monkeypatch.setenv("LIMITS_RAY_ROOT", f"{uri}/team")
    remote = open_location("runs/x", endpoint_override=endpoint)
    assert not remote.local and remote.uri == f"{uri}/team/runs/x"


def test_a_local_write_is_whole_and_leaves_no_partial_file(tmp_path):
    location = open_location(tmp_path).join("a", "b.parquet")
    location.write_table(pa.table({"x": [1, 2, 3]}))
    location.write_table(pa.table({"x": [4]}))
    assert location.read_table()["x"].to_pylist() == [4]
    assert [path.name for path in (tmp_path / "a").iterdir()] == ["b.parquet"]
    assert [child.name for child in open_location(tmp_path).files(recursive=True)] == ["b.parquet"]


def test_objects_on_s3_round_trip_and_list(s3_bucket):
    uri, endpoint = s3_bucket
    root = open_location(f"{uri}/prefix", endpoint_override=endpoint)
    root.join("d", "one.json").write_json({"a": 1})
    root.join("d", "two.json").write_json({"a": 2})
    assert [location.name for location in root.join("d").files(suffix=".json")] == ["one.json", "two.json"]
    assert root.join("d", "two.json").read_json() == {"a": 2}
    assert [location.name for location in root.subdirectories()] == ["d"]
    root.join("d").delete_tree()
    assert not root.join("d", "one.json").exists()


def test_a_missing_bucket_is_named_before_anything_starts(s3_server):
    location = open_location("s3://no-such-bucket-here/runs", endpoint_override=s3_server)
    with pytest.raises(StorageError, match=r"store.path s3://no-such-bucket-here/runs: not writable .*bucket does not exist"):
        check_writable(location, "store.path")


def test_an_unwritable_local_directory_is_named(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StorageError, match=r"output_dir .*a-file/out: not writable"):
        check_writable(open_location(tmp_path / "a-file" / "out"), "output_dir")


def test_unsupported_schemes_and_bucketless_uris_are_refused():
    with pytest.raises(StorageError, match=r"unsupported scheme 'hdfs'.*s3://"):
        open_location("hdfs://namenode/x", where="output_dir")
    with pytest.raises(StorageError, match="name a bucket"):
        open_location("s3:///x")
