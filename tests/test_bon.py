"""Tests of limits_ray.core.bon: the unbiased best-of-n reward and KL(pi_BoN || pi0), ties included.

References: brute force over all C(N, n) subsets (the U-statistic's definition), brute force over
all n-tuples of a finite response set (the with-replacement BoN policy), the hypergeometric law of
the maximum, exact.finite_bon, E[max of n N(0,1)], and 60-digit decimal arithmetic.
"""

from __future__ import annotations

import decimal
import itertools
import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from limits_ray.core.bon import best_of_n, bon_kl_bound, bon_sizes, jackknife_best_of_n, jackknife_usable, level_kl
from limits_ray.core.exact import expected_max_normal, finite_bon

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)


# ----------------------------------------------------------------------------------------------
# brute-force references
# ----------------------------------------------------------------------------------------------

def subsets_best_of_n(r: np.ndarray, e: np.ndarray, n: int) -> np.ndarray:
    """Average over all C(N, n) subsets of e at the subset's best r; ties: mean over tied elements."""
    total = np.zeros(e.shape[1])
    count = 0
    for subset in itertools.combinations(range(r.size), n):
        subset = list(subset)
        best = r[subset].max()
        tied = [i for i in subset if r[i] == best]
        total += e[tied].mean(axis=0)
        count += 1
    assert count == math.comb(r.size, n)
    return total / count


def tuples_bon_policy(probs: np.ndarray, r: np.ndarray, n: int) -> np.ndarray:
    """P(BoN returns response j): enumerate all n-tuples drawn with replacement from pi0."""
    policy = np.zeros(probs.size)
    for draw in itertools.product(range(probs.size), repeat=n):
        weight = float(np.prod(probs[list(draw)]))
        best = max(r[j] for j in draw)
        winners = [j for j in draw if r[j] == best]  # positions achieving the max, uniform
        for j in winners:
            policy[j] += weight / len(winners)
    return policy


def kl_of(policy: np.ndarray, probs: np.ndarray) -> float:
    support = policy > 0
    return float(np.sum(policy[support] * np.log(policy[support] / probs[support])))


def hypergeometric_best_of_n(counts: np.ndarray, r: np.ndarray, e: np.ndarray, n: int) -> np.ndarray:
    """E[e of the best of n drawn WITHOUT replacement from a set with count_i copies of response i."""
    levels = np.unique(r)
    total_count = int(counts.sum())
    result = np.zeros(e.shape[1])
    below = 0
    for level in levels:
        members = r == level
        at = int(counts[members].sum())
        p_max_here = Fraction(math.comb(below + at, n) - math.comb(below, n), math.comb(total_count, n))
        level_mean = (counts[members, None] * e[members]).sum(axis=0) / at
        result += float(p_max_here) * level_mean
        below += at
    return result


small_rewards = st.integers(1, 8).flatmap(
    lambda size: st.tuples(
        hnp.arrays(np.float64, size, elements=st.integers(0, 3).map(float)),  # many ties
        hnp.arrays(np.float64, (size, 2), elements=st.floats(-10, 10, allow_nan=False, allow_subnormal=False)),
    )
)


# ----------------------------------------------------------------------------------------------
# sizes and bound
# ----------------------------------------------------------------------------------------------

def test_bon_sizes_are_the_powers_of_two_up_to_n():
    assert bon_sizes(1).tolist() == [1]
    assert bon_sizes(2).tolist() == [1, 2]
    assert bon_sizes(7).tolist() == [1, 2, 4]
    assert bon_sizes(8).tolist() == [1, 2, 4, 8]
    assert bon_sizes(1000).tolist() == [2**k for k in range(10)]
    for bad in (0, -3):
        with pytest.raises(ValueError):
            bon_sizes(bad)


def test_kl_bound_values():
    n = np.array([1, 2, 4, 100])
    np.testing.assert_allclose(bon_kl_bound(n), [0.0, math.log(2) - 0.5, math.log(4) - 0.75, math.log(100) - 0.99],
                               rtol=1e-14, atol=1e-300)
    assert np.all(np.diff(bon_kl_bound(np.arange(1, 50))) > 0)


# ----------------------------------------------------------------------------------------------
# unbiasedness: the estimator is the average over all subsets, ties broken at random
# ----------------------------------------------------------------------------------------------

