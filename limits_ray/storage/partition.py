"""Prompt buckets of an input: the units the offline reducer reads one at a time.

An input whose Parquet files all lie in Hive-style ``bucket=NNNNN`` directories (the sample store's
layout, see :mod:`limits_ray.storage.buckets`) is used as it is: each directory is one bucket and must hold
whole prompts. Any other input is first *spilled*: its rows are streamed in record batches (only
the needed columns), each row is given the bucket ``bucket_of(prompt_id, buckets)`` and written to
``<spill_dir>/bucket=NNNNN/part-<tag>-<i>.parquet``, so every bucket holds whole prompts. The bucket
count is chosen so that one bucket holds about ``bucket_rows`` rows (:func:`bucket_count`).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from limits_ray.core.errors import InputError
from limits_ray.core.samples import KEY_COLUMNS
from limits_ray.storage.buckets import bucket_name, bucket_of
from limits_ray.storage.sample_io import cast_samples, check_keys

__all__ = ["Bucket", "bucket_count", "input_buckets", "spill", "spilled_buckets"]

BUCKET_DIR = re.compile(r"bucket=(\d+)")
SPILL_BATCH_ROWS = 65_536
MAX_OPEN_FILES = 256
STREAMING = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False))
"""Parquet read one row group at a time (pre-buffering would read a whole file ahead)."""


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

    Keys and rewards are cast as :func:`limits_ray.storage.sample_io.cast_samples` does; a null key or a negative
    ``sample_idx`` raises :class:`InputError` naming ``source``. Memory: one record batch (and the
    input row group it comes from) plus the buffered rows, at most ``buckets x`` :func:`group_rows`.
    """
    writer = _SpillWriter(Path(spill_dir), tag, group_rows(buckets))
    try:
        for batch in _batches(ds.dataset(files, format=STREAMING), [*KEY_COLUMNS, *columns], source):
            table = cast_samples(pa.Table.from_batches([batch]), columns)
            check_keys(table, source)
            encoded = pc.dictionary_encode(table["prompt_id"]).combine_chunks()
            codes = bucket_of(encoded.dictionary.to_pylist(), buckets)[encoded.indices.to_numpy()]
            order = np.argsort(codes, kind="stable")
            table, codes = table.take(pa.array(order)), codes[order]
            present, starts = np.unique(codes, return_index=True)
            for bucket, start, stop in zip(present, starts, [*starts[1:], codes.size]):
                writer.add(int(bucket), table.slice(int(start), int(stop - start)))
    finally:
        writer.close()


def group_rows(buckets: int) -> int:
    """Rows a spilled bucket buffers before writing them as one row group: ``2^18 / buckets`` in [1024, 16384]."""
    return max(1024, min(2**18 // buckets, 16_384))


class _SpillWriter:
    """Per-bucket row buffers written as row groups; at most ``MAX_OPEN_FILES`` files open at once."""

    def __init__(self, spill_dir: Path, tag: str, rows: int) -> None:
        self.spill_dir, self.tag, self.rows = spill_dir, tag, rows
        self.buffers: dict[int, list[pa.Table]] = {}
        self.writers: OrderedDict[int, pq.ParquetWriter] = OrderedDict()
        self.files: dict[int, int] = {}

    def add(self, bucket: int, rows: pa.Table) -> None:
        buffer = self.buffers.setdefault(bucket, [])
        buffer.append(rows)
        if sum(part.num_rows for part in buffer) >= self.rows:
            self._write(bucket)

    def _write(self, bucket: int) -> None:
        table = pa.concat_tables(self.buffers.pop(bucket))
        if bucket in self.writers:
            self.writers.move_to_end(bucket)
        else:
            if len(self.writers) >= MAX_OPEN_FILES:
                self.writers.popitem(last=False)[1].close()
            number = self.files[bucket] = self.files.get(bucket, -1) + 1
            path = self.spill_dir / bucket_name(bucket) / f"part-{self.tag}-{number:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers[bucket] = pq.ParquetWriter(path, table.schema)
        self.writers[bucket].write_table(table)

    def close(self) -> None:
        try:
            for bucket in sorted(self.buffers):
                self._write(bucket)
        finally:
            for writer in self.writers.values():
                writer.close()


def _batches(dataset: ds.Dataset, columns: list[str], source: Path) -> Iterator[pa.RecordBatch]:
    batches = dataset.scanner(columns=columns, batch_size=SPILL_BATCH_ROWS, batch_readahead=1, fragment_readahead=1).to_batches()
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"--samples {source}: a file could not be read ({error}); remove or rewrite it") from None
        if batch.num_rows:
            yield batch

