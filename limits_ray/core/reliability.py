"""Reliability: when an estimate, a frontier point and a prompt-averaged frontier may be believed.

Every rule that calls an estimate *reliable* or a frontier *trusted* lives here, with its constants and
the words the reports use for it (:data:`RELIABLE_RULE`, :data:`TRUSTED_RULE`). Notation of
../shared/MATH.md, "Reliability of the importance weights".

1. A row's own test (:func:`own_reliable`, applied by :meth:`limits_ray.core.tilt.TiltStats.finalize`):
   the Pareto k-hat of its weights ``exp(r/beta)`` (:mod:`limits_ray.core.psis`) below
   ``min(1 - 1/log10 N, 0.7)`` (:func:`khat_thresholds`; NaN, when the largest rewards are tied and no
   tail can be fitted, passes) and Kish ESS at least :data:`ESS_FLOOR`.
2. The cross-prompt gate. One prompt's k-hat is noisy (sampling SD about ``(1 + k)/sqrt(M)``: 0.14 at
   ``N = 1000``, ``k = 0.5``), and where the true shape is near or above 0.5 the prompts whose sample
   missed the upper tail are the ones with a small k-hat, a low estimate and a small SE: a per-prompt
   cut keeps exactly those. So :func:`pooled_khat` shrinks each prompt's k-hat toward what the prompts
   of its cell (align, eval, beta; and N in ``convergence``), itself included, predict for it from the
   covariate ``body_sd / beta`` (the spread of its rewards below the fitted tail, over beta), by how much
   the prompts differ beyond that and their sampling noise (empirical Bayes), and a row is reliable only
   where that pooled k-hat is below :data:`POOLED_KHAT_LIMIT` as well (:func:`passes_gate`); where it
   is not, ``gain_se`` and ``kl_se`` are NaN. Two passes keep this off any one process's memory:
   :func:`khat_sums` of each part of a table (a bucket's shard, a flush of rows) are small per-cell sums
   that :func:`merge_khat_sums` adds up; :func:`apply_pooled` then gates each part with the merged sums.
   The result does not depend on how the prompts were split into parts.
3. A prompt-averaged frontier is *trusted* at a beta when at least :data:`TRUSTED_FRACTION` of its
   prompts are reliable there and at every larger beta (:func:`trusted_count`; the KL range of
   :func:`limits_ray.core.frontier.trusted_kl_range`, the beta of :func:`trusted_beta`).
4. Adaptive sampling stops a prompt only where its weights are reliable and also spread: Kish ``ESS/N``
   at least :data:`MIN_ESS_FRACTION` (:func:`is_reliable`, :func:`frontier_reliable`).

Pure numpy and pyarrow.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from limits_ray.core.psis import khat_sd

__all__ = [
    "ESS_FLOOR", "FALLBACK_ESS_FLOOR", "MIN_ESS_FRACTION", "POOLED_KHAT_LIMIT", "POOLED_TABLES", "POOL_MIN_PROMPTS",
    "POOL_SUMS", "POOLED_RULE", "RELIABLE_RULE", "TRUSTED_FRACTION", "TRUSTED_RULE", "apply_pooled", "frontier_reliable",
    "is_reliable", "khat_pool_sums", "khat_pool_terms", "khat_sums", "khat_threshold", "khat_thresholds",
    "merge_khat_sums", "own_reliable", "passes_gate", "pool_whole", "pooled_khat", "pooled_khat_of_cells",
    "reliable_rows", "trusted_beta", "trusted_count",
]

ESS_FLOOR = 20.0
"""Smallest Kish ESS at which an estimate is called reliable.

