"""Benchmark: the win rate over pi0 (limits_ray.core.winrate) against exact values.

1. Closed forms on continuous rewards, N = 1e4 samples per prompt (``limits_ray.core.tables.reduce_table``, so
   the rows are the tables'): the rank tilts' win rate and KL against ``W = e^t/(e^t - 1) - 1/t``,
   ``KL = t W - log((e^t - 1)/t)`` (``t = 1/beta``), and best-of-n's against ``n/(n+1)``; the largest error over
   the grid and over several seeds.
2. Coverage of the reported interval ``winrate_bc +- 1.96 winrate_se`` over simulated prompts with exact
   answers, on the coverage benchmark's families (bench/bench_coverage.py: Gaussian N(0, 1), tilted
   ``N(1/beta, 1)``, ``W = Phi(1/(beta sqrt 2))``; exponential Exp(1), tilted Exp(1 - 1/beta),
   ``W = 1/(2 - 1/beta)``; Gaussian with mixed sigma, ``W = Phi(sigma/(beta sqrt 2))``), gated as the tables
   gate (each prompt's own test and the pooled k-hat over the cell's prompts); and on families fixed in
   advance as a hold-out (nothing was chosen on them): discrete scores with ties, a bounded reward, a rare
   high mode and a Gumbel tail, whose exact W comes from the finite sum or quadrature on a fine grid.
   The interval's rules (the df of its t factor, the gate) are the gain's: nothing was tuned for W.

    python bench/bench_winrate.py [--reps 1000] [--sizes 250,1000,4000] [--no-write]
"""

from __future__ import annotations

from _report import cpu_description, load_average, publish, utc_now  # first: puts this checkout on sys.path

# isort: split

import argparse
import platform
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.reliability import passes_gate, pooled_khat_of_cells
from limits_ray.core.tables import reduce_table
from limits_ray.core.tilt import TiltStats, interval_ratio
from limits_ray.core.winrate import bon_winrate, rank_label, rank_tilt_curve, tilted_winrate

SECTION = "## Win rate (bench/bench_winrate.py)"
GAUSSIAN_BETAS = np.array([0.25, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 3.0])
EXPONENTIAL_BETAS = np.array([1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0])
MIXED = (0.5, 1.0, 2.0)


def _grid_truth(density, low: float, high: float):
    """Exact W of the tilts of a continuous reward with ``density`` on [low, high] (trapezoid on 200,001 points)."""
    x = np.linspace(low, high, 200_001)
    f = density(x)
    f /= np.trapezoid(f, x)
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(x))])

    def truth(betas: np.ndarray) -> np.ndarray:
        out = []
        for beta in betas:
            tilted = f * np.exp((x - x.max()) / beta)
            tilted /= np.trapezoid(tilted, x)
            out.append(np.trapezoid(tilted * cdf, x))
        return np.array(out)

    return truth


LEVELS, LEVEL_PROBS = np.arange(5.0), np.array([0.3, 0.3, 0.2, 0.15, 0.05])


def _discrete_truth(betas: np.ndarray) -> np.ndarray:
    mid = np.cumsum(LEVEL_PROBS) - LEVEL_PROBS / 2
    tilted = LEVEL_PROBS[None, :] * np.exp(LEVELS[None, :] / betas[:, None])
    return (tilted / tilted.sum(axis=1, keepdims=True)) @ mid


FAMILIES = {
    # name: (draw N rewards of prompt `rep`, betas, exact W [reps, B], hold-out)
    "gaussian": (lambda rng, n, rep: rng.normal(size=n), GAUSSIAN_BETAS,
                 lambda betas, reps: np.tile(stats.norm.cdf(1 / (betas * np.sqrt(2))), (reps, 1)), False),
    "exponential": (lambda rng, n, rep: rng.exponential(size=n), EXPONENTIAL_BETAS,
                    lambda betas, reps: np.tile(1 / (2 - 1 / betas), (reps, 1)), False),
    "gaussian, mixed sigma": (lambda rng, n, rep: MIXED[rep % 3] * rng.normal(size=n), GAUSSIAN_BETAS,
                              lambda betas, reps: stats.norm.cdf(np.array([MIXED[rep % 3] for rep in range(reps)])[:, None]
                                                                 / (betas[None, :] * np.sqrt(2))), False),
    "discrete, 5 levels with ties": (lambda rng, n, rep: rng.choice(LEVELS, size=n, p=LEVEL_PROBS),
                                     np.array([0.3, 0.5, 1.0, 2.0, 4.0]),
                                     lambda betas, reps: np.tile(_discrete_truth(betas), (reps, 1)), True),
    "bounded, Beta(2, 5)": (lambda rng, n, rep: rng.beta(2, 5, size=n), np.array([0.02, 0.05, 0.1, 0.3, 1.0]),
                            lambda betas, reps: np.tile(_grid_truth(lambda x: stats.beta.pdf(x, 2, 5), 0, 1)(betas),
                                                        (reps, 1)), True),
    "rare high mode, 0.98 N(0,1) + 0.02 N(4, 0.5^2)": (
        lambda rng, n, rep: np.where(rng.random(n) < 0.02, rng.normal(4, 0.5, n), rng.normal(size=n)),
        np.array([0.5, 0.8, 1.2, 2.0, 4.0]),
        lambda betas, reps: np.tile(_grid_truth(lambda x: 0.98 * stats.norm.pdf(x) + 0.02 * stats.norm.pdf(x, 4, 0.5),
                                                -9, 12)(betas), (reps, 1)), True),
    "Gumbel tail": (lambda rng, n, rep: rng.gumbel(size=n), np.array([1.5, 2.0, 3.0, 5.0]),
                    lambda betas, reps: np.tile(_grid_truth(lambda x: stats.gumbel_r.pdf(x), -6, 60)(betas), (reps, 1)),
                    True),
}


