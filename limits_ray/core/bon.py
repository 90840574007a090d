"""Best-of-n from base samples: the unbiased expected reward and KL(pi_BoN || pi0), ties handled.

Unlike the tilted statistics of :mod:`limits_ray.core.tilt`, best-of-n needs every reward of a prompt:
it sorts them, so it costs ``O(N log N)`` time and ``O(N * columns)`` memory per prompt. The
offline reducer holds one prompt's rewards at a time; nothing else in limits-ray grows with N.
Its standard errors are the jackknife's (:func:`jackknife_best_of_n`): all N leave-one-out
estimates come from prefix and suffix sums over the sorted samples, ``O(N)`` per n after the sort.
They are NaN where the jackknife interval is not shown to cover (:func:`jackknife_usable`): for
``n > N/16`` (the estimate rests on the top few order statistics; measured coverage of the 95%
interval 0.88-0.90 at ``n = N/8`` and 0.78-0.83 at ``N/2`` for Gaussian, exponential and Laplace rewards,
N = 250 to 4,000, against 0.91 or more up to ``N/16``: bench/bench_coverage.py), and where the largest
reward is tied (``c`` samples) and ``n c > N``: the best of n then draws the top level about once or
more, the estimate saturates and the gain is a nearly flat function of the sample (Bernoulli rewards
covered 0.79-0.89 there). Pure numpy/scipy, no Ray or vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

__all__ = ["JACKKNIFE_MAX_SHARE", "BestOfN", "best_of_n", "bon_sizes", "bon_kl_bound", "jackknife_best_of_n",
           "jackknife_usable", "level_kl", "sorted_levels"]

JACKKNIFE_MAX_SHARE = 1 / 16
"""Largest ``n / N`` with a best-of-n standard error (module doc)."""


@dataclass
class BestOfN:
    """Best-of-n estimates for one prompt.

    Attributes:
        n: ``[K]`` the values of n.
        reward: ``[K, E]`` estimated ``E[e of the best of n]`` for each evaluation column.
        gain: ``[K, E]`` ``reward - mean(e)``.
        kl: ``[K]`` ``KL(pi_BoN || pi0)`` on the empirical reward levels (ties handled).
        kl_bound: ``[K]`` ``log n - (n-1)/n``, the value for continuous rewards.
        reward_se, gain_se: ``[K, E]`` jackknife standard errors of ``reward`` and ``gain``
            (:func:`jackknife_best_of_n`); NaN where :func:`jackknife_usable` is false. For ``n = 1``
            the gain is exactly 0 and so is its SE.
    """

    n: np.ndarray
    reward: np.ndarray
    gain: np.ndarray
    kl: np.ndarray
    kl_bound: np.ndarray
    reward_se: np.ndarray
    gain_se: np.ndarray


def bon_sizes(n_samples: int) -> np.ndarray:
    """``[1, 2, 4, ...]``: the powers of two up to ``n_samples``."""
    if n_samples < 1:
        raise ValueError(f"best-of-n needs at least one sample, got {n_samples}")
    return 2 ** np.arange(int(np.floor(np.log2(n_samples))) + 1)


def bon_kl_bound(n: np.ndarray) -> np.ndarray:
    """``log n - (n-1)/n``: KL(pi_BoN||pi0) for continuous rewards, an upper bound otherwise."""
    n = np.asarray(n, dtype=np.float64)
    return np.log(n) - (n - 1) / n


_JACKKNIFE_ELEMENTS = 1 << 20  # float64 elements of one [k, N, E] work array (8 MiB)


def _order_statistic_weights(n_samples: int, sizes: np.ndarray) -> np.ndarray:
    """``[K, N]`` weights ``C(i-1, n-1) / C(N, n)`` of the i-th smallest sample (1-based), 0 for i < n.

    ``sum_i weight_i * e_(i)`` is the unbiased estimator of ``E[e of the best of n]``; binomials
    go through log-gamma so that N of 1e5 and more neither overflow nor lose digits.
    """
    position = np.arange(1, n_samples + 1, dtype=np.float64)[None, :]
    size = sizes.astype(np.float64)[:, None]
    valid = position >= size
    safe_position = np.where(valid, position, size)
    log_weight = (
        gammaln(safe_position) - gammaln(size) - gammaln(safe_position - size + 1)
        - (gammaln(n_samples + 1) - gammaln(size + 1) - gammaln(n_samples - size + 1))
    )
    weights = np.where(valid, np.exp(log_weight), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)  # sum to 1 exactly, not to log-gamma's ~1e-10


def level_kl(probs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``KL(pi_BoN || pi0)`` for reward levels of mass ``probs`` sorted by ascending reward.

    Best-of-n puts mass ``q = F^n - F_-^n`` on a level with CDF values ``F_- < F`` (MATH.md,
    "Best-of-n"), spread over its responses in proportion to pi0, so ``KL = sum q log(q/p)``.
    ``q`` is computed as ``F^n * (1 - (1 - p/F)^n)`` to keep its digits when ``F`` is near 1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    cdf = np.minimum(np.cumsum(probs), 1.0)
    size = np.asarray(sizes, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore"):  # the lowest level has F_- = 0: log(0) = -inf is intended
        log_cdf = np.log(cdf)[None, :]
        below_ratio = np.log1p(-np.minimum(probs / cdf, 1.0))[None, :]
    mass = np.exp(size * log_cdf) * -np.expm1(size * below_ratio)
    terms = np.where(mass > 0, mass * (np.log(np.where(mass > 0, mass, 1.0)) - np.log(probs)[None, :]), 0.0)
    return terms.sum(axis=1)


def sorted_levels(align: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, level_of_sample [N], level_counts [G])``: the sort by ``r`` and its tie groups."""
    order = np.argsort(align, kind="stable")
    _, level_of_sample, level_counts = np.unique(align[order], return_inverse=True, return_counts=True)
    return order, level_of_sample, level_counts


