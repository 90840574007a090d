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
- ``report.md``: counts, the figures, the frontier at a few KL budgets, and per beta whether the
  estimates have settled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from limits_ray.frontier import TRUSTED_FRACTION, point_at_kl, trusted_kl_range
from limits_ray.io import SCHEMAS, InputError
from limits_ray.reduce import ReduceResult

__all__ = ["load_result", "write_report"]


def load_result(results_dir: str | Path) -> ReduceResult:
    """The four result tables of ``results_dir``; missing optional tables (bon, convergence) are empty."""
    results_dir = Path(results_dir)
    tables = {}
    for name, schema in SCHEMAS.items():
        path = results_dir / f"{name}.parquet"
        if path.exists():  # a file, or a directory of shards (limits-ray reduce)
            tables[name] = pq.read_table(path)
        elif name in ("frontier", "frontier_mean"):
            raise InputError(f"{path} does not exist: point report at the output directory of a run or a reduce")
        else:
            tables[name] = schema.empty_table()
    return ReduceResult(**tables)


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
    lines = ["| align | eval | KL budget [nats] | beta | gain [reward units] | trusted |", "|---|---|---:|---:|---:|---|"]
    mean = result.frontier_mean
    for align, evaluation in sorted(set(zip(mean["align"].to_pylist(), mean["eval"].to_pylist()))):
        for budget in budgets:
            try:
                point = point_at_kl(mean, budget, align, evaluation)
            except ValueError:
                continue
            trusted = ("yes" if point.trusted else "no") if "reliable" in mean.column_names else "-"
            lines.append(f"| {align} | {evaluation} | {budget:g} | {point.beta:.4g} | {point.gain:.4g} | {trusted} |")
    return lines


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, title: str | None = None,
                 tolerance: float = 0.05, atol: float = 1e-3, source: str | None = None) -> list[Path]:
    """Write the figures and ``report.md`` of ``results_dir`` into ``out_dir`` (default: the same); returns paths.

    ``source`` names the results in the text (default: ``results_dir``).
    """
    from limits_ray.plots import (
        ess_source, plot_convergence_bands, plot_ess_prompts, plot_frontier, plot_frontier_by_n,
    )
    from limits_ray.study import settle_table, summarize

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
    figures = []
    plot_frontier(result, out_dir / "frontier.png", title)
    figures.append(("frontier.png", "Prompt-averaged frontier (95% band), best-of-n points, per-prompt frontiers (grey)."))
    prefixes_path = results_dir / "study_prefixes.parquet"
    convergence = pq.read_table(prefixes_path) if prefixes_path.is_file() else result.convergence
    settle = None
    if convergence.num_rows:
        summary = summarize(convergence)
        settle = settle_table(summary, tolerance, atol)
        plot_convergence_bands(summary, out_dir / "convergence.png", title, settle=settle)
        figures.append(("convergence.png", "Prompt-mean gain and KL against the number of samples N, 95% bands."))
        plot_frontier_by_n(summary, out_dir / "frontier_by_n.png", title)
        figures.append(("frontier_by_n.png", "The frontier estimated from the first N samples of each prompt."))
    plot_ess_prompts(ess_source(result.frontier), out_dir / "ess.png", title)
    figures.append(("ess.png", "Kish effective sample size against beta: per prompt (grey) and the median."))

    lines = [
        f"# {title}",
        "",
        f"{prompts} prompts, N = {int(np.min(n))}" + (f" to {int(np.max(n))}" if np.max(n) != np.min(n) else "")
        + f" samples per prompt, {len(set(result.frontier['beta'].to_pylist()))} betas "
        f"({min(result.frontier['beta'].to_pylist()):.3g} to {max(result.frontier['beta'].to_pylist()):.3g}). "
        f"Source: `{source or results_dir}`.",
        "",
    ]
    for name, caption in figures:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    lines += ["## Gain at given KL budgets (prompt mean)", "", *_kl_points(result, (0.1, 0.5, 1.0, 2.0, 4.0)), ""]
    if "reliable" in result.frontier_mean.column_names:
        lines += ["## Where the estimates can be trusted", "",
                  "Reliable: Pareto k-hat of the weights exp(r/beta) below min(1 - 1/log10 N, 0.7) and ESS >= 20.", "",
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
