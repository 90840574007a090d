"""limits-ray: the KL-reward Pareto frontier of language-model alignment, from base-model samples.

The public API: what the command line, ``jobs/`` and a notebook call. Each name is imported from its
home on first use (so ``import limits_ray`` stays cheap and ``limits_ray.core`` loads no Ray, vLLM,
torch or matplotlib); the layers behind them are in README, "Architecture".

    from limits_ray import AnalysisConfig, load_result, point_at_kl, reduce_dataset
    reduce_dataset("runs/tiny/store/samples", "runs/tiny-offline", AnalysisConfig(betas="0.01:100:41"))
    result = load_result("runs/tiny-offline")
    point_at_kl(result.frontier_mean, 1.0, "rm", "rm")
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    # configuration
    "JobConfig": "limits_ray.config", "load_yaml": "limits_ray.config", "from_mapping": "limits_ray.config",
    "AnalysisConfig": "limits_ray.core.analysis", "ConfigError": "limits_ray.core.errors",
    "InputError": "limits_ray.core.errors",
    # runs
    "run_job": "limits_ray.runs.job", "run_night": "limits_ray.runs.nightly", "run_study": "limits_ray.runs.study",
    "run_adaptive": "limits_ray.runs.adaptive", "compare": "limits_ray.runs.compare",
    "CompareOptions": "limits_ray.runs.compare", "reduce_dataset": "limits_ray.runs.reduce",
    "reduce_samples": "limits_ray.runs.reduce", "validate_job": "limits_ray.runs.validate",
    # results
    "load_result": "limits_ray.storage.results", "StoredResult": "limits_ray.storage.results",
    "write_report": "limits_ray.outputs.report", "point_at_kl": "limits_ray.core.frontier",
    "trusted_kl_range": "limits_ray.core.frontier", "mean_frontier": "limits_ray.core.frontier",
    "bracket_at": "limits_ray.core.bracket", "winrate_at_kl": "limits_ray.core.winrate",
    # the statistics, for data already in memory
    "reduce_table": "limits_ray.core.tables", "TiltStats": "limits_ray.core.tilt", "best_of_n": "limits_ray.core.bon",
    "khat": "limits_ray.core.psis",
    "read_samples": "limits_ray.storage.sample_io",
    # around a run
    "route_logs": "limits_ray.pipeline.logs", "today": "limits_ray.runs.nightly", "StorageError": "limits_ray.storage.location",
    "PipelineError": "limits_ray.pipeline.stages",
    # a checkpoint near another (jobs/policy.py), from two of the same architecture
    "blend_checkpoint": "limits_ray.tiny_models",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Import a public name from its home module on first access (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'limits_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
