"""Adaptive sampling decisions (pure numpy) and their effect on prompts with known exact values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from limits_ray.adaptive import plan_wave, prompt_errors, worst_ratio
from limits_ray.exact import gaussian_gain, gaussian_kl
from limits_ray.stats import TiltStats


def test_tight_prompts_stop_and_wide_ones_grow_by_the_projection():
    gain_se = np.array([[0.01, 0.02], [0.1, 0.02], [0.04, np.nan]])
    kl_se = np.array([[0.01, 0.01], [0.01, 0.01], [0.01, 0.01]])
    plan = plan_wave(gain_se, kl_se, samples=np.array([64, 64, 64]), gain_tol=0.05, kl_tol=0.05,
                     max_samples=4096, step=16, growth=4.0)
    assert plan.done.tolist() == [True, False, False]
    assert plan.targets[0] == 64  # under tolerance at every beta: no more samples
    assert plan.targets[1] == 256  # projected 64 * (0.1/0.05)^2 = 256, within growth x4
    assert plan.targets[2] == 256  # NaN se counts as wide: grows by the cap
    assert not plan.finished


def test_caps_and_total_budget_serve_the_widest_first():
    gain_se = np.array([[0.5], [0.2], [0.1]])
    kl_se = np.zeros((3, 1))
    plan = plan_wave(gain_se, kl_se, np.array([100, 100, 100]), 0.05, 0.05, max_samples=300, step=10, growth=100)
    assert plan.targets.tolist() == [300, 300, 300]  # all capped by max_samples
    limited = plan_wave(gain_se, kl_se, np.array([100, 100, 100]), 0.05, 0.05, max_samples=10_000, step=10,
                        growth=100, budget_left=1000)
    assert limited.targets.sum() - 300 == 1000
    assert limited.targets[0] > limited.targets[2]  # the widest prompt got its share first
    done = plan_wave(gain_se, kl_se, np.array([300, 300, 300]), 0.05, 0.05, max_samples=300, step=10)
    assert done.finished and done.capped.tolist() == [True, True, True]


def test_worst_ratio_takes_every_beta_and_both_errors():
    ratio = worst_ratio(np.array([[0.01, 0.06]]), np.array([[0.2, 0.0]]), 0.05, 0.1)
    assert ratio.tolist() == [2.0]


def test_prompt_errors_read_the_frontier_table():
    table = pa.table({
        "prompt_id": ["a", "a", "a", "a", "b", "b"], "align": ["r", "r", "s", "s", "r", "r"],
        "eval": ["r", "r", "s", "s", "r", "r"], "beta": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0], "n": [64] * 4 + [32] * 2,
        "gain": [0.0] * 6, "gain_se": [0.1, 0.2, 0.3, 0.05, 0.01, 0.02], "kl": [0.0] * 6,
        "kl_se": [0.0] * 6, "ess": [1.0] * 6,
    })
    ids, gain_se, _, n = prompt_errors(table)
    assert ids == ["a", "b"] and n.tolist() == [64, 32]
    np.testing.assert_allclose(gain_se, [[0.3, 0.2], [0.01, 0.02]])


def test_adaptive_loop_reaches_the_tolerance_with_fewer_samples_than_uniform():
    rng = np.random.default_rng(1)
    sigmas, betas, tol = np.array([0.1, 0.3, 1.0]), np.array([1.0, 3.0]), 0.03
    stats = [TiltStats.from_samples(betas, rng.normal(0, s, (64, 1))) for s in sigmas]
    samples = np.full(3, 64)
    for _ in range(30):
        finals = [state.finalize() for state in stats]
        plan = plan_wave(np.stack([f.gain_se[:, 0] for f in finals]), np.stack([f.kl_se for f in finals]), samples,
                         tol, tol, max_samples=1 << 16, step=32)
        if plan.finished:
            break
        for index in np.flatnonzero(plan.targets > samples):
            extra = int(plan.targets[index] - samples[index])
            stats[index] = stats[index].merge(TiltStats.from_samples(betas, rng.normal(0, sigmas[index], (extra, 1))))
        samples = plan.targets.copy()
    assert plan.finished and plan.done.all()
    assert samples[0] == 64 and samples[2] > 8 * samples[0]  # the narrow prompt stopped, the wide one grew
    assert samples.sum() < 3 * samples.max()  # less than uniform at the widest prompt's N
    for index, sigma in enumerate(sigmas):
        final = stats[index].finalize()
        assert np.all(np.abs(final.gain[:, 0] - gaussian_gain(sigma, betas)) < 5 * tol)
        assert np.all(np.abs(final.kl - gaussian_kl(sigma, betas)) < 5 * tol)


@pytest.mark.slow
def test_run_adaptive_on_the_tiny_models(tiny_models, tmp_path, ray_local):
    import json

    import pyarrow.parquet as pq
    from limits_ray.adaptive import run_adaptive
    from _tiny import tiny_job

    tol = 0.07  # on these prompts: one is wider (its worst se at N = 32 is ~0.094), two are under it
    config = tiny_job(
        tiny_models, tmp_path, generation={"samples_per_prompt": 32},
        rewards=[{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                  "num_cpus": 0.25}],
        analysis={"betas": "1:10:3", "align": ["length"]},
        adaptive={"enabled": True, "gain_se": tol, "kl_se": tol, "max_samples_per_prompt": 64},
    )
    summary = run_adaptive(config)
    frontier = pq.read_table(tmp_path / "frontier.parquet")
    ids, gain_se, kl_se, n = prompt_errors(frontier)
    assert json.loads((tmp_path / "adaptive.json").read_text())["samples"] == int(n.sum()) == summary["samples"]
    assert set(n.tolist()) <= {32, 48, 64}
    assert len(summary["waves"]) >= 2 and n.min() == 32 and n.max() == 64  # the wide prompt got the extra rounds
    assert summary["waves"][1]["rounds_generated"] == int((n - 32).sum()) // 16  # ...and only it was sampled
    for index, prompt_id in enumerate(ids):
        tight = bool(np.all(gain_se[index] <= tol) and np.all(kl_se[index] <= tol))
        assert tight or n[index] == 64, prompt_id  # every prompt is under tolerance or at the cap
        assert (prompt_id in summary["done"]) == tight
