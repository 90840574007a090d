"""The prompt mean: one centre and one error bar for every prompt-averaged number. Pure numpy/pyarrow.

Every number averaged over prompts (``frontier_mean``, the figure's band, ``limits-ray query``,
report.md, policy gaps, the convergence study) comes from :func:`prompt_means` of the mergeable per-cell
sums :func:`prompt_sums` (../shared/MATH.md, "The prompt mean"). A cell is one group of rows of a
per-prompt table, (align, eval, beta) of ``frontier`` (and N of ``convergence``); over its P prompts x:

- **centre**: ``mean_x`` of the bias-corrected estimates ``gain_bc``, ``kl_bc``. A per-prompt bias of ``b``
  SDs stays ``b`` in the mean while the SE falls like ``1/sqrt(P)``: the plug-in mean of thousands of
  prompts is off by several SEs (bench/bench_coverage.py measures both);
- **within-prompt SE** (prompts fixed, only their Monte Carlo errors count): ``sqrt(sum_x Var_x) / P``
  with ``Var_x`` the delta-method variance (``gain_se_delta^2``), scaled up by :func:`variance_factor`
  of the row's pooled k-hat where the weights' tail is heavy enough for it to fall short (by 1/0.84 at
  k = 0.41). No per-prompt t-factor: a sum of thousands of terms needs none (the per-prompt interval
  SEs ``gain_se`` keep theirs);
- **spread SE** (prompts a sample of a population): ``sd_x(estimate_x) / sqrt(P)`` of the bias-corrected
  estimates, from moments ``(P, mean, M2)`` that merge exactly (:func:`merge_moments`);
- **unreliable prompts**: each row's ``bias_allowance`` ``a_x`` (:mod:`limits_ray.core.reliability`) bounds its
  bias by ``a_x se_x`` (``se_x = gain_se_delta``): 0 for reliable rows and for rows that fail only their
  own test in a cell that passes every cell test (a sample that drew the tail), infinite where nothing
  bounds it. With ``A = sum_x a_x se_x / P`` (plus the drift's excess, next item) the error bar is ``sqrt(se^2 + A^2)`` where
  ``A <= ALLOWANCE_LIMIT se`` (so the bar is at most 1.25 times the within-prompt SE), and NaN, *not
  trusted*, elsewhere; the spread SE likewise. A few prompts whose sample saw the tail do not take a
  beta's error bar away, while a share of heavy prompts that could move the mean by more than its SE
  does; at 1e5 prompts that share is small (bench/bench_coverage.py, "The prompt mean");
- **convergence**: a bias that the per-prompt tests cannot see (the bias-corrected estimator's residual,
  O(1/N^2) where the weights are benign) stays in the mean while the SE falls like ``1/sqrt(P)``: at
  1e5 prompts a residual of 2% of one prompt's SE is six SEs of the mean. Each row's drift from the
  largest dyadic prefix below its N (``gain_drift = gain_bc(N) - gain_bc(N')``, ``N' ~ N/2``) measures it
  across prompts: its mean ``D`` is ``b(N') - b(N)`` for a bias ``b`` falling with N (``b(N)`` itself for
  ``b ~ 1/N``, a third of ``D`` for ``1/N^2``). Where ``|D|`` exceeds :data:`DRIFT_Z` of its SE (``sd_x / sqrt(P)``)
  the excess ``|D| - DRIFT_Z se(D)`` joins the allowance ``A`` below; no drift (N = 1, or rows without a
  prefix) adds none;
- **the frontier at a fixed KL** (MATH.md, "The frontier at a fixed KL"): moving along the frontier to
  the beta whose mean KL is a given ``K`` turns the gain's error into ``d gain - S d KL``, with
  ``S = sum_x gain_dbeta_x / sum_x kl_dbeta_x`` the slope ``d gain / d KL`` of the mean frontier
  (``beta`` exactly when the gain is of the aligned reward), so
  ``se_K^2 = (sum_x Var_gain - 2 S sum_x Cov_x + S^2 sum_x Var_kl) / P^2`` (``slope``, ``gain_se_at_kl``;
  allowance ``A_gain + |S| A_kl`` under the same rule; a row with a tie bound on the tangent's intercept,
  ``tie_bias_at_kl``, adds that instead of its two allowances). :mod:`limits_ray.core.fixed_kl` interpolates between betas.

Every per-cell quantity is a plain sum or a moment, so disjoint sets of prompts (the job's bucket tasks,
the offline reducer's buckets) combine with :func:`merge_prompt_sums` into the same result as one table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "ALLOWANCE_LIMIT", "DRIFT_Z", "INFLATION_KHAT", "MOMENTS", "SUMS", "between_prompt_se", "merge_moments",
    "merge_prompt_sums", "prompt_means", "prompt_sums", "variance_factor", "widened", "within_prompt_se",
]

DRIFT_Z = 2.0
"""The drift of a prompt mean counts as a bias allowance beyond this many of its SEs (module doc)."""

INFLATION_KHAT = 0.25
"""k-hat from which the prompt mean scales a row's delta-method SE up (:func:`variance_factor`)."""

