"""Results directories: the result tables written, and read back (README, "Output").

A results directory (a run's ``output_dir``, a ``limits-ray reduce --out``, a nightly ``latest``)
holds ``frontier.parquet``, ``frontier_mean.parquet``, ``bon.parquet``, ``convergence.parquet``,
``winrate.parquet``, ``winrate_mean.parquet`` and ``bracket.parquet`` (results written before the last
three existed lack them: they read as empty tables);
each per-prompt table is one file or a directory of shards (``part-NNNNN.parquet``, one per bucket),
which pyarrow reads like a file. :func:`load_result` reads a local directory whole,
:class:`StoredResult` a run's output on any :class:`~limits_ray.storage.location.Location` table by
table, and :func:`write_result` writes an in-memory result.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from limits_ray.core.errors import InputError
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tables import ReduceResult
from limits_ray.storage.location import Location, local_location
from limits_ray.storage.sample_io import write_table

__all__ = ["REQUIRED", "StoredResult", "load_result", "read_result_table", "write_result"]

REQUIRED = ("frontier", "frontier_mean")
"""The tables every results directory has."""


def read_result_table(output: Location, name: str, required: bool = False, command: str = "report") -> pa.Table:
    """Result table ``name`` of the results directory ``output`` as stored (a file, or a directory of shards).

    An absent table is an empty table of its schema, or, when ``required``, an :class:`InputError`
    that tells the user of ``command`` where to point it.
    """
    location = output.join(f"{name}.parquet")
    if location.exists():
        return location.read_table()
    if required:
        raise InputError(f"{location.uri} does not exist: point {command} at the output directory of a run or a reduce")
    return SCHEMAS[name].empty_table()


def load_result(results_dir: str | Path | Location) -> ReduceResult:
    """The result tables of ``results_dir`` as stored; ``frontier`` and ``frontier_mean`` must be there,
    missing optional tables (bon, convergence) are empty."""
    output = results_dir if isinstance(results_dir, Location) else local_location(results_dir)
    return ReduceResult(**{name: read_result_table(output, name, required=name in REQUIRED) for name in SCHEMAS})


class StoredResult:
    """A run's results as written to ``output``, each table read on first access (callers that need the
    per-prompt tables pay for reading them) and cast to its schema; ``frontier_mean`` may be given."""

    def __init__(self, output: Location, frontier_mean: pa.Table | None = None) -> None:
        self.output = output
        self._tables: dict[str, pa.Table] = {} if frontier_mean is None else {"frontier_mean": frontier_mean}

    def _table(self, name: str) -> pa.Table:
        if name not in self._tables:
            table = read_result_table(self.output, name)
            for field in SCHEMAS[name]:  # a column added since the table was written (bon's winrate): null
                if field.name not in table.column_names:
                    table = table.append_column(field, pa.nulls(table.num_rows, field.type))
            self._tables[name] = table.select(SCHEMAS[name].names).cast(SCHEMAS[name])
        return self._tables[name]

    @property
    def frontier_mean(self) -> pa.Table:
        """The prompt-averaged frontier."""
        return self._table("frontier_mean")

    @property
    def frontier(self) -> pa.Table:
        """Per-prompt frontier rows (all shards)."""
        return self._table("frontier")

    @property
    def bon(self) -> pa.Table:
        """Per-prompt best-of-n rows (all shards)."""
        return self._table("bon")

    @property
    def convergence(self) -> pa.Table:
        """Per-prompt convergence rows (all shards)."""
        return self._table("convergence")

    @property
    def winrate(self) -> pa.Table:
        """Per-prompt win-rate rows (all shards)."""
        return self._table("winrate")

    @property
    def winrate_mean(self) -> pa.Table:
        """The prompt-averaged win rates."""
        return self._table("winrate_mean")

    @property
    def bracket(self) -> pa.Table:
        """The certified bracket past the trusted range."""
        return self._table("bracket")


def write_result(result: ReduceResult, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.parquet`` for each table of ``result`` into ``out_dir`` (each atomically); returns the paths."""
    paths = []
    for name in SCHEMAS:
        path = Path(out_dir) / f"{name}.parquet"
        write_table(getattr(result, name), path)
        paths.append(path)
    return paths
