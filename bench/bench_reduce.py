"""Benchmark of ``limits-ray reduce``'s memory: peak RSS as the number of prompts grows.

Not a test: run it by hand (a few minutes on 2 cores) and it rewrites its own section of
docs/benchmarks.md.

    .venv/bin/python bench/bench_reduce.py                          # 250, 1000, 4000 prompts
    .venv/bin/python bench/bench_reduce.py --prompts 200,400 --no-docs  # a quick look

Input: ``P`` prompts x 256 samples, 2 Gaussian reward columns, rows shuffled, one Parquet file
(row groups of 65,536 rows);
32 betas, each reward aligning and evaluating itself, best-of-n and convergence on (the defaults of
``limits-ray reduce``). Each case runs in a fresh interpreter, pinned to one thread, and reports its
peak resident set (``ru_maxrss``) and wall time:

- *in memory*: ``reduce_samples`` then ``ReduceResult.write``, the reducer before bucketing (it reads
  the whole input and holds every result table);
- *buckets of 1e6 rows*: ``reduce_dataset`` with the default ``--bucket-rows``;
- *buckets of 2^17 rows*: ``reduce_dataset`` with ``--bucket-rows 131072``, so every size is spilled.

A bare interpreter that imports the same modules is measured too: the floor of every case.
"""

from __future__ import annotations

from _report import DOCS, ROOT, cpu_description, pin_threads, update_docs, utc_now

pin_threads()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SECTION = "## Offline reduce memory (bench/bench_reduce.py)"
SAMPLES = 256
BETAS = "0.01:100:32"
SMALL_BUCKET_ROWS = 2**17
ROW_GROUP = 65_536  # rows per Parquet row group of the input: the unit a reader cannot split
CASES = ("import only", "in memory", "buckets of 1e6 rows", "buckets of 2^17 rows")


def write_input(path: Path, prompts: int, seed: int = 0) -> None:
    """``prompts`` x 256 samples, rewards a ~ N(0, 1) and b ~ N(1, 2), rows shuffled."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = prompts * SAMPLES
    order = rng.permutation(rows)
    table = pa.table({
        "prompt_id": pa.array(np.repeat([f"prompt-{p:06d}" for p in range(prompts)], SAMPLES)[order]),
        "sample_idx": pa.array(np.tile(np.arange(SAMPLES), prompts)[order], pa.int64()),
        "a": rng.normal(0.0, 1.0, rows), "b": rng.normal(1.0, 2.0, rows),
    })
    pq.write_table(table, path, row_group_size=ROW_GROUP)


def child(case: str, samples: str, out: str) -> None:
    """Run one case in this (fresh) interpreter; print ``{"rss_mib", "seconds"}`` as JSON."""
    from limits_ray.core.analysis import AnalysisConfig
    from limits_ray.runs.reduce import reduce_dataset, reduce_samples
    from limits_ray.storage.results import write_result

    config = AnalysisConfig(betas=BETAS)
    started = time.perf_counter()
    if case == "in memory":
        write_result(reduce_samples(samples, config), out)
    elif case == "buckets of 1e6 rows":
        reduce_dataset(samples, out, config)
    elif case != "import only":
        reduce_dataset(samples, out, config, bucket_rows=SMALL_BUCKET_ROWS)
    seconds = time.perf_counter() - started
    print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}))


def run_case(case: str, samples: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--child", case, str(samples), str(out)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(prompts: list[int], work: Path) -> dict:
    results: dict = {"import only": run_case("import only", work / "none", work / "none")}
    print(f"import only: {results['import only']['rss_mib']:.0f} MiB", flush=True)
    for count in prompts:
        samples = work / f"samples-{count}.parquet"
        write_input(samples, count)
        for case in CASES[1:]:
            result = run_case(case, samples, work / f"out-{count}-{CASES.index(case)}")
            results[(case, count)] = result
            print(f"{count} prompts, {case}: {result['rss_mib']:.0f} MiB, {result['seconds']:.1f} s", flush=True)
        samples.unlink()
    return results


def section(prompts: list[int], results: dict, seconds: float, load: tuple[float, float, float]) -> str:
    import numpy as np
    import pyarrow as pa

    rows = [f"| {count:,} | {count * SAMPLES:,} | " + " | ".join(
        f"{results[(case, count)]['rss_mib']:.0f} ({results[(case, count)]['seconds']:.1f} s)" for case in CASES[1:]
    ) + " |" for count in prompts]
    first, last = prompts[0], prompts[-1]
    growth = {case: results[(case, last)]["rss_mib"] / results[(case, first)]["rss_mib"] for case in CASES[1:]}
    return "\n".join([
        SECTION, "",
        "Generated by `bench/bench_reduce.py`; rerun it to replace this section.", "",
        f"- Date: {utc_now()} UTC; {seconds:.0f} s",
        f"- CPU: {cpu_description()}; each case in a fresh interpreter, one thread",
        f"- Python {platform.python_version()}, numpy {np.__version__}, pyarrow {pa.__version__}",
        f"- Load average at the end of the run (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(a shared machine: the times are noisy, the memory is not)",
        f"- Input: P prompts x {SAMPLES} samples, 2 reward columns, shuffled rows, one Parquet file "
        f"(row groups of {ROW_GROUP:,} rows); "
        "32 betas; best-of-n and convergence on", "",
        f"Peak RSS in MiB (wall time). An interpreter that only imports the modules peaks at "
        f"{results['import only']['rss_mib']:.0f} MiB.", "",
        "| prompts | rows | " + " | ".join(CASES[1:]) + " |",
        "|---:|---:|" + "---:|" * (len(CASES) - 1),
        *rows, "",
        f"From {first:,} to {last:,} prompts (x{last // first}): in memory x{growth['in memory']:.2f}, "
        f"buckets of 1e6 rows x{growth['buckets of 1e6 rows']:.2f}, "
        f"buckets of 2^17 rows x{growth[CASES[3]]:.2f}"
        + (f" (x{results[(CASES[3], last)]['rss_mib'] / results[(CASES[3], prompts[-2])]['rss_mib']:.2f} from "
           f"{prompts[-2]:,} prompts on, once every size is several buckets)" if len(prompts) > 2 else "")
        + ". The in-memory reducer holds the input and every "
        "result table, so it grows with the file (the issue measured 2.7 GB for 4,000 prompts x 1,024 samples, "
        "64 betas); the bucketed reducer holds one bucket and its result shards at a time, so its peak is set "
        "by `--bucket-rows` (or by the largest `bucket=` directory of a store), not by the input.", "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="250,1000,4000", help="comma list of prompt counts")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    prompts = [int(value) for value in args.prompts.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_reduce_") as work:
        results = measure(prompts, Path(work))
    text = section(prompts, results, time.perf_counter() - started, os.getloadavg())
    print(text)
    if not args.no_docs:
        update_docs(SECTION, text)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
