"""The figure and text of ``limits-ray compare-runs``: two frontiers and their paired difference.

- ``frontier_diff.png`` (:func:`plot_diff`): per (align, eval), on top both prompt-mean frontiers with
  their 95% bands (within prompts, as in ``frontier.png``), solid over each run's trusted KL range and
  dashed beyond it; below, on the same KL axis, the paired difference ``B - A`` at fixed KL with its 95%
  interval (dark) and the unpaired one (light), and the KL budgets marked by their verdict.
- ``frontier_diff.md`` (:func:`diff_lines`): what was compared, the prompts of one run only, and per
  (align, eval) the difference at each KL budget and at the betas both grids hold.

The numbers come from :mod:`limits_ray.core.frontier_diff` (formulas there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from limits_ray.core.frontier import trusted_kl_range
from limits_ray.core.frontier_diff import LEVEL
from limits_ray.core.reliability import TRUSTED_FRACTION
from limits_ray.outputs.numbers import format_estimate, format_number
from limits_ray.outputs.style import save_figure

__all__ = ["DiffPair", "VERDICT_STYLE", "diff_lines", "draw_frontier", "plot_diff"]

VERDICT_STYLE = {"higher": ("^", "C2"), "lower": ("v", "C3"), "not distinguishable": ("o", "0.55"), "unknown": ("x", "0.55")}
"""Marker and colour of each verdict in the figures."""

_Z = 1.959963984540054
SHOWN_IDS = 5


@dataclass
class DiffPair:
    """One (align, eval) of a comparison: its rows (budgets and betas), the dense curve (KL rows only, or
    None), both runs' frontier_mean rows (sorted by beta), the prompts of one run only, the common count
    and each run's (smallest, largest) samples per prompt."""

    align: str
    eval: str
    rows: pa.Table
    curve: pa.Table | None
    mean_a: pa.Table
    mean_b: pa.Table
    only_a: list[str]
    only_b: list[str]
    common: int
    samples_a: tuple[int, int]
    samples_b: tuple[int, int]


def draw_frontier(axis, mean: pa.Table, color: str, label: str) -> None:
    """One prompt-mean frontier in ``frontier.png``'s style: the 95% band (1.96 gain_se, where every prompt
    has an interval), the mean solid over the trusted KL range and dashed beyond."""
    rows = mean.sort_by("kl")
    kl, gain, band = rows["kl"].to_numpy(), rows["gain"].to_numpy(), _Z * rows["gain_se"].to_numpy()
    axis.fill_between(kl, gain - band, gain + band, color=color, alpha=0.25, lw=0, zorder=2)
    pairs = set(zip(rows["align"].to_pylist(), rows["eval"].to_pylist()))
    trusted = trusted_kl_range(rows, *pairs.pop()) if len(pairs) == 1 else None
    inside = np.zeros(kl.size, bool) if trusted is None else (kl >= trusted[0]) & (kl <= trusted[1])
    axis.plot(np.where(inside, kl, np.nan), gain, color=color, lw=2, zorder=3, label=label)
    if not inside.all():
        outside = ~inside
        outside[1:] |= ~inside[:-1]
        outside[:-1] |= ~inside[1:]
        axis.plot(np.where(outside, kl, np.nan), gain, color=color, lw=1.5, ls="--", alpha=0.7, zorder=3,
                  label=None if inside.any() else f"{label} (not trusted)")


def _kl_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["at"], "kl")).sort_by("kl_a")


