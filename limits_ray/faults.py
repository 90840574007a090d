"""Quarantine: rounds that keep failing are set aside and named, instead of failing the whole run.

A stage that raises on a batch is retried round by round; a round that fails ``attempts`` times
is written as a JSON record into the quarantine directory (in the sample store, so every node
of a cluster can reach it) and dropped from the stream. The driver reads the records of its run
at the end, leaves the affected prompts out of the results and names them in the report. A later
run retries them (they are not in the sample store).
"""

from __future__ import annotations

import hashlib
import json
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from limits_ray.storage import Location

__all__ = ["Quarantine", "QuarantinedRound", "run_with_quarantine"]


@dataclass(frozen=True)
class QuarantinedRound:
    """One round set aside: where it failed and why."""

    prompt_id: str
    round: int
    stage: str
    error: str


class Quarantine:
    """Quarantine records of one run: one JSON object each under ``<directory>/<run_id>/``."""

    def __init__(self, directory: Location, run_id: str) -> None:
        self.directory = directory
        self.run_id = run_id

    def add(self, record: QuarantinedRound) -> None:
        """Write one record (whole; a retried write rewrites the same name)."""
        key = hashlib.sha1(f"{record.stage}:{record.prompt_id}:{record.round}".encode()).hexdigest()[:20]
        self.directory.join(self.run_id, f"{key}.json").write_text(json.dumps({"run_id": self.run_id, **record.__dict__}))

    def count(self) -> int:
        """How many rounds this run has quarantined so far (a listing; no record is read)."""
        return len(self.directory.join(self.run_id).files(suffix=".json"))

    def records(self) -> list[QuarantinedRound]:
        """This run's records, sorted by prompt and round."""
        found = []
        for location in self.directory.join(self.run_id).files(suffix=".json"):
            data = json.loads(location.read_text())
            data.pop("run_id")
            found.append(QuarantinedRound(**data))
        return sorted(found, key=lambda record: (record.prompt_id, record.round, record.stage))


def _row(batch: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    return {name: values[index : index + 1] for name, values in batch.items()}


def _concatenate(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([output[name] for output in outputs]) for name in outputs[0]}


def run_with_quarantine(
    call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    batch: dict[str, np.ndarray],
    stage: str,
    quarantine: Quarantine,
    attempts: int,
) -> dict[str, np.ndarray] | None:
    """``call(batch)``; if it raises, retry each round alone up to ``attempts`` times in all.

    Rounds that still fail are recorded in ``quarantine`` and left out of the result (``None``
    when every round failed).
    """
    try:
        return call(batch)
    except Exception as first_error:  # noqa: BLE001 - any failure of user code quarantines the round
        batch_error = first_error
    outputs = []
    for index in range(len(batch["prompt_id"])):
        row = _row(batch, index)
        error: BaseException = batch_error
        for _ in range(max(attempts - 1, 1)):
            try:
                outputs.append(call(row))
                break
            except Exception as retry_error:  # noqa: BLE001
                error = retry_error
        else:
            message = "".join(traceback.format_exception_only(type(error), error)).strip()
            quarantine.add(QuarantinedRound(str(row["prompt_id"][0]), int(row["round"][0]), stage, message))
    return _concatenate(outputs) if outputs else None
