"""Large-N convergence study (see limits_ray/runs/study.py).

    python jobs/convergence.py --config configs/tiny.yaml --max-n 1024 [--out DIR] [--tolerance 0.05]
    ray job submit --working-dir . -- python jobs/convergence.py --config configs/pythia_tldr.yaml --max-n 65536

Brings every prompt to ``--max-n`` samples in the run's sample store (generating only the missing
rounds), then writes per beta the prompt-mean gain and KL against N with their bands, the N at
which each settles within the tolerance, the ESS per prompt, and the frontier at several N
(``study.md``, ``study_*.png``, ``study_*.parquet``) into ``--out`` (default
``<output_dir>/study-N<max-n>``).
"""

from __future__ import annotations

import argparse
import sys

from limits_ray import ConfigError, JobConfig, load_yaml, route_logs, run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job config YAML")
    parser.add_argument("--max-n", required=True, type=int, help="samples per prompt to reach (rounded up to whole rounds)")
    parser.add_argument("--out", default=None, help="output directory (default <output_dir>/study-N<max-n>)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance for 'settled' (default 0.05)")
    parser.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance added to it (default 1e-3)")
    parser.add_argument("--verbose", action="store_true", help="Ray Data's and vLLM's INFO output on the console, not in <output_dir>/logs")
    args = parser.parse_args(argv)
    if args.max_n < 1:
        print("convergence: error: --max-n must be >= 1", file=sys.stderr)
        return 2
    try:
        config = load_yaml(JobConfig, args.config)
        route_logs(config.output_dir, verbose=args.verbose)
        result = run_study(config, args.max_n, args.out, args.tolerance, args.atol)
    except (ConfigError, ValueError) as error:
        print(f"convergence: error: {error}", file=sys.stderr)
        return 2
    settle = result.settle.to_pydict()
    print(f"{'align':<16} {'beta':>9} {'gain':>10} {'KL':>10} {'settle N':>9} {'settled':>8} {'ESS med':>8} {'ESS min':>8}")
    for row in range(result.settle.num_rows):
        if settle["align"][row] != settle["eval"][row]:
            continue
        print(f"{settle['align'][row]:<16} {settle['beta'][row]:>9.4g} {settle['gain'][row]:>10.4g} {settle['kl'][row]:>10.4g} "
              f"{settle['settle_n'][row]:>9} {'yes' if settle['settled'][row] else 'NO':>8} "
              f"{settle['ess_median'][row]:>8.1f} {settle['ess_min'][row]:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
