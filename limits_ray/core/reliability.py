"""Reliability: when an estimate, a frontier point and a prompt-averaged frontier may be believed.

Every rule that calls an estimate *reliable* or a frontier *trusted* lives here, with its constants and
the words the reports use for it (:data:`RELIABLE_RULE`, :data:`TRUSTED_RULE`). Notation of
../shared/MATH.md, "Reliability of the importance weights".

1. A row's own test (:func:`own_reliable`, applied by :meth:`limits_ray.core.tilt.TiltStats.finalize`):
   the Pareto k-hat of its weights ``exp(r/beta)`` (:mod:`limits_ray.core.psis`) below
   ``min(1 - 1/log10 N, 0.7)`` (:func:`khat_thresholds`; NaN, when the largest rewards are tied and no
   tail can be fitted, passes here and is decided by the gate) and Kish ESS at least :data:`ESS_FLOOR`.
2. The cross-prompt gate (:func:`gate_rows`). One prompt's sample cannot tell a benign tail from an
   upper tail (or a higher reward level) it missed: its k-hat is noisy (sampling SD about
   ``(1 + k)/sqrt(M)``: 0.14 at ``N = 1000``, ``k = 0.5``), and where the true shape is near or above 0.5
   the prompts whose sample missed the upper tail are the ones with a small k-hat, a low estimate and a
   small SE: a per-prompt cut keeps exactly those. So a row is ``reliable`` only where its own test
   passes and the prompts of its cell (align, eval, beta; and N in ``convergence``; itself included)
   back it:

   - *pooled k-hat*: its k-hat shrunk toward what the cell predicts for it from the covariate
     ``body_sd / beta`` (the spread of its rewards below the fitted tail, over beta), by how much the
     prompts differ beyond that and their sampling noise (empirical Bayes, :func:`pooled_khat`),
     ``khat_pooled``, is below :data:`POOLED_KHAT_LIMIT` (:func:`passes_gate`);
   - *the cell's line*: the cell's least-squares line of k-hat on the covariate is below that limit at
     the prompt's covariate too (:func:`cell_line`). When a minority of heavier-tailed prompts that
     ``body_sd`` does not set apart inflates the cell's spread, the shrinkage stops and the pooled k-hat
     is the prompt's own again; the line does not look at the prompt's own tail;
   - *the cell's ESS*: the cell's line of ``log ESS`` on the covariate predicts an ESS of at least
     :data:`ESS_FLOOR`: where the tilt rests on a few samples, a prompt passes the ESS floor by having
     drawn more of the rare top rewards than its share (its estimate then too high);
   - *tied top rewards*: a prompt whose largest reward is repeated (or whose k-hat cannot be fitted for
     ties: NaN) has weights that look bounded, which is no passed test: an unseen higher reward is not
     in its sample. Where some prompt of its cell reached a higher reward ``R``, the unseen part of its
     distribution above its own top is taken to have mass up to ``q = TIE_MASS / N`` (about its expected
     mass) and, the cell's rewards reaching ``R``, to lie between its own top and ``R``; :func:`tie_bound`
     bounds the KL's bias from it, and the gain's where the gain is in the align reward (the worst mass
     ``u <= q`` at the worst level; each effect is exact in ``log Z``, ``KL``, the gain and the level), in
     units of the row's SEs. The row passes where that bound is at most :data:`EXPANSION_LIMIT`, and the
     bound becomes its ``bias_allowance`` (for the gain of another evaluation reward too, an assumption:
     the unseen level's value of it is no better known than a missed tail sample's);
     its interval SEs grow by ``sqrt(1 + a^2)`` for it. Where the row's gain is in its align reward,
     ``tie_bias_at_kl`` bounds the bias of the tangent's intercept ``gain - beta KL`` (exact in the same
     quantities; the frontier's bias at a fixed KL, which the two bounds above, added, would overstate:
     the missed level moves the point mostly along the frontier); the prompt mean's fixed-KL error bar uses
     it for those rows.
     At large beta the tilt hardly sees an unseen level and the bound is a small fraction of the SE; where
     the top level dominates the tilt it is not. A tied prompt at its cell's top passes only where the
     cell has at least :data:`POOL_MIN_PROMPTS` prompts (none of them reached higher; nothing bounds a
     level above every prompt's top);
   - *the expansion*: the first-order bias correction is within :data:`EXPANSION_LIMIT` of the row's
     delta-method SE (``|gain_bc - gain| <= gain_se_delta``, likewise the KL; the win rate's in
     ``winrate``). Both come from the same second-order expansion; where the correction is as large as
     the error the expansion does not hold. A zero SE (constant rewards) fails it too.

   Where a row is not reliable, ``gain_se`` and ``kl_se`` are NaN. ``bias_allowance`` says what the
   prompt mean (:mod:`limits_ray.core.prompt_mean`) allows for the row's bias, in units of its own
   delta-method SE: 0 where it is reliable (the tie bound where it passed the tie test below its cell's
   top), or fails only its own k-hat/ESS test in a cell that passes every cell test with a fitted line
   (its sample saw more of the tail than the others); infinite otherwise: nothing bounds its bias, and the prompt mean gets no error bar. (A bound of one SE for
   rows that pass their own test in a cell whose k-hat fails was tried: those rows are the ones whose
   sample missed the tail, and the prompt mean's interval covered 0.62 at 1e3 prompts with 1% of them,
   bench/bench_prompt_mean.py.) Two passes keep the gate off any one process's memory:
   :func:`khat_sums` of each part of a table (a bucket's shard, a flush of rows) are small per-cell sums
   (and one maximum) that :func:`merge_khat_sums` combines; :func:`apply_pooled` then gates each part
   with the merged sums. The result does not depend on how the prompts were split into parts.
3. A prompt-averaged frontier is *trusted* at a beta when at least :data:`TRUSTED_FRACTION` of its
   prompts are reliable there and at every larger beta (:func:`trusted_count`; the KL range of
   :func:`limits_ray.core.frontier.trusted_kl_range`, the beta of :func:`trusted_beta`).
4. Adaptive sampling stops a prompt only where its weights are reliable and also spread: Kish ``ESS/N``
   at least :data:`MIN_ESS_FRACTION` (:func:`is_reliable`, :func:`frontier_reliable`).

Pure numpy and pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from limits_ray.core.psis import khat_sd

__all__ = [
    "CELL_MAXIMA", "CELL_SUMS", "ESS_FLOOR", "EXPANSION_LIMIT", "FALLBACK_ESS_FLOOR", "GateResult", "MIN_ESS_FRACTION",
    "POOLED_KHAT_LIMIT", "POOLED_RULE", "POOLED_TABLES", "POOL_MIN_PROMPTS", "POOL_SUMS", "RELIABLE_RULE", "ROW_FIELDS",
    "TIE_MASS", "TRUSTED_FRACTION", "TRUSTED_RULE", "apply_pooled", "cell_line", "cell_terms", "cell_totals", "frontier_reliable",
    "gate_cells", "gate_rows", "gated_interval", "is_reliable", "khat_pool_sums", "khat_pool_terms", "khat_sums", "khat_threshold",
    "khat_thresholds", "merge_khat_sums", "own_reliable", "passes_gate", "pool_whole", "pooled_khat",
    "pooled_khat_of_cells", "reliable_rows", "tie_bound", "trusted_beta", "trusted_count",
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


RELIABLE_RULE = (f"the prompt's Pareto k-hat of the weights exp(r/beta) below min(1 - 1/log10 N, 0.7) and "
                 f"ESS >= {ESS_FLOOR:g}")
"""The row's own test in words (:func:`own_reliable`); the cross-prompt gate adds :data:`POOLED_RULE`."""

