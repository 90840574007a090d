"""The sample store: every scored sample as Parquet, one file per batch of complete rounds.

Layout of a store directory::

    manifest.json          what produced the samples (models, sampling, reward models)
    samples/part-<key>.parquet

Each file holds whole rounds (all ``n`` samples of a (prompt_id, round)), written atomically and
named by a hash of the rounds it holds, so a retried batch rewrites the same file and a reader
never sees half a round. ``limits-ray reduce --samples <store>/samples`` recomputes every result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from limits_ray.io import write_table
from limits_ray.rounds import per_round, per_sample, round_lengths

__all__ = ["SampleStore", "StoreMismatchError", "flatten_rounds"]

STORED_ROUND_COLUMNS = ("prompt_id", "round", "seed")
STORED_SAMPLE_COLUMNS = ("sample_idx", "response_tokens", "logprob", "finish_reason")


class StoreMismatchError(ValueError):
    """The store was written by a different model, sampling setup or reward model."""


def flatten_rounds(batch: dict[str, np.ndarray], rewards: list[str], keep_text: bool) -> pa.Table:
    """The store's table, one row per sample, from a batch of rounds (see :mod:`limits_ray.rounds`)."""
    lengths = round_lengths(batch)
    columns: dict[str, Any] = {name: per_round(batch[name], lengths) for name in STORED_ROUND_COLUMNS}
    for name in (*STORED_SAMPLE_COLUMNS, *rewards):
        columns[name] = per_sample(batch[name])
    if keep_text:
        columns["prompt"] = per_round(batch["prompt"], lengths)
        columns["response"] = per_sample(batch["response"])
    table = pa.table(columns)
    casts = {"prompt_id": pa.string(), "round": pa.int64(), "seed": pa.int64(), "sample_idx": pa.int64(),
             "response_tokens": pa.int64(), "logprob": pa.float64(), "finish_reason": pa.string()}
    casts.update({name: pa.float64() for name in rewards})
    if keep_text:
        casts.update({"prompt": pa.string(), "response": pa.string()})
    return table.cast(pa.schema([(name, casts[name]) for name in table.column_names]))


class SampleStore:
    """A directory of scored samples with a manifest of what produced them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.samples_dir = self.root / "samples"
        self.manifest_path = self.root / "manifest.json"

    def check_manifest(self, identity: dict[str, Any]) -> None:
        """Create the manifest, or fail if the store was written under another identity.

        ``identity`` names what must not change within one series of samples (models, their
        revisions, sampling parameters, reward models). A mismatch raises
        :class:`StoreMismatchError` naming the keys that differ.
        """
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        if self.manifest_path.exists():
            stored = json.loads(self.manifest_path.read_text())
            differing = sorted(key for key in set(stored) | set(identity) if stored.get(key) != identity.get(key))
            if differing:
                details = "; ".join(f"{key}: stored {stored.get(key)!r}, now {identity.get(key)!r}" for key in differing)
                raise StoreMismatchError(
                    f"sample store {self.root} was written by a different setup ({details}); "
                    "use another store.path (a new series) or restore the original settings"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.manifest_path.with_suffix(".partial")
        partial.write_text(json.dumps(identity, indent=2, sort_keys=True))
        partial.replace(self.manifest_path)

    def write_rounds(self, table: pa.Table) -> Path:
        """Write a table of complete rounds atomically; the file name hashes its (prompt_id, round) keys."""
        keys = sorted(set(zip(table["prompt_id"].to_pylist(), table["round"].to_pylist())))
        digest = hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:24]
        path = self.samples_dir / f"part-{digest}.parquet"
        write_table(table, path)
        return path

    def recover(self) -> list[Path]:
        """Make the store readable after a crash; returns the part files set aside as corrupt.

        Deletes the hidden ``.partial`` files of writes that never finished, and moves part files
        whose Parquet footer cannot be read to ``<store>/corrupt/``: their rounds count as missing
        and are generated again, and the files stay there for inspection.
        """
        if not self.samples_dir.is_dir():
            return []
        for partial in self.samples_dir.glob(".*.partial"):
            partial.unlink(missing_ok=True)
        corrupt = []
        for path in sorted(self.samples_dir.glob("*.parquet")):
            try:
                pq.ParquetFile(path).close()
            except (pa.ArrowInvalid, OSError):
                target = self.root / "corrupt" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                path.replace(target)
                corrupt.append(target)
        return corrupt

    def stored_rounds(self) -> set[tuple[str, int]]:
        """The (prompt_id, round) pairs already in the store."""
        if not self.samples_dir.is_dir() or not any(self.samples_dir.glob("*.parquet")):
            return set()
        table = ds.dataset(str(self.samples_dir), format="parquet").to_table(columns=["prompt_id", "round"])
        return set(zip(table["prompt_id"].to_pylist(), table["round"].to_pylist()))
