"""Benchmark: adaptive sampling against uniform N, at equal accuracy, on prompts with known exact values.

Each simulated prompt has Gaussian rewards N(0, sigma_p^2) (sigma_p spread over a range, so
prompts differ in how many samples they need); aligned on itself, its exact gain is
``sigma^2 / beta`` and its exact KL ``sigma^2 / (2 beta^2)`` (limits_ray.exact). Statistics are
:class:`limits_ray.stats.TiltStats`, merged wave by wave exactly as the job merges rounds; the
adaptive decisions are :func:`limits_ray.adaptive.plan_wave`'s.

Accuracy: over R independent replicates, the RMSE of gain and of KL at each (prompt, beta),
divided by the tolerance; the *worst* of these over prompts, betas and both estimates is the
accuracy of a scheme (1 means every estimate is as accurate as the tolerance asks). Uniform N
is run on a fine grid of N; the N whose worst accuracy matches the adaptive scheme's (log-linear
interpolation) gives the uniform budget for equal accuracy.

    python bench/bench_adaptive.py [--reps 64] [--prompts 16] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import DOCS, cpu_description, update_docs  # noqa: E402
from limits_ray.adaptive import plan_wave  # noqa: E402
from limits_ray.exact import gaussian_gain, gaussian_kl  # noqa: E402
from limits_ray.stats import TiltStats  # noqa: E402

SECTION = "## Adaptive sampling (bench/bench_adaptive.py)"


def estimates(stats: list[TiltStats]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gain, gain_se, kl, kl_se), each [P, B]."""
    finals = [state.finalize() for state in stats]
    return (np.stack([f.gain[:, 0] for f in finals]), np.stack([f.gain_se[:, 0] for f in finals]),
            np.stack([f.kl for f in finals]), np.stack([f.kl_se for f in finals]))


def run_adaptive(rng: np.random.Generator, sigmas: np.ndarray, betas: np.ndarray, args: argparse.Namespace):
    """One replicate of the adaptive scheme: (gain, kl, samples per prompt, waves)."""
    prompts = sigmas.size
    stats = [TiltStats.from_samples(betas, rng.normal(0, s, (args.initial, 1))) for s in sigmas]
    samples = np.full(prompts, args.initial)
    waves = 1
    while True:
        gain, gain_se, kl, kl_se = estimates(stats)
        plan = plan_wave(gain_se, kl_se, samples, args.tol, args.tol, args.max_samples, step=args.step, growth=args.growth)
        if plan.finished:
            return gain, kl, samples, waves
        for index in np.flatnonzero(plan.targets > samples):
            extra = int(plan.targets[index] - samples[index])
            stats[index] = stats[index].merge(TiltStats.from_samples(betas, rng.normal(0, sigmas[index], (extra, 1))))
        samples = plan.targets.copy()
        waves += 1


