"""End to end: the real Ray Data pipeline, on the tiny models (vLLM generation and scoring) and on synthetic rounds."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from limits_ray.config import GenerationConfig, JobConfig, RewardModelConfig, from_mapping
from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.schemas import SCHEMAS
from limits_ray.pipeline.prompts import prompt_id_for
from limits_ray.pipeline.stages import generation_stage, scorer_stage
from limits_ray.runs.job import run_job
from limits_ray.runs.reduce import reduce_samples
from limits_ray.storage.rounds import ARROW_TYPES

from _tiny import TINY_PROMPTS, tiny_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tiny_models, tmp_path_factory, ray_local):
    """The tiny job, its first prompt given twice (a dataset with a repeated row: sampled once, counted)."""
    inline = [*TINY_PROMPTS, TINY_PROMPTS[0]]
    config = tiny_job(tiny_models, tmp_path_factory.mktemp("run"), prompts={"inline": inline})
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
    assert saved["duplicate_prompts"] == {prompt_id_for(TINY_PROMPTS[0]): 1}
    assert {"generate", "score_rm", "score_rm_b", "score_length", "store", "statistics"} <= set(saved["stage_seconds"])


def test_store_holds_every_sample_once(tiny_run):
    config, _, _, _ = tiny_run
    table = ds.dataset(str(Path(config.store_uri) / "samples"), format="parquet").to_table()
    keys = set(zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist()))
    assert table.num_rows == len(keys) == 3 * 64
    assert np.all(np.asarray(table["response_tokens"]) > 0)
    assert np.isnan(table["logprob"].to_numpy()).all()  # generation.logprobs is off: vLLM computed none
    for reward in ("rm", "rm_b", "length"):
        assert np.all(np.isfinite(table[reward].to_numpy()))


DERIVED = {"gain_kl_cov", "gain_dbeta", "kl_dbeta", "gain_drift", "kl_drift", "slope", "kl_dbeta", "gain_se_at_kl"}


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
                # covariances, derivatives and drifts are differences of sums that can cancel to ~0: rounding there
                # is relative to the column's scale, not to the value
                scale = np.nanmax(np.abs(np.where(np.isfinite(a), a, np.nan)), initial=0.0) if column in DERIVED else 0.0
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=max(1e-12, 1e-10 * scale), err_msg=f"{name}.{column}")
            else:
                assert list(a) == list(b), f"{name}.{column}"


def test_rerun_resumes_from_the_store_and_changes_nothing(tiny_run):
    config, first, _, _ = tiny_run
    second, report = run_job(config)
    assert report.rounds_generated == 0 and report.rounds_from_store == 3 * 4
    np.testing.assert_allclose(second.frontier["gain"].to_numpy(), first.frontier["gain"].to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(second.frontier["kl"].to_numpy(), first.frontier["kl"].to_numpy(), rtol=1e-10, atol=1e-14)


def _ray_worker_logs() -> str:
    """Everything this test module's Ray instance's workers have logged so far."""
    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "".join(path.read_text(errors="replace") for path in logs.glob("worker-*") if path.is_file())


def test_synthetic_rounds_travel_as_arrow_lists_without_pickling(ray_local):
    import ray

    generation = GenerationConfig(kind="synthetic", samples_per_prompt=32, n=16, max_tokens=6, batch_size=2, num_cpus=0.5)
    reward = RewardModelConfig(name="length", kind="function", function="limits_ray.reward_functions:response_length",
                               num_cpus=0.5, batch_size=32)
    requests = [{"prompt_id": f"p{i}", "prompt": f"Q: prompt {i}", "prompt_text": f"prompt {i}", "round": r}
                for i in range(4) for r in range(2)]
    dataset = ray.data.from_items(requests, override_num_blocks=4)
    dataset = scorer_stage(reward, generation.n).apply(generation_stage(generation, True).apply(dataset))
    table = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    types = dict(zip(table.schema.names, table.schema.types))
    assert {name: types[name] for name in ARROW_TYPES} == ARROW_TYPES
    assert types["length"] == pa.list_(pa.float64()) and types["seconds_generate"] == pa.float64()
    assert table.num_rows == 8 and sorted(zip(table["prompt_id"].to_pylist(), table["round"].to_pylist())) == [
        (f"p{i}", r) for i in range(4) for r in range(2)]
    for responses, lengths in zip(table["response"].to_pylist(), table["length"].to_pylist()):
        assert lengths == [len(text) / 10 for text in responses]
    assert "pickled python objects" not in _ray_worker_logs()


def test_synthetic_job_end_to_end_without_a_model(ray_local, tmp_path):
    config = from_mapping(JobConfig, {
        "name": "synthetic-test", "output_dir": str(tmp_path / "out"), "ray_address": "local",
        "prompts": {"inline": ["one prompt", "another prompt", "a third"], "template": "Q: {prompt}\nA:"},
        "generation": {"kind": "synthetic", "samples_per_prompt": 64, "n": 16, "max_tokens": 8, "num_cpus": 0.5},
        "rewards": [{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                     "num_cpus": 0.5}],
        "analysis": {"betas": "0.1:10:3"},
    })
    result, report = run_job(config)
    assert report.samples == 3 * 64 and result.frontier.num_rows == 3 * 3
    stored = ds.dataset(str(Path(config.store_uri) / "samples"), format="parquet").to_table()
    assert stored.num_rows == 3 * 64 and np.all(stored["logprob"].to_numpy() < 0)
    assert json.loads((Path(config.store_uri) / "manifest.json").read_text())["identity"]["base_model"] == "synthetic"
    assert "pickled python objects" not in _ray_worker_logs()


def test_the_job_gates_reliability_across_buckets_as_the_in_memory_reduce(ray_local, tmp_path):
    """24 prompts in 4 store buckets: the per-cell k-hat sums of every bucket gate each bucket's rows, so
    the job's tables equal a reduce of its store in one piece (khat_pooled and reliable included)."""
    config = from_mapping(JobConfig, {
        "name": "gate-test", "output_dir": str(tmp_path / "out"), "ray_address": "local",
        "prompts": {"inline": [f"prompt number {index}" for index in range(24)]},
        "generation": {"kind": "synthetic", "samples_per_prompt": 64, "n": 64, "max_tokens": 24, "num_cpus": 0.5},
        "rewards": [{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                     "num_cpus": 0.5}],
        "store": {"buckets": 4},
        "analysis": {"betas": "0.02:10:6", "best_of_n": False},
    })
    result, _ = run_job(config)
    offline = reduce_samples(Path(config.store_uri) / "samples", AnalysisConfig(
        betas=config.analysis.betas, rewards=("length",), best_of_n=False))
    assert len({path.name for path in (Path(config.output_dir) / "frontier.parquet").iterdir()}) > 1  # shards
    for name in ("frontier", "convergence"):
        keys = [(c, "ascending") for c in ("prompt_id", "align", "eval", "n_samples", "beta") if c in SCHEMAS[name].names]
        left, right = getattr(result, name).sort_by(keys), getattr(offline, name).sort_by(keys)
        assert left.num_rows == right.num_rows > 0
        for column in ("khat", "body_sd", "khat_pooled", "gain_se", "kl_se"):
            np.testing.assert_allclose(left[column].to_numpy(), right[column].to_numpy(), rtol=1e-10, equal_nan=True,
                                       err_msg=f"{name}.{column}")
        assert left["reliable"].to_pylist() == right["reliable"].to_pylist()
    pooled = result.frontier["khat_pooled"].to_numpy()
    assert np.isfinite(pooled).mean() > 0.5  # 24 prompts per cell: pooled
