"""The ``limits-ray`` command line: one sub-command per task, each a thin shell over a module."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import pyarrow.compute as pc

from limits_ray.config import JobConfig
from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.bracket import Bracket, bracket_at
from limits_ray.core.errors import ConfigError, InputError
from limits_ray.core.frontier import FrontierPoint, point_at_kl
from limits_ray.core.headline import Z95
from limits_ray.core.reliability import TRUSTED_FRACTION
from limits_ray.core.winrate import rank_label, rank_tilt_at_kl, winrate_at_kl
from limits_ray.outputs.numbers import format_number
from limits_ray.pipeline.stages import PipelineError
from limits_ray.runs.reduce import DEFAULT_BUCKET_ROWS

__all__ = ["main"]


def _reduce(args: argparse.Namespace) -> int:
    from limits_ray.runs.reduce import reduce_dataset

    config = AnalysisConfig(
        betas=args.betas,
        rewards=tuple(name for name in (args.rewards or "").split(",") if name),
        align=tuple(args.align or ()),
        evals=tuple(args.eval or ()),
        best_of_n=not args.no_bon,
        convergence=not args.no_convergence,
        winrate=not args.no_winrate,
    )
    started = time.perf_counter()
    result = reduce_dataset(args.samples, args.out, config, use_ray=args.ray, bucket_rows=args.bucket_rows)
    for path in result.paths:
        shards = f" ({len(list(path.glob('*.parquet')))} shard(s))" if path.is_dir() else ""
        print(f"wrote {path}{shards}")
    how = "bucket= director(ies)" if result.partitioned else "bucket(s)"
    how = f"{'spilled into' if result.spilled else 'read as'} {result.buckets} {how}"
    print(f"reduced {result.prompts} prompt(s), {result.rows} sample(s) ({how}"
          f"{', on Ray' if args.ray else ''}) over {len(config.betas)} beta(s) in {time.perf_counter() - started:.1f} s")
    return 0


def _query(args: argparse.Namespace) -> int:
    from limits_ray.storage.location import local_location
    from limits_ray.storage.results import read_result_table

    results = local_location(args.results)
    if args.winrate:
        return _query_winrate(args, results)
    table = read_result_table(results, "frontier_mean", required=True, command="query")
    brackets = read_result_table(results, "bracket")
    pairs = sorted(set(zip(table["align"].to_pylist(), table["eval"].to_pylist())))
    aligns, evals = set(args.align or [a for a, _ in pairs]), set(args.eval or [e for _, e in pairs])
    print(f"{'align':<24} {'eval':<24} {'KL [nats]':>10} {'beta':>10} {'gain [reward]':>14} {'95% interval':>22} "
          f"{'trusted':>8}")
    for align, evaluation in pairs:
        if align in aligns and evaluation in evals:
            for budget in args.kl:
                try:
                    point = point_at_kl(table, budget, align, evaluation)
                except ValueError:
                    bracket = bracket_at(brackets, budget, align, evaluation) if brackets.num_rows else None
                    if bracket is None or budget > max(brackets["kl"].to_pylist()):
                        raise
                    print(f"{align:<24} {evaluation:<24} {format_number(budget, 4):>10} {'-':>10} {'-':>14} {'-':>22} {'NO':>8}")
                    print(_bracket_line(bracket))
                    continue
                print(f"{align:<24} {evaluation:<24} {format_number(point.kl, 4):>10} {format_number(point.beta, 4):>10} "
                      f"{format_number(point.gain, 4):>14} {_interval(point):>22} {'yes' if point.trusted else 'NO':>8}")
                if not point.trusted:
                    bracket = bracket_at(brackets, budget, align, evaluation) if brackets.num_rows else None
                    if bracket is not None:
                        print(_bracket_line(bracket))
                    print(f"limits-ray query: warning: align {align}, eval {evaluation}: {_untrusted(point)}", file=sys.stderr)
    return 0


def _bracket_line(bracket: Bracket) -> str:
    """The certified bracket of an untrusted budget, indented under its row."""
    upper = ("no upper bound (no trusted beta)" if bracket.upper != bracket.upper
             else f"<= {format_number(bracket.upper, 4)} (tangent at the last trusted point, KL {format_number(bracket.anchor_kl, 3)})")
    return (f"    certified bracket at KL {format_number(bracket.kl, 4)}: gain >= {format_number(bracket.lower, 4)} "
            f"({bracket.lower_source}), {upper}")


def _query_winrate(args: argparse.Namespace, results) -> int:
    """``query --winrate``: the prompt-mean win rate over pi0 at each KL budget, and the best any policy reaches."""
    from limits_ray.storage.results import read_result_table

    table = read_result_table(results, "winrate_mean")
    if table.num_rows == 0:
        raise InputError(f"{results.join('winrate_mean.parquet').uri} is missing or empty: win rates come with best-of-n (reduce without --no-bon or "
                         "--no-winrate; in a job analysis.best_of_n and analysis.winrate true)")
    pairs = sorted(set(zip(table["align"].to_pylist(), table["eval"].to_pylist())))
    aligns = set(args.align or [a for a, _ in pairs]) | {rank_label(e) for e in args.eval or []}
    evals = set(args.eval or [e for _, e in pairs])
    print(f"{'align':<24} {'eval':<24} {'KL [nats]':>10} {'beta':>10} {'win rate':>9} {'95% interval':>17} "
          f"{'trusted':>8} {'best (continuous)':>18}")
    for align, evaluation in pairs:
        if (align in aligns or align == rank_label(evaluation)) and evaluation in evals:
            for budget in args.kl:
                point = winrate_at_kl(table, budget, align, evaluation)
                best = rank_tilt_at_kl(budget)[1]
                if point is None:
                    print(f"{align:<24} {evaluation:<24} {format_number(budget, 4):>10} {'-':>10} {'-':>9} {'-':>17} "
                          f"{'-':>8} {format_number(best, 4):>18}")
                    continue
                half = Z95 * point.winrate_se
                interval = (f"{format_number(point.winrate_bc - half, 4)}-{format_number(point.winrate_bc + half, 4)}"
                            if half == half else "-")
                print(f"{align:<24} {evaluation:<24} {format_number(point.kl, 4):>10} {format_number(point.beta, 4):>10} "
                      f"{format_number(point.winrate_bc, 4):>9} {interval:>17} {'yes' if point.trusted else 'NO':>8} "
                      f"{format_number(best, 4):>18}")
    print("win rate: P(a response of the policy beats one of pi0 in eval), ties half; align rank(e): the win-rate-optimal "
          "tilts estimated from the samples; best (continuous): their closed form for a reward without ties")
    return 0


def _interval(point: FrontierPoint) -> str:
    """``[low, high]``: the gain's 95% interval at the fixed KL; ``—`` where the prompt mean has no error bar."""
    if point.gain_se != point.gain_se:
        return format_number(float("nan"))
    half = 1.96 * point.gain_se
    return f"[{format_number(point.gain - half, 4)}, {format_number(point.gain + half, 4)}]"


