"""Exact values for distributions known in closed form: the oracles the estimators are tested on.

- Finite response sets: pi0 a list of probabilities over responses with rewards ``r`` and ``e``;
  the tilted policy ``pi_beta ∝ pi0 exp(r/beta)`` (eq. 2.2) and the best-of-n policy are
  enumerated exactly.
- Gaussian rewards ``r ~ N(mu, sigma^2)`` aligned on themselves:
  ``gain = sigma^2/beta`` and ``KL = sigma^2/(2 beta^2)``; best-of-n reaches ``sigma E[max of n N(0,1)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import integrate, stats
from scipy.special import logsumexp

from limits_ray.core.bon import level_kl

__all__ = ["ExactTilt", "finite_tilt", "finite_bon", "gaussian_gain", "gaussian_kl", "expected_max_normal"]


@dataclass
class ExactTilt:
    """Exact tilted quantities of a finite response set at one beta.

    Attributes:
        gain: ``[E]`` ``E_pi_beta[e] - E_pi0[e]`` per evaluation column (Theorem 2).
        kl: ``KL(pi_beta||pi0)``; reverse_kl: ``KL(pi0||pi_beta)``; log_z: ``log E_pi0[exp(r/beta)]``.
    """

    gain: np.ndarray
    kl: float
    reverse_kl: float
    log_z: float


def finite_tilt(probs: np.ndarray, align: np.ndarray, evals: np.ndarray, beta: float) -> ExactTilt:
    """Enumerate ``pi_beta(y) = pi0(y) exp(r(y)/beta) / Z`` over a finite response set."""
    probs, align = np.asarray(probs, float), np.asarray(align, float)
    evals = np.asarray(evals, float).reshape(align.size, -1)
    log_tilted = np.log(probs) + align / beta
    log_z = float(logsumexp(log_tilted))
    tilted = np.exp(log_tilted - log_z)
    kl = float(np.sum(tilted * (align / beta - log_z)))
    reverse_kl = float(np.sum(probs * (log_z - align / beta)))
    return ExactTilt(gain=tilted @ evals - probs @ evals, kl=kl, reverse_kl=reverse_kl, log_z=log_z)


def finite_bon(probs: np.ndarray, align: np.ndarray, evals: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Exact ``(E[e of the best of n], KL(pi_BoN||pi0))`` over a finite response set.

    A reward level with CDF values ``F_- < F`` gets mass ``F^n - F_-^n``, spread over its
    responses in proportion to pi0 (ties broken at random).
    """
    probs, align = np.asarray(probs, float), np.asarray(align, float)
    evals = np.asarray(evals, float).reshape(align.size, -1)
    _, level_of, _ = np.unique(align, return_inverse=True, return_counts=True)
    level_probs = np.bincount(level_of, probs)
    level_evals = np.stack([np.bincount(level_of, probs * column) for column in evals.T], axis=1)
    level_means = level_evals / level_probs[:, None]
    cdf = np.minimum(np.cumsum(level_probs), 1.0)
    mass = cdf**n - np.concatenate([[0.0], cdf[:-1]]) ** n
    kl = float(level_kl(level_probs, np.array([n]))[0])
    return mass @ level_means, kl


def gaussian_gain(sigma: float, beta: np.ndarray) -> np.ndarray:
    """``sigma^2/beta``: the gain of a N(mu, sigma^2) reward aligned on itself."""
    return sigma**2 / np.asarray(beta, float)


def gaussian_kl(sigma: float, beta: np.ndarray) -> np.ndarray:
    """``sigma^2/(2 beta^2)``: KL(pi_beta||pi0) for a N(mu, sigma^2) reward."""
    return sigma**2 / (2 * np.asarray(beta, float) ** 2)


def expected_max_normal(n: int) -> float:
    """``E[max of n i.i.d. N(0,1)] = int x n phi(x) Phi(x)^(n-1) dx`` by quadrature."""
    def integrand(x: float) -> float:
        return x * n * stats.norm.pdf(x) * np.exp((n - 1) * stats.norm.logcdf(x))

    value, _ = integrate.quad(integrand, -12, 12, limit=200)
    return float(value)
