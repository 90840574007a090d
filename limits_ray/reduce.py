"""The reducer: scored samples (or their merged statistics) to the four result tables.

The per-prompt steps are separate so that the offline command (``limits-ray reduce``) and the
streaming pipeline share them: :func:`prompt_statistics` turns one prompt's rewards into
mergeable :class:`DyadicStats`; :func:`frontier_rows`, :func:`convergence_rows` and
:func:`bon_rows` turn statistics (or rewards, for best-of-n) into rows; :func:`finish` averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from limits_ray.bon import best_of_n
from limits_ray.config import AnalysisConfig
from limits_ray.convergence import DyadicStats
from limits_ray.frontier import mean_frontier
from limits_ray.io import SCHEMAS, PromptSamples, iter_prompts, read_samples, write_table
from limits_ray.reward_spec import RewardSpec

__all__ = [
    "Plan", "ReduceResult", "StatisticsReducer", "TableBuilder", "bon_rows", "convergence_rows", "frontier_rows",
    "finish", "prompt_statistics", "reduce_prompts", "reduce_samples", "reduce_table", "target_specs",
]

Plan = list[tuple[RewardSpec, list[RewardSpec]]]
"""``[(align, [evals])]``: which rewards align and which evaluate (see AnalysisConfig.plan)."""


def target_specs(align: RewardSpec, evals: list[RewardSpec]) -> list[RewardSpec]:
    """Columns of the statistics for one alignment reward: itself first, then distinct evals."""
    return [align, *[spec for spec in dict.fromkeys(evals) if spec != align]]


def _eval_index(align: RewardSpec, evals: list[RewardSpec]) -> list[int]:
    targets = target_specs(align, evals)
    return [targets.index(spec) for spec in evals]


class TableBuilder:
    """Collects column blocks for one result schema; scalars broadcast to the block length."""

    def __init__(self, name: str) -> None:
        self.schema = SCHEMAS[name]
        self.blocks: list[dict[str, np.ndarray]] = []

    def add(self, length: int, **columns: object) -> None:
        """Append ``length`` rows; each schema column given as an array or a scalar."""
        block = {}
        for field in self.schema:
            value = columns[field.name]
            block[field.name] = value if isinstance(value, np.ndarray) else np.full(length, value, dtype=object)
        self.blocks.append(block)

    def table(self) -> pa.Table:
        """The rows added so far as a table of the schema."""
        if not self.blocks:
            return self.schema.empty_table()
        arrays = [
            pa.array(np.concatenate([block[field.name] for block in self.blocks]), type=field.type)
            for field in self.schema
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)


def prompt_statistics(samples: PromptSamples, plan: Plan, betas: np.ndarray) -> dict[str, DyadicStats]:
    """One prompt's mergeable statistics per alignment reward, in dyadic shells of sample_idx."""
    statistics = {}
    for align, evals in plan:
        targets = np.stack([spec.values(samples.rewards) for spec in target_specs(align, evals)], axis=1)
        statistics[align.name] = DyadicStats(np.asarray(betas), targets.shape[1]).update(samples.sample_idx, targets)
    return statistics


def frontier_rows(builder: TableBuilder, prompt_id: str, plan: Plan, statistics: dict[str, DyadicStats]) -> None:
    """Add one prompt's frontier rows (every align, eval, beta); the columns are
    :class:`limits_ray.stats.TiltEstimate`'s (``gain_se``/``kl_se`` its interval SEs, NaN where not
    ``reliable``; ``khat``, ``ess`` and ``reliable`` depend on the align reward only)."""
    for align, evals in plan:
        estimate = statistics[align.name].total().finalize()
        for spec, column in zip(evals, _eval_index(align, evals)):
            builder.add(
                estimate.betas.size, prompt_id=prompt_id, align=align.name, eval=spec.name, beta=estimate.betas,
                n=estimate.n, gain=estimate.gain[:, column], gain_se=estimate.gain_se[:, column],
                kl=estimate.kl, kl_se=estimate.kl_se, ess=estimate.ess, gain_bc=estimate.gain_bc[:, column],
                kl_bc=estimate.kl_bc, khat=estimate.khat, reliable=estimate.reliable,
            )


def convergence_rows(builder: TableBuilder, prompt_id: str, plan: Plan, statistics: dict[str, DyadicStats]) -> None:
    """Add the estimates on every dyadic prefix (N = 1, 2, 4, ... samples) of one prompt, and on all its
    samples when N is not a power of two, with their standard errors, ESS, k-hat and reliability flag."""
    for align, evals in plan:
        dyadic = statistics[align.name]
        states = list(dyadic.prefixes())
        if states and states[-1].n != dyadic.n:
            states.append(dyadic.total())
        for state in states:
            estimate = state.finalize()
            for spec, column in zip(evals, _eval_index(align, evals)):
                builder.add(
                    estimate.betas.size, prompt_id=prompt_id, align=align.name, eval=spec.name,
                    beta=estimate.betas, n_samples=estimate.n, gain=estimate.gain[:, column],
                    gain_se=estimate.gain_se[:, column], kl=estimate.kl, kl_se=estimate.kl_se,
                    ess=estimate.ess, khat=estimate.khat, reliable=estimate.reliable,
                )


