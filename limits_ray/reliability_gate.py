"""The cross-prompt reliability gate of the per-prompt tables (frontier, convergence).

One prompt's sample cannot tell a benign tail from an upper tail (or a higher reward level) it
missed (:mod:`limits_ray.psis`), so a row is ``reliable`` only where its own test passes
(:meth:`limits_ray.stats.TiltStats.finalize`: k-hat below ``min(1 - 1/log10 N, 0.7)``, ESS >= 20) and
the prompts of its cell (itself included) back it (:func:`gate_rows`):

- *pooled k-hat*: its k-hat shrunk toward what the cell predicts for it from ``body_sd / beta``
  (:func:`limits_ray.psis.pooled_khat`), ``khat_pooled``, is below :data:`limits_ray.psis.POOLED_KHAT_LIMIT`;
- *the cell's line*: the cell's least-squares line of k-hat on ``body_sd / beta`` is below that limit at
  the prompt's covariate too. When a minority of heavier-tailed prompts that ``body_sd`` does not set
  apart inflates the cell's spread, the shrinkage stops and the pooled k-hat is the prompt's own again;
  then the prompts that pass are those whose sample missed the tail. The line does not look at the
  prompt's own tail;
- *the cell's ESS*: the cell's line of ``log ESS`` on the covariate predicts an ESS of at least
  :data:`limits_ray.stats.ESS_FLOOR`: where the tilt rests on a few samples, a prompt passes the ESS
  floor by having drawn more of the rare top rewards than its share (its estimate then too high);
- *tied top rewards*: a prompt whose largest reward is repeated (or whose k-hat cannot be fitted for
  ties: NaN) has weights that look bounded, which is no passed test: an unseen higher reward is not
  in its sample. It passes only where its cell has at least :data:`limits_ray.psis.POOL_MIN_PROMPTS`
  prompts and none of them reached a higher reward;
- *the expansion*: the first-order bias correction is within :data:`EXPANSION_LIMIT` of the row's
  delta-method SE (``|gain_bc - gain| <= gain_se_delta``, likewise the KL). Both come from the same
  second-order expansion; where the correction is as large as the error the expansion does not hold
  (bounded weights at a strong tilt: the estimate is a flat function of the sample there, its SE
  tiny). A zero SE (constant rewards) fails it too.

Where a row is not reliable, ``gain_se`` and ``kl_se`` are NaN. ``bias_allowance`` says what the
prompt mean (:mod:`limits_ray.prompt_mean`) allows for the row's bias, in units of its own
delta-method SE: 0 where it is reliable, or fails only its own k-hat/ESS test in a cell that passes
every cell test with a fitted line (its sample saw more of the tail than the others: an ordinary
member of a benign cell, biased up if anything); infinite otherwise: nothing bounds its bias, and the
prompt mean gets no error bar. (A bound of one SE for rows that pass their own test in a cell whose
k-hat fails was tried: those rows are the ones whose sample missed the tail, and the prompt mean's
interval covered 0.62 at 1e3 prompts with 1% of them, bench/bench_prompt_mean.py.)

The cells are (align, eval, beta) for the frontier and (align, eval, n_samples, beta) for the
convergence table. Two passes keep this off any one process's memory: :func:`khat_sums` of each
part of a table (a bucket's shard, a flush of rows) are small per-cell sums (and one maximum) that
:func:`merge_khat_sums` combines; :func:`apply_pooled` then gates each part with the merged sums.
The result does not depend on how the prompts were split into parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from limits_ray.psis import POOL_MIN_PROMPTS, POOL_SUMS, POOLED_KHAT_LIMIT, cell_line, khat_pool_terms, passes_gate, pooled_khat
from limits_ray.stats import ESS_FLOOR

__all__ = [
    "CELL_MAXIMA", "CELL_SUMS", "EXPANSION_LIMIT", "GateResult", "POOLED_TABLES", "apply_pooled", "cell_terms", "cell_totals",
    "gate_cells", "gate_rows", "khat_sums", "merge_khat_sums", "pool_whole",
]

POOLED_TABLES: dict[str, tuple[str, ...]] = {
    "frontier": ("align", "eval", "beta"),
    "convergence": ("align", "eval", "n_samples", "beta"),
}
"""The tables the gate applies to, and the columns naming a cell of each."""
_SIZE = {"frontier": "n", "convergence": "n_samples"}  # the sample-count column of each table

EXPANSION_LIMIT = 1.0
"""Largest ``|bias correction| / delta-method SE`` (gain and KL) of a reliable row (see the module doc)."""

CELL_SUMS = (*POOL_SUMS, "rows", "ess_count", "ess_x_sum", "ess_x_sq_sum", "ess_y_sum", "ess_xy_sum")
"""Per-cell sums: the pooled k-hat's (:data:`limits_ray.psis.POOL_SUMS`), the rows, and the line of ``log ESS`` on the covariate."""
CELL_MAXIMA = ("reward_top",)
"""Per-cell maxima: the largest reward any prompt of the cell drew."""
ROW_FIELDS = ("khat", "n", "body_sd", "beta", "reliable", "ess", "gain", "gain_bc", "gain_se_delta", "kl", "kl_bc",
              "kl_se_delta", "reward_max", "top_tied")