def worst(gain_errors: np.ndarray, kl_errors: np.ndarray, tol: float) -> tuple[float, float]:
    """(worst, mean) over (prompt, beta) of RMSE / tol, from [R, P, B] errors."""
    rmse = np.maximum(np.sqrt(np.mean(gain_errors**2, axis=0)), np.sqrt(np.mean(kl_errors**2, axis=0))) / tol
    return float(rmse.max()), float(rmse.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tol", type=float, default=0.02, help="tolerance on gain_se and kl_se")
    parser.add_argument("--initial", type=int, default=64, help="samples per prompt of the first wave")
    parser.add_argument("--step", type=int, default=32, help="samples per round")
    parser.add_argument("--growth", type=float, default=4.0)
    parser.add_argument("--max-samples", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--safety", type=float, default=0.67, help="second adaptive rule: stop at se <= safety x tol")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    sigmas = np.geomspace(0.1, 1.0, args.prompts)
    betas = np.geomspace(1.0, 10.0, 5)
    exact_gain = np.stack([gaussian_gain(s, betas) for s in sigmas])
    exact_kl = np.stack([gaussian_kl(s, betas) for s in sigmas])
    rng = np.random.default_rng(args.seed)

    def adaptive_scheme(stop_tol: float):
        """(worst, mean, mean total samples, mean samples per prompt, mean waves) over the replicates."""
        gain_errors, kl_errors, used, waves_run = [], [], [], []
        run_args = argparse.Namespace(**{**vars(args), "tol": stop_tol})
        for _ in range(args.reps):
            gain, kl, samples, waves = run_adaptive(rng, sigmas, betas, run_args)
            gain_errors.append(gain - exact_gain)
            kl_errors.append(kl - exact_kl)
            used.append(samples)
            waves_run.append(waves)
        used = np.array(used)
        return (*worst(np.array(gain_errors), np.array(kl_errors), args.tol), float(used.sum(axis=1).mean()),
                used.mean(axis=0), float(np.mean(waves_run)))

    adaptive_worst, adaptive_mean, adaptive_total, per_prompt, adaptive_waves = adaptive_scheme(args.tol)
    safe_tol = args.tol * args.safety
    safe_worst, safe_mean, safe_total, safe_per_prompt, safe_waves = adaptive_scheme(safe_tol)

    grid = np.unique(np.round(np.geomspace(args.initial, args.max_samples, 31) / args.step).astype(int) * args.step)
    uniform = []
    for n in grid:
        gain_err, kl_err = [], []
        for _ in range(args.reps):
            gain, _, kl, _ = estimates([TiltStats.from_samples(betas, rng.normal(0, s, (int(n), 1))) for s in sigmas])
            gain_err.append(gain - exact_gain)
            kl_err.append(kl - exact_kl)
        uniform.append((int(n), *worst(np.array(gain_err), np.array(kl_err), args.tol)))
        if uniform[-1][1] < 0.5 * min(adaptive_worst, safe_worst) and uniform[-1][2] < 0.5 * min(adaptive_mean, safe_mean):
            break
    uniform_n = np.array([row[0] for row in uniform], float)
    uniform_worst = np.array([row[1] for row in uniform])
    uniform_mean = np.array([row[2] for row in uniform])

    def equal_n(metric: np.ndarray, target: float) -> float:
        """Smallest N (log-linear interpolation) whose metric is at or below ``target``."""
        below = np.flatnonzero(metric <= target)
        if below.size == 0:
            return float("nan")
        index = int(below[0])
        if index == 0:
            return float(uniform_n[0])
        x0, x1 = np.log(uniform_n[index - 1]), np.log(uniform_n[index])
        y0, y1 = np.log(metric[index - 1]), np.log(metric[index])
        return float(np.exp(x0 + (np.log(target) - y0) * (x1 - x0) / (y1 - y0)))

    n_worst = equal_n(uniform_worst, adaptive_worst)
    n_mean = equal_n(uniform_mean, adaptive_mean)
    n_safe = equal_n(uniform_worst, safe_worst)
    elapsed = time.perf_counter() - started
    shown = np.unique(np.linspace(0, args.prompts - 1, min(8, args.prompts)).round().astype(int))

    lines = [
        SECTION,
        "",
        "Generated by `bench/bench_adaptive.py`; rerun it to replace this section.",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {elapsed:.0f} s",
        f"- Machine: {cpu_description()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}",
        f"- Setup: {args.prompts} prompts with Gaussian rewards, sigma log-spaced 0.1 to 1.0 (exact gain sigma^2/beta, "
        f"KL sigma^2/(2 beta^2)); betas {', '.join(f'{b:.3g}' for b in betas)}; tolerance {args.tol} on gain_se and "
        f"kl_se at every beta; adaptive: {args.initial} samples per prompt first, rounds of {args.step}, growth <= "
        f"x{args.growth:g} per wave; {args.reps} replicates.",
        "- Accuracy: RMSE over replicates at each (prompt, beta) of gain and of KL, divided by the tolerance; "
        "*worst* is its maximum over prompts, betas and both estimates, *mean* its average.",
        "",
        "| scheme | samples (all prompts) | worst RMSE / tol | mean RMSE / tol |",
        "|---|---:|---:|---:|",
        f"| adaptive, stop at se <= tol (mean of {args.reps} runs, {adaptive_waves:.1f} waves) | {adaptive_total:,.0f} | "
        f"{adaptive_worst:.3f} | {adaptive_mean:.3f} |",
        f"| uniform N = {n_worst:,.0f} per prompt (equal worst accuracy) | {n_worst * args.prompts:,.0f} | "
        f"{adaptive_worst:.3f} | - |",
        f"| uniform N = {n_mean:,.0f} per prompt (equal mean accuracy) | {n_mean * args.prompts:,.0f} | - | "
        f"{adaptive_mean:.3f} |",
        f"| adaptive, stop at se <= {args.safety:g} tol ({safe_waves:.1f} waves) | {safe_total:,.0f} | {safe_worst:.3f} | "
        f"{safe_mean:.3f} |",
        f"| uniform N = {n_safe:,.0f} per prompt (equal worst accuracy to the row above) | {n_safe * args.prompts:,.0f} | "
        f"{safe_worst:.3f} | - |",
        "",
        f"At equal worst-case accuracy adaptive sampling uses {adaptive_total / (n_worst * args.prompts):.2f} of the "
        f"uniform budget (saves {1 - adaptive_total / (n_worst * args.prompts):.0%}); at equal mean accuracy "
        f"{adaptive_total / (n_mean * args.prompts):.2f}. Uniform spends the N the widest prompt needs on every "
        "prompt; adaptive stops each prompt when its own standard errors are under tolerance. (The mean favours "
        "uniform: it drives the easy prompts far below the tolerance, which the adaptive rule does not try to do.) "
        f"With a stopping "
        f"tolerance of {args.safety:g} x tol it uses {safe_total / (n_safe * args.prompts):.2f} of the uniform budget "
        "at equal worst accuracy.",
        "",
        "The worst RMSE of the plain rule is above 1: a prompt stops on the wave where its estimated standard "
        "errors happen to be small, and for the widest prompts (sigma/beta near 1, heavy importance weights) a "
        "small estimated se goes with an unseen tail, so the estimate is off by more than the se says (stopping "
        "bias). Set `adaptive.gain_se` and `adaptive.kl_se` below the accuracy you need (the second rule). The worst "
        f"RMSE is a maximum over {args.prompts * betas.size} cells of RMSEs from {args.reps} replicates, so it is noisy "
        "(see the uniform grid below, not quite monotone in N): read the savings to within tens of percent.",
        "",
        "Samples per prompt chosen by the adaptive rules (mean over replicates), by sigma:",
        "",
        "| sigma | " + " | ".join(f"{s:.2f}" for s in sigmas[shown]) + " |",
        "|---|" + "---:|" * len(shown),
        "| se <= tol | " + " | ".join(f"{v:,.0f}" for v in per_prompt[shown]) + " |",
        f"| se <= {args.safety:g} tol | " + " | ".join(f"{v:,.0f}" for v in safe_per_prompt[shown]) + " |",
        "",
        "Uniform N grid (worst and mean RMSE / tol):",
        "",
        "| N per prompt | total | worst | mean |",
        "|---:|---:|---:|---:|",
        *[f"| {n:,} | {n * args.prompts:,} | {w:.3f} | {m:.3f} |" for n, w, m in uniform],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        update_docs(SECTION, text)
        print(f"wrote the section to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
