"""The sample store: every scored sample, and the merged statistics of every stored round, by bucket.

Layout of a store (a local directory or an object-store prefix, see :mod:`limits_ray.storage.location`)::

    manifest.json                                   what produced the samples; the bucket count
    samples/bucket=00042/part-<key>.parquet          whole rounds of the bucket's prompts
    stats/<analysis>/bucket=00042/merged-<gen>-<key>.parquet  per-prompt merged statistics (compacted)
    quarantine/<run id>/<key>.json                  rounds a run set aside

Prompts are partitioned into buckets by :func:`limits_ray.storage.buckets.bucket_of`; every per-prompt task
reads one bucket only. Every object is written once, whole, and named by what it holds: a sample part
by a hash of its (prompt_id, round) keys, so a retried batch writes the same name with the same
content; nothing is renamed, which makes the store safe on S3 and GCS. Statistics depend on the
analysis (betas, alignment and evaluation rewards), so each analysis has its own ``stats/<analysis>``
tree. Statistics are computed from the stored rewards by the bucket task that first merges a part
(:func:`limits_ray.pipeline.bucket_tasks.compact`), then kept merged per prompt; the part's key is recorded so
it is never read again for that analysis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from limits_ray.core.dyadic import DyadicStats
from limits_ray.storage.buckets import bucket_name, bucket_of
from limits_ray.storage.location import Location
from limits_ray.storage.rounds import per_round, per_sample, round_lengths

__all__ = [
    "MergedBucket", "SampleStore", "StoreMismatchError", "decode_statistics", "encode_statistics",
    "auto_buckets", "flatten_rounds", "merge_statistics", "rounds_key",
]

SAMPLES_PER_BUCKET = 1_000_000  # automatic bucket counts aim at most this many samples per bucket
PROMPTS_PER_BUCKET = 1_000  # ... and at most this many prompts (a bucket's tables take ~2 ms per prompt: ~2 s)
MAX_BUCKETS = 4096
STORED_ROUND_COLUMNS = ("prompt_id", "round", "seed")
STORED_SAMPLE_COLUMNS = ("sample_idx", "response_tokens", "logprob", "finish_reason")
MERGED_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("rounds", pa.list_(pa.int64())), ("samples", pa.int64()), ("payload", pa.binary()),
])


class StoreMismatchError(ValueError):
    """The store was written by a different model, sampling setup, reward model or software stack."""


log = logging.getLogger(__name__)

# Identity keys added after stores were first written: a manifest without one predates it, and the key
# is not checked against it (a warning says so); every other key is.
LATER_IDENTITY_KEYS = ("stack",)


def encode_statistics(statistics: dict[str, DyadicStats]) -> bytes:
    """One prompt's statistics per alignment reward as bytes (see :func:`decode_statistics`)."""
    return pickle.dumps({name: dyadic.to_bytes() for name, dyadic in statistics.items()}, protocol=5)


def decode_statistics(payload: bytes) -> dict[str, DyadicStats]:
    """The inverse of :func:`encode_statistics`."""
    return {name: DyadicStats.from_bytes(data) for name, data in pickle.loads(payload).items()}


def merge_statistics(current: dict[str, DyadicStats] | None, other: dict[str, DyadicStats]) -> dict[str, DyadicStats]:
    """The statistics of the union of two disjoint sample sets of one prompt."""
    if current is None:
        return other
    return {name: current[name].merge(other[name]) for name in current}


