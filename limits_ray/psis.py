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

The weights ``exp(r/beta)`` are ordered by ``r`` for every ``beta > 0``, so the largest ``M + 1``
rewards give the tail at every beta: :func:`khat` takes only them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TAIL_CAP", "gpd_fit", "khat", "khat_threshold", "tail_size"]

TAIL_CAP = 1024
"""Default number of largest rewards kept per state: exact k-hat for N <= 116,281 (M + 1 <= 1024)."""

_MIN_EXCEEDANCES = 5  # fewer points above the cutoff: no fit (as arviz and posterior)
_PRIOR_WEIGHT, _PRIOR_SHAPE, _PRIOR_BS = 10.0, 0.5, 3.0
_BETA_CHUNK = 8  # betas fitted at once: bounds the [chunk, m, M] work array (~4 MiB at M = 1023)


def tail_size(n: int | np.ndarray) -> np.ndarray:
    """``M = ceil(min(N/5, 3 sqrt(N)))``, the number of weights in the fitted tail."""
    n = np.asarray(n, dtype=np.float64)
    return np.ceil(np.minimum(n / 5.0, 3.0 * np.sqrt(n))).astype(np.int64)


def khat_threshold(n: int) -> float:
    """``min(1 - 1/log10 N, 0.7)``: the largest k-hat at which N samples give a usable estimate."""
    return float(min(1.0 - 1.0 / np.log10(n), 0.7)) if n > 1 else -np.inf


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
        weights = 1.0 / np.exp(profile[:, None, :] - profile[:, :, None]).sum(axis=2)
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
    betas = np.asarray(betas, dtype=np.float64)
    top = np.sort(np.asarray(top_rewards, dtype=np.float64))[::-1]
    tail = min(int(tail_size(n)) if n > 0 else 0, top.size - 1)
    top = top[: tail + 1]
    if tail < _MIN_EXCEEDANCES:
        return np.full(betas.size, np.inf)
    out = np.full(betas.size, np.nan)
    log_w = (top[None, :] - top[0]) / betas[:, None]  # [B, M + 1], descending, max 0
    floor = np.log(np.finfo(float).tiny)
    cutoff = np.maximum(log_w[:, -1], floor)
    above = log_w > cutoff[:, None]
    counts = above.sum(axis=1)
    out[(counts < _MIN_EXCEEDANCES) & (log_w[:, -1] < floor)] = np.inf
    for count in np.unique(counts[counts >= _MIN_EXCEEDANCES]):
        rows = np.flatnonzero(counts == count)
        for start in range(0, rows.size, _BETA_CHUNK):
            chosen = rows[start : start + _BETA_CHUNK]
            exceed = np.exp(log_w[chosen, :count]) - np.exp(cutoff[chosen, None])
            out[chosen] = gpd_fit(exceed[:, ::-1])[0]
    return out
