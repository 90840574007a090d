"""Benchmark of the statistics core: update throughput per core and peak memory as N grows.

Not a test: run it by hand (about a minute) and it rewrites its own section of docs/benchmarks.md.

    .venv/bin/python bench/bench_stats.py            # measure, print, update docs/benchmarks.md
    .venv/bin/python bench/bench_stats.py --no-docs  # measure and print only

Throughput. One prompt, ``N`` base samples with 4 reward columns, 64 betas. Each of the 4 columns
aligns in turn with all 4 columns as targets (``Y = 4``, the align column first), as the reducer
does, so one pass costs ``N x 64 x 4`` sample-beta updates. It is timed

- through :meth:`TiltStats.from_samples` (the hot path alone), and
- through :meth:`DyadicStats.update` in streamed chunks (shell split, per-shell states, merges),

beside a numpy roofline measured in the same run: one ``np.exp`` over an array of the same number
of elements, holding the very exponents ``(r - r_max) / beta`` the core exponentiates. The ``exp``
is the one transcendental call per update, so the ratio is the fraction of the time that is not
overhead (target: at least 0.5). The measurements are interleaved and each is the best of
``--repeats`` runs, so that a busy machine slows all of them alike. BLAS and OpenMP are pinned to one
thread before numpy is imported: the numbers are per core.

Memory. Peak traced memory (tracemalloc, which sees numpy's buffers) while one prompt's N samples
arrive in fixed-size chunks, for N = 1e3, 1e4, 1e5: streamed into 4 :class:`DyadicStats` (one per
align column) it must stay flat (only O(log N) shell states are kept), while :func:`best_of_n`
needs every reward of the prompt and grows with N.
"""

from __future__ import annotations

from _report import DOCS, ROOT, cpu_description, cpu_model, load_average, pin_threads, update_docs, utc_now

pin_threads()  # every thread pool to one thread before numpy (or anything importing it) is loaded

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from limits_ray.core.bon import best_of_n  # noqa: E402
from limits_ray.core.dyadic import DyadicStats  # noqa: E402
from limits_ray.core.tilt import TiltStats  # noqa: E402

SECTION = "## Statistics core (bench/bench_stats.py)"
N_BETAS = 64
N_COLUMNS = 4
STREAM_CHUNK = 1000  # samples per arriving batch in the streamed measurements
TARGET_RATIO = 0.5


def make_rewards(n_samples: int, seed: int) -> np.ndarray:
    """``[N, 4]`` correlated rewards with large offsets, as reward models give."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_samples, 1))
    noise = rng.normal(size=(n_samples, N_COLUMNS))
    return 0.7 * base + 0.5 * noise + np.array([3.0, -12.0, 150.0, 0.0])


def align_targets(rewards: np.ndarray, align: int) -> np.ndarray:
    """The targets of one alignment column: itself first, then the other columns."""
    order = [align] + [column for column in range(rewards.shape[1]) if column != align]
    return np.ascontiguousarray(rewards[:, order])


def betas_grid() -> np.ndarray:
    """64 betas over four decades."""
    return np.geomspace(1e-2, 1e2, N_BETAS)


# --------------------------------------------------------------------------------------------------
# Throughput


def throughput(n_samples: int, repeats: int) -> tuple[list[tuple[str, float, float]], float]:
    """Rows ``(name, best seconds, updates per second)`` and the update count of one pass."""
    betas = betas_grid()
    rewards = make_rewards(n_samples, seed=0)
    targets = [align_targets(rewards, align) for align in range(N_COLUMNS)]
    updates = float(n_samples * N_BETAS * N_COLUMNS)

    # The roofline's input: the exponents the core computes, one [N, B] block per align column.
    exponents = np.concatenate(
        [np.multiply.outer(block[:, 0] - block[:, 0].max(), 1.0 / betas).ravel() for block in targets]
    )
    assert exponents.size == updates
    exp_out = np.empty_like(exponents)
    sample_idx = np.arange(n_samples)

    def roofline() -> None:
        np.exp(exponents, out=exp_out)

    def core() -> None:
        for block in targets:
            TiltStats.from_samples(betas, block)

    def streamed() -> None:
        states = [DyadicStats(betas, N_COLUMNS) for _ in range(N_COLUMNS)]
        for start in range(0, n_samples, STREAM_CHUNK):
            stop = min(start + STREAM_CHUNK, n_samples)
            for state, block in zip(states, targets):
                state.update(sample_idx[start:stop], block[start:stop])

    cases = {
        "numpy roofline: np.exp over N x 64 x 4 exponents": roofline,
        "TiltStats.from_samples, 4 align columns": core,
        f"DyadicStats.update in chunks of {STREAM_CHUNK}, 4 align columns": streamed,
    }
    best = {name: np.inf for name in cases}
    for function in cases.values():  # warm-up: page in buffers, load BLAS kernels
        function()
    for _ in range(repeats):
        for name, function in cases.items():
            start = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - start)
    rows = [(name, best[name], updates / best[name]) for name in cases]
    return rows, updates


# --------------------------------------------------------------------------------------------------
# Memory


def _chunks(n_samples: int, seed: int):
    """The prompt's samples as they arrive: ``(sample_idx, rewards)`` batches, generated on the fly."""
    for start in range(0, n_samples, STREAM_CHUNK):
        stop = min(start + STREAM_CHUNK, n_samples)
        yield np.arange(start, stop), make_rewards(stop - start, seed=seed + start)


