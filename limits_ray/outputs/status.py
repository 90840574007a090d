"""``limits-ray status``: what a sample store (or a run directory, or a nightly root) holds, cheaply.

Reads the manifest, the per-bucket merged statistics' key columns (prompt_id, rounds, samples; never
the statistics payloads or the samples), the list of sample parts not yet merged, the quarantine
records and, if there is one, the nightly ledger. Every object it reads is written whole and once,
so the answer is consistent while a job is writing: it may only lag the newest parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from limits_ray.storage.location import Location, StorageError

__all__ = ["StoreStatus", "format_status", "store_status"]


@dataclass
class StoreStatus:
    """A summary of one store."""

    uri: str
    buckets: int
    identity: dict[str, Any]
    samples_per_prompt: np.ndarray
    rounds_per_prompt: np.ndarray
    unmerged_parts: int
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)


def _find_store(location: Location) -> tuple[Location, Location | None]:
    """The store below ``location`` (itself, ``store/``, or a nightly root's newest series) and the run directory."""
    if location.join("manifest.json").is_file():
        return location, None
    if location.join("store", "manifest.json").is_file():
        return location.join("store"), location
    series = [child for child in location.subdirectories() if child.name.startswith("series-")]
    for candidate in reversed(series):
        if candidate.join("store", "manifest.json").is_file():
            return candidate.join("store"), None
    raise StorageError(
        f"{location.uri}: no sample store here (no manifest.json in it, in store/ or in a nightly series-*/store); "
        "give a store path/URI, a run's output_dir or a nightly root"
    )


def _merged_keys(store: Location) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """Samples and rounds per prompt, and the sample parts merged, from the fullest analysis tree."""
    best: tuple[dict[str, int], dict[str, int], set[str]] = ({}, {}, set())
    for analysis in store.join("stats").subdirectories():
        samples, rounds, parts = {}, {}, set()
        for bucket in analysis.subdirectories():
            merged = [f for f in bucket.files(suffix=".parquet") if f.name.startswith("merged-")]
            if not merged:
                continue
            newest = max(merged, key=lambda location: location.name)
            table = pq.read_table(newest.path, filesystem=newest.filesystem, columns=["prompt_id", "rounds", "samples"])
            metadata = pq.read_schema(newest.path, filesystem=newest.filesystem).metadata or {}
            parts |= set(json.loads(metadata.get(b"limits_ray", b'{"parts": []}'))["parts"])
            for prompt_id, prompt_rounds, count in zip(table["prompt_id"].to_pylist(), table["rounds"].to_pylist(),
                                                       table["samples"].to_pylist()):
                samples[prompt_id], rounds[prompt_id] = int(count), len(prompt_rounds)
        if sum(samples.values()) > sum(best[0].values()):
            best = (samples, rounds, parts)
    return best


def store_status(location: Location) -> StoreStatus:
    """Summarise the store at (or below) ``location``; see the module doc for what is read."""
    store, run_dir = _find_store(location)
    manifest = store.join("manifest.json").read_json()
    samples, rounds, merged_parts = _merged_keys(store)
    all_parts = {part.name for part in store.join("samples").files(recursive=True, suffix=".parquet")}
    unmerged = len({name.removeprefix("part-").removesuffix(".parquet") for name in all_parts} - merged_parts)
    quarantined = []
    for record in store.join("quarantine").files(recursive=True, suffix=".json"):
        quarantined.append(record.read_json())
    ledger_location = location.join("ledger.json")
    ledger = ledger_location.read_json() if ledger_location.is_file() else {}
    report = run_dir.join("report.json") if run_dir is not None else None
    run = report.read_json() if report is not None and report.is_file() else {}
    return StoreStatus(
        uri=store.uri, buckets=int(manifest.get("buckets", 0)), identity=manifest.get("identity", {}),
        samples_per_prompt=np.array(sorted(samples.values()), dtype=np.int64),
        rounds_per_prompt=np.array(sorted(rounds.values()), dtype=np.int64),
        unmerged_parts=unmerged, quarantined=quarantined, ledger=ledger, run=run,
    )


def _distribution(values: np.ndarray) -> str:
    if values.size == 0:
        return "none"
    low, p10, median, p90, high = np.percentile(values, [0, 10, 50, 90, 100])
    return f"min {low:.0f}, p10 {p10:.0f}, median {median:.0f}, p90 {p90:.0f}, max {high:.0f}"


def format_status(status: StoreStatus) -> list[str]:
    """The status as lines for a terminal."""
    identity = status.identity
    sampling = identity.get("sampling", {})
    lines = [
        f"store {status.uri} ({status.buckets} buckets)",
        f"base model {identity.get('base_model', '?')}; sampling "
        + ", ".join(f"{key} {value}" for key, value in sorted(sampling.items())),
        "rewards: " + ", ".join(f"{name} ({spec.get('kind')}: {spec.get('model')})"
                                for name, spec in sorted(identity.get("rewards", {}).items())),
        f"prompts {status.samples_per_prompt.size}, rounds {int(status.rounds_per_prompt.sum())}, "
        f"samples {int(status.samples_per_prompt.sum())} (merged statistics)",
        f"samples per prompt: {_distribution(status.samples_per_prompt)}",
        f"rounds per prompt:  {_distribution(status.rounds_per_prompt)}",
        f"sample parts not merged yet: {status.unmerged_parts} (a run in progress, or one that stopped; "
        "the next run merges them)",
        f"quarantined rounds: {len(status.quarantined)}",
    ]
    for record in status.quarantined[:20]:
        lines.append(f"  run {record.get('run_id')}: prompt {record.get('prompt_id')} round {record.get('round')} "
                     f"in {record.get('stage')}: {record.get('error')}")
    if len(status.quarantined) > 20:
        lines.append(f"  ... and {len(status.quarantined) - 20} more")
    for date, entry in sorted(status.ledger.items()):
        state = "complete" if entry.get("completed") else "not complete"
        lines.append(f"night {date}: {state}, series {entry.get('series')}, {entry.get('samples', '?')} samples")
    if status.run:
        lines.append(f"last run {status.run.get('name')}: {status.run.get('prompts')} prompts, "
                     f"{status.run.get('rounds_generated')} rounds generated, {status.run.get('wall_seconds', 0):.1f} s")
    return lines
