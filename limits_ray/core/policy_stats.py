"""Placing a policy against the frontier: its KL and gain from its own samples (pure numpy).

For a policy pi (a PPO/GRPO checkpoint, best-of-n, ...) and one prompt x (MATH.md, "Any other policy"):

* ``KL(pi || pi0) = E_pi[log pi(y|x) - log pi0(y|x)]``, estimated on the policy's n samples by
  ``mean(log pi - log pi0)``, with ``se = sd / sqrt(n)`` (sd with ``ddof=1``; NaN for n = 1, where
  one sample says nothing about its spread). Unbiased; a single prompt's estimate can be negative
  by chance.
* ``gain_e = E_pi[e] - E_pi0[e]``, estimated by ``mean(e over policy samples) - mean(e over base
  samples)``; the two sample sets are independent, so ``se = sqrt(var_pi/n + var_pi0/m)``.

Over P prompts the estimates are averaged and, treating prompts as fixed and their Monte Carlo errors
as independent (as :func:`limits_ray.core.frontier.mean_frontier` does), ``se = sqrt(sum_x se_x^2) / P``.
When some prompt's se is unknown (one sample) the average falls back to the between-prompt
``se = sd_x(estimate_x) / sqrt(P)``, which contains each prompt's sampling noise (and the prompts'
spread, so it is conservative for fixed prompts); NaN with a single such prompt.

The frontier's gain at the policy's KL (:func:`frontier_gain_at_kl`) interpolates the prompt-mean
frontier in KL: between grid points by cubic Hermite with the frontier's known slopes
(:mod:`limits_ray.core.fixed_kl`; linearly where the table has none), and below the smallest grid KL linearly
from ``(KL, gain) = (0, 0)`` (beta -> infinity is pi0 itself), so a policy closer to pi0 than the
largest beta of the grid still has a comparison point; beyond the grid's largest KL the answer is NaN
(widen the beta grid towards small betas). Its standard error is the frontier's at that fixed KL
(``frontier_mean.gain_se_at_kl``), interpolated likewise.

The gap ``frontier_gain(KL_pi) - gain_pi`` has, by the delta method with the frontier's local slope
``s = d frontier_gain / d KL`` (:func:`frontier_slope_at_kl`),
``se(gap)^2 <= se(gain_pi)^2 + s^2 se(KL_pi)^2 - 2 s cov(gain_pi, KL_pi) + se_F^2 + 2 se_F se_shared``
(:func:`gap_se`, ``se_F = se(frontier_gain)``). The policy's gain and KL come from the same samples, so
their covariance ``cov_i(e_i, log pi_i - log pi0_i) / n`` is kept: for a policy on the frontier (a tilt
of pi0) the two errors move along the frontier and cancel in the gap. The frontier and the policy's
gain share the base samples (both subtract ``mean_pi0(e)``; best-of-n's whole estimate comes from
them): ``se_shared`` is the SE of the shared part (the base mean's for a policy, best-of-n's own), and
``|cov| <= se_F se_shared`` (Cauchy-Schwarz) bounds their covariance, whatever its sign: treating the
two as independent is not conservative when ``Var_beta(e) > Var_0(e)``.

Also here: the exact KL of discrete distributions by enumeration (for tests), deterministic
per-sample Gaussian noise for synthetic proxy rewards (Theorem 3 studies), and the ``c / sqrt(M)``
reference of the ensemble rate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from limits_ray.core.fixed_kl import at_kl

__all__ = [
    "PolicyEstimate", "between_or_within_se", "exact_kl", "frontier_gain_at_kl", "frontier_slope_at_kl", "gap_se",
    "hash_normal", "inverse_sqrt_reference", "mean_over_prompts", "prompt_estimate",
]


@dataclass
class PolicyEstimate:
    """KL(pi || pi0) and gains of one policy, for one prompt or averaged over prompts.

    Attributes:
        kl, kl_se: the KL estimate (nats) and its standard error.
        gain, gain_se: ``[E]`` gain per evaluation reward and standard errors.
        kl_gain_cov: ``[E]`` the covariance of the KL and gain estimates (NaN when unknown).
        base_se: ``[E]`` the standard error of the base mean ``mean_pi0(e)`` inside ``gain`` (which the
            frontier shares; NaN when unknown).
        n: policy samples used (summed over prompts for an average).
        n_base: base samples used (summed over prompts for an average).
        prompts: prompts averaged (1 for one prompt).
    """

    kl: float
    kl_se: float
    gain: np.ndarray
    gain_se: np.ndarray
    kl_gain_cov: np.ndarray
    n: int
    n_base: int
    prompts: int = 1
    base_se: np.ndarray | None = None


def _mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and its standard error ``sd(ddof=1)/sqrt(n)`` (NaN for a single sample)."""
    n = values.shape[0]
    if n == 0:
        raise ValueError("no samples: a policy estimate needs at least one sample per prompt")
    mean = values.mean(axis=0)
    se = values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full_like(mean, np.nan)
    return mean, se


