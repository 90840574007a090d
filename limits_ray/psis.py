"""Pareto k-hat of importance weights ``exp(r/beta)``: the PSIS reliability diagnostic. Pure numpy.

Reference: Vehtari, Simpson, Gelman, Yao, Gabry, "Pareto Smoothed Importance Sampling", JMLR 25(72),
2024 (PSIS), and Zhang & Stephens, "A new and efficient estimation method for the generalized
Pareto distribution", Technometrics 51(3), 2009. The algorithm is that of arviz's ``psislw`` and of
Stan's ``posterior``/``loo`` packages (../shared/MATH.md, "Reliability of the importance weights"):

- with ``N`` weights, the tail size is ``M = ceil(min(N/5, 3 sqrt(N)))``;
- the log weights ``x_i = r_i/beta`` are shifted so that ``max x = 0``; the cutoff is the ``(M+1)``-th
  largest, ``x_c`` (raised to ``log(tiny)`` if it underflows), and the exceedances
  ``z_j = exp(x_j) - exp(x_c)`` over the ``x_j > x_c`` are fitted by a generalized Pareto
  distribution;
- Zhang-Stephens: with ``m = 30 + floor(sqrt(M))`` grid points
  ``theta_j = 1/z_max + (1 - sqrt(m/(j - 1/2))) / (3 z_q)`` (``z_q`` the first quartile),
  ``k(theta) = mean_i log(1 - theta z_i)``, profile log-likelihood
  ``l(theta) = M (log(-theta/k(theta)) - k(theta) - 1)``, posterior weights ``p_j ∝ exp(l(theta_j))``,
  ``theta_hat = sum_j p_j theta_j`` and ``k_hat = mean_i log(1 - theta_hat z_i)``; the sign is that of
  ``xi`` in ``F(z) = 1 - (1 + xi z/sigma)^(-1/xi)``;
- the weak prior: ``k_hat <- (M k_hat + 10 * 0.5) / (M + 10)``.

``k_hat < 0.5``: the weights have finite variance (delta-method errors apply); up to
``min(1 - 1/log10 N, 0.7)``: usable; above: the estimate is not to be trusted.

One prompt's k-hat is noisy (sampling SD about ``(1 + k)/sqrt(M)``: 0.14 at ``N = 1000``, ``k = 0.5``),
and where the true shape is near or above 0.5 the prompts whose sample missed the upper tail are the
ones with a small k-hat, a low estimate and a small SE: a per-prompt cut keeps exactly those. So
:func:`pooled_khat` shrinks each prompt's k-hat toward what the prompts of its
(align, eval, beta[, N]) cell, itself included, predict for it from a covariate (the spread of its rewards below the
fitted tail, over beta), by how much the prompts differ beyond that and their sampling noise
(empirical Bayes, method of moments), and a prompt is reliable only where that pooled k-hat is below
:data:`POOLED_KHAT_LIMIT` = 0.45 as well (:mod:`limits_ray.reliability_gate` applies it to the tables,
beside its other cell tests).

The weights ``exp(r/beta)`` are ordered by ``r`` for every ``beta > 0``, so the largest ``M + 1``
rewards give the tail at every beta: :func:`khat` takes only them.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "POOLED_KHAT_LIMIT", "POOL_MIN_PROMPTS", "POOL_SUMS", "TAIL_CAP", "cell_line", "gpd_fit", "khat", "khat_many", "khat_pool_sums",
    "khat_pool_terms", "khat_sd", "khat_threshold", "khat_thresholds", "passes_gate", "pooled_khat", "pooled_khat_of_cells",
    "tail_size",
]

TAIL_CAP = 1024
"""Default number of largest rewards kept per state: exact k-hat for N <= 116,281 (M + 1 <= 1024)."""

POOLED_KHAT_LIMIT = 0.45
"""Pooled k-hats (:func:`pooled_khat`) at or above this are not reliable.

