"""``limits-ray reduce`` in bounded memory: one bucket of prompts at a time, locally or as Ray tasks.

The input (a Parquet file or directory, any row order) is streamed, never read whole. Its buckets
(:mod:`limits_ray.storage.partition`: the ``bucket=NNNNN`` directories of a sample store, else a spill into
about ``bucket_rows`` rows per bucket) are reduced one at a time: read, validated and sorted as
:func:`limits_ray.storage.sample_io.read_samples` does, then reduced prompt by prompt with the per-prompt functions
of :mod:`limits_ray.core.tables`. Each bucket writes its shard of each per-prompt table (those of
``frontier``, ``convergence`` and ``winrate`` under ``ungated/``) and returns their small per-cell k-hat
sums (:func:`limits_ray.core.reliability.khat_sums`) and best-of-n's per-(align, eval, n) sums
(:func:`limits_ray.core.bracket.bon_sums`); once they are added up, the job's second pass
(:func:`limits_ray.pipeline.bucket_tasks.gate_shards`) gates those shards a batch of whole prompts at
a time and returns the per-(align, eval, beta) sums (:func:`limits_ray.core.frontier.frontier_sums`,
:func:`limits_ray.core.winrate.winrate_sums`) that the caller adds into ``frontier_mean`` and
``winrate_mean``; the ``bracket`` comes from ``frontier_mean`` and the best-of-n means
(:func:`limits_ray.core.bracket.bracket_table`). Peak memory is set by the largest bucket, not by the input.
:func:`reduce_samples` is the same reduce of an input that fits in memory, all at once.

Output in ``out_dir``: ``frontier.parquet``, ``bon.parquet``, ``convergence.parquet`` and ``winrate.parquet``
are directories of shards ``part-NNNNN.parquet`` (one per bucket; ``pq.read_table`` and pandas read a
directory like a file), ``frontier_mean.parquet``, ``winrate_mean.parquet`` and ``bracket.parquet`` single files. Row order is deterministic: by
prompt_id within a shard, shards by bucket index (not one global prompt_id order). Everything is
written into ``.<out_dir name>.partial`` next to ``out_dir`` (the spill too) and moved into place at
the end, so a failed reduce leaves earlier results as they were.

With ``use_ray`` every bucket (and each part of the spill) is a Ray task, at most ``max_in_flight``
at once; the tables are identical to the local ones. The input and ``out_dir`` must then be on
storage that every node sees.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.bracket import bon_means, bon_sums, bracket_table
from limits_ray.core.errors import InputError
from limits_ray.core.frontier import mean_from_sums, merge_sums
from limits_ray.core.reliability import POOLED_TABLES, khat_sums, merge_khat_sums
from limits_ray.core.samples import KEY_COLUMNS, iter_prompts
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tables import PromptRows, ReduceResult, TableBuilder, prompt_statistics, reduce_table
from limits_ray.core.winrate import winrate_mean
from limits_ray.pipeline.bucket_tasks import gate_shards, shard
from limits_ray.pipeline.cluster import init_ray, map_tasks
from limits_ray.storage.location import local_location
from limits_ray.storage.partition import Bucket, bucket_count, input_buckets, spill, spilled_buckets
from limits_ray.storage.sample_io import open_samples, read_columns, read_samples, validate_samples, write_table

__all__ = [
    "BucketResult", "DEFAULT_BUCKET_ROWS", "OfflineResult", "PER_PROMPT", "reduce_bucket", "reduce_dataset", "reduce_samples",
]

DEFAULT_BUCKET_ROWS = 1_000_000
"""Rows per spilled bucket: the reducer holds one bucket (about 40 bytes a row per reward column) at a time."""

PER_PROMPT = ("frontier", "bon", "convergence", "winrate")
FLUSH_ROWS = 200_000
T = TypeVar("T")


@dataclass
class BucketResult:
    """What one bucket returns: its counts, k-hat sums per pooled table, best-of-n sums
    (:func:`limits_ray.core.bracket.bon_sums`) and (when asked) its prompts' 64-bit sha1 keys."""

    bucket: int
    rows: int
    prompts: int
    khat_sums: dict[str, pa.Table]
    prompt_keys: np.ndarray
    bon_sums: pa.Table | None = None


@dataclass
class OfflineResult:
    """What :func:`reduce_dataset` did: the paths written, counts, and the frontier_mean table.

    ``partitioned``: the input's own ``bucket=`` directories were the buckets; ``spilled``: the input
    was spilled into buckets (else it was small enough to be one bucket).
    """

    paths: list[Path]
    rows: int
    prompts: int
    buckets: int
    partitioned: bool
    spilled: bool
    frontier_mean: pa.Table


