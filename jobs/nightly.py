"""Nightly incremental recomputation (see limits_ray/runs/nightly.py).

    python jobs/nightly.py --config configs/tiny_nightly.yaml [--date 2026-11-28]
    ray job submit --working-dir . -- python jobs/nightly.py --config configs/pythia_tldr.yaml

Adds ``nightly.rounds_per_night`` new rounds per prompt to the series' sample store, recomputes
every result from the stored statistics, and writes ``<root>/<date>/`` (with ``change/``, the night
against the night before) and ``<root>/latest/``, then rewrites the history page ``<root>/index.html``.
Rerunning a completed date does nothing.
"""

from __future__ import annotations

import argparse
import sys

from limits_ray import ConfigError, JobConfig, load_yaml, route_logs, run_night, today


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job config YAML (its nightly: section)")
    parser.add_argument("--date", default=None, help="the night, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--verbose", action="store_true", help="Ray Data's and vLLM's INFO output on the console, not in <output_dir>/logs")
    args = parser.parse_args(argv)
    try:
        config = load_yaml(JobConfig, args.config)
        route_logs(config.output_dir, verbose=args.verbose)
        night = run_night(config, args.date or today())
    except (ConfigError, ValueError) as error:
        print(f"nightly: error: {error}", file=sys.stderr)
        return 2
    if not night.ran:
        print(f"night {night.date} (series {night.series}) is already complete: nothing to do ({night.results_dir})")
    else:
        print(f"night {night.date} (series {night.series}): {night.rounds_generated} rounds generated, "
              f"{night.samples} samples in all; results in {night.results_dir}"
              + (" and latest/" if night.latest_updated else "") + f"; history page {night.results_dir.parent / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
