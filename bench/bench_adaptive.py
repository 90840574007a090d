"""Benchmark: adaptive sampling (pilot + confirmation) against uniform N, on prompts with known exact values.

Each simulated prompt has Gaussian rewards N(0, sigma_p^2) (sigma_p spread over a range, so
prompts differ in how many samples they need); aligned on itself, its exact gain is
``sigma^2 / beta`` and its exact KL ``sigma^2 / (2 beta^2)`` (limits_ray.core.exact). Statistics are
:class:`limits_ray.core.tilt.TiltStats`, merged wave by wave exactly as the job merges rounds; the
decisions are :func:`limits_ray.core.sampling_plan.plan_wave`'s with :func:`limits_ray.core.reliability.is_reliable`.

Schemes: the pilot alone (the old rule: report the estimates of the samples that decided to stop),
and pilot + confirmation (report the estimates of ``N_x`` fresh samples per prompt, ``N_x`` the
pilot's final count; what :func:`limits_ray.runs.adaptive.run_adaptive` does).

Stopping bias: per beta, the bias of the prompt-mean gain (and KL; the bias-corrected estimates, the
centre of ``frontier_mean``) over R replicates, in units of the reported se of the prompt mean
``sqrt(sum_x se_x^2) / P`` (the delta-method SEs, as :mod:`limits_ray.core.prompt_mean` adds them up; its Monte
Carlo error is ``sd / sqrt(R)`` in the same units); the target is ``|bias| <= 0.25 se``. The pilot stops
on the same delta-method SEs (:func:`limits_ray.core.sampling_plan.prompt_errors`) and the tables' gate
(:func:`limits_ray.core.reliability.gate_cells` over the P prompts) with Kish ESS/N.

Accuracy: over R independent replicates, the RMSE of gain and of KL at each (prompt, beta),
divided by the tolerance; the *worst* of these over prompts, betas and both estimates is the
accuracy of a scheme (1 means every estimate is as accurate as the tolerance asks). Uniform N
is run on a fine grid of N; the N whose worst accuracy matches the adaptive scheme's (log-linear
interpolation) gives the uniform budget for equal accuracy.

    python bench/bench_adaptive.py [--reps 256] [--prompts 16] [--no-write]
"""

from __future__ import annotations

from _report import DOCS, cpu_description, update_docs  # first: puts this checkout on sys.path

# isort: split

import argparse
import datetime as dt
import os
import platform
import sys
import time

import numpy as np

from limits_ray.core.exact import gaussian_gain, gaussian_kl
from limits_ray.core.reliability import MIN_ESS_FRACTION, ROW_FIELDS, gate_cells, is_reliable
from limits_ray.core.sampling_plan import plan_wave
from limits_ray.core.tilt import TiltStats, finalize_many

SECTION = "## Adaptive sampling (bench/bench_adaptive.py)"


def estimates(stats: list[TiltStats]) -> tuple[np.ndarray, ...]:
    """(gain_bc, gain_se, kl_bc, kl_se, reliable), each [P, B], as the job's tables and the pilot read them.

    ``reliable``: the tables' gate over the P prompts at each beta (:func:`limits_ray.core.reliability.gate_cells`)
    and Kish ESS/N (:func:`limits_ray.core.reliability.is_reliable`); ``gain_se``, ``kl_se``: the delta-method
    SEs (:func:`limits_ray.core.prompt_mean.within_prompt_se`).
    """
    final = finalize_many(stats)
    prompts, betas = final.khat.shape
    fields = {name: np.asarray(getattr(final, name)) for name in ROW_FIELDS if name not in ("n", "beta", "same")}
    fields = {name: value[:, :, 0] if value.ndim == 3 else value for name, value in fields.items()}
    for name in ("body_sd", "reward_max"):
        fields[name] = np.broadcast_to(fields[name][:, None], (prompts, betas))
    fields["n"] = np.broadcast_to(final.n[:, None], (prompts, betas))
    fields["beta"] = final.betas
    gated = gate_cells(fields, axis=0).reliable
    reliable = gated & is_reliable(final.ess, fields["n"])
    return final.gain_bc[:, :, 0], final.gain_se_delta[:, :, 0], final.kl_bc, final.kl_se_delta, reliable