def test_n6_choose_3_with_ties_by_brute_force():
    r = np.array([2.0, 0.5, 2.0, -1.0, 0.5, 1.0])
    e = np.array([[3.0, 1.0], [-2.0, 0.0], [7.0, 2.0], [1.0, 5.0], [4.0, -1.0], [0.0, 0.5]])
    result = best_of_n(r, e, sizes=np.array([3]))
    np.testing.assert_allclose(result.reward[0], subsets_best_of_n(r, e, 3), rtol=1e-13)
    # the second column's gain is 0 exactly: floor of 1e-13 x the size of the terms that cancel
    np.testing.assert_allclose(result.gain[0], subsets_best_of_n(r, e, 3) - e.mean(axis=0), rtol=1e-13,
                               atol=1e-13 * np.abs(e).max())


@PROPERTY
@given(data=small_rewards, shuffle_seed=st.integers(0, 2**32 - 1))
def test_every_n_equals_the_all_subsets_average(data, shuffle_seed):
    r, e = data
    sizes = np.arange(1, r.size + 1)
    result = best_of_n(r, e, sizes=sizes)
    scale = np.abs(e).max() + 1.0
    for k, n in enumerate(sizes):
        np.testing.assert_allclose(result.reward[k], subsets_best_of_n(r, e, n), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(result.gain, result.reward - e.mean(axis=0), rtol=1e-12, atol=1e-12 * scale)
    # the result does not depend on the order of the samples (ties included)
    order = np.random.default_rng(shuffle_seed).permutation(r.size)
    shuffled = best_of_n(r[order], e[order], sizes=sizes)
    np.testing.assert_allclose(shuffled.reward, result.reward, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(shuffled.kl, result.kl, rtol=1e-12, atol=1e-15)


@PROPERTY
@given(data=small_rewards)
def test_kl_on_the_empirical_distribution_equals_tuple_enumeration(data):
    r, e = data
    sizes = np.arange(1, min(r.size, 4) + 1)
    result = best_of_n(r, e, sizes=sizes)
    uniform = np.full(r.size, 1.0 / r.size)
    for k, n in enumerate(sizes):
        if r.size**n > 1500:
            continue
        expected = kl_of(tuples_bon_policy(uniform, r, n), uniform)
        np.testing.assert_allclose(result.kl[k], expected, rtol=1e-10, atol=1e-13)
    assert np.all(result.kl >= -1e-13)
    assert np.all(result.kl <= result.kl_bound + 1e-12)
    np.testing.assert_allclose(result.kl_bound, bon_kl_bound(sizes), rtol=1e-15)


def test_n1_is_the_mean_and_n_equals_N_is_the_best_sample():
    rng = np.random.default_rng(0)
    r = rng.normal(size=37)
    r[5] = r[30] = r.max() + 1.0  # a tie at the top
    e = rng.normal(size=(37, 3))
    result = best_of_n(r, e, sizes=np.array([1, 37]))
    np.testing.assert_allclose(result.reward[0], e.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(result.gain[0], 0.0, atol=1e-12 * np.abs(e).max())
    np.testing.assert_allclose(result.kl[0], 0.0, atol=1e-15)
    np.testing.assert_allclose(result.reward[1], (e[5] + e[30]) / 2, rtol=1e-12)


def test_evaluation_columns_are_independent():
    rng = np.random.default_rng(1)
    r = rng.integers(0, 6, 40).astype(float)
    e = rng.normal(size=(40, 3))
    together = best_of_n(r, e)
    for column in range(3):
        alone = best_of_n(r, e[:, column])
        np.testing.assert_allclose(together.reward[:, column], alone.reward[:, 0], rtol=1e-14)
    np.testing.assert_array_equal(together.n, [1, 2, 4, 8, 16, 32])


def test_sizes_out_of_range_raise():
    r = np.arange(5.0)
    for sizes in ([0], [6], [1, 2, 9]):
        with pytest.raises(ValueError, match="sizes"):
            best_of_n(r, r, sizes=np.array(sizes))


def test_weights_sum_to_one_for_large_n():
    """A constant evaluation reward comes back unchanged for N = 1e5 and n up to N: no overflow."""
    n_samples = 100_000
    r = np.random.default_rng(2).normal(size=n_samples)
    result = best_of_n(r, np.full(n_samples, 3.25))
    assert result.n[-1] == 65536
    assert np.all(np.isfinite(result.reward))
    # Binomials through log-gamma of numbers ~1e5 (values ~1e6) carry ~1e-10 relative rounding.
    np.testing.assert_allclose(result.reward[:, 0], 3.25, rtol=1e-9)
    # and e = r: the estimate increases with n
    assert np.all(np.diff(best_of_n(r, r).reward[:, 0]) > 0)


# ----------------------------------------------------------------------------------------------
# against exact values
# ----------------------------------------------------------------------------------------------

COUNTS = np.array([6, 2, 9, 4, 3, 1, 5])
PROBS = COUNTS / COUNTS.sum()
R = np.array([0.2, 1.1, -0.7, 1.1, 2.4, 3.0, 0.2])  # ties: responses 1 & 3, 0 & 6
E = np.array([[0.5, 1.0], [2.0, -1.0], [-1.0, 0.3], [-0.5, 2.2], [3.0, 0.1], [1.5, 1.7], [0.0, -2.0]])


def test_reproduced_distribution_matches_exact_kl_and_hypergeometric_reward():
    """count_i copies of each response: the empirical pi0 is exact, so the KL is exact, and the
    reward is the without-replacement expectation, within n(n-1)/(2N) * range(e) of finite_bon."""
    copies = COUNTS * 40
    r, e = np.repeat(R, copies), np.repeat(E, copies, axis=0)
    order = np.random.default_rng(3).permutation(r.size)
    sizes = np.array([1, 2, 3, 5, 8, 16, 64])
    result = best_of_n(r[order], e[order], sizes=sizes)
    for k, n in enumerate(sizes):
        exact_reward, exact_kl = finite_bon(PROBS, R, E, int(n))
        np.testing.assert_allclose(result.kl[k], exact_kl, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(result.reward[k], hypergeometric_best_of_n(copies, R, E, int(n)), rtol=1e-11)
        repeat_probability = n * (n - 1) / (2 * r.size)
        assert np.all(np.abs(result.reward[k] - exact_reward) <= repeat_probability * np.ptp(E, axis=0) + 1e-12)


def test_sampled_discrete_distribution_matches_finite_bon():
    rng = np.random.default_rng(4)
    n_samples = 50_000
    index = rng.choice(R.size, size=n_samples, p=PROBS)
    sizes = np.array([1, 2, 4, 8, 16])
    result = best_of_n(R[index], E[index], sizes=sizes)
    for k, n in enumerate(sizes):
        exact_reward, exact_kl = finite_bon(PROBS, R, E, int(n))
        # Hoeffding: var(U-statistic of order n) <= (n/N) var(kernel) <= (n/N) range^2 / 4.
        tolerance = 4 * math.sqrt(n / n_samples) * np.ptp(E, axis=0) / 2
        assert np.all(np.abs(result.reward[k] - exact_reward) <= tolerance), (n, result.reward[k], exact_reward)
        # KL of the empirical levels: a smooth function of level frequencies with sd ~ 1/sqrt(N).
        # (largest deviation over 40 seeds: 0.0024)
        assert abs(result.kl[k] - exact_kl) <= 0.01, (n, result.kl[k], exact_kl)
        assert result.kl[k] < bon_kl_bound(n) - 0.01 or n == 1  # ties: strictly below the bound


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
def test_gaussian_best_of_n_matches_expected_max_of_normals(n):
    n_samples = 40_000
    sigma, mu = 2.0, -1.0
    r = np.random.default_rng(5).normal(mu, sigma, n_samples)
    result = best_of_n(r, r, sizes=np.array([n]))
    # var(max of n iid N(0,1)) <= 1 (Gaussian Poincare), Hoeffding as above
    tolerance = 4 * sigma * math.sqrt(n / n_samples)
    assert abs(result.reward[0, 0] - (mu + sigma * expected_max_normal(n))) <= tolerance
    assert abs(result.gain[0, 0] - sigma * expected_max_normal(n)) <= tolerance + 4 * sigma / math.sqrt(n_samples)


def test_continuous_rewards_reach_the_kl_bound():
    n_samples = 20_000
    r = np.random.default_rng(6).normal(size=n_samples)
    result = best_of_n(r, r)
    gap = result.kl_bound - result.kl
    # N distinct levels of mass 1/N: a Riemann sum of the continuous KL, error O(n^2 / N^2).
    assert np.all(gap >= -1e-12)
    assert np.all(gap <= result.n.astype(float) ** 2 / n_samples**2 + 1e-12), gap
    np.testing.assert_allclose(result.kl[result.n <= 64], bon_kl_bound(result.n[result.n <= 64]), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# level_kl keeps its digits
# ----------------------------------------------------------------------------------------------

def exact_level_kl(probs: np.ndarray, n: int) -> float:
    """sum q log(q/p), q = F^n - F_-^n, in 60-digit decimal arithmetic on the exact float inputs."""
    with decimal.localcontext() as context:
        context.prec = 60
        total, below, below_power = Decimal(0), Decimal(0), Decimal(0)
        for p in probs:
            p = Decimal(float(p))  # exact
            upto = min(below + p, Decimal(1))
            power = (n * upto.ln()).exp()
            q = power - below_power
            if q > 0:
                total += q * (q / p).ln()
            below, below_power = upto, power
        return float(total)


@pytest.mark.parametrize("n", [1, 2, 7, 300, 1000, 10**6])
def test_level_kl_against_exact_arithmetic(n):
    probs = np.array([0.25, 0.5 - 3e-7, 0.25, 1e-7, 1e-7, 1e-7])  # tiny levels near F = 1
    got = level_kl(probs, np.array([n]))[0]
    np.testing.assert_allclose(got, exact_level_kl(probs, n), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("probs, n", [
    ([1 - 2.0**-40, 2.0**-40], 10**8),
    ([1 - 2.0**-26, 2.0**-27, 2.0**-27], 10**8),  # a tiny level just below the top: p/F inexact
    ([0.5, 2.0**-30, 0.5 - 2.0**-30], 10**3),
    ([0.625, 0.375], 5),
])
def test_level_kl_keeps_the_digits_of_tiny_levels(probs, n):
    """Levels of mass ~1/n near F = 1 (inputs summing to 1 exactly).

    Their BoN mass F^n (1 - (1 - p/F)^n) keeps its digits only if (1 - p/F)^n goes through
    log1p: 1 - p/F rounded as a float carries a relative error ~1e-16 F/p of p/F, that is
    ~1e-8 here, far above the tolerance.
    """
    probs = np.array(probs)
    assert probs.sum() == 1.0
    got = level_kl(probs, np.array([n]))[0]
    np.testing.assert_allclose(got, exact_level_kl(probs, n), rtol=1e-10)
    assert got > 0


def test_level_kl_single_level_and_vector_sizes():
    np.testing.assert_allclose(level_kl(np.array([1.0]), np.array([1, 5, 100])), 0.0, atol=1e-15)
    probs = np.full(4, 0.25)
    got = level_kl(probs, np.array([1, 2, 3]))
    want = [exact_level_kl(probs, n) for n in (1, 2, 3)]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# jackknife standard errors: O(N) formula = brute-force leave-one-out; coverage by simulation
# ----------------------------------------------------------------------------------------------

def brute_jackknife(r: np.ndarray, e: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(reward_se, gain_se) from N explicit calls on the N - 1 other samples."""
    count = r.size
    reward = np.array([best_of_n(np.delete(r, j), np.delete(e, j, axis=0), np.array([n])).reward[0] for j in range(count)])
    gain = np.array([best_of_n(np.delete(r, j), np.delete(e, j, axis=0), np.array([n])).gain[0] for j in range(count)])

    def spread(values: np.ndarray) -> np.ndarray:
        return np.sqrt((count - 1) / count * np.sum((values - values.mean(axis=0)) ** 2, axis=0))
    return spread(reward), spread(gain)


def raw_jackknife(r: np.ndarray, e: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`jackknife_best_of_n` of unsorted rewards (every n, before best_of_n withholds the unusable ones)."""
    from limits_ray.core.bon import sorted_levels

    order, level_of_sample, level_counts = sorted_levels(r)
    return jackknife_best_of_n(e[order], level_of_sample, level_counts, sizes)


@PROPERTY
@given(data=small_rewards)
def test_jackknife_equals_brute_force_leave_one_out_with_ties(data):
    r, e = data
    sizes = np.arange(1, r.size + 1)
    reward_all, gain_all = raw_jackknife(r, e, sizes)
    result = best_of_n(r, e, sizes=sizes)
    usable = jackknife_usable(sizes, r.size, int(np.sum(r == r.max())))
    for k, n in enumerate(sizes):
        if n == r.size:  # no leave-one-out estimate of best-of-N from N - 1 samples
            assert np.isnan(reward_all[k]).all() and np.isnan(gain_all[k]).all()
        else:
            reward_se, gain_se = brute_jackknife(r, e, int(n))
            np.testing.assert_allclose(reward_all[k], reward_se, rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(gain_all[k], gain_se, rtol=1e-9, atol=1e-11)
        if n == 1:  # best of 1 is pi0: gain 0 exactly, and its se
            assert np.all(result.gain[k] == 0) and np.all(result.gain_se[k] == 0)
        elif usable[k]:
            np.testing.assert_array_equal(result.gain_se[k], gain_all[k])
        else:
            assert np.isnan(result.reward_se[k]).all() and np.isnan(result.gain_se[k]).all()


def test_jackknife_equals_brute_force_for_continuous_rewards():
    rng = np.random.default_rng(11)
    r = rng.normal(size=40)
    e = np.stack([r, rng.normal(size=40) + r], axis=1)
    sizes = np.array([1, 2, 3, 8, 39])
    reward_all, gain_all = raw_jackknife(r, e, sizes)
    for k, n in enumerate(sizes):
        reward_se, gain_se = brute_jackknife(r, e, int(n))
        np.testing.assert_allclose(reward_all[k], reward_se, rtol=1e-9)
        np.testing.assert_allclose(gain_all[k], gain_se, rtol=1e-9, atol=1e-15)
    # n = 1: the reward is the sample mean and the jackknife gives sd(ddof=1) / sqrt(N); the gain is 0
    result = best_of_n(r, e, sizes=sizes)
    np.testing.assert_allclose(result.reward_se[0], e.std(axis=0, ddof=1) / np.sqrt(40), rtol=1e-10)
    np.testing.assert_allclose(result.gain_se[0], 0.0, atol=0)
    # given up to N/16 = 2.5 only: beyond, the interval does not cover (bench/bench_coverage.py)
    np.testing.assert_array_equal(result.reward_se[1], reward_all[1])
    assert np.isnan(result.reward_se[2:]).all() and np.isnan(result.gain_se[2:]).all()


def test_jackknife_usable_up_to_a_sixteenth_of_n_and_before_the_top_level_saturates():
    sizes = np.array([1, 2, 4, 8, 16, 32, 64, 128])
    np.testing.assert_array_equal(jackknife_usable(sizes, 1000, 1), sizes <= 62.5)
    np.testing.assert_array_equal(jackknife_usable(sizes, 1000, 50), sizes <= 20)  # n * 50 <= 1000
    np.testing.assert_array_equal(jackknife_usable(sizes, 4000, 1), sizes <= 250)


@pytest.mark.parametrize("discrete", [False, True])
def test_jackknife_intervals_cover_the_exact_best_of_n_reward(discrete):
    """95% intervals reward +- 1.96 se cover E[e of the best of n] in about 95% of 400 replicates (n <= N/16).

    The jackknife variance matches the estimator's variance; intervals are symmetric while the
    estimator is skewed, so coverage falls as n nears N (Gaussian, N = 64: 0.95, 0.93, 0.91, 0.89 for
    n = 2, 4, 8, 16 over 2000 replicates).
    """
    rng = np.random.default_rng(3)
    sizes, n_samples, reps = np.array([2, 4, 8]), 128, 400
    probs = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    levels = np.array([0.0, 1.0, 1.5, 3.0, 4.0])
    if discrete:  # ties everywhere; exact values by enumeration (limits_ray.core.exact)
        exact = np.array([finite_bon(probs, levels, levels[:, None], int(n))[0][0] for n in sizes])
    else:
        exact = np.array([expected_max_normal(int(n)) for n in sizes])
    rewards, errors = [], []
    for _ in range(reps):
        r = levels[rng.choice(levels.size, n_samples, p=probs)] if discrete else rng.normal(size=n_samples)
        result = best_of_n(r, r, sizes=sizes)
        rewards.append(result.reward[:, 0])
        errors.append(result.reward_se[:, 0])
    rewards, errors = np.array(rewards), np.array(errors)
    given = np.isfinite(errors)
    assert given.mean(axis=0).min() >= 0.8  # discrete: withheld where the top level is drawn > N/n times
    coverage = np.array([np.mean(np.abs(rewards[given[:, k], k] - exact[k]) <= 1.96 * errors[given[:, k], k])
                         for k in range(sizes.size)])
    np.testing.assert_allclose(np.sqrt(np.nanmean(errors**2, axis=0)), rewards.std(axis=0), rtol=0.15)
    # binomial sd at 95% over 400 replicates is 1.1%; the jackknife is conservative for U-statistics
    assert np.all(coverage >= 0.90) and np.all(coverage <= 0.995), coverage


def test_jackknife_in_chunks_of_n_gives_the_same_errors(monkeypatch):
    """The leave-one-out arrays are built a few values of n at a time (bounded memory at large N)."""
    import limits_ray.core.bon as bon

    rng = np.random.default_rng(4)
    align, evals = rng.integers(0, 20, 256).astype(float), rng.normal(size=(256, 2))
    whole = best_of_n(align, evals)
    monkeypatch.setattr(bon, "_JACKKNIFE_ELEMENTS", 2 * 256 * 2)  # two values of n per chunk
    chunked = best_of_n(align, evals)
    np.testing.assert_allclose(chunked.reward_se, whole.reward_se, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(chunked.gain_se, whole.gain_se, rtol=1e-12, atol=1e-15)
    usable = jackknife_usable(whole.n, 256, int(np.sum(align == align.max())))
    assert usable.sum() >= 3 and np.isfinite(whole.reward_se[usable]).all() and np.isnan(whole.reward_se[~usable]).all()
