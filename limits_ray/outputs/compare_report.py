"""Figures and the Markdown report of ``limits-ray compare`` (:mod:`limits_ray.runs.compare`).

* ``policies.png``: per evaluation reward, its own frontier (align = eval) with a 95% band, the
  best-of-n points and each checkpoint with 95% error bars in KL and gain;
* ``proxy_gold.png``: gold gain against KL for every alignment reward evaluated by the gold (Prop. 3),
  and the gold reward lost against the gold-aligned policy at the same beta;
* ``ensembles.png``: gold gain at a fixed beta against the ensemble size M, and |gap| with the
  ``c / sqrt(M)`` reference of Theorem 3;
* ``proposals.png``: the frontier from the base samples and from every proposal's samples
  (:func:`limits_ray.outputs.beyond_plots.proposals_figure`); ``policies.png`` also shades the certified
  bracket past the trusted range (:func:`limits_ray.outputs.beyond_plots.draw_bracket`);
* ``compare.md``: the tables in short and the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.frontier import trusted_kl_range
from limits_ray.outputs.beyond_plots import draw_bracket, proposals_figure
from limits_ray.outputs.numbers import MISSING, format_estimate, format_number
from limits_ray.outputs.style import new_figure, panel_grid, save_figure

__all__ = [
    "BON_FOOTNOTE", "compare_lines", "markdown_table", "plot_ensembles", "plot_policies", "plot_proxy_gold", "proposal_lines",
    "write_compare_report",
]

BON_FOOTNOTE = (
    "best-of-n: no standard error; its KL is a function of n and the ties among the rewards "
    "(log n - (n-1)/n without ties), its gain the unbiased best-of-n estimate from the base samples"
)


def _select(table: pa.Table, **equal: str) -> pa.Table:
    for column, value in equal.items():
        table = table.filter(pc.equal(table[column], value))
    return table


def plot_policies(frontier_mean: pa.Table, policies: pa.Table, path: Path, title: str, bracket: pa.Table | None = None) -> None:
    """One panel per eval reward with a self-aligned frontier: frontier, best-of-n and checkpoints (and the
    certified bracket past the trusted range, when given)."""
    evals = sorted({e for a, e in zip(frontier_mean["align"].to_pylist(), frontier_mean["eval"].to_pylist()) if a == e})
    figure, panels = panel_grid(len(evals), (6.0, 4.6), min_width=0.0)
    for axis, evaluation in zip(panels, evals):
        mean = _select(frontier_mean, align=evaluation, eval=evaluation).sort_by("kl")
        kl, gain, band = mean["kl"].to_numpy(), mean["gain"].to_numpy(), 1.96 * mean["gain_se"].to_numpy()
        axis.fill_between(kl, gain - band, gain + band, color="C0", alpha=0.25, label="95% band")
        axis.plot(np.r_[0.0, kl], np.r_[0.0, gain], color="C0", lw=2, label=f"frontier (align {evaluation})")
        here = _select(policies, align=evaluation, eval=evaluation)
        bon = _select(here, kind="best_of_n").sort_by("bon_n")
        if bon.num_rows:
            n, per_prompt = bon["bon_n"].to_numpy(), bon["samples"].to_numpy() / np.maximum(bon["prompts"].to_numpy(), 1)
            near = n > per_prompt / 4  # the frontier estimate is biased low as its KL nears log N
            axis.plot(bon["kl"].to_numpy()[~near], bon["gain"].to_numpy()[~near], "o", color="C3", ms=5,
                      label="best-of-n, n = 1, 2, 4, ... ≤ N/4")
            if near.any():
                axis.plot(bon["kl"].to_numpy()[near], bon["gain"].to_numpy()[near], "o", mfc="none", color="C3", ms=5,
                          label="best-of-n, n > N/4 (frontier biased low there)")
        for color, row in enumerate(_select(here, kind="checkpoint").to_pylist(), start=1):
            axis.errorbar(row["kl"], row["gain"], xerr=1.96 * row["kl_se"], yerr=1.96 * row["gain_se"], fmt="s",
                          color=f"C{color + 3}", ms=6, capsize=3,
                          label=f"{row['policy']}: gap {'≥ ' if row['beyond_grid'] else ''}{row['gap']:.3g} ± {1.96 * row['gap_se']:.2g}")
        if bracket is not None:
            shown = [row["gain"] + 1.96 * np.nan_to_num(row["gain_se"]) for row in _select(here, kind="checkpoint").to_pylist()]
            draw_bracket(axis, bracket, evaluation, evaluation, np.r_[gain + np.nan_to_num(band), shown])
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_xlabel("KL(π ‖ π₀)  [nats]")
        axis.set_ylabel(f"gain in {evaluation}  [reward units]")
        axis.set_title(f"eval {evaluation}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left")
    figure.suptitle(f"{title}: policies against the KL-reward frontier")
    save_figure(figure, path)


def plot_proxy_gold(proxy_gold: pa.Table, path: Path, title: str, gold: str, proxy: str) -> None:
    """Gold gain against KL per alignment reward, and Prop. 3's loss against beta."""
    figure, (left, right) = new_figure(1, 2, figsize=(11.0, 4.4))
    aligns = sorted(set(proxy_gold["align"].to_pylist()), key=lambda name: (name != gold, name != proxy, name))
    for color, align in enumerate(aligns):
        rows = _select(proxy_gold, align=align).sort_by("beta")
        label = f"align {align}" + (" (gold)" if align == gold else " (proxy)" if align == proxy else "")
        kl, gain, band = rows["kl"].to_numpy(), rows["gold_gain"].to_numpy(), 1.96 * rows["gold_gain_se"].to_numpy()
        left.plot(kl, gain, "o-", ms=3, color=f"C{color}", label=label)
        left.fill_between(kl, gain - band, gain + band, color=f"C{color}", alpha=0.15)
        if align != gold:
            beta, loss = rows["beta"].to_numpy(), rows["loss"].to_numpy()
            right.plot(beta, loss, "o-", ms=3, color=f"C{color}", label=label)
            right.fill_between(beta, loss - 1.96 * rows["loss_se"].to_numpy(), loss + 1.96 * rows["loss_se"].to_numpy(),
                               color=f"C{color}", alpha=0.15)
    left.set_xscale("symlog", linthresh=0.01)
    left.set_xlabel("KL(π_β ‖ π₀)  [nats]")
    left.set_ylabel(f"gold gain ({gold})")
    left.set_title("gold gain against KL (Prop. 3)", fontsize=10)
    right.axhline(0.0, color="0.5", lw=1)
    right.set_xscale("log")
    right.set_xlabel("β")
    right.set_ylabel(f"gain_{gold}({gold}, β) − gain_{gold}(align, β)")
    right.set_title("gold reward lost to the proxy at the same β", fontsize=10)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{title}: proxy vs gold")
    save_figure(figure, path)