def plot_diff(pairs: list[DiffPair], path: Path, labels: tuple[str, str], limit: int = 4) -> None:
    """Write ``frontier_diff.png`` (module doc) for at most ``limit`` pairs (those evaluating their own
    alignment reward first), two per row of panels."""
    pairs = sorted(pairs, key=lambda pair: (pair.align != pair.eval, pair.align, pair.eval))[:limit]
    columns = min(2, len(pairs))
    blocks = -(-len(pairs) // columns)
    figure = Figure(figsize=(max(6.0 * columns, 8.5), 6.4 * blocks))
    grid = figure.add_gridspec(2 * blocks, columns, height_ratios=[2.2, 1.2] * blocks)
    for index, pair in enumerate(pairs):
        block, column = divmod(index, columns)
        top = figure.add_subplot(grid[2 * block, column])
        bottom = figure.add_subplot(grid[2 * block + 1, column], sharex=top)
        draw_frontier(top, pair.mean_a, "C0", f"A: {labels[0]}")
        draw_frontier(top, pair.mean_b, "C1", f"B: {labels[1]}")
        top.plot([], [], color="0.4", lw=1.5, ls="--", label=f"not trusted: < {TRUSTED_FRACTION:.0%} of prompts reliable")
        top.set_xscale("symlog", linthresh=0.01)
        top.set_ylabel(f"gain in {pair.eval}  [reward units]")
        top.set_title(f"align {pair.align}, eval {pair.eval} ({pair.common} prompts in both; "
                      f"{LEVEL:.0%} bands within prompts)", fontsize=10)
        top.grid(alpha=0.3)
        top.legend(fontsize=8, loc="upper left")
        top.tick_params(labelbottom=False)
        if pair.curve is not None and pair.curve.num_rows:
            curve = pair.curve.sort_by("kl_a")
            kl, paired = curve["kl_a"].to_numpy(), curve["diff_paired"].to_numpy()
            unpaired = _Z * curve["diff_se_unpaired"].to_numpy()
            bottom.fill_between(kl, curve["diff"].to_numpy() - unpaired, curve["diff"].to_numpy() + unpaired, color="0.6",
                                alpha=0.2, lw=0, label="unpaired 95% interval")
            if np.isfinite(paired).any():
                bottom.fill_between(kl, curve["ci_low"].to_numpy(), curve["ci_high"].to_numpy(), color="C4", alpha=0.35,
                                    lw=0, label="paired 95% interval")
                bottom.plot(kl, paired, color="C4", lw=2, label="B − A, paired by prompt")
            else:
                bottom.plot(kl, curve["diff"].to_numpy(), color="C4", lw=2, label="B − A (no common prompts)")
        bottom.axhline(0, color="k", lw=0.8)
        ends = [trusted_kl_range(mean, pair.align, pair.eval) for mean in (pair.mean_a, pair.mean_b)]
        if all(end is not None for end in ends):
            bottom.axvline(min(end[1] for end in ends), color="0.3", ls=":", lw=1.2, label="end of the trusted range of A or B")
        for verdict, (marker, color) in VERDICT_STYLE.items():
            rows = _kl_rows(pair.rows)
            rows = rows.filter(pc.equal(rows["verdict"], verdict))
            if rows.num_rows:
                centre = np.where(np.isfinite(rows["diff_paired"].to_numpy()), rows["diff_paired"].to_numpy(),
                                  rows["diff"].to_numpy())
                bottom.plot(rows["kl_a"].to_numpy(), centre, marker, color=color, ms=7, mec="k", zorder=4,
                            label=f"KL budget: {verdict}")
        bottom.set_xlabel("KL(π_β ‖ π₀)  [nats]")
        bottom.set_ylabel("B − A  [reward units]")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=7, loc="upper left", ncol=2)
    figure.suptitle(f"B = {labels[1]} against A = {labels[0]}: KL-reward frontiers and their difference", fontsize=11)
    save_figure(figure, path)


def _ids(ids: list[str]) -> str:
    shown = ", ".join(f"`{value}`" for value in ids[:SHOWN_IDS])
    return shown + (", ..." if len(ids) > SHOWN_IDS else "")


def _samples(samples: tuple[int, int]) -> str:
    return f"N = {samples[0]}" if samples[0] == samples[1] else f"N = {samples[0]} to {samples[1]}"


def _signed(value: float) -> str:
    text = format_number(value)
    return text if text.startswith("-") or text in ("0", "—") else f"+{text}"


def _trust_mark(row: dict) -> str:
    return "" if row["trusted_a"] and row["trusted_b"] else " †"