def closed_forms(seeds: int, n: int) -> dict:
    """Largest errors of the rank tilts and best-of-n against their closed forms, N = ``n``, over ``seeds`` prompts."""
    rng = np.random.default_rng(7)
    table = pa.table({"prompt_id": np.repeat([f"p{k}" for k in range(seeds)], n), "sample_idx": np.tile(np.arange(n), seeds),
                      "a": rng.normal(size=seeds * n)})
    result = reduce_table(table, ["a"], AnalysisConfig(betas=(1.0,), convergence=False))
    ranked = result.winrate.filter(pc.equal(result.winrate["align"], rank_label("a")))
    betas = ranked["beta"].to_numpy()
    exact_w, exact_kl = rank_tilt_curve(betas)
    error_w, error_kl = np.abs(ranked["winrate"].to_numpy() - exact_w), np.abs(ranked["kl"].to_numpy() - exact_kl)
    wide = betas >= 0.01
    bon = result.bon
    error_bon = np.abs(bon["winrate"].to_numpy() - bon_winrate(bon["n"].to_numpy()))
    return {"n": n, "seeds": seeds, "w": float(error_w[wide].max()), "kl": float(error_kl[wide].max()),
            "w_all": float(error_w.max()), "kl_all": float(error_kl.max()), "kl_max": float(exact_kl[wide].max()),
            "bon": float(error_bon.max()), "bon_n": int(bon["n"].to_numpy().max())}


def simulate(name: str, n: int, reps: int, seed: int) -> list[dict]:
    """Coverage rows of one family and N."""
    draw, betas, truth, _ = FAMILIES[name]
    rng = np.random.default_rng(seed)
    exact = truth(betas, reps)
    fields = ("winrate", "winrate_bc", "se_delta", "se", "khat", "reliable", "body_sd")
    values = {field: np.empty((reps, betas.size)) for field in fields}
    for rep in range(reps):
        rewards = draw(rng, n, rep)
        estimate = TiltStats.from_samples(betas, rewards[:, None]).finalize()
        rates = tilted_winrate(rewards, rewards[:, None], betas)
        values["winrate"][rep], values["winrate_bc"][rep] = rates.winrate[:, 0], rates.winrate_bc[:, 0]
        values["se_delta"][rep] = rates.se_delta[:, 0]
        values["se"][rep] = (rates.se_delta * interval_ratio(rates.if2, rates.if4, estimate.reliable[:, None]))[:, 0]
        values["khat"][rep], values["reliable"][rep], values["body_sd"][rep] = estimate.khat, estimate.reliable, estimate.body_sd
    gated = passes_gate(values["reliable"].astype(bool),
                        pooled_khat_of_cells(values["khat"], np.full(values["khat"].shape, n), values["body_sd"] / betas))
    rows = []
    for b, beta in enumerate(betas):
        ok = gated[:, b]
        covered = np.abs(values["winrate_bc"][:, b] - exact[:, b]) <= 1.96 * values["se"][:, b]
        plain = np.abs(values["winrate"][:, b] - exact[:, b]) <= 1.96 * values["se_delta"][:, b]
        rows.append({
            "family": name, "n": n, "beta": float(beta), "exact": float(np.mean(exact[:, b])), "reliable": float(ok.mean()),
            "count": int(ok.sum()), "cover": float(covered[ok].mean()) if ok.any() else np.nan, "plain": float(plain.mean()),
            "bias": float(np.mean(values["winrate"][:, b] - exact[:, b]) / np.mean(values["se_delta"][:, b])),
            "bias_bc": float(np.mean(values["winrate_bc"][:, b] - exact[:, b]) / np.mean(values["se_delta"][:, b])),
        })
    return rows


def _cell(value: float, digits: int = 3) -> str:
    return "-" if not np.isfinite(value) else f"{value:.{digits}f}"


