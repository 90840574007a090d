"""Tests of limits_ray.core.psis: the Pareto k-hat against arviz's PSIS and against known tails."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from limits_ray.core.psis import gpd_fit, khat, khat_sd, tail_size
from limits_ray.core.reliability import khat_pool_sums, khat_threshold, pooled_khat, pooled_khat_of_cells

BETAS = np.array([0.3, 1.0, 3.0])
# Fixed data: quantiles of three reward distributions (no random stream involved).
DATA = {
    "normal_200": stats.norm.ppf((np.arange(200) + 0.5) / 200),
    "t3_1000": stats.t.ppf((np.arange(1000) + 0.5) / 1000, 3),
    "exp_4000": stats.expon.ppf((np.arange(4000) + 0.5) / 4000),
}
# arviz 0.23.4: [float(az.psislw(r / beta, normalize=False)[1]) for beta in BETAS]
ARVIZ_KHAT = {
    "normal_200": [1.2198516134064001, 0.33512704736894205, 0.0938528582309517],
    "t3_1000": [4.139841271315258, 1.4994679292708242, 0.7119336633804532],
    "exp_4000": [3.113382278382926, 0.9633114610314513, 0.343311474166888],
}


@pytest.mark.parametrize("name", sorted(DATA))
def test_khat_reproduces_arviz_psislw_on_fixed_data(name):
    np.testing.assert_allclose(khat(DATA[name], DATA[name].size, BETAS), ARVIZ_KHAT[name], rtol=1e-10)


ARVIZ_IN_A_SUBPROCESS = """
import json, sys, warnings
import numpy as np
import arviz as az
rewards, betas = (np.asarray(value) for value in json.loads(sys.stdin.read()))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    print(json.dumps([float(az.psislw(rewards / beta, normalize=False)[1]) for beta in betas]))
"""


@pytest.mark.parametrize("n", [21, 100, 1000, 5000])
def test_khat_agrees_with_the_installed_arviz(n):
    """arviz runs in a process of its own: it imports numba, whose llvmlite objects break the kernel
    registration of any vLLM engine started later in the same process (tests/test_scoring.py)."""
    if importlib.util.find_spec("arviz") is None:
        pytest.skip("arviz is in the dev extra")
    rng = np.random.default_rng(n)
    rewards = np.concatenate([rng.normal(size=n // 2), rng.standard_t(3, size=n - n // 2)])
    out = subprocess.run([sys.executable, "-c", ARVIZ_IN_A_SUBPROCESS], input=json.dumps([rewards.tolist(), BETAS.tolist()]),
                         capture_output=True, text=True, check=True)
    np.testing.assert_allclose(khat(rewards, n, BETAS), json.loads(out.stdout), rtol=1e-9)


def test_khat_needs_only_the_largest_m_plus_one_rewards():
    rewards = DATA["t3_1000"]
    top = np.sort(rewards)[-(int(tail_size(1000)) + 1):]
    np.testing.assert_array_equal(khat(top, 1000, BETAS), khat(rewards, 1000, BETAS))


def test_tail_size_and_threshold():
    np.testing.assert_array_equal(tail_size([10, 100, 225, 1000, 100_000]), [2, 20, 45, 95, 949])
    assert khat_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert khat_threshold(10**6) == 0.7
    assert khat_threshold(1) == -np.inf


def test_gpd_fit_recovers_known_shapes():
    """Exceedances drawn from GPD(xi) with xi = 0.2 and 0.8: the fit is within 0.1 of the shape."""
    rng = np.random.default_rng(0)
    for shape in (0.2, 0.8):
        sample = np.sort(stats.genpareto.rvs(shape, scale=2.0, size=5000, random_state=rng))
        k, sigma = gpd_fit(sample[None, :])
        assert abs(k[0] - shape) < 0.1 and abs(sigma[0] / 2.0 - 1) < 0.15


def test_heavier_reward_tails_give_larger_khat_and_small_n_gives_inf():
    """exp(r/beta) of t(3) rewards has infinite variance for any beta (k >> 0.5); normal rewards at beta = 3 not."""
    assert np.all(khat(DATA["t3_1000"], 1000, BETAS) > khat(DATA["normal_200"], 200, BETAS))
    assert np.all(khat(np.arange(20.0), 20, BETAS) == np.inf)  # M = 4 < 5: no fit, as arviz


def test_ties_and_underflow():
    """Tied largest rewards: nothing to fit (NaN). Weights underflowing below the cutoff: inf (as arviz)."""
    tied = np.concatenate([np.full(50, 1.0), np.linspace(-1, 0, 150)])
    assert np.isnan(khat(tied, 200, BETAS)).all()
    spread = np.linspace(0.0, 100.0, 1000)
    assert khat(spread, 1000, np.array([1e-4]))[0] == np.inf  # 1000 nats between neighbours


# ----------------------------------------------------------------------------------------------
# the pooled k-hat
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("draw, n, beta, low, high", [
    ("exponential", 250, 1.5, 0.93, 1.09), ("exponential", 1000, 2.0, 0.93, 1.09), ("exponential", 1000, 5.0, 0.93, 1.09),
    ("exponential", 4000, 1.25, 0.93, 1.09), ("normal", 250, 0.8, 0.85, 1.03), ("normal", 1000, 0.5, 0.85, 1.03),
])
def test_khat_sd_is_the_spread_of_khat_over_simulated_prompts(draw, n, beta, low, high):
    """600 prompts per case; the bounds leave about 2 SDs of a sample SD over 600 draws around what was
    measured. Exponential rewards (exactly Pareto weights, k = 1/beta): 0.97-1.05; Gaussian rewards
    (log-normal weights, no Pareto tail): 0.92-0.97."""
    rng = np.random.default_rng(int(n + 100 * beta))
    fitted = np.array([khat(np.sort(getattr(rng, draw)(size=n))[-200:], n, np.array([beta]))[0] for _ in range(600)])
    ratio = fitted.std() / khat_sd(fitted.mean(), np.array(n))
    assert low < ratio < high, ratio  # sd of a sample sd over 600 draws: about 3%


def test_pooled_khat_shrinks_prompts_that_differ_by_noise_only_to_their_mean():
    rng = np.random.default_rng(5)
    n = np.full(500, 1000)
    same = 0.6 + khat_sd(0.6, n) * rng.normal(size=500)  # one true shape, sampling noise only
    pooled = pooled_khat_of_cells(same, n, 1.0 + 0.01 * rng.normal(size=500))  # a covariate that explains nothing
    assert np.ptp(pooled) < 0.03 and abs(pooled.mean() - 0.6) < 0.02
    assert (same < 0.45).mean() > 0.1 and not (pooled < 0.5).any()  # the cell's prompts are judged together


def test_pooled_khat_follows_the_covariate_where_it_explains_the_shapes():
    """Three kinds of prompt, k = 0.25 x for covariate x = 1, 2, 3: each prompt gets its kind's shape."""
    rng = np.random.default_rng(7)
    n = np.full(900, 1000)
    covariate = np.repeat([1.0, 2.0, 3.0], 300)
    fitted = 0.25 * covariate + khat_sd(0.25 * covariate, n) * rng.normal(size=900)
    pooled = pooled_khat_of_cells(fitted, n, covariate)
    np.testing.assert_allclose(pooled, 0.25 * covariate, atol=0.03)
    assert (fitted[300:600] < 0.45).mean() > 0.2  # the x = 2 kind (k = 0.5): a fifth would pass alone