class _ShardWriter:
    """Writes one bucket's shard of each per-prompt table, flushing the row builders as they fill.

    The pooled tables go to ``ungated/`` (see the module doc), with their k-hat sums kept.
    """

    def __init__(self, staging: Path, bucket: int) -> None:
        self.builders = {name: TableBuilder(name) for name in PER_PROMPT}
        self.writers = {}
        for name in PER_PROMPT:
            path = _shard_path(staging, name, bucket, ungated=name in POOLED_TABLES)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers[name] = pq.ParquetWriter(path, SCHEMAS[name])
        self.sums = {name: [khat_sums(SCHEMAS[name].empty_table(), name)] for name in POOLED_TABLES}
        self.bon_sums = [bon_sums(SCHEMAS["bon"].empty_table())]
        self.rows, self.counted = 0, dict.fromkeys(PER_PROMPT, 0)

    def maybe_flush(self) -> None:
        """Flush once the builders hold ``FLUSH_ROWS`` rows (counting only the blocks added since the last call)."""
        for name, builder in self.builders.items():
            first = builder.schema.names[0]
            self.rows += sum(len(block[first]) for block in builder.blocks[self.counted[name]:])
            self.counted[name] = len(builder.blocks)
        if self.rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        for name, builder in self.builders.items():
            table = builder.table()
            if table.num_rows:
                self.writers[name].write_table(table)
                if name in self.sums:
                    self.sums[name].append(khat_sums(table, name))
                if name == "bon":
                    self.bon_sums.append(bon_sums(table))  # one row per (prompt, n): any cut of the rows adds up
            self.builders[name] = TableBuilder(name)
        self.rows, self.counted = 0, dict.fromkeys(PER_PROMPT, 0)

    def close(self) -> dict[str, pa.Table]:
        self.flush()
        for writer in self.writers.values():
            writer.close()
        return {name: merge_khat_sums(sums, name) for name, sums in self.sums.items()}


def _shard_path(staging: Path, name: str, bucket: int, ungated: bool = False) -> Path:
    return shard(local_location(staging / "ungated" if ungated else staging), name, bucket).local_path


def _gate_bucket(staging: str, pooled: dict[str, pa.Table], bucket: int) -> dict[str, pa.Table]:
    """The second pass for one bucket (:func:`limits_ray.pipeline.bucket_tasks.gate_shards`); returns its frontier
    and win-rate sums by table name."""
    location = local_location(staging)
    return gate_shards(location.join("ungated"), location, bucket, pooled)[0]


def prompt_keys(prompt_ids: Sequence[str]) -> np.ndarray:
    """64-bit keys of prompt ids: the first 8 bytes of sha1 (as :func:`limits_ray.storage.buckets.bucket_of` hashes)."""
    return np.array([int.from_bytes(hashlib.sha1(p.encode("utf-8")).digest()[:8], "big") for p in prompt_ids], np.uint64)


def reduce_bucket(columns: list[str], config: AnalysisConfig, source: str, staging: str, keys: bool,
                  bucket: Bucket) -> BucketResult:
    """Read, validate and reduce one bucket; writes its shards into ``staging`` (see the module doc).

    ``source`` names the input in error messages; ``keys`` asks for the prompts' 64-bit keys.
    """
    table = read_columns(ds.dataset(list(bucket.files), format="parquet"), [*KEY_COLUMNS, *columns], Path(source))
    table = validate_samples(table, columns, Path(source))
    plan, betas = config.plan(columns), np.asarray(config.betas)
    shards = _ShardWriter(Path(staging), bucket.index)
    rows = PromptRows(shards.builders, plan, config.convergence, config.best_of_n, config.winrate)
    prompt_ids = []
    for samples in iter_prompts(table, columns):
        rows.add(samples.prompt_id, prompt_statistics(samples, plan, betas), samples)
        prompt_ids.append(samples.prompt_id)
        shards.maybe_flush()
    rows.flush()
    sums = shards.close()
    return BucketResult(bucket.index, table.num_rows, len(prompt_ids), sums,
                        prompt_keys(prompt_ids) if keys else np.empty(0, np.uint64), merge_sums(shards.bon_sums))


def _spill_part(columns: list[str], buckets: int, spill_dir: str, source: str, files: list[str], tag: str) -> None:
    spill(files, columns, buckets, Path(spill_dir), tag, Path(source))


def _ray_slots(max_in_flight: int | None) -> int:
    """Join ``RAY_ADDRESS``'s cluster or start a local Ray (:func:`limits_ray.pipeline.cluster.init_ray`); tasks
    in flight: ``max_in_flight`` or the cluster's CPUs."""
    import ray

    init_ray()
    return max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _map(function: Callable[..., T], calls: list[tuple], slots: int | None, shared: tuple = ()) -> list[T]:
    """``[function(*shared, *args) for args in calls]``: in-process when ``slots`` is None, else as Ray tasks,
    ``slots`` at once (:func:`limits_ray.pipeline.cluster.map_tasks`)."""
    if slots is None:
        return [function(*shared, *args) for args in calls]
    return map_tasks(function, calls, shared=shared, in_flight=slots)


