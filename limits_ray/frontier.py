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

The between-prompt se is a function of the per-(align, eval, beta) moments over prompts
``(P, mean, M2 = sum_x (x - mean)^2)`` (:func:`between_prompt_se`). Moments of buckets of prompts
merge exactly with :func:`merge_moments` (Chan, Golub and LeVeque's pairwise update). Plain sums
``(P, sum x, sum x^2)`` would add too, but lose every digit when the prompts agree to many digits
(at small beta every prompt's KL nears log N): ``sum x^2 - (sum x)^2 / P`` cancels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.io import SCHEMAS

__all__ = ["FrontierPoint", "between_prompt_se", "mean_frontier", "merge_moments", "point_at_kl"]

KEYS = ["align", "eval", "beta"]


def between_prompt_se(count: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """``sd / sqrt(P)`` of per-prompt estimates from their count ``P`` and ``M2 = sum (x - mean)^2``.

    ``sd^2 = M2 / (P - 1)``; NaN where ``P < 2``.
    """
    count, m2 = np.asarray(count, dtype=np.float64), np.asarray(m2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count >= 2, np.sqrt(m2 / (count - 1) / count), np.nan)


def merge_moments(first: tuple[np.ndarray, np.ndarray, np.ndarray],
                  second: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, M2)`` of the union of two disjoint sets of prompts from theirs.

    ``n = n_a + n_b``, ``mean = mean_a + d n_b / n``, ``M2 = M2_a + M2_b + d^2 n_a n_b / n`` with
    ``d = mean_b - mean_a`` (Chan, Golub, LeVeque 1979); an empty side (count 0) leaves the other.
    """
    count_a, mean_a, m2_a = (np.asarray(value, dtype=np.float64) for value in first)
    count_b, mean_b, m2_b = (np.asarray(value, dtype=np.float64) for value in second)
    count = count_a + count_b
    delta = np.where(count_b > 0, mean_b, mean_a) - np.where(count_a > 0, mean_a, mean_b)
    share = np.where(count > 0, count_b / np.where(count > 0, count, 1.0), 0.0)
    mean = np.where(count_a > 0, mean_a, mean_b) + delta * share
    return count, mean, m2_a + m2_b + delta**2 * count_a * share


def _squared_deviations(frontier: pa.Table) -> pa.Table:
    """Per (align, eval, beta), sorted: ``M2`` of gain and of KL over prompts (two passes: stable)."""
    means = frontier.group_by(KEYS, use_threads=False).aggregate([("gain", "mean"), ("kl", "mean")])
    joined = frontier.select([*KEYS, "gain", "kl"]).join(means, keys=KEYS, use_threads=False)
    for name in ("gain", "kl"):
        deviation = pc.subtract(joined[name], joined[f"{name}_mean"])
        joined = joined.append_column(f"{name}_m2", pc.multiply(deviation, deviation))
    return joined.group_by(KEYS, use_threads=False).aggregate([("gain_m2", "sum"), ("kl_m2", "sum")]).sort_by(
        [(key, "ascending") for key in KEYS])


def mean_frontier(frontier: pa.Table) -> pa.Table:
    """Average a per-prompt ``frontier`` table over prompts for each (align, eval, beta) (see the module doc)."""
    squared = frontier.append_column("gain_var", pc.multiply(frontier["gain_se"], frontier["gain_se"]))
    squared = squared.append_column("kl_var", pc.multiply(frontier["kl_se"], frontier["kl_se"]))
    grouped = squared.group_by(KEYS, use_threads=False).aggregate([
        ("prompt_id", "count"), ("gain", "mean"), ("kl", "mean"), ("gain_var", "sum"), ("kl_var", "sum"),
    ]).sort_by([(key, "ascending") for key in KEYS])
    prompts = grouped["prompt_id_count"].to_numpy()
    deviations = _squared_deviations(frontier)
    return pa.table({
        "align": grouped["align"],
        "eval": grouped["eval"],
        "beta": grouped["beta"],
        "prompts": pa.array(prompts, pa.int64()),
        "gain": grouped["gain_mean"],
        "gain_se": np.sqrt(grouped["gain_var_sum"].to_numpy()) / prompts,
        "kl": grouped["kl_mean"],
        "kl_se": np.sqrt(grouped["kl_var_sum"].to_numpy()) / prompts,
        "gain_spread_se": between_prompt_se(prompts, deviations["gain_m2_sum"].to_numpy()),
        "kl_spread_se": between_prompt_se(prompts, deviations["kl_m2_sum"].to_numpy()),
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