def plot_ensembles(ensembles: pa.Table, path: Path, title: str) -> None:
    """Gold gain at a fixed beta against M, and |gap| against M with the c/sqrt(M) reference."""
    members = ensembles["members"].to_numpy()
    gain, se = ensembles["gold_gain"].to_numpy(), ensembles["gold_gain_se"].to_numpy()
    target = float(ensembles["gold_aligned_gain"][0].as_py())
    beta, gold, noise = float(ensembles["beta"][0].as_py()), ensembles["gold"][0].as_py(), float(ensembles["noise"][0].as_py())
    reference = ensembles["reference"].to_numpy()
    figure, (left, right) = new_figure(1, 2, figsize=(11.0, 4.2))
    left.errorbar(members, gain, yerr=1.96 * se, fmt="o-", ms=4, capsize=3, label="align mean of M proxies")
    left.axhline(target, color="C2", ls="--", label=f"align {gold} (M → ∞)")
    left.plot(members, target - reference, ":", color="0.4", label="gold-aligned ± c/√M")
    left.plot(members, target + reference, ":", color="0.4")
    left.set_xlabel("ensemble size M")
    left.set_ylabel(f"gold gain ({gold}) at β = {beta:.3g}")
    right.loglog(members, np.maximum(np.abs(ensembles["gap"].to_numpy()), 1e-12), "o-", ms=4, label="|gap|")
    right.loglog(members, reference, ":", color="0.4", label="c/√M (fitted at M = 1)")
    right.set_xticks(members, [str(m) for m in members])
    right.minorticks_off()
    right.set_xlabel("ensemble size M")
    right.set_ylabel("|gold-aligned gain − ensemble gain|")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{title}: reward ensembles (Theorem 3), proxies = {gold} + N(0, {noise:.3g}²) per sample")
    save_figure(figure, path)


