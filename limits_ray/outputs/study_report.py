"""The files of a convergence study: its tables, figures and ``study.md`` (:mod:`limits_ray.core.convergence`)."""

from __future__ import annotations

from pathlib import Path

from limits_ray.core.convergence import StudyResult
from limits_ray.outputs.figures import plot_convergence_bands, plot_ess_prompts, plot_frontier_by_n
from limits_ray.storage.sample_io import write_table

__all__ = ["write_study"]


def _markdown(result: StudyResult, figures: list[str]) -> str:
    settle = result.settle
    prompts = int(settle["prompts"].to_numpy().max()) if settle.num_rows else 0
    n_max = int(settle["n_max"].to_numpy().max()) if settle.num_rows else 0
    lines = [
        f"# Convergence study: {result.title}",
        "",
        f"{prompts} prompts, N up to {n_max} samples per prompt. Settled: the prompt-mean gain and KL stay within "
        f"{result.atol:g} + {result.tolerance:.0%} of their value at N = {n_max} from `settle_n` on "
        "(`settled` is false where that holds only over the last doubling or two: sample more there). "
        "Where the ESS is near 1 a single sample carries the estimate and its standard error means little.",
        "",
    ]
    lines += [f"![{name}]({name})" for name in figures]
    header = "| align | eval | beta | gain | gain MC se | KL | KL MC se | ESS median | ESS min | settle N (gain / KL) | settled |"
    lines += ["", header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    columns = settle.to_pydict()
    for row in range(settle.num_rows):
        get = lambda name: columns.get(name, [float("nan")] * settle.num_rows)[row]  # noqa: E731
        lines.append(
            f"| {get('align')} | {get('eval')} | {get('beta'):.4g} | {get('gain'):.4g} | {get('gain_mc_se'):.2g} | "
            f"{get('kl'):.4g} | {get('kl_mc_se'):.2g} | {get('ess_median'):.1f} | {get('ess_min'):.1f} | "
            f"{get('settle_n_gain')} / {get('settle_n_kl')} | {'yes' if get('settled') else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def write_study(result: StudyResult, out_dir: str | Path) -> list[Path]:
    """Write the study's tables (Parquet), figures (PNG) and ``study.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("prefixes", "summary", "settle", "ess"):
        path = out_dir / f"study_{name}.parquet"
        write_table(getattr(result, name), path)
        paths.append(path)
    figures = []
    for name, plot in (("study_convergence.png", plot_convergence_bands), ("study_frontier_by_n.png", plot_frontier_by_n),
                       ("study_ess.png", plot_ess_prompts)):
        if plot(result.summary if plot is not plot_ess_prompts else result.ess, out_dir / name, result.title,
                **({"settle": result.settle} if plot is plot_convergence_bands else {})):
            figures.append(name)
            paths.append(out_dir / name)
    (out_dir / "study.md").write_text(_markdown(result, figures))
    paths.append(out_dir / "study.md")
    return paths
