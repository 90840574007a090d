"""Adaptive sampling: decide each prompt's N from a pilot, then estimate on a fresh sample of that N.

:func:`run_adaptive` drives :func:`limits_ray.runs.job.run_job` in waves with per-prompt round targets:
pilot waves as long as :func:`limits_ray.core.sampling_plan.plan_wave` (the rule, and why the reported
numbers come from a confirmation) gives some prompt more samples, then the confirmation. The pilot owns
rounds ``0 .. R_x - 1``, the confirmation ``R_x .. 2 R_x - 1``; all stay in the sample store, so each
wave only generates its new rounds and a rerun replays the same decisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from limits_ray.config import JobConfig
from limits_ray.core.sampling_plan import plan_wave, prompt_errors
from limits_ray.runs.job import run_job
from limits_ray.runs.validate import validate_job

__all__ = ["run_adaptive"]


def run_adaptive(config: JobConfig, total_samples: int = 0, *, validated: bool = False) -> dict[str, Any]:
    """Sample adaptively (``config.adaptive``): pilot waves of :func:`limits_ray.runs.job.run_job`, then the confirmation.

    The first pilot wave draws ``generation.samples_per_prompt`` per prompt; each later wave brings
    the still-wide (or unreliable) prompts to :func:`limits_ray.core.sampling_plan.plan_wave`'s targets. Once no prompt gets more,
    one more run draws each prompt's pilot count again as fresh rounds and writes the results from
    those rounds only (module doc). ``total_samples`` (0: ``adaptive.total_samples``, and if that is
    0 too, no total cap) bounds all samples, pilot and confirmation: the pilot gets half. The results
    are in ``output_dir``; ``adaptive.json`` there records each wave. ``config`` is checked once
    (:func:`limits_ray.runs.validate.validate_job`; not at all when ``validated``), not once per wave.
    """
    if not validated:
        validate_job(config)
    adaptive = config.adaptive
    n = config.generation.n
    total = total_samples or adaptive.total_samples
    max_samples = max(adaptive.max_samples_per_prompt, config.generation.samples_per_prompt)
    targets: dict[str, int] | None = None
    waves = []
    while True:
        result, report = run_job(config, round_targets=targets, validated=True, figures=False)  # the confirmation's are drawn
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
                        round_starts=pilot_rounds, validated=True)
    summary = {
        "waves": waves, "pilot_samples": used, "samples": 2 * used, "prompts": len(prompt_ids),
        "confirmation_rounds_generated": report.rounds_generated,
        "samples_per_prompt": {prompt_id: int(value) for prompt_id, value in zip(prompt_ids, samples)},
        "done": [prompt_id for prompt_id, flag in zip(prompt_ids, plan.done) if flag],
        "gain_tol": adaptive.gain_se, "kl_tol": adaptive.kl_se,
    }
    Path(config.output_dir, "adaptive.json").write_text(json.dumps(summary, indent=2))
    return summary
