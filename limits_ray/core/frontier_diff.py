"""The difference of two frontiers, paired by prompt, and the gain at a KL budget with its interval.

Two results directories A and B (two runs, two nights, two series) each have a per-prompt ``frontier``
table and its prompt average ``frontier_mean``. Per (align, eval), at a beta of both grids and at a KL
budget ``k``, this module gives ``B - A`` with two standard errors and a verdict (MATH.md notation;
``g_x(beta)``, ``kl_x(beta)`` a prompt's gain and KL estimates (see the end), ``P`` prompts):

* **The gain at a KL budget of one frontier** (:func:`gain_at_kl`): the frontier_mean table's gain at
  ``KL = k`` and its fixed-KL error bar ``se`` (within prompts; :func:`limits_ray.core.frontier.point_at_kl`:
  Hermite in log KL between grid points, ``gain_se_at_kl`` linear in KL), ``spread_se`` (across prompts,
  ``gain_spread_se`` linear in KL), the ``reliable`` fraction there and whether ``k`` is in the
  trusted KL range. Every "gain at a KL budget ± 95%" of a ``frontier_mean`` table (``compare-runs``, the
  nightly history page) comes from this one function.
* **Per-prompt terms at a KL budget** (:func:`kl_terms`). The frontier's gain at ``k`` is
  ``G(beta_k)`` with ``beta_k`` where the prompt-mean KL is ``k``; with ``t`` the position of ``k``
  between the grid points ``lo, hi`` (in mean KL) and ``s = (G_hi - G_lo)/(K_hi - K_lo)`` the chord's
  slope, each prompt's term is::

      u_x = (1 - t) g_x(lo) + t g_x(hi) - s ((1 - t) kl_x(lo) + t kl_x(hi) - k)

  ``mean_x u_x`` is exactly the interpolated gain at ``k`` (the KL part averages to 0), and the
  ``- s kl_x`` part is the first-order effect of the prompt's KL on where the budget falls (a fixed KL
  moves ``beta_k``: ``dG* = dG - s dK``), so ``sd_x(u)/sqrt(P)`` is the between-prompt SE of the
  gain *at fixed KL*. At a beta of the grid the term is ``u_x = g_x(beta)``. Between grid points the
  frontier itself is the Hermite interpolant, not the chord: every prompt's term is shifted by the same
  ``G(k) - mean_x u_x`` (a property of the mean curve, so the SEs do not change) and the unpaired
  difference is exactly the difference of the two frontiers' gains.
* **Paired** (prompts in both runs, ``C`` of them): each run's terms over the common prompts (each its
  own ``beta_k`` on its own mean over them), ``d_x = u_x^B - u_x^A``; the paired difference is
  ``mean(d)`` with ``se_paired = sd(d)/sqrt(C)`` (``ddof = 1``; NaN for ``C < 2``). The prompts' own
  spread (some prompts have far larger gains than others) cancels in ``d_x``; what is left is each
  prompt's Monte Carlo noise in both runs and any real change that differs between prompts. The
  empirical ``sd(d)`` also holds when the two runs share samples (two nights of one series: night 2's
  samples include night 1's), since it measures the spread of the differences themselves.
* **Unpaired**: each run over all its prompts, ``mean(u^B) - mean(u^A)`` (equal to the difference of the
  ``frontier_mean`` gains) with ``se_unpaired = sqrt(sd(u^A)^2/P_A + sd(u^B)^2/P_B)``: the two prompt
  sets taken as independent samples of a prompt population, which is what comparing the two runs'
  published means with their error bars amounts to.
* **Verdict** (:func:`verdict`): ``higher`` (B above A) or ``lower`` when the 95% interval
  ``mean(d) ± t_{C-1}(0.975) se_paired`` excludes 0, else ``not distinguishable``; with fewer than two
  common prompts the unpaired difference and the normal quantile decide (``basis``), and with no
  standard error at all the verdict is ``unknown``. On two runs of one setup each verdict at a KL
  budget or beta is ``higher`` or ``lower`` about 5% of the time (``tests/test_frontier_diff.py``
  measures it on simulated prompts).

The per-prompt estimates ``g_x``, ``kl_x`` are the bias-corrected ones (``gain_bc``, ``kl_bc``; the
plug-in ones for tables that predate them), the centres of ``frontier_mean``; their remaining bias is
largest outside the trusted KL range (``trusted_a``, ``trusted_b``), where two runs with different
samples per prompt (two nights of one series) also differ by its change. Pure numpy, scipy and pyarrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.special import stdtrit

from limits_ray.core.frontier import point_at_kl, trusted_kl_range

__all__ = [
    "DIFF_SCHEMA", "GainAtKL", "LEVEL", "PairDifference", "PromptGrid", "VERDICTS", "gain_at_kl", "kl_terms",
    "pair_difference", "prompt_grid", "quantile", "verdict",
]

LEVEL = 0.95
"""The level of every interval and verdict here."""

VERDICTS = ("higher", "lower", "not distinguishable", "unknown")
"""B against A: above, below, neither at 95%, or no standard error to tell."""

_Z = 1.959963984540054


def quantile(df: float) -> float:
    """The two-sided 95% quantile: Student's ``t_df(0.975)``, the normal one for ``df`` infinite."""
    return _Z if math.isinf(df) else float(stdtrit(df, 0.5 + LEVEL / 2))