POOLED_RULE = (f"its cell of prompts backs it: pooled k-hat below {POOLED_KHAT_LIMIT:g}, where its top rewards are tied "
               "a higher reward of the cell it missed would move it by at most a standard error, a bias correction "
               "smaller than the standard error")
"""The cross-prompt gate in words (:func:`gate_rows`)."""

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
        line, sloped, slope, xk = _line(count, x_sum, x_sq_sum, k_sum, xk_sum, covariate)
        k_mean = k_sum / count
        kk = k_sq_sum - count * k_mean * k_mean
        residual = np.clip(kk - slope * xk, 0.0, None)
        tau2 = np.clip(residual / (count - np.where(sloped, 2.0, 1.0)) - var_sum / count, 0.0, None)
        sd2 = khat_sd(khat_values, n) ** 2
        weight = np.where(tau2 > 0, tau2 / (tau2 + sd2), 0.0)
        shrunk = line + weight * (khat_values - line)
    return np.where((count >= POOL_MIN_PROMPTS) & np.isfinite(khat_values) & np.isfinite(covariate), shrunk, np.nan)


def _line(count, x_sum, x_sq_sum, y_sum, xy_sum, covariate):
    """Least-squares line of ``y`` on ``x`` from cell sums, at ``covariate``: ``(value, sloped, slope, S_xy)``;
    slope 0 when ``x`` does not vary (no division checks: callers silence them)."""
    x_mean, y_mean = x_sum / count, y_sum / count
    xx = x_sq_sum - count * x_mean * x_mean
    xy = xy_sum - count * x_mean * y_mean
    sloped = xx > 1e-12 * np.maximum(x_sq_sum, 1e-300)
    slope = np.where(sloped, xy / np.where(sloped, xx, 1.0), 0.0)
    return y_mean + slope * (covariate - x_mean), sloped, slope, xy