def prompt_estimate(log_pi: np.ndarray, log_pi0: np.ndarray, e_pi: np.ndarray, e_base: np.ndarray) -> PolicyEstimate:
    """One prompt's KL and gains from the policy's samples and the base samples.

    Args:
        log_pi: ``[n]`` log pi(y_i|x) of the policy's samples under the policy.
        log_pi0: ``[n]`` log pi0(y_i|x) of the same samples under the base model.
        e_pi: ``[n, E]`` (or ``[n]``) evaluation rewards of the policy's samples.
        e_base: ``[m, E]`` (or ``[m]``) the same rewards of the base samples of the prompt.
    """
    log_pi = np.asarray(log_pi, dtype=np.float64).reshape(-1)
    log_pi0 = np.asarray(log_pi0, dtype=np.float64).reshape(-1)
    if log_pi.shape != log_pi0.shape:
        raise ValueError(f"log_pi {log_pi.shape} and log_pi0 {log_pi0.shape} must hold one value per policy sample")
    e_pi = np.asarray(e_pi, dtype=np.float64).reshape(log_pi.size, -1)
    e_base = np.asarray(e_base, dtype=np.float64)
    e_base = e_base.reshape(e_base.shape[0], -1)
    if e_base.shape[1] != e_pi.shape[1]:
        raise ValueError(f"e_pi has {e_pi.shape[1]} reward columns but e_base has {e_base.shape[1]}")
    bad = ~np.isfinite(log_pi) | ~np.isfinite(log_pi0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} non-finite log-probabilities (a response the base model cannot produce?)")
    log_ratio = log_pi - log_pi0
    kl, kl_se = _mean_and_se(log_ratio)
    mean_pi, se_pi = _mean_and_se(e_pi)
    mean_base, se_base = _mean_and_se(e_base)
    count = log_ratio.size
    cov = ((log_ratio - kl) @ (e_pi - mean_pi)) / (count - 1) / count if count > 1 else np.full_like(mean_pi, np.nan)
    return PolicyEstimate(
        kl=float(kl), kl_se=float(kl_se), gain=mean_pi - mean_base, gain_se=np.sqrt(se_pi**2 + se_base**2),
        kl_gain_cov=cov, n=int(count), n_base=int(e_base.shape[0]), base_se=se_base,
    )


