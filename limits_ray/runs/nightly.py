"""Nightly incremental recomputation: each night adds rounds per prompt and recomputes the results.

Layout under the nightly root (``nightly.root``, default ``<output_dir>/nightly``)::

    ledger.json                   date -> {series, identity, targets, completed, samples, quarantined_rounds, ...}
    series-<hash>/store/          the sample store of one series (one setup_identity)
    <YYYY-MM-DD>/                 that night's results (tables, plots, report.md, nightly.json)
    <YYYY-MM-DD>/change/          that night against the complete night before it (frontier_diff.*)
    latest/                       a copy of the newest night's results
    index.html, history/          the history page (limits_ray.runs.history), rewritten after every night

A night's round targets are, per prompt, its largest stored round + 1 + ``rounds_per_night``
(a prompt with nothing stored gets ``generation.rounds``): rounds are seeded by (prompt_id, round),
so new round indices are new seeds, and stored rounds are read back, never generated or scored
again. The targets are written to the ledger before sampling, so a night that is rerun (after a
crash, or by mistake) reuses them: a completed night is a no-op, an interrupted one resumes.
The series is keyed by a hash of :func:`limits_ray.runs.identity.setup_identity`: a new model or reward
model revision (or sampling setting) starts a new series in its own store instead of mixing samples.
The ledger records the identity itself, so the history page can say what a new series changed.

After the results, each night is compared with the complete night before it (``limits-ray compare-runs``,
:mod:`limits_ray.runs.run_diff`, into ``<date>/change/``: paired by prompt, a verdict per KL budget), and
after every night, also a failed one, the history page ``index.html`` is rewritten
(:func:`limits_ray.runs.history.write_history`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limits_ray.config import JobConfig
from limits_ray.core.errors import ConfigError, InputError
from limits_ray.outputs.report import write_report
from limits_ray.runs.history import CHANGE_DIR, write_history
from limits_ray.runs.identity import setup_identity
from limits_ray.runs.job import run_job, stored_round_counts
from limits_ray.runs.run_diff import BUDGETS, compare_runs

__all__ = ["NightResult", "nightly_root", "run_night", "series_id", "today"]


def today() -> str:
    """Today's date in UTC, ``YYYY-MM-DD``."""
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def series_id(config: JobConfig) -> str:
    """A short hash of :func:`limits_ray.runs.identity.setup_identity` (which fingerprints the models' weights):
    equal for configs whose samples may share a store; a new model or reward-model revision (or
    sampling setting) gives a new series."""
    text = json.dumps(setup_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def nightly_root(config: JobConfig) -> Path:
    """``nightly.root`` or ``<output_dir>/nightly``: a local (or mounted) directory.

    The dated results are staged and swapped in with renames, which object stores lack; the series'
    sample store lives below the root too.
    """
    root = config.nightly.root or f"{config.output_dir.rstrip('/')}/nightly"
    if "://" in root and not root.startswith("file://"):
        raise ConfigError(
            f"nightly.root {root!r}: nightly runs need a local or mounted directory (they swap results in with "
            "renames); mount the bucket or give a path"
        )
    return Path(root.removeprefix("file://"))


def _read_ledger(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(partial, path)


def _replace_dir(source: Path, target: Path) -> None:
    """Move directory ``source`` to ``target``, replacing it; the old one is renamed away first."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    if old.exists():
        shutil.rmtree(old)


def next_targets(stored_rounds: dict[str, int], rounds_per_night: int) -> dict[str, int]:
    """Per stored prompt: its stored rounds (largest round + 1) + ``rounds_per_night``."""
    return {prompt_id: count + rounds_per_night for prompt_id, count in sorted(stored_rounds.items())}


def _store_config(config: JobConfig, store_dir: Path) -> JobConfig:
    return dataclasses.replace(config, store=dataclasses.replace(config.store, enabled=True, path=str(store_dir)))


@dataclass
class NightResult:
    """What a night did."""

    date: str
    series: str
    ran: bool  # False: the night was already complete, nothing was done
    rounds_generated: int
    samples: int
    results_dir: Path
    latest_updated: bool


def _previous_night(ledger: dict[str, Any], root: Path, date: str) -> str | None:
    """The newest complete night before ``date`` whose results are there."""
    earlier = [key for key, value in ledger.items() if key < date and value.get("completed") and (root / key).is_dir()]
    return max(earlier) if earlier else None


def _rewrite_history(root: Path) -> None:
    """The history page, rewritten; a failure to draw it is reported, not raised (the night's results stand)."""
    try:
        write_history(root)
    except Exception as error:  # noqa: BLE001 - the page must not fail the night whose results are in place
        print(f"nightly: warning: the history page {root / 'index.html'} was not rewritten: {error!r}", file=sys.stderr)


def run_night(config: JobConfig, date: str | None = None) -> NightResult:
    """Run (or skip, if already complete) the night of ``date`` (``YYYY-MM-DD``, default today in UTC),
    then rewrite the root's history page (also when the night fails; not when it was complete already)."""
    date = date or today()
    dt.date.fromisoformat(date)  # a ValueError names a malformed date
    root = nightly_root(config)
    try:
        night = _run_night(config, date, root)
    except BaseException as error:
        ledger_path = root / "ledger.json"
        ledger = _read_ledger(ledger_path)
        if date in ledger and not ledger[date].get("completed"):
            ledger[date].update(error=f"{type(error).__name__}: {error}"[:1000],
                                failed=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            _write_json(ledger_path, ledger)
            _rewrite_history(root)
        raise
    if night.ran:
        _rewrite_history(root)
    return night


def _run_night(config: JobConfig, date: str, root: Path) -> NightResult:
    series = series_id(config)
    ledger_path = root / "ledger.json"
    ledger = _read_ledger(ledger_path)
    entry = ledger.get(date)
    dated = root / date
    if entry and entry.get("series") == series and entry.get("completed") and dated.is_dir():
        return NightResult(date, series, False, 0, int(entry.get("samples", 0)), dated, False)

    store_dir = root / f"series-{series}" / "store"
    if entry and entry.get("series") == series:
        targets = {key: int(value) for key, value in entry["targets"].items()}
        entry.setdefault("identity", setup_identity(config))
    else:
        targets = next_targets(stored_round_counts(_store_config(config, store_dir)), config.nightly.rounds_per_night)
        entry = {"series": series, "identity": setup_identity(config), "targets": targets, "completed": False,
                 "default_rounds": config.generation.rounds, "rounds_per_night": config.nightly.rounds_per_night}
        ledger[date] = entry
        _write_json(ledger_path, ledger)

    work = root / f".{date}.partial"
    if work.exists():
        shutil.rmtree(work)
    job = dataclasses.replace(_store_config(config, store_dir), name=f"{config.name} nightly {date}", output_dir=str(work))
    _, report = run_job(job, round_targets=targets, figures=False)  # write_report draws them below
    previous = _previous_night(ledger, root, date)
    change: dict[str, Any] = {}
    if previous is not None:
        try:
            compare_runs(root / previous, work, work / CHANGE_DIR, budgets=BUDGETS, labels=(previous, date))
            change = {"previous": previous, "change_budgets": list(BUDGETS)}
        except Exception as error:  # noqa: BLE001 - the night's results stand without the comparison
            if not isinstance(error, (InputError, ValueError)):
                print(f"nightly: warning: {date} was not compared with {previous}: {error!r}", file=sys.stderr)
            change = {"previous": previous, "change_error": f"{type(error).__name__}: {error}"[:1000]}
    _write_json(work / "nightly.json", {
        "date": date, "series": series, "identity": entry["identity"], "store": str(store_dir), "targets": targets,
        "rounds_generated": report.rounds_generated, "rounds_from_store": report.rounds_from_store,
        "samples": report.samples, "prompts": report.prompts, "quarantined_rounds": len(report.quarantined), **change,
    })
    write_report(work, title=f"{config.name}: nightly {date} (series {series})",
                 source=f"{dated} (sample store {store_dir})")
    _replace_dir(work, dated)

    for key in ("error", "failed"):  # of an earlier attempt at this night
        entry.pop(key, None)
    entry.update(completed=True, samples=report.samples, rounds_generated=report.rounds_generated,
                 quarantined_rounds=len(report.quarantined),
                 finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    ledger = _read_ledger(ledger_path)
    ledger[date] = entry
    _write_json(ledger_path, ledger)

    newest = max(key for key, value in ledger.items() if value.get("completed"))
    latest_updated = newest == date
    if latest_updated:
        staging = root / ".latest.partial"
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(dated, staging)
        _replace_dir(staging, root / "latest")
    return NightResult(date, series, True, report.rounds_generated, report.samples, dated, latest_updated)
