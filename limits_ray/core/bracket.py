"""Past the trusted range: a certified bracket of the frontier (``align = eval``).

MATH.md, "Past the trusted range: a certified bracket". The set of achievable ``(KL, gain)`` pairs is
convex (a mixture of two policies has at most the mixed KL and exactly the mixed gain), so the frontier
``g*(K)`` of a prompt set (the prompt-mean frontier: a common beta is the optimal split of a KL
budget over prompts) is concave and non-decreasing, with slope ``beta`` at the point of ``pi_beta``.

* Upper bound (:func:`upper_bound`). For any beta, Gibbs' inequality
  ``E_pi[r] <= beta KL(pi || pi0) + beta log E_pi0[exp(r/beta)]`` gives
  ``g*(K) <= beta K + h(beta)``, ``h(beta) = beta log Z - E_pi0[r] = gain(beta) - beta KL(beta)``: the
  tangent at ``pi_beta``. At the *anchor*, the smallest trusted beta ``beta0`` whose prompt mean has an
  interval (the last trusted point ``(K0, g0)``), ``U(K) = g0_hi + beta0 (K - K0)`` with ``g0_hi`` the
  upper end of the 95% interval of the gain at ``K0`` (:func:`limits_ray.core.headline.gain_at_kl`, whose SE
  has the fixed-KL influence function of ``h``). The line holds for every beta, so an error in the
  slope does not break it: only ``h(beta0)``'s error matters.
* Lower bound (:func:`lower_bound`). Every achievable point with KL at most ``K`` bounds ``g*(K)`` from
  below, and so does every mixture of such points (convexity). The *certified* points are those the
  data vouch for, each at the far end of its interval: ``(0, 0)`` (``pi0`` itself); best-of-n at
  ``KL = log n - (n-1)/n`` (its KL for continuous rewards, an upper bound with ties) and the lower end of
  its prompt-mean gain (jackknife SEs; ``n < N``); every trusted tilted point at
  ``(kl + 1.96 kl_se, gain - 1.96 gain_se)``; and measured policies at
  ``(kl + 1.96 kl_se, gain - 1.96 gain_se)`` (``limits-ray compare``). ``L(K)`` is their upper
  concave envelope at ``K``, constant beyond the point of largest gain (``g*`` is non-decreasing).

Each bound is one-sided at 97.5%, so the bracket ``[L(K), U(K)]`` holds with about 95% or more (the
lower side has slack: best-of-n lies strictly under the frontier). The ``bracket`` table
(:func:`bracket_table`) gives it on a grid of KL values from ``K0`` to past ``log N`` (and to the
largest policy's KL), for every ``align = eval`` frontier; :func:`bracket_at` reads it at any budget
``K >= K0`` (``U`` from the anchor's line, ``L`` interpolated: a chord of a concave function lies under
it). The prompt means and the gain at ``K0`` come from :mod:`limits_ray.core.headline`. Pure numpy/pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.bon import bon_kl_bound
from limits_ray.core.headline import Z95, FrontierPoints, frontier_points, gain_at_kl, mean_sums, mean_table
from limits_ray.core.schemas import SCHEMAS

__all__ = [
    "Anchor", "BON_MEAN_COLUMNS", "Bracket", "GRID_POINTS", "anchor", "bon_means", "bon_sums", "bracket_at", "bracket_table",
    "certified_points", "lower_bound", "upper_bound",
]

GRID_POINTS = 32
"""Log-spaced KL values per frontier in the ``bracket`` table (the certified points' KLs are added)."""

BON_MEAN_COLUMNS = {"gain": "gain", "gain_se": "gain_se", "gain_bc": "gain", "kl": "kl", "kl_se": 0.0, "kl_bc": "kl",
                    "reliable": True}
"""The ``bon`` columns that play the frontier's parts in the prompt mean (:mod:`limits_ray.core.headline`)."""


def bon_sums(bon: pa.Table) -> pa.Table:
    """Mergeable per-(align, eval, n) sums of a ``bon`` table's prompts (:func:`limits_ray.core.headline.mean_sums`)."""
    return mean_sums(bon, BON_MEAN_COLUMNS, key="n")


def bon_means(sums: pa.Table | list[pa.Table]) -> pa.Table:
    """Prompt-mean best-of-n points: align, eval, n, prompts, gain, gain_se (within prompts; NaN where some
    prompt has none, n = N), kl, reliable, gain_spread_se, kl_spread_se."""
    return mean_table(sums, BON_MEAN_COLUMNS, key="n", key_type=pa.int64())


@dataclass
class Anchor:
    """The last trusted point with an interval: ``beta``, ``kl`` (``K0``) and the upper end ``gain_hi`` of its gain."""

    beta: float
    kl: float
    gain_hi: float


def anchor(points: FrontierPoints) -> Anchor | None:
    """The smallest trusted beta with a finite gain SE (None: no such beta)."""
    usable = np.flatnonzero(points.trusted & np.isfinite(points.gain_se) & np.isfinite(points.kl))
    if usable.size == 0:
        return None
    last = usable[np.argmax(points.kl[usable])]
    gain, se = gain_at_kl(points, float(points.kl[last]))
    return Anchor(float(points.beta[last]), float(points.kl[last]), gain + Z95 * se)


def upper_bound(where: Anchor | None, kl: np.ndarray) -> np.ndarray:
    """``U(K) = gain_hi + beta0 (K - K0)`` (NaN without an anchor)."""
    kl = np.asarray(kl, dtype=np.float64)
    if where is None:
        return np.full(kl.shape, np.nan)
    return where.gain_hi + where.beta * (kl - where.kl)


def certified_points(points: FrontierPoints, bon: pa.Table | None = None,
                     policies: pa.Table | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(kl, gain, source)`` of the certified achievable points of one frontier (module doc), ``(0, 0)`` first.

    ``bon``: its prompt-mean best-of-n rows (:func:`bon_means`); ``policies``: rows with policy, kl, kl_se,
    gain, gain_se (``policies.parquet``'s checkpoints).
    """
    kl, gain, source = [0.0], [0.0], ["base"]
    for index in np.flatnonzero(points.trusted & np.isfinite(points.gain_se) & np.isfinite(points.kl_se)):
        kl.append(points.kl[index] + Z95 * points.kl_se[index])
        gain.append(points.gain[index] - Z95 * points.gain_se[index])
        source.append(f"tilt beta={points.beta[index]:.3g}")
    if bon is not None:
        for row in bon.to_pylist():
            if row["gain_se"] is not None and np.isfinite(row["gain_se"]) and row["n"] > 1:
                kl.append(float(bon_kl_bound(np.array([row["n"]]))[0]))
                gain.append(row["gain"] - Z95 * row["gain_se"])
                source.append(f"best-of-{row['n']}")
    if policies is not None:
        for row in policies.to_pylist():
            if all(row[name] is not None and np.isfinite(row[name]) for name in ("kl", "kl_se", "gain", "gain_se")):
                kl.append(row["kl"] + Z95 * row["kl_se"])
                gain.append(row["gain"] - Z95 * row["gain_se"])
                source.append(f"policy {row['policy']}")
    return np.array(kl), np.array(gain), source


def lower_bound(kl_points: np.ndarray, gain_points: np.ndarray, sources: list[str],
                kl: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``L(K)``: the upper concave envelope of the points (mixtures), constant beyond its highest; and its source.

    The source names the point or the two points mixed (``"mix(a, b)"``).
    """
    kl = np.asarray(kl, dtype=np.float64)
    order = np.lexsort((-gain_points, kl_points))
    hull: list[int] = []
    best = -np.inf
    for index in order:  # the points not dominated (more gain at no more KL), then their upper hull
        if gain_points[index] <= best:
            continue
        best = gain_points[index]
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = ((kl_points[h], gain_points[h]) for h in hull[-2:])
            x3, y3 = kl_points[index], gain_points[index]
            if (y2 - y1) * (x3 - x1) <= (y3 - y1) * (x2 - x1):  # the middle point lies on or under the chord
                hull.pop()
            else:
                break
        hull.append(index)
    x, y = kl_points[hull], gain_points[hull]
    values = np.interp(kl, x, y, left=np.nan, right=y[-1])
    where = np.searchsorted(x, kl, side="right")  # hull[where - 1] <= K < hull[where]
    labels = []
    for position, value in zip(where, kl):
        if position >= len(hull) or np.isclose(value, x[position - 1]):
            labels.append(sources[hull[min(position, len(hull)) - 1]])
        else:
            labels.append(f"mix({sources[hull[position - 1]]}, {sources[hull[position]]})")
    return values, labels


def bracket_table(frontier_mean: pa.Table, bon: pa.Table | None = None, policies: pa.Table | None = None,
                  grid_points: int = GRID_POINTS) -> pa.Table:
    """The ``bracket`` table: per ``align = eval`` frontier, ``[L(K), U(K)]`` past the trusted range.

    ``bon``: prompt-mean best-of-n rows (:func:`bon_means`); ``policies``: ``policies.parquet`` rows (those
    of kind ``checkpoint`` with the frontier's align and eval are used). The KL grid runs log-spaced from
    the anchor's ``K0`` (without an anchor: from the smallest positive certified KL, or 0.01) to the largest
    of: the frontier's largest KL, ``log(2 n_max)`` (past ``log N`` for best-of-n sizes ``n_max <= N``) and
    the policies' KLs (upper ends); the certified points' KLs in that range are added.
    """
    rows = []
    pairs = sorted({(a, e) for a, e in zip(frontier_mean["align"].to_pylist(), frontier_mean["eval"].to_pylist()) if a == e})
    for align, evaluation in pairs:
        points = frontier_points(frontier_mean, align, evaluation)
        best = _select(bon, align, evaluation)
        mine = _select(policies, align, evaluation)
        if mine is not None and "kind" in mine.column_names:
            mine = mine.filter(pc.equal(mine["kind"], "checkpoint"))
        kl_points, gain_points, sources = certified_points(points, best, mine)
        where = anchor(points)
        ends = [np.nanmax(points.kl) if points.kl.size else 0.0, *kl_points]
        if best is not None and best.num_rows:
            ends.append(float(np.log(2 * max(best["n"].to_pylist()))))
        start = where.kl if where is not None else (kl_points[kl_points > 0].min() if (kl_points > 0).any() else 0.01)
        start = max(start, 1e-6)
        stop = max(max(ends), 1.5 * start)
        grid = np.geomspace(start, stop, grid_points)
        grid = np.unique(np.concatenate([grid, kl_points[(kl_points > start) & (kl_points < stop)]]))
        lower, labels = lower_bound(kl_points, gain_points, sources, grid)
        upper = upper_bound(where, grid)
        for kl, low, high, label in zip(grid, lower, upper, labels):
            rows.append({
                "align": align, "eval": evaluation, "kl": float(kl), "lower": float(low), "upper": float(high),
                "lower_source": label, "anchor_beta": where.beta if where else float("nan"),
                "anchor_kl": where.kl if where else float("nan"), "anchor_gain_hi": where.gain_hi if where else float("nan"),
            })
    return pa.Table.from_pylist(rows, schema=SCHEMAS["bracket"])


def _select(table: pa.Table | None, align: str, evaluation: str) -> pa.Table | None:
    if table is None or table.num_rows == 0:
        return None
    return table.filter(pc.and_(pc.equal(table["align"], align), pc.equal(table["eval"], evaluation)))


@dataclass
class Bracket:
    """The certified bracket of one frontier at a KL budget: ``lower <= g*(kl) <= upper`` (NaN: no bound)."""

    align: str
    eval: str
    kl: float
    lower: float
    upper: float
    lower_source: str
    anchor_kl: float


def bracket_at(bracket: pa.Table, kl_budget: float, align: str, evaluation: str) -> Bracket | None:
    """The bracket at ``kl_budget`` from a ``bracket`` table (None: no rows for the frontier, or a budget
    below the grid's start, which lies inside the trusted range)."""
    rows = _select(bracket, align, evaluation)
    if rows is None or rows.num_rows == 0:
        return None
    rows = rows.sort_by("kl")
    kl = rows["kl"].to_numpy()
    if kl_budget < kl[0] - 1e-12:
        return None
    lower = rows["lower"].to_numpy()
    position = min(int(np.searchsorted(kl, kl_budget, side="right")) - 1, kl.size - 1)
    first = rows.slice(0, 1).to_pylist()[0]
    line = (Anchor(first["anchor_beta"], first["anchor_kl"], first["anchor_gain_hi"])
            if np.isfinite(first["anchor_beta"]) else None)
    return Bracket(align, evaluation, float(kl_budget), float(np.interp(kl_budget, kl, lower)),
                   float(upper_bound(line, np.array([kl_budget]))[0]), rows["lower_source"][position].as_py(),
                   first["anchor_kl"])