The delta-method interval treats the ratio estimator as a mean of ``ESS`` comparable terms; with
fewer than about 20, a few samples carry the estimate, its sampling distribution is far from normal
and the variance behind the SE is itself a mean over a handful of weights (Student's 97.5% quantile
with 19 degrees of freedom is already 2.09, and the weights are rarely that benign). The floor matters most
where k-hat cannot be fitted (the largest rewards tied: bounded weights, k-hat NaN) and at small N.
"""


FALLBACK_ESS_FLOOR = 10.0
"""For a ``frontier`` table without the ``reliable`` column (written before it existed): Kish ESS at least this
counts as reliable (:func:`reliable_rows`)."""

TRUSTED_FRACTION = 0.9
"""A beta of a prompt-averaged frontier is trusted when at least this fraction of prompts is reliable there."""

POOLED_KHAT_LIMIT = 0.45
"""Pooled k-hats (:func:`pooled_khat`) at or above this are not reliable.

The weights have finite variance for ``k < 0.5``; the margin is for ``k`` at the bound, where the
variance is infinite and a cell's pooled k-hat straddles 0.5 (its SD over ``C`` prompts is about
``0.14/sqrt(C)`` at ``N = 1000``), which splits a cell of alike prompts into a reliable part that
under-covers (bench/bench_coverage.py measures both limits)."""


RELIABLE_RULE = f"Pareto k-hat of the weights exp(r/beta) below min(1 - 1/log10 N, 0.7) and ESS >= {ESS_FLOOR:g}"
"""The row's own test in words (:func:`own_reliable`); the cross-prompt gate adds :data:`POOLED_RULE`."""

POOLED_RULE = f"its k-hat pooled over the prompts of its cell below {POOLED_KHAT_LIMIT:g}"
"""The cross-prompt gate in words (:func:`passes_gate`)."""

TRUSTED_RULE = f"at least {TRUSTED_FRACTION:.0%} of the prompts reliable at that beta and at every larger beta"
"""When a beta of a prompt-averaged frontier is trusted, in words (:func:`trusted_count`)."""


def own_reliable(k_hat: np.ndarray, thresholds: np.ndarray, ess: np.ndarray) -> np.ndarray:
    """A row's own test: ``(k_hat < threshold or k_hat is NaN) and ess >= ESS_FLOOR`` (arrays broadcast;
    ``thresholds`` from :func:`khat_thresholds` of the rows' sample counts)."""
    return ((k_hat < thresholds) | np.isnan(k_hat)) & (ess >= ESS_FLOOR)

def khat_threshold(n: int) -> float:
    """``min(1 - 1/log10 N, 0.7)``: the largest k-hat at which N samples give a usable estimate."""
    return float(khat_thresholds(np.array([n]))[0])


def khat_thresholds(n: np.ndarray) -> np.ndarray:
    """:func:`khat_threshold` of each sample count in ``n`` (``-inf`` where ``N <= 1``)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(n > 1, np.minimum(1.0 - 1.0 / np.log10(np.maximum(n, 2.0)), 0.7), -np.inf)


POOL_MIN_PROMPTS = 10
"""Fewest prompts (with finite k-hat and covariate) of a cell that :func:`pooled_khat` pools; below, NaN."""


POOL_SUMS = ("count", "x_sum", "x_sq_sum", "k_sum", "xk_sum", "k_sq_sum", "var_sum")
"""The per-cell sums of :func:`khat_pool_sums`, in order."""


def khat_pool_terms(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row's terms of :data:`POOL_SUMS`, ``(1, x, x^2, k, x k, k^2, sd^2)``; zeros where k-hat or the
    covariate is not finite (the row is not pooled)."""
    used = np.isfinite(khat_values) & np.isfinite(covariate)
    k = np.where(used, khat_values, 0.0)
    x = np.where(used, covariate, 0.0)
    variance = np.where(used, khat_sd(k, n) ** 2, 0.0)
    return used.astype(np.float64), x, x * x, k, x * k, k * k, variance


def khat_pool_sums(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray, axis: int = 0) -> tuple[np.ndarray, ...]:
    """:data:`POOL_SUMS` along ``axis`` (:func:`khat_pool_terms` summed); sums of prompt sets add up."""
    return tuple(term.sum(axis=axis) for term in khat_pool_terms(khat_values, n, covariate))


