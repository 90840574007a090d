"""Convergence studies: aggregation and settle-N on known tables; the study end to end on the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.convergence import settle_table, study_from_table, summarize
from limits_ray.outputs.study_report import write_study
from limits_ray.runs.reduce import reduce_samples

from _tiny import tiny_job


def _table(values: dict[str, list[float]], betas=(1.0,), n=(1, 2, 4, 8, 16, 32)) -> pa.Table:
    rows = {"prompt_id": [], "align": [], "eval": [], "beta": [], "n_samples": [], "gain": [], "kl": []}
    for prompt_id, series in values.items():
        for beta in betas:
            for count, value in zip(n, series):
                for key, item in (("prompt_id", prompt_id), ("align", "r"), ("eval", "r"), ("beta", beta),
                                  ("n_samples", count), ("gain", value), ("kl", value / 2)):
                    rows[key].append(item)
    return pa.table(rows)


def test_summary_averages_prompts_with_spread_band():
    summary = summarize(_table({"a": [0, 1, 2, 3, 3, 3], "b": [0, 3, 4, 5, 5, 5]}))
    last = summary.filter(pa.compute.equal(summary["n_samples"], 32))
    assert last["gain"][0].as_py() == pytest.approx(4.0)
    assert last["gain_spread_se"][0].as_py() == pytest.approx(np.std([3, 5], ddof=1) / np.sqrt(2))
    assert last["prompts"][0].as_py() == 2


def test_settle_n_is_where_the_mean_stays_within_tolerance():
    # Mean: 0, 2, 3, 3.9, 4.0, 4.0 -> within 5% (+0.001) of 4.0 from N = 8 on; settled (3 points to the end).
    summary = summarize(_table({"a": [0, 2, 3, 3.9, 4.0, 4.0]}))
    settle = settle_table(summary, tolerance=0.05, atol=1e-3)
    assert settle["settle_n_gain"][0].as_py() == 8 and settle["settled"][0].as_py()
    # Still moving at the last doubling: not settled.
    moving = settle_table(summarize(_table({"a": [0, 1, 2, 3, 3.5, 4.0]})), tolerance=0.05)
    assert moving["settle_n"][0].as_py() == 32 and not moving["settled"][0].as_py()


def test_the_convergence_table_has_errors_and_ess_on_known_gaussian_rewards(tmp_path):
    rng = np.random.default_rng(0)
    n = 4096
    table = pa.table({"prompt_id": np.repeat(["p0", "p1"], n), "sample_idx": np.tile(np.arange(n), 2),
                      "r": np.concatenate([rng.normal(0, 1, n), rng.normal(0, 0.5, n)])})
    pq.write_table(table, tmp_path / "samples.parquet")
    prefixes = reduce_samples(tmp_path / "samples.parquet", AnalysisConfig(betas=(1.0, 4.0), best_of_n=False)).convergence
    assert sorted(set(prefixes["n_samples"].to_pylist())) == [2**k for k in range(13)]
    final = prefixes.filter(pa.compute.equal(prefixes["n_samples"], n)).to_pylist()
    for row in final:
        sigma = 1.0 if row["prompt_id"] == "p0" else 0.5
        assert abs(row["gain"] - sigma**2 / row["beta"]) < 4 * row["gain_se"]
        assert abs(row["kl"] - sigma**2 / (2 * row["beta"] ** 2)) < 4 * row["kl_se"] + 1e-3
        assert 0 < row["ess"] <= n
    result = study_from_table(prefixes, title="gaussian")
    paths = write_study(result, tmp_path / "out")
    assert {"study_convergence.png", "study_frontier_by_n.png", "study_ess.png", "study.md"} <= {p.name for p in paths}
    assert result.ess.num_rows == 2 * 2  # prompts x betas
    assert "gain_mc_se" in result.summary.column_names


@pytest.mark.slow
def test_study_generates_only_missing_rounds(tiny_models, tmp_path, ray_local):
    from limits_ray.runs.job import run_job
    from limits_ray.runs.study import run_study

    config = tiny_job(
        tiny_models, tmp_path, generation={"samples_per_prompt": 32},
        rewards=[{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                  "num_cpus": 0.25}],
        analysis={"betas": "0.1:10:5", "align": ["length"]},
    )
    run_job(config)  # 2 rounds per prompt in the store
    result = run_study(config, max_n=64)
    out = Path(config.output_dir) / "study-N64"
    saved = json.loads((out / "study.json").read_text())
    assert saved["rounds_generated"] == 3 * 2 and saved["rounds_from_store"] == 3 * 2
    assert result.settle.num_rows == 5 and set(result.settle["n_max"].to_pylist()) == {64}
    assert set(result.prefixes["n_samples"].to_pylist()) == {1, 2, 4, 8, 16, 32, 64}
    assert result.ess.num_rows == 3 * 5
    for name in ("study_convergence.png", "study_frontier_by_n.png", "study_ess.png", "study.md", "frontier.parquet"):
        assert (out / name).stat().st_size > 500, name
