"""KL-reward frontiers: the prompt average, and the inverse questions a user asks of it.

The frontier of a prompt set is ``beta -> (mean_x KL_hat(x, beta), mean_x gain_hat(x, beta))``
(MATH.md, "Estimators"). It carries two standard errors of each mean, which answer two questions:

* ``gain_se``, ``kl_se`` (within prompts): the prompts are fixed and only their Monte Carlo errors
  count, independent across prompts: ``se(mean) = sqrt(sum_x se_x^2) / P``. More samples per
  prompt shrink it.
* ``gain_spread_se``, ``kl_spread_se`` (between prompts): the prompts are a random sample of a
  prompt population: ``se(mean) = sd_x(estimate_x) / sqrt(P)`` (sd with ``ddof = 1``; NaN for one
  prompt). It includes the within-prompt noise and the prompts' spread; more prompts shrink it.
  When it is much larger than the within-prompt se, the prompts differ more than sampling explains.
  (The convergence studies call the same two errors ``*_mc_se`` and ``*_spread_se``.)

The between-prompt se is a function of per-(align, eval, beta) sums over prompts, ``(P, sum x,
sum x^2)`` (:func:`between_prompt_se`), which add across any partition of the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.io import SCHEMAS

__all__ = ["FrontierPoint", "between_prompt_se", "mean_frontier", "point_at_kl"]


def between_prompt_se(count: np.ndarray, total: np.ndarray, total_squares: np.ndarray) -> np.ndarray:
    """``sd / sqrt(P)`` of per-prompt estimates from their count ``P``, sum and sum of squares.

    ``sd^2 = (sum x^2 - (sum x)^2 / P) / (P - 1)``, clipped at 0 (rounding); NaN where ``P < 2``.
    The three sums add across buckets of prompts, so partial results merge exactly.
    """
    count = np.asarray(count, dtype=np.float64)
    total, total_squares = np.asarray(total, dtype=np.float64), np.asarray(total_squares, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = np.maximum(total_squares - total**2 / count, 0.0) / (count - 1)
        return np.where(count >= 2, np.sqrt(variance / count), np.nan)


def mean_frontier(frontier: pa.Table) -> pa.Table:
    """Average a per-prompt ``frontier`` table over prompts for each (align, eval, beta) (see the module doc)."""
    squared = frontier
    for name, column in (("gain_var", "gain_se"), ("kl_var", "kl_se"), ("gain_sq", "gain"), ("kl_sq", "kl")):
        squared = squared.append_column(name, pc.multiply(frontier[column], frontier[column]))
    grouped = squared.group_by(["align", "eval", "beta"], use_threads=False).aggregate([
        ("prompt_id", "count"), ("gain", "sum"), ("kl", "sum"), ("gain_var", "sum"), ("kl_var", "sum"),
        ("gain_sq", "sum"), ("kl_sq", "sum"),
    ]).sort_by([("align", "ascending"), ("eval", "ascending"), ("beta", "ascending")])
    prompts = grouped["prompt_id_count"].to_numpy()
    gain_sum, kl_sum = grouped["gain_sum"].to_numpy(), grouped["kl_sum"].to_numpy()
    return pa.table({
        "align": grouped["align"],
        "eval": grouped["eval"],
        "beta": grouped["beta"],
        "prompts": pa.array(prompts, pa.int64()),
        "gain": gain_sum / prompts,
        "gain_se": np.sqrt(grouped["gain_var_sum"].to_numpy()) / prompts,
        "kl": kl_sum / prompts,
        "kl_se": np.sqrt(grouped["kl_var_sum"].to_numpy()) / prompts,
        "gain_spread_se": between_prompt_se(prompts, gain_sum, grouped["gain_sq_sum"].to_numpy()),
        "kl_spread_se": between_prompt_se(prompts, kl_sum, grouped["kl_sq_sum"].to_numpy()),
    }, schema=SCHEMAS["frontier_mean"])


@dataclass
class FrontierPoint:
    """Where a frontier reaches a KL budget: the beta, gain and KL there."""

    align: str
    eval: str
    kl: float
    beta: float
    gain: float


def point_at_kl(frontier_mean: pa.Table, kl_budget: float, align: str, eval: str) -> FrontierPoint:
    """The gain reachable at ``KL = kl_budget`` on one (align, eval) frontier, and the beta giving it.

    The mean KL falls strictly as beta grows (each prompt's ``KL_hat`` is the KL of a tilted
    empirical distribution), so ``log beta`` and the gain are interpolated linearly in KL between
    grid points. Raises ``ValueError`` outside the grid's KL range, naming the range and the fix.
    """
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], eval)))
    if rows.num_rows == 0:
        pairs = sorted(set(zip(frontier_mean["align"].to_pylist(), frontier_mean["eval"].to_pylist())))
        raise ValueError(f"no frontier for align={align!r} eval={eval!r}; available (align, eval): {pairs}")
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
    return FrontierPoint(
        align=align,
        eval=eval,
        kl=float(kl_budget),
        beta=float(np.exp(np.interp(kl_budget, kl, np.log(betas)))),
        gain=float(np.interp(kl_budget, kl, gains)),
    )
