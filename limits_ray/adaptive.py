"""Adaptive sampling: decide each prompt's N from a pilot, then estimate on a fresh sample of that N.

Two phases per prompt:

1. *Pilot* (the decision). :func:`plan_wave` is the pure rule: given each prompt's delta-method ``gain_se`` and
   ``kl_se`` over the beta grid (the worst over its (align, eval) pairs), whether its importance
   weights are reliable at every beta (:func:`is_reliable`) and its current sample count, it returns
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

:func:`run_adaptive` drives :func:`limits_ray.job.run_job` in waves with per-prompt round targets
(the pilot owns rounds ``0 .. R_x - 1``, the confirmation ``R_x .. 2 R_x - 1``; all stay in the sample
store, so each wave only generates its new rounds and a rerun replays the same decisions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from limits_ray.config import JobConfig
from limits_ray.prompt_mean import within_prompt_se

__all__ = [
    "MIN_ESS_FRACTION", "WavePlan", "is_reliable", "plan_wave", "prompt_errors", "run_adaptive", "worst_ratio",
]

MIN_ESS_FRACTION = 0.1
"""The Kish ``ESS / N`` below which :func:`is_reliable` calls an estimate unreliable."""


def is_reliable(ess: np.ndarray, n: np.ndarray, min_fraction: float = MIN_ESS_FRACTION) -> np.ndarray:
    """Whether each frontier estimate has enough effective samples to stop a prompt: Kish ``ESS / N >= min_fraction``.

    Used beside the PSIS ``reliable`` flag (:func:`frontier_reliable`): ``ESS / N`` is near
    ``exp(-var(r/beta))`` for log-normal weights, and at 0.1 the tilt rests on a tenth of the
    samples, so a prompt does not stop on a pilot whose weights sit on a few samples even where
    k-hat is benign. NaN (and N = 0) count as unreliable.
    """
    ess, n = np.asarray(ess, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(n > 0, ess / n, np.nan)
    return np.nan_to_num(fraction, nan=-1.0) >= min_fraction


def frontier_reliable(frontier: pa.Table) -> np.ndarray:
    """Per row: the PSIS ``reliable`` flag of the frontier table (k-hat and ESS, see
    :meth:`limits_ray.stats.TiltStats.finalize`) and the ESS fraction of :func:`is_reliable` together."""
    flags = frontier["reliable"].to_numpy(zero_copy_only=False).astype(bool)
    return flags & is_reliable(frontier["ess"].to_numpy(), frontier["n"].to_numpy())


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
        reliable: ``[P, B]`` (or ``[P]``) :func:`is_reliable` of the estimates; None: all reliable.
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
    (:func:`limits_ray.prompt_mean.within_prompt_se`, no small-sample t-factor: the tolerance is on the
    frontier's error, not on one prompt's interval), the worst over (align, eval); ``reliable``
    (:func:`frontier_reliable`) holds for every pair.
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


def run_adaptive(config: JobConfig, total_samples: int = 0) -> dict[str, Any]:
    """Sample adaptively (``config.adaptive``): pilot waves of :func:`run_job`, then the confirmation.

    The first pilot wave draws ``generation.samples_per_prompt`` per prompt; each later wave brings
    the still-wide (or unreliable) prompts to :func:`plan_wave`'s targets. Once no prompt gets more,
    one more run draws each prompt's pilot count again as fresh rounds and writes the results from
    those rounds only (module doc). ``total_samples`` (0: ``adaptive.total_samples``, and if that is
    0 too, no total cap) bounds all samples, pilot and confirmation: the pilot gets half. The results
    are in ``output_dir``; ``adaptive.json`` there records each wave.
    """
    from limits_ray.job import run_job

    adaptive = config.adaptive
    n = config.generation.n
    total = total_samples or adaptive.total_samples
    max_samples = max(adaptive.max_samples_per_prompt, config.generation.samples_per_prompt)
    targets: dict[str, int] | None = None
    waves = []
    while True:
        result, report = run_job(config, round_targets=targets)
        prompt_ids, gain_se, kl_se, samples, reliable = prompt_errors(result.frontier)
        used = int(samples.sum())
        plan = plan_wave(gain_se, kl_se, samples, adaptive.gain_se, adaptive.kl_se, max_samples,
                         step=n * max(1, adaptive.rounds_per_wave), growth=adaptive.growth,
                         budget_left=(total // 2 - used) if total else np.inf, reliable=reliable)
        waves.append({
            "samples": used, "rounds_generated": report.rounds_generated, "done": int(plan.done.sum()),
            "capped": int(plan.capped.sum()), "worst_ratio": float(np.max(plan.ratio)),
            "unreliable": int((~reliable.all(axis=1)).sum()),
        })
        if plan.finished or len(waves) >= 64:
            break
        targets = {prompt_id: int(target // n) for prompt_id, target in zip(prompt_ids, plan.targets)}
    pilot_rounds = {prompt_id: int(value // n) for prompt_id, value in zip(prompt_ids, samples)}
    _, report = run_job(config, round_targets={key: 2 * value for key, value in pilot_rounds.items()},
                        round_starts=pilot_rounds)
    summary = {
        "waves": waves, "pilot_samples": used, "samples": 2 * used, "prompts": len(prompt_ids),
        "confirmation_rounds_generated": report.rounds_generated,
        "samples_per_prompt": {prompt_id: int(value) for prompt_id, value in zip(prompt_ids, samples)},
        "done": [prompt_id for prompt_id, flag in zip(prompt_ids, plan.done) if flag],
        "gain_tol": adaptive.gain_se, "kl_tol": adaptive.kl_se,
    }
    Path(config.output_dir, "adaptive.json").write_text(json.dumps(summary, indent=2))
    return summary
