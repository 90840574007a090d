"""Per-bucket work of a run, off the driver: what to generate, and the per-prompt result tables.

A run's prompts are split by :func:`limits_ray.storage.buckets.bucket_of`. For each bucket, one task

- :func:`prepare_bucket`: brings the bucket's merged statistics up to date with the sample parts
  written since the last compaction (:func:`compact`), and writes the rounds this run still has to
  generate (``todo``) for the bucket's prompts;
- :func:`finalize_bucket`: compacts again (now with this run's rounds), writes the bucket's shard of
  ``bon`` and, under ``work/ungated``, of ``frontier``, ``convergence`` and ``winrate`` before the
  cross-prompt reliability gate, and returns their per-cell k-hat sums
  (:func:`limits_ray.core.reliability.khat_sums`) and best-of-n's per-(align, eval, n) sums
  (:func:`limits_ray.core.bracket.bon_sums`, for the bracket);
- :func:`gate_bucket`: once the driver has added every bucket's k-hat sums, gates the bucket's
  ``frontier``, ``convergence`` and ``winrate`` shards with them, writes them into the output and returns
  only per-(align, eval, beta) sums of ``frontier`` and ``winrate`` and a few prompts' rows for the figures.

The last two are the two passes of the bucketed reduce, which the offline ``limits-ray reduce``
(:mod:`limits_ray.runs.reduce`) shares: its first pass reads input files instead of the store, and its
second is the same :func:`gate_shards`. Between the passes the driver adds the buckets' k-hat sums
(:func:`limits_ray.core.reliability.merge_khat_sums`); after the second, their frontier and win-rate sums
(:func:`limits_ray.core.frontier.mean_from_sums`, :func:`limits_ray.core.winrate.winrate_mean`). Each task reads one bucket; the driver sees counts
and sums whose size does not grow with samples or prompts. The functions are plain Python, their
shared arguments first and the bucket last: the job runs them as Ray tasks
(:func:`limits_ray.pipeline.cluster.map_tasks`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from limits_ray.core.analysis import Plan
from limits_ray.core.bracket import bon_sums
from limits_ray.core.frontier import frontier_sums, merge_sums
from limits_ray.core.reliability import POOLED_TABLES, apply_pooled, khat_sums
from limits_ray.core.samples import PromptSamples, iter_prompts
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tables import PromptRows, TableBuilder, prompt_statistics
from limits_ray.core.winrate import winrate_sums
from limits_ray.storage.buckets import bucket_name
from limits_ray.storage.location import Location
from limits_ray.storage.sample_store import MergedBucket, SampleStore

__all__ = [
    "BucketContext", "BucketSummary", "GATE_BATCH_ROWS", "PROMPTS_SCHEMA", "TODO_SCHEMA", "bucket_round_counts", "compact",
    "finalize_bucket", "gate_bucket", "gate_shards", "prepare_bucket", "round_statistics", "shard", "whole_prompt_batches",
]

PROMPT_FIELDS = [("prompt_id", pa.string()), ("prompt", pa.string()), ("prompt_text", pa.string())]
PROMPTS_SCHEMA = pa.schema([*PROMPT_FIELDS, ("start", pa.int64()), ("target", pa.int64())])
TODO_SCHEMA = pa.schema([*PROMPT_FIELDS, ("round", pa.int64())])
PLOT_PROMPTS = 8  # prompts per bucket whose rows come back for the figures (the driver keeps at most 200)
GATE_BATCH_ROWS = 200_000
"""Rows :func:`gate_shards` reads, gates and writes at once (whole prompts)."""


@dataclass(frozen=True)
class BucketContext:
    """What every bucket task of one run needs (picklable).

    Attributes:
        store: the sample store.
        analysis: the analysis key naming the store's statistics tree (see :func:`limits_ray.runs.identity.analysis_key`).
        plan: alignment and evaluation rewards.
        betas: the beta grid.
        rewards: the reward columns.
        work: the run's scratch location (``prompts/`` and ``todo/`` tables).
    """

    store: SampleStore
    analysis: str
    plan: Plan
    betas: np.ndarray
    rewards: list[str]
    work: Location

    def prompts(self, bucket: int) -> pa.Table:
        """This run's prompts of ``bucket``: prompt_id, prompt, and its rounds ``start .. target - 1``."""
        return self.work.join("prompts", f"{bucket_name(bucket)}.parquet").read_table()