def auto_buckets(samples: int, prompts: int = 0) -> int:
    """Buckets for a new store expected to hold ``samples`` of ``prompts``: one per
    :data:`SAMPLES_PER_BUCKET` samples or per :data:`PROMPTS_PER_BUCKET` prompts, whichever gives more,
    1 to 4096. Buckets are the unit of parallel work of the per-prompt tables: many small prompts
    need several buckets even when their samples would fit one."""
    wanted = max(-(-int(samples) // SAMPLES_PER_BUCKET), -(-int(prompts) // PROMPTS_PER_BUCKET))
    return int(min(MAX_BUCKETS, max(1, wanted)))


def rounds_key(keys: list[tuple[str, int]]) -> str:
    """The name key of a set of (prompt_id, round) pairs: 24 hex digits of sha1 of the sorted pairs."""
    return hashlib.sha1(json.dumps(sorted(set(keys))).encode()).hexdigest()[:24]


def flatten_rounds(batch: dict[str, np.ndarray], rewards: list[str], keep_text: bool) -> pa.Table:
    """The store's table, one row per sample, from a batch of rounds (see :mod:`limits_ray.storage.rounds`)."""
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


@dataclass
class MergedBucket:
    """One bucket's merged statistics: per prompt the rounds merged and their statistics.

    ``parts`` names the sample parts whose rounds are included, so the next compaction reads only
    parts written since.
    """

    rounds: dict[str, set[int]]
    statistics: dict[str, dict[str, DyadicStats]]
    parts: set[str]
    generation: int = 0

    def add(self, prompt_id: str, round_index: int, statistics: dict[str, DyadicStats]) -> bool:
        """Merge one round unless it is merged already; returns whether it was new."""
        seen = self.rounds.setdefault(prompt_id, set())
        if round_index in seen:
            return False
        seen.add(round_index)
        self.statistics[prompt_id] = merge_statistics(self.statistics.get(prompt_id), statistics)
        return True


class SampleStore:
    """A store of scored samples and their statistics (see the module doc for the layout)."""

    def __init__(self, root: Location, buckets: int) -> None:
        self.root = root
        self.buckets = buckets
        self.samples = root.join("samples")
        self.manifest = root.join("manifest.json")
        self.quarantine = root.join("quarantine")

    def check_manifest(self, identity: dict[str, Any]) -> None:
        """Create the manifest, or fail if the store was written under another identity.

        ``identity`` names what must not change within one series of samples (models, their
        revisions, sampling parameters, reward models, the software stack). A mismatch raises
        :class:`StoreMismatchError` naming the keys that differ. An existing store keeps the
        bucket count it was created with (``self.buckets`` is set from it).

        A store written before a key of :data:`LATER_IDENTITY_KEYS` was recorded stays usable: that key
        cannot be compared and is skipped, with a warning; the manifest is not rewritten (every object
        is written once), so such a store never gets the check: start a new ``store.path`` for that.
        """
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        if not self.manifest.is_file():
            self.manifest.write_json({"identity": identity, "layout": 2, "buckets": self.buckets})
            return
        manifest = self.manifest.read_json()
        if manifest.get("layout") != 2:
            raise StoreMismatchError(
                f"sample store {self.root.uri} has the layout of limits-ray 0.1 (one directory of parts); "
                "regenerate it into a new store.path, or reduce it offline with limits-ray reduce --samples"
            )
        stored = manifest["identity"]
        unrecorded = [key for key in LATER_IDENTITY_KEYS if key not in stored and key in identity]
        if unrecorded:
            log.warning(
                "sample store %s predates limits-ray's record of %s (dtype, vLLM/torch versions, device): its samples "
                "are taken as written by this setup, unchecked; use a new store.path for a series whose software "
                "stack is checked", self.root.uri, unrecorded,
            )
            identity = {key: value for key, value in identity.items() if key not in unrecorded}
        differing = sorted(key for key in set(stored) | set(identity) if stored.get(key) != identity.get(key))
        if differing:
            details = "; ".join(f"{key}: stored {stored.get(key)!r}, now {identity.get(key)!r}" for key in differing)
            raise StoreMismatchError(
                f"sample store {self.root.uri} was written by a different setup ({details}); "
                "use another store.path (a new series) or restore the original settings"
            )
        self.buckets = int(manifest["buckets"])

    def bucket_samples(self, bucket: int) -> Location:
        """The directory of one bucket's sample parts."""
        return self.samples.join(bucket_name(bucket))

    def bucket_stats(self, analysis: str, bucket: int) -> Location:
        """The directory of one bucket's statistics under analysis key ``analysis``."""
        return self.root.join("stats", analysis, bucket_name(bucket))

    def write_rounds(self, table: pa.Table) -> list[str]:
        """Write complete rounds, one part per bucket; returns the part keys.

        A part is named by :func:`rounds_key` of its (prompt_id, round) pairs, so a retried batch
        writes the same names with the same content.
        """
        prompt_ids = table["prompt_id"].to_pylist()
        rounds = table["round"].to_numpy()
        buckets = bucket_of(prompt_ids, self.buckets)
        keys = []
        for bucket in np.unique(buckets):
            rows = np.flatnonzero(buckets == bucket)
            key = rounds_key(list(zip([prompt_ids[row] for row in rows], rounds[rows].tolist())))
            self.bucket_samples(int(bucket)).join(f"part-{key}.parquet").write_table(table.take(pa.array(rows)))
            keys.append(key)
        return keys

    def sample_parts(self, bucket: int) -> dict[str, Location]:
        """The bucket's sample parts by key."""
        parts = self.bucket_samples(bucket).files(suffix=".parquet")
        return {part.name.removeprefix("part-").removesuffix(".parquet"): part for part in parts if part.name.startswith("part-")}

    def read_merged(self, analysis: str, bucket: int) -> MergedBucket:
        """The newest compacted statistics of a bucket (empty when there are none)."""
        files = [f for f in self.bucket_stats(analysis, bucket).files(suffix=".parquet") if f.name.startswith("merged-")]
        if not files:
            return MergedBucket({}, {}, set())
        newest = max(files, key=lambda location: location.name)
        table = newest.read_table()
        metadata = json.loads(table.schema.metadata[b"limits_ray"])
        rounds = {prompt_id: set(values) for prompt_id, values in zip(table["prompt_id"].to_pylist(), table["rounds"].to_pylist())}
        statistics = {
            prompt_id: decode_statistics(payload)
            for prompt_id, payload in zip(table["prompt_id"].to_pylist(), table["payload"].to_pylist())
        }
        return MergedBucket(rounds, statistics, set(metadata["parts"]), int(metadata["generation"]))

    def write_merged(self, analysis: str, bucket: int, merged: MergedBucket) -> None:
        """Write a new compacted statistics object, then delete the older ones."""
        directory = self.bucket_stats(analysis, bucket)
        generation = merged.generation + 1
        prompt_ids = sorted(merged.statistics)
        table = pa.table({
            "prompt_id": pa.array(prompt_ids, pa.string()),
            "rounds": pa.array([sorted(merged.rounds[p]) for p in prompt_ids], pa.list_(pa.int64())),
            "samples": pa.array([next(iter(merged.statistics[p].values())).n for p in prompt_ids], pa.int64()),
            "payload": pa.array([encode_statistics(merged.statistics[p]) for p in prompt_ids], pa.binary()),
        }, schema=MERGED_SCHEMA)
        metadata = {"parts": sorted(merged.parts), "generation": generation}
        table = table.replace_schema_metadata({b"limits_ray": json.dumps(metadata).encode()})
        name = f"merged-{generation:08d}-{rounds_key([(p, len(merged.rounds[p])) for p in prompt_ids])}.parquet"
        directory.join(name).write_table(table)
        merged.generation = generation
        for old in directory.files(suffix=".parquet"):
            if old.name.startswith("merged-") and old.name != name:
                old.delete()

    def read_part(self, part: Location, rewards: list[str]) -> pa.Table | None:
        """A sample part's keys and rewards, or None if it is not valid Parquet (it is then set aside).

        Only a malformed file counts: an I/O error (a network fault, throttling) propagates, so a
        passing fault of the object store never costs stored samples.
        """
        try:
            return pq.read_table(part.path, filesystem=part.filesystem, columns=["prompt_id", "round", "sample_idx", *rewards])
        except pa.ArrowInvalid:
            return None

    def set_aside(self, part: Location) -> Location:
        """Copy an unreadable part to ``corrupt/``, then delete it; its rounds count as missing.

        If the copy fails the part stays where it is (and the error propagates).
        """
        target = self.root.join("corrupt", part.name)
        target.write_bytes(part.read_bytes())
        part.delete()
        return target

    def bucket_rounds(self, bucket: int, rewards: list[str], prompt_ids: set[str]) -> pa.Table:
        """The stored samples (keys and rewards) of ``prompt_ids`` in one bucket, each (prompt_id, round) once."""
        tables = []
        for part in self.sample_parts(bucket).values():
            table = self.read_part(part, rewards)
            if table is not None:
                tables.append(table.filter(pc.is_in(table["prompt_id"], pa.array(sorted(prompt_ids), pa.string()))))
        if not tables:
            return pa.table({"prompt_id": pa.array([], pa.string()), "round": pa.array([], pa.int64()),
                             "sample_idx": pa.array([], pa.int64()), **{name: pa.array([], pa.float64()) for name in rewards}})
        table = pa.concat_tables(tables, promote_options="permissive")
        # A round written twice (a batch retried round by round) is kept once: its samples are identical.
        keyed = table.append_column("row", pa.array(np.arange(table.num_rows)))
        first = keyed.group_by(["prompt_id", "sample_idx"], use_threads=False).aggregate([("row", "min")])
        return table.take(np.sort(first["row_min"].to_numpy()))
