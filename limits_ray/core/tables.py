"""The reducer: scored samples (or their merged statistics) to the result tables.

The per-prompt steps are separate so that the offline command (``limits-ray reduce``) and the
streaming pipeline share them: :func:`prompt_statistics` turns one prompt's rewards into
mergeable :class:`DyadicStats`; :class:`PromptRows` turns statistics (and rewards, for best-of-n:
:func:`bon_rows`, and the win rates: :class:`limits_ray.core.winrate.WinRateRows`) into rows, finalizing
a batch of prompts at once; :func:`finish` averages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa

from limits_ray.core.analysis import AnalysisConfig, Plan
from limits_ray.core.bon import best_of_n
from limits_ray.core.bracket import bon_means, bon_sums, bracket_table
from limits_ray.core.dyadic import DyadicStats
from limits_ray.core.frontier import mean_frontier
from limits_ray.core.reliability import pool_whole
from limits_ray.core.reward_spec import RewardSpec
from limits_ray.core.samples import PromptSamples, iter_prompts
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tilt import TiltEstimate, finalize_many
from limits_ray.core.winrate import WinRateRows, loo_midranks, winrate_mean, winrate_sums

__all__ = [
    "PromptRows", "ReduceResult", "TableBuilder", "bon_rows", "finish", "prompt_statistics", "reduce_prompts",
    "reduce_table", "target_specs",
]


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


PROMPT_BATCH = 256
"""Most prompts whose estimates :class:`PromptRows` finalizes at once."""
BATCH_SAMPLES = 1 << 16
"""A batch also closes once its prompts hold this many samples (bounds the prefix states it keeps)."""


class PromptRows:
    """Adds prompts' frontier, convergence and best-of-n rows to table builders, batching the estimates.

    The estimates of a batch of prompts (at most :data:`PROMPT_BATCH` prompts or
    :data:`BATCH_SAMPLES` samples) are finalized together (:func:`limits_ray.core.tilt.finalize_many`);
    the rows come out in the order of one prompt at a time (prompt, align, [prefix,] eval, beta).
    Call :meth:`flush` before reading the builders.

    Frontier rows are :class:`limits_ray.core.tilt.TiltEstimate`'s columns (``gain_se``/``kl_se`` its
    interval SEs, NaN where not ``reliable``; ``khat``, ``ess`` and the own test ``reliable`` depend on
    the align reward only, until the gate of :mod:`limits_ray.core.reliability` adds its per-row tests).
    Convergence rows are the estimates on every dyadic prefix (N = 1, 2, 4, ... samples, and all N when N
    is not a power of two). Both carry the drift of the bias-corrected estimates from the prefix before
    (:mod:`limits_ray.core.prompt_mean` tests the prompt mean's convergence with it). Best-of-n rows: see
    :func:`bon_rows`. With best-of-n on and a ``winrate`` builder, each prompt's win-rate rows too
    (:class:`limits_ray.core.winrate.WinRateRows`: from its rewards like best-of-n, with the frontier
    estimate's KL and weight diagnostics).
    """

    def __init__(self, builders: dict[str, TableBuilder], plan: Plan, convergence: bool = True,
                 best_of_n: bool = True, winrate: bool = True) -> None:
        self.builders, self.plan = builders, plan
        self.convergence, self.best_of_n = convergence, best_of_n
        self.winrate = winrate and "winrate" in builders
        self.prompt_ids: list[str] = []
        self.statistics: list[dict[str, DyadicStats]] = []
        self.samples = 0
        self.winrates: WinRateRows | None = None

    def add(self, prompt_id: str, statistics: dict[str, DyadicStats], samples: PromptSamples | None = None) -> None:
        """One prompt: its statistics, and its rewards when best-of-n is on (they are not kept)."""
        samples_held = next(iter(statistics.values())).n
        if not samples_held:
            raise ValueError(f"prompt {prompt_id!r}: no samples: cannot estimate anything from an empty state")
        if self.best_of_n:
            if samples is None:
                raise ValueError(f"prompt {prompt_id!r}: best-of-n needs its rewards")
            bon_rows(self.builders["bon"], samples, self.plan)
            if self.winrate:
                if self.winrates is None:
                    self.winrates = WinRateRows(self.plan, next(iter(statistics.values())).betas)
                self.winrates.add(samples)
        self.prompt_ids.append(prompt_id)
        self.statistics.append(statistics)
        self.samples += samples_held
        if len(self.prompt_ids) >= PROMPT_BATCH or self.samples >= BATCH_SAMPLES:
            self.flush()

    def flush(self) -> None:
        """Finalize the pending prompts and add their rows."""
        if not self.prompt_ids:
            return
        frontier, convergence, estimates = [], [], []
        for position, (align, evals) in enumerate(self.plan):
            # Every prefix for the convergence table; else the last two (the drift from the largest prefix below N),
            # the first without its tail: only its bias-corrected estimates are read, and no k-hat is fitted.
            chains = [list(by_align[align.name].prefixes())[None if self.convergence else -2:]
                      for by_align in self.statistics]
            if not self.convergence:
                for chain in chains:
                    if len(chain) == 2:
                        chain[0].tail = chain[0].tail[:0]
            lengths = np.array([len(chain) for chain in chains])
            estimate = finalize_many([state for chain in chains for state in chain])
            last = np.cumsum(lengths) - 1
            first = last - lengths + 1
            owner = np.repeat(np.arange(len(chains)), lengths)
            previous = np.arange(owner.size) - 1
            previous[first] = -1  # a chain's first prefix has none before it
            estimates.append((estimate, last))
            frontier.append(_estimate_block(estimate, last, np.arange(len(chains)), position, align, evals, FRONTIER_ROW,
                                            previous[last]))
            if self.convergence:
                convergence.append(_estimate_block(estimate, np.arange(owner.size), owner, position, align, evals,
                                                   CONVERGENCE_ROW, previous))
        prompt_ids = np.array(self.prompt_ids, dtype=object)
        _add_sorted(self.builders["frontier"], frontier, prompt_ids)
        if self.convergence:
            _add_sorted(self.builders["convergence"], convergence, prompt_ids)
        if self.winrates is not None:
            self.winrates.flush(self.builders["winrate"], estimates)
        self.prompt_ids, self.statistics, self.samples = [], [], 0


FRONTIER_ROW = {"n": "n", "gain": "gain", "gain_se": "gain_se", "kl": "kl", "kl_se": "kl_se", "ess": "ess",
                "gain_bc": "gain_bc", "kl_bc": "kl_bc", "gain_se_delta": "gain_se_delta", "kl_se_delta": "kl_se_delta",
                "gain_kl_cov": "gain_kl_cov", "gain_dbeta": "gain_dbeta", "kl_dbeta": "kl_dbeta", "khat": "khat",
                "body_sd": "body_sd", "reward_max": "reward_max", "top_tied": "top_tied", "log_z": "log_z",
                "khat_pooled": "khat", "reliable": "reliable"}
CONVERGENCE_ROW = {"n_samples": "n", "gain": "gain", "gain_se": "gain_se", "kl": "kl", "kl_se": "kl_se",
                   "ess": "ess", "gain_bc": "gain_bc", "kl_bc": "kl_bc", "gain_se_delta": "gain_se_delta",
                   "kl_se_delta": "kl_se_delta", "khat": "khat", "body_sd": "body_sd", "reward_max": "reward_max",
                   "top_tied": "top_tied", "log_z": "log_z", "khat_pooled": "khat", "reliable": "reliable"}
"""Row column -> :class:`limits_ray.core.tilt.TiltEstimate` field, per table (``bias_allowance`` before the gate:
0 where the row's own test passes, else infinite; ``tie_bias_at_kl``: NaN before the gate; ``gain_drift``, ``kl_drift``: ``gain_bc``, ``kl_bc`` less
those of the largest dyadic prefix below the row's N, NaN where there is none)."""
_PER_EVAL = {"gain", "gain_se", "gain_bc", "gain_se_delta", "gain_kl_cov", "gain_dbeta"}  # fields with a target-column axis


def _estimate_block(estimate: TiltEstimate, states: np.ndarray, owners: np.ndarray, align_position: int,
                    align: RewardSpec, evals: list[RewardSpec], row: dict[str, str],
                    previous: np.ndarray) -> dict[str, np.ndarray]:
    """Columns (and sort keys) of the rows of ``estimate``'s ``states``, each owned by prompt ``owners``;
    ``previous`` is each state's prefix before it (-1: none), whose bias-corrected estimates the drift
    columns subtract.

    Shapes before flattening: ``[states, evals, B]``.
    """
    shape = (states.size, len(evals), estimate.betas.shape[1])
    has_previous = (previous >= 0)[:, None]
    before = np.maximum(previous, 0)
    kl_drift = np.where(has_previous, estimate.kl_bc[states] - estimate.kl_bc[before], np.nan)
    columns = []
    for column in _eval_index(align, evals):
        block = {"beta": estimate.betas[states]}
        for name, field in row.items():
            values = getattr(estimate, field)[states]
            block[name] = values[:, :, column] if field in _PER_EVAL else np.broadcast_to(
                values.reshape(states.size, -1), (states.size, shape[2]))
        block["gain_drift"] = np.where(has_previous, estimate.gain_bc[states, :, column] - estimate.gain_bc[before, :, column],
                                       np.nan)
        block["kl_drift"] = kl_drift
        columns.append(block)
    block = {name: np.stack([part[name] for part in columns], axis=1).reshape(-1) for name in columns[0]}
    block["bias_allowance"] = np.where(block["reliable"], 0.0, np.inf)
    block["tie_bias_at_kl"] = np.full(block["bias_allowance"].shape, np.nan)  # set by the gate
    block["eval"] = np.broadcast_to(np.array([spec.name for spec in evals], dtype=object)[None, :, None], shape).reshape(-1)
    block["align"] = np.full(block["eval"].size, align.name, dtype=object)
    block["_owner"] = np.broadcast_to(owners[:, None, None], shape).reshape(-1)
    block["_align"] = np.full(block["eval"].size, align_position)
    return block


def _add_sorted(builder: TableBuilder, blocks: list[dict[str, np.ndarray]], prompt_ids: np.ndarray) -> None:
    """Add the blocks' rows in prompt-major order (stable: align, then each block's own order)."""
    merged = {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    order = np.lexsort((merged.pop("_align"), merged["_owner"]))
    owners = merged.pop("_owner")[order]
    columns = {name: values[order] for name, values in merged.items()}
    builder.add(owners.size, prompt_id=prompt_ids[owners], **columns)


def bon_rows(builder: TableBuilder, samples: PromptSamples, plan: Plan) -> None:
    """Add one prompt's best-of-n rows for n = 1, 2, 4, ... <= N, with jackknife standard errors.

    ``winrate``: best-of-n's win rate over pi0 in eval, the best-of-n estimate of the leave-one-out mid-ranks
    ``F_(-i)(e_i)`` (:mod:`limits_ray.core.winrate`); its jackknife ``winrate_se`` holds the ranks fixed.
    """
    for align, evals in plan:
        evaluated = np.stack([spec.values(samples.rewards) for spec in evals], axis=1)
        ranks = loo_midranks(evaluated) if evaluated.shape[0] > 1 else np.full(evaluated.shape, 0.5)
        result = best_of_n(align.values(samples.rewards), np.concatenate([evaluated, ranks], axis=1))
        for column, spec in enumerate(evals):
            builder.add(
                result.n.size, prompt_id=samples.prompt_id, align=align.name, eval=spec.name, n=result.n,
                reward=result.reward[:, column], gain=result.gain[:, column], kl=result.kl,
                reward_se=result.reward_se[:, column], gain_se=result.gain_se[:, column],
                winrate=result.reward[:, len(evals) + column], winrate_se=result.reward_se[:, len(evals) + column],
            )


def _empty(name: str):
    return field(default_factory=SCHEMAS[name].empty_table)


@dataclass
class ReduceResult:
    """The result tables (:data:`limits_ray.core.schemas.SCHEMAS`) in memory
    (:func:`limits_ray.storage.results.write_result` writes them, :func:`limits_ray.storage.results.load_result` reads them)."""

    frontier: pa.Table
    frontier_mean: pa.Table
    bon: pa.Table
    convergence: pa.Table
    winrate: pa.Table = _empty("winrate")
    winrate_mean: pa.Table = _empty("winrate_mean")
    bracket: pa.Table = _empty("bracket")


def finish(frontier: TableBuilder, bon: TableBuilder, convergence: TableBuilder,
           winrate: TableBuilder | None = None) -> ReduceResult:
    """Assemble the result: the cross-prompt reliability gate (:mod:`limits_ray.core.reliability`), then the
    per-prompt frontier (and win rates) averaged over prompts, and the certified bracket
    (:func:`limits_ray.core.bracket.bracket_table`)."""
    frontier_table, convergence_table = (pool_whole(builder.table(), name)
                                         for name, builder in (("frontier", frontier), ("convergence", convergence)))
    winrate_table = pool_whole(winrate.table(), "winrate") if winrate is not None else SCHEMAS["winrate"].empty_table()
    frontier_mean, bon_table = mean_frontier(frontier_table), bon.table()
    return ReduceResult(frontier_table, frontier_mean, bon_table, convergence_table, winrate_table,
                        winrate_mean(winrate_sums(winrate_table)), bracket_table(frontier_mean, bon_means(bon_sums(bon_table))))


def reduce_prompts(prompts: Iterable[PromptSamples], plan: Plan, config: AnalysisConfig) -> ReduceResult:
    """Reduce per-prompt samples to the result tables (one batch of prompts' statistics in memory at a time)."""
    betas = np.asarray(config.betas)
    builders = {name: TableBuilder(name) for name in ("frontier", "bon", "convergence", "winrate")}
    rows = PromptRows(builders, plan, config.convergence, config.best_of_n, config.winrate)
    for samples in prompts:
        rows.add(samples.prompt_id, prompt_statistics(samples, plan, betas), samples)
    rows.flush()
    return finish(builders["frontier"], builders["bon"], builders["convergence"], builders["winrate"])


def reduce_table(table: pa.Table, reward_columns: list[str], config: AnalysisConfig) -> ReduceResult:
    """Reduce a validated samples table sorted by (prompt_id, sample_idx) (see :func:`limits_ray.storage.sample_io.read_samples`)."""
    plan = config.plan(reward_columns)
    return reduce_prompts(iter_prompts(table, reward_columns), plan, config)