@dataclass
class BucketSummary:
    """What a finalized bucket tells the driver: small, whatever the bucket's size.

    ``khat_sums``: per pooled table (:data:`limits_ray.core.reliability.POOLED_TABLES`), its per-cell
    k-hat sums; ``bon_sums``: best-of-n's per-(align, eval, n) sums (:func:`limits_ray.core.bracket.bon_sums`);
    ``sums``, ``winrate_sums`` and ``plot_rows`` are filled in by :func:`gate_bucket`.
    """

    bucket: int
    prompts: int
    samples: int
    khat_sums: dict[str, pa.Table]
    sums: pa.Table | None = None
    bon_sums: pa.Table | None = None
    winrate_sums: pa.Table | None = None
    plot_rows: dict[str, pa.Table] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    seconds: float = 0.0


def round_statistics(samples: pa.Table, plan: Plan, betas: np.ndarray, rewards: list[str]) -> Iterator[tuple[str, int, dict]]:
    """``(prompt_id, round, statistics)`` for every round of scored samples (keys and reward columns)."""
    if samples.num_rows == 0:
        return
    ordered = samples.sort_by([("prompt_id", "ascending"), ("round", "ascending"), ("sample_idx", "ascending")])
    for prompt in iter_prompts(ordered, rewards, extra=("round",)):
        rounds = prompt.extra["round"]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(rounds)) + 1, [rounds.size]])
        for start, stop in zip(starts[:-1], starts[1:]):
            round_samples = PromptSamples(prompt.prompt_id, prompt.sample_idx[start:stop],
                                          {name: values[start:stop] for name, values in prompt.rewards.items()})
            yield prompt.prompt_id, int(rounds[start]), prompt_statistics(round_samples, plan, betas)


def compact(context: BucketContext, bucket: int) -> tuple[MergedBucket, list[str]]:
    """Merge the sample parts written since the bucket's last compaction; returns it and the parts set aside.

    Each new part's rewards are read and turned into per-round statistics (a round already merged,
    written again by a retried batch, is skipped). A part that cannot be read is copied to
    ``corrupt/`` and deleted: its rounds are generated again. Costs O(new samples + prompts of the
    bucket), not O(stored samples).
    """
    store = context.store
    merged = store.read_merged(context.analysis, bucket)
    corrupt = []
    new_parts = {key: part for key, part in store.sample_parts(bucket).items() if key not in merged.parts}
    for key, part in sorted(new_parts.items()):
        samples = store.read_part(part, context.rewards)
        if samples is None:
            corrupt.append(store.set_aside(part).uri)
            continue
        fresh = _unmerged_rounds(samples, merged)
        for prompt_id, round_index, statistics in round_statistics(fresh, context.plan, context.betas, context.rewards):
            merged.add(prompt_id, round_index, statistics)
        merged.parts.add(key)
    if new_parts:
        store.write_merged(context.analysis, bucket, merged)
    return merged, corrupt


def _unmerged_rounds(samples: pa.Table, merged: MergedBucket) -> pa.Table:
    """The rows of ``samples`` whose (prompt_id, round) is not merged yet."""
    keys = zip(samples["prompt_id"].to_pylist(), samples["round"].to_pylist())
    keep = [round_index not in merged.rounds.get(prompt_id, ()) for prompt_id, round_index in keys]
    return samples if all(keep) else samples.filter(pa.array(keep))


def prepare_bucket(context: BucketContext, skip: frozenset[tuple[str, int]], bucket: int) -> dict[str, int | list[str]]:
    """Compact the bucket and write this run's missing rounds to ``todo/``, except the (prompt_id, round)
    pairs in ``skip`` (rounds this run has quarantined); returns counts.

    Returns ``{"todo": rounds to generate, "stored": rounds of this run already stored, "corrupt": [...],
    "seconds": busy time}``.
    """
    started = time.perf_counter()
    merged, corrupt = compact(context, bucket)
    prompts = context.prompts(bucket)
    todo: dict[str, list] = {name: [] for name in TODO_SCHEMA.names}
    stored = 0
    for row in prompts.to_pylist():
        have = merged.rounds.get(row["prompt_id"], set())
        for round_index in range(row["start"], row["target"]):
            if round_index in have:
                stored += 1
            elif (row["prompt_id"], round_index) not in skip:
                for name, _ in PROMPT_FIELDS:
                    todo[name].append(row[name])
                todo["round"].append(round_index)
    if todo["round"]:
        context.work.join("todo", f"{bucket_name(bucket)}.parquet").write_table(pa.table(todo, schema=TODO_SCHEMA))
    return {"todo": len(todo["round"]), "stored": stored, "corrupt": corrupt, "seconds": time.perf_counter() - started}