def verdict(diff: float, se: float, df: float = math.inf) -> str:
    """``higher``/``lower`` when ``diff ± quantile(df) se`` excludes 0, ``not distinguishable`` when it
    holds 0, ``unknown`` when there is no standard error (NaN, or ``df < 1``)."""
    if not (np.isfinite(diff) and np.isfinite(se)) or df < 1:
        return "unknown"
    half = quantile(df) * se
    return "higher" if diff - half > 0 else "lower" if diff + half < 0 else "not distinguishable"


@dataclass(frozen=True)
class GainAtKL:
    """One frontier's gain at a KL budget (:func:`gain_at_kl`).

    ``se``: within prompts (the prompts fixed; :func:`limits_ray.core.frontier.point_at_kl`'s fixed-KL
    error bar), the error bar of the reports, NaN: not trusted; ``spread_se``: across prompts (``gain_spread_se``).
    ``reliable``: the fraction of reliable prompts there; ``trusted``: ``kl`` inside ``trusted_kl``
    (:func:`limits_ray.core.frontier.trusted_kl_range`).
    """

    align: str
    eval: str
    kl: float
    beta: float
    gain: float
    se: float
    spread_se: float
    reliable: float
    prompts: int
    trusted: bool
    trusted_kl: tuple[float, float] | None

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% interval ``gain ± 1.96 se`` (NaN ends without ``se``)."""
        return self.gain - _Z * self.se, self.gain + _Z * self.se


def gain_at_kl(frontier_mean: pa.Table, budget: float, align: str, eval: str) -> GainAtKL | None:
    """The gain of one (align, eval) frontier at ``KL = budget``, with its standard errors (module doc).

    None when the budget lies outside the grid's KL range; ``ValueError`` when the table has no such
    (align, eval). This is the one place a ``frontier_mean`` table's gain at a KL budget and its interval
    are computed.
    """
    try:
        point = point_at_kl(frontier_mean, budget, align, eval)
    except ValueError as error:
        if "outside the grid's KL range" in str(error):
            return None
        raise
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], eval)))
    rows = rows.sort_by("kl")
    kl = rows["kl"].to_numpy()

    def at(column: str) -> float:
        return float(np.interp(budget, kl, rows[column].to_numpy())) if column in rows.column_names else math.nan

    return GainAtKL(align=align, eval=eval, kl=float(budget), beta=point.beta, gain=point.gain, se=point.gain_se,
                    spread_se=at("gain_spread_se"), reliable=at("reliable"), prompts=int(pc.max(rows["prompts"]).as_py()),
                    trusted=point.trusted, trusted_kl=point.trusted_kl)


@dataclass(frozen=True)
class PromptGrid:
    """One (align, eval) frontier per prompt as matrices: ``gain[p, j]``, ``kl[p, j]`` of prompt
    ``prompt_ids[p]`` (sorted) at ``betas[j]`` (ascending)."""

    prompt_ids: np.ndarray
    betas: np.ndarray
    gain: np.ndarray
    kl: np.ndarray

    def take(self, prompt_ids: np.ndarray) -> "PromptGrid":
        """The rows of ``prompt_ids`` (each present), in that order."""
        rows = np.searchsorted(self.prompt_ids, prompt_ids)
        return PromptGrid(np.asarray(prompt_ids), self.betas, self.gain[rows], self.kl[rows])

    def at_betas(self, betas: np.ndarray) -> "PromptGrid":
        """The columns of ``betas`` (each on the grid)."""
        columns = _match(self.betas, betas)
        return PromptGrid(self.prompt_ids, self.betas[columns], self.gain[:, columns], self.kl[:, columns])


def _match(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Column of each value on the sorted grid (equal to 1e-9 relative)."""
    columns = np.clip(np.searchsorted(grid, values * (1 - 1e-9)), 0, grid.size - 1)
    if not np.allclose(grid[columns], values, rtol=1e-9, atol=0):
        raise ValueError("betas not on the grid")
    return columns


