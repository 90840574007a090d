"""Best-of-n from base samples: the unbiased expected reward and KL(pi_BoN || pi0), ties handled.

Unlike the tilted statistics of :mod:`limits_ray.stats`, best-of-n needs every reward of a prompt:
it sorts them, so it costs ``O(N log N)`` time and ``O(N * columns)`` memory per prompt. The
offline reducer holds one prompt's rewards at a time; nothing else in limits-ray grows with N.
Pure numpy/scipy, no Ray or vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

__all__ = ["BestOfN", "best_of_n", "bon_sizes", "bon_kl_bound", "level_kl"]


@dataclass
class BestOfN:
    """Best-of-n estimates for one prompt.

    Attributes:
        n: ``[K]`` the values of n.
        reward: ``[K, E]`` estimated ``E[e of the best of n]`` for each evaluation column.
        gain: ``[K, E]`` ``reward - mean(e)``.
        kl: ``[K]`` ``KL(pi_BoN || pi0)`` on the empirical reward levels (ties handled).
        kl_bound: ``[K]`` ``log n - (n-1)/n``, the value for continuous rewards.
    """

    n: np.ndarray
    reward: np.ndarray
    gain: np.ndarray
    kl: np.ndarray
    kl_bound: np.ndarray


def bon_sizes(n_samples: int) -> np.ndarray:
    """``[1, 2, 4, ...]``: the powers of two up to ``n_samples``."""
    if n_samples < 1:
        raise ValueError(f"best-of-n needs at least one sample, got {n_samples}")
    return 2 ** np.arange(int(np.floor(np.log2(n_samples))) + 1)


def bon_kl_bound(n: np.ndarray) -> np.ndarray:
    """``log n - (n-1)/n``: KL(pi_BoN||pi0) for continuous rewards, an upper bound otherwise."""
    n = np.asarray(n, dtype=np.float64)
    return np.log(n) - (n - 1) / n


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
    ``log n - (n-1)/n`` for continuous ones.
    """
    align = np.asarray(align, dtype=np.float64)
    evals = np.asarray(evals, dtype=np.float64).reshape(align.size, -1)
    n_samples = align.size
    sizes = bon_sizes(n_samples) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 1 or sizes.max() > n_samples):
        raise ValueError(f"best-of-n sizes must lie in [1, {n_samples}], got {sizes.tolist()}")
    order = np.argsort(align, kind="stable")
    _, level_of_sample, level_counts = np.unique(align[order], return_inverse=True, return_counts=True)
    weights = _order_statistic_weights(n_samples, sizes)
    tie_mean = np.stack([np.bincount(level_of_sample, row) for row in weights]) / level_counts
    weights = tie_mean[:, level_of_sample]
    reward = weights @ evals[order]
    return BestOfN(
        n=sizes,
        reward=reward,
        gain=reward - evals.mean(axis=0),
        kl=level_kl(level_counts / n_samples, sizes),
        kl_bound=bon_kl_bound(sizes),
    )