ALLOWANCE_LIMIT = 0.75
"""Largest bias allowance ``A`` (in within-prompt SEs) that keeps a prompt mean's error bar: then the
bar ``sqrt(se^2 + A^2)`` is at most ``1.25 se`` (module doc; bench/bench_coverage.py)."""

MOMENTS = ("gain", "kl")
"""Moments ``(P, <name>_mean, <name>_m2)`` of the bias-corrected estimates kept per cell."""
SUMS = ("gain_plugin_sum", "kl_plugin_sum", "gain_var_sum", "kl_var_sum", "gain_kl_cov_sum", "gain_bound_sum",
        "kl_bound_sum", "gain_bound_k_sum", "kl_bound_k_sum", "tie_at_kl_sum", "reliable_sum", "gain_dbeta_sum",
        "kl_dbeta_sum", "drift_count", "gain_drift_sum", "gain_drift_sq_sum", "kl_drift_sum", "kl_drift_sq_sum",
        "gain_kl_drift_sum")
"""Plain sums over a cell's prompts kept beside the moments (:func:`prompt_sums`)."""


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
    Plain sums ``(P, sum x, sum x^2)`` would add too, but lose every digit when the prompts agree to
    many digits (at small beta every prompt's KL nears log N): ``sum x^2 - (sum x)^2 / P`` cancels.
    """
    count_a, mean_a, m2_a = (np.asarray(value, dtype=np.float64) for value in first)
    count_b, mean_b, m2_b = (np.asarray(value, dtype=np.float64) for value in second)
    count = count_a + count_b
    delta = np.where(count_b > 0, mean_b, mean_a) - np.where(count_a > 0, mean_a, mean_b)
    share = np.where(count > 0, count_b / np.where(count > 0, count, 1.0), 0.0)
    mean = np.where(count_a > 0, mean_a, mean_b) + delta * share
    return count, mean, m2_a + m2_b + delta**2 * count_a * share


def _values(table: pa.Table, name: str, fallback: str | None = None, default: float = np.nan) -> np.ndarray:
    """Column ``name`` as float64 (``fallback``'s where the table predates it, else ``default``)."""
    for column in (name, fallback):
        if column is not None and column in table.column_names:
            return table[column].to_numpy(zero_copy_only=False).astype(np.float64)
    return np.full(table.num_rows, default)


def _bound(allowance: np.ndarray, se: np.ndarray) -> np.ndarray:
    """``a se``, with ``0`` wherever ``a = 0`` and ``inf`` wherever ``a`` is infinite (whatever ``se``)."""
    with np.errstate(invalid="ignore"):
        return np.where(allowance == 0, 0.0, np.where(np.isinf(allowance), np.inf, allowance * se))


def variance_factor(khat: np.ndarray) -> np.ndarray:
    """``1 / (1 - max(k - INFLATION_KHAT, 0))``: the factor on a delta-method SE for weights of shape ``k``
    (NaN or infinite ``k``: 1, and the gate decides such rows).

    The delta-method variance falls short of the real one as the weights' tail thickens (the terms behind
    it are dominated by the few largest weights): the SE over the real SD of bias-corrected estimates,
    N = 250-4000, is 0.95-0.99 at k about 0.29, 0.89-0.94 (KL 0.86-0.91) at 0.38-0.41, 0.83-0.87 at
    0.41-0.46 and 0.70-0.78 at 0.5-0.55 (Gaussian, exponential, mixed sigma and a Laplace minority, the
    tuning families of bench/_families.py); this factor is at or above the inverse of each.
    """
    khat = np.asarray(khat, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        excess = np.where(np.isfinite(khat), np.clip(khat - INFLATION_KHAT, 0.0, 0.9), 0.0)
    return 1.0 / (1.0 - excess)


def _row_se(table: pa.Table, name: str) -> np.ndarray:
    """A row's SE as the prompt mean counts it: ``*_se_delta`` times :func:`variance_factor` of its pooled k-hat
    (its own where not pooled); the interval SE for a table that predates the delta SEs."""
    khat = _values(table, "khat_pooled")
    khat = np.where(np.isfinite(khat), khat, _values(table, "khat"))
    return _values(table, f"{name}_se_delta", f"{name}_se") * variance_factor(khat)


def _row_terms(table: pa.Table) -> dict[str, np.ndarray]:
    """Each row's values of the centre, :data:`SUMS` and the moments (tolerates tables that predate a column:
    the plug-in for a missing ``*_bc``, the interval SE for a missing ``*_se_delta``, allowance 0)."""
    reliable = _values(table, "reliable", default=1.0)
    allowance = _values(table, "bias_allowance", default=0.0)
    terms = {}
    for name in MOMENTS:
        se = _row_se(table, name)
        terms[name] = _values(table, f"{name}_bc", name)
        terms[f"{name}_plugin_sum"] = _values(table, name)
        terms[f"{name}_var_sum"] = se * se
        terms[f"{name}_bound_sum"] = _bound(allowance, se)
        terms[f"{name}_dbeta_sum"] = _values(table, f"{name}_dbeta")
    # The fixed-KL bar: rows with a tie bound on the tangent's intercept use it; the others their allowances.
    tie = _values(table, "tie_bias_at_kl")
    tied = np.isfinite(tie)
    for name in MOMENTS:
        terms[f"{name}_bound_k_sum"] = np.where(tied, 0.0, terms[f"{name}_bound_sum"])
    terms["tie_at_kl_sum"] = np.where(tied, tie, 0.0)
    khat = _values(table, "khat_pooled")
    terms["gain_kl_cov_sum"] = _values(table, "gain_kl_cov") * variance_factor(
        np.where(np.isfinite(khat), khat, _values(table, "khat"))) ** 2
    terms["reliable_sum"] = reliable
    gain_drift, kl_drift = _values(table, "gain_drift"), _values(table, "kl_drift")
    drifted = np.isfinite(gain_drift) & np.isfinite(kl_drift)
    gain_drift, kl_drift = np.where(drifted, gain_drift, 0.0), np.where(drifted, kl_drift, 0.0)
    terms.update(drift_count=drifted.astype(np.float64), gain_drift_sum=gain_drift, gain_drift_sq_sum=gain_drift**2,
                 kl_drift_sum=kl_drift, kl_drift_sq_sum=kl_drift**2, gain_kl_drift_sum=gain_drift * kl_drift)
    return terms


def prompt_sums(table: pa.Table, keys: list[str]) -> pa.Table:
    """Per cell (the distinct ``keys``), sorted: what :func:`prompt_means` needs of a set of prompts.

    Columns: the keys, ``prompts`` (P), ``<m>_mean`` and ``<m>_m2`` for ``m`` in :data:`MOMENTS` (of the
    bias-corrected estimates), and :data:`SUMS` (``*_var_sum``: of ``*_se_delta^2``; ``gain_kl_cov_sum``;
    ``*_bound_sum``: of ``bias_allowance * *_se_delta``; ``reliable_sum``; ``*_dbeta_sum``; ``drift_count`` and
    the sums, squares and cross products of ``gain_drift`` and ``kl_drift`` over the rows that have both).
    Tables of disjoint prompt sets combine with :func:`merge_prompt_sums`.
    """
    terms = _row_terms(table)
    rows = pa.table({**{key: table[key] for key in keys}, **{name: pa.array(value, pa.float64()) for name, value in terms.items()}})
    grouped = rows.group_by(keys, use_threads=False).aggregate(
        [("gain", "count"), *[(name, "mean") for name in MOMENTS], *[(name, "sum") for name in SUMS]])
    for name in MOMENTS:  # M2 about the group mean: two passes, stable
        joined = rows.select([*keys, name]).join(grouped.select([*keys, f"{name}_mean"]), keys=keys, use_threads=False)
        deviation = pc.subtract(joined[name], joined[f"{name}_mean"])
        joined = joined.append_column(f"{name}_m2", pc.multiply(deviation, deviation))
        m2 = joined.group_by(keys, use_threads=False).aggregate([(f"{name}_m2", "sum")])
        grouped = grouped.join(m2, keys=keys, use_threads=False)
    grouped = grouped.sort_by([(key, "ascending") for key in keys])
    return pa.table({
        **{key: grouped[key] for key in keys},
        "prompts": pc.cast(grouped["gain_count"], pa.int64()),
        **{column: grouped[f"{name}_{part}"] for name in MOMENTS for column, part in
           ((f"{name}_mean", "mean"), (f"{name}_m2", "m2_sum"))},
        **{name: grouped[f"{name}_sum"] for name in SUMS},
    })


def _aligned(sums: pa.Table, cells: pa.Table, keys: list[str]) -> pa.Table:
    """``sums`` with a row for every cell of ``cells`` (in its order); a missing cell has count 0."""
    indexed = cells.append_column("_row", pa.array(np.arange(cells.num_rows, dtype=np.int64)))
    return indexed.join(sums, keys=keys, join_type="left outer", use_threads=False).sort_by("_row")


def merge_prompt_sums(sums: list[pa.Table], keys: list[str]) -> pa.Table:
    """Combine :func:`prompt_sums` tables of disjoint prompt sets (cells absent from a part count as empty)."""
    if not sums:
        raise ValueError("no prompt sums to merge")
    nonempty = [table for table in sums if table.num_rows]
    if len(nonempty) <= 1:
        return nonempty[0] if nonempty else sums[0]
    cells = pa.concat_tables([table.select(keys) for table in nonempty]).group_by(keys, use_threads=False).aggregate([])
    cells = cells.sort_by([(key, "ascending") for key in keys])
    parts = [_aligned(table, cells, keys) for table in nonempty]

    def values(part: pa.Table, name: str) -> np.ndarray:
        return np.nan_to_num(part[name].to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0) \
            if name == "prompts" else part[name].to_numpy(zero_copy_only=False).astype(np.float64)

    present = [values(part, "prompts") > 0 for part in parts]
    columns = {key: cells[key] for key in keys}
    count = np.zeros(cells.num_rows)
    for name in MOMENTS:
        merged = (np.zeros(cells.num_rows), np.zeros(cells.num_rows), np.zeros(cells.num_rows))
        for part, here in zip(parts, present):
            merged = merge_moments(merged, (values(part, "prompts"), np.where(here, values(part, f"{name}_mean"), 0.0),
                                            np.where(here, values(part, f"{name}_m2"), 0.0)))
        count, columns[f"{name}_mean"], columns[f"{name}_m2"] = merged
    columns["prompts"] = pa.array(count.astype(np.int64))
    for name in SUMS:
        columns[name] = sum(np.where(here, values(part, name), 0.0) for part, here in zip(parts, present))
    return pa.table({name: columns[name] for name in nonempty[0].column_names})


def _drift_excess(count: np.ndarray, total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """``max(|D| - DRIFT_Z se(D), 0)`` of a mean drift ``D = total / count`` (``se(D) = sd / sqrt(count)``); 0 with
    fewer than 2 drifts."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / count
        se = np.sqrt(np.clip(squares - total * mean, 0.0, None) / (count - 1) / count)
        return np.where(count >= 2, np.clip(np.abs(mean) - DRIFT_Z * se, 0.0, None), 0.0)


def widened(se: np.ndarray, allowance: np.ndarray) -> np.ndarray:
    """The error bar of an estimate with standard error ``se`` and a bias of at most ``allowance``:
    ``sqrt(se^2 + A^2)`` where ``A <= ALLOWANCE_LIMIT se``, else NaN (not trusted)."""
    se, allowance = np.asarray(se, dtype=np.float64), np.asarray(allowance, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(allowance <= ALLOWANCE_LIMIT * se, np.sqrt(se * se + allowance * allowance), np.nan)


def _bar(variance: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """:func:`widened` of ``se = sqrt(variance)``."""
    return widened(np.sqrt(np.clip(variance, 0.0, None)), bound)


def prompt_means(sums: pa.Table, keys: list[str]) -> dict[str, np.ndarray]:
    """The prompt mean of every cell of :func:`prompt_sums` (one table or merged): see the module doc.

    Returns arrays (one per cell, in the table's order) named after ``frontier_mean``'s columns:
    ``prompts``, ``gain``, ``kl`` (centres), ``gain_se``, ``kl_se`` (within-prompt error bars, NaN: not
    trusted), ``gain_spread_se``, ``kl_spread_se``, ``gain_plugin``, ``kl_plugin`` (plug-in means, for
    reference), ``reliable`` (the fraction of reliable prompts), ``slope`` (``d gain / d KL``),
    ``kl_dbeta`` (``d KL / d beta`` of the mean) and ``gain_se_at_kl`` (the error bar of the gain at the
    cell's KL, beta free).
    """
    column = {name: sums[name].to_numpy(zero_copy_only=False).astype(np.float64) for name in sums.column_names
              if name not in keys}
    prompts = column["prompts"]
    drifts = column["drift_count"]
    excess = {name: _drift_excess(drifts, column[f"{name}_drift_sum"], column[f"{name}_drift_sq_sum"]) for name in MOMENTS}
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {"prompts": prompts.astype(np.int64)}
        for name in MOMENTS:
            bound = column[f"{name}_bound_sum"] / prompts + excess[name]
            out[name] = column[f"{name}_mean"]
            out[f"{name}_se"] = _bar(column[f"{name}_var_sum"] / prompts**2, bound)
            spread = between_prompt_se(prompts, column[f"{name}_m2"])
            out[f"{name}_spread_se"] = np.where(np.isfinite(out[f"{name}_se"]), np.sqrt(spread**2 + bound**2), np.nan)
            out[f"{name}_plugin"] = column[f"{name}_plugin_sum"] / prompts
        out["reliable"] = column["reliable_sum"] / prompts
        slope = column["gain_dbeta_sum"] / column["kl_dbeta_sum"]
        out["slope"] = slope
        out["kl_dbeta"] = column["kl_dbeta_sum"] / prompts
        variance = (column["gain_var_sum"] - 2 * slope * column["gain_kl_cov_sum"] + slope**2 * column["kl_var_sum"]) / prompts**2
        at_kl_drift = _drift_excess(drifts, column["gain_drift_sum"] - slope * column["kl_drift_sum"],
                                    column["gain_drift_sq_sum"] - 2 * slope * column["gain_kl_drift_sum"]
                                    + slope**2 * column["kl_drift_sq_sum"])
        bound = (column["gain_bound_k_sum"] + np.abs(slope) * column["kl_bound_k_sum"] + column["tie_at_kl_sum"]) / prompts \
            + at_kl_drift
        out["gain_se_at_kl"] = _bar(variance, np.where(np.isfinite(slope), bound, np.nan))
    return out


def within_prompt_se(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a per-prompt table: the SEs of gain and KL that the prompt mean adds up (``*_se_delta`` times
    :func:`variance_factor`, no t-factor; the interval SE for a table that predates them). Adaptive sampling
    stops on these."""
    return _row_se(table, "gain"), _row_se(table, "kl")
