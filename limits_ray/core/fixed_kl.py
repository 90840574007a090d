"""The frontier at a fixed KL budget: its gain, error bar and beta between grid betas. Pure numpy.

``frontier_mean`` (:mod:`limits_ray.core.prompt_mean`) gives at each grid beta ``beta_j`` the mean KL ``K_j``,
the gain ``G_j``, the slope ``S_j = d G / d K`` (the empirical tilt's exact derivative; ``beta_j`` itself
when the gain is of the aligned reward, MATH.md "The frontier at a fixed KL"), ``d K / d beta`` and the
error bar of the gain at the fixed KL ``K_j``. Between ``K_j`` and ``K_{j+1}``, in the variable ``u = log K`` (KL itself where an end is 0):

- the gain is the cubic Hermite interpolant with the known end slopes ``d G / d u = K S`` (for Gaussian
  rewards ``G(K) = sigma sqrt(2K)`` is a smooth exponential in ``u``: on a grid of betas a factor 2 apart
  the error is below 1e-3 of the gain, where a chord's is about 3% and always low on a concave curve);
- ``log beta`` likewise, with slopes ``d log beta / d u = K / (beta dK/dbeta)`` (exact for Gaussian rewards);
- the error bar linearly in KL (it varies slowly).

Without slopes (tables written before they existed) the gain and ``log beta`` fall back to linear
interpolation in KL.

The interpolant's own error matters once the frontier's error bar is small (at 1e4 prompts and more,
on a grid of betas a factor 2 apart, it is larger than the bar): :func:`at_kl` estimates it as the
difference from the quintic Hermite that also passes through the next grid point with an error bar
(value and slope), the embedded-error estimate of adaptive quadrature, and adds it to the error bar
as a bias allowance.
"""

from __future__ import annotations

import numpy as np

from limits_ray.core.prompt_mean import widened

__all__ = ["at_kl", "error_bar", "hermite", "interpolation_error"]


def hermite(x0: float, x1: float, y0: float, y1: float, m0: float, m1: float, x: float) -> float:
    """The cubic through ``(x0, y0)``, ``(x1, y1)`` with slopes ``m0``, ``m1`` there, at ``x``."""
    h = x1 - x0
    t = (x - x0) / h
    h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
    h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
    return float(h00 * y0 + h10 * h * m0 + h01 * y1 + h11 * h * m1)


def _quintic(u: np.ndarray, y: np.ndarray, m: np.ndarray, at: float) -> float:
    """The degree-5 polynomial with values ``y`` and slopes ``m`` at the three points ``u``, at ``at``."""
    origin, scale = u[0], u[1] - u[0]
    t = (u - origin) / scale
    rows = []
    for node in t:
        rows.append([node**k for k in range(6)])
        rows.append([k * node ** (k - 1) if k else 0.0 for k in range(6)])
    coefficients = np.linalg.solve(np.array(rows), np.ravel(np.column_stack([y, m * scale])))
    x = (at - origin) / scale
    return float(sum(c * x**k for k, c in enumerate(coefficients)))


def interpolation_error(kl: np.ndarray, gain: np.ndarray, slope: np.ndarray, budget: float,
                        usable: np.ndarray | None = None) -> float:
    """Estimated error of :func:`at_kl`'s gain at ``budget``: ``|cubic - quintic|`` (module doc), the quintic through
    the bracketing grid points and the nearer outer neighbour among the ``usable`` ones (default: all; the
    callers pass the points whose gain has an error bar: an unreliable estimate says nothing about the
    curve's shape). Without such a neighbour, the difference between the cubic Hermite in log KL and in KL
    (cruder, larger). 0 on a grid point; NaN where a slope is missing. ``kl`` sorted ascending, positive."""
    size = kl.size
    usable = np.ones(size, bool) if usable is None else np.asarray(usable, bool)
    right = int(np.clip(np.searchsorted(kl, budget, side="left"), 1, size - 1)) if size > 1 else 0
    if size < 2 or budget in (kl[right - 1], kl[right]):
        return 0.0 if size >= 2 else float("nan")
    left = right - 1
    u, scaled = np.log(kl), slope * kl
    if not np.all(np.isfinite(scaled[[left, right]])):
        return float("nan")
    cubic = hermite(u[left], u[right], gain[left], gain[right], scaled[left], scaled[right], np.log(budget))
    outer = [index for index in (left - 1, right + 1) if 0 <= index < size and usable[index] and np.isfinite(scaled[index])]
    if not outer:
        linear_k = hermite(kl[left], kl[right], gain[left], gain[right], slope[left], slope[right], budget)
        return abs(cubic - linear_k)
    third = min(outer, key=lambda index: abs(u[index] - (u[left] if index < left else u[right])))
    points = np.sort(np.array([left, right, third]))
    return abs(cubic - _quintic(u[points], gain[points], scaled[points], np.log(budget)))


