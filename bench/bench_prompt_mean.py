"""Benchmark: the prompt mean's centre and error bar at 1e3, 1e4 and 1e5 prompts, and the frontier at a fixed KL.

Simulated prompts with exact answers, N = 1,000 rewards each aligned on itself, four betas (0.8, 1, 1.5, 3):

- *identical*: every prompt N(0, 1) (exact gain 1/beta, KL 1/(2 beta^2));
- *mixed sigma*: a third each of sigma 0.5, 1, 2;
- *1% heavy*: 99% sigma 1 and 1% sigma 2.5 (at beta <= 1.5 their weights have infinite or nearly
  infinite variance).

The prompts are simulated in blocks of the largest P (chunks of 2,000, per-prompt values only, so memory
stays at one block); each block is cut into groups of P = 1e3, 1e4 and 1e5 prompts, and each group is
one run: the tables' gate over its prompts (:func:`limits_ray.core.reliability.gate_cells`), then
``frontier_mean`` by :func:`limits_ray.core.prompt_mean.prompt_means`. Per (family, P, beta), over the groups:

- *bar*: the share of groups whose prompt mean has an error bar (not NaN);
- *cover*: the coverage of ``gain ± 1.96 gain_se`` (and of the KL) of the exact prompt mean, over groups
  with a bar; *plug-in*: the same interval around the plug-in mean;
- *SE / SD*: the mean error bar over the real SD of the centre, ``sqrt(sum_x Var_x)/P`` with ``Var_x`` the
  variance of the bias-corrected estimate of prompts of x's kind over every prompt simulated (target
  0.8-1.25); *t-scaled*: the same for ``sqrt(sum_x gain_se_x^2)/P`` of the per-prompt interval SEs where
  every prompt has one (the former frontier_mean.gain_se);
- *bias*: the centre's mean error over all prompts simulated, in real SDs of the mean at that P (plug-in
  and bias-corrected); its Monte Carlo error is ``sqrt(P / prompts simulated)``.

The frontier at a fixed KL (identical prompts): at budgets K the Hermite interpolant of each group's
frontier (:func:`limits_ray.core.fixed_kl.at_kl`) against the exact ``sqrt(2K)``: coverage of the 95% interval
from ``gain_se_at_kl``, the error bar over the SD of the estimates across groups, and the fixed-KL SE over
the fixed-beta one.

    python bench/bench_prompt_mean.py [--prompts 1000000] [--no-write]      # full size (20-25 min, 2 cores)
    python bench/bench_prompt_mean.py --prompts 20000 --sizes 1000,10000    # a few minutes
"""

from __future__ import annotations

from _report import cpu_description, load_average, publish  # first: puts this checkout on sys.path

# isort: split

import argparse
import datetime as dt
import platform
import sys
import time

import numpy as np
from _families import Kind, gaussian
from _simulate import as_table, concat, gated, prompt_fields
from scipy.optimize import brentq

from limits_ray.core.fixed_kl import at_kl
from limits_ray.core.prompt_mean import ALLOWANCE_LIMIT, prompt_means, prompt_sums

SECTION = "## The prompt mean at 1e3-1e5 prompts (bench/bench_prompt_mean.py)"
BETAS = np.array([0.8, 1.0, 1.5, 3.0])
N = 1000
CHUNK = 2000
BUDGETS = np.array([0.1, 0.3, 0.5, 0.7])
FAMILIES: dict[str, tuple[list[Kind], list[float]]] = {
    "identical": ([gaussian(1.0)], [1.0]),
    "mixed sigma": ([gaussian(0.5), gaussian(1.0), gaussian(2.0)], [1 / 3, 1 / 3, 1 / 3]),
    "1% heavy": ([gaussian(1.0), gaussian(2.5)], [0.99, 0.01]),
}


def kinds_of(count: int, shares: list[float], rng: np.random.Generator) -> np.ndarray:
    """``[count]`` kind of each prompt: exact shares (rounded), in a random order."""
    bounds = np.cumsum(shares) / np.sum(shares)
    kinds = np.searchsorted(bounds, (np.arange(count) + 0.5) / count)
    return rng.permutation(kinds)