def _streamed_statistics(n_samples: int) -> float:
    """Stream one prompt into 4 DyadicStats, finalize every prefix; return the KiB the states hold."""
    betas = betas_grid()
    states = [DyadicStats(betas, N_COLUMNS) for _ in range(N_COLUMNS)]
    for sample_idx, rewards in _chunks(n_samples, seed=1):
        for align, state in enumerate(states):
            state.update(sample_idx, align_targets(rewards, align))
    for state in states:
        state.total().finalize()
        for prefix in state.prefixes():
            prefix.finalize()
    return sum(shell.moments.nbytes for state in states for shell in state.shells.values()) / 2**10


def _best_of_n(n_samples: int) -> float:
    held = np.concatenate([rewards for _, rewards in _chunks(n_samples, seed=1)])  # it needs them all
    for align in range(N_COLUMNS):
        best_of_n(held[:, align], held)
    return held.nbytes / 2**10


def peak_memory(function, n_samples: int) -> tuple[float, float, float]:
    """``(peak traced MiB, seconds, the call's result)`` of one call."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    result = function(n_samples)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, seconds, result


def memory_rows(sizes: list[int]) -> list[tuple[int, float, float, float, float, float]]:
    """Rows ``(N, streamed peak MiB, state KiB, streamed s, best-of-n peak MiB, best-of-n s)``."""
    _streamed_statistics(STREAM_CHUNK)  # warm-up outside the trace
    rows = []
    for n_samples in sizes:
        streamed_mib, streamed_s, state_kib = peak_memory(_streamed_statistics, n_samples)
        bon_mib, bon_s, _ = peak_memory(_best_of_n, n_samples)
        rows.append((n_samples, streamed_mib, state_kib, streamed_s, bon_mib, bon_s))
    return rows


# --------------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, str]:
    """CPU model, cores, numpy and BLAS versions."""
    blas = "unknown"
    try:
        config = np.show_config(mode="dicts")
        info = config["Build Dependencies"]["blas"]
        blas = f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {
        "date": f"{utc_now()} UTC",
        "cpu": cpu_model(),
        "cores": cpu_description().split(", ", 1)[-1] + "; benchmark pinned to 1 thread",
        "python": platform.python_version(),
        "numpy": f"{np.__version__} (BLAS: {blas})",
        "load": load_average(),
    }


def render(info: dict[str, str], rows, updates: float, n_samples: int, repeats: int, memory) -> str:
    """The markdown section."""
    roofline = rows[0][2]
    lines = [
        SECTION,
        "",
        "Generated by `bench/bench_stats.py`; rerun it to replace this section.",
        "",
        f"- Date: {info['date']}",
        f"- CPU: {info['cpu']}, {info['cores']}",
        f"- Python {info['python']}, numpy {info['numpy']}",
        f"- Load average at the end of the run (1/5/15 min): {info['load']}",
        "",
        f"### Throughput (one prompt, N = {n_samples:,} samples, 64 betas, 4 reward columns)",
        "",
        f"Each of the 4 columns aligns with all 4 as targets: {updates:,.0f} sample x beta x align-column "
        f"updates per pass; best of {repeats} interleaved repeats, one core.",
        "",
        "| case | best time (s) | updates / s / core | vs roofline |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds, rate in rows:
        lines.append(f"| {name} | {seconds:.3f} | {rate / 1e6:.1f} M | {rate / roofline:.2f} |")
    core_ratio = rows[1][2] / roofline
    verdict = "meets" if core_ratio >= TARGET_RATIO else "misses"
    lines += [
        "",
        f"The hot path runs at {core_ratio:.2f} of the `np.exp` roofline ({verdict} the target of "
        f"{TARGET_RATIO}). The roofline exponentiates the same values (r - r_max)/beta that the core does.",
        "",
        f"### Peak memory of one prompt as N grows (samples arrive in chunks of {STREAM_CHUNK})",
        "",
        "Peak traced memory (tracemalloc, numpy buffers included). Streamed: 4 `DyadicStats` (one per "
        "align column), then every prefix finalized. Best-of-n: `best_of_n` for each align column on all N "
        "rewards, which it must hold.",
        "",
        "| N | streamed DyadicStats peak (MiB) | of which shell states (KiB) | time (s) "
        "| best_of_n peak (MiB) | time (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, streamed_mib, state_kib, streamed_s, bon_mib, bon_s in memory:
        lines.append(
            f"| {n:,} | {streamed_mib:.2f} | {state_kib:.0f} | {streamed_s:.2f} | {bon_mib:.2f} | {bon_s:.2f} |"
        )
    first, last = memory[0], memory[-1]
    lines += [
        "",
        f"From N = {first[0]:,} to {last[0]:,}: the streamed statistics go from {first[1]:.2f} to "
        f"{last[1]:.2f} MiB (x{last[1] / first[1]:.2f}), best-of-n from {first[4]:.2f} to {last[4]:.2f} MiB "
        f"(x{last[4] / first[4]:.1f}). The streamed peak is bounded by the arriving chunk, not by N: "
        "it is the work buffers of `TiltStats.from_samples`, sized by the largest block one shell receives "
        f"(at most {STREAM_CHUNK} rows; at N = {STREAM_CHUNK:,} the one chunk is spread over 11 shells, hence "
        "its smaller peak), plus O(log N) shell states of 3 x 64 x 9 float64 each.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000, help="N of the throughput measurement")
    parser.add_argument("--repeats", type=int, default=7, help="repeats per throughput case (best is kept)")
    parser.add_argument(
        "--memory-sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="N of the memory measurement"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    rows, updates = throughput(args.samples, args.repeats)
    memory = memory_rows(args.memory_sizes)
    info = machine()
    section = render(info, rows, updates, args.samples, args.repeats, memory)
    print(section)
    print(f"(benchmark took {time.perf_counter() - began:.1f} s)")
    if not args.no_docs:
        update_docs(SECTION, section)
        print(f"updated {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
