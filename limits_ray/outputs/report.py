"""``limits-ray report DIR``: the figures and a one-page Markdown summary of a results directory.

Reads ``frontier.parquet``, ``frontier_mean.parquet``, ``bon.parquet`` and ``convergence.parquet``
(each a file or, from ``limits-ray reduce``, a directory of shards)
(a run, a ``reduce --out``, a nightly ``latest`` or a study directory) and writes

- ``frontier.png``: the prompt-averaged frontier with its 95% band, best-of-n points on it and
  each prompt's frontier as a thin line;
- ``convergence.png``: prompt-mean gain and KL against N for a few betas, with 95% bands from the
  spread across prompts (and Monte Carlo bands when a study's ``study_prefixes.parquet`` is there);
- ``frontier_by_n.png``: the frontier estimated from the first N samples, for several N;
- ``ess.png``: the Kish effective sample size against beta, per prompt and its median;
- ``winrate.png``: win rates over pi0 against KL (with win rates: :mod:`limits_ray.outputs.beyond_plots`);
- ``report.md``: a plain-language summary (:func:`summary_lines`: the KL range that can be
  trusted, the gain at a few KL budgets with 95% error bars, best-of-n points, where more samples
  would change the picture most), counts, the figures, the frontier at a few KL budgets, and per
  beta whether the estimates have settled.

Trusted means: every prompt's estimate at that beta, and at every larger beta, is reliable, by the
``reliable`` column of ``frontier.parquet`` when it has one, else by its Kish ESS >= ``ess_floor``
(default :data:`limits_ray.core.reliability.FALLBACK_ESS_FLOOR`; :func:`limits_ray.core.reliability.reliable_rows`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from limits_ray.core.convergence import settle_table, summarize
from limits_ray.core.errors import InputError
from limits_ray.core.frontier import point_at_kl, trusted_kl_range
from limits_ray.core.reliability import (
    FALLBACK_ESS_FLOOR,
    POOLED_RULE,
    RELIABLE_RULE,
    TRUSTED_FRACTION,
    reliable_rows,
    trusted_beta,
)
from limits_ray.core.tables import ReduceResult
from limits_ray.outputs.beyond_report import bracket_lines, winrate_lines
from limits_ray.outputs.figures import FIGURES, write_plots
from limits_ray.outputs.numbers import format_estimate, format_number
from limits_ray.storage.results import load_result

__all__ = ["summary_lines", "write_report"]

BUDGETS = (0.1, 0.5, 1.0, 2.0, 4.0)
BON_SHOWN = (2, 4, 16, 64, 256)  # best-of-n points in the summary, up to n = N/4 (the frontier is biased low beyond)


def _trusted_ranges(result: ReduceResult) -> list[str]:
    """Per (align, eval): the KL range where at least 90% of prompts are reliable (frontier.trusted_kl_range)."""
    mean = result.frontier_mean
    lines = [f"| align | eval | trusted KL range [nats] (>= {TRUSTED_FRACTION:.0%} of prompts reliable) |", "|---|---|---|"]
    for align, evaluation in sorted(set(zip(mean["align"].to_pylist(), mean["eval"].to_pylist()))):
        trusted = trusted_kl_range(mean, align, evaluation)
        shown = "none" if trusted is None else f"{trusted[0]:.4g} to {trusted[1]:.4g}"
        lines.append(f"| {align} | {evaluation} | {shown} |")
    return lines


def _kl_points(result: ReduceResult, budgets: tuple[float, ...]) -> list[str]:
    lines = ["| align | eval | KL budget [nats] | beta | gain [reward units] ± 95% | trusted |", "|---|---|---:|---:|---:|---|"]
    mean = result.frontier_mean
    for align, evaluation in sorted(set(zip(mean["align"].to_pylist(), mean["eval"].to_pylist()))):
        for budget in budgets:
            try:
                point = point_at_kl(mean, budget, align, evaluation)
            except ValueError:
                continue
            trusted = ("yes" if point.trusted else "no") if "reliable" in mean.column_names else "-"
            lines.append(f"| {align} | {evaluation} | {budget:g} | {format_number(point.beta)} "
                         f"| {format_estimate(point.gain, 1.96 * point.gain_se, mark=' (no error bar)')} | {trusted} |")
    return lines


def _at_beta(table: pa.Table, align: str, evaluation: str, beta: float) -> dict:
    rows = table.filter(pc.and_(pc.equal(table["align"], align), pc.equal(table["eval"], evaluation)))
    return rows.filter(pc.equal(rows["beta"], beta)).to_pylist()


def _gains_at_budgets(mean: pa.Table, align: str, evaluation: str, kl_max: float) -> str:
    """The gain at each budget up to ``kl_max`` with its 95% error bar at that fixed KL (:func:`point_at_kl`)."""
    parts = []
    for budget in BUDGETS:
        if budget > kl_max:
            continue
        try:
            point = point_at_kl(mean, budget, align, evaluation)
        except ValueError:
            continue
        parts.append(f"{format_estimate(point.gain, 1.96 * point.gain_se, mark=' (no error bar)')} at KL {budget:g}")
    return "; ".join(parts)


def _bon_points(bon: pa.Table, align: str, evaluation: str, samples: int) -> str:
    if bon.num_rows == 0:
        return ""
    rows = bon.filter(pc.and_(pc.equal(bon["align"], align), pc.equal(bon["eval"], evaluation)))
    grouped = rows.group_by("n", use_threads=False).aggregate([("kl", "mean"), ("gain", "mean")]).sort_by("n")
    return "; ".join(
        f"n = {item['n']}: KL {format_number(item['kl_mean'])}, gain {format_number(item['gain_mean'])}"
        for item in grouped.to_pylist() if item["n"] in BON_SHOWN and item["n"] <= max(samples // 4, 2)
    )


def _where_to_sample(frontier: pa.Table, align: str, evaluation: str, beta: float, reliable: np.ndarray, ess_floor: float) -> str:
    """The first beta below the trusted range: how many prompts fall short there, and the worst few."""
    mask = np.logical_and(np.asarray(frontier["align"].to_pylist()) == align, np.asarray(frontier["eval"].to_pylist()) == evaluation)
    betas = frontier["beta"].to_numpy()
    below = sorted({b for b in betas[mask].tolist() if b < beta}, reverse=True) if beta is not None else sorted(set(betas[mask].tolist()), reverse=True)
    if not below:
        return "every beta of the grid is trusted: more samples would narrow the error bars, not change the picture"
    rows = np.flatnonzero(np.logical_and(mask, betas == below[0]))
    short = [row for row in rows if not reliable[row]]
    ess = frontier["ess"].to_numpy()
    worst = sorted(short, key=lambda row: ess[row])[:3]
    ids = frontier["prompt_id"].to_pylist()
    names = ", ".join(f"{ids[row]} (ESS {ess[row]:.1f})" for row in worst)
    verb = "is" if len(short) == 1 else "are"
    return (f"at β = {below[0]:.3g}, the largest β not trusted, {len(short)} of {len(rows)} prompts {verb} not reliable "
            f"({'flagged' if 'reliable' in frontier.column_names else f'ESS < {ess_floor:g}'}); more samples of {names} "
            "would extend the trusted range most")


def summary_lines(result: ReduceResult, ess_floor: float = FALLBACK_ESS_FLOOR) -> list[str]:
    """The report's opening: per self-evaluated frontier (align = eval), the trusted KL range, the gain
    at the KL budgets inside it (95% error bars), best-of-n points and where more samples help most."""
    frontier, mean = result.frontier, result.frontier_mean
    reliable = reliable_rows(frontier, ess_floor)
    samples = int(np.median(frontier["n"].to_numpy()))
    criterion = ("the `reliable` column of frontier.parquet" if "reliable" in frontier.column_names
                 else f"Kish ESS ≥ {ess_floor:g}")
    lines = ["## Summary", "", f"Trusted: at least {TRUSTED_FRACTION:.0%} of the prompts' estimates reliable ({criterion}) "
             "at that β and all larger β. "
             "KL in nats, gains in reward units, prompt means of the bias-corrected estimates, ± 95% error bars at "
             "the fixed KL (none where unreliable prompts could move the mean by more than its standard error).", ""]
    for align, evaluation in sorted({(a, e) for a, e in zip(mean["align"].to_pylist(), mean["eval"].to_pylist()) if a == e}):
        beta = trusted_beta(frontier, align, evaluation, reliable)
        if beta is None:
            lines.append(f"- **{align}**: no β of the grid is trusted, not even the largest; the estimates are not "
                         "yet usable: sample more, or add larger betas to the grid.")
        else:
            kl_max = float(_at_beta(mean, align, evaluation, beta)[0]["kl"])
            gains = _gains_at_budgets(mean, align, evaluation, kl_max)
            lines.append(f"- **{align}**: trusted up to KL {format_number(kl_max)} (β ≥ {beta:.3g}). "
                         + (f"Gain {gains}." if gains else "No KL budget of 0.1, 0.5, 1, 2 or 4 nats lies in that range."))
        bon = _bon_points(result.bon, align, evaluation, samples)
        if bon:
            lines.append(f"  Best-of-n: {bon}.")
        lines.append(f"  Where more samples matter most: {_where_to_sample(frontier, align, evaluation, beta, reliable, ess_floor)}.")
    return lines + [""]


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, title: str | None = None,
                 tolerance: float = 0.05, atol: float = 1e-3, source: str | None = None) -> list[Path]:
    """Write the figures and ``report.md`` of ``results_dir`` into ``out_dir`` (default: the same); returns paths.

    ``source`` names the results in the text (default: ``results_dir``).
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = load_result(results_dir)
    if result.frontier.num_rows == 0:
        raise InputError(f"{results_dir}/frontier.parquet has no rows: nothing to report")
    if title is None:
        title = results_dir.resolve().name
        report_json = results_dir / "report.json"
        if report_json.is_file():
            title = json.loads(report_json.read_text()).get("name", title)
    prompts = len(set(result.frontier["prompt_id"].to_pylist()))
    n = result.frontier["n"].to_numpy()
    prefixes_path = results_dir / "study_prefixes.parquet"
    convergence = pq.read_table(prefixes_path) if prefixes_path.is_file() else result.convergence
    settle = settle_table(summarize(convergence), tolerance, atol) if convergence.num_rows else None
    figures = [(path.name, FIGURES[path.name])
               for path in write_plots(result, out_dir, title, convergence=convergence, settle=settle)]

    lines = [
        f"# {title}",
        "",
        f"{prompts} prompts, N = {int(np.min(n))}" + (f" to {int(np.max(n))}" if np.max(n) != np.min(n) else "")
        + f" samples per prompt, {len(set(result.frontier['beta'].to_pylist()))} betas "
        f"({min(result.frontier['beta'].to_pylist()):.3g} to {max(result.frontier['beta'].to_pylist()):.3g}). "
        f"Source: `{source or results_dir}`.",
        "",
        *summary_lines(result),
    ]
    for name, caption in figures:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    lines += ["## Gain at given KL budgets (prompt mean)", "", *_kl_points(result, (0.1, 0.5, 1.0, 2.0, 4.0)), ""]
    lines += bracket_lines(result, BUDGETS) + winrate_lines(result, BUDGETS)
    if "reliable" in result.frontier_mean.column_names:
        lines += ["## Where the estimates can be trusted", "",
                  f"Reliable: {RELIABLE_RULE}, and {POOLED_RULE} (limits_ray/core/reliability.py).", "",
                  *_trusted_ranges(result), ""]
    if settle is not None and settle.num_rows:
        unsettled = settle.filter(np.logical_not(settle["settled"].to_numpy(zero_copy_only=False)))
        lines += [
            "## Convergence",
            "",
            f"Settled: the prompt-mean gain and KL stay within {atol:g} + {tolerance:.0%} of their value at the "
            "largest N over at least the last two doublings.",
            "",
        ]
        if unsettled.num_rows:
            lines += ["| align | eval | betas not settled | of | ESS median at the smallest such beta |", "|---|---|---|---:|---:|"]
            for align, evaluation in sorted(set(zip(settle["align"].to_pylist(), settle["eval"].to_pylist()))):
                rows = unsettled.filter(np.logical_and(
                    np.asarray(unsettled["align"].to_pylist()) == align, np.asarray(unsettled["eval"].to_pylist()) == evaluation))
                total = sum(1 for a, e in zip(settle["align"].to_pylist(), settle["eval"].to_pylist()) if (a, e) == (align, evaluation))
                if rows.num_rows:
                    betas = sorted(rows["beta"].to_pylist())
                    frontier = result.frontier
                    mask = np.logical_and(np.asarray(frontier["align"].to_pylist()) == align,
                                          np.isclose(frontier["beta"].to_numpy(), betas[0]))
                    ess = float(np.median(frontier["ess"].to_numpy()[mask])) if mask.any() else float("nan")
                    lines.append(f"| {align} | {evaluation} | {rows.num_rows} (β from {betas[0]:.3g} to {betas[-1]:.3g}) | "
                                 f"{total} | {ess:.1f} |")
        else:
            lines.append("Every (align, eval, beta) has settled.")
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [out_dir / name for name, _ in figures] + [path]
