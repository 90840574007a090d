"""KL-reward frontiers: the prompt average, and the inverse questions a user asks of it.

The frontier of a prompt set is ``beta -> (mean_x KL_hat(x, beta), mean_x gain_hat(x, beta))``
(MATH.md, "Estimators"); ``frontier_mean`` holds it, one row per (align, eval, beta), made by
:func:`limits_ray.core.prompt_mean.prompt_means` (the one home of every prompt-averaged number: centre,
error bars, the rule for unreliable prompts, the frontier at a fixed KL; see its module doc):

* ``gain``, ``kl``: the prompt means of the bias-corrected estimates (``gain_plugin``, ``kl_plugin``: of
  the plug-in ones);
* ``gain_se``, ``kl_se`` (within prompts): the prompts are fixed and only their Monte Carlo errors
  count: ``sqrt(sum_x Var_x) / P`` from the delta-method variances, widened by the bias allowance of
  unreliable prompts, NaN (*not trusted*) where that allowance could move the mean by more than
  0.75 of it. More samples per prompt shrink it;
* ``gain_spread_se``, ``kl_spread_se`` (between prompts): the prompts are a random sample of a
  prompt population: ``sd_x(estimate_x) / sqrt(P)`` (sd with ``ddof = 1``; NaN for one prompt). It
  includes the within-prompt noise and the prompts' spread; more prompts shrink it. When it is much
  larger than the within-prompt se, the prompts differ more than sampling explains. (The convergence
  studies call the same two errors ``*_mc_se`` and ``*_spread_se``.)
* ``slope`` (``d gain / d KL``), ``kl_dbeta`` and ``gain_se_at_kl`` (the error bar of the gain at the row's
  KL with beta free): the frontier at a fixed KL, which :func:`point_at_kl` interpolates
  (:mod:`limits_ray.core.fixed_kl`);
* ``reliable``: the fraction ``sum_x 1[reliable_x] / P`` of reliable prompts.

Every column comes from per-group sums and moments over prompts (:func:`frontier_sums`) that add
across disjoint buckets of prompts (:func:`merge_sums`), so the job's bucket tasks and the offline
reducer return only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.fixed_kl import at_kl, error_bar
from limits_ray.core.prompt_mean import between_prompt_se, merge_moments, merge_prompt_sums, prompt_means, prompt_sums
from limits_ray.core.reliability import TRUSTED_FRACTION, trusted_count
from limits_ray.core.schemas import SCHEMAS

__all__ = [
    "FrontierPoint", "between_prompt_se", "frontier_sums", "mean_frontier", "mean_from_sums",
    "merge_moments", "merge_sums", "point_at_kl", "trusted_kl_range",
]

KEYS = ["align", "eval", "beta"]


def frontier_sums(frontier: pa.Table) -> pa.Table:
    """Per (align, eval, beta), sorted: what ``frontier_mean`` needs of a set of prompts
    (:func:`limits_ray.core.prompt_mean.prompt_sums`). Tables of disjoint prompt sets combine with :func:`merge_sums`."""
    return prompt_sums(frontier, KEYS)


def merge_sums(sums: list[pa.Table]) -> pa.Table:
    """Combine :func:`frontier_sums` tables of disjoint prompt sets (same analysis: the same groups)."""
    if not sums:
        raise ValueError("no frontier sums to merge")
    nonempty = [table for table in sums if table.num_rows]
    if any(not nonempty[0].select(KEYS).equals(other.select(KEYS)) for other in nonempty[1:]):
        raise ValueError("frontier sums of different (align, eval, beta) groups cannot be merged")
    return merge_prompt_sums(sums, KEYS)


def mean_from_sums(sums: pa.Table | list[pa.Table]) -> pa.Table:
    """The ``frontier_mean`` table from :func:`frontier_sums` tables (one, or several of disjoint prompt sets)."""
    merged = merge_sums(sums if isinstance(sums, list) else [sums])
    means = prompt_means(merged, KEYS)
    return pa.table({**{key: merged[key] for key in KEYS}, **{name: means[name] for name in SCHEMAS["frontier_mean"].names
                                                               if name not in KEYS}}, schema=SCHEMAS["frontier_mean"])


def mean_frontier(frontier: pa.Table) -> pa.Table:
    """Average a per-prompt ``frontier`` table over prompts for each (align, eval, beta) (see the module doc)."""
    if frontier.num_rows == 0:
        return SCHEMAS["frontier_mean"].empty_table()
    return mean_from_sums(frontier_sums(frontier))


@dataclass
class FrontierPoint:
    """Where a frontier reaches a KL budget: the beta, gain and KL there, the gain's error bar, and whether
    it is trusted.

    ``gain_se``: the gain's standard error at the fixed KL (``gain ± 1.96 gain_se`` is its 95% interval;
    NaN: no error bar; the fixed-beta one for a table without the frontier's slopes). ``trusted_kl`` is
    :func:`trusted_kl_range` of the frontier (None: no trusted beta, or a table without the ``reliable``
    column); ``trusted`` whether ``kl`` lies inside it and, where the table has error bars, the gain has one.
    """

    align: str
    eval: str
    kl: float
    beta: float
    gain: float
    gain_se: float = float("nan")
    trusted: bool = True
    trusted_kl: tuple[float, float] | None = None


def trusted_kl_range(frontier_mean: pa.Table, align: str, eval: str,
                     min_reliable: float = TRUSTED_FRACTION) -> tuple[float, float] | None:
    """The KL range ``[KL(beta_max), KL(beta_t)]`` of one (align, eval) frontier that can be trusted.

    ``beta_t`` is the smallest trusted beta (:func:`limits_ray.core.reliability.trusted_count` over the
    ``reliable`` fractions from the largest beta down, at least ``min_reliable``). None when the largest beta already fails, or when
    the table has no ``reliable`` column (results written before it existed).
    """
    rows = _pair_rows(frontier_mean, align, eval)
    if "reliable" not in rows.column_names:
        return None
    order = np.argsort(rows["beta"].to_numpy())[::-1]
    kl, fraction = rows["kl"].to_numpy()[order], rows["reliable"].to_numpy()[order]
    last = trusted_count(fraction, min_reliable)
    return None if last == 0 else (float(kl[0]), float(kl[last - 1]))


def _pair_rows(frontier_mean: pa.Table, align: str, eval: str) -> pa.Table:
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], eval)))
    if rows.num_rows == 0:
        pairs = sorted(set(zip(frontier_mean["align"].to_pylist(), frontier_mean["eval"].to_pylist())))
        raise ValueError(f"no frontier for align={align!r} eval={eval!r}; available (align, eval): {pairs}")
    return rows


def _optional(rows: pa.Table, name: str) -> np.ndarray | None:
    return rows[name].to_numpy(zero_copy_only=False) if name in rows.column_names else None


def point_at_kl(frontier_mean: pa.Table, kl_budget: float, align: str, eval: str) -> FrontierPoint:
    """The gain reachable at ``KL = kl_budget`` on one (align, eval) frontier, its error bar and the beta giving it.

    The mean KL falls strictly as beta grows (each prompt's ``KL_hat`` is the KL of a tilted empirical
    distribution). Between grid points the gain and ``log beta`` are cubic Hermite interpolants in KL
    with the frontier's known slopes, and the error bar is the fixed-KL one (``gain_se_at_kl``), linear
    in KL (:func:`limits_ray.core.fixed_kl.at_kl`); a table without slopes is interpolated linearly, with
    the fixed-beta ``gain_se``. Raises ``ValueError`` outside the grid's KL range, naming
    the range and the fix. The point says whether the budget lies inside :func:`trusted_kl_range`.
    """
    rows = _pair_rows(frontier_mean, align, eval)
    kl = rows["kl"].to_numpy()
    betas = rows["beta"].to_numpy()
    if not kl.min() <= kl_budget <= kl.max():
        raise ValueError(
            f"KL budget {kl_budget} lies outside the grid's KL range [{kl.min():.4g}, {kl.max():.4g}] "
            f"(betas {betas.max():.4g} .. {betas.min():.4g}); widen the beta grid "
            "(smaller betas reach larger KL)"
        )
    slope = _optional(rows, "slope")
    bar = error_bar(slope, _optional(rows, "gain_se_at_kl"), _optional(rows, "gain_se"))
    beta, gain, gain_se = at_kl(kl, betas, rows["gain"].to_numpy(), kl_budget, slope, _optional(rows, "kl_dbeta"), bar)
    trusted = trusted_kl_range(rows, align, eval)
    inside = trusted is not None and trusted[0] <= kl_budget <= trusted[1]
    return FrontierPoint(
        align=align, eval=eval, kl=float(kl_budget), beta=beta, gain=gain, gain_se=gain_se,
        trusted=inside and (bar is None or bool(np.isfinite(gain_se))),
        trusted_kl=trusted,
    )
