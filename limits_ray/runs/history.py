"""The history of a nightly root: ``limits-ray report <nightly root>`` writes its ``index.html``.

A nightly root (:mod:`limits_ray.runs.nightly`) holds ``ledger.json`` and one results directory per
complete night. :func:`gather_nights` reads, per night of the ledger (complete or not), what the page
shows (:class:`limits_ray.outputs.history_page.Night`):

- from the ledger: the series and whether the night completed; the series' setup identity (the ledger
  entry's ``identity``; nights written before it was recorded: the one in ``series-<id>/store/manifest.json``),
  from which :func:`limits_ray.runs.identity.identity_changes` says what a new series changed;
- from the night's folder: ``frontier_mean.parquet`` (the gain at the KL budgets with 95% intervals,
  :func:`limits_ray.core.frontier_diff.gain_at_kl`; the trusted KL range; the fraction of prompts reliable
  at each budget), ``nightly.json`` (samples, quarantined rounds; ``report.json`` for nights written
  before ``nightly.json`` counted them);
- the change against the previous complete night at each KL budget, paired by prompt
  (:func:`limits_ray.runs.run_diff.frontier_difference`): the night's own ``change/frontier_diff.parquet``
  when the nightly job wrote it against that same night with these budgets, else computed here from the
  two nights' per-prompt tables (one (align, eval) at a time).

:func:`write_history` draws the page (:func:`limits_ray.outputs.history_page.write_page`). A root with one
night, or whose newest night failed, renders too; so does a root whose nights all failed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from limits_ray.core.errors import InputError
from limits_ray.core.frontier import trusted_kl_range
from limits_ray.core.frontier_diff import gain_at_kl
from limits_ray.outputs.history_page import Night, Shift, write_page
from limits_ray.runs.identity import identity_changes
from limits_ray.runs.run_diff import BUDGETS, frontier_difference
from limits_ray.storage.location import open_location
from limits_ray.storage.results import read_result_table

__all__ = ["gather_nights", "is_nightly_root", "write_history"]

CHANGE_DIR = "change"
"""A night's comparison with the night before, below its folder (written by the nightly job)."""


def is_nightly_root(path: str | Path) -> bool:
    """Whether ``path`` is a nightly root (it holds ``ledger.json``)."""
    return (Path(path) / "ledger.json").is_file()


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _stored_identity(root: Path, series: str) -> dict[str, Any] | None:
    """The setup identity in the series' sample store (nights written before the ledger recorded it)."""
    manifest = _json(root / f"series-{series}" / "store" / "manifest.json")
    return manifest.get("identity")


def _pairs(tables: list, limit: int = 4) -> list[tuple[str, str]]:
    """(align, eval) pairs of the newest table, those evaluating their own alignment reward first."""
    if not tables:
        return []
    table = tables[-1]
    pairs = sorted(set(zip(table["align"].to_pylist(), table["eval"].to_pylist())))
    return sorted(pairs, key=lambda pair: (pair[0] != pair[1], pair))[:limit]


def _change(root: Path, night: Night, info: dict[str, Any], budgets: list[float]) -> None:
    """Fill ``night.change`` (KL rows against ``night.previous``) from the stored comparison or afresh."""
    stored = root / night.date / CHANGE_DIR / "frontier_diff.parquet"
    if (info.get("previous") == night.previous and stored.is_file()
            and {float(value) for value in info.get("change_budgets", [])} >= set(budgets)):
        table = pq.read_table(stored)
        table = table.filter(pc.is_in(table["kl_a"], value_set=pa.array(budgets, pa.float64())))
    else:
        try:
            table = frontier_difference(root / night.previous, root / night.date, budgets).table
        except (InputError, ValueError) as error:
            night.note = str(error)
            return
    night.change = table.filter(pc.equal(table["at"], "kl"))
    night.shifts = [Shift(row["align"], row["eval"], row["kl_a"], row["verdict"],
                          row["diff_paired"] if row["basis"] == "paired" else row["diff"], row["ci_low"], row["ci_high"])
                    for row in night.change.to_pylist()
                    if row["verdict"] in ("higher", "lower") and row["trusted_a"] and row["trusted_b"]]