"""What :func:`gate_rows` reads of each row (``n``: the sample count)."""
_SUMS = tuple(f"pool_{name}" for name in CELL_SUMS)
_MAXIMA = tuple(f"pool_{name}" for name in CELL_MAXIMA)
GATE_ROWS = 1 << 17
"""Rows :func:`apply_pooled` gates at once."""


@dataclass
class GateResult:
    """Per row: ``reliable``, ``khat_pooled`` and ``bias_allowance`` (module doc)."""

    reliable: np.ndarray
    khat_pooled: np.ndarray
    bias_allowance: np.ndarray


def _covariate(fields: dict[str, np.ndarray]) -> np.ndarray:
    """``body_sd / beta``: how far the tilt reaches into a prompt's rewards (the covariate of :func:`pooled_khat`)."""
    return np.asarray(fields["body_sd"], np.float64) / np.asarray(fields["beta"], np.float64)


def cell_terms(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's terms of :data:`CELL_SUMS` (summed over a cell) and :data:`CELL_MAXIMA` (maximised)."""
    covariate = _covariate(fields)
    khat = np.asarray(fields["khat"], np.float64)
    terms = dict(zip(POOL_SUMS, khat_pool_terms(khat, fields["n"], covariate)))
    ess = np.asarray(fields["ess"], np.float64)
    used = np.isfinite(covariate) & (ess > 0) & np.isfinite(ess)
    x = np.where(used, covariate, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(used, np.log(np.where(used, ess, 1.0)), 0.0)
    terms.update(rows=np.ones(khat.shape), ess_count=used.astype(np.float64), ess_x_sum=x, ess_x_sq_sum=x * x,
                 ess_y_sum=y, ess_xy_sum=x * y)
    reward = np.asarray(fields["reward_max"], np.float64)
    terms["reward_top"] = np.where(np.isfinite(reward), reward, -np.inf)
    return terms


def cell_totals(fields: dict[str, np.ndarray], axis: int = 0) -> dict[str, np.ndarray]:
    """:func:`cell_terms` summed (maxima: maximised) along ``axis``, which runs over a cell's prompts (in memory)."""
    terms = cell_terms(fields)
    return {name: (terms[name].max(axis=axis) if name in CELL_MAXIMA else terms[name].sum(axis=axis))
            for name in (*CELL_SUMS, *CELL_MAXIMA)}


def gate_rows(fields: dict[str, np.ndarray], cells: dict[str, np.ndarray]) -> GateResult:
    """The gate of rows ``fields`` (:data:`ROW_FIELDS`) given their cells' totals ``cells`` (:func:`cell_totals`,
    broadcast to the rows; a cell with no rows has count 0). See the module doc."""
    covariate = _covariate(fields)
    khat = np.asarray(fields["khat"], np.float64)
    pooled = pooled_khat(khat, fields["n"], covariate, *(cells[name] for name in POOL_SUMS))
    k_line = cell_line(cells["count"], cells["x_sum"], cells["x_sq_sum"], cells["k_sum"], cells["xk_sum"], covariate)
    ess_line = cell_line(cells["ess_count"], cells["ess_x_sum"], cells["ess_x_sq_sum"], cells["ess_y_sum"],
                         cells["ess_xy_sum"], covariate)
    own = np.asarray(fields["reliable"], bool)
    with np.errstate(invalid="ignore"):
        expansion = np.ones(own.shape, bool)
        for name in ("gain", "kl"):
            correction = np.abs(np.asarray(fields[f"{name}_bc"], np.float64) - np.asarray(fields[name], np.float64))
            expansion &= correction <= EXPANSION_LIMIT * np.asarray(fields[f"{name}_se_delta"], np.float64)
        tied = np.asarray(fields["top_tied"], bool)
        reward = np.asarray(fields["reward_max"], np.float64)
        ties_ok = ~tied | ((cells["rows"] >= POOL_MIN_PROMPTS) & (reward >= cells["reward_top"]))
        tail_ok = passes_gate(np.ones(own.shape, bool), pooled) & ~(k_line >= POOLED_KHAT_LIMIT)
        ess_ok = ~(ess_line < np.log(ESS_FLOOR))
    cell_ok = expansion & ties_ok & ess_ok & tail_ok
    reliable = own & cell_ok
    ordinary = ~own & cell_ok & np.isfinite(k_line)
    return GateResult(reliable, pooled, np.where(reliable | ordinary, 0.0, np.inf))


def gate_cells(fields: dict[str, np.ndarray], axis: int = 0) -> GateResult:
    """:func:`gate_rows` of arrays whose ``axis`` runs over the prompts of each cell (all in memory: benchmarks)."""
    cells = {name: np.expand_dims(total, axis) for name, total in cell_totals(fields, axis).items()}
    return gate_rows(fields, cells)


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False)


def _fields(table: pa.Table, name: str) -> dict[str, np.ndarray]:
    return {field: _column(table, _SIZE[name] if field == "n" else field) for field in ROW_FIELDS}


def khat_sums(table: pa.Table, name: str) -> pa.Table:
    """Per-cell :data:`CELL_SUMS` and :data:`CELL_MAXIMA` (:func:`cell_terms`) of ``table``, :data:`GATE_ROWS` rows at a time."""
    keys = list(POOLED_TABLES[name])
    parts = []
    for start in range(0, max(table.num_rows, 1), GATE_ROWS):
        rows = table.slice(start, GATE_ROWS)
        terms = cell_terms(_fields(rows, name))
        columns = {key: rows[key] for key in keys}
        columns.update({f"pool_{field}": pa.array(terms[field], pa.float64()) for field in (*CELL_SUMS, *CELL_MAXIMA)})
        parts.append(_group(pa.table(columns), keys))
    return parts[0] if len(parts) == 1 else merge_khat_sums(parts, name)


def merge_khat_sums(sums: list[pa.Table], name: str) -> pa.Table:
    """Combine :func:`khat_sums` tables of disjoint prompt sets."""
    return _group(pa.concat_tables(sums), list(POOLED_TABLES[name]))


def _group(table: pa.Table, keys: list[str]) -> pa.Table:
    grouped = table.group_by(keys, use_threads=False).aggregate(
        [(column, "sum") for column in _SUMS] + [(column, "max") for column in _MAXIMA])
    return pa.table({**{key: grouped[key] for key in keys}, **{column: grouped[f"{column}_sum"] for column in _SUMS},
                     **{column: grouped[f"{column}_max"] for column in _MAXIMA}})


def apply_pooled(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    """``table`` (rows in their order) with ``khat_pooled`` and ``bias_allowance`` set and ``reliable``, ``gain_se``,
    ``kl_se`` gated.

    Before the gate a table's ``khat_pooled`` is its own ``khat`` and ``reliable`` the row's own test
    (:class:`limits_ray.reduce.PromptRows`).

    ``sums``: the merged :func:`khat_sums` of every prompt of the run. A cell missing from ``sums`` counts
    as empty: only the row's own test and the expansion apply (and tied top rewards do not pass). Rows are
    gated :data:`GATE_ROWS` at a time (each row needs only its cell's sums), which bounds the join's memory.
    """
    if table.num_rows > GATE_ROWS:
        return pa.concat_tables([_gate(table.slice(start, GATE_ROWS), sums, name)
                                 for start in range(0, table.num_rows, GATE_ROWS)])
    return _gate(table, sums, name)


def _gate(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    keys = list(POOLED_TABLES[name])
    indexed = table.select(keys).append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    joined = indexed.join(sums, keys=keys, join_type="left outer", use_threads=False).sort_by("_row")
    cells = {field[len("pool_"):]: np.nan_to_num(_column(joined, field).astype(np.float64)) for field in _SUMS}  # absent: 0
    cells.update({field[len("pool_"):]: np.nan_to_num(_column(joined, field).astype(np.float64), nan=-np.inf)
                  for field in _MAXIMA})
    gate = gate_rows(_fields(table, name), cells)
    out = table
    for field in ("gain_se", "kl_se"):
        values = _column(out, field).astype(np.float64)
        out = out.set_column(out.schema.get_field_index(field), field, pa.array(np.where(gate.reliable, values, np.nan)))
    for field, values in (("reliable", gate.reliable), ("khat_pooled", gate.khat_pooled),
                          ("bias_allowance", gate.bias_allowance)):
        out = out.set_column(out.schema.get_field_index(field), field, pa.array(values))
    return out


def pool_whole(table: pa.Table, name: str) -> pa.Table:
    """:func:`apply_pooled` of a table that holds every prompt of the run (in-memory reductions)."""
    return apply_pooled(table, khat_sums(table, name), name)
