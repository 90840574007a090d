"""Nightly recomputation: two nights on the tiny models, a no-op rerun, and new series on a new setup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from limits_ray.runs.job import stored_round_counts
from limits_ray.runs.nightly import next_targets, nightly_root, run_night, series_id

from _tiny import tiny_job


def _config(models, out: Path, **overrides):
    # Two rewards without a vLLM pooling engine keep the run short; 2 rounds of 16 on the first night.
    settings = {
        "generation": {"samples_per_prompt": 32},
        "rewards": [
            {"name": "rm_b", "kind": "transformers", "model": str(models.reward_b), "batch_size": 64, "num_cpus": 0.5},
            {"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
             "num_cpus": 0.25},
        ],
        "analysis": {"betas": "0.1:10:5", "align": ["rm_b", "length"]},
        "nightly": {"rounds_per_night": 1},
    }
    settings.update(overrides)
    return tiny_job(models, out, **settings)


def test_series_changes_with_the_reward_model_revision(tiny_models, tmp_path):
    first = _config(tiny_models, tmp_path)
    same = _config(tiny_models, tmp_path)
    other = _config(tiny_models, tmp_path, rewards=[
        {"name": "rm_b", "kind": "transformers", "model": str(tiny_models.reward), "batch_size": 64},
        {"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length"},
    ])
    assert series_id(first) == series_id(same)
    assert series_id(first) != series_id(other)
    assert nightly_root(first) == tmp_path / "nightly"


def test_next_targets_continue_after_the_largest_stored_round():
    assert next_targets({"a": 4, "b": 2}, 2) == {"a": 6, "b": 4}


@pytest.mark.slow
def test_two_nights_then_a_noop_rerun(tiny_models, tmp_path, ray_local):
    config = _config(tiny_models, tmp_path)
    first = run_night(config, "2026-01-01")
    second = run_night(config, "2026-01-02")
    root = tmp_path / "nightly"
    assert first.ran and first.rounds_generated == 3 * 2 and first.samples == 3 * 32
    assert second.ran and second.rounds_generated == 3 * 1 and second.samples == 3 * 48
    night1 = pq.read_table(root / "2026-01-01" / "frontier.parquet")
    night2 = pq.read_table(root / "2026-01-02" / "frontier.parquet")
    assert set(night1["n"].to_pylist()) == {32} and set(night2["n"].to_pylist()) == {48}
    assert not np.allclose(night1["gain"].to_numpy(), night2["gain"].to_numpy())  # new samples moved the estimates
    stored = stored_round_counts(_config(tiny_models, tmp_path, store={"path": str(root / f"series-{first.series}" / "store")}))
    assert stored == {p: 3 for p in set(night2["prompt_id"].to_pylist())}
    latest = json.loads((root / "latest" / "nightly.json").read_text())
    assert latest["date"] == "2026-01-02" and latest["rounds_generated"] == 3
    for name in ("frontier.png", "convergence.png", "ess.png", "report.md"):
        assert (root / "latest" / name).stat().st_size > 1000, name
    ledger = json.loads((root / "ledger.json").read_text())
    assert ledger["2026-01-02"]["completed"] and ledger["2026-01-02"]["targets"] == {p: 3 for p in set(night2["prompt_id"].to_pylist())}

    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    again = run_night(config, "2026-01-02")  # no Ray needed: the night is complete
    assert not again.ran and again.rounds_generated == 0
    after = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert after == before
