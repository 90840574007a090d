"""KL-reward frontiers: the prompt average, and the inverse questions a user asks of it.

The frontier of a prompt set is ``beta -> (mean_x KL_hat(x, beta), mean_x gain_hat(x, beta))``
(MATH.md, "Estimators"). Its standard errors treat the prompts as fixed and their Monte Carlo
errors as independent: ``se(mean) = sqrt(sum_x se_x^2) / P`` (NaN when some prompt's ``se_x`` is:
its weights are not reliable at that beta). ``gain_bc``, ``kl_bc`` are the prompt means of the
bias-corrected estimates and ``reliable`` the fraction ``sum_x 1[reliable_x] / P`` of reliable
prompts; every column is a sum over prompts divided by ``P``, so partial sums over prompt buckets add.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.io import SCHEMAS

__all__ = [
    "TRUSTED_FRACTION", "FrontierPoint", "frontier_sums", "mean_frontier", "mean_from_sums", "merge_sums", "point_at_kl",
    "trusted_kl_range",
]

TRUSTED_FRACTION = 0.9
"""A beta of a prompt-averaged frontier is trusted when at least this fraction of prompts is reliable there."""


SUM_KEYS = ("align", "eval", "beta")
SUM_COLUMNS = ("prompts", "gain_sum", "kl_sum", "gain_var_sum", "kl_var_sum", "gain_bc_sum", "kl_bc_sum", "reliable_sum")


def frontier_sums(frontier: pa.Table) -> pa.Table:
    """Per (align, eval, beta) sums over the prompts of a per-prompt ``frontier`` table.

    Columns: align, eval, beta, prompts (count), gain_sum, kl_sum, gain_var_sum (sum of gain_se^2),
    kl_var_sum (sum of kl_se^2), gain_bc_sum, kl_bc_sum, reliable_sum (reliable prompts). Sums of disjoint prompt sets add, so shards of the frontier (buckets
    of prompts) are summed one by one and only these small tables are combined (:func:`merge_sums`).
    """
    squared = frontier.append_column("gain_var", pc.multiply(frontier["gain_se"], frontier["gain_se"]))
    squared = squared.append_column("kl_var", pc.multiply(frontier["kl_se"], frontier["kl_se"]))
    squared = squared.append_column("reliable_count", pc.cast(frontier["reliable"], pa.int64()))
    grouped = squared.group_by(list(SUM_KEYS), use_threads=False).aggregate([
        ("prompt_id", "count"), ("gain", "sum"), ("kl", "sum"), ("gain_var", "sum"), ("kl_var", "sum"),
        ("gain_bc", "sum"), ("kl_bc", "sum"), ("reliable_count", "sum"),
    ])
    return _sums_table(grouped, ["prompt_id_count", "gain_sum", "kl_sum", "gain_var_sum", "kl_var_sum",
                                 "gain_bc_sum", "kl_bc_sum", "reliable_count_sum"])


def merge_sums(sums: list[pa.Table]) -> pa.Table:
    """Add tables of :func:`frontier_sums` (of disjoint prompt sets), sorted by (align, eval, beta)."""
    grouped = pa.concat_tables(sums).group_by(list(SUM_KEYS), use_threads=False).aggregate(
        [(name, "sum") for name in SUM_COLUMNS]
    )
    return _sums_table(grouped, [f"{name}_sum" for name in SUM_COLUMNS])


def _sums_table(grouped: pa.Table, columns: list[str]) -> pa.Table:
    table = pa.table(
        {**{key: grouped[key] for key in SUM_KEYS}, **{name: grouped[column] for name, column in zip(SUM_COLUMNS, columns)}}
    )
    table = table.set_column(3, "prompts", table["prompts"].cast(pa.int64()))
    return table.sort_by([(key, "ascending") for key in SUM_KEYS])


def mean_from_sums(sums: pa.Table) -> pa.Table:
    """The ``frontier_mean`` table from (possibly several concatenated) :func:`frontier_sums` tables.

    ``mean = sum / P`` and ``se(mean) = sqrt(sum_x se_x^2) / P`` for each (align, eval, beta);
    ``reliable`` is the fraction of prompts whose estimate is reliable there.
    """
    merged = merge_sums([sums])
    prompts = merged["prompts"].to_numpy()
    return pa.table({
        "align": merged["align"],
        "eval": merged["eval"],
        "beta": merged["beta"],
        "prompts": merged["prompts"],
        "gain": merged["gain_sum"].to_numpy() / prompts,
        "gain_se": np.sqrt(merged["gain_var_sum"].to_numpy()) / prompts,
        "kl": merged["kl_sum"].to_numpy() / prompts,
        "kl_se": np.sqrt(merged["kl_var_sum"].to_numpy()) / prompts,
        "gain_bc": merged["gain_bc_sum"].to_numpy() / prompts,
        "kl_bc": merged["kl_bc_sum"].to_numpy() / prompts,
        "reliable": merged["reliable_sum"].to_numpy() / prompts,
    }, schema=SCHEMAS["frontier_mean"])


def mean_frontier(frontier: pa.Table) -> pa.Table:
    """Average a per-prompt ``frontier`` table over prompts for each (align, eval, beta)."""
    return mean_from_sums(frontier_sums(frontier))


@dataclass
class FrontierPoint:
    """Where a frontier reaches a KL budget: the beta, gain and KL there, and whether it is trusted.

    ``trusted_kl`` is :func:`trusted_kl_range` of the frontier (None: no trusted beta, or a table
    without the ``reliable`` column); ``trusted`` whether ``kl`` lies inside it.
    """

    align: str
    eval: str
    kl: float
    beta: float
    gain: float
    trusted: bool = True
    trusted_kl: tuple[float, float] | None = None


def _pair_rows(frontier_mean: pa.Table, align: str, eval: str) -> pa.Table:
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], eval)))
    if rows.num_rows == 0:
        pairs = sorted(set(zip(frontier_mean["align"].to_pylist(), frontier_mean["eval"].to_pylist())))
        raise ValueError(f"no frontier for align={align!r} eval={eval!r}; available (align, eval): {pairs}")
    return rows


def trusted_kl_range(
    frontier_mean: pa.Table, align: str, eval: str, min_reliable: float = TRUSTED_FRACTION
) -> tuple[float, float] | None:
    """The KL range ``[KL(beta_max), KL(beta_t)]`` of one (align, eval) frontier that can be trusted.

    Going down the beta grid from its largest beta, ``beta_t`` is the last beta before the first at
    which fewer than ``min_reliable`` of the prompts are ``reliable`` (k-hat and ESS, see
    :meth:`limits_ray.stats.TiltStats.finalize`). None when the largest beta already fails, or when
    the table has no ``reliable`` column (results written before it existed).
    """
    rows = _pair_rows(frontier_mean, align, eval)
    if "reliable" not in rows.column_names:
        return None
    order = np.argsort(rows["beta"].to_numpy())[::-1]
    kl, fraction = rows["kl"].to_numpy()[order], rows["reliable"].to_numpy()[order]
    failing = np.flatnonzero(~(fraction >= min_reliable))
    last = failing[0] if failing.size else kl.size
    return None if last == 0 else (float(kl[0]), float(kl[last - 1]))


def point_at_kl(frontier_mean: pa.Table, kl_budget: float, align: str, eval: str) -> FrontierPoint:
    """The gain reachable at ``KL = kl_budget`` on one (align, eval) frontier, and the beta giving it.

    The mean KL falls strictly as beta grows (each prompt's ``KL_hat`` is the KL of a tilted
    empirical distribution), so ``log beta`` and the gain are interpolated linearly in KL between
    grid points. Raises ``ValueError`` outside the grid's KL range, naming the range and the fix.
    The point says whether the budget lies inside :func:`trusted_kl_range`.
    """
    rows = _pair_rows(frontier_mean, align, eval)
    order = np.argsort(rows["kl"].to_numpy())
    kl = rows["kl"].to_numpy()[order]
    betas = rows["beta"].to_numpy()[order]
    gains = rows["gain"].to_numpy()[order]
    if not kl[0] <= kl_budget <= kl[-1]:
        raise ValueError(
            f"KL budget {kl_budget} lies outside the grid's KL range [{kl[0]:.4g}, {kl[-1]:.4g}] "
            f"(betas {betas.max():.4g} .. {betas.min():.4g}); widen the beta grid "
            "(smaller betas reach larger KL)"
        )
    trusted = trusted_kl_range(rows, align, eval)
    return FrontierPoint(
        align=align,
        eval=eval,
        kl=float(kl_budget),
        beta=float(np.exp(np.interp(kl_budget, kl, np.log(betas)))),
        gain=float(np.interp(kl_budget, kl, gains)),
        trusted=trusted is not None and trusted[0] <= kl_budget <= trusted[1],
        trusted_kl=trusted,
    )
