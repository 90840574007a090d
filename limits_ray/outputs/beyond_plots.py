"""Figures of the frontier's extensions: the certified bracket past the trusted range, and the win rates.

- :func:`draw_bracket` (on ``frontier.png``'s ``align = eval`` panels, :func:`limits_ray.outputs.figures.plot_frontier`):
  the bracket ``[L(K), U(K)]`` of :mod:`limits_ray.core.bracket` shaded, and the region above its upper
  bound hatched as unachievable (with 95% confidence; the paper's Fig. 1 shades that region without an error);
- ``winrate.png`` (:func:`winrate_figure`, saved by :func:`limits_ray.outputs.figures.write_plots`): per evaluation reward, the prompt-mean win rate over pi0 of each
  alignment reward's tilts against their KL (95% band, dashed outside the trusted range), the
  win-rate-optimal curve (its closed form for a continuous reward, and the rank tilts estimated from the
  samples) and best-of-n (from the samples, and ``n/(n+1)``);
- ``proposals.png`` (:func:`proposals_figure`, ``limits-ray compare`` with policies): per evaluation reward,
  the frontier from the base samples and the one from every proposal's samples
  (:mod:`limits_ray.core.proposals`), each solid over its own trusted KL range, with the checkpoints.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from limits_ray.core.bon import bon_kl_bound
from limits_ray.core.frontier import trusted_kl_range
from limits_ray.core.headline import Z95
from limits_ray.core.winrate import bon_winrate, rank_label, rank_tilt_curve
from limits_ray.outputs.style import panel_grid

__all__ = ["draw_bracket", "proposals_figure", "winrate_figure"]


def _select(table: pa.Table, align: str, evaluation: str) -> pa.Table:
    return table.filter(pc.and_(pc.equal(table["align"], align), pc.equal(table["eval"], evaluation)))


def draw_bracket(axis, bracket: pa.Table, align: str, evaluation: str, gains: np.ndarray) -> bool:
    """Shade one frontier's certified bracket and the unachievable region above it; returns whether it drew.

    ``gains``: the values the panel already shows (the y-range is set to keep them and the bracket's lower
    bound in view, with the upper bound cut where it leaves it).
    """
    rows = _select(bracket, align, evaluation).sort_by("kl") if bracket.num_rows else bracket
    if rows.num_rows == 0:
        return False
    kl, lower, upper = (rows[name].to_numpy() for name in ("kl", "lower", "upper"))
    shown = np.concatenate([np.asarray(gains, float)[np.isfinite(gains)], lower[np.isfinite(lower)]])
    top = 1.3 * float(np.max(shown)) if shown.size else 1.0
    bottom, _ = axis.get_ylim()
    axis.fill_between(kl, lower, np.where(np.isfinite(upper), np.minimum(upper, top), top), color="C2", alpha=0.25, lw=0,
                      zorder=1.5, label="certified bracket past the trusted range (95%)")
    axis.plot(kl, lower, color="C2", lw=1, zorder=2)
    if np.isfinite(upper).any():
        axis.plot(kl, upper, color="C2", lw=1, ls="-.", zorder=2)
        axis.fill_between(kl, np.minimum(upper, top), top, facecolor="none", edgecolor="0.45", hatch="///", lw=0,
                          zorder=1.4, label="unachievable: above the tangent at the last trusted point")
    axis.set_ylim(min(bottom, 0.0), top)
    return True


def winrate_figure(winrate_mean: pa.Table, bon: pa.Table, title: str) -> Figure | None:
    """The figure of ``winrate.png`` (module doc); None without win rates."""
    if winrate_mean.num_rows == 0:
        return None
    evals = sorted(set(winrate_mean["eval"].to_pylist()))[:4]
    figure, panels = panel_grid(len(evals), (6.0, 4.6))
    for axis, evaluation in zip(panels, evals):
        pairs = sorted({a for a, e in zip(winrate_mean["align"].to_pylist(), winrate_mean["eval"].to_pylist())
                        if e == evaluation and a != rank_label(evaluation)})
        high = 0.0
        for color, align in enumerate(pairs[:6]):
            rows = _select(winrate_mean, align, evaluation).sort_by("kl")
            kl, rate = rows["kl"].to_numpy(), rows["winrate"].to_numpy()
            high = max(high, float(np.nanmax(kl)))
            band = Z95 * rows["winrate_se"].to_numpy()
            centre = rows["winrate_bc"].to_numpy()
            axis.fill_between(kl, centre - band, centre + band, color=f"C{color}", alpha=0.25, lw=0)
            trusted = trusted_kl_range(rows, align, evaluation)
            inside = np.zeros(kl.size, bool) if trusted is None else (kl >= trusted[0]) & (kl <= trusted[1])
            axis.plot(np.where(inside, kl, np.nan), rate, color=f"C{color}", lw=2, label=f"tilts of {align}")
            outside = ~inside
            outside[1:] |= ~inside[:-1]  # join the dashed part to the last trusted point
            outside[:-1] |= ~inside[1:]
            axis.plot(np.where(outside, kl, np.nan), rate, color=f"C{color}", lw=1.2, ls="--", alpha=0.8)
        ranked = _select(winrate_mean, rank_label(evaluation), evaluation).sort_by("kl")
        if ranked.num_rows:
            axis.plot(ranked["kl"].to_numpy(), ranked["winrate"].to_numpy(), color="k", lw=1.6, ls=(0, (4, 2)),
                      label="win-rate-optimal: rank tilts, from the samples")
            high = max(high, float(np.nanmax(ranked["kl"].to_numpy())))
        betas = np.geomspace(1e-3, 1e3, 200)
        best, best_kl = rank_tilt_curve(betas)
        keep = best_kl <= max(high, 1e-3)
        axis.plot(best_kl[keep], best[keep], color="0.5", lw=1, label="win-rate-optimal, continuous reward (closed form)")
        chosen = _select(bon, evaluation, evaluation) if bon.num_rows and "winrate" in bon.column_names else None
        if chosen is not None and chosen.num_rows:
            grouped = chosen.group_by("n").aggregate([("kl", "mean"), ("winrate", "mean")]).sort_by("n")
            axis.plot(grouped["kl_mean"].to_numpy(), grouped["winrate_mean"].to_numpy(), "o", color="C3", ms=5,
                      label=f"best-of-n (select by {evaluation}), from the samples")
            n = grouped["n"].to_numpy()
            axis.plot(bon_kl_bound(n), bon_winrate(n), "o", mfc="none", color="C3", ms=8,
                      label="best-of-n, continuous: n/(n+1) at log n - (n-1)/n")
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_ylim(0.45, 1.01)
        axis.set_xlabel("KL(π ‖ π₀)  [nats]")
        axis.set_ylabel(f"win rate over π₀ in {evaluation}")
        axis.set_title(f"eval {evaluation}: P(policy's response beats π₀'s), ties half", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    prompts = int(np.max(winrate_mean["prompts"].to_numpy()))
    figure.suptitle(f"{title}: win rate against KL ({prompts} prompts; 95% bands; dashed: not trusted)", fontsize=11)
    return figure


def _trusted_line(axis, kl: np.ndarray, gain: np.ndarray, trusted: tuple[float, float] | None, color: str, label: str) -> None:
    """A frontier: solid over ``trusted``, thin and dashed elsewhere."""
    inside = np.zeros(kl.size, bool) if trusted is None else (kl >= trusted[0]) & (kl <= trusted[1])
    axis.plot(np.where(inside, kl, np.nan), gain, color=color, lw=2.2, label=label)
    outside = ~inside
    outside[1:] |= ~inside[:-1]
    outside[:-1] |= ~inside[1:]
    axis.plot(np.where(outside, kl, np.nan), gain, color=color, lw=1.2, ls="--", alpha=0.8)


def proposals_figure(frontier_mean: pa.Table, proposals_mean: pa.Table, policies: pa.Table, title: str) -> Figure | None:
    """The figure of ``proposals.png`` (module doc); None without proposal rows."""
    evals = sorted({e for a, e in zip(proposals_mean["align"].to_pylist(), proposals_mean["eval"].to_pylist()) if a == e})
    if not evals:
        return None
    figure, panels = panel_grid(len(evals), (6.0, 4.8))
    for axis, evaluation in zip(panels, evals):
        parts = []
        for table, color, name in ((frontier_mean, "C0", "base samples only"), (proposals_mean, "C2", "base + policy samples")):
            # The centres: frontier_mean's gain, kl; the proposal means' (and older tables') *_bc columns.
            gain_name, kl_name = ("gain_bc", "kl_bc") if "gain_bc" in table.column_names else ("gain", "kl")
            rows = _select(table, evaluation, evaluation).sort_by(kl_name)
            if rows.num_rows == 0:
                continue
            kl, gain = rows[kl_name].to_numpy(), rows[gain_name].to_numpy()
            band = Z95 * rows["gain_se"].to_numpy()
            axis.fill_between(kl, gain - band, gain + band, color=color, alpha=0.2, lw=0)
            trusted = trusted_kl_range(rows, evaluation, evaluation)
            reach = "not trusted" if trusted is None else f"trusted to KL {trusted[1]:.3g}"
            _trusted_line(axis, kl, gain, trusted, color, f"{name} ({reach})")
            parts.append(f"{name}: {reach}")
        checkpoints = policies.filter(pc.and_(pc.equal(policies["kind"], "checkpoint"),
                                              pc.and_(pc.equal(policies["align"], evaluation), pc.equal(policies["eval"], evaluation))))
        for color, row in enumerate(checkpoints.to_pylist(), start=4):
            axis.errorbar(row["kl"], row["gain"], xerr=Z95 * row["kl_se"], yerr=Z95 * row["gain_se"], fmt="s",
                          color=f"C{color}", ms=6, capsize=3, label=f"policy {row['policy']}")
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_xlabel("KL(π_β ‖ π₀)  [nats]")
        axis.set_ylabel(f"gain in {evaluation}  [reward units]")
        axis.set_title(f"align = eval = {evaluation}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left")
    figure.suptitle(f"{title}\nthe frontier from the base samples, and with the policies' samples as proposals "
                    "(solid: trusted range; bands: 95%)", fontsize=10)
    return figure