def pooled_khat(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray, count: np.ndarray, x_sum: np.ndarray,
                x_sq_sum: np.ndarray, k_sum: np.ndarray, xk_sum: np.ndarray, k_sq_sum: np.ndarray,
                var_sum: np.ndarray) -> np.ndarray:
    """Each prompt's k-hat shrunk toward what its covariate predicts from its cell (empirical Bayes).

    The Fay-Herriot model (Fay & Herriot, "Estimates of income for small places", JASA 74(366), 1979;
    Morris, "Parametric empirical Bayes inference", JASA 78(381), 1983): ``k_x = a + b c_x + u_x``,
    ``u_x ~ (0, tau^2)`` across the prompts of a cell, observed with sampling noise ``sd_x``
    (:func:`limits_ray.core.psis.khat_sd`). With the cell sums of :func:`khat_pool_sums` over its ``C`` prompts: ``a``, ``b``
    by least squares of k-hat on the covariate ``c`` (``b = 0`` when ``c`` does not vary),
    ``tau^2 = max(RSS/(C - p) - mean sd^2, 0)`` (``p`` = 2 fitted coefficients, 1 without a slope) and
    ``lam = tau^2 / (tau^2 + sd_x^2)``; the result is ``m_x + lam (k_x - m_x)``, ``m_x = a + b c_x``.
    Prompts that differ from the fitted line no more than their noise all get the line's value;
    prompts that clearly differ keep their own k-hat. NaN (not pooled) in a cell of fewer than
    :data:`POOL_MIN_PROMPTS` prompts (too few to tell noise from spread) and where the row's k-hat or
    covariate is not finite. Arrays broadcast.
    """
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_mean, k_mean = x_sum / count, k_sum / count
        xx = x_sq_sum - count * x_mean * x_mean
        xk = xk_sum - count * x_mean * k_mean
        kk = k_sq_sum - count * k_mean * k_mean
        sloped = xx > 1e-12 * np.maximum(x_sq_sum, 1e-300)
        slope = np.where(sloped, xk / xx, 0.0)
        residual = np.clip(kk - slope * xk, 0.0, None)
        tau2 = np.clip(residual / (count - np.where(sloped, 2.0, 1.0)) - var_sum / count, 0.0, None)
        line = k_mean + slope * (covariate - x_mean)
        sd2 = khat_sd(khat_values, n) ** 2
        weight = np.where(tau2 > 0, tau2 / (tau2 + sd2), 0.0)
        shrunk = line + weight * (khat_values - line)
    return np.where((count >= POOL_MIN_PROMPTS) & np.isfinite(khat_values) & np.isfinite(covariate), shrunk, np.nan)


def pooled_khat_of_cells(khat_values: np.ndarray, n: np.ndarray, covariate: np.ndarray, axis: int = 0) -> np.ndarray:
    """:func:`pooled_khat` of arrays whose ``axis`` runs over the prompts of each cell (all in memory)."""
    sums = (np.expand_dims(total, axis) for total in khat_pool_sums(khat_values, n, covariate, axis=axis))
    return pooled_khat(khat_values, n, covariate, *sums)


def passes_gate(own_reliable: np.ndarray, pooled: np.ndarray, limit: float = POOLED_KHAT_LIMIT) -> np.ndarray:
    """The tables' ``reliable``: the row's own test and a pooled k-hat below ``limit`` (or NaN: not pooled)."""
    return np.asarray(own_reliable, bool) & ~(pooled >= limit)