def cell_line(count: np.ndarray, x_sum: np.ndarray, x_sq_sum: np.ndarray, y_sum: np.ndarray, xy_sum: np.ndarray,
              covariate: np.ndarray) -> np.ndarray:
    """What a cell's least-squares line of ``y`` on the covariate predicts at ``covariate`` (the line of
    :func:`pooled_khat` for ``y`` = k-hat), from the cell's sums over its ``count`` rows; NaN in cells of
    fewer than :data:`POOL_MIN_PROMPTS` rows. Arrays broadcast."""
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = _line(count, x_sum, x_sq_sum, y_sum, xy_sum, covariate)[0]
    return np.where((count >= POOL_MIN_PROMPTS) & np.isfinite(covariate), value, np.nan)


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
_ROW_COLUMNS = {"winrate": {"gain": "winrate", "gain_bc": "winrate_bc", "gain_se_delta": "winrate_se_delta"}}
"""Per table, the column a field of :data:`ROW_FIELDS` is read from where its name differs (the win rate is
the estimate the expansion test looks at in ``winrate``)."""
_INTERVAL_SES = {"winrate": ("winrate_se", "kl_se")}  # the SEs the gate sets NaN; gain_se and kl_se elsewhere

EXPANSION_LIMIT = 1.0
"""Largest ``|bias correction| / delta-method SE`` (gain and KL) of a reliable row, and largest tie bound
(:func:`tie_bound`) of a reliable row with tied top rewards (see the module doc)."""

TIE_MASS = 1.0
"""``N q`` of the mass ``q`` of the reward levels that none of ``N`` samples drew, as :func:`tie_bound` counts
it: about their expected mass (``1/(N + 1)`` under a uniform prior), since the prompt mean adds the bounds up
over prompts, where expected values are what add up (the 95% upper bound ``3/N`` would fail a row wherever
three more samples at the top would move it by an SE, at any beta)."""

CELL_SUMS = (*POOL_SUMS, "rows", "ess_count", "ess_x_sum", "ess_x_sq_sum", "ess_y_sum", "ess_xy_sum")
"""Per-cell sums: the pooled k-hat's (:data:`limits_ray.core.reliability.POOL_SUMS`), the rows, and the line of ``log ESS`` on the covariate."""
CELL_MAXIMA = ("reward_top",)
"""Per-cell maxima: the largest reward any prompt of the cell drew."""
ROW_FIELDS = ("khat", "n", "body_sd", "beta", "reliable", "ess", "gain", "gain_bc", "gain_se_delta", "kl", "kl_bc",
              "kl_se_delta", "reward_max", "top_tied", "log_z", "same")
