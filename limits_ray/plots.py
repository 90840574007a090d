"""Figures of a result: the frontier with its band and best-of-n points, convergence, ESS."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from limits_ray.reduce import ReduceResult  # noqa: E402

__all__ = ["write_plots", "plot_frontier", "plot_convergence", "plot_ess"]


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


def plot_frontier(result: ReduceResult, path: Path, title: str) -> None:
    """Prompt-averaged gain against KL per (align, eval), 95% band, per-prompt lines, best-of-n points."""
    prompts, samples = _counts(result)
    pairs = _pairs(result.frontier_mean)
    columns = min(2, len(pairs))
    rows = -(-len(pairs) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 4.6 * rows), squeeze=False)
    for axis in axes.flat[len(pairs):]:
        axis.set_visible(False)
    for axis, (align, evaluation) in zip(axes.flat, pairs):
        per_prompt = _select(result.frontier, align, evaluation)
        for prompt_id in sorted(set(per_prompt["prompt_id"].to_pylist()))[:50]:
            rows = per_prompt.filter(pc.equal(per_prompt["prompt_id"], prompt_id))
            axis.plot(rows["kl"].to_numpy(), rows["gain"].to_numpy(), color="0.75", lw=0.5, zorder=1)
        mean = _select(result.frontier_mean, align, evaluation)
        kl, gain, band = mean["kl"].to_numpy(), mean["gain"].to_numpy(), 1.96 * mean["gain_se"].to_numpy()
        axis.fill_between(kl, gain - band, gain + band, color="C0", alpha=0.3, zorder=2, label="95% band")
        axis.plot(kl, gain, color="C0", lw=2, zorder=3, label="frontier (prompt mean)")
        bon = _select(result.bon, align, evaluation)
        if bon.num_rows:
            grouped = bon.group_by("n").aggregate([("kl", "mean"), ("gain", "mean")]).sort_by("n")
            axis.plot(grouped["kl_mean"].to_numpy(), grouped["gain_mean"].to_numpy(), "o", color="C3",
                      ms=5, zorder=4, label="best-of-n, n = 1, 2, 4, ...")
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_xlabel("KL(π_β ‖ π₀)  [nats]")
        axis.set_ylabel(f"gain in {evaluation}  [reward units]")
        axis.set_title(f"align {align}, eval {evaluation}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    figure.suptitle(f"{title}: KL-reward frontier ({prompts} prompts, N = {samples} samples per prompt)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_convergence(result: ReduceResult, path: Path, title: str) -> None:
    """Prompt-averaged gain and KL against the number of samples N, for a few betas."""
    prompts, _ = _counts(result)
    if result.convergence.num_rows == 0:
        return
    align, evaluation = _pairs(result.convergence)[0]
    table = _select(result.convergence, align, evaluation)
    grouped = table.group_by(["beta", "n_samples"]).aggregate([("gain", "mean"), ("kl", "mean")])
    betas = np.unique(grouped["beta"].to_numpy())
    shown = betas[np.unique(np.linspace(0, betas.size - 1, min(5, betas.size)).round().astype(int))]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10.4, 4.2))
    for color, beta in enumerate(shown):
        rows = grouped.filter(pc.equal(grouped["beta"], beta)).sort_by("n_samples")
        n = rows["n_samples"].to_numpy()
        left.plot(n, rows["gain_mean"].to_numpy(), "o-", color=f"C{color}", ms=3, label=f"β = {beta:.3g}")
        right.plot(n, rows["kl_mean"].to_numpy(), "o-", color=f"C{color}", ms=3, label=f"β = {beta:.3g}")
    for axis, name in ((left, f"gain in {evaluation}  [reward units]"), (right, "KL(π_β ‖ π₀)  [nats]")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("samples per prompt N")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{title}: estimator convergence, align {align} ({prompts} prompts)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_ess(result: ReduceResult, path: Path, title: str) -> None:
    """Median Kish effective sample size against beta, per alignment reward."""
    prompts, samples = _counts(result)
    figure, axis = plt.subplots(figsize=(5.6, 4.2))
    for color, align in enumerate(sorted(set(result.frontier["align"].to_pylist()))):
        rows = result.frontier.filter(pc.equal(result.frontier["align"], align))
        grouped = rows.group_by("beta").aggregate([("ess", "approximate_median")]).sort_by("beta")
        axis.plot(grouped["beta"].to_numpy(), grouped["ess_approximate_median"].to_numpy(), "o-", ms=3,
                  color=f"C{color}", label=f"align {align}")
    axis.axhline(samples, color="0.5", ls="--", lw=1, label=f"N = {samples}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("β (KL penalty)")
    axis.set_ylabel("effective sample size (Kish), median over prompts")
    axis.set_title(f"{title}: ESS ({prompts} prompts)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(result: ReduceResult, out_dir: str | Path, title: str) -> list[Path]:
    """Write frontier.png, convergence.png and ess.png into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "frontier.png", out_dir / "convergence.png", out_dir / "ess.png"]
    plot_frontier(result, paths[0], title)
    plot_convergence(result, paths[1], title)
    plot_ess(result, paths[2], title)
    return [path for path in paths if path.exists()]