POOLED_TABLES: dict[str, tuple[str, ...]] = {
    "frontier": ("align", "eval", "beta"),
    "convergence": ("align", "eval", "n_samples", "beta"),
    "winrate": ("align", "eval", "beta"),  # the same weights exp(r/beta) as the frontier's rows (core/winrate.py)
}
"""The tables the gate applies to, and the columns naming a cell of each."""
_SIZE = {"frontier": "n", "convergence": "n_samples", "winrate": "n"}  # the sample-count column of each table
_INTERVAL_SES = {"winrate": ("winrate_se", "kl_se")}  # the SEs the gate sets NaN; gain_se and kl_se elsewhere
_SUMS = tuple(f"pool_{name}" for name in POOL_SUMS)
GATE_ROWS = 1 << 17
"""Rows :func:`apply_pooled` gates at once."""


def _covariate(table: pa.Table) -> np.ndarray:
    """``body_sd / beta``: how far the tilt reaches into a prompt's rewards (the covariate of :func:`pooled_khat`)."""
    return _column(table, "body_sd") / _column(table, "beta")


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False)


def khat_sums(table: pa.Table, name: str) -> pa.Table:
    """Per-cell sums :data:`limits_ray.core.reliability.POOL_SUMS` (:func:`khat_pool_terms`) of ``table``, :data:`GATE_ROWS`
    rows at a time."""
    keys = list(POOLED_TABLES[name])
    parts = []
    for start in range(0, max(table.num_rows, 1), GATE_ROWS):
        rows = table.slice(start, GATE_ROWS)
        terms = khat_pool_terms(_column(rows, "khat").astype(np.float64), _column(rows, _SIZE[name]), _covariate(rows))
        columns = {key: rows[key] for key in keys}
        columns.update({field: pa.array(term) for field, term in zip(_SUMS, terms)})
        parts.append(_group_sum(pa.table(columns), keys))
    return parts[0] if len(parts) == 1 else merge_khat_sums(parts, name)


def merge_khat_sums(sums: list[pa.Table], name: str) -> pa.Table:
    """Add :func:`khat_sums` tables of disjoint prompt sets."""
    return _group_sum(pa.concat_tables(sums), list(POOLED_TABLES[name]))


def _group_sum(table: pa.Table, keys: list[str]) -> pa.Table:
    grouped = table.group_by(keys, use_threads=False).aggregate([(column, "sum") for column in _SUMS])
    return pa.table({**{key: grouped[key] for key in keys}, **{column: grouped[f"{column}_sum"] for column in _SUMS}})