def bucket_round_counts(context: BucketContext, bucket: int) -> dict[str, int]:
    """Per prompt of the bucket: its stored rounds (largest round + 1), after compaction."""
    merged, _ = compact(context, bucket)
    return {prompt_id: max(rounds) + 1 for prompt_id, rounds in merged.rounds.items() if rounds}


def _prompt_statistics(merged: MergedBucket, samples: dict[str, PromptSamples], prompt_id: str, rounds: range,
                       context: BucketContext):
    """The statistics of one prompt's ``rounds`` (all stored: see :func:`finalize_bucket`)."""
    if merged.rounds[prompt_id] == set(rounds):
        return merged.statistics[prompt_id]
    # The store holds other rounds of this prompt too: recompute from the stored rewards.
    prompt = samples[prompt_id]
    chosen = (prompt.extra["round"] >= rounds.start) & (prompt.extra["round"] < rounds.stop)
    return prompt_statistics(prompt.subset(chosen), context.plan, context.betas)


def _bucket_samples(context: BucketContext, bucket: int, prompt_ids: set[str]) -> dict[str, PromptSamples]:
    if not prompt_ids:
        return {}
    table = context.store.bucket_rounds(bucket, context.rewards, prompt_ids)
    table = table.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
    if table.num_rows == 0:
        return {}
    return {prompt.prompt_id: prompt for prompt in iter_prompts(table, context.rewards, extra=("round",))}


def shard(location: Location, name: str, bucket: int) -> Location:
    """Bucket ``bucket``'s shard of table ``name`` in the results (or scratch) directory ``location``."""
    return location.join(f"{name}.parquet", f"part-{bucket:05d}.parquet")


def _write_shards(output: Location, bucket: int, tables: dict[str, pa.Table]) -> None:
    for name, table in tables.items():
        if table.num_rows:
            shard(output, name, bucket).write_table(table)


def _plot_rows(table: pa.Table, prompt_ids: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["prompt_id"], pa.array(prompt_ids, pa.string())))


def finalize_bucket(context: BucketContext, output: Location, skip: set[str], best_of_n: bool, convergence: bool,
                    winrate: bool, bucket: int) -> BucketSummary:
    """Write the bucket's shard of ``bon`` into ``output`` and those of the pooled tables into ``work/ungated``
    (:func:`gate_bucket` finishes them); returns their k-hat sums and counts.

    Each prompt's results come from its rounds ``start .. target - 1`` (usually every stored round:
    then from the merged statistics; else recomputed from the stored rewards). Prompts in ``skip``
    (quarantined by this run) and prompts missing one of their rounds are left out (the latter are
    listed as ``incomplete``). Best-of-n reads the bucket's stored rewards, one bucket in memory at a time.
    """
    started = time.perf_counter()
    merged, corrupt = compact(context, bucket)
    prompts = context.prompts(bucket)
    wanted = {
        p: range(int(start), int(stop)) for p, start, stop in zip(
            prompts["prompt_id"].to_pylist(), prompts["start"].to_pylist(), prompts["target"].to_pylist())
        if p not in skip
    }
    complete = {p: rounds for p, rounds in wanted.items() if len(rounds) and set(rounds) <= merged.rounds.get(p, set())}
    needs_samples = {p for p, rounds in complete.items() if best_of_n or merged.rounds[p] != set(rounds)}
    samples = _bucket_samples(context, bucket, needs_samples)
    builders = {name: TableBuilder(name) for name in ("frontier", "convergence", "bon", "winrate")}
    rows = PromptRows(builders, context.plan, convergence, best_of_n, winrate)
    total = 0
    for prompt_id in sorted(complete):
        rounds = complete[prompt_id]
        statistics = _prompt_statistics(merged, samples, prompt_id, rounds, context)
        total += next(iter(statistics.values())).n
        chosen = None
        if best_of_n:
            prompt = samples[prompt_id]
            chosen = prompt.subset((prompt.extra["round"] >= rounds.start) & (prompt.extra["round"] < rounds.stop))
        rows.add(prompt_id, statistics, chosen)
    rows.flush()
    tables = {name: builder.table() for name, builder in builders.items()}
    ungated = {name: tables.pop(name) for name in POOLED_TABLES}
    _write_shards(context.work.join("ungated"), bucket, ungated)  # gate_shards finishes them
    _write_shards(output, bucket, tables)
    shown = sorted(complete)[:PLOT_PROMPTS]
    return BucketSummary(
        bucket=bucket, prompts=len(complete), samples=total,
        khat_sums={name: khat_sums(table, name) for name, table in ungated.items()}, bon_sums=bon_sums(tables["bon"]),
        plot_rows={name: _plot_rows(table, shown) for name, table in tables.items()},
        incomplete=sorted(set(wanted) - set(complete)), corrupt=corrupt, seconds=time.perf_counter() - started,
    )


