"""Tests of limits_ray.core.exact, the oracles: each is checked against an independent computation
(direct sums in another form, tuple enumeration, quadrature of the tilted Gaussian, closed forms
of E[max of n normals], Monte Carlo)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate, stats

from limits_ray.core.bon import bon_kl_bound
from limits_ray.core.exact import expected_max_normal, finite_bon, finite_tilt, gaussian_gain, gaussian_kl

PROBS = np.array([0.1, 0.25, 0.05, 0.3, 0.2, 0.1])
R = np.array([1.0, -0.5, 2.0, 0.0, 1.0, 3.5])  # tie between responses 0 and 4
E = np.array([[0.0, 2.0], [1.0, -1.0], [-2.0, 0.5], [0.5, 0.5], [3.0, 1.0], [1.0, -3.0]])


@pytest.mark.parametrize("beta", [0.1, 0.7, 1.0, 4.0, 100.0])
def test_finite_tilt_against_direct_formulas(beta):
    exact = finite_tilt(PROBS, R, E, beta)
    weights = np.exp(R / beta)
    z = float(PROBS @ weights)
    tilted = PROBS * weights / z
    # Theorem 2 in covariance form: Cov_pi0(e, w) / E_pi0[w]
    covariance = PROBS @ (E * weights[:, None]) - (PROBS @ E) * z
    # absolute floor: 1e-13 x the size of the e values whose weighted differences make the gain
    np.testing.assert_allclose(exact.gain, covariance / z, rtol=1e-12, atol=1e-13 * np.abs(E).max())
    np.testing.assert_allclose(exact.log_z, math.log(z), rtol=1e-13)
    np.testing.assert_allclose(exact.kl, np.sum(tilted * np.log(tilted / PROBS)), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(exact.reverse_kl, np.sum(PROBS * np.log(PROBS / tilted)), rtol=1e-10, atol=1e-15)
    # Theorem 1: gain of r = beta * Jeffreys
    gain_r = finite_tilt(PROBS, R, R, beta).gain[0]
    np.testing.assert_allclose(gain_r, beta * (exact.kl + exact.reverse_kl), rtol=1e-10)
    assert exact.kl > 0 and exact.reverse_kl > 0


def test_finite_tilt_limits_and_offsets():
    small = finite_tilt(PROBS, R, E, 1e-4)  # all mass on the unique best response
    np.testing.assert_allclose(small.gain, E[5] - PROBS @ E, rtol=1e-12)
    # KL = E[r]/beta - log Z cancels terms ~ max r / beta = 3.5e4: ~1e-12 of rounding
    np.testing.assert_allclose(small.kl, -math.log(PROBS[5]), rtol=1e-10)
    large = finite_tilt(PROBS, R, E, 1e8)
    np.testing.assert_allclose(large.gain, 0.0, atol=1e-7)
    np.testing.assert_allclose(large.kl, 0.0, atol=1e-14)
    # a constant added to r moves log Z by offset/beta only (logsumexp: no overflow)
    shifted = finite_tilt(PROBS, R + 1e4, E, 0.01)
    base = finite_tilt(PROBS, R, E, 0.01)
    np.testing.assert_allclose(shifted.gain, base.gain, rtol=1e-9)
    np.testing.assert_allclose(shifted.kl, base.kl, rtol=1e-9)
    np.testing.assert_allclose(shifted.log_z - 1e6, base.log_z, rtol=1e-9)
    assert np.isfinite(shifted.log_z)


def tuple_bon(probs, r, e, n):
    """E[e of best of n] and the BoN policy by enumerating all n-tuples (random tie-break)."""
    policy = np.zeros(probs.size)
    for draw in itertools.product(range(probs.size), repeat=n):
        weight = float(np.prod(probs[list(draw)]))
        best = max(r[j] for j in draw)
        winners = [j for j in draw if r[j] == best]
        for j in winners:
            policy[j] += weight / len(winners)
    support = policy > 0
    kl = float(np.sum(policy[support] * np.log(policy[support] / probs[support])))
    return policy @ e, kl, policy


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_finite_bon_against_tuple_enumeration(n):
    reward, kl = finite_bon(PROBS, R, E, n)
    want_reward, want_kl, policy = tuple_bon(PROBS, R, E, n)
    np.testing.assert_allclose(reward, want_reward, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(policy.sum(), 1.0, rtol=1e-13)
    # the tie between responses 0 and 4 is split in proportion to pi0
    np.testing.assert_allclose(policy[0] / policy[4], PROBS[0] / PROBS[4], rtol=1e-12)


def test_finite_bon_limits():
    reward, kl = finite_bon(PROBS, R, E, 1)
    np.testing.assert_allclose(reward, PROBS @ E, rtol=1e-14, atol=1e-14 * np.abs(E).max())
    assert abs(kl) < 1e-15
    reward, kl = finite_bon(PROBS, R, E, 2000)  # the best response almost surely
    np.testing.assert_allclose(reward, E[5], rtol=1e-9)
    np.testing.assert_allclose(kl, -math.log(PROBS[5]), rtol=1e-9)
    # many equally likely distinct rewards: close to the continuous value log n - (n-1)/n
    k = 4000
    for n in (2, 8):
        _, kl = finite_bon(np.full(k, 1.0 / k), np.arange(k, dtype=float), np.zeros(k), n)
        assert 0 <= bon_kl_bound(n) - kl < 1e-4


@pytest.mark.parametrize("sigma, beta", [(1.0, 0.8), (1.0, 3.0), (2.5, 5.0), (0.3, 0.1)])
def test_gaussian_formulas_against_quadrature(sigma, beta):
    """Tilt N(mu, sigma^2) by exp(r/beta) numerically and compare gain and KL."""
    mu = 0.7
    density = stats.norm(mu, sigma)
    lo, hi = mu - 12 * sigma, mu + 12 * sigma + 2 * sigma**2 / beta
    log_weight = lambda x: x / beta - (mu / beta + sigma**2 / (2 * beta**2))  # noqa: E731  (normalised by log Z)
    z = integrate.quad(lambda x: density.pdf(x) * math.exp(log_weight(x)), lo, hi, limit=200)[0]
    tilted_mean = integrate.quad(lambda x: x * density.pdf(x) * math.exp(log_weight(x)), lo, hi, limit=200)[0] / z
    kl = integrate.quad(lambda x: density.pdf(x) * math.exp(log_weight(x)) / z * (log_weight(x) - math.log(z)),
                        lo, hi, limit=200)[0]
    np.testing.assert_allclose(gaussian_gain(sigma, beta), tilted_mean - mu, rtol=1e-7)
    np.testing.assert_allclose(gaussian_kl(sigma, beta), kl, rtol=1e-6)
    np.testing.assert_allclose(gaussian_gain(sigma, np.array([beta, 2 * beta])),
                               [sigma**2 / beta, sigma**2 / (2 * beta)], rtol=1e-15)


def test_expected_max_normal_closed_forms():
    np.testing.assert_allclose(expected_max_normal(1), 0.0, atol=1e-10)
    np.testing.assert_allclose(expected_max_normal(2), 1 / math.sqrt(math.pi), rtol=1e-9)
    np.testing.assert_allclose(expected_max_normal(3), 3 / (2 * math.sqrt(math.pi)), rtol=1e-9)
    # n = 4: (6/pi^(3/2)) * arctan(sqrt 2)  (known closed form)
    np.testing.assert_allclose(expected_max_normal(4), 6 / math.pi**1.5 * math.atan(math.sqrt(2)), rtol=1e-9)
    values = [expected_max_normal(n) for n in (1, 2, 4, 16, 256, 4096)]
    assert np.all(np.diff(values) > 0)
    assert values[-1] < math.sqrt(2 * math.log(4096))  # the classical upper bound


def test_expected_max_normal_monte_carlo():
    n, draws = 16, 100_000
    maxima = np.random.default_rng(0).standard_normal((draws, n)).max(axis=1)
    assert abs(expected_max_normal(n) - maxima.mean()) < 4 * maxima.std() / math.sqrt(draws)