def apply_pooled(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    """``table`` (rows in their order) with ``khat_pooled`` set and ``reliable``, ``gain_se``, ``kl_se`` gated
    (``winrate_se`` and ``kl_se`` in ``winrate``).

    Before the gate a table's ``khat_pooled`` is its own ``khat`` (:class:`limits_ray.core.tables.PromptRows`).

    ``sums``: the merged :func:`khat_sums` of every prompt of the run. Where ``khat_pooled`` is NaN
    (a cell of fewer than :data:`limits_ray.core.reliability.POOL_MIN_PROMPTS` prompts, or missing from ``sums``;
    a k-hat that is not finite) only the row's own test applies. Rows are gated
    :data:`GATE_ROWS` at a time (each row needs only its cell's sums), which bounds the join's memory.
    """
    if table.num_rows > GATE_ROWS:
        return pa.concat_tables([_gate(table.slice(start, GATE_ROWS), sums, name)
                                 for start in range(0, table.num_rows, GATE_ROWS)])
    return _gate(table, sums, name)


def _gate(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    keys = list(POOLED_TABLES[name])
    indexed = table.select(keys).append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    joined = indexed.join(sums, keys=keys, join_type="left outer", use_threads=False).sort_by("_row")
    cell = [np.nan_to_num(_column(joined, field).astype(np.float64)) for field in _SUMS]  # absent cell: count 0
    pooled = pooled_khat(_column(table, "khat").astype(np.float64), _column(table, _SIZE[name]), _covariate(table), *cell)
    reliable = passes_gate(_column(table, "reliable"), pooled)
    out = table
    for field in _INTERVAL_SES.get(name, ("gain_se", "kl_se")):
        values = _column(out, field).astype(np.float64)
        out = out.set_column(out.schema.get_field_index(field), field, pa.array(np.where(reliable, values, np.nan)))
    out = out.set_column(out.schema.get_field_index("reliable"), "reliable", pa.array(reliable))
    return out.set_column(out.schema.get_field_index("khat_pooled"), "khat_pooled", pa.array(pooled))


def pool_whole(table: pa.Table, name: str) -> pa.Table:
    """:func:`apply_pooled` of a table that holds every prompt of the run (in-memory reductions)."""
    return apply_pooled(table, khat_sums(table, name), name)


def trusted_count(fraction_reliable: np.ndarray, min_fraction: float = TRUSTED_FRACTION) -> int:
    """Of betas ordered from the largest down, how many are trusted: those before the first at which fewer
    than ``min_fraction`` (:data:`TRUSTED_FRACTION`) of the prompts are reliable (a NaN fraction fails)."""
    failing = np.flatnonzero(~(np.asarray(fraction_reliable, dtype=np.float64) >= min_fraction))
    return int(failing[0]) if failing.size else int(np.size(fraction_reliable))


def reliable_rows(frontier: pa.Table, ess_floor: float = FALLBACK_ESS_FLOOR) -> np.ndarray:
    """Per row of a ``frontier`` table, whether its estimate is reliable: its ``reliable`` column when
    the table has one, else Kish ESS >= ``ess_floor``."""
    if "reliable" in frontier.column_names:
        return np.asarray(frontier["reliable"].to_pylist(), dtype=bool)
    return frontier["ess"].to_numpy() >= ess_floor


def trusted_beta(frontier: pa.Table, align: str, evaluation: str, reliable: np.ndarray) -> float | None:
    """The smallest beta of one (align, eval) frontier that is trusted (:func:`trusted_count` over the
    per-prompt ``reliable`` flags of a ``frontier`` table); ``None``: not even the largest beta. KL grows
    as beta falls, so the trusted KL range ends at ``KL(trusted beta)``."""
    mask = np.logical_and(np.asarray(frontier["align"].to_pylist()) == align, np.asarray(frontier["eval"].to_pylist()) == evaluation)
    betas, ok = frontier["beta"].to_numpy()[mask], reliable[mask]
    descending = sorted(set(betas.tolist()), reverse=True)
    trusted = trusted_count(np.array([ok[betas == beta].mean() for beta in descending]))
    return descending[trusted - 1] if trusted else None


MIN_ESS_FRACTION = 0.1
"""The Kish ``ESS / N`` below which :func:`is_reliable` calls an estimate unreliable."""


def is_reliable(ess: np.ndarray, n: np.ndarray, min_fraction: float = MIN_ESS_FRACTION) -> np.ndarray:
    """Whether each frontier estimate has enough effective samples to stop a prompt: Kish ``ESS / N >= min_fraction``.

    Used beside the PSIS ``reliable`` flag (:func:`frontier_reliable`): ``ESS / N`` is near
    ``exp(-var(r/beta))`` for log-normal weights, and at 0.1 the tilt rests on a tenth of the
    samples, so a prompt does not stop on a pilot whose weights sit on a few samples even where
    k-hat is benign. NaN (and N = 0) count as unreliable.
    """
    ess, n = np.asarray(ess, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(n > 0, ess / n, np.nan)
    return np.nan_to_num(fraction, nan=-1.0) >= min_fraction


def frontier_reliable(frontier: pa.Table) -> np.ndarray:
    """Per row: the PSIS ``reliable`` flag of the frontier table (k-hat and ESS, see
    :meth:`limits_ray.core.tilt.TiltStats.finalize`) and the ESS fraction of :func:`is_reliable` together."""
    flags = frontier["reliable"].to_numpy(zero_copy_only=False).astype(bool)
    return flags & is_reliable(frontier["ess"].to_numpy(), frontier["n"].to_numpy())