def whole_prompt_batches(source: pq.ParquetFile, schema: pa.Schema, rows: int | None = None) -> Iterator[pa.Table]:
    """``source``'s rows (grouped by prompt) about ``rows`` (default :data:`GATE_BATCH_ROWS`) at a time, each
    table ending with a prompt's last row; a file that fits in one batch comes as one table."""
    carried, ready = schema.empty_table(), None
    for batch in source.iter_batches(batch_size=rows or GATE_BATCH_ROWS):
        table = pa.concat_tables([carried, pa.Table.from_batches([batch], schema)])
        ids = table["prompt_id"]
        keep = table.num_rows - int(pc.sum(pc.equal(ids, ids[table.num_rows - 1])).as_py())  # the last prompt may go on
        carried = table.slice(keep)
        if keep:
            if ready is not None:
                yield ready
            ready = table.slice(0, keep)
    last = carried if ready is None else pa.concat_tables([ready, carried])
    if last.num_rows:
        yield last


def gate_shards(ungated: Location, output: Location, bucket: int, pooled: dict[str, pa.Table],
                plot_prompts: int = 0) -> tuple[dict[str, pa.Table], dict[str, pa.Table]]:
    """The second pass of the bucketed reduce, for one bucket: gate its shard of each pooled table under
    ``ungated`` with the merged k-hat sums ``pooled`` of every bucket (:func:`limits_ray.core.reliability.apply_pooled`)
    into its shard under ``output``, whole prompts about :data:`GATE_BATCH_ROWS` rows at a time.

    Returns the per-(align, eval, beta) sums of the gated rows of ``frontier`` (:func:`limits_ray.core.frontier.frontier_sums`)
    and ``winrate`` (:func:`limits_ray.core.winrate.winrate_sums`), merged over the batches, by table name, and,
    per pooled table, the gated rows of the bucket's first ``plot_prompts`` prompts. The ungated shards
    stay (the caller removes its scratch directory), so a retried task gates them again and returns the
    same. Used by the job (:func:`gate_bucket`) and by the offline
    reduce (:mod:`limits_ray.runs.reduce`).
    """
    sums = {"frontier": [frontier_sums(SCHEMAS["frontier"].empty_table())],
            "winrate": [winrate_sums(SCHEMAS["winrate"].empty_table())]}
    shown: list[str] = []
    plot_rows: dict[str, pa.Table] = {}
    for name in POOLED_TABLES:
        source = shard(ungated, name, bucket)
        parts = []
        if source.exists():
            with source.parquet_file() as parquet, shard(output, name, bucket).table_writer(SCHEMAS[name]) as writer:
                for rows in whole_prompt_batches(parquet, SCHEMAS[name]):
                    gated = apply_pooled(rows, pooled[name], name)
                    writer.write_table(gated)
                    if name == "winrate":
                        sums[name].append(winrate_sums(gated))
                    if name == "frontier":
                        sums[name].append(frontier_sums(gated))  # whole prompts: every (align, eval, beta) group
                        shown += [p for p in dict.fromkeys(gated["prompt_id"].to_pylist()) if p not in shown][:plot_prompts - len(shown)]
                    if shown:
                        parts.append(_plot_rows(gated, shown))
        plot_rows[name] = pa.concat_tables(parts) if parts else SCHEMAS[name].empty_table()
    return {name: merge_sums(parts) for name, parts in sums.items()}, plot_rows


def gate_bucket(context: BucketContext, output: Location, pooled: dict[str, pa.Table], summary: BucketSummary) -> BucketSummary:
    """The job's second pass for one bucket (:func:`gate_shards` of its ``work/ungated`` shards into ``output``).

    Returns ``summary`` with the frontier's and the win rates' per-(align, eval, beta) sums and the plot rows
    of the bucket's first :data:`PLOT_PROMPTS` prompts.
    """
    started = time.perf_counter()
    sums, plot_rows = gate_shards(context.work.join("ungated"), output, summary.bucket, pooled, PLOT_PROMPTS)
    return dataclasses.replace(summary, sums=sums["frontier"], winrate_sums=sums["winrate"], plot_rows={**summary.plot_rows, **plot_rows},
                               seconds=summary.seconds + time.perf_counter() - started)
