"""The cross-prompt reliability gate of the per-prompt tables (frontier, convergence).

A prompt's own k-hat cannot tell a benign tail from an upper tail its sample missed
(:mod:`limits_ray.core.psis`), so a row is ``reliable`` only if its own test passes
(:meth:`limits_ray.core.tilt.TiltStats.finalize`) and its k-hat shrunk toward what the prompts of its
cell (itself included) predict for it, ``khat_pooled`` (:func:`limits_ray.core.psis.pooled_khat`, the covariate
``body_sd / beta``), is below :data:`limits_ray.core.psis.POOLED_KHAT_LIMIT`; where it is not, ``gain_se``
and ``kl_se`` are NaN.

The cells are (align, eval, beta) for the frontier and (align, eval, n_samples, beta) for the
convergence table. Two passes keep this off any one process's memory: :func:`khat_sums` of each
part of a table (a bucket's shard, a flush of rows) are small per-cell sums that
:func:`merge_khat_sums` adds up; :func:`apply_pooled` then gates each part with the merged sums.
The result does not depend on how the prompts were split into parts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from limits_ray.core.psis import POOL_SUMS, khat_pool_terms, passes_gate, pooled_khat

__all__ = ["POOLED_TABLES", "apply_pooled", "khat_sums", "merge_khat_sums", "pool_whole"]

POOLED_TABLES: dict[str, tuple[str, ...]] = {
    "frontier": ("align", "eval", "beta"),
    "convergence": ("align", "eval", "n_samples", "beta"),
}
"""The tables the gate applies to, and the columns naming a cell of each."""
_SIZE = {"frontier": "n", "convergence": "n_samples"}  # the sample-count column of each table
_SUMS = tuple(f"pool_{name}" for name in POOL_SUMS)
GATE_ROWS = 1 << 17
"""Rows :func:`apply_pooled` gates at once."""


def _covariate(table: pa.Table) -> np.ndarray:
    """``body_sd / beta``: how far the tilt reaches into a prompt's rewards (the covariate of :func:`pooled_khat`)."""
    return _column(table, "body_sd") / _column(table, "beta")


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False)


def khat_sums(table: pa.Table, name: str) -> pa.Table:
    """Per-cell sums :data:`limits_ray.core.psis.POOL_SUMS` (:func:`khat_pool_terms`) of ``table``, :data:`GATE_ROWS`
    rows at a time."""
    keys = list(POOLED_TABLES[name])
    parts = []
    for start in range(0, max(table.num_rows, 1), GATE_ROWS):
        rows = table.slice(start, GATE_ROWS)
        terms = khat_pool_terms(_column(rows, "khat").astype(np.float64), _column(rows, _SIZE[name]), _covariate(rows))
        columns = {key: rows[key] for key in keys}
        columns.update({field: pa.array(term) for field, term in zip(_SUMS, terms)})
        parts.append(_group_sum(pa.table(columns), keys))
    return parts[0] if len(parts) == 1 else merge_khat_sums(parts, name)


def merge_khat_sums(sums: list[pa.Table], name: str) -> pa.Table:
    """Add :func:`khat_sums` tables of disjoint prompt sets."""
    return _group_sum(pa.concat_tables(sums), list(POOLED_TABLES[name]))


def _group_sum(table: pa.Table, keys: list[str]) -> pa.Table:
    grouped = table.group_by(keys, use_threads=False).aggregate([(column, "sum") for column in _SUMS])
    return pa.table({**{key: grouped[key] for key in keys}, **{column: grouped[f"{column}_sum"] for column in _SUMS}})


def apply_pooled(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    """``table`` (rows in their order) with ``khat_pooled`` set and ``reliable``, ``gain_se``, ``kl_se`` gated.

    Before the gate a table's ``khat_pooled`` is its own ``khat`` (:class:`limits_ray.core.tables.PromptRows`).

    ``sums``: the merged :func:`khat_sums` of every prompt of the run. Where ``khat_pooled`` is NaN
    (a cell of fewer than :data:`limits_ray.core.psis.POOL_MIN_PROMPTS` prompts, or missing from ``sums``;
    a k-hat that is not finite) only the row's own test applies. Rows are gated
    :data:`GATE_ROWS` at a time (each row needs only its cell's sums), which bounds the join's memory.
    """
    if table.num_rows > GATE_ROWS:
        return pa.concat_tables([_gate(table.slice(start, GATE_ROWS), sums, name)
                                 for start in range(0, table.num_rows, GATE_ROWS)])
    return _gate(table, sums, name)


def _gate(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    keys = list(POOLED_TABLES[name])
    indexed = table.select(keys).append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    joined = indexed.join(sums, keys=keys, join_type="left outer", use_threads=False).sort_by("_row")
    cell = [np.nan_to_num(_column(joined, field).astype(np.float64)) for field in _SUMS]  # absent cell: count 0
    pooled = pooled_khat(_column(table, "khat").astype(np.float64), _column(table, _SIZE[name]), _covariate(table), *cell)
    reliable = passes_gate(_column(table, "reliable"), pooled)
    out = table
    for field in ("gain_se", "kl_se"):
        values = _column(out, field).astype(np.float64)
        out = out.set_column(out.schema.get_field_index(field), field, pa.array(np.where(reliable, values, np.nan)))
    out = out.set_column(out.schema.get_field_index("reliable"), "reliable", pa.array(reliable))
    return out.set_column(out.schema.get_field_index("khat_pooled"), "khat_pooled", pa.array(pooled))


def pool_whole(table: pa.Table, name: str) -> pa.Table:
    """:func:`apply_pooled` of a table that holds every prompt of the run (in-memory reductions)."""
    return apply_pooled(table, khat_sums(table, name), name)
