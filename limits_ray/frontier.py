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

__all__ = ["TRUSTED_FRACTION", "FrontierPoint", "mean_frontier", "point_at_kl", "trusted_kl_range"]

TRUSTED_FRACTION = 0.9
"""A beta of a prompt-averaged frontier is trusted when at least this fraction of prompts is reliable there."""


def mean_frontier(frontier: pa.Table) -> pa.Table:
    """Average a per-prompt ``frontier`` table over prompts for each (align, eval, beta)."""
    squared = frontier.append_column("gain_var", pc.multiply(frontier["gain_se"], frontier["gain_se"]))
    squared = squared.append_column("kl_var", pc.multiply(frontier["kl_se"], frontier["kl_se"]))
    squared = squared.append_column("reliable_count", pc.cast(frontier["reliable"], pa.int64()))
    grouped = squared.group_by(["align", "eval", "beta"], use_threads=False).aggregate([
        ("prompt_id", "count"), ("gain", "mean"), ("kl", "mean"), ("gain_var", "sum"), ("kl_var", "sum"),
        ("gain_bc", "mean"), ("kl_bc", "mean"), ("reliable_count", "sum"),
    ]).sort_by([("align", "ascending"), ("eval", "ascending"), ("beta", "ascending")])
    prompts = grouped["prompt_id_count"].to_numpy()
    return pa.table({
        "align": grouped["align"],
        "eval": grouped["eval"],
        "beta": grouped["beta"],
        "prompts": pa.array(prompts, pa.int64()),
        "gain": grouped["gain_mean"],
        "gain_se": np.sqrt(grouped["gain_var_sum"].to_numpy()) / prompts,
        "kl": grouped["kl_mean"],
        "kl_se": np.sqrt(grouped["kl_var_sum"].to_numpy()) / prompts,
        "gain_bc": grouped["gain_bc_mean"],
        "kl_bc": grouped["kl_bc_mean"],
        "reliable": grouped["reliable_count_sum"].to_numpy() / prompts,
    }, schema=SCHEMAS["frontier_mean"])


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
