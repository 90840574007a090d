"""Policy KL and gain estimates against exact answers on finite response sets."""

from __future__ import annotations

import numpy as np
import pytest

from limits_ray.core.policy_stats import (
    between_or_within_se,
    exact_kl,
    frontier_gain_at_kl,
    frontier_slope_at_kl,
    gap_se,
    hash_normal,
    inverse_sqrt_reference,
    mean_over_prompts,
    prompt_estimate,
)


def _discrete(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    logits = rng.normal(0.0, scale, size)
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


def test_exact_kl_by_enumeration():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    assert exact_kl(p, q) == pytest.approx(np.log(2.0))
    assert exact_kl(q, q) == 0.0
    assert exact_kl(q, p) == float("inf")


def test_policy_kl_matches_enumeration_on_a_finite_set():
    rng = np.random.default_rng(0)
    pi0 = _discrete(rng, 12, 1.0)
    reward = rng.normal(size=12)
    pi = pi0 * np.exp(reward / 0.7)
    pi /= pi.sum()
    truth = exact_kl(pi, pi0)
    gain_truth = pi @ reward - pi0 @ reward
    draws = rng.choice(12, size=200_000, p=pi)
    base = rng.choice(12, size=200_000, p=pi0)
    estimate = prompt_estimate(np.log(pi[draws]), np.log(pi0[draws]), reward[draws], reward[base])
    assert abs(estimate.kl - truth) < 4 * estimate.kl_se
    assert estimate.kl_se < 0.01 * truth
    assert abs(estimate.gain[0] - gain_truth) < 4 * estimate.gain_se[0]


def test_standard_errors_are_calibrated():
    """Over many small replicates, |estimate - truth| / se is about standard normal."""
    rng = np.random.default_rng(1)
    pi0, pi = _discrete(rng, 6, 1.0), _discrete(rng, 6, 1.0)
    reward = rng.normal(size=6)
    truth, gain_truth = exact_kl(pi, pi0), pi @ reward - pi0 @ reward
    z_kl, z_gain = [], []
    for _ in range(2000):
        draws, base = rng.choice(6, size=64, p=pi), rng.choice(6, size=48, p=pi0)
        estimate = prompt_estimate(np.log(pi[draws]), np.log(pi0[draws]), reward[draws], reward[base])
        z_kl.append((estimate.kl - truth) / estimate.kl_se)
        z_gain.append((estimate.gain[0] - gain_truth) / estimate.gain_se[0])
    for z in (np.asarray(z_kl), np.asarray(z_gain)):
        assert abs(z.mean()) < 0.1
        assert 0.9 < z.std() < 1.15


def test_the_base_as_its_own_policy_has_zero_kl():
    rng = np.random.default_rng(2)
    log_p = np.log(_discrete(rng, 10, 1.0))
    draws = rng.choice(10, size=100, p=np.exp(log_p))
    estimate = prompt_estimate(log_p[draws], log_p[draws], np.zeros(100), np.zeros(30))
    assert estimate.kl == 0.0 and estimate.kl_se == 0.0 and estimate.gain[0] == 0.0


def test_prompt_average_and_its_standard_error():
    first = prompt_estimate([-1.0, -2.0], [-2.0, -2.0], [[1.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]])
    second = prompt_estimate([-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0], [[0.0, 0.0]] * 3, [[0.0, 0.0]] * 4)
    assert first.kl == pytest.approx(0.5) and first.kl_se == pytest.approx(0.5)
    np.testing.assert_allclose(first.gain, [2.0, -1.0])
    np.testing.assert_allclose(first.gain_se, [1.0, 0.0])
    mean = mean_over_prompts([first, second])
    assert mean.kl == pytest.approx((0.5 + 1.0) / 2)
    assert mean.kl_se == pytest.approx(np.sqrt(0.5**2 + (1.0 / np.sqrt(3)) ** 2) / 2)
    assert mean.n == 5 and mean.n_base == 6 and mean.prompts == 2


def test_frontier_gain_at_kl_interpolates_from_the_origin():
    kl, gain = np.array([2.0, 0.5, 1.0]), np.array([3.0, 1.0, 2.0])
    assert frontier_gain_at_kl(kl, gain, 0.75)[0] == pytest.approx(1.5)
    assert frontier_gain_at_kl(kl, gain, 0.25)[0] == pytest.approx(0.5)  # towards (0, 0)
    assert frontier_gain_at_kl(kl, gain, -0.1)[0] == 0.0
    assert np.isnan(frontier_gain_at_kl(kl, gain, 2.5)[0])
    assert frontier_gain_at_kl(kl, gain, 1.5, gain_se=np.array([0.4, 0.2, 0.2]))[1] == pytest.approx(0.3)


def test_one_policy_sample_has_no_within_prompt_se_and_the_mean_falls_back_to_the_prompts_spread():
    single = prompt_estimate([-1.0], [-2.0], [[3.0]], [[1.0], [2.0]])
    assert single.kl == 1.0 and np.isnan(single.kl_se) and np.isnan(single.gain_se[0])
    other = prompt_estimate([-1.0, -1.0], [-1.5, -2.5], [[0.0], [2.0]], [[1.0], [1.0]])
    third = prompt_estimate([0.0], [0.0], [[0.0]], [[0.0], [1.0]])
    mean = mean_over_prompts([single, other, third])
    kls, gains = np.array([1.0, 1.0, 0.0]), np.array([1.5, 0.0, -0.5])
    assert mean.kl_se == pytest.approx(kls.std(ddof=1) / np.sqrt(3))
    assert mean.gain_se[0] == pytest.approx(gains.std(ddof=1) / np.sqrt(3))
    assert np.isnan(mean_over_prompts([single]).kl_se)  # one prompt of one sample: no se at all
    np.testing.assert_allclose(between_or_within_se(np.array([[1.0], [3.0]]), np.array([[0.3], [0.4]])), [0.25])


def test_between_prompt_fallback_covers_with_one_sample_per_prompt():
    """200 prompts of one policy sample each, 400 replicates: the fallback 95% interval covers the KL."""
    rng = np.random.default_rng(4)
    pi0, pi = _discrete(rng, 6, 1.0), _discrete(rng, 6, 1.0)
    truth, covered = exact_kl(pi, pi0), 0
    for _ in range(400):
        draws = rng.choice(6, size=200, p=pi)
        estimates = [prompt_estimate([np.log(pi[d])], [np.log(pi0[d])], [0.0], [0.0, 0.0]) for d in draws]
        mean = mean_over_prompts(estimates)
        covered += abs(mean.kl - truth) <= 1.96 * mean.kl_se
    assert 0.92 <= covered / 400 <= 0.98


def test_frontier_slope_is_the_slope_of_the_anchored_interpolation():
    kl, gain = np.array([2.0, 0.5, 1.0]), np.array([3.0, 1.0, 2.0])
    assert frontier_slope_at_kl(kl, gain, 0.25) == pytest.approx(2.0)  # the piece from (0, 0)
    assert frontier_slope_at_kl(kl, gain, -0.1) == pytest.approx(2.0)
    assert frontier_slope_at_kl(kl, gain, 0.75) == pytest.approx(2.0)
    assert frontier_slope_at_kl(kl, gain, 1.0) == pytest.approx(1.0)  # a grid point: the piece to its right
    assert frontier_slope_at_kl(kl, gain, 2.0) == pytest.approx(1.0)
    assert np.isnan(frontier_slope_at_kl(kl, gain, 2.5))
    # Gaussian frontier gain = sigma sqrt(2 KL): slope sigma / sqrt(2 KL)
    betas = np.geomspace(0.2, 20, 400)
    assert frontier_slope_at_kl(1 / (2 * betas**2), 1 / betas, 0.5) == pytest.approx(1.0, rel=0.01)


def test_gap_se_formula():
    assert gap_se(0.3, 0.1, 0.4, 0.0) == pytest.approx(0.5)
    assert gap_se(0.3, 0.1, 0.0, 4.0) == pytest.approx(0.5)
    assert gap_se(0.3, 0.1, 0.0, 4.0, kl_gain_cov=0.0125) == pytest.approx(np.sqrt(0.25 - 0.1))
    assert gap_se(0.3, 0.075, 0.2, 4.0, kl_gain_cov=0.0225) == pytest.approx(0.2)  # errors along the frontier cancel


@pytest.mark.parametrize("scale", [1.0, 0.7, 1.3])
def test_gap_se_matches_the_spread_of_the_gap(scale):
    """Base N(0, 1), policy N(1, scale^2), exact frontier gain = sqrt(2 KL): sd of the gap over 600
    replicates equals the rms gap_se (scale 1 is a tilt of pi0, on the frontier: its gain and KL
    errors cancel and only the base mean is left, which the se without the covariance misses)."""
    rng = np.random.default_rng(int(scale * 10))
    betas = np.geomspace(0.1, 100, 2000)
    kl_grid, gain_grid = 1 / (2 * betas**2), 1 / betas
    gaps, errors, without_cov = [], [], []
    for _ in range(600):
        y, base = rng.normal(1.0, scale, 100), rng.normal(0, 1, 400)
        est = prompt_estimate(-(y - 1.0) ** 2 / (2 * scale**2) - np.log(scale), -y**2 / 2, y, base)
        frontier_gain, _ = frontier_gain_at_kl(kl_grid, gain_grid, est.kl)
        slope = frontier_slope_at_kl(kl_grid, gain_grid, est.kl)
        gaps.append(frontier_gain - est.gain[0])
        errors.append(gap_se(est.gain_se[0], est.kl_se, 0.0, slope, est.kl_gain_cov[0]))
        without_cov.append(gap_se(est.gain_se[0], est.kl_se, 0.0, slope))
    spread = np.std(gaps)
    assert np.sqrt(np.mean(np.square(errors))) == pytest.approx(spread, rel=0.12)
    if scale == 1.0:
        assert np.sqrt(np.mean(np.square(without_cov))) > 2 * spread


def test_hash_normal_is_deterministic_and_standard():
    ids = np.array([f"p{i % 7}" for i in range(20_000)])
    idx = np.arange(20_000)
    first, again, other = hash_normal(ids, idx, "a"), hash_normal(ids, idx, "a"), hash_normal(ids, idx, "b")
    np.testing.assert_array_equal(first, again)
    assert abs(first.mean()) < 0.03 and abs(first.std() - 1) < 0.03
    assert abs(np.corrcoef(first, other)[0, 1]) < 0.03


def test_inverse_sqrt_reference():
    constant, curve = inverse_sqrt_reference(np.array([1, 4, 16]), np.array([0.8, 0.5, 0.1]))
    assert constant == pytest.approx(0.8)
    np.testing.assert_allclose(curve, [0.8, 0.4, 0.2])


# The table builders of limits_ray.runs.compare on synthetic inputs (no Ray, no vLLM).

import pyarrow as pa  # noqa: E402

from limits_ray.core.compare_tables import (
    POLICY_SCHEMA,
    bon_points,
    ensemble_table,
    policy_points,
    proxy_gold_table,
)  # noqa: E402


def _frontier_mean() -> pa.Table:
    rows = []
    for align in ("gold", "proxy"):
        for beta, kl, gain in ((10.0, 0.5, 1.0), (1.0, 1.0, 2.0), (0.1, 2.0, 3.0)):
            rows.append({"align": align, "eval": "gold", "beta": beta, "prompts": 2,
                         "gain": gain if align == "gold" else gain / 2, "gain_se": 0.1, "kl": kl, "kl_se": 0.01})
    return pa.Table.from_pylist(rows)


def test_policy_points_against_a_known_frontier():
    samples = pa.table({
        "prompt_id": ["a", "a", "b", "b"], "logprob": [-1.0, -1.0, -2.0, -2.0],
        "base_logprob": [-1.5, -2.5, -3.0, -3.0], "gold": [1.0, 3.0, 2.0, 2.0],
    })
    base = pa.table({"prompt_id": ["a", "a", "b", "b", "b"], "gold": [0.0, 0.0, 1.0, 1.0, 1.0]})
    rows = {row["align"]: row for row in policy_points("ckpt", samples, base, _frontier_mean())}
    gold = rows["gold"]
    assert gold["kl"] == pytest.approx((1.0 + 1.0) / 2)  # prompt a: mean(0.5, 1.5); prompt b: 1
    assert gold["gain"] == pytest.approx((2.0 + 1.0) / 2)
    assert gold["frontier_gain"] == pytest.approx(2.0) and gold["gap"] == pytest.approx(0.5)
    assert gold["frontier_beta"] == pytest.approx(1.0) and not gold["beyond_grid"]
    assert rows["proxy"]["frontier_gain"] == pytest.approx(1.0)
    pa.Table.from_pylist(list(rows.values()), schema=POLICY_SCHEMA)  # fits the documented schema


def test_policy_beyond_the_grid_gets_a_lower_bound_on_its_gap():
    samples = pa.table({"prompt_id": ["a", "a"], "logprob": [0.0, 0.0], "base_logprob": [-5.0, -5.0], "gold": [1.0, 1.0]})
    base = pa.table({"prompt_id": ["a", "a"], "gold": [0.0, 0.0]})
    row = [r for r in policy_points("far", samples, base, _frontier_mean()) if r["align"] == "gold"][0]
    assert row["beyond_grid"] and row["kl"] == 5.0
    assert row["frontier_gain"] == pytest.approx(3.0) and row["gap"] == pytest.approx(2.0)


def test_bon_points_and_proxy_gold():
    bon = pa.table({"prompt_id": ["a", "b"], "align": ["gold", "gold"], "eval": ["gold", "gold"], "n": [2, 2],
                    "reward": [0.0, 0.0], "gain": [0.5, 1.5], "kl": [0.75, 0.75],
                    "reward_se": [0.1, 0.2], "gain_se": [0.1, 0.2]})
    (row,) = bon_points(bon, _frontier_mean(), 64)
    assert row["policy"] == "best-of-2" and row["gain"] == 1.0 and row["frontier_gain"] == pytest.approx(1.5)
    assert row["samples"] == 64 and row["gain_se"] == pytest.approx(np.sqrt(0.1**2 + 0.2**2) / 2)
    # its KL is taken as exact; it comes from the frontier's own base samples: |cov| <= gain_se * 0.1 (Cauchy-Schwarz)
    assert row["gap_se"] == pytest.approx(row["gain_se"] + 0.1)
    unknown = bon.set_column(bon.schema.get_field_index("gain_se"), "gain_se", pa.array([0.1, None], pa.float64()))
    (row,) = bon_points(unknown, _frontier_mean(), 64)  # n = N: no jackknife; the prompts' spread instead
    assert row["gain_se"] == pytest.approx(np.std([0.5, 1.5], ddof=1) / np.sqrt(2))
    table = proxy_gold_table(_frontier_mean(), "gold")
    losses = {(r["align"], r["beta"]): r["loss"] for r in table.to_pylist()}
    assert losses[("gold", 1.0)] == 0.0 and losses[("proxy", 1.0)] == pytest.approx(1.0)


def test_ensemble_without_noise_is_the_gold():
    rng = np.random.default_rng(3)
    base = pa.table({"prompt_id": np.repeat(["a", "b"], 50), "sample_idx": np.tile(np.arange(50), 2),
                     "gold": rng.normal(size=100)})
    exact = ensemble_table(base, "gold", 3, 0.0, 0.5)
    np.testing.assert_allclose(exact["gap"].to_numpy(), 0.0, atol=1e-12)
    noisy = ensemble_table(base, "gold", 3, 1.0, 0.5)
    assert noisy["members"].to_pylist() == [1, 2, 3] and noisy["noise"][0].as_py() > 0
    np.testing.assert_allclose(noisy["gap"].to_numpy(), noisy["gold_aligned_gain"].to_numpy() - noisy["gold_gain"].to_numpy())
    assert noisy["reference"][0].as_py() == pytest.approx(abs(noisy["gap"][0].as_py()))
