"""The rule of adaptive sampling: each prompt's N decided by a pilot, then estimated on a fresh sample of that N.

Two phases per prompt:

1. *Pilot* (the decision). :func:`plan_wave` is the pure rule: given each prompt's delta-method ``gain_se`` and
   ``kl_se`` over the beta grid (the worst over its (align, eval) pairs), whether its importance
   weights are reliable at every beta (:func:`limits_ray.core.reliability.frontier_reliable`) and its current sample count, it returns
   the sample count each prompt should reach next. A prompt is *done* when it is reliable and
   ``gain_se <= gain_tol`` and ``kl_se <= kl_tol`` at every beta (NaN counts as wide). A wide prompt
   is projected to need ``n * max_b (se_b / tol)^2`` samples (``se ~ 1/sqrt(n)``); it gets that, at
   least one step and at most ``growth`` times what it has (the projection is noisy while the ESS is
   small), capped by the per-prompt maximum; a tight but unreliable prompt grows by ``growth``.
   When a total budget is left for fewer samples than asked for, the widest prompts (largest
   ``se / tol``) are served first. The pilot ends at ``N_x``, each prompt's count when it is done
   or capped.
2. *Confirmation* (the estimate). Each prompt draws ``N_x`` new samples, independent of the pilot,
   and every reported number (frontier, best-of-n, convergence) comes from them alone.

Why: the pilot stops a prompt on the wave where its estimated se happens to be small, and for heavy
importance weights a small se goes with an unseen tail, i.e. with a low gain and KL (the estimate and
its se are correlated), so pilot estimates at the stopping time are biased low. Given ``N_x`` the
confirmation sample is an ordinary fixed-N sample, so its estimates carry only the fixed-N ratio
bias at ``N_x`` and their delta-method se is honest. The price is the confirmation's samples: about
twice the pilot's (measured against uniform N in docs/benchmarks.md).

Pure numpy: :func:`limits_ray.runs.adaptive.run_adaptive` runs the waves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from limits_ray.core.prompt_mean import within_prompt_se
from limits_ray.core.reliability import frontier_reliable

__all__ = ["WavePlan", "plan_wave", "prompt_errors", "worst_ratio"]


def worst_ratio(gain_se: np.ndarray, kl_se: np.ndarray, gain_tol: float, kl_tol: float) -> np.ndarray:
    """``[P]``: ``max_b max(gain_se / gain_tol, kl_se / kl_tol)``; ``inf`` where any se is NaN."""
    gain_se, kl_se = np.atleast_2d(np.asarray(gain_se, float)), np.atleast_2d(np.asarray(kl_se, float))
    ratio = np.maximum(gain_se / gain_tol, kl_se / kl_tol)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return ratio.max(axis=1)


@dataclass
class WavePlan:
    """One wave's decision: per prompt the samples to reach, and why."""

    targets: np.ndarray  # [P] samples each prompt should have after the wave
    done: np.ndarray  # [P] bool: reliable and under tolerance at every beta
    capped: np.ndarray  # [P] bool: wide but at the per-prompt maximum (or out of total budget)
    ratio: np.ndarray  # [P] worst se / tol
    samples: np.ndarray  # [P] samples before the wave

    @property
    def finished(self) -> bool:
        """No prompt gets more samples."""
        return bool(np.all(self.targets <= self.samples))


def plan_wave(gain_se: np.ndarray, kl_se: np.ndarray, samples: np.ndarray, gain_tol: float, kl_tol: float,
              max_samples: int, step: int, growth: float = 4.0, budget_left: float = np.inf,
              reliable: np.ndarray | None = None) -> WavePlan:
    """The sample count each prompt should reach next (pure numpy; see the module doc).

    Args:
        gain_se, kl_se: ``[P, B]`` standard errors at the current sample counts.
        samples: ``[P]`` current samples per prompt.
        gain_tol, kl_tol: the tolerances on every beta's standard errors.
        max_samples: the per-prompt cap.
        step: the granularity (samples of one round); targets are multiples of it.
        growth: at most this factor over the current count per wave.
        budget_left: total new samples this and later waves may still use.
        reliable: ``[P, B]`` (or ``[P]``) :func:`limits_ray.core.reliability.frontier_reliable` of the estimates; None: all reliable.
    """
    samples = np.asarray(samples, dtype=np.int64)
    ratio = worst_ratio(gain_se, kl_se, gain_tol, kl_tol)
    trusted = np.ones(samples.shape, bool)
    if reliable is not None:
        trusted = np.asarray(reliable, bool).reshape(samples.size, -1).all(axis=1)
    done = (ratio <= 1.0) & trusted
    projected = np.where(np.isfinite(ratio), samples * np.square(np.minimum(ratio, 1e6)), np.inf)
    projected = np.where(trusted, projected, np.inf)  # unreliable: the se says nothing, grow by ``growth``
    wanted = np.minimum(np.maximum(projected, samples + step), samples * growth)
    wanted = np.ceil(np.minimum(wanted, max_samples) / step) * step
    wanted = np.minimum(wanted, (max_samples // step) * step).astype(np.int64)
    targets = np.where(done, samples, np.maximum(wanted, samples))
    # Spend a limited budget on the widest prompts first.
    extra = targets - samples
    if extra.sum() > budget_left:
        left = max(int(budget_left // step) * step, 0)
        granted = np.zeros_like(extra)
        for index in np.argsort(-ratio, kind="stable"):
            give = min(int(extra[index]), left)
            granted[index] = give
            left -= give
        targets = samples + granted
    capped = ~done & (targets <= samples)
    return WavePlan(targets=targets, done=done, capped=capped, ratio=ratio, samples=samples)


def prompt_errors(frontier: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(prompt_ids, gain_se [P, B], kl_se [P, B], n [P], reliable [P, B])`` from a frontier table.

    The se's are the delta-method SEs that the prompt mean adds up
    (:func:`limits_ray.core.prompt_mean.within_prompt_se`, no small-sample t-factor: the tolerance is on the
    frontier's error, not on one prompt's interval), the worst over (align, eval); ``reliable``
    (:func:`limits_ray.core.reliability.frontier_reliable`) holds for every pair.
    """
    prompt_ids = sorted(set(frontier["prompt_id"].to_pylist()))
    betas = np.unique(frontier["beta"].to_numpy())
    row_of = {prompt_id: index for index, prompt_id in enumerate(prompt_ids)}
    rows = np.array([row_of[p] for p in frontier["prompt_id"].to_pylist()])
    columns = np.searchsorted(betas, frontier["beta"].to_numpy())
    gain_se = np.full((len(prompt_ids), betas.size), -np.inf)
    kl_se = np.full((len(prompt_ids), betas.size), -np.inf)
    gain, kl = within_prompt_se(frontier)
    np.fmax.at(gain_se, (rows, columns), np.where(np.isnan(gain), np.inf, gain))
    np.fmax.at(kl_se, (rows, columns), np.where(np.isnan(kl), np.inf, kl))
    n = np.zeros(len(prompt_ids), dtype=np.int64)
    np.maximum.at(n, rows, frontier["n"].to_numpy())
    reliable = np.ones((len(prompt_ids), betas.size), bool)
    np.logical_and.at(reliable, (rows, columns), frontier_reliable(frontier))
    return prompt_ids, gain_se, kl_se, n, reliable