def _check_whole_prompts(results: list[BucketResult], source: Path) -> None:
    keys = np.concatenate([r.prompt_keys for r in results])
    owners = np.concatenate([np.full(r.prompt_keys.size, r.bucket) for r in results])
    order = np.argsort(keys, kind="stable")
    repeated = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if repeated.size:
        first, second = owners[order][repeated[0]], owners[order][repeated[0] + 1]
        raise InputError(
            f"--samples {source}: {repeated.size} prompt(s) have rows in more than one bucket directory, e.g. in "
            f"bucket={first:05d} and bucket={second:05d}; each bucket= directory must hold whole prompts "
            "(partition by limits_ray.storage.buckets.bucket_of), or move the files out of the bucket= directories"
        )


def _publish(staging: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in (*PER_PROMPT, "frontier_mean", "winrate_mean", "bracket"):
        source, target = staging / f"{name}.parquet", out_dir / f"{name}.parquet"
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists() and source.is_dir():
            target.unlink()  # a single-file table of an earlier run
        os.replace(source, target)
        paths.append(target)
    return paths


def reduce_dataset(samples_path: str | Path, out_dir: str | Path, config: AnalysisConfig, use_ray: bool = False,
                   bucket_rows: int = DEFAULT_BUCKET_ROWS, max_in_flight: int | None = None) -> OfflineResult:
    """Reduce scored samples into ``out_dir`` one bucket at a time (see the module doc).

    Raises :class:`InputError` as :func:`limits_ray.storage.sample_io.read_samples` does (NaN/inf naming prompt and
    column, duplicates, negative sample_idx, missing columns, empty input), and for a
    ``bucket=`` directory layout whose directories do not hold whole prompts.
    """
    source, out_dir = Path(samples_path), Path(out_dir)
    dataset, columns = open_samples(source, config.rewards)
    config.plan(columns)  # a bad --align/--eval fails before anything is written
    try:
        rows = dataset.count_rows()
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"--samples {source}: a file could not be read ({error}); remove or rewrite it") from None
    if rows == 0:
        raise InputError(f"--samples {source}: no rows; nothing to reduce")
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        slots = _ray_slots(max_in_flight) if use_ray else None
        buckets = input_buckets(dataset)
        partitioned, count = buckets is not None, bucket_count(rows, bucket_rows)
        if buckets is None:
            buckets = _spill(list(dataset.files), columns, count, staging, source, slots)
        results = _map(reduce_bucket, [(bucket,) for bucket in buckets], slots,
                       shared=(columns, config, str(source), str(staging), partitioned))
        if partitioned:
            _check_whole_prompts(results, source)
        pooled = {name: merge_khat_sums([r.khat_sums[name] for r in results], name) for name in POOLED_TABLES}
        sums = _map(_gate_bucket, [(r.bucket,) for r in results], slots, shared=(str(staging), pooled))
        frontier_mean = mean_from_sums(merge_sums([part["frontier"] for part in sums]))
        write_table(frontier_mean, staging / "frontier_mean.parquet")
        write_table(winrate_mean([part["winrate"] for part in sums]), staging / "winrate_mean.parquet")
        write_table(bracket_table(frontier_mean, bon_means([r.bon_sums for r in results])), staging / "bracket.parquet")
        paths = _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return OfflineResult(paths, sum(r.rows for r in results), sum(r.prompts for r in results), len(results),
                         partitioned, not partitioned and count > 1, frontier_mean)


def _spill(files: list[str], columns: list[str], buckets: int, staging: Path, source: Path,
           slots: int | None) -> list[Bucket]:
    """Spill into ``buckets`` buckets (one Ray task per group of input files), or use the input as one bucket."""
    if buckets == 1:
        return [Bucket(0, tuple(files))]
    spill_dir = staging / "spill"
    parts = min(len(files), slots or 1)
    _map(_spill_part, [(files[k::parts], f"{k:05d}") for k in range(parts)], slots,
         shared=(columns, buckets, str(spill_dir), str(source)))
    return spilled_buckets(spill_dir)


def reduce_samples(samples_path: str | Path, config: AnalysisConfig) -> ReduceResult:
    """Read, validate and reduce a Parquet file or directory of scored samples, all in memory.

    For inputs that fit in memory (studies, tests); ``limits-ray reduce`` streams the input bucket by
    bucket instead (:func:`limits_ray.runs.reduce.reduce_dataset`), with the same values.
    """
    table, reward_columns = read_samples(samples_path, config.rewards)
    return reduce_table(table, reward_columns, config)