def compare_lines(policies: pa.Table) -> list[str]:
    """The console table of ``limits-ray compare``: one line per policy row with align = eval, then footnotes.

    Estimates print as ``value ± se`` (3 and 2 significant digits); best-of-n rows, which have no
    standard error, print the value with a footnote mark; a gap beyond the frontier's grid is ``≥``.
    """
    shown = policies.filter(pc.equal(policies["align"], policies["eval"]))
    header = (f"{'policy':<16} {'eval':<12} {'KL [nats]':>18} {'gain [reward]':>18} {'frontier gain [reward]':>24} "
              f"{'gap [reward]':>20}")
    lines, marks = [header], set()
    for row in shown.to_pylist():
        mark = "¹" if row["kind"] == "best_of_n" else ""
        marks.add(mark)
        if row["beyond_grid"]:
            marks.add("²")
        gap = ("≥ " if row["beyond_grid"] else "") + format_estimate(row["gap"], row["gap_se"], mark=mark)
        lines.append(
            f"{row['policy']:<16} {row['eval']:<12} {format_estimate(row['kl'], row['kl_se'], mark=mark):>18} "
            f"{format_estimate(row['gain'], row['gain_se'], mark=mark):>18} "
            f"{format_estimate(row['frontier_gain'], row['frontier_gain_se']):>24} {gap:>20}"
        )
    if "¹" in marks:
        lines.append(f"¹ {BON_FOOTNOTE}")
    if "²" in marks:
        lines.append("² the policy's KL lies beyond the frontier's largest KL (about log N): the gap is a lower bound")
    return lines


HEADERS = {
    "kl": "KL [nats]", "kl_se": "KL SE [nats]", "gain": "gain [reward]", "gain_se": "gain SE [reward]",
    "frontier_gain": "frontier gain [reward]", "gap": "gap [reward]", "gap_se": "gap SE [reward]",
    "gold_gain": "gold gain [reward]", "gold_gain_se": "gold gain SE [reward]", "gold_aligned_gain": "gold-aligned gain [reward]",
    "reference": "c/√M [reward]",
}