def markdown(forms: dict, rows: list[dict], args: argparse.Namespace, seconds: float, load: str) -> str:
    lines = [
        SECTION, "",
        "Generated by `bench/bench_winrate.py`; rerun it to replace this section.", "",
        f"- Date: {utc_now()} UTC; {seconds:.0f} s",
        f"- CPU: {cpu_description()}; Python {platform.python_version()}, numpy {np.__version__}",
        f"- Load average at the end of the run (1/5/15 min): {load}", "",
        "### Closed forms on continuous rewards", "",
        f"{forms['seeds']} prompts of N = {forms['n']:,} Gaussian rewards through `reduce_table` (the tables' rows): largest "
        "absolute error over the rank tilts' grid (beta from 1e-3 to 10) and over best-of-n (n = 1 to "
        f"{forms['bon_n']:,}), over the prompts.", "",
        "| quantity | largest error, beta >= 0.01 (KL up to "
        f"{forms['kl_max']:.2f} nats) | largest error, whole grid |",
        "|---|---:|---:|",
        f"| rank tilt: W against e^t/(e^t - 1) - 1/t | {forms['w']:.1e} | {forms['w_all']:.1e} |",
        f"| rank tilt: KL against t W - log((e^t - 1)/t) | {forms['kl']:.1e} | {forms['kl_all']:.1e} |",
        f"| best-of-n: W against n/(n+1) | {forms['bon']:.1e} | {forms['bon']:.1e} |", "",
        "Target: 1e-3 at N = 1e4. The rank tilts' rows differ from the closed form by O(1/N) (they tilt the empirical "
        "mid-CDF and evaluate leave-one-out ranks); at beta = 1e-3 the tilt rests on the top few samples.", "",
        "### Coverage of the win rate's 95% interval", "",
        f"{args.reps} independent prompts per (family, N, beta), each N rewards aligned and evaluated on itself. "
        "*reliable*: the fraction flagged by the tables' rule (own test and pooled k-hat over the cell's prompts); "
        "*reported*: coverage of `winrate_bc ± 1.96 winrate_se` over the reliable prompts; *plain*: of "
        "`winrate ± 1.96 se` (delta method) over all prompts; *bias*: mean error of `winrate` / `winrate_bc` in units of "
        "the mean delta-method SE.", "",
        "| family | hold-out | N | beta | exact W | reliable | reported | plain | bias: plug-in / bc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['family']} | {'yes' if FAMILIES[row['family']][3] else 'no'} | {row['n']:,} | {row['beta']:g} "
                     f"| {row['exact']:.4f} | {_cell(row['reliable'], 2)} | {_cell(row['cover'])} | {_cell(row['plain'])} "
                     f"| {row['bias']:+.2f} / {row['bias_bc']:+.2f} |")
    counted = [row for row in rows if row["count"] >= 30]
    design = [row for row in counted if not FAMILIES[row["family"]][3]]
    held = [row for row in counted if FAMILIES[row["family"]][3]]
    low_design = min(design, key=lambda row: row["cover"])
    low_held = min(held, key=lambda row: row["cover"]) if held else None
    short = [row for row in counted if row["cover"] < 0.90]
    lines += [
        "", f"Binomial standard error of a coverage of 0.95 over {args.reps} prompts: {np.sqrt(0.95 * 0.05 / args.reps):.3f}.", "",
        f"- The coverage benchmark's families, every cell with at least 30 reliable prompts ({len(design)} cells): lowest "
        f"reported coverage {low_design['cover']:.3f} ({low_design['family']}, N = {low_design['n']:,}, beta = "
        f"{low_design['beta']:g}); target 0.90.",
        (f"- Hold-out families ({len(held)} cells with at least 30 reliable prompts): lowest {low_held['cover']:.3f} "
         f"({low_held['family']}, N = {low_held['n']:,}, beta = {low_held['beta']:g})." if low_held else "- Hold-out: no cell "
         "with 30 reliable prompts."),
        "- Cells with at least 30 reliable prompts below 0.90: "
        + (", ".join(f"{row['family']} N = {row['n']:,} beta = {row['beta']:g} ({row['cover']:.3f}, {row['reliable']:.0%} "
                     "reliable)" for row in short) or "none") + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="prompts per (family, N, beta)")
    parser.add_argument("--sizes", default="250,1000,4000", help="comma list of N")
    parser.add_argument("--seed", type=int, default=2027)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating the docs")
    args = parser.parse_args()
    started = time.perf_counter()
    forms = closed_forms(seeds=8, n=10_000)
    print(f"closed forms: {forms}", file=sys.stderr)
    rows = []
    for index, name in enumerate(FAMILIES):
        for size_index, n in enumerate(int(size) for size in args.sizes.split(",")):
            rows += simulate(name, n, args.reps, args.seed + 100 * index + size_index)
            print(f"{name} N = {n}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    text = markdown(forms, rows, args, time.perf_counter() - started, load_average())
    publish(SECTION, text, args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