def bon_rows(builder: TableBuilder, samples: PromptSamples, plan: Plan) -> None:
    """Add one prompt's best-of-n rows for n = 1, 2, 4, ... <= N, with jackknife standard errors."""
    for align, evals in plan:
        evaluated = np.stack([spec.values(samples.rewards) for spec in evals], axis=1)
        result = best_of_n(align.values(samples.rewards), evaluated)
        for column, spec in enumerate(evals):
            builder.add(
                result.n.size, prompt_id=samples.prompt_id, align=align.name, eval=spec.name, n=result.n,
                reward=result.reward[:, column], gain=result.gain[:, column], kl=result.kl,
                reward_se=result.reward_se[:, column], gain_se=result.gain_se[:, column],
            )


@dataclass
class ReduceResult:
    """The four result tables of the Parquet contract."""

    frontier: pa.Table
    frontier_mean: pa.Table
    bon: pa.Table
    convergence: pa.Table

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``<name>.parquet`` for each table into ``out_dir``; returns the paths."""
        paths = []
        for name in SCHEMAS:
            path = Path(out_dir) / f"{name}.parquet"
            write_table(getattr(self, name), path)
            paths.append(path)
        return paths


def finish(frontier: TableBuilder, bon: TableBuilder, convergence: TableBuilder) -> ReduceResult:
    """Assemble the result, averaging the per-prompt frontier over prompts."""
    frontier_table = frontier.table()
    return ReduceResult(frontier_table, mean_frontier(frontier_table), bon.table(), convergence.table())


class StatisticsReducer:
    """Merges per-round statistics as they stream in; memory grows with prompts x betas, not samples.

    Each (prompt_id, round) is merged at most once, so a retried or replayed round never counts twice.
    """

    def __init__(self, plan: Plan, betas: np.ndarray) -> None:
        self.plan = plan
        self.betas = np.asarray(betas)
        self.statistics: dict[str, dict[str, DyadicStats]] = {}
        self.rounds: set[tuple[str, int]] = set()

    def add(self, prompt_id: str, round_index: int, statistics: dict[str, DyadicStats]) -> bool:
        """Merge one round's statistics; returns False (and merges nothing) for a round seen before."""
        key = (prompt_id, int(round_index))
        if key in self.rounds:
            return False
        self.rounds.add(key)
        current = self.statistics.get(prompt_id)
        self.statistics[prompt_id] = statistics if current is None else {
            name: current[name].merge(statistics[name]) for name in current
        }
        return True

    @property
    def samples(self) -> int:
        """Samples merged so far."""
        return sum(next(iter(by_align.values())).n for by_align in self.statistics.values())

    def result(self, bon_samples: Iterable[PromptSamples], convergence: bool = True) -> ReduceResult:
        """The result tables; best-of-n comes from ``bon_samples`` (it needs each prompt's rewards)."""
        frontier, bon, convergence_table = TableBuilder("frontier"), TableBuilder("bon"), TableBuilder("convergence")
        for prompt_id in sorted(self.statistics):
            frontier_rows(frontier, prompt_id, self.plan, self.statistics[prompt_id])
            if convergence:
                convergence_rows(convergence_table, prompt_id, self.plan, self.statistics[prompt_id])
        for samples in bon_samples:
            bon_rows(bon, samples, self.plan)
        return finish(frontier, bon, convergence_table)


def reduce_prompts(prompts: Iterable[PromptSamples], plan: Plan, config: AnalysisConfig) -> ReduceResult:
    """Reduce per-prompt samples to the result tables (one prompt's rewards in memory at a time)."""
    betas = np.asarray(config.betas)
    frontier, bon, convergence = TableBuilder("frontier"), TableBuilder("bon"), TableBuilder("convergence")
    for samples in prompts:
        statistics = prompt_statistics(samples, plan, betas)
        frontier_rows(frontier, samples.prompt_id, plan, statistics)
        if config.convergence:
            convergence_rows(convergence, samples.prompt_id, plan, statistics)
        if config.best_of_n:
            bon_rows(bon, samples, plan)
    return finish(frontier, bon, convergence)


def reduce_table(table: pa.Table, reward_columns: list[str], config: AnalysisConfig) -> ReduceResult:
    """Reduce a validated samples table sorted by (prompt_id, sample_idx) (see :func:`read_samples`)."""
    plan = config.plan(reward_columns)
    return reduce_prompts(iter_prompts(table, reward_columns), plan, config)


def reduce_samples(samples_path: str | Path, config: AnalysisConfig) -> ReduceResult:
    """Read, validate and reduce a Parquet file or directory of scored samples, all in memory.

    For inputs that fit in memory (studies, tests); ``limits-ray reduce`` streams the input bucket by
    bucket instead (:func:`limits_ray.offline.reduce_dataset`), with the same values.
    """
    table, reward_columns = read_samples(samples_path, config.rewards)
    return reduce_table(table, reward_columns, config)
