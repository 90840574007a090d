"""limits-ray status: a store's contents from its manifest, merged keys, parts and quarantine records."""

from __future__ import annotations

import json

from test_store import _context, _store, _write

from limits_ray.cli import main
from limits_ray.outputs.status import format_status, store_status
from limits_ray.pipeline.bucket_tasks import compact
from limits_ray.pipeline.faults import Quarantine, QuarantinedRound
from limits_ray.storage.location import open_location


def _filled_store(uri, tmp_path, endpoint: str = ""):
    store = _store(uri, buckets=2, endpoint=endpoint)
    store.check_manifest({"base_model": "tiny", "sampling": {"n": 4}, "rewards": {"rm": {"kind": "function", "model": "m:f"}}})
    _write(store, "p", [0, 1, 2])
    _write(store, "q", [0])
    for bucket in range(2):
        compact(_context(store, tmp_path), bucket)
    _write(store, "q", [1])  # written after the last compaction: not merged yet
    Quarantine(store.quarantine, "run1").add(QuarantinedRound("r", 0, "score_rm", "ValueError: nan"))
    return store


def test_status_counts_prompts_rounds_samples_parts_and_quarantine(tmp_path):
    _filled_store(tmp_path / "out" / "store", tmp_path)
    (tmp_path / "out" / "report.json").write_text(json.dumps({"name": "x", "prompts": 3, "rounds_generated": 5, "wall_seconds": 2.0}))
    status = store_status(open_location(tmp_path / "out"))
    assert status.samples_per_prompt.tolist() == [4, 12] and status.rounds_per_prompt.tolist() == [1, 3]
    assert status.unmerged_parts == 1 and status.buckets == 2
    assert [record["prompt_id"] for record in status.quarantined] == ["r"]
    lines = "\n".join(format_status(status))
    assert "prompts 2, rounds 4, samples 16" in lines and "prompt r round 0 in score_rm: ValueError: nan" in lines
    assert "last run x: 3 prompts, 5 rounds generated" in lines


def test_status_reads_a_store_on_s3_through_the_cli(s3_bucket, tmp_path, capsys):
    uri, endpoint = s3_bucket
    _filled_store(f"{uri}/store", tmp_path, endpoint=endpoint)
    assert main(["status", f"{uri}/store", "--endpoint-override", endpoint]) == 0
    assert "samples per prompt: min 4, p10 5, median 8, p90 11, max 12" in capsys.readouterr().out


def test_status_of_a_directory_without_a_store_names_the_fix(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no sample store here" in capsys.readouterr().err