def diff_lines(pairs: list[DiffPair], labels: tuple[str, str], sources: tuple[str, str],
               pairs_only_a: list[tuple[str, str]] = (), pairs_only_b: list[tuple[str, str]] = ()) -> list[str]:
    """``frontier_diff.md`` (module doc) as lines."""
    lines = [f"# {labels[1]} against {labels[0]}: difference of the KL-reward frontiers", "",
             f"A = `{sources[0]}`, B = `{sources[1]}`. B − A of the prompt-mean gain, at fixed KL budgets and at the "
             "betas both grids hold. *Paired*: per-prompt differences over the prompts both runs have "
             f"(SE = sd/√C, {LEVEL:.0%} interval with Student's t on C − 1 degrees of freedom); *unpaired*: each run's "
             "prompts taken as an independent sample (what comparing the two published means with their error bars "
             "amounts to). The verdict says whether B is higher, lower or not distinguishable from A at "
             f"{LEVEL:.0%}, from the paired interval (the unpaired one when fewer than two prompts are shared). "
             "KL in nats, gains in reward units; gains ± 95% within prompts.", ""]
    if pairs_only_a or pairs_only_b:
        lines += [f"(align, eval) of one run only, not compared: A {pairs_only_a or 'none'}, B {pairs_only_b or 'none'}.", ""]
    untrusted = False
    for pair in pairs:
        lines += [f"## align {pair.align}, eval {pair.eval}", "",
                  f"A: {int(pair.mean_a['prompts'].to_numpy().max())} prompts, {_samples(pair.samples_a)}; "
                  f"B: {int(pair.mean_b['prompts'].to_numpy().max())} prompts, {_samples(pair.samples_b)} samples per prompt. "
                  f"{pair.common} prompts in both"
                  + (f"; only in A: {len(pair.only_a)} ({_ids(pair.only_a)})" if pair.only_a else "")
                  + (f"; only in B: {len(pair.only_b)} ({_ids(pair.only_b)})" if pair.only_b else "")
                  + (": left out of the paired difference." if pair.only_a or pair.only_b else "."), ""]
        kl_rows = _kl_rows(pair.rows).to_pylist()
        if kl_rows:
            lines += ["| KL budget | gain A | gain B | B − A (means) | B − A (paired) | paired SE | unpaired SE | 95% interval | verdict |",
                      "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
            for row in kl_rows:
                untrusted |= not (row["trusted_a"] and row["trusted_b"])
                lines.append(
                    f"| {row['kl_a']:g}{_trust_mark(row)} | {format_estimate(row['gain_a'], _Z * row['gain_a_se'])} "
                    f"| {format_estimate(row['gain_b'], _Z * row['gain_b_se'])} | {_signed(row['diff'])} "
                    f"| {_signed(row['diff_paired'])} | {format_number(row['diff_se_paired'], 2)} "
                    f"| {format_number(row['diff_se_unpaired'], 2)} "
                    f"| [{format_number(row['ci_low'])}, {format_number(row['ci_high'])}] ({row['basis']}) "
                    f"| **{row['verdict']}** |")
            lines.append("")
        else:
            lines += ["No KL budget lies in both grids' KL ranges.", ""]
        beta_rows = pair.rows.filter(pc.equal(pair.rows["at"], "beta")).sort_by("beta_a").to_pylist()
        if beta_rows:
            lines += ["| beta | KL A | KL B | gain A | gain B | B − A paired | paired SE | unpaired SE | verdict |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for row in beta_rows:
                untrusted |= not (row["trusted_a"] and row["trusted_b"])
                lines.append(
                    f"| {format_number(row['beta_a'])}{_trust_mark(row)} | {format_number(row['kl_a'])} | {format_number(row['kl_b'])} "
                    f"| {format_number(row['gain_a'])} | {format_number(row['gain_b'])} | {_signed(row['diff_paired'])} "
                    f"| {format_number(row['diff_se_paired'], 2)} | {format_number(row['diff_se_unpaired'], 2)} | {row['verdict']} |")
            lines.append("")
        else:
            lines += ["The two beta grids share no beta.", ""]
    if untrusted:
        lines += [f"† outside the trusted KL range of A or B (fewer than {TRUSTED_FRACTION:.0%} of prompts reliable at "
                  "that beta or a larger one): the plug-in estimates there are biased low, by more at fewer samples per "
                  "prompt, so a difference there may be one of samples, not of the frontier.", ""]
    return lines
