"""Benchmark: per-prompt coverage of the 95% intervals and the reliability gate, on tuning and held-out families.

Simulated prompts with exact answers (bench/_families.py: every family's gain, KL and Kish ESS/N come
from its cumulant generating function), each an independent data set of N rewards aligned and evaluated
on itself, through the library's estimators (``TiltStats``) and the tables' gate
(:func:`limits_ray.core.reliability.gate_cells`, the prompts of a family's cell judged together). The
families are split into a *tuning* set, on which the gate's rules and constants were chosen, and a
*held-out* set fixed in advance (see bench/_families.py) and reported as it comes out.

Per (family, N, beta), over the prompts: the median k-hat; the mean exact Kish ESS/N; the share of
prompts ``reliable``, and that share among the prompts whose exact ESS/N is at least 0.5 (target: 80% or
more); the coverage of the plain interval ``gain ± 1.96 gain_se_delta`` over all prompts, and of the
reported interval ``gain_bc ± 1.96 gain_se`` over the reliable prompts (the others have none; shown where
at least 30 are reliable; target: 0.90 or more); likewise for the KL; the mean error of the plug-in and
bias-corrected gain over all prompts, in mean delta-method SEs. Best-of-n: per n, the coverage of
``gain ± 1.96 gain_se`` (jackknife) of the exact best-of-n gain over the prompts that have an SE, and
the share that has one (limits_ray.core.bon.jackknife_usable).

    python bench/bench_coverage.py [--reps 3000] [--set tuning|held-out|all] [--no-write]   # full size, 1-2 min
    python bench/bench_coverage.py --reps 400 --no-write                                     # seconds
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
from _families import HELD_OUT, TUNING, Family
from _simulate import concat, gated, prompt_fields

from limits_ray.core.bon import best_of_n, bon_sizes
from limits_ray.core.reliability import POOLED_KHAT_LIMIT

SECTION = "## Coverage and reliability (bench/bench_coverage.py)"
SIZES = (250, 1000, 4000)
"""N of the three families of issue 10's benchmark (the others use their own)."""
RESIZED = ("gaussian", "exponential", "gaussian, mixed sigma")
CHUNK = 1000
BON_FAMILIES = {"tuning": ("gaussian", "exponential", "gaussian + 10% laplace", "three levels, rare top"),
                "held-out": ("ratings 1-10", "bounded beta(2,5)", "rare high mode", "gumbel")}
BON_N = 1000


