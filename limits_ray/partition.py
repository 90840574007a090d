"""Prompt buckets of an input: the units the offline reducer reads one at a time.

An input whose Parquet files all lie in Hive-style ``bucket=NNNNN`` directories (the sample store's
layout, see :mod:`limits_ray.buckets`) is used as it is: each directory is one bucket and must hold
whole prompts. Any other input is first *spilled*: its rows are streamed in record batches (only
the needed columns), each row is given the bucket ``bucket_of(prompt_id, buckets)`` and written to
``<spill_dir>/bucket=NNNNN/part-<tag>-<i>.parquet``, so every bucket holds whole prompts. The bucket
count is chosen so that one bucket holds about ``bucket_rows`` rows (:func:`bucket_count`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from limits_ray.buckets import bucket_name, bucket_of
from limits_ray.io import KEY_COLUMNS, InputError, cast_samples, check_keys

__all__ = ["Bucket", "bucket_count", "input_buckets", "spill", "spilled_buckets"]

BUCKET_DIR = re.compile(r"bucket=(\d+)")
SPILL_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Bucket:
    """One bucket of prompts: its index and its Parquet files (sorted)."""

    index: int
    files: tuple[str, ...]


def bucket_count(rows: int, bucket_rows: int) -> int:
    """Buckets for ``rows`` rows so that one holds about ``bucket_rows`` of them: ``ceil(rows / bucket_rows)``."""
    if bucket_rows < 1:
        raise ValueError(f"bucket_rows must be >= 1, got {bucket_rows}")
    return max(1, math.ceil(rows / bucket_rows))


def _grouped(files: list[str]) -> list[Bucket] | None:
    by_bucket: dict[int, list[str]] = {}
    for file in files:
        match = BUCKET_DIR.fullmatch(Path(file).parent.name)
        if match is None:
            return None
        by_bucket.setdefault(int(match.group(1)), []).append(file)
    return [Bucket(index, tuple(sorted(by_bucket[index]))) for index in sorted(by_bucket)]


def input_buckets(dataset: ds.FileSystemDataset) -> list[Bucket] | None:
    """The buckets of an input already partitioned into ``bucket=NNNNN`` directories, else ``None``."""
    return _grouped(list(dataset.files))


def spilled_buckets(spill_dir: Path) -> list[Bucket]:
    """The buckets :func:`spill` wrote into ``spill_dir``, by index."""
    return _grouped([str(path) for path in sorted(Path(spill_dir).glob("bucket=*/*.parquet"))]) or []


def spill(files: list[str], columns: list[str], buckets: int, spill_dir: Path, tag: str, source: Path) -> None:
    """Stream ``files`` (key and reward ``columns`` only) into per-bucket files under ``spill_dir``.

    Keys and rewards are cast as :func:`limits_ray.io.cast_samples` does; a null key or a negative
    ``sample_idx`` raises :class:`InputError` naming ``source``. Memory: one record batch plus the
    writer's buffer of at most about ``max(buckets x 1024, 2^20)`` rows.
    """
    schema = pa.schema([
        ("prompt_id", pa.string()), ("sample_idx", pa.int64()), *[(name, pa.float64()) for name in columns],
        ("bucket", pa.string()),
    ])
    ds.write_dataset(
        _bucketed_batches(ds.dataset(files, format="parquet"), columns, buckets, source), str(spill_dir),
        schema=schema, format="parquet", partitioning=ds.partitioning(pa.schema([("bucket", pa.string())]), flavor="hive"),
        basename_template=f"part-{tag}-{{i}}.parquet", existing_data_behavior="overwrite_or_ignore",
        max_partitions=max(buckets, 1024), min_rows_per_group=max(1024, min(2**20 // buckets, 65_536)),
    )


def _bucketed_batches(dataset: ds.Dataset, columns: list[str], buckets: int, source: Path) -> Iterator[pa.RecordBatch]:
    names = pa.array([bucket_name(b).split("=", 1)[1] for b in range(buckets)], pa.string())
    for batch in _batches(dataset, [*KEY_COLUMNS, *columns], source):
        table = cast_samples(pa.Table.from_batches([batch]), columns)
        check_keys(table, source)
        encoded = pc.dictionary_encode(table["prompt_id"]).combine_chunks()
        codes = bucket_of(encoded.dictionary.to_pylist(), buckets)[encoded.indices.to_numpy()]
        yield from table.append_column("bucket", names.take(pa.array(codes, pa.int64()))).to_batches()


def _batches(dataset: ds.Dataset, columns: list[str], source: Path) -> Iterator[pa.RecordBatch]:
    batches = dataset.scanner(columns=columns, batch_size=SPILL_BATCH_ROWS).to_batches()
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"--samples {source}: a file could not be read ({error}); remove or rewrite it") from None
        if batch.num_rows:
            yield batch