def reported(estimate: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """(gain, gain_se, kl, kl_se): the estimates and the SEs the bias is measured in."""
    return estimate[:4]


def draw(rng: np.random.Generator, sigmas: np.ndarray, betas: np.ndarray, samples: np.ndarray) -> list[TiltStats]:
    """Fresh statistics of ``samples[p]`` draws for each prompt."""
    return [TiltStats.from_samples(betas, rng.normal(0, s, (int(n), 1))) for s, n in zip(sigmas, samples)]


def run_pilot(rng: np.random.Generator, sigmas: np.ndarray, betas: np.ndarray, args: argparse.Namespace):
    """One replicate of the pilot: (its final estimates, samples per prompt, waves)."""
    stats = draw(rng, sigmas, betas, np.full(sigmas.size, args.initial))
    samples = np.full(sigmas.size, args.initial)
    waves = 1
    while True:
        current = estimates(stats)
        gain, gain_se, kl, kl_se, reliable, *_ = current
        plan = plan_wave(gain_se, kl_se, samples, args.tol, args.tol, args.max_samples, step=args.step,
                         growth=args.growth, reliable=reliable)
        if plan.finished:
            return current, samples, waves
        for index in np.flatnonzero(plan.targets > samples):
            extra = int(plan.targets[index] - samples[index])
            stats[index] = stats[index].merge(TiltStats.from_samples(betas, rng.normal(0, sigmas[index], (extra, 1))))
        samples = plan.targets.copy()
        waves += 1


def worst(gain_errors: np.ndarray, kl_errors: np.ndarray, tol: float) -> tuple[float, float]:
    """(worst, mean) over (prompt, beta) of RMSE / tol, from [R, P, B] errors."""
    rmse = np.maximum(np.sqrt(np.mean(gain_errors**2, axis=0)), np.sqrt(np.mean(kl_errors**2, axis=0))) / tol
    return float(rmse.max()), float(rmse.mean())


def bias_in_se(values: np.ndarray, errors: np.ndarray, exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per beta: (bias of the prompt mean / its mean reported se, Monte Carlo sd of that ratio).

    ``values``, ``errors``: [R, P, B] estimates and their se; ``exact``: [P, B].
    """
    prompts = values.shape[1]
    mean_error = (values - exact).mean(axis=1)  # [R, B]
    reported = np.nanmean(np.sqrt(np.sum(errors**2, axis=1)) / prompts, axis=0)  # [B]
    return mean_error.mean(axis=0) / reported, mean_error.std(axis=0) / np.sqrt(values.shape[0]) / reported


def prompt_bias_in_se(values: np.ndarray, errors: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per beta: the mean over prompts of each prompt's bias over the replicates / its mean reported se."""
    return ((values - exact).mean(axis=0) / np.nanmean(errors, axis=0)).mean(axis=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=256)
    parser.add_argument("--uniform-reps", type=int, default=64, help="replicates per N of the uniform grid")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tol", type=float, default=0.02, help="tolerance on gain_se and kl_se")
    parser.add_argument("--initial", type=int, default=64, help="samples per prompt of the first wave")
    parser.add_argument("--step", type=int, default=32, help="samples per round")
    parser.add_argument("--growth", type=float, default=4.0)
    parser.add_argument("--max-samples", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    sigmas = np.geomspace(0.1, 1.0, args.prompts)
    betas = np.geomspace(1.0, 10.0, 5)
    exact_gain = np.stack([gaussian_gain(s, betas) for s in sigmas])
    exact_kl = np.stack([gaussian_kl(s, betas) for s in sigmas])
    rng = np.random.default_rng(args.seed)

    pilot, confirmed, used, waves_run = [], [], [], []
    for _ in range(args.reps):
        decided, samples, waves = run_pilot(rng, sigmas, betas, args)
        pilot.append(reported(decided))
        confirmed.append(reported(estimates(draw(rng, sigmas, betas, samples))))
        used.append(samples)
        waves_run.append(waves)
    pilot, confirmed, used = np.array(pilot), np.array(confirmed), np.array(used)  # [R, 4, P, B], [R, P]
    schemes = {}
    for name, result, factor in (("pilot", pilot, 1), ("confirmed", confirmed, 2)):
        gain, gain_se, kl, kl_se = (result[:, i] for i in range(4))
        schemes[name] = {
            "accuracy": worst(gain - exact_gain, kl - exact_kl, args.tol),
            "gain_bias": bias_in_se(gain, gain_se, exact_gain), "kl_bias": bias_in_se(kl, kl_se, exact_kl),
            "gain_prompt_bias": prompt_bias_in_se(gain, gain_se, exact_gain),
            "kl_prompt_bias": prompt_bias_in_se(kl, kl_se, exact_kl),
            "total": factor * float(used.sum(axis=1).mean()),
        }
    per_prompt = used.mean(axis=0)
    target_worst = min(schemes["confirmed"]["accuracy"][0], schemes["pilot"]["accuracy"][0])

    grid = np.unique(np.round(np.geomspace(args.initial, args.max_samples, 31) / args.step).astype(int) * args.step)
    uniform = []
    for n in grid:
        gain_err, kl_err = [], []
        for _ in range(args.uniform_reps):
            gain, _, kl, *_ = estimates(draw(rng, sigmas, betas, np.full(sigmas.size, n)))
            gain_err.append(gain - exact_gain)
            kl_err.append(kl - exact_kl)
        uniform.append((int(n), *worst(np.array(gain_err), np.array(kl_err), args.tol)))
        if uniform[-1][1] < 0.5 * target_worst:
            break
    uniform_n = np.array([row[0] for row in uniform], float)
    uniform_worst = np.array([row[1] for row in uniform])

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

    for scheme in schemes.values():
        scheme["uniform_n"] = equal_n(uniform_worst, scheme["accuracy"][0])
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    shown = np.unique(np.linspace(0, args.prompts - 1, min(8, args.prompts)).round().astype(int))
    pilot_s, confirmed_s = schemes["pilot"], schemes["confirmed"]

    def bias_row(label: str, ratios: tuple[np.ndarray, np.ndarray]) -> str:
        return f"| {label} | " + " | ".join(f"{b:+.3f} ± {e:.3f}" for b, e in zip(*ratios)) + " |"

    passed = all(np.all(np.abs(confirmed_s[key][0]) <= 0.25) for key in ("gain_bias", "kl_bias"))
    lines = [
        SECTION,
        "",
        "Generated by `bench/bench_adaptive.py`; rerun it to replace this section.",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {elapsed:.0f} s; load average "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end (shared machine)",
        f"- Machine: {cpu_description()}; Python {platform.python_version()}, numpy {np.__version__}",
        f"- Setup: {args.prompts} prompts with Gaussian rewards, sigma log-spaced 0.1 to 1.0 (exact gain sigma^2/beta, "
        f"KL sigma^2/(2 beta^2)); betas {', '.join(f'{b:.3g}' for b in betas)}; tolerance {args.tol} on the delta-method "
        f"gain and KL SEs at every beta, and reliable there (the tables' gate over the prompts, and Kish ESS/N >= {MIN_ESS_FRACTION}) to stop; pilot: {args.initial} "
        f"samples per prompt first, rounds of {args.step}, growth <= x{args.growth:g} per wave, cap "
        f"{args.max_samples:,}; {args.reps} replicates ({args.uniform_reps} per N of the uniform grid).",
        "",
        "Stopping bias: bias of the prompt-mean estimate (bias-corrected, as `frontier_mean`) over the replicates, "
        "in units of its reported se (`sqrt(sum_x se_x^2) / P` of the delta-method SEs, `limits_ray/prompt_mean.py`), "
        "± its Monte Carlo error; target |bias| <= 0.25 se at every beta. The pilot stops on the same delta-method "
        "SEs (before issue 17 it stopped on the t-scaled interval SEs and reported the plug-in means).",
        "",
        "| scheme, estimate | " + " | ".join(f"beta {b:.3g}" for b in betas) + " |",
        "|---|" + "---:|" * betas.size,
        bias_row("pilot only (old rule), gain", pilot_s["gain_bias"]),
        bias_row("pilot only (old rule), KL", pilot_s["kl_bias"]),
        bias_row("pilot + confirmation, gain", confirmed_s["gain_bias"]),
        bias_row("pilot + confirmation, KL", confirmed_s["kl_bias"]),
        "",
        "The same per prompt (each prompt's bias / its mean se, averaged over prompts):",
        "",
        "| scheme, estimate | " + " | ".join(f"beta {b:.3g}" for b in betas) + " |",
        "|---|" + "---:|" * betas.size,
        *[f"| {label}, {name} | " + " | ".join(f"{b:+.3f}" for b in scheme[f"{key}_prompt_bias"]) + " |"
          for label, scheme in (("pilot only (old rule)", pilot_s), ("pilot + confirmation", confirmed_s))
          for name, key in (("gain", "gain"), ("KL", "kl"))],
        "",
        f"Pilot + confirmation {'meets' if passed else 'does NOT meet'} the target at every beta. The pilot's own "
        "estimates are biased low: a prompt stops on the wave where its se happens to be small, which for heavy "
        "importance weights is when its tail is unseen and its estimate low. The confirmation sample is drawn after "
        "the decision, so given N_x it is a fixed-N sample; what is left is the ratio estimator's bias at N_x, "
        "O(1/N) against an se of O(1/sqrt(N)), which the bias-corrected centre takes to about -0.01 se per prompt "
        "(the plug-in centre's was about -0.06 se per prompt and -0.2 se for the mean: biases add over prompts "
        "while se's add in quadrature). The confirmation's sizes are fixed before its samples are drawn, so it *is* "
        "the same sample sizes fixed in advance: the confirmation removes the stopping bias. The bias is an "
        "average over the replicates: read it to within about two of its Monte Carlo errors. The pilot stops when "
        "the delta-method SE reaches the tolerance, so the worst RMSE lands near the tolerance (with the t-scaled "
        "interval SEs it stopped later, at about 0.86 of it, and spent about 1.7 times the samples).",
        "",
        "| scheme | samples (all prompts, mean) | worst RMSE / tol | mean RMSE / tol | uniform N per prompt at equal worst | "
        "its total | adaptive / uniform |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, scheme in (("pilot only (old rule)", pilot_s), ("pilot + confirmation (reported)", confirmed_s)):
        uniform_total = scheme["uniform_n"] * args.prompts
        lines.append(
            f"| {label} | {scheme['total']:,.0f} | {scheme['accuracy'][0]:.3f} | {scheme['accuracy'][1]:.3f} | "
            f"{scheme['uniform_n']:,.0f} | {uniform_total:,.0f} | {scheme['total'] / uniform_total:.2f} |"
        )
    lines += [
        "",
        f"Pilot waves: {np.mean(waves_run):.1f} on average. The confirmation doubles the samples of the pilot; at equal "
        f"worst-case accuracy the reported scheme uses {confirmed_s['total'] / (confirmed_s['uniform_n'] * args.prompts):.2f} "
        "of the uniform budget. Uniform spends the N the widest prompt needs on every prompt. The worst RMSE is a "
        f"maximum over {args.prompts * betas.size} cells of RMSEs from {args.reps} replicates (the uniform grid's from "
        f"{args.uniform_reps}), so it is noisy (the uniform grid below is not quite monotone in N): read the savings to "
        "within tens of percent.",
        "",
        "Samples per prompt N_x chosen by the pilot (mean over replicates; the confirmation draws as many again), by sigma:",
        "",
        "| sigma | " + " | ".join(f"{s:.2f}" for s in sigmas[shown]) + " |",
        "|---|" + "---:|" * len(shown),
        "| N_x | " + " | ".join(f"{v:,.0f}" for v in per_prompt[shown]) + " |",
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
