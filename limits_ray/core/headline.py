"""The two headline numbers that the frontier's extensions read: a prompt mean with its SE, and the
frontier's gain at a KL with its interval.

The certified bracket (:mod:`limits_ray.core.bracket`), the win rate (:mod:`limits_ray.core.winrate`)
and the frontier from several proposals (:mod:`limits_ray.core.proposals`) take these numbers only
through the functions here, so that a change of how prompt-averaged numbers are centred and how their
error bars are computed reaches all of them at once:

* :func:`mean_sums` / :func:`mean_table`: the prompt mean of a per-prompt table with its error bars
  (MATH.md, "The prompt mean"): :func:`limits_ray.core.prompt_mean.prompt_sums` and
  :func:`~limits_ray.core.prompt_mean.prompt_means` (through :func:`limits_ray.core.frontier.frontier_sums`
  and :func:`~limits_ray.core.frontier.mean_from_sums`) on the table's columns renamed to the frontier's.
  The centre is the mean of the bias-corrected column; the within-prompt SE adds up the rows'
  delta-method SEs (``*_se_delta`` where the table has them, else its interval SEs), with the bias
  allowance of unreliable rows (``bias_allowance``) and the drift; the between-prompt SE is
  ``sd_x / sqrt(P)``. Sums of disjoint prompt sets merge (:func:`merge_mean_sums`), so the job's bucket
  tasks and the offline reduce return only sums.
* :func:`frontier_points`: one (align, eval) frontier's points with the centre and the within-prompt SEs
  that an interval uses, and whether each beta is trusted: ``frontier_mean``'s ``gain``, ``kl`` (the
  prompt means of the bias-corrected estimates), ``gain_se``, ``kl_se``, and the frontier's slope and
  fixed-KL error bar (``slope``, ``kl_dbeta``, ``gain_se_at_kl``).
* :func:`gain_at_kl`: the gain at a KL budget ``K`` with its SE: :func:`limits_ray.core.fixed_kl.at_kl`
  (Hermite in log KL between grid points, the SE of the gain at a fixed *KL*, whose influence function
  is ``beta (w/mean(w) - 1) - (r - mean(r))`` for ``e = r``; MATH.md, "The frontier at a fixed KL"). For
  ``e = r`` it is the SE of the tangent's intercept ``gain - beta KL`` that the bracket's upper bound
  needs. Tables written before the fixed-KL columns existed fall back to linear interpolation of the
  fixed-beta SE (conservative there).

Pure pyarrow/numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.fixed_kl import at_kl, error_bar
from limits_ray.core.frontier import frontier_sums, mean_from_sums, merge_sums
from limits_ray.core.reliability import TRUSTED_FRACTION, trusted_count

__all__ = ["FrontierPoints", "Z95", "frontier_points", "gain_at_kl", "mean_sums", "mean_table", "merge_mean_sums"]

Z95 = 1.959963984540054
"""The normal 97.5% quantile: each side of a 95% interval, and each one-sided bound of the bracket."""

_INPUTS = ("gain", "gain_se", "gain_bc", "kl", "kl_se", "kl_bc", "reliable")
"""The frontier columns :func:`mean_sums` reads; a mapping names the table's column for each (or a constant)."""

_OPTIONAL = ("gain_se_delta", "kl_se_delta", "bias_allowance", "khat_pooled", "khat")
"""Frontier columns a mapping may add: the delta-method SEs that the prompt mean adds up (without them it
adds up the interval SEs ``gain_se``, ``kl_se``), the rows' bias allowances (default 0) and the k-hats that
scale the delta SEs (:func:`limits_ray.core.prompt_mean.variance_factor`)."""


def _view(table: pa.Table, columns: Mapping[str, str | float | bool], key: str) -> pa.Table:
    """``table`` as a ``frontier`` table: prompt_id, align, eval, beta (``key`` as float) and the inputs."""
    rows = table.num_rows
    view = {"prompt_id": table["prompt_id"], "align": table["align"], "eval": table["eval"],
            "beta": pc.cast(table[key], pa.float64())}
    for name in (*_INPUTS, *(name for name in _OPTIONAL if name in columns)):
        source = columns[name]
        if isinstance(source, str):
            view[name] = table[source]
        else:
            view[name] = pa.array(np.full(rows, source, dtype=bool if name == "reliable" else np.float64))
    return pa.table(view)


def mean_sums(table: pa.Table, columns: Mapping[str, str | float | bool], key: str = "beta") -> pa.Table:
    """Per (align, eval, ``key``): the mergeable sums behind the prompt mean of a per-prompt ``table``.

    ``columns`` maps each of the frontier's inputs (gain, gain_se, gain_bc, kl, kl_se, kl_bc, reliable;
    optionally gain_se_delta, kl_se_delta, bias_allowance, khat_pooled, khat) to the column of ``table``
    that plays its part, or to a constant (e.g. ``kl_se: 0.0`` for a KL known exactly). ``table`` has
    prompt_id, align, eval and ``key``, one row per prompt and group.
    """
    return frontier_sums(_view(table, columns, key))