def prompt_grid(frontier: pa.Table, align: str, eval: str) -> PromptGrid:
    """The (align, eval) rows of a per-prompt ``frontier`` table as a :class:`PromptGrid`.

    ``ValueError`` when the pair has no rows, or when some prompt lacks some beta of the others.
    """
    rows = frontier.filter(pc.and_(pc.equal(frontier["align"], align), pc.equal(frontier["eval"], eval)))
    if rows.num_rows == 0:
        raise ValueError(f"no per-prompt frontier rows for align={align!r} eval={eval!r}")
    gain, kl = ("gain_bc", "kl_bc") if {"gain_bc", "kl_bc"} <= set(rows.column_names) else ("gain", "kl")
    rows = rows.select(["prompt_id", "beta", gain, kl]).rename_columns(["prompt_id", "beta", "gain", "kl"])
    rows = rows.sort_by([("prompt_id", "ascending"), ("beta", "ascending")])
    ids = np.asarray(rows["prompt_id"].to_pylist(), dtype=object)
    prompt_ids, starts = np.unique(ids, return_index=True)
    betas = np.unique(rows["beta"].to_numpy())
    if rows.num_rows != prompt_ids.size * betas.size:
        counts = np.diff(np.append(starts, ids.size))
        short = prompt_ids[counts != betas.size][:3].tolist()
        raise ValueError(f"align={align!r} eval={eval!r}: prompts {short} lack some of the {betas.size} betas "
                         "of the others; a per-prompt frontier has every beta for every prompt")
    shape = (prompt_ids.size, betas.size)
    grid_betas = rows["beta"].to_numpy().reshape(shape)
    if not np.all(grid_betas == betas):
        raise ValueError(f"align={align!r} eval={eval!r}: a prompt repeats a beta")
    return PromptGrid(prompt_ids.astype(str), betas, rows["gain"].to_numpy().reshape(shape),
                      rows["kl"].to_numpy().reshape(shape))


