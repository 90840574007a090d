"""KL-reward frontiers: the prompt average, and the inverse questions a user asks of it.

The frontier of a prompt set is ``beta -> (mean_x KL_hat(x, beta), mean_x gain_hat(x, beta))``
(MATH.md, "Estimators"). It carries two standard errors of each mean, which answer two questions:

* ``gain_se``, ``kl_se`` (within prompts): the prompts are fixed and only their Monte Carlo errors
  count, independent across prompts: ``se(mean) = sqrt(sum_x se_x^2) / P``. More samples per
  prompt shrink it. NaN when some prompt's ``se_x`` is (its weights are not reliable at that beta).
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

``gain_bc``, ``kl_bc`` are the prompt means of the bias-corrected estimates and ``reliable`` the
fraction ``sum_x 1[reliable_x] / P`` of reliable prompts. Every column comes from per-group sums and
moments over prompts (:func:`frontier_sums`) that add across disjoint buckets of prompts
(:func:`merge_sums`), so the job's bucket tasks and the offline reducer return only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.reliability import TRUSTED_FRACTION, trusted_count
from limits_ray.core.schemas import SCHEMAS

__all__ = [
    "FrontierPoint", "between_prompt_se", "frontier_sums", "mean_frontier", "mean_from_sums",
    "merge_moments", "merge_sums", "point_at_kl", "trusted_kl_range",
]

KEYS = ["align", "eval", "beta"]
SUM_COLUMNS = ("gain_var_sum", "kl_var_sum", "gain_bc_sum", "kl_bc_sum", "reliable_sum")
"""Plain sums over prompts; ``prompts``, ``gain_mean``, ``gain_m2``, ``kl_mean``, ``kl_m2`` are moments."""


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


def frontier_sums(frontier: pa.Table) -> pa.Table:
    """Per (align, eval, beta), sorted: what ``frontier_mean`` needs of a set of prompts.

    Columns: align, eval, beta, prompts (P), gain_mean, gain_m2, kl_mean, kl_m2 (moments, see
    :func:`merge_moments`), gain_var_sum, kl_var_sum (sums of ``se_x^2``), gain_bc_sum, kl_bc_sum and
    reliable_sum (reliable prompts). Tables of disjoint prompt sets combine with :func:`merge_sums`.
    """
    squared = frontier.append_column("gain_var", pc.multiply(frontier["gain_se"], frontier["gain_se"]))
    squared = squared.append_column("kl_var", pc.multiply(frontier["kl_se"], frontier["kl_se"]))
    squared = squared.append_column("reliable_count", pc.cast(frontier["reliable"], pa.int64()))
    grouped = squared.group_by(KEYS, use_threads=False).aggregate([
        ("prompt_id", "count"), ("gain", "mean"), ("kl", "mean"), ("gain_var", "sum"), ("kl_var", "sum"),
        ("gain_bc", "sum"), ("kl_bc", "sum"), ("reliable_count", "sum"),
    ]).sort_by([(key, "ascending") for key in KEYS])
    deviations = _squared_deviations(frontier)
    return pa.table({
        **{key: grouped[key] for key in KEYS},
        "prompts": pc.cast(grouped["prompt_id_count"], pa.int64()),
        "gain_mean": grouped["gain_mean"], "gain_m2": deviations["gain_m2_sum"],
        "kl_mean": grouped["kl_mean"], "kl_m2": deviations["kl_m2_sum"],
        "gain_var_sum": grouped["gain_var_sum"], "kl_var_sum": grouped["kl_var_sum"],
        "gain_bc_sum": grouped["gain_bc_sum"], "kl_bc_sum": grouped["kl_bc_sum"],
        "reliable_sum": pc.cast(grouped["reliable_count_sum"], pa.float64()),
    })


def merge_sums(sums: list[pa.Table]) -> pa.Table:
    """Combine :func:`frontier_sums` tables of disjoint prompt sets (same analysis: the same groups)."""
    if not sums:
        raise ValueError("no frontier sums to merge")
    nonempty = [table for table in sums if table.num_rows]
    if not nonempty:
        return sums[0]
    merged, sums = nonempty[0], nonempty
    for other in sums[1:]:
        if not merged.select(KEYS).equals(other.select(KEYS)):
            raise ValueError("frontier sums of different (align, eval, beta) groups cannot be merged")
        columns = {key: merged[key] for key in KEYS}
        for name in ("gain", "kl"):
            count, mean, m2 = merge_moments(
                (merged["prompts"].to_numpy(), merged[f"{name}_mean"].to_numpy(), merged[f"{name}_m2"].to_numpy()),
                (other["prompts"].to_numpy(), other[f"{name}_mean"].to_numpy(), other[f"{name}_m2"].to_numpy()),
            )
            columns[f"{name}_mean"], columns[f"{name}_m2"] = mean, m2
        columns["prompts"] = pa.array(count.astype(np.int64))
        for name in SUM_COLUMNS:
            columns[name] = merged[name].to_numpy() + other[name].to_numpy()
        merged = pa.table({name: columns[name] for name in merged.column_names})
    return merged


def mean_from_sums(sums: pa.Table | list[pa.Table]) -> pa.Table:
    """The ``frontier_mean`` table from :func:`frontier_sums` tables (one, or several of disjoint prompt sets)."""
    merged = merge_sums(sums if isinstance(sums, list) else [sums])
    prompts = merged["prompts"].to_numpy()
    return pa.table({
        **{key: merged[key] for key in KEYS},
        "prompts": merged["prompts"],
        "gain": merged["gain_mean"],
        "gain_se": np.sqrt(merged["gain_var_sum"].to_numpy()) / prompts,
        "kl": merged["kl_mean"],
        "kl_se": np.sqrt(merged["kl_var_sum"].to_numpy()) / prompts,
        "gain_spread_se": between_prompt_se(prompts, merged["gain_m2"].to_numpy()),
        "kl_spread_se": between_prompt_se(prompts, merged["kl_m2"].to_numpy()),
        "gain_bc": merged["gain_bc_sum"].to_numpy() / prompts,
        "kl_bc": merged["kl_bc_sum"].to_numpy() / prompts,
        "reliable": merged["reliable_sum"].to_numpy() / prompts,
    }, schema=SCHEMAS["frontier_mean"])


def mean_frontier(frontier: pa.Table) -> pa.Table:
    """Average a per-prompt ``frontier`` table over prompts for each (align, eval, beta) (see the module doc)."""
    if frontier.num_rows == 0:
        return SCHEMAS["frontier_mean"].empty_table()
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