def markdown_table(table: pa.Table, columns: list[str]) -> list[str]:
    """Floats to 3 significant digits (0 for float-rounding zeros), a missing value as —; units in the headers."""
    lines = ["| " + " | ".join(HEADERS.get(column, column) for column in columns) + " |", "|" + "---|" * len(columns)]
    for row in table.select(columns).to_pylist():
        cells = [format_number(value) if isinstance(value, float) or value is None else str(value) for value in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_compare_report(
    out_dir: Path, *, title: str, result: Any, policies: pa.Table, proxy_gold: pa.Table | None,
    ensembles: pa.Table | None, gold: str, proxy: str, seconds: float, proposals: pa.Table | None = None,
    bracket: pa.Table | None = None,
) -> list[Path]:
    """Write the PNGs and ``compare.md`` into ``out_dir``; returns the paths written (``proposals``: the prompt
    means of the frontier from every proposal; ``bracket``: the certified bracket with the checkpoints)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "policies.png"]
    plot_policies(result.frontier_mean, policies, paths[0], title, bracket)
    lines = [
        f"# {title}: policies against the frontier", "",
        "KL(π‖π₀) = E_π[log π − log π₀] on each policy's own samples (raw model log-probabilities: the sampling",
        "distribution's KL at temperature 1, top_p 1); gain = E_π[e] − E_π₀[e]; frontier_gain is the prompt-mean",
        "frontier (align = the row's align) at the policy's KL, anchored at (0, 0); gap = frontier_gain − gain.",
        "Standard errors treat prompts as fixed (sqrt(Σ se²)/P). Best-of-n points come from the stored base",
        "samples (no new generation); the frontier estimated from N samples per prompt is biased low as its KL",
        "nears log N (it cannot exceed the sample maximum), so best-of-n with n > N/4 (hollow) may sit above it.",
        "A policy whose KL exceeds the frontier's largest KL (beyond_grid) is compared with the frontier's end:",
        "its gap is a lower bound.", "", "![policies](policies.png)", "",
    ]
    shown = policies.filter(pc.equal(policies["align"], policies["eval"]))
    lines += markdown_table(shown, ["policy", "eval", "kl", "kl_se", "gain", "gain_se", "frontier_gain", "beyond_grid", "gap", "gap_se"])
    if shown.num_rows and "best_of_n" in shown["kind"].to_pylist():
        lines += ["", f"KL in nats, gains in reward units; {MISSING}: {BON_FOOTNOTE}."]
    if proxy_gold is not None:
        paths.append(out_dir / "proxy_gold.png")
        plot_proxy_gold(proxy_gold, paths[-1], title, gold, proxy)
        lines += ["", f"## Proxy vs gold (Prop. 3): gold = {gold}, proxy = {proxy}", "",
                  "Gold gain against KL for each alignment reward; right: gold lost against the gold-aligned policy",
                  "at the same β.", "", "![proxy vs gold](proxy_gold.png)"]
    if ensembles is not None:
        paths.append(out_dir / "ensembles.png")
        plot_ensembles(ensembles, paths[-1], title)
        lines += ["", "## Reward ensembles (Theorem 3)", "",
                  f"M synthetic proxies {gold} + σ z_k (z_k a deterministic N(0, 1) per sample and k, σ = "
                  f"{float(ensembles['noise'][0].as_py()):.3g}), averaged and aligned to at β = "
                  f"{float(ensembles['beta'][0].as_py()):.3g}; the reference is c/√M fitted at M = 1.", "",
                  "![ensembles](ensembles.png)", ""]
        lines += markdown_table(ensembles, ["members", "kl", "gold_gain", "gold_gain_se", "gold_aligned_gain", "gap", "reference"])
    if proposals is not None and proposals.num_rows:
        figure = proposals_figure(result.frontier_mean, proposals, policies, title)
        if figure is not None:
            paths.append(out_dir / "proposals.png")
            save_figure(figure, paths[-1])
        lines += ["", "## The policies' samples as proposals", "",
                  "The frontier from the base samples and every policy's samples together: each sample weighed by",
                  "π₀(y) exp(r/β) / Σ_k (N_k/N) q_k(y) (balance heuristic), self-normalised; trusted where at least 90% of",
                  "prompts pass the k-hat and ESS test of these weights.", "", "![proposals](proposals.png)", "",
                  "| align = eval | trusted KL range, base samples | trusted KL range, with the policies' samples |",
                  "|---|---|---|"]
        for evaluation in sorted({a for a, e in zip(proposals["align"].to_pylist(), proposals["eval"].to_pylist()) if a == e}):
            ranges = [trusted_kl_range(table, evaluation, evaluation) for table in (result.frontier_mean, proposals)]
            lines.append(f"| {evaluation} | " + " | ".join(
                "none" if found is None else f"{format_number(found[0])} to {format_number(found[1])}" for found in ranges) + " |")
    lines += ["", "Tables: policies.parquet, proxy_gold.parquet, ensembles.parquet, bracket.parquet"
              + (", proposals.parquet, proposals_mean.parquet" if proposals is not None else "") + f"; {seconds:.0f} s.", ""]
    paths.append(out_dir / "compare.md")
    paths[-1].write_text("\n".join(lines))
    return paths


def proposal_lines(proposals_mean: pa.Table, frontier_mean: pa.Table) -> list[str]:
    """Console lines: per self-evaluated frontier, the trusted KL range from the base samples and with the policies'."""
    lines = []
    for evaluation in sorted({a for a, e in zip(proposals_mean["align"].to_pylist(), proposals_mean["eval"].to_pylist()) if a == e}):
        ranges = [trusted_kl_range(table, evaluation, evaluation) for table in (frontier_mean, proposals_mean)]
        shown = ["none" if found is None else f"{format_number(found[0])} to {format_number(found[1])} nats" for found in ranges]
        lines.append(f"frontier of {evaluation}: trusted KL range {shown[0]} from the base samples, {shown[1]} with the "
                     "policies' samples as proposals (proposals_mean.parquet)")
    return lines

