"""The history page of a nightly root: ``index.html`` and its figures, static (no server, no script).

Drawn from :class:`Night` records that :mod:`limits_ray.runs.history` gathers from the ledger and the
dated results. The page (:func:`write_page`) has

(a) the latest complete night's ``frontier.png`` (its 95% band, dashed beyond the trusted KL range) and
    its trusted KL ranges;
(b) ``history/gain.png`` (:func:`plot_gain_history`): per (align, eval), the gain at a few KL budgets night
    by night with 95% intervals (within prompts: the prompts are the series' own), a new series marked by a
    vertical line and what changed, and each budget at which the night differs from the night before at 95%
    (paired by prompt, both nights trusted there) circled;
(c) ``history/health.png`` (:func:`plot_health`): samples per prompt, the trusted KL range, the prompts
    reliable at each budget and the quarantined rounds, night by night;
(d) a table of the nights (date, series, status, those numbers, the change against the night before) with
    links to each night's ``report.md``, ``frontier.png`` and its comparison with the night before.

Every link and image is a relative path, so the page works from a ``file://`` URL and from a bucket the
root is copied to. Incomplete nights (the ledger's ``completed`` false: a failed or running night) are
rows without numbers and grey bands in the figures.
"""

from __future__ import annotations

import datetime as dt
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from limits_ray.core.frontier_diff import GainAtKL
from limits_ray.core.reliability import TRUSTED_FRACTION
from limits_ray.outputs.diff_report import VERDICT_STYLE
from limits_ray.outputs.numbers import format_estimate, format_number
from limits_ray.outputs.style import colormap_colors, new_figure, panel_grid, save_figure

__all__ = ["FIGURE_NIGHTS", "Night", "Shift", "plot_gain_history", "plot_health", "write_page"]

_Z = 1.959963984540054
FIGURE_NIGHTS = 60
"""The figures show the last this many nights of the ledger; the table lists every night."""


@dataclass
class Shift:
    """A significant change of a night against the night before at one (align, eval) and KL budget."""

    align: str
    eval: str
    kl: float
    verdict: str
    diff: float
    low: float
    high: float


@dataclass
class Night:
    """One night of the ledger, as the page shows it.

    ``status``: ``complete``, ``incomplete`` (the ledger's ``completed`` is false: failed, or still
    running) or ``missing`` (complete in the ledger, but its folder is gone). ``series_change``: None when
    the night continues the series of the night before, else what changed (:func:`limits_ray.runs.identity.
    identity_changes`; ``["first night"]``, or ``["not recorded"]`` without identities). ``gains`` and
    ``reliable``: per (align, eval), one entry per KL budget (None or NaN outside the grid);
    ``change``: the rows of the comparison with ``previous`` at the KL budgets
    (:data:`limits_ray.core.frontier_diff.DIFF_SCHEMA`), ``shifts`` its significant trusted ones;
    ``links``: name -> path relative to the root.
    """

    date: str
    series: str
    status: str
    series_change: list[str] | None = None
    samples_per_prompt: float = float("nan")
    prompts: int = 0
    quarantined_rounds: int | None = None
    gains: dict[tuple[str, str], list[GainAtKL | None]] = field(default_factory=dict)
    trusted: dict[tuple[str, str], tuple[float, float] | None] = field(default_factory=dict)
    reliable: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    previous: str | None = None
    change: pa.Table | None = None
    shifts: list[Shift] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    note: str = ""


def _positions(nights: list[Night]) -> tuple[np.ndarray, list[str]]:
    return np.arange(len(nights)), [night.date for night in nights]


def _series_runs(nights: list[Night]) -> list[np.ndarray]:
    """Positions of the nights, cut where a new series starts."""
    starts = [index for index, night in enumerate(nights) if night.series_change is not None or index == 0]
    return [np.arange(start, end) for start, end in zip(starts, [*starts[1:], len(nights)])]