def between_or_within_se(estimates: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """The se of the mean over axis 0 of ``estimates`` ``[P, ...]`` with per-prompt ``errors``.

    ``sqrt(sum_x se_x^2) / P`` where every ``se_x`` is known, else the between-prompt fallback
    ``sd_x(estimate_x, ddof=1) / sqrt(P)`` (NaN for P = 1); decided per column.
    """
    estimates, errors = np.asarray(estimates, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    count = estimates.shape[0]
    within = np.sqrt(np.sum(errors**2, axis=0)) / count
    between = estimates.std(axis=0, ddof=1) / np.sqrt(count) if count > 1 else np.full_like(within, np.nan)
    return np.where(np.isnan(errors).any(axis=0), between, within)


def mean_over_prompts(estimates: list[PolicyEstimate]) -> PolicyEstimate:
    """The prompt average: means of the estimates, se by :func:`between_or_within_se`.

    The KL-gain covariance of the mean is ``sum_x cov_x / P^2``, or where some ``cov_x`` is unknown
    the between-prompt ``cov_x(kl_x, gain_x, ddof=1) / P``.
    """
    if not estimates:
        raise ValueError("no prompts to average")
    kl = np.array([item.kl for item in estimates])
    gain = np.array([item.gain for item in estimates])
    count = len(estimates)
    covs = np.array([item.kl_gain_cov for item in estimates])
    between = ((kl - kl.mean()) @ (gain - gain.mean(axis=0))) / (count - 1) / count if count > 1 else np.nan
    return PolicyEstimate(
        kl=float(kl.mean()),
        kl_se=float(between_or_within_se(kl, np.array([item.kl_se for item in estimates]))),
        gain=gain.mean(axis=0),
        gain_se=between_or_within_se(gain, np.array([item.gain_se for item in estimates])),
        kl_gain_cov=np.where(np.isnan(covs).any(axis=0), between, covs.sum(axis=0) / count**2),
        n=int(sum(item.n for item in estimates)),
        n_base=int(sum(item.n_base for item in estimates)),
        prompts=len(estimates),
        base_se=np.sqrt(np.sum([np.full(gain.shape[1:], np.nan) if item.base_se is None else item.base_se ** 2
                                for item in estimates], axis=0)) / count,
    )


def frontier_gain_at_kl(
    kl: np.ndarray, gain: np.ndarray, kl_budget: float, gain_se: np.ndarray | None = None,
    slope: np.ndarray | None = None, kl_dbeta: np.ndarray | None = None, beta: np.ndarray | None = None,
) -> tuple[float, float]:
    """The frontier's gain (and its standard error) at ``kl_budget``.

    ``kl``/``gain``/``gain_se`` are one (align, eval) prompt-mean frontier over the beta grid
    (``gain_se``: the fixed-KL error bar, ``gain_se_at_kl``); with ``slope`` (``d gain / d KL``) the gain
    is the Hermite interpolant between grid points (:func:`limits_ray.core.fixed_kl.at_kl`), else linear. The
    curve is anchored at ``(0, 0)`` (pi0 itself), so budgets below the grid's smallest KL interpolate
    linearly towards it and budgets <= 0 give 0; budgets beyond the largest KL give NaN.
    """
    kl = np.asarray(kl, dtype=np.float64)
    gain = np.asarray(gain, dtype=np.float64)
    se = np.zeros_like(gain) if gain_se is None else np.asarray(gain_se, dtype=np.float64)
    if kl.size == 0 or not np.isfinite(kl_budget) or kl_budget > kl.max():
        return float("nan"), float("nan")
    if kl_budget <= 0:
        return 0.0, 0.0
    keep = kl > 0
    if kl_budget < kl[keep].min():  # below the grid: the chord from pi0
        first = np.flatnonzero(keep)[np.argmin(kl[keep])]
        share = kl_budget / kl[first]
        return float(share * gain[first]), float(share * se[first])
    betas = np.ones_like(kl) if beta is None else np.asarray(beta, dtype=np.float64)
    _, value, error = at_kl(kl[keep], betas[keep], gain[keep], kl_budget,
                            None if slope is None else np.asarray(slope, dtype=np.float64)[keep],
                            None if kl_dbeta is None else np.asarray(kl_dbeta, dtype=np.float64)[keep], se[keep])
    return value, error


def frontier_slope_at_kl(kl: np.ndarray, gain: np.ndarray, kl_budget: float, slope: np.ndarray | None = None) -> float:
    """``d gain / d KL`` of the frontier at ``kl_budget``.

    With the frontier's known slopes (``slope``, per grid point) it is interpolated linearly in KL
    between grid points; without, it is the slope of the chord holding ``kl_budget`` (the piece to its
    right at a grid point). Below the smallest grid KL (and at or below 0, where an unbiased KL
    estimate of a policy near pi0 can fall) it is the chord from ``(0, 0)``; NaN beyond the largest KL.
    """
    kl, gain = np.asarray(kl, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    keep = kl > 0
    order = np.argsort(kl[keep])
    grid_kl = np.concatenate([[0.0], kl[keep][order]])
    grid_gain = np.concatenate([[0.0], gain[keep][order]])
    if grid_kl.size < 2 or not kl_budget <= grid_kl[-1]:
        return float("nan")
    piece = min(max(int(np.searchsorted(grid_kl, kl_budget, side="right")) - 1, 0), grid_kl.size - 2)
    if slope is not None and piece >= 1:
        known = np.asarray(slope, dtype=np.float64)[keep][order]
        if np.all(np.isfinite(known)):
            return float(np.interp(kl_budget, grid_kl[1:], known))
    return float((grid_gain[piece + 1] - grid_gain[piece]) / (grid_kl[piece + 1] - grid_kl[piece]))


def gap_se(gain_se: float, kl_se: float, frontier_gain_se: float, slope: float, kl_gain_cov: float = 0.0,
           shared_se: float = 0.0) -> float:
    """The se of ``frontier_gain(KL) - gain``:
    ``sqrt(gain_se^2 + slope^2 kl_se^2 - 2 slope kl_gain_cov + frontier_gain_se^2 + 2 frontier_gain_se shared_se)``.

    Delta method (module doc). ``shared_se``: the se of the part of ``gain`` computed from the same base
    samples as the frontier (the base mean for a policy, all of it for best-of-n); Cauchy-Schwarz bounds
    the covariance of the two errors by ``frontier_gain_se shared_se``, so the result is an upper bound
    whatever the sign of that covariance. The policy's part is clipped at 0 against rounding.
    """
    policy = max(gain_se**2 + (slope * kl_se) ** 2 - 2 * slope * kl_gain_cov, 0.0)
    shared = 0.0 if not np.isfinite(shared_se) or not np.isfinite(frontier_gain_se) else shared_se
    return float(np.sqrt(policy + frontier_gain_se**2 + 2 * frontier_gain_se * shared))


def exact_kl(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(p || q) = sum_y p(y) log(p(y)/q(y))`` by enumeration over a finite response set."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    support = p > 0
    if np.any(q[support] <= 0):
        return float("inf")
    return float(np.sum(p[support] * (np.log(p[support]) - np.log(q[support]))))


def hash_normal(prompt_ids: np.ndarray, sample_idx: np.ndarray, stream: str) -> np.ndarray:
    """Deterministic standard-normal noise per (prompt_id, sample_idx), independent across ``stream``.

    Box-Muller on two uniforms from sha256 of ``"{stream}:{prompt_id}:{sample_idx}"``: the same
    sample gets the same value in every process and run.
    """
    values = np.empty(len(prompt_ids), dtype=np.float64)
    for index, (prompt_id, sample) in enumerate(zip(prompt_ids, sample_idx)):
        digest = hashlib.sha256(f"{stream}:{prompt_id}:{int(sample)}".encode()).digest()
        u1 = (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64
        u2 = int.from_bytes(digest[8:16], "big") / 2.0**64
        values[index] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return values


def inverse_sqrt_reference(sizes: np.ndarray, gaps: np.ndarray) -> tuple[float, np.ndarray]:
    """The ``c / sqrt(M)`` reference of Theorem 3, with ``c`` fitted to the gap at the smallest M.

    Returns ``(c, c / sqrt(sizes))``; ``c = gap(M0) * sqrt(M0)`` for the smallest ``M0`` in ``sizes``.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    gaps = np.asarray(gaps, dtype=np.float64)
    first = int(np.argmin(sizes))
    constant = float(gaps[first] * np.sqrt(sizes[first]))
    return constant, constant / np.sqrt(sizes)