def simulate(family: Family, n_values: tuple[int, ...], reps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-prompt fields of ``reps`` prompts (kinds and sample counts by the family's pattern), gated by cell."""
    kind = family.kind_of(reps)
    size = np.array([n_values[i % len(n_values)] for i in range(reps)])
    parts, order = [], []
    for n in np.unique(size):
        for index, spec in enumerate(family.kinds):
            chosen = np.flatnonzero((size == n) & (kind == index))
            for start in range(0, chosen.size, CHUNK):
                rows = chosen[start:start + CHUNK]
                parts.append(prompt_fields(spec.draw(rng, rows.size, int(n)), family.betas, drift=False))
                order.append(rows)
    fields = concat(parts)
    back = np.argsort(np.concatenate(order))
    fields = {name: value[back] for name, value in fields.items()}
    cell = np.arange(reps) // family.cell if family.cell else np.zeros(reps, dtype=np.int64)
    out = gated(fields, cell)
    truth = [spec.truth(family.betas) for spec in family.kinds]
    for position, name in enumerate(("gain_true", "kl_true", "ess_true")):
        out[name] = np.stack([truth[k][position] for k in kind])
    out["kind"] = kind
    return out


def cell_rows(set_name: str, name: str, family: Family, n_label: str, fields: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for b, beta in enumerate(family.betas):
        ok = fields["reliable"][:, b]
        high = fields["ess_true"][:, b] >= 0.5
        row = {"set": set_name, "family": name, "n": n_label, "beta": float(beta),
               "khat": float(np.nanmedian(fields["khat"][:, b])), "ess": float(np.mean(fields["ess_true"][:, b])),
               "reliable": float(ok.mean()), "count": int(ok.sum()),
               "reliable_high": float(ok[high].mean()) if high.any() else np.nan, "high": int(high.sum())}
        for target in ("gain", "kl"):
            truth = fields[f"{target}_true"][:, b]
            plug, corrected = fields[target][:, b], fields[f"{target}_bc"][:, b]
            delta, interval = fields[f"{target}_se_delta"][:, b], fields[f"{target}_se"][:, b]
            row[f"{target}_plain"] = float(np.mean(np.abs(plug - truth) <= 1.96 * delta))
            covered = np.abs(corrected - truth) <= 1.96 * interval
            row[f"{target}_cover"] = float(np.mean(covered[ok])) if ok.sum() >= 30 else np.nan
            scale = float(np.mean(delta[np.isfinite(delta)])) if np.isfinite(delta).any() else np.nan
            row[f"{target}_bias"] = float(np.mean(plug - truth) / scale)
            row[f"{target}_bias_bc"] = float(np.mean(corrected - truth) / scale)
        rows.append(row)
    return rows


def bon_rows(set_name: str, name: str, family: Family, reps: int, rng: np.random.Generator) -> list[dict]:
    sizes = bon_sizes(BON_N)
    kind = family.kind_of(reps)
    errors, ses = np.full((reps, sizes.size), np.nan), np.full((reps, sizes.size), np.nan)
    for index, spec in enumerate(family.kinds):
        chosen = np.flatnonzero(kind == index)
        if not chosen.size:
            continue
        exact = spec.best_of_n_gain(sizes)
        rewards = spec.draw(rng, chosen.size, BON_N)
        for row, values in zip(chosen, rewards):
            result = best_of_n(values, values[:, None])
            errors[row], ses[row] = result.gain[:, 0] - exact, result.gain_se[:, 0]
    out = []
    for k, n in enumerate(sizes[1:], start=1):
        given = np.isfinite(ses[:, k])
        out.append({"set": set_name, "family": name, "n_bon": int(n), "share": float(given.mean()),
                    "cover": float(np.mean(np.abs(errors[given, k]) <= 1.96 * ses[given, k])) if given.sum() >= 30 else np.nan})
    return out


def _cell(value: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    """``+0.12``; ``-`` where the truth is infinite (a kind whose tilt does not exist at that beta)."""
    return "-" if not np.isfinite(value) else f"{value:+.2f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| family | N | beta | k-hat | exact ESS/N | reliable | reliable where ESS/N >= 0.5 | gain: plain | gain: reported "
             "| KL: plain | KL: reported | gain bias: plug-in / bc | KL bias: plug-in / bc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['n']} | {row['beta']:g} | {_cell(row['khat'])} | {_cell(row['ess'])} "
            f"| {_cell(row['reliable'])} | {_cell(row['reliable_high'])} | {_cell(row['gain_plain'])} "
            f"| {_cell(row['gain_cover'])} | {_cell(row['kl_plain'])} | {_cell(row['kl_cover'])} "
            f"| {_signed(row['gain_bias'])} / {_signed(row['gain_bias_bc'])} | {_signed(row['kl_bias'])} / {_signed(row['kl_bias_bc'])} |")
    return lines


def summary(rows: list[dict], label: str) -> list[str]:
    def cover(row: dict) -> float:
        return min(row["gain_cover"], row["kl_cover"])

    given = [row for row in rows if np.isfinite(cover(row))]
    short = [row for row in given if cover(row) < 0.90]
    high = [row for row in rows if np.isfinite(row["reliable_high"]) and row["high"] >= 30]
    few = [row for row in high if row["reliable_high"] < 0.80]
    worst = min(given, key=cover) if given else None
    return [
        f"- {label}: {len(given)} of {len(rows)} cells give an interval to at least 30 prompts; lowest coverage "
        + (f"{cover(worst):.3f} ({worst['family']}, N = {worst['n']}, beta = {worst['beta']:g})" if worst else "-")
        + "; below 0.90: " + (", ".join(f"{row['family']} N = {row['n']} beta = {row['beta']:g} ({cover(row):.3f}, "
                                        f"{row['reliable']:.0%} reliable)" for row in short) or "none") + ".",
        f"- {label}: where the exact ESS/N is at least 0.5 ({len(high)} cells), the share reliable is "
        + (f"{min(row['reliable_high'] for row in high):.2f}-{max(row['reliable_high'] for row in high):.2f}" if high else "-")
        + "; below 0.80: " + (", ".join(f"{row['family']} N = {row['n']} beta = {row['beta']:g} ({row['reliable_high']:.2f})"
                                        for row in few) or "none") + ".",
    ]


def bon_table(rows: list[dict]) -> list[str]:
    families = list(dict.fromkeys(row["family"] for row in rows))
    sizes = sorted({row["n_bon"] for row in rows})
    lines = ["| family | " + " | ".join(f"n = {n}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name in families:
        cells = {row["n_bon"]: row for row in rows if row["family"] == name}
        lines.append(f"| {name} | " + " | ".join(
            f"{_cell(cells[n]['cover'])} ({cells[n]['share']:.2f})" if n in cells else "-" for n in sizes) + " |")
    return lines


def markdown(results: dict, args: argparse.Namespace, seconds: float, load: str) -> str:
    lines = [
        SECTION, "",
        "Generated by `bench/bench_coverage.py`; rerun it to replace this section.", "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {seconds:.0f} s",
        f"- CPU: {cpu_description()}; Python {platform.python_version()}, numpy {np.__version__}",
        f"- Load average at the end of the run (1/5/15 min): {load} (a shared machine)",
        f"- Setup: {args.reps} independent prompts per (family, N, beta), each N rewards aligned and evaluated on "
        "itself; the prompts of a family form one cell of the gate (cells of 6 for *cells of 6*); exact values from "
        "each distribution's cumulant generating function (bench/_families.py, which fixes the tuning and held-out "
        f"sets). Gaussian, exponential and mixed sigma at N = {', '.join(f'{n:,}' for n in SIZES)}; the others at "
        "N = 1,000 (mixed N: a third each of 250, 1,000, 4,000 in one cell).",
        "- Columns: *k-hat* median over prompts; *exact ESS/N* the mean exact Kish ESS/N; *reliable* share flagged by "
        "the tables' gate (`limits_ray/core/reliability.py`), and that share among prompts whose exact ESS/N is at "
        "least 0.5 (target 0.80); *plain*: coverage of `gain ± 1.96 gain_se_delta` over all prompts; *reported*: "
        "coverage of `gain_bc ± 1.96 gain_se` over the reliable prompts, where at least 30 are (target 0.90); "
        "*bias*: mean error of `gain` / `gain_bc` over all prompts, in mean delta-method SEs.",
        f"- Binomial SE of a coverage of 0.95 over {args.reps} prompts: {np.sqrt(0.95 * 0.05 / args.reps):.3f} (over "
        f"30: 0.040).",
    ]
    for set_name, title in (("tuning", "Tuning families (the gate's rules and constants were chosen on these)"),
                            ("held-out", "Held-out families (fixed in advance; run once the rules were fixed)")):
        rows = [row for row in results["rows"] if row["set"] == set_name]
        if not rows:
            continue
        lines += ["", f"### {title}", "", *table(rows), "", *summary(rows, set_name)]
    bon = results["bon"]
    if bon:
        lines += ["", f"### Best-of-n (N = {BON_N:,})", "",
                  f"Coverage of `gain ± 1.96 gain_se` of the exact best-of-n gain over the prompts that have an SE "
                  f"(the share that has one in brackets), {args.reps} prompts per family.", ""]
        for set_name in ("tuning", "held-out"):
            rows = [row for row in bon if row["set"] == set_name]
            if rows:
                covers = [row["cover"] for row in rows if np.isfinite(row["cover"])]
                lines += [f"{set_name.capitalize()}:", "", *bon_table(rows), "",
                          f"Lowest coverage where an SE is given: {min(covers):.3f}.", ""]
    lines += [f"Pooled k-hat limit {POOLED_KHAT_LIMIT:g}; rules in limits_ray/core/reliability.py and limits_ray/core/bon.py."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3000, help="prompts per family and N")
    parser.add_argument("--set", default="all", choices=("tuning", "held-out", "all"))
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating the docs")
    args = parser.parse_args()
    started = time.perf_counter()
    sets = {"tuning": TUNING, "held-out": HELD_OUT}
    chosen = [args.set] if args.set != "all" else ["tuning", "held-out"]
    results = {"rows": [], "bon": []}
    rng = np.random.default_rng(args.seed)
    for set_name in chosen:
        for name, family in sets[set_name].items():
            runs = [(n,) for n in SIZES] if name in RESIZED else [family.sizes]
            for n_values in runs:
                fields = simulate(family, n_values, args.reps, rng)
                label = f"{n_values[0]:,}" if len(n_values) == 1 else "/".join(f"{n:,}" for n in n_values)
                results["rows"] += cell_rows(set_name, name, family, label, fields)
                print(f"{set_name} {name} N = {label}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            if name in BON_FAMILIES[set_name]:
                results["bon"] += bon_rows(set_name, name, family, args.reps, rng)
    load = load_average()
    text = markdown(results, args, time.perf_counter() - started, load)
    publish(SECTION, text, args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