def gather_nights(root: str | Path, budgets=BUDGETS) -> tuple[list[Night], list[tuple[str, str]], str]:
    """Every night of the ledger in date order, the (align, eval) pairs shown, and the series' name."""
    root = Path(root)
    if not is_nightly_root(root):
        raise InputError(f"{root}/ledger.json does not exist: not a nightly root (point report at a results directory "
                         "or at nightly.root)")
    budgets = [float(value) for value in budgets]
    ledger = _json(root / "ledger.json")
    nights: list[Night] = []
    means = []
    name = ""
    last_series, last_identity, previous = None, None, None
    for date in sorted(ledger):
        entry = ledger[date]
        series = str(entry.get("series", "?"))
        folder = root / date
        status = ("complete" if folder.is_dir() else "missing") if entry.get("completed") else "incomplete"
        info = _json(folder / "nightly.json") if status == "complete" else {}
        identity = entry.get("identity") or info.get("identity") or _stored_identity(root, series)
        if last_series is None:
            change = ["first night"]
        elif series == last_series:
            change = None
        elif identity is None or last_identity is None:
            change = ["not recorded"]
        else:
            change = identity_changes(last_identity, identity) or ["setup identity"]
        night = Night(date=date, series=series, status=status, series_change=change)
        if status == "missing":
            night.note = f"the ledger says complete, but {folder} is gone"
        elif status == "incomplete":
            night.note = f"failed: {entry['error']}" if entry.get("error") else "failed, or still running"
        if status == "complete":
            try:
                mean = read_result_table(open_location(folder, where="night"), "frontier_mean", required=True)
            except (OSError, ValueError) as error:  # InputError, pyarrow's errors: a damaged night is a row, not a crash
                night.status, night.note = "missing", f"its frontier_mean cannot be read: {error}"
                nights.append(night)
                last_series, last_identity = series, identity
                continue
            means.append(mean)
            night.prompts = int(pc.max(mean["prompts"]).as_py()) if mean.num_rows else 0
            samples = info.get("samples", entry.get("samples"))
            night.samples_per_prompt = samples / night.prompts if samples is not None and night.prompts else math.nan
            quarantined = info.get("quarantined_rounds")
            report = _json(folder / "report.json")
            if quarantined is None and "quarantined" in report:
                quarantined = len(report["quarantined"])
            night.quarantined_rounds = quarantined
            name = str(report.get("name", name)).split(" nightly ")[0] or name
            for pair in sorted(set(zip(mean["align"].to_pylist(), mean["eval"].to_pylist()))):
                night.gains[pair] = [gain_at_kl(mean, budget, *pair) for budget in budgets]
                night.trusted[pair] = trusted_kl_range(mean, *pair)
                night.reliable[pair] = [math.nan if point is None else point.reliable for point in night.gains[pair]]
            night.links = {name_: f"{date}/{target}" for name_, target in (
                ("report.md", "report.md"), ("frontier.png", "frontier.png"),
                ("change", f"{CHANGE_DIR}/frontier_diff.md"), ("change figure", f"{CHANGE_DIR}/frontier_diff.png"))
                if (folder / target).is_file()}
            night.previous = previous
            if previous is not None:
                _change(root, night, info, budgets)
            previous = date
        nights.append(night)
        last_series, last_identity = series, identity
    return nights, _pairs(means), name or root.resolve().name


def write_history(root: str | Path, out: str | Path | None = None, budgets=BUDGETS, title: str | None = None) -> list[Path]:
    """Write ``index.html`` and its figures for the nightly root ``root`` into ``out`` (default: the root)."""
    root = Path(root)
    nights, pairs, name = gather_nights(root, budgets)
    return write_page(root.resolve(), Path(out or root).resolve(), nights, pairs, [float(value) for value in budgets],
                      title or f"{name}: nightly history")
