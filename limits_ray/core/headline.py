"""The two headline numbers that the frontier's extensions read: a prompt mean with its SE, and the
frontier's gain at a KL with its interval.

The certified bracket (:mod:`limits_ray.core.bracket`), the win rate (:mod:`limits_ray.core.winrate`)
and the frontier from several proposals (:mod:`limits_ray.core.proposals`) take these numbers only
through the functions here, so that a change of how prompt-averaged numbers are centred and how their
error bars are computed reaches all of them at once:

* :func:`mean_sums` / :func:`mean_table`: the prompt mean of a per-prompt table with its standard
  errors (MATH.md, "The prompt mean"). Today this is :func:`limits_ray.core.frontier.frontier_sums` and
  :func:`~limits_ray.core.frontier.mean_from_sums` on the table's columns renamed to the frontier's: the
  plain mean, the mean of the bias-corrected column, the within-prompt SE ``sqrt(sum_x se_x^2) / P``
  (NaN where some prompt has none) and the between-prompt SE ``sd_x / sqrt(P)``; sums of disjoint prompt
  sets merge (:func:`merge_mean_sums`), so the job's bucket tasks and the offline reduce return only sums.
* :func:`frontier_points`: one (align, eval) frontier's points with the centre and the within-prompt SEs
  that an interval uses, and whether each beta is trusted. Today: the centre is the prompt mean of the
  bias-corrected estimates (``gain_bc``, ``kl_bc`` of ``frontier_mean``), the SEs ``gain_se``, ``kl_se``
  (``gain_bc +- 1.96 gain_se`` is the 95% interval, README "Offline").
* :func:`gain_at_kl`: the gain at a KL budget ``K`` with its SE. Today: :func:`frontier_points`'
  centre and ``gain_se`` interpolated linearly in KL, the SE of the gain at a fixed *beta*. The SE of
  the gain at a fixed *KL* has the influence function ``beta (w/mean(w) - 1) - (r - mean(r))`` (MATH.md,
  "The frontier at a fixed KL"); for ``e = r`` it is the SE of the tangent's intercept
  ``gain - beta KL`` that the bracket's upper bound needs, and smaller than the fixed-beta SE used
  today (on Gaussian rewards ``Var = (e^t - 1)/t - 1`` against ``(1 + t) e^t - 1`` per sample,
  ``t = sigma^2/beta^2``), so today's bracket is conservative there.

Pure pyarrow/numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.frontier import frontier_sums, mean_from_sums, merge_sums
from limits_ray.core.reliability import TRUSTED_FRACTION, trusted_count

__all__ = ["FrontierPoints", "Z95", "frontier_points", "gain_at_kl", "mean_sums", "mean_table", "merge_mean_sums"]

Z95 = 1.959963984540054
"""The normal 97.5% quantile: each side of a 95% interval, and each one-sided bound of the bracket."""

_INPUTS = ("gain", "gain_se", "gain_bc", "kl", "kl_se", "kl_bc", "reliable")
"""The frontier columns :func:`mean_sums` reads; a mapping names the table's column for each (or a constant)."""


def _view(table: pa.Table, columns: Mapping[str, str | float | bool], key: str) -> pa.Table:
    """``table`` as a ``frontier`` table: prompt_id, align, eval, beta (``key`` as float) and the inputs."""
    rows = table.num_rows
    view = {"prompt_id": table["prompt_id"], "align": table["align"], "eval": table["eval"],
            "beta": pc.cast(table[key], pa.float64())}
    for name in _INPUTS:
        source = columns[name]
        if isinstance(source, str):
            view[name] = table[source]
        else:
            view[name] = pa.array(np.full(rows, source, dtype=bool if name == "reliable" else np.float64))
    return pa.table(view)


def mean_sums(table: pa.Table, columns: Mapping[str, str | float | bool], key: str = "beta") -> pa.Table:
    """Per (align, eval, ``key``): the mergeable sums behind the prompt mean of a per-prompt ``table``.

    ``columns`` maps each of the frontier's inputs (gain, gain_se, gain_bc, kl, kl_se, kl_bc, reliable) to
    the column of ``table`` that plays its part, or to a constant (e.g. ``kl_se: 0.0`` for a KL known
    exactly). ``table`` has prompt_id, align, eval and ``key``, one row per prompt and group.
    """
    return frontier_sums(_view(table, columns, key))


def merge_mean_sums(sums: list[pa.Table]) -> pa.Table:
    """Add :func:`mean_sums` tables of disjoint prompt sets."""
    return merge_sums(sums)


def mean_table(sums: pa.Table | list[pa.Table], columns: Mapping[str, str | float | bool], key: str = "beta",
               key_type: pa.DataType = pa.float64()) -> pa.Table:
    """The prompt means of :func:`mean_sums` tables, named in the per-prompt table's columns.

    Columns: align, eval, ``key``, prompts, then for each input mapped to a column name: the mean
    (``gain`` <- the mean of its column, ``gain_bc`` <- the mean of the bias-corrected column,
    ``reliable`` <- the fraction of reliable prompts), ``<gain column>_spread_se`` and
    ``<kl column>_spread_se`` (between prompts); the ``*_se`` inputs become the within-prompt SEs.
    """
    mean = mean_from_sums(sums)
    out = {"align": mean["align"], "eval": mean["eval"], key: pc.cast(mean["beta"], key_type), "prompts": mean["prompts"]}
    for name in _INPUTS:
        if isinstance(columns[name], str) and columns[name] not in out:
            out[columns[name]] = mean[name]
    for name in ("gain", "kl"):
        if isinstance(columns[name], str):
            out[f"{columns[name]}_spread_se"] = mean[f"{name}_spread_se"]
    return pa.table(out)


@dataclass
class FrontierPoints:
    """One (align, eval) prompt-mean frontier, sorted by beta descending (KL ascending).

    ``kl``/``gain`` the centres of the intervals ``kl +- 1.96 kl_se``, ``gain +- 1.96 gain_se`` (NaN SE:
    some prompt has no interval); ``trusted``: the beta lies in the trusted range
    (:func:`limits_ray.core.reliability.trusted_count`).
    """

    beta: np.ndarray
    kl: np.ndarray
    kl_se: np.ndarray
    gain: np.ndarray
    gain_se: np.ndarray
    trusted: np.ndarray


def frontier_points(frontier_mean: pa.Table, align: str, evaluation: str) -> FrontierPoints:
    """The points of one (align, eval) frontier of a ``frontier_mean`` table (see the module doc)."""
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], evaluation)))
    order = np.argsort(rows["beta"].to_numpy())[::-1]
    column = {name: rows[name].to_numpy()[order].astype(np.float64) for name in ("beta", "kl_bc", "kl_se", "gain_bc", "gain_se")}
    trusted = np.zeros(order.size, bool)
    if "reliable" in rows.column_names:
        trusted[:trusted_count(rows["reliable"].to_numpy()[order], TRUSTED_FRACTION)] = True
    return FrontierPoints(column["beta"], column["kl_bc"], column["kl_se"], column["gain_bc"], column["gain_se"], trusted)


def gain_at_kl(points: FrontierPoints, kl_budget: float) -> tuple[float, float]:
    """The frontier's gain at ``KL = kl_budget`` and its SE, inside the grid's KL range (else NaN)."""
    order = np.argsort(points.kl)
    kl = points.kl[order]
    if kl.size == 0 or not kl[0] <= kl_budget <= kl[-1]:
        return float("nan"), float("nan")
    return (float(np.interp(kl_budget, kl, points.gain[order])), float(np.interp(kl_budget, kl, points.gain_se[order])))