The weights have finite variance for ``k < 0.5``; the margin is for ``k`` at the bound, where the
variance is infinite and a cell's pooled k-hat straddles 0.5 (its SD over ``C`` prompts is about
``0.14/sqrt(C)`` at ``N = 1000``), which splits a cell of alike prompts into a reliable part that
under-covers (bench/bench_coverage.py measures both limits)."""

_MIN_EXCEEDANCES = 5  # fewer points above the cutoff: no fit (as arviz and posterior)
_PRIOR_WEIGHT, _PRIOR_SHAPE, _PRIOR_BS = 10.0, 0.5, 3.0
_FIT_ELEMENTS = 1 << 19  # float64 elements of one gpd_fit work array [rows, m, M] (4 MiB)


def tail_size(n: int | np.ndarray) -> np.ndarray:
    """``M = ceil(min(N/5, 3 sqrt(N)))``, the number of weights in the fitted tail."""
    n = np.asarray(n, dtype=np.float64)
    return np.ceil(np.minimum(n / 5.0, 3.0 * np.sqrt(n))).astype(np.int64)


def khat_threshold(n: int) -> float:
    """``min(1 - 1/log10 N, 0.7)``: the largest k-hat at which N samples give a usable estimate."""
    return float(khat_thresholds(np.array([n]))[0])


def khat_thresholds(n: np.ndarray) -> np.ndarray:
    """:func:`khat_threshold` of each sample count in ``n`` (``-inf`` where ``N <= 1``)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(n > 1, np.minimum(1.0 - 1.0 / np.log10(np.maximum(n, 2.0)), 0.7), -np.inf)


