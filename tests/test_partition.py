"""Tests of limits_ray.storage.partition: bucket directories of an input, and the spill into buckets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from limits_ray.core.errors import InputError
from limits_ray.storage import partition
from limits_ray.storage.buckets import bucket_name, bucket_of
from limits_ray.storage.partition import Bucket, bucket_count, group_rows, input_buckets, spill, spilled_buckets


def table(prompts: int = 20, n: int = 6) -> pa.Table:
    rng = np.random.default_rng(0)
    rows = prompts * n
    return pa.table({
        "prompt_id": pa.array(np.repeat(np.arange(prompts), n), pa.int64()),  # cast to string by the spill
        "sample_idx": pa.array(np.tile(np.arange(n), prompts), pa.int32()),
        "r": pa.array(rng.normal(size=rows), pa.float32()),
        "other": ["x"] * rows,
    }).take(rng.permutation(rows))


def test_bucket_count_keeps_buckets_near_the_given_rows():
    assert bucket_count(0, 100) == 1 and bucket_count(100, 100) == 1 and bucket_count(101, 100) == 2
    assert bucket_count(10**9, 10**6) == 1000
    with pytest.raises(ValueError, match="bucket_rows"):
        bucket_count(10, 0)


def test_input_buckets_only_for_a_full_bucket_layout(tmp_path):
    for name in ("bucket=00003", "bucket=00010", "bucket=7"):
        (tmp_path / "store" / name).mkdir(parents=True)
        for k in (1, 0):
            pq.write_table(table(2, 2), tmp_path / "store" / name / f"part-{k}.parquet")
    buckets = input_buckets(ds.dataset(str(tmp_path / "store"), format="parquet"))
    assert [b.index for b in buckets] == [3, 7, 10]
    assert [Path(f).name for f in buckets[0].files] == ["part-0.parquet", "part-1.parquet"]
    pq.write_table(table(2, 2), tmp_path / "store" / "loose.parquet")  # a file outside any bucket directory
    assert input_buckets(ds.dataset(str(tmp_path / "store"), format="parquet")) is None
    pq.write_table(table(2, 2), tmp_path / "one.parquet")
    assert input_buckets(ds.dataset(str(tmp_path / "one.parquet"), format="parquet")) is None


@pytest.mark.parametrize("max_open, rows", [(256, None), (2, 7)])
def test_spill_puts_each_prompt_whole_into_its_bucket(tmp_path, monkeypatch, max_open, rows):
    monkeypatch.setattr(partition, "MAX_OPEN_FILES", max_open)
    if rows:  # tiny row groups and 2 open files: buckets are written in many row groups and files
        monkeypatch.setattr(partition, "group_rows", lambda buckets: rows)
    source = table()
    for k in range(3):
        pq.write_table(source.slice(40 * k, 40), tmp_path / f"in-{k}.parquet")
    files = [str(tmp_path / f"in-{k}.parquet") for k in range(3)]
    spill(files[:2], ["r"], 4, tmp_path / "spill", "00000", tmp_path)
    spill(files[2:], ["r"], 4, tmp_path / "spill", "00001", tmp_path)
    buckets = spilled_buckets(tmp_path / "spill")
    assert all(isinstance(b, Bucket) for b in buckets) and [b.index for b in buckets] == sorted(b.index for b in buckets)
    seen = []
    for bucket in buckets:
        assert Path(bucket.files[0]).parent.name == bucket_name(bucket.index)
        part = ds.dataset(list(bucket.files), format="parquet").to_table()
        assert part.column_names == ["prompt_id", "sample_idx", "r"]  # the partition column stays in the path
        assert part.schema.field("r").type == pa.float64() and part.schema.field("prompt_id").type == pa.string()
        assert set(bucket_of(part["prompt_id"].to_pylist(), 4).tolist()) == {bucket.index}
        seen += list(zip(part["prompt_id"].to_pylist(), part["sample_idx"].to_pylist(), part["r"].to_pylist()))
    want = zip([str(p) for p in source["prompt_id"].to_pylist()], source["sample_idx"].to_pylist(),
               source["r"].to_numpy().astype(np.float64).tolist())
    assert sorted(seen) == sorted(want)
    files = sum(len(bucket.files) for bucket in buckets)
    assert files == 2 * len(buckets) if rows is None else files > 2 * len(buckets)


def test_group_rows_bound_the_buffered_rows():
    assert group_rows(1) == 16_384 and group_rows(64) == 4096 and group_rows(10**4) == 1024


def test_spill_rejects_bad_keys_naming_the_input(tmp_path):
    bad = table().set_column(1, "sample_idx", pa.array([-3] + [0] * 119, pa.int64()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"--samples .*bad\.parquet: sample_idx must be >= 0"):
        spill([str(tmp_path / "bad.parquet")], ["r"], 3, tmp_path / "spill", "00000", tmp_path / "bad.parquet")
