"""``limits-ray compare-runs A B``: how the frontier of results directory B differs from A's.

For every (align, eval) both directories hold, :func:`limits_ray.core.frontier_diff.pair_difference`
gives ``B - A`` at the KL budgets and at the betas both grids hold, paired over the prompts both runs
have and unpaired over all of each, with a verdict per point. :func:`compare_runs` reads the two
``frontier_mean`` tables and, one (align, eval) at a time, the columns it needs of the two per-prompt
``frontier`` tables (so memory holds one pair's rows of both runs), and writes into ``out``:

- ``frontier_diff.parquet``: the rows of :data:`limits_ray.core.frontier_diff.DIFF_SCHEMA`;
- ``frontier_diff.md``: the same as tables for people, with the prompts of one run only;
- ``frontier_diff.png``: both frontiers with their 95% bands and trusted ranges, and the paired
  difference with its 95% band below (:mod:`limits_ray.outputs.diff_report`).

Unlike ``limits-ray compare`` (:mod:`limits_ray.runs.compare`), which samples policies and places them
against one run's frontier, this compares two finished results directories and runs no model. The
nightly job compares each night with the night before it this way (:mod:`limits_ray.runs.nightly`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from limits_ray.core.errors import InputError
from limits_ray.core.frontier_diff import DIFF_SCHEMA, pair_difference
from limits_ray.outputs.diff_report import DiffPair, diff_lines, plot_diff
from limits_ray.storage.location import Location, open_location
from limits_ray.storage.results import read_result_table

__all__ = ["BUDGETS", "RunDiff", "compare_runs", "frontier_difference", "pair_rows"]

BUDGETS = (0.1, 0.5, 1.0, 2.0, 4.0)
"""Default KL budgets [nats] (those of report.md)."""

COLUMNS = ["prompt_id", "align", "eval", "beta", "n", "gain", "kl"]


def pair_rows(results: Location, align: str, eval: str, columns: list[str] = COLUMNS) -> pa.Table:
    """The per-prompt ``frontier`` rows of one (align, eval) of a results directory (a file or shards),
    only ``columns``: a filtered read, so a large run's other pairs stay on disk."""
    location = results.join("frontier.parquet")
    if not location.exists():
        raise InputError(f"{location.uri} does not exist: point compare-runs at the output directory of a run or a reduce")
    dataset = pads.dataset(location.path, filesystem=location.filesystem, format="parquet")
    return dataset.to_table(columns=columns, filter=(pc.field("align") == align) & (pc.field("eval") == eval))


def _pairs(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(set(zip(table["align"].to_pylist(), table["eval"].to_pylist())))


@dataclass
class RunDiff:
    """What :func:`compare_runs` found: the table, each pair's dense curve and prompt overlap, the
    (align, eval) pairs of one run only, and the files written."""

    table: pa.Table
    pairs: list[DiffPair]
    pairs_only_a: list[tuple[str, str]] = field(default_factory=list)
    pairs_only_b: list[tuple[str, str]] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


def frontier_difference(a: str | Path | Location, b: str | Path | Location, budgets=BUDGETS,
                        aligns: list[str] | None = None, evals: list[str] | None = None, dense: int = 0) -> RunDiff:
    """``B - A`` of two results directories per (align, eval) both hold (optionally only ``aligns``,
    ``evals``), without writing anything; ``dense`` > 0 adds that many log-spaced KL points over the
    KL range both grids share to each pair (for the figure)."""
    a, b = (value if isinstance(value, Location) else open_location(value, where="results") for value in (a, b))
    mean_a = read_result_table(a, "frontier_mean", required=True, command="compare-runs")
    mean_b = read_result_table(b, "frontier_mean", required=True, command="compare-runs")
    pairs_a, pairs_b = _pairs(mean_a), _pairs(mean_b)
    chosen = [pair for pair in pairs_a if pair in pairs_b
              and (not aligns or pair[0] in aligns) and (not evals or pair[1] in evals)]
    if not chosen:
        raise InputError(f"{a.uri} and {b.uri} share no (align, eval) frontier"
                         + (" among the ones asked for" if aligns or evals else "")
                         + f": A has {pairs_a}, B has {pairs_b}")
    tables, pairs = [], []
    for align, evaluation in chosen:
        rows_a, rows_b = pair_rows(a, align, evaluation), pair_rows(b, align, evaluation)
        result = pair_difference(rows_a, rows_b, mean_a, mean_b, align, evaluation, np.asarray(budgets, float))
        curve = None
        if dense:
            low = max(_kl_range(mean_a, align, evaluation)[0], _kl_range(mean_b, align, evaluation)[0], 1e-4)
            high = min(_kl_range(mean_a, align, evaluation)[1], _kl_range(mean_b, align, evaluation)[1])
            if high > low:
                curve = pair_difference(rows_a, rows_b, mean_a, mean_b, align, evaluation,
                                        np.geomspace(low, high, dense), betas=False).table
        tables.append(result.table)
        pairs.append(DiffPair(align, evaluation, result.table, curve, _select(mean_a, align, evaluation),
                              _select(mean_b, align, evaluation), result.only_a, result.only_b, result.common,
                              _samples(rows_a), _samples(rows_b)))
    return RunDiff(pa.concat_tables(tables) if tables else DIFF_SCHEMA.empty_table(), pairs,
                   [pair for pair in pairs_a if pair not in pairs_b], [pair for pair in pairs_b if pair not in pairs_a])


def _select(table: pa.Table, align: str, evaluation: str) -> pa.Table:
    return table.filter(pc.and_(pc.equal(table["align"], align), pc.equal(table["eval"], evaluation))).sort_by("beta")


def _kl_range(mean: pa.Table, align: str, evaluation: str) -> tuple[float, float]:
    kl = _select(mean, align, evaluation)["kl"].to_numpy()
    return float(kl.min()), float(kl.max())


def _samples(rows: pa.Table) -> tuple[int, int]:
    """(smallest, largest) samples per prompt of a pair's rows."""
    n = rows["n"].to_numpy()
    return (int(n.min()), int(n.max())) if n.size else (0, 0)


def compare_runs(a: str | Path, b: str | Path, out: str | Path, budgets=BUDGETS, aligns: list[str] | None = None,
                 evals: list[str] | None = None, labels: tuple[str, str] | None = None) -> RunDiff:
    """Compare results directories ``a`` and ``b`` (module doc) and write the table, text and figure into ``out``."""
    diff = frontier_difference(a, b, budgets, aligns, evals, dense=60)
    labels = labels or _labels(a, b)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table_path, text_path, figure_path = out / "frontier_diff.parquet", out / "frontier_diff.md", out / "frontier_diff.png"
    open_location(out, where="--out").join(table_path.name).write_table(diff.table)
    text_path.write_text("\n".join(diff_lines(diff.pairs, labels, (str(a), str(b)), diff.pairs_only_a, diff.pairs_only_b)) + "\n")
    plot_diff(diff.pairs, figure_path, labels)
    diff.paths = [table_path, text_path, figure_path]
    return diff


def _labels(a: str | Path, b: str | Path) -> tuple[str, str]:
    """Short names of the two directories: their last path components, or the whole paths when equal."""
    names = Path(str(a)).resolve().name, Path(str(b)).resolve().name
    return names if names[0] != names[1] else (str(a), str(b))