def kl_terms(grid: PromptGrid, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt terms ``u[p, b]`` of the gain at fixed KL ``budgets[b]`` (module doc) and the beta of
    each budget on this grid's prompt mean (NaN columns where a budget is outside its KL range)."""
    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    order = np.argsort(grid.kl.mean(axis=0), kind="stable")  # mean KL ascending (beta descending)
    kl, gain, betas = grid.kl[:, order], grid.gain[:, order], grid.betas[order]
    mean_kl, mean_gain = kl.mean(axis=0), gain.mean(axis=0)
    inside = (budgets >= mean_kl[0]) & (budgets <= mean_kl[-1])
    hi = np.clip(np.searchsorted(mean_kl, budgets, side="left"), 1, max(mean_kl.size - 1, 1))
    lo = hi - 1
    if mean_kl.size == 1:
        lo = hi = np.zeros_like(hi)
    width = mean_kl[hi] - mean_kl[lo]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(width > 0, (budgets - mean_kl[lo]) / width, 0.0)
        slope = np.where(width > 0, (mean_gain[hi] - mean_gain[lo]) / width, 0.0)
    terms = ((1 - t) * gain[:, lo] + t * gain[:, hi]
             - slope * ((1 - t) * kl[:, lo] + t * kl[:, hi] - budgets))
    beta = np.exp((1 - t) * np.log(betas[lo]) + t * np.log(betas[hi]))
    terms[:, ~inside] = np.nan
    beta[~inside] = np.nan
    return terms, beta


def _mean_se(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over prompts (axis 0) and its between-prompt SE ``sd/sqrt(P)`` (NaN for one prompt)."""
    count = terms.shape[0]
    mean = terms.mean(axis=0)
    if count < 2:
        return mean, np.full(mean.shape, np.nan)
    return mean, terms.std(axis=0, ddof=1) / np.sqrt(count)


DIFF_SCHEMA = pa.schema([
    ("align", pa.string()), ("eval", pa.string()), ("at", pa.string()),
    ("kl_a", pa.float64()), ("kl_b", pa.float64()), ("beta_a", pa.float64()), ("beta_b", pa.float64()),
    ("gain_a", pa.float64()), ("gain_a_se", pa.float64()), ("gain_b", pa.float64()), ("gain_b_se", pa.float64()),
    ("trusted_a", pa.bool_()), ("trusted_b", pa.bool_()),
    ("prompts_a", pa.int64()), ("prompts_b", pa.int64()), ("prompts_common", pa.int64()),
    ("diff", pa.float64()), ("diff_se_unpaired", pa.float64()),
    ("diff_paired", pa.float64()), ("diff_se_paired", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("basis", pa.string()), ("verdict", pa.string()),
])
"""One row per (align, eval) and KL budget (``at = "kl"``: ``kl_a = kl_b`` the budget, ``beta_a``,
``beta_b`` each run's beta there) or common beta (``at = "beta"``: ``beta_a = beta_b``, ``kl_a``, ``kl_b``
each run's mean KL there). ``gain_*``, ``gain_*_se`` (within prompts), ``trusted_*``: each run's
``frontier_mean`` there (:func:`gain_at_kl` at a budget). ``diff``, ``diff_se_unpaired``: every prompt of
each run; ``diff_paired``, ``diff_se_paired``: the common prompts; ``ci_low``, ``ci_high``: the 95%
interval of the difference the ``verdict`` rests on (``basis``: ``paired``, ``unpaired`` or ``none``)."""


@dataclass
class PairDifference:
    """:func:`pair_difference` of one (align, eval): its table rows and the prompts of one run only."""

    table: pa.Table
    only_a: list[str]
    only_b: list[str]
    common: int


def _trusted_at(trusted: tuple[float, float] | None, kl: np.ndarray) -> np.ndarray:
    if trusted is None:
        return np.zeros(kl.shape, bool)
    return (kl >= trusted[0] * (1 - 1e-12)) & (kl <= trusted[1] * (1 + 1e-12))


def pair_difference(frontier_a: pa.Table, frontier_b: pa.Table, mean_a: pa.Table, mean_b: pa.Table,
                    align: str, eval: str, budgets: np.ndarray, betas: bool = True) -> PairDifference:
    """``B - A`` of one (align, eval) frontier at the KL ``budgets`` both grids reach and (``betas``) at
    the betas both grids hold: rows of :data:`DIFF_SCHEMA` (module doc for the formulas).

    ``frontier_*`` are per-prompt tables (at least prompt_id, align, eval, beta, gain, kl), ``mean_*``
    their ``frontier_mean`` tables.
    """
    grid_a, grid_b = prompt_grid(frontier_a, align, eval), prompt_grid(frontier_b, align, eval)
    common = np.intersect1d(grid_a.prompt_ids, grid_b.prompt_ids)
    only_a = np.setdiff1d(grid_a.prompt_ids, common).tolist()
    only_b = np.setdiff1d(grid_b.prompt_ids, common).tolist()
    columns: dict[str, list] = {name: [] for name in DIFF_SCHEMA.names}

    def add(at: str, kl_a, kl_b, beta_a, beta_b, gain_a, gain_a_se, gain_b, gain_b_se, trusted_a, trusted_b,
            terms_a, terms_b, paired_terms) -> None:
        diff_a, se_a = _mean_se(terms_a)
        diff_b, se_b = _mean_se(terms_b)
        unpaired_se = np.sqrt(se_a**2 + se_b**2)
        count = common.size
        if count:
            paired, paired_se = _mean_se(paired_terms)
        else:
            paired, paired_se = np.full(diff_a.shape, np.nan), np.full(diff_a.shape, np.nan)
        for index in range(diff_a.size):
            if count >= 2:
                basis, centre, se, df = "paired", paired[index], paired_se[index], count - 1
            elif np.isfinite(unpaired_se[index]):
                basis, centre, se, df = "unpaired", diff_b[index] - diff_a[index], unpaired_se[index], math.inf
            else:
                basis, centre, se, df = "none", diff_b[index] - diff_a[index], math.nan, 0
            half = quantile(df) * se if df >= 1 else math.nan
            row = {
                "align": align, "eval": eval, "at": at, "kl_a": kl_a[index], "kl_b": kl_b[index],
                "beta_a": beta_a[index], "beta_b": beta_b[index], "gain_a": gain_a[index], "gain_a_se": gain_a_se[index],
                "gain_b": gain_b[index], "gain_b_se": gain_b_se[index], "trusted_a": bool(trusted_a[index]),
                "trusted_b": bool(trusted_b[index]), "prompts_a": grid_a.prompt_ids.size,
                "prompts_b": grid_b.prompt_ids.size, "prompts_common": count,
                "diff": diff_b[index] - diff_a[index], "diff_se_unpaired": unpaired_se[index],
                "diff_paired": paired[index], "diff_se_paired": paired_se[index],
                "ci_low": centre - half, "ci_high": centre + half, "basis": basis, "verdict": verdict(centre, se, df),
            }
            for name, value in row.items():
                columns[name].append(value)

    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    if budgets.size:
        terms_a, _ = kl_terms(grid_a, budgets)
        terms_b, _ = kl_terms(grid_b, budgets)
        points_a = [gain_at_kl(mean_a, budget, align, eval) for budget in budgets]
        points_b = [gain_at_kl(mean_b, budget, align, eval) for budget in budgets]
        keep = np.array([a is not None and b is not None for a, b in zip(points_a, points_b)], bool)
        keep &= np.all(np.isfinite(terms_a), axis=0) & np.all(np.isfinite(terms_b), axis=0)
        if keep.any():
            shown_a = [point for point, kept in zip(points_a, keep) if kept]
            shown_b = [point for point, kept in zip(points_b, keep) if kept]
            # The frontier between grid points is the Hermite interpolant: shift every term by its offset.
            shift_a = np.array([point.gain for point in shown_a]) - terms_a[:, keep].mean(axis=0)
            shift_b = np.array([point.gain for point in shown_b]) - terms_b[:, keep].mean(axis=0)
            terms_a, terms_b = terms_a[:, keep] + shift_a, terms_b[:, keep] + shift_b
            if common.size:
                common_a, _ = kl_terms(grid_a.take(common), budgets[keep])
                common_b, _ = kl_terms(grid_b.take(common), budgets[keep])
                paired_terms = (common_b + shift_b) - (common_a + shift_a)
            else:
                paired_terms = np.empty((0, int(keep.sum())))
            add("kl", budgets[keep], budgets[keep], np.array([p.beta for p in shown_a]), np.array([p.beta for p in shown_b]),
                np.array([p.gain for p in shown_a]), np.array([p.se for p in shown_a]),
                np.array([p.gain for p in shown_b]), np.array([p.se for p in shown_b]),
                np.array([p.trusted for p in shown_a]), np.array([p.trusted for p in shown_b]),
                terms_a, terms_b, paired_terms)
    shared = np.array([beta for beta in grid_a.betas if np.isclose(grid_b.betas, beta, rtol=1e-9, atol=0).any()])
    if betas and shared.size:
        on_a, on_b = grid_a.at_betas(shared), grid_b.at_betas(shared)
        rows_a, rows_b = _mean_rows(mean_a, align, eval, shared), _mean_rows(mean_b, align, eval, shared)
        kl_a, kl_b = rows_a["kl"].to_numpy(), rows_b["kl"].to_numpy()
        paired_terms = on_b.take(common).gain - on_a.take(common).gain if common.size else np.empty((0, shared.size))
        add("beta", kl_a, kl_b, shared, shared, rows_a["gain"].to_numpy(), rows_a["gain_se"].to_numpy(),
            rows_b["gain"].to_numpy(), rows_b["gain_se"].to_numpy(),
            _trusted_at(trusted_kl_range(mean_a, align, eval), kl_a), _trusted_at(trusted_kl_range(mean_b, align, eval), kl_b),
            on_a.gain, on_b.gain, paired_terms)
    return PairDifference(pa.table(columns, schema=DIFF_SCHEMA), only_a, only_b, int(common.size))


def _mean_rows(frontier_mean: pa.Table, align: str, eval: str, betas: np.ndarray) -> pa.Table:
    """The frontier_mean rows of (align, eval) at ``betas`` (each on its grid), in that order."""
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], eval)))
    rows = rows.sort_by("beta")
    return rows.take(pa.array(_match(rows["beta"].to_numpy(), betas)))
