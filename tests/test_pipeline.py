"""End to end on the tiny models: the real Ray Data pipeline with vLLM generation and scoring."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from limits_ray.config import AnalysisConfig
from limits_ray.io import SCHEMAS
from limits_ray.job import run_job
from limits_ray.reduce import reduce_samples
from _tiny import tiny_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tiny_models, tmp_path_factory, ray_local):
    config = tiny_job(tiny_models, tmp_path_factory.mktemp("run"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result, report = run_job(config)
    return config, result, report, printed.getvalue()


def test_the_driver_prints_progress_and_a_last_line(tiny_run):
    *_, printed = tiny_run
    lines = [line for line in printed.splitlines() if line.startswith("progress: ")]
    assert lines, printed
    assert lines[-1].startswith("progress: rounds 12/12 (100%) | ") and "samples/s (whole run)" in lines[-1]
    assert "quarantined 0" in lines[-1] and "busy: generate " in lines[-1]


def test_outputs_follow_the_contract(tiny_run):
    config, result, report, _ = tiny_run
    for name, schema in SCHEMAS.items():
        table = pq.read_table(f"{config.output_dir}/{name}.parquet")
        assert table.schema.equals(schema), name
        assert table.num_rows > 0, name
    prompts, aligns, betas = 3, 4, len(config.analysis.betas)
    assert result.frontier.num_rows == prompts * aligns * betas
    assert set(result.frontier["n"].to_pylist()) == {64}
    for picture in ("frontier.png", "convergence.png", "ess.png"):
        assert (Path(config.output_dir) / picture).stat().st_size > 10_000
    saved = json.loads((Path(config.output_dir) / "report.json").read_text())
    assert saved["samples"] == prompts * 64 and saved["rounds_generated"] == prompts * 4
    assert {"generate", "score_rm", "score_rm_b", "score_length", "store", "statistics"} <= set(saved["stage_seconds"])


def test_store_holds_every_sample_once(tiny_run):
    config, _, _, _ = tiny_run
    table = ds.dataset(str(Path(config.store_uri) / "samples"), format="parquet").to_table()
    keys = set(zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist()))
    assert table.num_rows == len(keys) == 3 * 64
    assert np.all(np.asarray(table["logprob"]) <= 0) and np.all(np.asarray(table["response_tokens"]) > 0)
    for reward in ("rm", "rm_b", "length"):
        assert np.all(np.isfinite(table[reward].to_numpy()))


def test_offline_reduce_of_the_store_reproduces_the_stream(tiny_run):
    config, streamed, _, _ = tiny_run
    offline = reduce_samples(Path(config.store_uri) / "samples", AnalysisConfig(
        betas=config.analysis.betas, rewards=("rm", "rm_b", "length"), align=config.analysis.align,
    ))
    for name in SCHEMAS:
        left = getattr(streamed, name).sort_by([(c, "ascending") for c in ("prompt_id", "align", "eval") if c in SCHEMAS[name].names])
        right = getattr(offline, name).sort_by([(c, "ascending") for c in ("prompt_id", "align", "eval") if c in SCHEMAS[name].names])
        assert left.num_rows == right.num_rows, name
        for column in SCHEMAS[name].names:
            a, b = left[column].to_numpy(zero_copy_only=False), right[column].to_numpy(zero_copy_only=False)
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{name}.{column}")
            else:
                assert list(a) == list(b), f"{name}.{column}"


def test_rerun_resumes_from_the_store_and_changes_nothing(tiny_run):
    config, first, _, _ = tiny_run
    second, report = run_job(config)
    assert report.rounds_generated == 0 and report.rounds_from_store == 3 * 4
    np.testing.assert_allclose(second.frontier["gain"].to_numpy(), first.frontier["gain"].to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(second.frontier["kl"].to_numpy(), first.frontier["kl"].to_numpy(), rtol=1e-10, atol=1e-14)