def _untrusted(point: FrontierPoint) -> str:
    inside = point.trusted_kl is not None and point.trusted_kl[0] <= point.kl <= point.trusted_kl[1]
    if inside:
        return ("the gain has no error bar here: prompts whose importance weights are unreliable could move the "
                "prompt mean by more than its standard error; it is not to be believed: sample more per prompt (N)")
    why = (f"KL {point.kl:.4g} lies outside the trusted KL range [{point.trusted_kl[0]:.4g}, {point.trusted_kl[1]:.4g}]"
           if point.trusted_kl else "no beta of this frontier is trusted")
    return (f"{why} (betas where at least {TRUSTED_FRACTION:.0%} of prompts have reliable importance weights, "
            "k-hat and ESS); the gain there is not to be believed: sample more per prompt (N) or ask for less KL")


def _load_job(args: argparse.Namespace) -> JobConfig:
    """The job config of ``--config``, validated (:mod:`limits_ray.runs.validate`), logs routed (:mod:`limits_ray.pipeline.logs`)."""
    from limits_ray.config import load_yaml
    from limits_ray.pipeline.logs import route_logs
    from limits_ray.runs.validate import validate_job

    config = load_yaml(JobConfig, args.config)
    validate_job(config)
    log_dir = route_logs(config.output_dir, verbose=args.verbose)
    if log_dir is not None:
        print(f"Ray Data and vLLM log to {log_dir} (--verbose: to the console)")
    return config


