"""The standard figures of a result, in one style, and the convergence study's.

- ``frontier.png`` (:func:`plot_frontier`): per (align, eval), the prompt-averaged frontier with its 95%
  band, dashed outside the trusted KL range, best-of-n points and each prompt's frontier as a thin line;
  past the trusted range the certified bracket, and the unachievable region above it hatched
  (:func:`limits_ray.outputs.beyond_plots.draw_bracket`);
- ``convergence.png`` (:func:`plot_convergence_bands`): prompt-mean gain and KL against N, with bands;
- ``frontier_by_n.png`` (:func:`plot_frontier_by_n`): the frontier estimated from the first N samples;
- ``ess.png`` (:func:`plot_ess_prompts`): Kish ESS against beta, per prompt and its median;
- ``winrate.png`` (:func:`limits_ray.outputs.beyond_plots.winrate_figure`): win rates over pi0 against KL.

:func:`write_plots` draws them all for a run (:func:`limits_ray.runs.job.run_job`);
:func:`limits_ray.outputs.report.write_report` draws them for any results directory. Every figure is
made and written by :mod:`limits_ray.outputs.style`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.convergence import summarize
from limits_ray.core.frontier import trusted_kl_range
from limits_ray.core.reliability import TRUSTED_FRACTION
from limits_ray.core.tables import ReduceResult
from limits_ray.outputs.beyond_plots import draw_bracket, winrate_figure
from limits_ray.outputs.style import colormap_colors, new_figure, panel_grid, save_figure, suptitle

__all__ = [
    "FIGURES", "ess_source", "plot_convergence_bands", "plot_ess_prompts", "plot_frontier", "plot_frontier_by_n",
    "write_plots",
]


def _pairs(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(set(zip(table["align"].to_pylist(), table["eval"].to_pylist())))


def _select(table: pa.Table, align: str, evaluation: str) -> pa.Table:
    return table.filter(pc.and_(pc.equal(table["align"], align), pc.equal(table["eval"], evaluation)))


def _counts(result: ReduceResult) -> tuple[int, int]:
    """(prompts, median samples per prompt) for titles."""
    frontier = result.frontier
    if frontier.num_rows == 0:
        return 0, 0
    return len(set(frontier["prompt_id"].to_pylist())), int(np.median(frontier["n"].to_numpy()))


def _draw_mean(axis, kl: np.ndarray, gain: np.ndarray, trusted: tuple[float, float] | None) -> None:
    """The prompt-mean frontier: solid inside the trusted KL range, dashed outside it."""
    inside = np.zeros(kl.size, bool) if trusted is None else (kl >= trusted[0]) & (kl <= trusted[1])
    axis.plot(np.where(inside, kl, np.nan), gain, color="C0", lw=2, zorder=3, label="frontier (prompt mean)")
    if not inside.all():
        outside = ~inside
        outside[1:] |= ~inside[:-1]  # join the dashed part to the last trusted point
        outside[:-1] |= ~inside[1:]
        axis.plot(np.where(outside, kl, np.nan), gain, color="C0", lw=1.5, ls="--", alpha=0.7, zorder=3,
                  label=f"not trusted: < {TRUSTED_FRACTION:.0%} of prompts reliable (k-hat, ESS)")


def plot_frontier(result: ReduceResult, path: Path, title: str) -> None:
    """Prompt-averaged gain against KL per (align, eval), 95% band, per-prompt lines, best-of-n points.

    The mean (bias-corrected, :mod:`limits_ray.core.prompt_mean`) is solid over the trusted KL range
    (:func:`limits_ray.core.frontier.trusted_kl_range`) and dashed beyond. The band is the gain's 95% interval
    at each KL (``gain_se_at_kl``: the curve's vertical error, beta free), drawn where the prompt mean
    has an error bar (none where unreliable prompts could move it by more than its SE).
    """
    prompts, samples = _counts(result)
    pairs = _pairs(result.frontier_mean)
    figure, panels = panel_grid(len(pairs), (6.0, 4.6))
    for axis, (align, evaluation) in zip(panels, pairs):
        per_prompt = _select(result.frontier, align, evaluation)
        for prompt_id in sorted(set(per_prompt["prompt_id"].to_pylist()))[:50]:
            rows = per_prompt.filter(pc.equal(per_prompt["prompt_id"], prompt_id))
            axis.plot(rows["kl"].to_numpy(), rows["gain"].to_numpy(), color="0.75", lw=0.5, zorder=1)
        axis.plot([], [], color="0.75", lw=0.5, label="one prompt")
        mean = _select(result.frontier_mean, align, evaluation)
        error = mean["gain_se_at_kl" if "gain_se_at_kl" in mean.column_names else "gain_se"].to_numpy()
        kl, gain, band = mean["kl"].to_numpy(), mean["gain"].to_numpy(), 1.96 * error
        axis.fill_between(kl, gain - band, gain + band, color="C0", alpha=0.3, zorder=2, label="95% band")
        trusted = trusted_kl_range(result.frontier_mean, align, evaluation)
        _draw_mean(axis, kl, gain, trusted)
        bon = _select(result.bon, align, evaluation)
        if bon.num_rows:
            grouped = bon.group_by("n").aggregate([("kl", "mean"), ("gain", "mean")]).sort_by("n")
            axis.plot(grouped["kl_mean"].to_numpy(), grouped["gain_mean"].to_numpy(), "o", color="C3",
                      ms=5, zorder=4, label="best-of-n, n = 1, 2, 4, ...")
        draw_bracket(axis, result.bracket, align, evaluation, np.concatenate([gain, gain + band]))
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_xlabel("KL(π_β ‖ π₀)  [nats]")
        axis.set_ylabel(f"gain in {evaluation}  [reward units]")
        trusted_text = "" if trusted is None else f"; trusted for KL {trusted[0]:.3g} to {trusted[1]:.3g} nats"
        axis.set_title(f"align {align}, eval {evaluation}{trusted_text}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    suptitle(figure, f"{title}: KL-reward frontier ({prompts} prompts, N = {samples} samples per prompt)", fontsize=11)
    save_figure(figure, path)


def _shown_betas(betas: np.ndarray, count: int = 5) -> np.ndarray:
    """Up to ``count`` betas spread evenly (in index) over the grid."""
    betas = np.unique(betas)
    return betas[np.unique(np.linspace(0, betas.size - 1, min(count, betas.size)).round().astype(int))]


def _self_pairs(table: pa.Table, limit: int = 4) -> list[tuple[str, str]]:
    """(align, eval) pairs, those evaluating the alignment reward itself first, at most ``limit``."""
    pairs = _pairs(table)
    return sorted(pairs, key=lambda pair: (pair[0] != pair[1], pair))[:limit]


def _complete(table: pa.Table) -> pa.Table:
    """Rows of a summary that every prompt reached (``prompts`` at its maximum)."""
    prompts = table["prompts"].to_numpy()
    return table.filter(pa.array(prompts == prompts.max())) if table.num_rows else table


def plot_convergence_bands(summary: pa.Table, path: Path, title: str, settle: pa.Table | None = None) -> bool:
    """Prompt-mean gain and KL against N for a few betas of the first (align, eval) pair, with bands.

    ``summary`` is :func:`limits_ray.core.convergence.summarize` output. Dark band: 95% Monte Carlo interval
    of the prompt mean (when the summary has ``*_mc_se``); light band: 95% interval from the spread
    across prompts. A vertical tick marks the N where the series settles (``settle``). Returns
    whether a figure was written. Where the summary has ``reliable`` (fraction of reliable prompts),
    points with fewer than 90% reliable prompts (k-hat, ESS) are drawn hollow.
    """
    if summary.num_rows == 0:
        return False
    summary = _complete(summary)
    align, evaluation = _self_pairs(summary, 1)[0]
    table = _select(summary, align, evaluation)
    if np.unique(table["n_samples"].to_numpy()).size > 2:  # N = 1: gain and KL are 0 by construction
        table = table.filter(pc.greater(table["n_samples"], 1))
    shown = _shown_betas(table["beta"].to_numpy())
    prompts = int(table["prompts"].to_numpy().max())
    n_max = int(table["n_samples"].to_numpy().max())
    figure, axes = new_figure(1, 2, figsize=(14.0, 4.6))
    lowest = np.inf
    for color, beta in enumerate(shown):
        rows = table.filter(pc.equal(table["beta"], beta)).sort_by("n_samples")
        n = rows["n_samples"].to_numpy()
        match = None
        if settle is not None and settle.num_rows:
            match = _select(settle, align, evaluation)
            match = match.filter(pc.equal(match["beta"], beta))
            match = match if match.num_rows else None
        label = f"β = {beta:.3g}" + ("" if match is None or match["settled"][0].as_py() else " (not settled)")
        for axis, name in zip(axes, ("gain", "kl")):
            mean = rows[name].to_numpy()
            lowest = min(lowest, float(np.min(mean)))
            axis.plot(n, mean, "o-", color=f"C{color}", ms=3, lw=1.5, label=label)
            if "reliable" in rows.column_names:
                weak = rows["reliable"].to_numpy() < TRUSTED_FRACTION
                axis.plot(n[weak], mean[weak], "o", ms=7, mfc="white", color=f"C{color}", zorder=4)
            floor = np.abs(mean) / 20  # log axis: clip bands that reach below zero
            spread = 1.96 * np.nan_to_num(rows[f"{name}_spread_se"].to_numpy())
            axis.fill_between(n, np.maximum(mean - spread, floor), mean + spread, color=f"C{color}", alpha=0.12, lw=0)
            if f"{name}_mc_se" in rows.column_names:
                band = 1.96 * np.nan_to_num(rows[f"{name}_mc_se"].to_numpy())
                axis.fill_between(n, np.maximum(mean - band, floor), mean + band, color=f"C{color}", alpha=0.3, lw=0)
            if match is not None and match["settled"][0].as_py():
                at = max(int(match[f"settle_n_{name}"][0].as_py()), int(n[0]))
                axis.plot([at], [mean[np.searchsorted(n, at)]], marker="v", ms=9, color=f"C{color}",
                          markeredgecolor="k", zorder=5)
    labels = (f"gain in {evaluation}  [reward units]", "KL(π_β ‖ π₀)  [nats]")
    for axis, label in zip(axes, labels):
        axis.set_xscale("log", base=2)
        if lowest > 0:
            axis.set_yscale("log")
        else:
            axis.set_yscale("symlog", linthresh=1e-3)
        axis.set_xlabel("samples per prompt N")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    has_mc = "gain_mc_se" in table.column_names
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                   title_fontsize=8, title="prompt mean; 95% bands: "
                   + ("dark Monte Carlo,\nlight spread across prompts" if has_mc else "spread across prompts"))
    note = "\n▼: N from which the mean stays within tolerance of its largest-N value" if settle is not None else ""
    if "reliable" in table.column_names:
        note += f"\n○: fewer than {TRUSTED_FRACTION:.0%} of prompts reliable (Pareto k-hat of the weights, ESS)"
    figure.suptitle(f"{title}: convergence of gain and KL, align {align} ({prompts} prompts, N ≤ {n_max}){note}")
    save_figure(figure, path)
    return True


def plot_frontier_by_n(summary: pa.Table, path: Path, title: str) -> bool:
    """The prompt-averaged frontier estimated from the first N samples, for several N (the paper's Fig. 4)."""
    if summary.num_rows == 0:
        return False
    summary = _complete(summary)
    pairs = _self_pairs(summary)
    prompts = int(summary["prompts"].to_numpy().max())
    all_n = np.unique(summary["n_samples"].to_numpy())
    shown_n = all_n[all_n >= min(4, all_n.max())]
    shown_n = shown_n[np.unique(np.linspace(0, shown_n.size - 1, min(6, shown_n.size)).round().astype(int))]
    colors = colormap_colors("viridis", np.linspace(0.0, 0.9, shown_n.size))
    figure, panels = panel_grid(len(pairs), (6.0, 4.6))
    for axis, (align, evaluation) in zip(panels, pairs):
        table = _select(summary, align, evaluation)
        for color, n in zip(colors, shown_n):
            rows = table.filter(pc.equal(table["n_samples"], int(n))).sort_by("beta")
            axis.plot(rows["kl"].to_numpy(), rows["gain"].to_numpy(), "o-", ms=2.5, lw=1.4, color=color, label=f"N = {n}")
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_xlabel("KL(π_β ‖ π₀)  [nats]")
        axis.set_ylabel(f"gain in {evaluation}  [reward units]")
        axis.set_title(f"align {align}, eval {evaluation}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    suptitle(figure, f"{title}: frontier estimated from N samples per prompt ({prompts} prompts, N ≤ {shown_n.max()})",
             fontsize=11)
    save_figure(figure, path)
    return True


def ess_source(frontier: pa.Table) -> pa.Table:
    """ESS rows (align, prompt_id, beta, n_samples, ess) from a frontier table (one eval per align)."""
    rows = frontier.filter(pc.equal(frontier["align"], frontier["eval"]))
    if rows.num_rows == 0:
        rows = frontier
    table = pa.table({"align": rows["align"], "prompt_id": rows["prompt_id"], "beta": rows["beta"],
                      "n_samples": rows["n"], "ess": rows["ess"]})
    _, keep = np.unique(np.stack([np.asarray(table["align"].to_pylist(), dtype=object).astype(str),
                                  np.asarray(table["prompt_id"].to_pylist(), dtype=object).astype(str),
                                  table["beta"].to_numpy().astype(str)]), axis=1, return_index=True)
    return table.take(pa.array(np.sort(keep)))


def plot_ess_prompts(ess: pa.Table, path: Path, title: str) -> bool:
    """Kish ESS against beta: one thin line per prompt, the median over prompts bold, N dashed; per align."""
    if ess.num_rows == 0:
        return False
    aligns = sorted(set(ess["align"].to_pylist()))[:4]
    figure, panels = panel_grid(len(aligns), (5.8, 4.3))
    prompts = len(set(ess["prompt_id"].to_pylist()))
    n_values = ess["n_samples"].to_numpy()
    for axis, align in zip(panels, aligns):
        table = ess.filter(pc.equal(ess["align"], align))
        for prompt_id in sorted(set(table["prompt_id"].to_pylist()))[:100]:
            rows = table.filter(pc.equal(table["prompt_id"], prompt_id)).sort_by("beta")
            axis.plot(rows["beta"].to_numpy(), rows["ess"].to_numpy(), color="0.6", lw=0.6, zorder=1)
        betas = np.unique(table["beta"].to_numpy())
        all_betas, values = table["beta"].to_numpy(), table["ess"].to_numpy()
        median = [np.median(values[all_betas == beta]) for beta in betas]
        axis.plot(betas, median, "o-", color="C0", ms=3, lw=2, zorder=3, label="median over prompts")
        axis.plot([], [], color="0.6", lw=0.6, label="one prompt")
        n = int(np.median(table["n_samples"].to_numpy()))
        axis.axhline(n, color="C3", ls="--", lw=1, label=f"N = {n} samples")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_ylim(0.8, n * 1.6)
        axis.set_xlabel("β (KL penalty)  [reward units]")
        axis.set_ylabel("effective sample size (Kish)  [samples]")
        axis.set_title(f"align {align}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    suptitle(figure, f"{title}: ESS against β ({prompts} prompts, N = {int(np.median(n_values))} per prompt)", fontsize=11)
    save_figure(figure, path)
    return True


FIGURES = {
    "frontier.png": "Prompt-averaged frontier (95% band), best-of-n points, per-prompt frontiers (grey).",
    "convergence.png": "Prompt-mean gain and KL against the number of samples N, 95% bands.",
    "frontier_by_n.png": "The frontier estimated from the first N samples of each prompt.",
    "ess.png": "Kish effective sample size against beta: per prompt (grey) and the median.",
    "winrate.png": "Win rate over the base model against KL: tilts, win-rate-optimal curve, best-of-n.",
}
"""The standard figures of a result, in the order reports show them, with their captions."""


def write_plots(result: ReduceResult, out_dir: str | Path, title: str, convergence: pa.Table | None = None,
                settle: pa.Table | None = None) -> list[Path]:
    """Draw the standard figures (:data:`FIGURES`) of ``result`` into ``out_dir``; returns the paths drawn.

    ``convergence.png`` and ``frontier_by_n.png`` come from ``convergence`` (default: the result's
    ``convergence`` table; a study passes its prefix table), with the settle marks of ``settle``; they and
    ``ess.png`` are drawn only when there are rows for them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_frontier(result, out_dir / "frontier.png", title)
    drawn = {"frontier.png"}
    convergence = result.convergence if convergence is None else convergence
    if convergence.num_rows:
        summary = summarize(convergence)
        if plot_convergence_bands(summary, out_dir / "convergence.png", title, settle=settle):
            drawn.add("convergence.png")
        if plot_frontier_by_n(summary, out_dir / "frontier_by_n.png", title):
            drawn.add("frontier_by_n.png")
    if result.frontier.num_rows and plot_ess_prompts(ess_source(result.frontier), out_dir / "ess.png", title):
        drawn.add("ess.png")
    winrates = winrate_figure(result.winrate_mean, result.bon, title)
    if winrates is not None:
        save_figure(winrates, out_dir / "winrate.png")
        drawn.add("winrate.png")
    return [out_dir / name for name in FIGURES if name in drawn]