def gpd_fit(exceedances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zhang-Stephens posterior-mean fit with the weak prior; rows are independent samples.

    Args:
        exceedances: ``[R, M]`` positive values, each row sorted ascending, ``M >= 5``.

    Returns:
        ``(k, sigma)``, each ``[R]``: the shape (after the prior) and the scale.
    """
    z = np.asarray(exceedances, dtype=np.float64)
    count = z.shape[1]
    grid = 30 + int(count**0.5)
    quartile = z[:, int(count / 4 + 0.5) - 1]
    theta = 1.0 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5))  # [m]
    theta = theta[None, :] / (_PRIOR_BS * quartile[:, None]) + 1.0 / z[:, -1:]  # [R, m]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k_grid = np.log1p(-theta[:, :, None] * z[:, None, :]).mean(axis=2)  # [R, m]
        profile = count * (np.log(-theta / k_grid) - k_grid - 1.0)
        weights = np.exp(profile - profile.max(axis=1, keepdims=True))  # = 1 / sum_k exp(l_k - l_j)
        weights /= weights.sum(axis=1, keepdims=True)
    weights = np.where(weights >= 10 * np.finfo(float).eps, weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    theta_hat = np.sum(theta * weights, axis=1)
    k = np.log1p(-theta_hat[:, None] * z).mean(axis=1)
    sigma = -k / theta_hat
    return (count * k + _PRIOR_WEIGHT * _PRIOR_SHAPE) / (count + _PRIOR_WEIGHT), sigma


def khat(top_rewards: np.ndarray, n: int, betas: np.ndarray) -> np.ndarray:
    """Pareto k-hat of the weights ``exp(r/beta)`` of ``n`` samples, at every beta.

    Args:
        top_rewards: the largest rewards of the ``n`` samples, ``min(n, M + 1)`` of them for the exact
            algorithm (any order; extra ones are ignored). Given fewer ``T`` (a capped tail, ``n`` beyond
            the cap), the fit uses ``M = T - 1``.
        n: number of samples the weights come from.
        betas: ``[B]`` positive.

    Returns:
        ``[B]`` k-hat; ``inf`` (as in arviz) where ``M < 5`` (``n <= 20``) or the exceedances underflow
        (fewer than 5 representable ones); ``nan`` where fewer than 5 rewards lie strictly above the
        cutoff because of ties (the largest weights are equal: bounded, no tail to fit).
    """
    return khat_many([top_rewards], np.array([n]), betas)[0]


def khat_many(top_rewards: list[np.ndarray], n: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """:func:`khat` of ``S`` sample sets at once: ``[S, B]``, row ``s`` is ``khat(top_rewards[s], n[s], betas)``.

    Sets with the same tail size ``M`` are fitted together, every (set, beta) a row of :func:`gpd_fit`.
    """
    betas = np.asarray(betas, dtype=np.float64)
    n = np.asarray(n, dtype=np.int64)
    out = np.full((len(top_rewards), betas.size), np.inf)
    tops = [np.sort(np.asarray(top, dtype=np.float64))[::-1] for top in top_rewards]
    tails = np.array([min(int(tail_size(count)) if count > 0 else 0, top.size - 1) for top, count in zip(tops, n)],
                     dtype=np.int64)
    for tail in np.unique(tails[tails >= _MIN_EXCEEDANCES]):
        chosen = np.flatnonzero(tails == tail)
        top = np.stack([tops[index][: tail + 1] for index in chosen])  # [G, M + 1], descending
        log_w = (top[:, None, :] - top[:, None, :1]) / betas[None, :, None]  # [G, B, M + 1], max 0
        out[chosen] = _fit_rows(log_w.reshape(-1, tail + 1)).reshape(chosen.size, betas.size)
    return out


def _fit_rows(log_w: np.ndarray) -> np.ndarray:
    """k-hat of each row of descending log weights ``[R, M + 1]`` (maximum 0): see :func:`khat`."""
    out = np.full(log_w.shape[0], np.nan)
    floor = np.log(np.finfo(float).tiny)
    cutoff = np.maximum(log_w[:, -1], floor)
    counts = (log_w > cutoff[:, None]).sum(axis=1)
    out[(counts < _MIN_EXCEEDANCES) & (log_w[:, -1] < floor)] = np.inf
    for count in np.unique(counts[counts >= _MIN_EXCEEDANCES]):
        rows = np.flatnonzero(counts == count)
        chunk = max(1, _FIT_ELEMENTS // (count * (30 + int(count**0.5))))
        for start in range(0, rows.size, chunk):
            chosen = rows[start : start + chunk]
            exceed = np.exp(log_w[chosen, :count]) - np.exp(cutoff[chosen, None])
            out[chosen] = gpd_fit(exceed[:, ::-1])[0]
    return out


def khat_sd(khat_values: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sampling SD of k-hat: ``sqrt(M) (1 + max(k, 0)) / (M + 10)``.

    The maximum-likelihood SD of a generalized Pareto shape fitted to ``M`` exceedances is
    ``(1 + k)/sqrt(M)`` (Smith, "Estimating tails of probability distributions", Ann. Statist. 15(3),
    1987); the weak prior ``(M k + 10 * 0.5)/(M + 10)`` scales it by ``M/(M + 10)``. ``M`` is
    :func:`tail_size` capped by :data:`TAIL_CAP` as in :func:`khat_many`. Measured SDs of k-hat
    over 600-1000 simulated prompts, ``N`` = 250-4000, k-hat 0.1-0.8, are 0.97-1.05 times this for
    exponential rewards (exactly Pareto weights; tests/test_psis.py) and 0.92-0.97 times it for
    Gaussian ones.
    """
    tail = np.minimum(tail_size(np.maximum(np.asarray(n), 1)), TAIL_CAP - 1).astype(np.float64)
    return np.sqrt(tail) * (1.0 + np.clip(khat_values, 0.0, None)) / (tail + _PRIOR_WEIGHT)


POOL_MIN_PROMPTS = 10
"""Fewest prompts (with finite k-hat and covariate) of a cell that :func:`pooled_khat` pools; below, NaN."""

POOL_SUMS = ("count", "x_sum", "x_sq_sum", "k_sum", "xk_sum", "k_sq_sum", "var_sum")
"""The per-cell sums of :func:`khat_pool_sums`, in order."""


def khat_pool_terms(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row's terms of :data:`POOL_SUMS`, ``(1, x, x^2, k, x k, k^2, sd^2)``; zeros where k-hat or the
    covariate is not finite (the row is not pooled)."""
    used = np.isfinite(khat_values) & np.isfinite(covariate)
    k = np.where(used, khat_values, 0.0)
    x = np.where(used, covariate, 0.0)
    variance = np.where(used, khat_sd(k, n) ** 2, 0.0)
    return used.astype(np.float64), x, x * x, k, x * k, k * k, variance


def khat_pool_sums(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray, axis: int = 0) -> tuple[np.ndarray, ...]:
    """:data:`POOL_SUMS` along ``axis`` (:func:`khat_pool_terms` summed); sums of prompt sets add up."""
    return tuple(term.sum(axis=axis) for term in khat_pool_terms(khat_values, n, covariate))


def pooled_khat(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray, count: np.ndarray, x_sum: np.ndarray,
                x_sq_sum: np.ndarray, k_sum: np.ndarray, xk_sum: np.ndarray, k_sq_sum: np.ndarray,
                var_sum: np.ndarray) -> np.ndarray:
    """Each prompt's k-hat shrunk toward what its covariate predicts from its cell (empirical Bayes).

    The Fay-Herriot model (Fay & Herriot, "Estimates of income for small places", JASA 74(366), 1979;
    Morris, "Parametric empirical Bayes inference", JASA 78(381), 1983): ``k_x = a + b c_x + u_x``,
    ``u_x ~ (0, tau^2)`` across the prompts of a cell, observed with sampling noise ``sd_x``
    (:func:`khat_sd`). With the cell sums of :func:`khat_pool_sums` over its ``C`` prompts: ``a``, ``b``
    by least squares of k-hat on the covariate ``c`` (``b = 0`` when ``c`` does not vary),
    ``tau^2 = max(RSS/(C - p) - mean sd^2, 0)`` (``p`` = 2 fitted coefficients, 1 without a slope) and
    ``lam = tau^2 / (tau^2 + sd_x^2)``; the result is ``m_x + lam (k_x - m_x)``, ``m_x = a + b c_x``.
    Prompts that differ from the fitted line no more than their noise all get the line's value;
    prompts that clearly differ keep their own k-hat. NaN (not pooled) in a cell of fewer than
    :data:`POOL_MIN_PROMPTS` prompts (too few to tell noise from spread) and where the row's k-hat or
    covariate is not finite. Arrays broadcast.
    """
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        line, sloped, slope, xk = _line(count, x_sum, x_sq_sum, k_sum, xk_sum, covariate)
        k_mean = k_sum / count
        kk = k_sq_sum - count * k_mean * k_mean
        residual = np.clip(kk - slope * xk, 0.0, None)
        tau2 = np.clip(residual / (count - np.where(sloped, 2.0, 1.0)) - var_sum / count, 0.0, None)
        sd2 = khat_sd(khat_values, n) ** 2
        weight = np.where(tau2 > 0, tau2 / (tau2 + sd2), 0.0)
        shrunk = line + weight * (khat_values - line)
    return np.where((count >= POOL_MIN_PROMPTS) & np.isfinite(khat_values) & np.isfinite(covariate), shrunk, np.nan)


def _line(count, x_sum, x_sq_sum, y_sum, xy_sum, covariate):
    """Least-squares line of ``y`` on ``x`` from cell sums, at ``covariate``: ``(value, sloped, slope, S_xy)``;
    slope 0 when ``x`` does not vary (no division checks: callers silence them)."""
    x_mean, y_mean = x_sum / count, y_sum / count
    xx = x_sq_sum - count * x_mean * x_mean
    xy = xy_sum - count * x_mean * y_mean
    sloped = xx > 1e-12 * np.maximum(x_sq_sum, 1e-300)
    slope = np.where(sloped, xy / np.where(sloped, xx, 1.0), 0.0)
    return y_mean + slope * (covariate - x_mean), sloped, slope, xy


def cell_line(count: np.ndarray, x_sum: np.ndarray, x_sq_sum: np.ndarray, y_sum: np.ndarray, xy_sum: np.ndarray,
              covariate: np.ndarray) -> np.ndarray:
    """What a cell's least-squares line of ``y`` on the covariate predicts at ``covariate`` (the line of
    :func:`pooled_khat` for ``y`` = k-hat), from the cell's sums over its ``count`` rows; NaN in cells of
    fewer than :data:`POOL_MIN_PROMPTS` rows. Arrays broadcast."""
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = _line(count, x_sum, x_sq_sum, y_sum, xy_sum, covariate)[0]
    return np.where((count >= POOL_MIN_PROMPTS) & np.isfinite(covariate), value, np.nan)


def pooled_khat_of_cells(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray, axis: int = 0) -> np.ndarray:
    """:func:`pooled_khat` of arrays whose ``axis`` runs over the prompts of each cell (all in memory)."""
    sums = (np.expand_dims(total, axis) for total in khat_pool_sums(khat_values, n, covariate, axis=axis))
    return pooled_khat(khat_values, n, covariate, *sums)


def passes_gate(own_reliable: np.ndarray, pooled: np.ndarray, limit: float = POOLED_KHAT_LIMIT) -> np.ndarray:
    """The tables' ``reliable``: the row's own test and a pooled k-hat below ``limit`` (or NaN: not pooled)."""
    return np.asarray(own_reliable, bool) & ~(pooled >= limit)
