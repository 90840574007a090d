"""Large-N convergence studies: bring every prompt to N samples, then study the estimates against N.

For a config and a maximum N, :func:`run_study` brings the sample store up to N samples per prompt
(only missing rounds are generated, see :func:`limits_ray.runs.job.run_job`) and takes the run's
``convergence`` table, which the bucket tasks write from the merged statistics of every dyadic prefix
(N = 1, 2, 4, ..., the sample_idx order, and N itself). The prompt averages, their two error bars and
the N where each estimate settles are :mod:`limits_ray.core.convergence`'s; the study's files
(``study_*.parquet``, ``study_*.png``, ``study.md``) are written by :mod:`limits_ray.outputs.study_report`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from limits_ray.config import JobConfig
from limits_ray.core.convergence import StudyResult, study_from_table
from limits_ray.outputs.study_report import write_study
from limits_ray.runs.job import run_job

__all__ = ["run_study", "study_config"]


def study_config(config: JobConfig, max_n: int, out_dir: str | Path) -> JobConfig:
    """The config that brings every prompt to ``max_n`` samples in the run's own store, writing to ``out_dir``."""
    n = config.generation.n
    rounds = max(1, -(-int(max_n) // n))
    return dataclasses.replace(
        config,
        output_dir=str(out_dir),
        store=dataclasses.replace(config.store, enabled=True, path=str(Path(config.store_uri))),
        generation=dataclasses.replace(config.generation, samples_per_prompt=rounds * n),
    )


def run_study(config: JobConfig, max_n: int, out_dir: str | Path | None = None, tolerance: float = 0.05,
              atol: float = 1e-3) -> StudyResult:
    """Bring the store to ``max_n`` samples per prompt (missing rounds only), then study convergence.

    Results go to ``out_dir`` (default ``<output_dir>/study-N<max_n>``): the job's usual tables for
    N = max_n, and the study's (``study_*.parquet``, ``study_*.png``, ``study.md``).
    """
    out_dir = Path(out_dir or Path(config.output_dir) / f"study-N{max_n}")
    job = study_config(config, max_n, out_dir)
    result, report = run_job(job)
    # The run's convergence table: its prompts only, every dyadic N with errors, ESS and k-hat, written
    # by the bucket tasks from the merged statistics (no read of the stored samples here).
    study = study_from_table(result.convergence, tolerance, atol, title=config.name)
    write_study(study, out_dir)
    (out_dir / "study.json").write_text(json.dumps({
        "max_n": job.generation.samples_per_prompt, "tolerance": tolerance, "atol": atol,
        "rounds_generated": report.rounds_generated, "rounds_from_store": report.rounds_from_store,
    }, indent=2))
    return study
