"""Large-N convergence studies: estimates of gain and KL against N, per beta, over prompts.

For a config and a maximum N, :func:`run_study` brings the sample store up to N samples per prompt
(only missing rounds are generated, see :func:`limits_ray.job.run_job`) and takes the run's
``convergence`` table, which the bucket tasks write from the merged statistics of every dyadic prefix
(N = 1, 2, 4, ..., the sample_idx order, and N itself): per prompt, beta and N it has gain, KL, their
standard errors, the Kish ESS and k-hat. :func:`summarize` averages over prompts with two error bars,
both from :func:`limits_ray.prompt_mean.prompt_means` (the frontier's own centre and bars),

- ``*_mc_se``: Monte Carlo error of the prompt mean, ``sqrt(sum_x se_x^2) / P`` of the delta-method
  SEs (prompts fixed), widened by the bias allowance of unreliable prompts, NaN where not trusted,
- ``*_spread_se``: the spread across prompts, ``sd_x / sqrt(P)`` (prompts drawn from a population),

and :func:`settle_table` reports per beta the N from which the prompt-mean estimate stays within a
stated tolerance of its value at the largest N: where small beta has not converged, it says so
(``settled`` false) next to the ESS per prompt.

The aggregation functions take plain tables, so they also serve ``limits-ray report`` on a
``convergence.parquet`` that has no standard-error columns.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from limits_ray.config import JobConfig
from limits_ray.io import write_table
from limits_ray.prompt_mean import between_prompt_se, prompt_means, prompt_sums

__all__ = ["StudyResult", "run_study", "settle_table", "study_config", "summarize", "write_study"]


def _groups(table: pa.Table, keys: list[str]) -> tuple[list[tuple], list[np.ndarray]]:
    """Row indices of each distinct key tuple, keys sorted."""
    columns = [table[key].to_pylist() for key in keys]
    index: dict[tuple, list[int]] = {}
    for row, key in enumerate(zip(*columns)):
        index.setdefault(key, []).append(row)
    ordered = sorted(index)
    return ordered, [np.asarray(index[key]) for key in ordered]


def summarize(table: pa.Table) -> pa.Table:
    """Prompt averages per (align, eval, beta, n_samples) of a prefix or convergence table.

    Columns: ``prompts``, ``gain``, ``gain_spread_se``, ``kl``, ``kl_spread_se`` (the centre and spread of
    :func:`limits_ray.prompt_mean.prompt_means`: bias-corrected means where the table has ``gain_bc``) and,
    when the input has standard errors, ``gain_mc_se``, ``kl_mc_se`` (its within-prompt error bars, NaN
    where not trusted), ``ess_median``, ``ess_min``, ``reliable`` (the fraction of reliable prompts). A
    prompt that has fewer samples than N does not enter the row for N.
    """
    keys = ["align", "eval", "beta", "n_samples"]
    has_se = "gain_se" in table.column_names or "gain_se_delta" in table.column_names
    has_ess = "ess" in table.column_names
    has_reliable = "reliable" in table.column_names
    sums = prompt_sums(table, keys)
    means = prompt_means(sums, keys)
    out = {key: sums[key] for key in keys}
    out.update(prompts=sums["prompts"], gain=means["gain"], gain_spread_se=means["gain_spread_se"], kl=means["kl"],
               kl_spread_se=means["kl_spread_se"])
    if not has_se:  # no errors at all: the spread alone, as for any table of estimates
        for name in ("gain", "kl"):
            out[f"{name}_spread_se"] = between_prompt_se(means["prompts"], sums[f"{name}_m2"].to_numpy())
    if has_se:
        out.update(gain_mc_se=means["gain_se"], kl_mc_se=means["kl_se"])
    if has_ess:
        order, groups = _groups(table, keys)
        ess = table["ess"].to_numpy()
        out["ess_median"] = [float(np.median(ess[rows])) for rows in groups]
        out["ess_min"] = [float(np.min(ess[rows])) for rows in groups]
    if has_reliable:
        out["reliable"] = means["reliable"]
    types = {"align": pa.string(), "eval": pa.string(), "n_samples": pa.int64(), "prompts": pa.int64()}
    return pa.table({name: pa.array(column, type=types.get(name, pa.float64())) for name, column in out.items()})


def _settle_index(means: np.ndarray, tolerance: float, atol: float) -> int:
    """First index from which every value stays within ``atol + tolerance |final|`` of the final one."""
    final = means[-1]
    inside = np.abs(means - final) <= atol + tolerance * abs(final)
    outside = np.flatnonzero(~inside)
    return 0 if outside.size == 0 else int(outside[-1]) + 1


def settle_table(summary: pa.Table, tolerance: float = 0.05, atol: float = 1e-3) -> pa.Table:
    """Per (align, eval, beta): the N from which gain and KL stay within tolerance of their largest-N value.

    The prompt-mean gain and KL (``summarize``) count as settled at N when, for every N' >= N
    on the dyadic grid, ``|mean(N') - mean(N_max)| <= atol + tolerance * |mean(N_max)|``. A series
    that only satisfies this at ``N_max`` itself (or at ``N_max / 2``: one doubling is no evidence)
    is reported ``settled = false``: sample more at that beta. Also gives the final estimates, their
    Monte Carlo standard errors (when known) and the median and smallest ESS over prompts.
    """
    keys = ["align", "eval", "beta"]
    order, groups = _groups(summary, keys)
    n_samples = summary["n_samples"].to_numpy()
    gain, kl = summary["gain"].to_numpy(), summary["kl"].to_numpy()
    optional = {name: summary[name].to_numpy() for name in ("gain_mc_se", "kl_mc_se", "ess_median", "ess_min")
                if name in summary.column_names}
    out: dict[str, list] = {name: [] for name in (*keys, "n_max", "prompts", "gain", "kl", "settle_n_gain", "settle_n_kl",
                                                   "settle_n", "settled", *optional)}
    prompts = summary["prompts"].to_numpy()
    for key, rows in zip(order, groups):
        rows = rows[np.argsort(n_samples[rows])]
        # Only the N every prompt reached: a partial row would mix prompt sets.
        rows = rows[prompts[rows] == prompts[rows].max()] if rows.size else rows
        if rows.size > 2:  # N = 1: every gain and KL is 0 by construction, no evidence of anything
            rows = rows[n_samples[rows] > 1]
        n = n_samples[rows]
        gain_at = _settle_index(gain[rows], tolerance, atol)
        kl_at = _settle_index(kl[rows], tolerance, atol)
        settle = max(gain_at, kl_at)
        for name, value in zip(keys, key):
            out[name].append(value)
        out["n_max"].append(int(n[-1]))
        out["prompts"].append(int(prompts[rows[-1]]))
        out["gain"].append(float(gain[rows[-1]]))
        out["kl"].append(float(kl[rows[-1]]))
        out["settle_n_gain"].append(int(n[gain_at]))
        out["settle_n_kl"].append(int(n[kl_at]))
        out["settle_n"].append(int(n[settle]))
        out["settled"].append(bool(settle <= len(n) - 3))
        for name, column in optional.items():
            out[name].append(float(column[rows[-1]]))
    types = {"align": pa.string(), "eval": pa.string(), "settled": pa.bool_()}
    for name in ("n_max", "prompts", "settle_n_gain", "settle_n_kl", "settle_n"):
        types[name] = pa.int64()
    return pa.table({name: pa.array(column, type=types.get(name, pa.float64())) for name, column in out.items()})


def ess_per_prompt(prefixes: pa.Table) -> pa.Table:
    """ESS per (align, prompt, beta) at each prompt's largest N; empty when the input has no ``ess``."""
    schema = pa.schema([("align", pa.string()), ("prompt_id", pa.string()), ("beta", pa.float64()),
                        ("n_samples", pa.int64()), ("ess", pa.float64())])
    if "ess" not in prefixes.column_names or prefixes.num_rows == 0:
        return schema.empty_table()
    n_samples = prefixes["n_samples"].to_numpy()
    order, groups = _groups(prefixes, ["align", "prompt_id", "beta"])
    ess = prefixes["ess"].to_numpy()
    rows = [(key, group[np.argmax(n_samples[group])]) for key, group in zip(order, groups)]
    return pa.table({
        "align": [key[0] for key, _ in rows], "prompt_id": [key[1] for key, _ in rows],
        "beta": [float(key[2]) for key, _ in rows], "n_samples": [int(n_samples[row]) for _, row in rows],
        "ess": [float(ess[row]) for _, row in rows],
    }, schema=schema)


@dataclass
class StudyResult:
    """A convergence study: per-prompt prefix estimates, their prompt averages, settle N, ESS."""

    prefixes: pa.Table
    summary: pa.Table
    settle: pa.Table
    ess: pa.Table
    tolerance: float
    atol: float
    title: str = ""


def study_from_table(prefixes: pa.Table, tolerance: float = 0.05, atol: float = 1e-3, title: str = "") -> StudyResult:
    """A :class:`StudyResult` from a prefix (or plain convergence) table."""
    summary = summarize(prefixes)
    return StudyResult(prefixes, summary, settle_table(summary, tolerance, atol), ess_per_prompt(prefixes),
                       tolerance, atol, title)


def study_config(config: JobConfig, max_n: int, out_dir: str | Path) -> JobConfig:
    """The config that brings every prompt to ``max_n`` samples in the run's own store, writing to ``out_dir``."""
    n = config.generation.n
    rounds = max(1, -(-int(max_n) // n))
    return dataclasses.replace(
        config,
        output_dir=str(out_dir),
        store=dataclasses.replace(config.store, enabled=True, path=str(Path(config.store_uri))),
        generation=dataclasses.replace(config.generation, samples_per_prompt=rounds * n),
    )


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
    from limits_ray.plots import plot_convergence_bands, plot_ess_prompts, plot_frontier_by_n

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


def run_study(config: JobConfig, max_n: int, out_dir: str | Path | None = None, tolerance: float = 0.05,
              atol: float = 1e-3) -> StudyResult:
    """Bring the store to ``max_n`` samples per prompt (missing rounds only), then study convergence.

    Results go to ``out_dir`` (default ``<output_dir>/study-N<max_n>``): the job's usual tables for
    N = max_n, and the study's (``study_*.parquet``, ``study_*.png``, ``study.md``).
    """
    from limits_ray.job import run_job

    out_dir = Path(out_dir or Path(config.output_dir) / f"study-N{max_n}")
    job = study_config(config, max_n, out_dir)
    result, report = run_job(job)
    # The run's convergence table: its prompts only, every dyadic N with errors, ESS and k-hat, written
    # by the bucket tasks from the merged statistics (no read of the stored samples here).
    study = study_from_table(result.convergence, tolerance, atol, title=config.name)
    write_study(study, out_dir)
    (out_dir / "study.json").write_text(json.dumps({
        "max_n": job.generation.samples_per_prompt, "tolerance": tolerance, "atol": atol,
        "rounds_generated": report.rounds_generated, "rounds_from_store": report.rounds_from_store,
    }, indent=2))
    return study