def _night_axis(axis, nights: list[Night]) -> None:
    """Dates on the x axis, incomplete nights shaded, a new series marked by a dashed line."""
    positions, dates = _positions(nights)
    step = max(1, len(nights) // 16)
    axis.set_xticks(positions[::step], dates[::step], rotation=35, ha="right", fontsize=8)
    axis.set_xlim(-0.6, len(nights) - 0.4)
    for position, night in zip(positions, nights):
        if night.status != "complete":
            axis.axvspan(position - 0.4, position + 0.4, color="0.85", zorder=0)
        if night.series_change is not None and position > 0:
            axis.axvline(position - 0.5, color="C3", ls="--", lw=1.2, zorder=1)
    axis.grid(alpha=0.3)


def _series_labels(axis, nights: list[Night]) -> None:
    """Short notes of what changed, at each new series (at the top of the axis)."""
    for position, night in enumerate(nights):
        if night.series_change is not None and position > 0:
            text = "new series: " + "; ".join(night.series_change)
            axis.annotate(text[:70] + ("…" if len(text) > 70 else ""), xy=(position - 0.45, 1.0),
                          xycoords=("data", "axes fraction"), xytext=(2, -4), textcoords="offset points",
                          fontsize=7, color="C3", va="top", rotation=90)


def plot_gain_history(nights: list[Night], pairs: list[tuple[str, str]], budgets: list[float], path: Path,
                      title: str) -> None:
    """``history/gain.png`` (module doc, (b))."""
    figure, panels = panel_grid(len(pairs), (6.0, 4.8), extra_width=0.12 * max(0, len(nights) - 20))
    colors = colormap_colors("viridis", np.linspace(0.0, 0.85, len(budgets)))
    positions, _ = _positions(nights)
    for axis, pair in zip(panels, pairs):
        _night_axis(axis, nights)
        for index, (budget, color) in enumerate(zip(budgets, colors)):
            gain, half, trusted = (np.full(len(nights), np.nan) for _ in range(3))
            for position, night in enumerate(nights):
                point = (night.gains.get(pair) or [None] * len(budgets))[index]
                if point is not None:
                    gain[position], half[position], trusted[position] = point.gain, _Z * point.se, point.trusted
            offset = (index - (len(budgets) - 1) / 2) * 0.06
            shown = np.isfinite(gain)
            if not shown.any():
                continue
            label = f"KL {budget:g}"
            for segment in _series_runs(nights):  # a line joins the nights of one series only
                kept = segment[shown[segment]]
                if kept.size:
                    axis.errorbar(positions[kept] + offset, gain[kept], yerr=np.nan_to_num(half[kept]), fmt="-",
                                  color=color, lw=1.3, elinewidth=1.0, capsize=2, label=label)
                    label = None
            solid = shown & (trusted == 1)
            axis.plot(positions[solid] + offset, gain[solid], "o", color=color, ms=4, zorder=3)
            hollow = shown & (trusted != 1)
            axis.plot(positions[hollow] + offset, gain[hollow], "o", mfc="white", color=color, ms=4, zorder=3)
            for position, night in enumerate(nights):
                for shift in night.shifts:
                    if (shift.align, shift.eval) == pair and np.isclose(shift.kl, budget):
                        marker, edge = VERDICT_STYLE[shift.verdict]
                        axis.plot(position + offset, gain[position], "o", ms=11, mfc="none", mec="C3", mew=1.8, zorder=4)
                        axis.plot(position + offset, gain[position], marker, ms=5, color=edge, zorder=5)
        axis.plot([], [], "o", ms=11, mfc="none", mec="C3", mew=1.8, label="differs from the night before (95%, paired)")
        axis.plot([], [], "o", mfc="white", color="0.3", ms=4, label="outside the trusted KL range")
        axis.plot([], [], color="C3", ls="--", lw=1.2, label="new series")
        axis.set_ylabel(f"gain in {pair[1]}  [reward units]")
        axis.set_title(f"align {pair[0]}, eval {pair[1]}: gain at fixed KL, 95% intervals", fontsize=10)
        axis.legend(fontsize=7, loc="upper left", ncol=2)
        _series_labels(axis, nights)
    figure.suptitle(f"{title}: the frontier's gain at fixed KL budgets [nats], night by night", fontsize=11)
    save_figure(figure, path)


def plot_health(nights: list[Night], pair: tuple[str, str], budgets: list[float], path: Path, title: str) -> None:
    """``history/health.png`` (module doc, (c)): four panels, night by night."""
    width = 12.0 + 0.12 * max(0, len(nights) - 20)
    figure, axes = new_figure(2, 2, figsize=(width, 7.6), squeeze=False)
    positions, _ = _positions(nights)
    complete = np.array([night.status == "complete" for night in nights])
    samples = np.array([night.samples_per_prompt for night in nights], dtype=np.float64)
    axis = axes[0, 0]
    _night_axis(axis, nights)
    axis.bar(positions[complete], samples[complete], color="C0", width=0.6)
    axis.set_ylabel("samples per prompt (mean)")
    axis.set_title("samples per prompt", fontsize=10)

    axis = axes[0, 1]
    _night_axis(axis, nights)
    for position, night in enumerate(nights):
        trusted = night.trusted.get(pair)
        if night.status == "complete" and trusted is not None:
            axis.plot([position, position], [max(trusted[0], 1e-4), trusted[1]], color="C0", lw=6, solid_capstyle="butt")
        elif night.status == "complete":
            axis.plot(position, 1e-4, "x", color="C3", ms=8)
    axis.plot([], [], color="C0", lw=6, label="trusted KL range")
    axis.plot([], [], "x", color="C3", label="nothing trusted")
    axis.set_yscale("log")
    axis.set_ylabel("KL(π_β ‖ π₀)  [nats]")
    axis.set_title(f"trusted KL range, align {pair[0]}, eval {pair[1]} (≥ {TRUSTED_FRACTION:.0%} of prompts reliable)",
                   fontsize=10)
    axis.legend(fontsize=8, loc="upper left")

    axis = axes[1, 0]
    _night_axis(axis, nights)
    colors = colormap_colors("viridis", np.linspace(0.0, 0.85, len(budgets)))
    for index, (budget, color) in enumerate(zip(budgets, colors)):
        counts = np.array([(night.reliable.get(pair) or [np.nan] * len(budgets))[index] * night.prompts
                           for night in nights], dtype=np.float64)
        if np.isfinite(counts).any():
            label = f"at KL {budget:g}"
            for segment in _series_runs(nights):
                axis.plot(positions[segment], counts[segment], "o-", color=color, ms=3, lw=1.3, label=label)
                label = None
    prompts = np.array([night.prompts if night.status == "complete" else np.nan for night in nights], dtype=np.float64)
    axis.plot(positions, prompts, color="k", ls=":", lw=1, label="prompts")
    axis.set_ylabel("prompts reliable (interpolated in KL)")
    axis.set_title(f"prompts reliable (k-hat, ESS) at the beta of each KL budget, align {pair[0]}", fontsize=10)
    axis.legend(fontsize=7, loc="lower left", ncol=3)

    axis = axes[1, 1]
    _night_axis(axis, nights)
    quarantined = np.array([np.nan if night.quarantined_rounds is None else night.quarantined_rounds for night in nights],
                           dtype=np.float64)
    known = np.isfinite(quarantined)
    axis.bar(positions[known], quarantined[known], color="C3", width=0.6)
    axis.set_ylim(0, max(1.0, float(np.nanmax(quarantined)) * 1.2) if known.any() else 1.0)
    axis.set_ylabel("rounds")
    axis.set_title("quarantined rounds (prompts left out of the night's results)", fontsize=10)
    figure.suptitle(f"{title}: samples, trust and faults night by night (grey: incomplete night; dashed: new series)",
                    fontsize=11)
    save_figure(figure, path)


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1280px;
       color: #222; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.86em; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.text { text-align: left; } td:not(.text) { white-space: nowrap; }
tr.incomplete, tr.missing { color: #888; background: #fafafa; }
tr.new-series td { border-top: 2px solid #d62728; }
.scroll { overflow-x: auto; } td.text code { font-size: 0.95em; }
.flag { color: #d62728; font-weight: bold; } .muted { color: #777; } .small { font-size: 0.85em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _link(prefix: str, target: str, text: str) -> str:
    return f'<a href="{_e(prefix + target)}">{_e(text)}</a>'


def _gain_cell(point: GainAtKL | None) -> str:
    if point is None:
        return '<span class="muted">—</span>'
    text = format_estimate(point.gain, _Z * point.se)
    return _e(text) if point.trusted else f'<span class="muted" title="outside the trusted KL range">{_e(text)}†</span>'


def _shift_text(shift: Shift) -> str:
    return (f"{shift.verdict} at KL {shift.kl:g} ({shift.align}/{shift.eval}: {format_number(shift.diff)}, "
            f"95% [{format_number(shift.low)}, {format_number(shift.high)}])")


def _change_cell(night: Night) -> str:
    if night.status != "complete":
        return ""
    if night.previous is None:
        return '<span class="muted">first complete night</span>'
    if night.change is None:
        return f'<span class="muted">not compared{": " + _e(night.note) if night.note else ""}</span>'
    if night.shifts:
        return '<span class="flag">' + "<br>".join(_e(_shift_text(shift)) for shift in night.shifts) + "</span>"
    return f'<span class="muted">not distinguishable from {_e(night.previous)}</span>'


def write_page(root: Path, out: Path, nights: list[Night], pairs: list[tuple[str, str]], budgets: list[float],
               title: str) -> list[Path]:
    """Write ``index.html`` and ``history/{gain,health}.png`` into ``out`` (module doc); returns the paths.

    Links point into ``root`` relative to ``out``; every file appears whole (written aside, then renamed).
    """
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "history"
    figures.mkdir(exist_ok=True)
    prefix = os.path.relpath(root, out).replace(os.sep, "/")
    prefix = "" if prefix == "." else prefix + "/"
    complete = [night for night in nights if night.status == "complete"]
    paths = []
    recent = nights[-FIGURE_NIGHTS:]
    if complete and pairs:
        for name, draw in (("gain.png", lambda path: plot_gain_history(recent, pairs, budgets, path, title)),
                           ("health.png", lambda path: plot_health(recent, pairs[0], budgets, path, title))):
            partial = figures / f".{name}.partial.png"
            draw(partial)
            os.replace(partial, figures / name)
            paths.append(figures / name)
    primary = pairs[0] if pairs else None
    latest = complete[-1] if complete else None
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="small muted">Nightly root <code>{_e(root)}</code>: {len(nights)} night(s) in the ledger, '
            f"{len(complete)} complete. Written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} by "
            f"<code>limits-ray report {_e(root)}</code> (the nightly job rewrites it after every night).</p>"]
    if latest is None:
        body.append('<p id="no-complete-night">No complete night yet: nothing to draw.</p>')
    else:
        flags = [night for night in complete if night.shifts]
        body += ["<h2>(a) The latest frontier</h2>",
                 f'<p>Night {_link(prefix, latest.date + "/report.md", latest.date)}, series <code>{_e(latest.series)}</code>, '
                 f"{latest.prompts} prompts, {format_number(latest.samples_per_prompt)} samples per prompt. "
                 "Prompt-mean frontier with its 95% band; dashed where fewer than "
                 f"{TRUSTED_FRACTION:.0%} of prompts are reliable. Trusted KL range: "
                 + "; ".join(f"{_e(a)}/{_e(e)} "
                             + ("none" if latest.trusted.get((a, e)) is None else
                                f"{format_number(latest.trusted[(a, e)][0])} to {format_number(latest.trusted[(a, e)][1])} nats")
                             for a, e in pairs) + ".</p>",
                 f'<p><img id="latest-frontier" src="{_e(prefix + latest.date + "/frontier.png")}" '
                 f'alt="frontier of {_e(latest.date)}"></p>',
                 "<h2>(b) Gain at fixed KL, night by night</h2>",
                 f"<p>{'The last ' + str(FIGURE_NIGHTS) + ' nights. ' if len(nights) > FIGURE_NIGHTS else ''}"
                 "Per (align, eval), the prompt-mean gain at each KL budget with its 95% interval (within prompts). "
                 "Hollow points lie outside that night's trusted KL range. A red dashed line starts a new series "
                 "(a new base model, reward model revision or sampling setup, named beside it); a red circle marks a "
                 "budget at which the night differs from the night before at 95% (per-prompt differences over the "
                 "prompts both nights have, Student's t; only where both nights are trusted). Each budget of each pair is one "
                 "test at 5%, so among many nights and budgets some circles come by chance.</p>",
                 f'<p><img id="gain-history" src="{_e("history/gain.png")}" alt="gain at fixed KL night by night"></p>',
                 "<h2>(c) Samples, trust and faults</h2>",
                 f'<p><img id="health-history" src="{_e("history/health.png")}" alt="samples, trusted range, reliable prompts, '
                 'quarantined rounds night by night"></p>']
        if flags:
            body.insert(2, '<p class="flag" id="flags">Nights that differ from the night before: '
                        + "; ".join(f"{_e(night.date)} ({_e(', '.join(_shift_text(shift) for shift in night.shifts[:2]))}"
                                    + ("…" if len(night.shifts) > 2 else "") + ")" for night in flags[-5:]) + "</p>")
    header = ["date", "series", "status", "samples per prompt", "prompts", "trusted KL range",
              "prompts reliable at KL " + ", ".join(f"{budget:g}" for budget in budgets), "quarantined rounds",
              *(f"gain at KL {budget:g}" for budget in budgets), "against the night before", "links"]
    rows = []
    for night in reversed(nights):
        classes = [night.status] + (["new-series"] if night.series_change is not None else [])
        series = f"<code>{_e(night.series)}</code>"
        if night.series_change is not None:
            series += f'<br><span class="flag">new: {_e("; ".join(night.series_change))}</span>'
        cells = [f'<td class="text">{_e(night.date)}</td>', f'<td class="text">{series}</td>',
                 f'<td class="text">{_e(night.status)}'
                 + (f'<br><span class="small">{_e(night.note[:300])}</span>' if night.note and night.status != "complete" else "")
                 + "</td>"]
        if night.status == "complete" and primary:
            trusted = night.trusted.get(primary)
            reliable = night.reliable.get(primary) or [np.nan] * len(budgets)
            gains = night.gains.get(primary) or [None] * len(budgets)
            cells += [f"<td>{_e(format_number(night.samples_per_prompt))}</td>", f"<td>{night.prompts}</td>",
                      f"<td>{'none' if trusted is None else _e(format_number(trusted[0]) + ' to ' + format_number(trusted[1]))}</td>",
                      "<td>" + " · ".join("—" if not np.isfinite(value) else str(int(round(value * night.prompts)))
                                          for value in reliable) + "</td>",
                      f"<td>{'—' if night.quarantined_rounds is None else night.quarantined_rounds}</td>",
                      *(f"<td>{_gain_cell(point)}</td>" for point in gains)]
        else:
            cells += ["<td></td>"] * (len(header) - 5)
        cells.append(f'<td class="text">{_change_cell(night)}</td>')
        links = " · ".join(_link(prefix, target, name) for name, target in night.links.items())
        cells.append(f'<td class="text">{links}</td>')
        rows.append(f'<tr class="{" ".join(classes)}" data-date="{_e(night.date)}" data-status="{_e(night.status)}" '
                    f'data-series="{_e(night.series)}">' + "".join(cells) + "</tr>")
    body += ["<h2>(d) The nights</h2>",
             "<p>Newest first. Numbers of " + (f"align {_e(primary[0])}, eval {_e(primary[1])}" if primary else "—")
             + "; gains ± 95% (within prompts); † outside the trusted KL range. Incomplete: the night failed or is still "
             "running (its results are not written).</p>",
             '<div class="scroll"><table id="nights"><thead><tr>' + "".join(f"<th>{_e(name)}</th>" for name in header)
             + "</tr></thead><tbody>", *rows, "</tbody></table></div>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    partial = out / ".index.html.partial"
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, out / "index.html")
    return [out / "index.html", *paths]