def test_pooled_khat_keeps_prompts_that_clearly_differ_beyond_the_covariate():
    rng = np.random.default_rng(6)
    n = np.full(600, 1000)
    true = np.repeat([0.1, 0.9], 300)
    fitted = true + khat_sd(true, n) * rng.normal(size=600)
    pooled = pooled_khat_of_cells(fitted, n, np.ones(600))  # the covariate does not tell the kinds apart
    assert (pooled[:300] < 0.5).mean() > 0.97 and (pooled[300:] >= 0.5).mean() > 0.97
    assert np.corrcoef(pooled, fitted)[0, 1] > 0.999


def test_pooled_khat_is_nan_in_small_cells_and_for_non_finite_values():
    n = np.full(12, 1000)
    k = np.concatenate([[np.nan, np.inf, 0.8], np.full(9, 0.3)])
    x = np.concatenate([[1.0, 1.0, np.nan], np.ones(9)])
    sums = khat_pool_sums(k, n, x)
    assert sums[0] == 9 and sums[3] == pytest.approx(2.7) and sums[5] == pytest.approx(0.81)  # count, sum k, sum k^2
    assert np.isnan(pooled_khat(k, n, x, *sums)).all()  # 9 < POOL_MIN_PROMPTS prompts with finite values
    k[2:] = 0.3 + 0.01 * np.arange(10)  # ten prompts: pooled, and shrunk (a spread of 0.03 is noise here)
    x[2] = 1.0
    pooled = pooled_khat_of_cells(k, n, x)
    assert np.isnan(pooled[:2]).all() and np.ptp(pooled[2:]) < 1e-12 and pooled[2] == pytest.approx(k[2:].mean())