"""What :func:`gate_rows` reads of each row (``n``: the sample count; ``same``: the gain is in the align reward).
Fields without ``same`` (the benchmarks' simulated rows, all aligned and evaluated on one reward) count as such."""
_SUMS = tuple(f"pool_{name}" for name in CELL_SUMS)
_MAXIMA = tuple(f"pool_{name}" for name in CELL_MAXIMA)
GATE_ROWS = 1 << 17
"""Rows :func:`apply_pooled` gates at once."""


@dataclass
class GateResult:
    """Per row: ``reliable``, ``khat_pooled``, ``bias_allowance`` and ``tie_bias_at_kl`` (module doc)."""

    reliable: np.ndarray
    khat_pooled: np.ndarray
    bias_allowance: np.ndarray
    tie_bias_at_kl: np.ndarray


def _covariate(fields: dict[str, np.ndarray]) -> np.ndarray:
    """``body_sd / beta``: how far the tilt reaches into a prompt's rewards (the covariate of :func:`pooled_khat`)."""
    return np.asarray(fields["body_sd"], np.float64) / np.asarray(fields["beta"], np.float64)


def cell_terms(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's terms of :data:`CELL_SUMS` (summed over a cell) and :data:`CELL_MAXIMA` (maximised)."""
    covariate = _covariate(fields)
    khat = np.asarray(fields["khat"], np.float64)
    terms = dict(zip(POOL_SUMS, khat_pool_terms(khat, fields["n"], covariate)))
    ess = np.asarray(fields["ess"], np.float64)
    used = np.isfinite(covariate) & (ess > 0) & np.isfinite(ess)
    x = np.where(used, covariate, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(used, np.log(np.where(used, ess, 1.0)), 0.0)
    terms.update(rows=np.ones(khat.shape), ess_count=used.astype(np.float64), ess_x_sum=x, ess_x_sq_sum=x * x,
                 ess_y_sum=y, ess_xy_sum=x * y)
    reward = np.asarray(fields["reward_max"], np.float64)
    terms["reward_top"] = np.where(np.isfinite(reward), reward, -np.inf)
    return terms


def cell_totals(fields: dict[str, np.ndarray], axis: int = 0) -> dict[str, np.ndarray]:
    """:func:`cell_terms` summed (maxima: maximised) along ``axis``, which runs over a cell's prompts (in memory)."""
    terms = cell_terms(fields)
    return {name: (terms[name].max(axis=axis) if name in CELL_MAXIMA else terms[name].sum(axis=axis))
            for name in (*CELL_SUMS, *CELL_MAXIMA)}


def _largest_over_mass(change, log_q: np.ndarray) -> np.ndarray:
    """``max |change(log u)|`` over ``u`` in ``(1e-6 q, q]``: a grid in ``log u``, then golden-section search
    between the best grid point's neighbours (``change`` takes arrays of ``log u`` with a trailing axis)."""
    grid = log_q[..., None] + np.linspace(np.log(1e-6), 0.0, 49)
    values = np.abs(change(grid))
    best = np.argmax(np.nan_to_num(values, nan=-1.0), axis=-1)[..., None]
    low = np.take_along_axis(grid, np.clip(best - 1, 0, grid.shape[-1] - 1), axis=-1)
    high = np.take_along_axis(grid, np.clip(best + 1, 0, grid.shape[-1] - 1), axis=-1)
    worst = np.take_along_axis(values, best, axis=-1)[..., 0]
    ratio = (np.sqrt(5.0) - 1) / 2
    for _ in range(40):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        keep_left = np.abs(change(left)) >= np.abs(change(right))
        low, high = np.where(keep_left, low, left), np.where(keep_left, right, high)
    return np.fmax(worst, np.abs(change((low + high) / 2))[..., 0])


def _tie_changes(n, beta, log_z, kl, level, gain) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``max_u |dKL|``, ``max_u |d gain|`` and ``max_u |d intercept|`` for mass ``u <= TIE_MASS / n`` added at
    reward ``level`` (1-D arrays; :func:`tie_bound`'s formulas)."""
    tilted = beta * (kl + log_z)  # E_beta[r]
    log_c, log_q = level / beta - log_z, np.log(TIE_MASS / n)
    mean = tilted - gain  # the sample mean of r (where the gain is in r)

    def parts(log_u: np.ndarray):
        expand = log_u.ndim > log_c.ndim
        c, t, b, lv, mu = (value[..., None] if expand else value for value in (log_c, tilted, beta, level, mean))
        log_m = log_u + c
        share = np.exp(-np.logaddexp(0.0, -log_m))  # m / (1 + m), stable
        u = np.exp(log_u)
        log_1m, log_1u = np.logaddexp(0.0, log_m), np.logaddexp(0.0, log_u)
        return (share * (lv - t) / b - log_1m + log_1u,  # dKL
                share * (lv - t) - u * (lv - mu) / (1 + u),  # d gain
                b * (log_1m - log_1u) - u * (lv - mu) / (1 + u))  # d intercept

    return tuple(_largest_over_mass(lambda log_u, k=k: parts(log_u)[k], log_q) for k in range(3))


def tie_bound(n: np.ndarray, beta: np.ndarray, log_z: np.ndarray, kl: np.ndarray, top: np.ndarray,
              kl_se: np.ndarray, gain: np.ndarray | None = None, gain_se: np.ndarray | None = None,
              own_top: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on a row's bias from reward levels in ``(own_top, top]`` that its ``n`` samples missed (module doc,
    *tied top rewards*): ``(bound in units of the row's SEs, bound on the tangent's intercept)``.

    Mass ``u <= q = TIE_MASS / n`` added at a level ``t`` to the sample's distribution (renormalised) moves
    the tilt's KL by exactly ``dKL(u) = s (t - E_beta[r]) / beta - log(1 + m) + log(1 + u)``, with
    ``m = u exp(t / beta - log_z)``, ``s = m / (1 + m)`` and ``E_beta[r] = beta (kl + log_z)``; where the
    row's gain is in its own reward (``gain`` given, ``mean(r) = E_beta[r] - gain``) its gain by exactly
    ``s (t - E_beta[r]) - u (t - mean(r)) / (1 + u)`` and the intercept ``gain - beta KL = beta log Z - mean(r)``
    (the frontier at a fixed KL, slope beta) by ``beta (log(1 + m) - log(1 + u)) - u (t - mean(r)) / (1 + u)``.
    Each change is monotone in ``t``, so its largest size over the missed levels is at an end, ``t = top``
    or ``t = own_top`` (default ``top``); the bounds are the largest over ``u`` in ``(0, q]`` too. The first
    is ``max(|dKL| / kl_se, |d gain| / gain_se)`` (the gain's part where given), infinite where it cannot be
    computed (a zero or missing SE); the second NaN without ``gain``.
    """
    shape = np.broadcast_shapes(*(np.shape(value) for value in (n, beta, log_z, kl, top, kl_se)))

    def flat(value, default=np.nan):
        value = np.full(shape, default) if value is None else value
        return np.broadcast_to(np.asarray(value, np.float64), shape).reshape(-1)

    own_top = flat(top if own_top is None else own_top)
    n, beta, log_z, kl, top, kl_se, gain, gain_se = (flat(value) for value in (n, beta, log_z, kl, top, kl_se, gain, gain_se))
    bound, intercept = np.full(n.size, np.inf), np.full(n.size, np.nan)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rows = np.flatnonzero(np.isfinite(top) & np.isfinite(kl_se) & (kl_se > 0) & (n >= 1))
        if rows.size:
            changes = [_tie_changes(n[rows], beta[rows], log_z[rows], kl[rows], level[rows], gain[rows])
                       for level in (top, own_top)]
            kl_change, gain_change, at_kl = (np.fmax(first, second) for first, second in zip(*changes))
            ratio = kl_change / kl_se[rows]
            with_gain = np.isfinite(gain[rows])
            ratio = np.where(with_gain, np.fmax(ratio, gain_change / gain_se[rows]), ratio)
            bound[rows] = np.where(np.isfinite(ratio), ratio, np.inf)
            intercept[rows] = np.where(with_gain, at_kl, np.nan)
    return bound.reshape(shape), intercept.reshape(shape)


def gate_rows(fields: dict[str, np.ndarray], cells: dict[str, np.ndarray]) -> GateResult:
    """The gate of rows ``fields`` (:data:`ROW_FIELDS`) given their cells' totals ``cells`` (:func:`cell_totals`,
    broadcast to the rows; a cell with no rows has count 0). See the module doc."""
    covariate = _covariate(fields)
    khat = np.asarray(fields["khat"], np.float64)
    pooled = pooled_khat(khat, fields["n"], covariate, *(cells[name] for name in POOL_SUMS))
    k_line = cell_line(cells["count"], cells["x_sum"], cells["x_sq_sum"], cells["k_sum"], cells["xk_sum"], covariate)
    ess_line = cell_line(cells["ess_count"], cells["ess_x_sum"], cells["ess_x_sq_sum"], cells["ess_y_sum"],
                         cells["ess_xy_sum"], covariate)
    own = np.asarray(fields["reliable"], bool)
    with np.errstate(invalid="ignore"):
        expansion = np.ones(own.shape, bool)
        for name in ("gain", "kl"):
            correction = np.abs(np.asarray(fields[f"{name}_bc"], np.float64) - np.asarray(fields[name], np.float64))
            expansion &= correction <= EXPANSION_LIMIT * np.asarray(fields[f"{name}_se_delta"], np.float64)
        tied = np.asarray(fields["top_tied"], bool)
        reward = np.asarray(fields["reward_max"], np.float64)
        at_top = reward >= cells["reward_top"]
        below = tied & ~at_top
        same = np.broadcast_to(np.asarray(fields.get("same", True), bool), below.shape)
        bound, intercept = np.zeros(below.shape), np.full(below.shape, np.nan)
        if below.any():  # only the rows that need it: the bound costs a search over the missed mass
            pick = {name: np.broadcast_to(np.asarray(fields[name], np.float64), below.shape)[below]
                    for name in ("n", "beta", "log_z", "kl", "kl_se_delta", "gain", "gain_se_delta")}
            top = np.broadcast_to(cells["reward_top"], below.shape)[below]
            bound[below], intercept[below] = tie_bound(
                pick["n"], pick["beta"], pick["log_z"], pick["kl"], top, pick["kl_se_delta"],
                np.where(same[below], pick["gain"], np.nan), pick["gain_se_delta"], reward[below])
        ties_ok = ~tied | (at_top & (cells["rows"] >= POOL_MIN_PROMPTS)) | (below & (bound <= EXPANSION_LIMIT))
        tail_ok = passes_gate(np.ones(own.shape, bool), pooled) & ~(k_line >= POOLED_KHAT_LIMIT)
        ess_ok = ~(ess_line < np.log(ESS_FLOOR))
    cell_ok = expansion & ties_ok & ess_ok & tail_ok
    reliable = own & cell_ok
    ordinary = ~own & cell_ok & np.isfinite(k_line)
    kept = reliable | ordinary
    return GateResult(reliable, pooled, np.where(kept, bound, np.inf), np.where(kept, intercept, np.nan))


def gated_interval(se: np.ndarray, reliable: np.ndarray, allowance: np.ndarray) -> np.ndarray:
    """A row's interval SE after the gate: NaN where not reliable, else widened by ``sqrt(1 + a^2)`` for its
    bias allowance ``a`` (the tie bound, in quadrature; 0 for most reliable rows)."""
    with np.errstate(invalid="ignore"):
        return np.where(reliable, se * np.sqrt(1.0 + np.where(reliable, allowance, 0.0) ** 2), np.nan)


def gate_cells(fields: dict[str, np.ndarray], axis: int = 0) -> GateResult:
    """:func:`gate_rows` of arrays whose ``axis`` runs over the prompts of each cell (all in memory: benchmarks)."""
    cells = {name: np.expand_dims(total, axis) for name, total in cell_totals(fields, axis).items()}
    return gate_rows(fields, cells)


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False)


def _fields(table: pa.Table, name: str) -> dict[str, np.ndarray]:
    columns = {"n": _SIZE[name], **_ROW_COLUMNS.get(name, {})}
    fields = {field: _column(table, columns.get(field, field)) for field in ROW_FIELDS if field != "same"}
    same = (_column(table, "align") == _column(table, "eval")) if name != "winrate" else np.zeros(table.num_rows, bool)
    return {**fields, "same": np.asarray(same, bool)}


def khat_sums(table: pa.Table, name: str) -> pa.Table:
    """Per-cell :data:`CELL_SUMS` and :data:`CELL_MAXIMA` (:func:`cell_terms`) of ``table``, :data:`GATE_ROWS` rows at a time."""
    keys = list(POOLED_TABLES[name])
    parts = []
    for start in range(0, max(table.num_rows, 1), GATE_ROWS):
        rows = table.slice(start, GATE_ROWS)
        terms = cell_terms(_fields(rows, name))
        columns = {key: rows[key] for key in keys}
        columns.update({f"pool_{field}": pa.array(terms[field], pa.float64()) for field in (*CELL_SUMS, *CELL_MAXIMA)})
        parts.append(_group(pa.table(columns), keys))
    return parts[0] if len(parts) == 1 else merge_khat_sums(parts, name)


def merge_khat_sums(sums: list[pa.Table], name: str) -> pa.Table:
    """Combine :func:`khat_sums` tables of disjoint prompt sets."""
    return _group(pa.concat_tables(sums), list(POOLED_TABLES[name]))


def _group(table: pa.Table, keys: list[str]) -> pa.Table:
    grouped = table.group_by(keys, use_threads=False).aggregate(
        [(column, "sum") for column in _SUMS] + [(column, "max") for column in _MAXIMA])
    return pa.table({**{key: grouped[key] for key in keys}, **{column: grouped[f"{column}_sum"] for column in _SUMS},
                     **{column: grouped[f"{column}_max"] for column in _MAXIMA}})


def apply_pooled(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    """``table`` (rows in their order) with ``khat_pooled`` and ``bias_allowance`` set and ``reliable``, ``gain_se``,
    ``kl_se`` gated (``winrate_se`` and ``kl_se`` in ``winrate``).

    Before the gate a table's ``khat_pooled`` is its own ``khat`` and ``reliable`` the row's own test
    (:class:`limits_ray.core.tables.PromptRows`).

    ``sums``: the merged :func:`khat_sums` of every prompt of the run. A cell missing from ``sums`` counts
    as empty: only the row's own test and the expansion apply (and tied top rewards do not pass). Rows are
    gated :data:`GATE_ROWS` at a time (each row needs only its cell's sums), which bounds the join's memory.
    """
    if table.num_rows > GATE_ROWS:
        return pa.concat_tables([_gate(table.slice(start, GATE_ROWS), sums, name)
                                 for start in range(0, table.num_rows, GATE_ROWS)])
    return _gate(table, sums, name)


def _gate(table: pa.Table, sums: pa.Table, name: str) -> pa.Table:
    keys = list(POOLED_TABLES[name])
    indexed = table.select(keys).append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    joined = indexed.join(sums, keys=keys, join_type="left outer", use_threads=False).sort_by("_row")
    cells = {field[len("pool_"):]: np.nan_to_num(_column(joined, field).astype(np.float64)) for field in _SUMS}  # absent: 0
    cells.update({field[len("pool_"):]: np.nan_to_num(_column(joined, field).astype(np.float64), nan=-np.inf)
                  for field in _MAXIMA})
    gate = gate_rows(_fields(table, name), cells)
    out = table
    for field in _INTERVAL_SES.get(name, ("gain_se", "kl_se")):
        values = gated_interval(_column(out, field).astype(np.float64), gate.reliable, gate.bias_allowance)
        out = out.set_column(out.schema.get_field_index(field), field, pa.array(values))
    for field, values in (("reliable", gate.reliable), ("khat_pooled", gate.khat_pooled),
                          ("bias_allowance", gate.bias_allowance), ("tie_bias_at_kl", gate.tie_bias_at_kl)):
        if field in out.column_names:
            out = out.set_column(out.schema.get_field_index(field), field, pa.array(values, pa.float64()
                                                                                   if field != "reliable" else None))
    return out


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
