"""Placing a policy against the frontier: its KL and gain from its own samples (pure numpy).

For a policy pi (a PPO/GRPO checkpoint, best-of-n, ...) and one prompt x (MATH.md, "Any other policy"):

* ``KL(pi || pi0) = E_pi[log pi(y|x) - log pi0(y|x)]``, estimated on the policy's n samples by
  ``mean(log pi - log pi0)``, with ``se = sd / sqrt(n)`` (sd with ``ddof=1``). Unbiased; a single
  prompt's estimate can be negative by chance.
* ``gain_e = E_pi[e] - E_pi0[e]``, estimated by ``mean(e over policy samples) - mean(e over base
  samples)``; the two sample sets are independent, so ``se = sqrt(var_pi/n + var_pi0/m)``.

Over P prompts the estimates are averaged and, treating prompts as fixed and their Monte Carlo errors
as independent (as :func:`limits_ray.frontier.mean_frontier` does), ``se = sqrt(sum_x se_x^2) / P``.

The frontier's gain at the policy's KL (:func:`frontier_gain_at_kl`) interpolates the prompt-mean
frontier linearly in KL, anchored at ``(KL, gain) = (0, 0)`` (beta -> infinity is pi0 itself), so a
policy closer to pi0 than the largest beta of the grid still has a comparison point; beyond the
grid's largest KL the answer is NaN (widen the beta grid towards small betas).

Also here: the exact KL of discrete distributions by enumeration (for tests), deterministic
per-sample Gaussian noise for synthetic proxy rewards (Theorem 3 studies), and the ``c / sqrt(M)``
reference of the ensemble rate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PolicyEstimate", "exact_kl", "frontier_gain_at_kl", "hash_normal", "inverse_sqrt_reference",
    "mean_over_prompts", "prompt_estimate",
]


@dataclass
class PolicyEstimate:
    """KL(pi || pi0) and gains of one policy, for one prompt or averaged over prompts.

    Attributes:
        kl, kl_se: the KL estimate (nats) and its standard error.
        gain, gain_se: ``[E]`` gain per evaluation reward and standard errors.
        n: policy samples used (summed over prompts for an average).
        n_base: base samples used (summed over prompts for an average).
        prompts: prompts averaged (1 for one prompt).
    """

    kl: float
    kl_se: float
    gain: np.ndarray
    gain_se: np.ndarray
    n: int
    n_base: int
    prompts: int = 1


def _mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and its standard error ``sd(ddof=1)/sqrt(n)`` (0 for a single sample)."""
    n = values.shape[0]
    if n == 0:
        raise ValueError("no samples: a policy estimate needs at least one sample per prompt")
    mean = values.mean(axis=0)
    se = values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
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
    kl, kl_se = _mean_and_se(log_pi - log_pi0)
    mean_pi, se_pi = _mean_and_se(e_pi)
    mean_base, se_base = _mean_and_se(e_base)
    return PolicyEstimate(
        kl=float(kl), kl_se=float(kl_se), gain=mean_pi - mean_base, gain_se=np.sqrt(se_pi**2 + se_base**2),
        n=int(log_pi.size), n_base=int(e_base.shape[0]),
    )


def mean_over_prompts(estimates: list[PolicyEstimate]) -> PolicyEstimate:
    """The prompt average: means of the estimates, ``se = sqrt(sum se^2) / P``."""
    if not estimates:
        raise ValueError("no prompts to average")
    count = len(estimates)
    return PolicyEstimate(
        kl=float(np.mean([item.kl for item in estimates])),
        kl_se=float(np.sqrt(np.sum([item.kl_se**2 for item in estimates])) / count),
        gain=np.mean([item.gain for item in estimates], axis=0),
        gain_se=np.sqrt(np.sum([item.gain_se**2 for item in estimates], axis=0)) / count,
        n=int(sum(item.n for item in estimates)),
        n_base=int(sum(item.n_base for item in estimates)),
        prompts=count,
    )


def frontier_gain_at_kl(
    kl: np.ndarray, gain: np.ndarray, kl_budget: float, gain_se: np.ndarray | None = None,
) -> tuple[float, float]:
    """The frontier's gain (and its interpolated standard error) at ``kl_budget``.

    ``kl``/``gain``/``gain_se`` are one (align, eval) prompt-mean frontier over the beta grid. The
    curve is anchored at ``(0, 0)`` (pi0 itself), so budgets below the grid's smallest KL
    interpolate towards it and budgets <= 0 give 0; budgets beyond the largest KL give NaN.
    """
    kl = np.asarray(kl, dtype=np.float64)
    gain = np.asarray(gain, dtype=np.float64)
    se = np.zeros_like(gain) if gain_se is None else np.asarray(gain_se, dtype=np.float64)
    order = np.argsort(kl)
    kl, gain, se = kl[order], gain[order], se[order]
    if kl.size == 0 or not np.isfinite(kl_budget) or kl_budget > kl[-1]:
        return float("nan"), float("nan")
    if kl_budget <= 0:
        return 0.0, 0.0
    keep = kl > 0
    grid_kl = np.concatenate([[0.0], kl[keep]])
    return (
        float(np.interp(kl_budget, grid_kl, np.concatenate([[0.0], gain[keep]]))),
        float(np.interp(kl_budget, grid_kl, np.concatenate([[0.0], se[keep]]))),
    )


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
