"""Policies against the frontier on the tiny models: the real Ray Data + vLLM run of ``compare``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from limits_ray.config import PolicyConfig
from limits_ray.core.compare_tables import POLICY_SCHEMA, policy_estimates
from limits_ray.core.policy_stats import exact_kl
from limits_ray.core.reward_spec import RewardSpec
from limits_ray.pipeline.policy_stages import sample_policy
from limits_ray.pipeline.prompts import Prompt
from limits_ray.runs.compare import CompareOptions, compare
from limits_ray.tiny_models import blend_checkpoint

from _tiny import tiny_job, tiny_job_mapping

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compared(tiny_models, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("compare")
    blend = blend_checkpoint(tiny_models.policy, tiny_models.policy_b, 0.1, out / "policy_blend")
    rewards = tiny_job_mapping(tiny_models, out)["rewards"][:2]  # rm (vLLM, the proxy), rm_b (transformers, the gold)
    config = tiny_job(
        tiny_models, out,
        generation={"samples_per_prompt": 32, "n": 16},
        rewards=rewards,
        analysis={"betas": "0.01:30:25", "align": ["rm", "rm_b"], "evals": ["rm", "rm_b"]},
        policies=[
            {"name": "base", "model": str(tiny_models.policy), "samples_per_prompt": 32, "n": 16},
            {"name": "policy_b", "model": str(tiny_models.policy_b), "samples_per_prompt": 32, "n": 16},
            {"name": "blend", "model": str(blend), "samples_per_prompt": 32, "n": 16},
        ],
    )
    # proposals off: they would sample the base again and score every sample under every policy (12 more
    # engine passes); tests/test_proposals.py runs them on one-token responses with exact values
    return config, compare(config, CompareOptions(gold="rm_b", proxy="rm", members=4, proposals=False))


def _rows(table, **equal):
    for column, value in equal.items():
        table = table.filter(pc.equal(table[column], value))
    return table.to_pylist()


def test_outputs_and_figures(compared):
    config, result = compared
    out = Path(config.output_dir)
    table = pq.read_table(out / "policies.parquet")
    assert table.schema.equals(POLICY_SCHEMA) and table.num_rows == result.policies.num_rows
    for name in ("policies.png", "proxy_gold.png", "ensembles.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert "policy_b" in (out / "compare.md").read_text()
    assert pq.read_table(out / "policies" / "policy_b.parquet").num_rows == 3 * 32


def test_the_base_model_as_its_own_policy_has_kl_and_gain_zero(compared):
    config, result = compared
    samples = pq.read_table(Path(config.output_dir) / "policies" / "base.parquet")
    # the same model scores its own samples: log pi == log pi0 sample by sample
    np.testing.assert_allclose(samples["logprob"].to_numpy(), samples["base_logprob"].to_numpy(), atol=2e-3)
    for row in _rows(result.policies, policy="base"):
        assert abs(row["kl"]) < 1e-3
        assert abs(row["gain"]) < 3.5 * row["gain_se"], row
        assert row["gain_se"] > 0


def test_second_model_is_placed_against_the_frontier_with_its_gap(compared):
    _, result = compared
    for name in ("policy_b", "blend"):
        rows = _rows(result.policies, policy=name)
        assert {(row["align"], row["eval"]) for row in rows} == {("rm", "rm"), ("rm_b", "rm_b"), ("rm", "rm_b"), ("rm_b", "rm")}
        for row in rows:
            assert row["kl"] > 5 * row["kl_se"] > 0  # another model is measurably away from pi0
            assert np.isfinite(row["frontier_gain"]) and np.isfinite(row["gap"])
            assert row["gap"] == pytest.approx(row["frontier_gain"] - row["gain"])
            # gap_se is NaN where the frontier has no interval (weights not reliable at N = 32); else the KL
            # term can shrink it below gain_se (errors along the frontier cancel), never below the frontier's
            assert row["gain_se"] > 0
            assert np.isnan(row["gap_se"]) == np.isnan(row["frontier_gain_se"])
            assert np.isnan(row["gap_se"]) or row["gap_se"] >= row["frontier_gain_se"] > 0
    # policy_b (another random model, ~10 nats away) lies beyond what 32 samples per prompt reach
    # (about log 32 nats): its gap is a lower bound; the 0.1 blend lies inside the frontier's range
    assert all(row["beyond_grid"] and row["kl"] > np.log(32) for row in _rows(result.policies, policy="policy_b"))
    for row in _rows(result.policies, policy="blend"):
        assert not row["beyond_grid"] and 0 < row["kl"] < np.log(32)
        assert np.isfinite(row["frontier_beta"]) or row["kl"] < 0.05
        if row["align"] == row["eval"]:
            assert not row["gap"] < -3 * row["gap_se"]  # no policy beats the frontier beyond its errors


def test_best_of_n_points_sit_on_or_under_the_frontier(compared):
    _, result = compared
    rows = [row for row in _rows(result.policies, kind="best_of_n") if row["align"] == row["eval"]]
    assert {row["bon_n"] for row in rows} == {1, 2, 4, 8, 16, 32}
    assert all(row["samples"] == 3 * 32 for row in rows)
    # jackknife se per prompt for n < N; for n = N = 32 the spread over the 3 prompts; the gap has an se
    # wherever the frontier has one (NaN where some prompt's weights are not reliable at N = 32)
    assert all(np.isfinite(row["gain_se"]) for row in rows if row["bon_n"] > 1)
    assert all(np.isfinite(row["gap_se"]) == np.isfinite(row["frontier_gain_se"]) for row in rows if row["bon_n"] > 1)
    # the frontier from N samples is biased low as its KL nears log N: compare for n <= N/4
    for row in (row for row in rows if row["bon_n"] <= 8):
        if row["bon_n"] == 1:
            assert row["kl"] == pytest.approx(0.0, abs=1e-12) and row["gain"] == pytest.approx(0.0, abs=1e-12)
        assert np.isfinite(row["frontier_gain"]), row
        # on or under, up to the frontier's standard error (linear interpolation between grid betas
        # also lies slightly under the concave frontier)
        assert row["gap"] > -max(np.nan_to_num(row["frontier_gain_se"]), 0.02 * abs(row["frontier_gain"]), 1e-9), row


def test_proxy_gold_and_ensembles(compared):
    _, result = compared
    gold = _rows(result.proxy_gold, align="rm_b")
    proxy = _rows(result.proxy_gold, align="rm")
    assert gold and proxy and all(row["loss"] == 0.0 for row in gold)
    assert {row["beta"] for row in gold} == {row["beta"] for row in proxy}
    ensembles = result.ensembles.to_pylist()
    assert [row["members"] for row in ensembles] == [1, 2, 3, 4]
    assert ensembles[0]["reference"] == pytest.approx(abs(ensembles[0]["gap"]))
    for row in ensembles:
        assert row["gap"] == pytest.approx(row["gold_aligned_gain"] - row["gold_gain"])


def test_policy_kl_matches_enumeration_over_one_token_responses(tiny_models, tmp_path, ray_local):
    """max_tokens 1: the response set is the vocabulary, so KL(pi || pi0) is a finite sum."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_job(
        tiny_models, tmp_path, generation={"max_tokens": 1, "samples_per_prompt": 32, "n": 32},
        rewards=[{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                  "num_cpus": 0.25}],
    )
    prompts = [Prompt(f"p{index}", text, text, 0) for index, text in enumerate(config.prompts.inline)]
    policy = PolicyConfig(name="policy_b", model=str(tiny_models.policy_b), samples_per_prompt=512, n=128)
    samples = sample_policy(config, policy, prompts)
    assert samples.num_rows == 3 * 512 and set(samples["response_tokens"].to_pylist()) == {1}

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.policy)
    log_probs = {}
    for name, path in (("pi", tiny_models.policy_b), ("pi0", tiny_models.policy)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            log_probs[name] = [
                torch.log_softmax(model(**tokenizer(text, return_tensors="pt")).logits[0, -1], -1).numpy().astype(np.float64)
                for text in config.prompts.inline
            ]
    exact = np.mean([exact_kl(np.exp(p), np.exp(q)) for p, q in zip(log_probs["pi"], log_probs["pi0"])])

    # per sample: vLLM's log pi and log pi0 are the enumerated next-token log-probabilities
    ids = {prompt.prompt_id: index for index, prompt in enumerate(prompts)}
    texts = samples["response"].to_pylist()
    for row, prompt_id in enumerate(samples["prompt_id"].to_pylist()[:64]):
        token = tokenizer.encode(texts[row])
        if len(token) != 1:
            continue  # a partial UTF-8 byte does not round-trip through the text
        assert samples["logprob"][row].as_py() == pytest.approx(log_probs["pi"][ids[prompt_id]][token[0]], abs=1e-3)
        assert samples["base_logprob"][row].as_py() == pytest.approx(log_probs["pi0"][ids[prompt_id]][token[0]], abs=1e-3)

    base = samples.select(["prompt_id", "length"])  # any base table with the reward column
    estimate, used = policy_estimates(samples, base, [RewardSpec.parse("length")])
    assert len(used) == 3
    assert abs(estimate.kl - exact) < 4 * estimate.kl_se, (estimate.kl, estimate.kl_se, exact)
    assert estimate.kl_se < 0.25 * exact