def merge_mean_sums(sums: list[pa.Table]) -> pa.Table:
    """Add :func:`mean_sums` tables of disjoint prompt sets."""
    return merge_sums(sums)


_OUTPUTS = {"gain": "gain_plugin", "gain_bc": "gain", "gain_se": "gain_se", "kl": "kl_plugin", "kl_bc": "kl",
            "kl_se": "kl_se", "reliable": "reliable"}
"""Which ``frontier_mean`` column each input's column receives in :func:`mean_table`."""


def mean_table(sums: pa.Table | list[pa.Table], columns: Mapping[str, str | float | bool], key: str = "beta",
               key_type: pa.DataType = pa.float64()) -> pa.Table:
    """The prompt means of :func:`mean_sums` tables, named in the per-prompt table's columns.

    Columns: align, eval, ``key``, prompts, then for each input mapped to a column name: the mean
    (``gain`` <- the plain mean of its column, ``gain_bc`` <- the mean of the bias-corrected column, the
    centre of the interval; ``reliable`` <- the fraction of reliable prompts), ``<gain column>_spread_se``
    and ``<kl column>_spread_se`` (between prompts); the ``*_se`` inputs become the within-prompt error
    bars (NaN: not trusted).
    """
    mean = mean_from_sums(sums)
    out = {"align": mean["align"], "eval": mean["eval"], key: pc.cast(mean["beta"], key_type), "prompts": mean["prompts"]}
    for name in ("gain_bc", "kl_bc", *_INPUTS):  # the centres first where a column plays both parts
        if isinstance(columns[name], str) and columns[name] not in out:
            out[columns[name]] = mean[_OUTPUTS[name]]
    for name in ("gain", "kl"):
        if isinstance(columns[name], str):
            out[f"{columns[name]}_spread_se"] = mean[f"{name}_spread_se"]
    return pa.table(out)


@dataclass
class FrontierPoints:
    """One (align, eval) prompt-mean frontier, sorted by beta descending (KL ascending).

    ``kl``/``gain`` the centres of the intervals ``kl +- 1.96 kl_se``, ``gain +- 1.96 gain_se`` (NaN SE:
    not trusted); ``trusted``: the beta lies in the trusted range
    (:func:`limits_ray.core.reliability.trusted_count`); ``slope``, ``kl_dbeta``, ``gain_se_at_kl``: the
    frontier's ``d gain / d KL``, ``d KL / d beta`` and fixed-KL error bar (None: a table written before them).
    """

    beta: np.ndarray
    kl: np.ndarray
    kl_se: np.ndarray
    gain: np.ndarray
    gain_se: np.ndarray
    trusted: np.ndarray
    slope: np.ndarray | None = None
    kl_dbeta: np.ndarray | None = None
    gain_se_at_kl: np.ndarray | None = None


def frontier_points(frontier_mean: pa.Table, align: str, evaluation: str) -> FrontierPoints:
    """The points of one (align, eval) frontier of a ``frontier_mean`` table (see the module doc)."""
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], evaluation)))
    order = np.argsort(rows["beta"].to_numpy())[::-1]
    legacy = "gain_bc" in rows.column_names  # written before the centre became the bias-corrected mean

    def column(name: str) -> np.ndarray | None:
        if name not in rows.column_names:
            return None
        return rows[name].to_numpy(zero_copy_only=False)[order].astype(np.float64)

    trusted = np.zeros(order.size, bool)
    if "reliable" in rows.column_names:
        trusted[:trusted_count(rows["reliable"].to_numpy()[order], TRUSTED_FRACTION)] = True
    return FrontierPoints(column("beta"), column("kl_bc" if legacy else "kl"), column("kl_se"),
                          column("gain_bc" if legacy else "gain"), column("gain_se"), trusted,
                          column("slope"), column("kl_dbeta"), column("gain_se_at_kl"))


def gain_at_kl(points: FrontierPoints, kl_budget: float) -> tuple[float, float]:
    """The frontier's gain at ``KL = kl_budget`` and its SE, inside the grid's KL range (else NaN); see the
    module doc."""
    if points.kl.size == 0 or not np.nanmin(points.kl) <= kl_budget <= np.nanmax(points.kl):
        return float("nan"), float("nan")
    _, gain, se = at_kl(points.kl, points.beta, points.gain, kl_budget, points.slope, points.kl_dbeta,
                        error_bar(points.slope, points.gain_se_at_kl, points.gain_se))
    return gain, se