def _tie_weights(n_samples: int, sizes: np.ndarray, level_of_sample: np.ndarray, level_counts: np.ndarray) -> np.ndarray:
    """``[K, N]`` order-statistic weights averaged over each tie group (uniform tie breaking)."""
    weights = _order_statistic_weights(n_samples, sizes)
    tie_mean = np.stack([np.bincount(level_of_sample, row, minlength=level_counts.size) for row in weights])
    return (tie_mean / level_counts)[:, level_of_sample]


def jackknife_best_of_n(sorted_evals: np.ndarray, level_of_sample: np.ndarray, level_counts: np.ndarray,
                        sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jackknife standard errors ``(reward_se, gain_se)``, each ``[K, E]``, of the best-of-n estimates.

    Args:
        sorted_evals: ``[N, E]`` evaluation rewards sorted by ascending ``r``.
        level_of_sample, level_counts: the tie group of each sorted sample and the group sizes.
        sizes: ``[K]`` the values of n.

    With ``U_(-j)`` the best-of-n estimate of the N - 1 samples other than j, the jackknife variance
    is ``(N-1)/N * sum_j (U_(-j) - mean_j U_(-j))^2`` (Efron and Stein 1981: it never underestimates a
    U-statistic's variance in expectation). Leaving out j, a member of tie group g, the groups below g
    keep their positions, those above move down by one, and g loses one member, so with ``w'`` the
    order-statistic weights for N - 1 samples and ``C`` their cumulative sums::

        U_(-j) = sum_{h<g} [C(b_h) - C(a_h)] m_h + sum_{h>g} [C(b_h - 1) - C(a_h - 1)] m_h
                 + [C(b_g - 1) - C(a_g)] (S_g - e_j) / (c_g - 1)

    (group h holds sorted positions ``a_h+1 .. b_h``, ``c_h`` samples, sum ``S_h``, mean ``m_h``):
    prefix and suffix sums over the groups give all N of them in ``O(N E)`` per n. The gain's
    leave-one-out values subtract ``(sum e - e_j) / (N - 1)``. NaN for ``n = N`` (and N = 1).
    """
    n_samples, columns = sorted_evals.shape
    reward_se = np.full((sizes.size, columns), np.nan)
    gain_se = np.full((sizes.size, columns), np.nan)
    usable = sizes < n_samples
    if not usable.any():
        return reward_se, gain_se
    group_sum = np.stack([np.bincount(level_of_sample, sorted_evals[:, c], minlength=level_counts.size)
                          for c in range(columns)], axis=1)
    group_mean = group_sum / level_counts[:, None]
    starts = np.concatenate([[0], np.cumsum(level_counts)[:-1]])
    ends = starts + level_counts
    mean_without = (sorted_evals.sum(axis=0) - sorted_evals) / (n_samples - 1)
    own_count = np.maximum(level_counts - 1, 1)[level_of_sample, None]
    own_mean = (group_sum[level_of_sample] - sorted_evals) / own_count
    weights = _order_statistic_weights(n_samples - 1, sizes[usable])  # [K', N - 1]
    rows = np.flatnonzero(usable)
    step = max(1, _JACKKNIFE_ELEMENTS // (n_samples * columns))  # values of n at once: bounds the [k, N, E] arrays
    for start in range(0, rows.size, step):
        chunk = slice(start, start + step)
        cumulative = np.concatenate([np.zeros((weights[chunk].shape[0], 1)), np.cumsum(weights[chunk], axis=1)], axis=1)
        unshifted = (cumulative[:, np.minimum(ends, n_samples - 1)] - cumulative[:, starts])[:, :, None] * group_mean
        shifted = (cumulative[:, ends - 1] - cumulative[:, np.maximum(starts - 1, 0)])[:, :, None] * group_mean
        below = np.cumsum(unshifted, axis=1) - unshifted  # [k, G, E]
        above = np.cumsum(shifted[:, ::-1], axis=1)[:, ::-1] - shifted
        own = (cumulative[:, ends - 1] - cumulative[:, starts])[:, :, None]
        leave_one_out = (below + above)[:, level_of_sample] + own[:, level_of_sample] * own_mean  # [k, N, E]
        reward_se[rows[chunk]] = _jackknife_se(leave_one_out)
        gain_se[rows[chunk]] = _jackknife_se(leave_one_out - mean_without)
    return reward_se, gain_se


def _jackknife_se(leave_one_out: np.ndarray) -> np.ndarray:
    """``sqrt((N-1)/N * sum_j (x_j - mean x)^2)`` over axis 1 (``[K, N, E] -> [K, E]``)."""
    count = leave_one_out.shape[1]
    centred = leave_one_out - leave_one_out.mean(axis=1, keepdims=True)
    return np.sqrt((count - 1) / count * np.sum(centred**2, axis=1))


def jackknife_usable(sizes: np.ndarray, n_samples: int, top_count: int) -> np.ndarray:
    """``[K]`` whether the jackknife SE of best-of-``n`` is given: ``n <= N/16`` and, where the largest reward
    is tied (``top_count >= 2`` samples), ``n top_count <= N`` (module doc)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return (sizes <= JACKKNIFE_MAX_SHARE * n_samples) & ((top_count < 2) | (sizes * top_count <= n_samples))


def best_of_n(align: np.ndarray, evals: np.ndarray, sizes: np.ndarray | None = None) -> BestOfN:
    """Best-of-n estimates from one prompt's N base samples.

    Args:
        align: ``[N]`` the selection (alignment) reward ``r``.
        evals: ``[N, E]`` evaluation rewards ``e``.
        sizes: the values of n (default :func:`bon_sizes`); each must be ``<= N``.

    The expected reward is the U-statistic ``sum_{i>=n} C(i-1,n-1)/C(N,n) e_(i)`` over samples sorted
    by ``r`` (MATH.md, "Best-of-n"). Ties in ``r`` are broken uniformly at random, which amounts to
    averaging the weights over each tie group. The KL treats the empirical distribution of ``r``
    as pi0 (:func:`level_kl`), which converges to the exact value for discrete rewards and to
    ``log n - (n-1)/n`` for continuous ones. Standard errors: :func:`jackknife_best_of_n`, where
    :func:`jackknife_usable` (else NaN).
    """
    align = np.asarray(align, dtype=np.float64)
    evals = np.asarray(evals, dtype=np.float64).reshape(align.size, -1)
    n_samples = align.size
    sizes = bon_sizes(n_samples) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 1 or sizes.max() > n_samples):
        raise ValueError(f"best-of-n sizes must lie in [1, {n_samples}], got {sizes.tolist()}")
    order, level_of_sample, level_counts = sorted_levels(align)
    sorted_evals = evals[order]
    reward = _tie_weights(n_samples, sizes, level_of_sample, level_counts) @ sorted_evals
    reward_se, gain_se = jackknife_best_of_n(sorted_evals, level_of_sample, level_counts, sizes)
    usable = jackknife_usable(sizes, n_samples, int(level_counts[-1]))[:, None]
    single = (sizes == 1)[:, None]
    gain = np.where(single, 0.0, reward - evals.mean(axis=0))  # best of 1 is pi0 itself
    return BestOfN(
        n=sizes,
        reward=reward,
        gain=gain,
        kl=level_kl(level_counts / n_samples, sizes),
        kl_bound=bon_kl_bound(sizes),
        reward_se=np.where(usable, reward_se, np.nan),
        gain_se=np.where(single, 0.0, np.where(usable, gain_se, np.nan)),
    )