def block(kinds: list[Kind], labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-prompt values of one block of prompts (kind ``labels``), ``CHUNK`` prompts at a time."""
    parts = []
    for start in range(0, labels.size, CHUNK):
        chosen = labels[start:start + CHUNK]
        rewards = np.empty((chosen.size, N))
        for index, kind in enumerate(kinds):
            rows = np.flatnonzero(chosen == index)
            if rows.size:
                rewards[rows] = kind.draw(rng, rows.size, N)
        parts.append(prompt_fields(rewards, BETAS))
    return concat(parts)


def exact_mean_at_kl(kinds: list[Kind], shares: list[float], budget: float) -> float:
    """The exact mean frontier of the composition at mean KL ``budget`` (beta by root finding)."""
    def mean_of(index: int, beta: float) -> float:
        return float(sum(share * kind.truth(np.array([beta]))[index][0] for kind, share in zip(kinds, shares)))

    beta = brentq(lambda b: mean_of(1, b) - budget, 0.05, 1e4, xtol=1e-14, rtol=1e-14)
    return mean_of(0, beta)


def run_family(name: str, prompts: int, sizes: list[int], seed: int) -> dict:
    kinds, shares = FAMILIES[name]
    rng = np.random.default_rng(seed)
    largest = max(sizes)
    blocks = max(1, prompts // largest)
    truth = np.stack([np.stack(kind.truth(BETAS)[:2]) for kind in kinds])  # [K, 2, B] gain, KL
    per_p = {p: {key: [] for key in ("gain", "gain_se", "kl", "kl_se", "gain_plugin", "kl_plugin", "true_gain", "true_kl",
                                      "t_se", "counts", "at_kl", "at_kl_se", "se_at_beta")} for p in sizes}
    sums = {key: np.zeros((len(kinds), BETAS.size)) for key in ("n", "gain", "gain_sq", "kl", "kl_sq", "err_bc", "err_plug",
                                                                 "kl_err_bc", "kl_err_plug")}
    for _ in range(blocks):
        labels = kinds_of(largest, shares, rng)
        fields = block(kinds, labels, rng)
        for index in range(len(kinds)):  # per-kind moments of the estimates (the real SD) and their errors
            rows = labels == index
            for key, values in (("gain", fields["gain_bc"]), ("kl", fields["kl_bc"])):
                sums[key][index] += values[rows].sum(axis=0)
                sums[f"{key}_sq"][index] += (values[rows] ** 2).sum(axis=0)
            sums["n"][index] += rows.sum()
            sums["err_bc"][index] += (fields["gain_bc"][rows] - truth[index, 0]).sum(axis=0)
            sums["err_plug"][index] += (fields["gain"][rows] - truth[index, 0]).sum(axis=0)
            sums["kl_err_bc"][index] += (fields["kl_bc"][rows] - truth[index, 1]).sum(axis=0)
            sums["kl_err_plug"][index] += (fields["kl"][rows] - truth[index, 1]).sum(axis=0)
        for size in sizes:
            group = np.arange(largest) // size
            rows = gated(fields, group)
            table = as_table(rows, group)
            prompt_table = prompt_sums(table, ["group", "beta"])
            means = prompt_means(prompt_table, ["group", "beta"])
            groups = largest // size
            shape = (groups, BETAS.size)
            record = per_p[size]
            for key in ("gain", "gain_se", "kl", "kl_se", "gain_plugin", "kl_plugin"):
                record[key].append(means[key].reshape(shape))
            counts = np.stack([np.bincount(group[labels == index], minlength=groups) for index in range(len(kinds))], axis=1)
            record["counts"].append(counts)  # [G, K]
            record["true_gain"].append(counts @ truth[:, 0] / size)
            record["true_kl"].append(counts @ truth[:, 1] / size)
            t_se = np.full(shape, np.nan)
            squares = fields["gain_se"] ** 2  # the per-prompt interval SEs of finalize (NaN where not own-reliable)
            for g in range(groups):
                t_se[g] = np.sqrt(squares[group == g].sum(axis=0)) / size
            record["t_se"].append(t_se)
            if name == "identical":
                kl = means["kl"].reshape(shape)
                gain, slope = means["gain"].reshape(shape), means["slope"].reshape(shape)
                kl_dbeta, se_at = means["kl_dbeta"].reshape(shape), means["gain_se_at_kl"].reshape(shape)
                at, at_se, at_beta_se = (np.full((groups, BUDGETS.size), np.nan) for _ in range(3))
                for g in range(groups):
                    for k, budget in enumerate(BUDGETS):
                        if kl[g].min() <= budget <= kl[g].max():
                            _, at[g, k], at_se[g, k] = at_kl(kl[g], BETAS, gain[g], budget, slope[g], kl_dbeta[g], se_at[g])
                            at_beta_se[g, k] = at_kl(kl[g], BETAS, gain[g], budget, None, None,
                                                     means["gain_se"].reshape(shape)[g])[2]
                record["at_kl"].append(at)
                record["at_kl_se"].append(at_se)
                record["se_at_beta"].append(at_beta_se)
        print(f"  {name}: block of {largest:,} prompts done", file=sys.stderr, flush=True)
    total = sums["n"].sum(axis=0)
    variance = {key: sums[f"{key}_sq"] / np.maximum(sums["n"], 1) - (sums[key] / np.maximum(sums["n"], 1)) ** 2
                for key in ("gain", "kl")}  # [K, B] per-kind variance of the bias-corrected estimates
    rows = []
    for size in sizes:
        record = {key: np.concatenate(value) for key, value in per_p[size].items() if value}
        for b, beta in enumerate(BETAS):
            row = {"family": name, "P": size, "beta": float(beta), "groups": int(record["gain"].shape[0])}
            for target in ("gain", "kl"):
                real_sd = np.sqrt(record["counts"] @ variance[target][:, b]) / size  # [G]
                bar = record[f"{target}_se"][:, b]
                given = np.isfinite(bar)
                truth_mean = record[f"true_{target}"][:, b]
                row[f"{target}_bar"] = float(given.mean())
                error = record[target][:, b] - truth_mean
                plug = record[f"{target}_plugin"][:, b] - truth_mean
                row[f"{target}_cover"] = float(np.mean(np.abs(error[given]) <= 1.96 * bar[given])) if given.any() else np.nan
                row[f"{target}_cover_plugin"] = (float(np.mean(np.abs(plug[given]) <= 1.96 * bar[given]))
                                                 if given.any() else np.nan)
                row[f"{target}_ratio"] = float(np.mean(bar[given] / real_sd[given])) if given.any() else np.nan
                sd_p = float(np.mean(real_sd))
                prefix = "" if target == "gain" else "kl_"
                row[f"{target}_bias_bc"] = float(sums[f"{prefix}err_bc"][:, b].sum() / total[b] / sd_p)
                row[f"{target}_bias_plug"] = float(sums[f"{prefix}err_plug"][:, b].sum() / total[b] / sd_p)
                if target == "gain":
                    t_given = np.isfinite(record["t_se"][:, b])
                    row["t_ratio"] = float(np.mean(record["t_se"][t_given, b] / real_sd[t_given])) if t_given.any() else np.nan
                    row["t_share"] = float(t_given.mean())
            row["bias_mc"] = float(np.sqrt(size / total[b]))
            rows.append(row)
    fixed = []
    if name == "identical":
        for size in sizes:
            record = {key: np.concatenate(per_p[size][key]) for key in ("at_kl", "at_kl_se", "se_at_beta")}
            for k, budget in enumerate(BUDGETS):
                value, se = record["at_kl"][:, k], record["at_kl_se"][:, k]
                answered, given = np.isfinite(value), np.isfinite(value) & np.isfinite(se)
                if answered.sum() < 2:
                    continue
                exact = exact_mean_at_kl(*FAMILIES[name], budget)
                spread = float(np.std(value[answered], ddof=1))
                fixed.append({
                    "P": size, "K": float(budget), "exact": exact, "groups": int(answered.sum()),
                    "bar": float(given.sum() / answered.sum()), "error": float(np.mean(value[answered]) - exact) / spread,
                    "cover": float(np.mean(np.abs(value[given] - exact) <= 1.96 * se[given])) if given.any() else np.nan,
                    "ratio": float(np.mean(se[given]) / spread) if given.any() else np.nan,
                    "vs_beta": float(np.nanmean(se[given] / record["se_at_beta"][given, k])) if given.any() else np.nan,
                })
    return {"rows": rows, "fixed": fixed}


def _cell(value: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(value) else f"{value:.{digits}f}"


def markdown(results: dict[str, dict], args: argparse.Namespace, seconds: float, load: str) -> str:
    rows = [row for result in results.values() for row in result["rows"]]
    lines = [
        SECTION, "",
        "Generated by `bench/bench_prompt_mean.py`; rerun it to replace this section.", "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {seconds:.0f} s",
        f"- CPU: {cpu_description()}; Python {platform.python_version()}, numpy {np.__version__}",
        f"- Load average at the end of the run (1/5/15 min): {load} (a shared machine)",
        f"- Setup: {args.prompts:,} simulated prompts per family, N = {N:,} rewards each, betas "
        f"{', '.join(f'{b:g}' for b in BETAS)}; each block of {max(args.size_list):,} prompts cut into groups of "
        f"{', '.join(f'{p:,}' for p in args.size_list)} prompts, each group one run (the tables' gate over its "
        "prompts, then `limits_ray.core.prompt_mean.prompt_means`). Families: identical N(0, 1) prompts; mixed sigma "
        "(a third each of sigma 0.5, 1, 2); 1% heavy (99% sigma 1, 1% sigma 2.5).",
        "- Columns: *bar*: share of groups with an error bar; *cover*: coverage of the exact prompt mean by "
        "`gain ± 1.96 gain_se` (bias-corrected centre) / by the same bar around the plug-in mean; *SE/SD*: error "
        "bar over the real SD of the centre (target 0.8-1.25); *t-scaled*: `sqrt(sum gain_se^2)/P` of the per-prompt "
        "interval SEs over the real SD, where every prompt has one, with the share of groups where they all do "
        "(the former `frontier_mean.gain_se`); *bias*: mean error of the centre in real SDs of the mean, "
        "bias-corrected / plug-in (± the Monte Carlo error in the last column).", "",
        "| family | P | beta | groups | gain: bar | gain: cover / plug-in | gain: SE/SD | t-scaled (share) "
        "| KL: bar | KL: cover / plug-in | KL: SE/SD | gain bias: bc / plug-in | KL bias: bc / plug-in | bias MC ± |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['P']:,} | {row['beta']:g} | {row['groups']} | {_cell(row['gain_bar'])} "
            f"| {_cell(row['gain_cover'])} / {_cell(row['gain_cover_plugin'])} | {_cell(row['gain_ratio'])} "
            f"| {_cell(row['t_ratio'])} ({_cell(row['t_share'])}) | {_cell(row['kl_bar'])} "
            f"| {_cell(row['kl_cover'])} / {_cell(row['kl_cover_plugin'])} | {_cell(row['kl_ratio'])} "
            f"| {row['gain_bias_bc']:+.2f} / {row['gain_bias_plug']:+.2f} | {row['kl_bias_bc']:+.2f} / {row['kl_bias_plug']:+.2f} "
            f"| {row['bias_mc']:.2f} |")
    with_bar = [row for row in rows if row["gain_bar"] >= 0.5]
    ratios = [row[f"{t}_ratio"] for row in with_bar for t in ("gain", "kl") if np.isfinite(row[f"{t}_ratio"])]
    covers = [(row[f"{t}_cover"], row, t) for row in with_bar for t in ("gain", "kl") if np.isfinite(row[f"{t}_cover"])]
    worst = min(covers, key=lambda item: item[0])
    heavy = [row for row in rows if row["family"] == "1% heavy"]
    share = {size: np.mean([row["gain_bar"] >= 0.5 for row in heavy if row["P"] == size]) for size in args.size_list}
    lines += [
        "",
        f"- Where a bar is given in at least half the groups: coverage {min(c for c, _, _ in covers):.3f}-"
        f"{max(c for c, _, _ in covers):.3f} (lowest: {worst[1]['family']}, P = {worst[1]['P']:,}, beta = {worst[1]['beta']:g}, "
        f"{worst[2]}; its binomial SE over {worst[1]['groups']} groups is {np.sqrt(0.95 * 0.05 / max(worst[1]['groups'], 1)):.3f}); "
        f"SE/SD {min(ratios):.2f}-{max(ratios):.2f}.",
        "- 1% heavy, share of the betas with an error bar (in at least half the groups): "
        + ", ".join(f"P = {size:,}: {value:.2f}" for size, value in share.items()) + ".",
    ]
    fixed = results.get("identical", {}).get("fixed", [])
    if fixed:
        lines += [
            "",
            "The frontier at a fixed KL (identical prompts; exact gain sqrt(2K)): the Hermite interpolant of each group's "
            "prompt-mean frontier between the grid betas, its 95% interval from `gain_se_at_kl` widened by the "
            "interpolation error estimate (*bar*: share of groups where the result has one; K = 0.1 lies between "
            "betas 1.5 and 3, a factor 4 in KL, where the interpolation error exceeds 0.75 of the bar).",
            "",
            "| P | KL budget | exact gain | groups | bar | mean error / SD | cover | SE / SD | fixed-KL SE / fixed-beta SE |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in fixed:
            lines.append(f"| {row['P']:,} | {row['K']:g} | {row['exact']:.4f} | {row['groups']} | {row['bar']:.2f} "
                         f"| {row['error']:+.2f} | {_cell(row['cover'], 3)} | {_cell(row['ratio'])} | {_cell(row['vs_beta'])} |")
    plug = [row for row in rows if row["family"] == "identical"]
    lines += [
        "",
        f"Reading: the bar is `sqrt(se^2 + A^2)` where the bias allowance A (unreliable prompts' bounds, the drift's "
        f"excess) is at most {ALLOWANCE_LIMIT:g} of the within-prompt SE, else none (limits_ray/prompt_mean.py). The "
        "plug-in mean's bias grows like sqrt(P) in SDs of the mean (identical prompts: "
        + ", ".join(f"P = {size:,}: {min(row['gain_bias_plug'] for row in plug if row['P'] == size):+.1f} to "
                    f"{max(row['gain_bias_plug'] for row in plug if row['P'] == size):+.1f}" for size in args.size_list)
        + "), so only the bias-corrected centre can carry a bar at 1e4 prompts and more. The t-scaled bar "
        "(the per-prompt interval SEs added up) is 1.2-4 times the real SD and missing wherever one prompt lacks an "
        "interval. A bias is only measured to within its Monte Carlo error (last column); the coverage at 1e5 "
        "prompts rests on the few groups there. Where the betas hold prompts whose weights are near or past the "
        "finite-variance bound (1% heavy at beta <= 1.5; mixed sigma at beta <= 1.5) the mean gets no bar, or keeps "
        "it in the groups where no prompt's own k-hat pulls its pooled k-hat over the limit: those groups' heavy "
        "prompts drew less of their tail, the bar's coverage there is read in the table.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1_000_000, help="prompts simulated per family")
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma list of P (prompts per group)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of families")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating the docs")
    args = parser.parse_args()
    args.size_list = [int(size) for size in args.sizes.split(",")]
    started = time.perf_counter()
    results = {}
    for index, name in enumerate(args.families.split(",")):
        results[name] = run_family(name, args.prompts, args.size_list, args.seed + 10 * index)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    load = load_average()
    text = markdown(results, args, time.perf_counter() - started, load)
    publish(SECTION, text, args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