def _run(args: argparse.Namespace) -> int:
    from limits_ray.runs.job import run_job

    config = _load_job(args)
    if config.adaptive.enabled:
        from limits_ray.runs.adaptive import run_adaptive

        summary = run_adaptive(config, validated=True)
        for index, wave in enumerate(summary["waves"]):
            print(f"pilot wave {index}: {wave['samples']} samples, {wave['done']} of {summary['prompts']} prompts within "
                  f"tolerance and reliable")
        print(f"confirmation: {summary['pilot_samples']} fresh samples; the results are theirs")
        print(f"results, plots, report.json and adaptive.json in {config.output_dir}")
        return 0
    _, report = run_job(config, validated=True)
    for line in report.summary_lines():
        print(line)
    print(f"results, plots and report.json in {config.output_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from limits_ray.outputs.compare_report import compare_lines, proposal_lines
    from limits_ray.runs.compare import CompareOptions, compare

    config = _load_job(args)
    options = CompareOptions(gold=args.gold or "", proxy=args.proxy or "", members=args.members, noise=args.noise, beta=args.beta,
                             proposals=not args.no_proposals)
    result = compare(config, options, validated=True)
    for line in compare_lines(result.policies):
        print(line)
    if result.proposals is not None:
        from limits_ray.storage.location import local_location
        from limits_ray.storage.results import read_result_table

        frontier_mean = read_result_table(local_location(config.output_dir), "frontier_mean", required=True, command="compare")
        for line in proposal_lines(result.proposals[1], frontier_mean):
            print(line)
    for path in result.paths:
        print(f"wrote {path}")
    return 0


def _compare_runs(args: argparse.Namespace) -> int:
    from limits_ray.runs.run_diff import compare_runs

    labels = tuple(args.labels.split(",", 1)) if args.labels else None
    if labels is not None and len(labels) != 2:
        raise InputError(f"--labels {args.labels!r}: give two names, A,B")
    diff = compare_runs(args.a, args.b, args.out, budgets=args.kl, aligns=args.align, evals=args.eval, labels=labels)
    for path in diff.paths:
        print(f"wrote {path}")
    for row in diff.table.filter(pc.equal(diff.table["at"], "kl")).to_pylist():
        centre = row["diff_paired"] if row["basis"] == "paired" else row["diff"]
        print(f"align {row['align']}, eval {row['eval']}, KL {row['kl_a']:g}: B - A = {format_number(centre)} "
              f"[{format_number(row['ci_low'])}, {format_number(row['ci_high'])}] ({row['basis']}): {row['verdict']}"
              + ("" if row["trusted_a"] and row["trusted_b"] else " (outside a trusted KL range)"))
    return 0


def _report(args: argparse.Namespace) -> int:
    from limits_ray.outputs.report import write_report
    from limits_ray.runs.history import is_nightly_root, write_history

    if is_nightly_root(args.results):
        paths = write_history(args.results, args.out, budgets=args.kl, title=args.title)
    else:
        paths = write_report(args.results, args.out, title=args.title, tolerance=args.tolerance)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from limits_ray.outputs.status import format_status, store_status
    from limits_ray.storage.location import open_location

    location = open_location(args.path, endpoint_override=args.endpoint_override, where="status")
    for line in format_status(store_status(location)):
        print(line)
    return 0


def _make_tiny_models(args: argparse.Namespace) -> int:
    from limits_ray.tiny_models import build_tiny_models

    models = build_tiny_models(args.directory, seed=args.seed)
    for name, path in vars(models).items():
        print(f"{name:<12} {path}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="limits-ray", description="KL-reward frontiers of LM alignment.")
    commands = parser.add_subparsers(dest="command", required=True)

    reduce = commands.add_parser("reduce", help="scored samples (Parquet) -> frontier, best-of-n, convergence")
    reduce.add_argument("--samples", required=True, type=Path, help="Parquet file or directory of them")
    reduce.add_argument("--out", required=True, type=Path, help="output directory")
    reduce.add_argument("--rewards", help="comma list of reward columns (default: every float column)")
    reduce.add_argument("--betas", default="0.01:100:41", help="comma list or start:stop:count (log-spaced)")
    reduce.add_argument("--align", action="append", help="alignment reward: COLUMN or mean(a,b,...); repeatable")
    reduce.add_argument("--eval", action="append", help="evaluation reward (default: the align reward); repeatable")
    reduce.add_argument("--no-bon", action="store_true", help="skip best-of-n (it holds each prompt's rewards)")
    reduce.add_argument("--no-convergence", action="store_true", help="skip the convergence table")
    reduce.add_argument("--no-winrate", action="store_true", help="skip the win rates (they cost about 60%% more time "
                        "in the per-prompt pass)")
    reduce.add_argument("--ray", action="store_true",
                        help="reduce the buckets as Ray tasks (RAY_ADDRESS or a local Ray; input and --out on shared storage)")
    reduce.add_argument("--bucket-rows", type=_positive_int, default=DEFAULT_BUCKET_ROWS,
                        help="rows per bucket when the input is not in bucket= directories; peak memory grows with it")
    reduce.set_defaults(handler=_reduce)

    query = commands.add_parser("query", help="the gain reachable at given KL budgets, its 95% interval and the beta for it "
                                "(past the trusted range: the certified bracket; --winrate: win rates)")
    query.add_argument("results", type=Path, help="a directory holding frontier_mean.parquet")
    query.add_argument("--kl", required=True, type=lambda text: [float(v) for v in text.split(",")],
                       help="comma list of KL budgets (nats)")
    query.add_argument("--align", action="append", help="only this alignment reward; repeatable")
    query.add_argument("--eval", action="append", help="only this evaluation reward; repeatable")
    query.add_argument("--winrate", action="store_true",
                       help="the win rate over pi0 at each budget (winrate_mean.parquet) and the best any policy reaches")
    query.set_defaults(handler=_query)

    run = commands.add_parser("run", help="the distributed job: generate, score, reduce (same as jobs/frontier.py)")
    run.add_argument("--config", required=True, type=Path, help="job config YAML (see configs/)")
    run.add_argument("--verbose", action="store_true", help="Ray Data's and vLLM's INFO output on the console, not in <output_dir>/logs")
    run.set_defaults(handler=_run)

    comp = commands.add_parser("compare", help="place config.policies, best-of-n, proxy/gold and ensembles against the frontier "
                               "(samples policies; compare-runs compares two finished results directories)")
    comp.add_argument("--config", required=True, type=Path, help="job config YAML with a policies section")
    comp.add_argument("--gold", help="gold reward (default: the last analysis.evals)")
    comp.add_argument("--proxy", help="proxy reward (default: the first other reward)")
    comp.add_argument("--members", type=int, default=8, help="largest ensemble size M (0: skip the ensemble study)")
    comp.add_argument("--noise", type=float, default=1.0, help="synthetic proxy noise, in gold within-prompt sds")
    comp.add_argument("--beta", type=float, default=0.0, help="beta of the ensemble study (0: where gold KL ~ 1 nat)")
    comp.add_argument("--no-proposals", action="store_true",
                      help="skip the frontier from the policies' samples as proposals (it samples the base model again "
                      "and scores every sample under every policy)")
    comp.add_argument("--verbose", action="store_true", help="Ray Data's and vLLM's INFO output on the console, not in <output_dir>/logs")
    comp.set_defaults(handler=_compare)

    runs = commands.add_parser(
        "compare-runs",
        help="B - A of two results directories' frontiers, paired by prompt, with a verdict per KL budget "
             "(compare places policies against one run's frontier)",
        description="The difference B - A of the frontiers of two results directories (runs, reduces, nightly nights), "
                    "per (align, eval) at KL budgets and at the betas both grids hold: paired over the prompts both "
                    "have (per-prompt differences; paired and unpaired standard errors), with a verdict per KL budget "
                    "(higher / lower / not distinguishable at 95%%). Writes frontier_diff.parquet, frontier_diff.md "
                    "and frontier_diff.png into --out. Runs no model: `limits-ray compare` is the one that samples "
                    "policies and places them against one run's frontier.")
    runs.add_argument("a", help="results directory A (the reference)")
    runs.add_argument("b", help="results directory B (the one compared with A)")
    runs.add_argument("--out", required=True, type=Path, help="where to write frontier_diff.{parquet,md,png}")
    runs.add_argument("--kl", type=lambda text: [float(v) for v in text.split(",")], default=[0.1, 0.5, 1.0, 2.0, 4.0],
                      help="comma list of KL budgets in nats (default 0.1,0.5,1,2,4)")
    runs.add_argument("--align", action="append", help="only this alignment reward; repeatable")
    runs.add_argument("--eval", action="append", help="only this evaluation reward; repeatable")
    runs.add_argument("--labels", help="names of A and B in the text and figure, A,B (default: the directories' names)")
    runs.set_defaults(handler=_compare_runs)

    report = commands.add_parser(
        "report", help="figures (PNG) and a one-page report.md of a results directory; index.html of a nightly root",
        description="For a results directory: frontier.png, convergence.png, frontier_by_n.png, ess.png and report.md. "
                    "For a nightly root (a directory holding ledger.json): the static history page index.html with "
                    "history/gain.png and history/health.png (the latest frontier, the gain at KL budgets night by "
                    "night, samples, trust and faults, a table of the nights with links to their report.md).")
    report.add_argument("results", type=Path, help="a directory holding frontier.parquet, frontier_mean.parquet, ...; "
                                                   "or a nightly root")
    report.add_argument("--out", type=Path, help="where to write (default: the results directory or nightly root)")
    report.add_argument("--title", help="title of the figures (default: the run's name)")
    report.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance for 'settled' (default 0.05)")
    report.add_argument("--kl", type=lambda text: [float(v) for v in text.split(",")], default=[0.1, 0.5, 1.0, 2.0, 4.0],
                        help="nightly root: KL budgets of the history, comma list in nats (default 0.1,0.5,1,2,4)")
    report.set_defaults(handler=_report)

    status = commands.add_parser("status", help="what a sample store holds (also while a job writes to it)")
    status.add_argument("path", help="a store path or URI, a run's output_dir, or a nightly root")
    status.add_argument("--endpoint-override", default="", help="host:port of an S3-compatible server")
    status.set_defaults(handler=_status)

    tiny = commands.add_parser("make-tiny-models", help="build the tiny tokenizer, causal LMs and reward models")
    tiny.add_argument("directory", type=Path, help="where to write them")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_make_tiny_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, with the reason on stderr)."""
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (InputError, ConfigError, ValueError, PipelineError) as error:
        print(f"limits-ray {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