def error_bar(slope: np.ndarray | None, gain_se_at_kl: np.ndarray | None,
              gain_se: np.ndarray | None) -> np.ndarray | None:
    """The error bar :func:`at_kl` interpolates: the fixed-KL one (``gain_se_at_kl``) where the frontier has
    its slopes, else (a table written without them) the fixed-beta ``gain_se``; None: the table has neither."""
    with_slopes = slope is not None and bool(np.isfinite(np.asarray(slope, dtype=np.float64)).any())
    return gain_se_at_kl if with_slopes and gain_se_at_kl is not None else gain_se


def at_kl(kl: np.ndarray, beta: np.ndarray, gain: np.ndarray, budget: float, slope: np.ndarray | None = None,
          kl_dbeta: np.ndarray | None = None, gain_se: np.ndarray | None = None) -> tuple[float, float, float]:
    """``(beta, gain, gain_se)`` of one frontier (arrays over its grid, any order) at KL ``budget``.

    ``budget`` must lie in ``[min kl, max kl]`` (callers check and say why); ``slope`` (``d gain / d KL``),
    ``kl_dbeta`` and ``gain_se`` may be None or hold NaN: linear interpolation then (NaN SE). ``gain_se`` is
    interpolated linearly in KL and, with slopes, widened by :func:`interpolation_error` as a bias
    allowance (:func:`limits_ray.core.prompt_mean.widened`: NaN where it exceeds 0.75 of the SE; refine the beta
    grid there).
    """
    kl, beta, gain = (np.asarray(value, dtype=np.float64) for value in (kl, beta, gain))
    size = kl.size

    def column(value):
        return np.full(size, np.nan) if value is None else np.asarray(value, dtype=np.float64)

    slope, kl_dbeta, gain_se = column(slope), column(kl_dbeta), column(gain_se)
    order = np.argsort(kl, kind="stable")
    kl, beta, gain, slope, kl_dbeta, gain_se = (value[order] for value in (kl, beta, gain, slope, kl_dbeta, gain_se))
    right = int(np.clip(np.searchsorted(kl, budget, side="left"), 1, size - 1)) if size > 1 else 0
    if size == 1 or kl[right] == kl[right - 1]:
        index = right if size == 1 else right - 1
        return float(beta[index]), float(gain[index]), float(gain_se[index])
    left = right - 1
    # The variable: log KL where both ends are positive (power laws such as sigma sqrt(2K) are then smooth
    # exponentials, nearly exact), else KL itself; the slopes scale by dK/du = K.
    logged = kl[left] > 0 and kl[right] > 0 and budget > 0
    scale = kl if logged else np.ones(size)
    u = np.log(kl) if logged else kl
    at = np.log(budget) if logged else budget
    chord = (budget - kl[left]) / (kl[right] - kl[left])  # the fallbacks are linear in KL itself
    log_beta = np.log(beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain_slope = slope * scale
        beta_slope = scale / (beta * kl_dbeta)
    if np.all(np.isfinite([gain_slope[left], gain_slope[right]])):
        value = hermite(u[left], u[right], gain[left], gain[right], gain_slope[left], gain_slope[right], at)
    else:
        value = float(gain[left] + chord * (gain[right] - gain[left]))
    if np.all(np.isfinite([beta_slope[left], beta_slope[right]])):
        at_beta = float(np.exp(hermite(u[left], u[right], log_beta[left], log_beta[right], beta_slope[left],
                                       beta_slope[right], at)))
    else:
        at_beta = float(np.exp(log_beta[left] + chord * (log_beta[right] - log_beta[left])))
    error = gain_se[left] + chord * (gain_se[right] - gain_se[left])
    if np.all(np.isfinite([gain_slope[left], gain_slope[right]])) and logged:
        error = float(widened(error, interpolation_error(kl, gain, slope, budget, np.isfinite(gain_se))))
    return at_beta, value, float(error)
