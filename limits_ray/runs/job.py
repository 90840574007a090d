"""One run end to end: config -> prompts -> Ray Data stages -> results, plots and a run report.

The shell around :mod:`limits_ray.pipeline.stages` and :mod:`limits_ray.pipeline.bucket_tasks`: it checks inputs and
storage before any actor starts, writes the run's prompts by bucket, lets per-bucket tasks decide
what is still to generate (rounds already stored are merged, not generated, so a stopped run
resumes where it stopped), streams the missing rounds through the stages into the store, lets
per-bucket tasks write the per-prompt tables, and writes ``frontier_mean``, the plots and
``report.json``. The driver holds the prompt list while it writes it, and otherwise only counts
and per-beta sums: nothing on it grows with samples.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import uuid
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.config import JobConfig
from limits_ray.core.bracket import bon_means, bracket_table
from limits_ray.core.frontier import mean_from_sums
from limits_ray.core.reliability import POOLED_TABLES, merge_khat_sums
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tables import ReduceResult
from limits_ray.core.winrate import winrate_mean
from limits_ray.pipeline.bucket_tasks import (
    PROMPTS_SCHEMA,
    BucketContext,
    BucketSummary,
    bucket_round_counts,
    finalize_bucket,
    gate_bucket,
    prepare_bucket,
)
from limits_ray.pipeline.cluster import alive_nodes, init_ray, lost_nodes, map_tasks
from limits_ray.pipeline.faults import Quarantine, is_cluster_fault
from limits_ray.pipeline.prompts import load_prompt_set
from limits_ray.pipeline.stages import PipelineError, run_stages
from limits_ray.runs.identity import analysis_key, setup_identity, versions
from limits_ray.runs.validate import validate_job
from limits_ray.storage.buckets import bucket_name, bucket_of
from limits_ray.storage.location import Location, open_location
from limits_ray.storage.results import StoredResult
from limits_ray.storage.sample_store import SampleStore, auto_buckets

__all__ = ["RunReport", "run_job", "stored_round_counts"]


@dataclasses.dataclass
class RunReport:
    """What a run did: counts, skipped prompts, per-stage busy time and throughput, versions."""

    name: str
    prompts: int
    skipped_prompts: list[dict[str, Any]]
    duplicate_prompts: dict[str, int]
    rounds_generated: int
    rounds_from_store: int
    samples_generated: int
    samples: int
    quarantined: list[dict[str, Any]]
    corrupt_store_files: list[str]
    wall_seconds: float
    stage_seconds: dict[str, float]
    versions: dict[str, str]
    config: dict[str, Any]

    def summary_lines(self) -> list[str]:
        """One line per stage, then totals."""
        lines = []
        for stage, seconds in self.stage_seconds.items():
            rate = self.samples_generated / seconds if seconds > 0 else float("nan")
            lines.append(f"stage {stage:<24} busy {seconds:8.1f} s   {rate:10.1f} samples/s")
        for record in self.quarantined:
            lines.append(f"quarantined prompt {record['prompt_id']} round {record['round']} in {record['stage']}: {record['error']}")
        for path in self.corrupt_store_files:
            lines.append(f"set aside unreadable store file {path}; its rounds were generated again")
        lines.append(
            f"run {self.name}: {self.prompts} prompts ({len(self.skipped_prompts)} skipped, "
            f"{sum(self.duplicate_prompts.values())} repeated rows dropped, "
            f"{len({record['prompt_id'] for record in self.quarantined})} quarantined), "
            f"{self.rounds_generated} rounds generated, {self.rounds_from_store} from the store, "
            f"{self.samples} samples, {self.wall_seconds:.1f} s"
        )
        return lines


def _write_prompts(work: Location, prompt_set: Any, targets: Mapping[str, int], starts: Mapping[str, int],
                   buckets: int) -> list[int]:
    """This run's prompts (with their first and end rounds) as one table per bucket under ``work/prompts``;
    returns the buckets used."""
    prompts = prompt_set.prompts
    owners = bucket_of([prompt.prompt_id for prompt in prompts], buckets)
    order = np.argsort(owners, kind="stable")
    used, first_rows = np.unique(owners[order], return_index=True)
    for bucket, rows in zip(used, np.split(order, first_rows[1:])):
        chosen = [prompts[row] for row in rows]
        work.join("prompts", f"{bucket_name(int(bucket))}.parquet").write_table(pa.table({
            "prompt_id": [prompt.prompt_id for prompt in chosen], "prompt": [prompt.rendered for prompt in chosen],
            "prompt_text": [prompt.text for prompt in chosen],
            "start": [int(starts.get(prompt.prompt_id, 0)) for prompt in chosen],
            "target": [int(targets[prompt.prompt_id]) for prompt in chosen],
        }, schema=PROMPTS_SCHEMA))
    return [int(bucket) for bucket in used]


def _plot_sample(summaries: list[BucketSummary], frontier_mean: pa.Table, limit: int = 200,
                 means: dict[str, pa.Table] | None = None) -> ReduceResult:
    """A bounded result for the figures: every prompt's mean (and ``means``: winrate_mean, bracket), and the
    rows of at most ``limit`` prompts."""
    tables = {}
    for name in ("frontier", "bon", "convergence", "winrate"):
        parts = [summary.plot_rows[name] for summary in summaries if summary.plot_rows[name].num_rows]
        table = pa.concat_tables(parts) if parts else SCHEMAS[name].empty_table()
        keep = sorted(set(table["prompt_id"].to_pylist()))[:limit]
        tables[name] = table.filter(pc.is_in(table["prompt_id"], pa.array(keep, pa.string())))
    return ReduceResult(tables["frontier"], frontier_mean, tables["bon"], tables["convergence"], tables["winrate"],
                        **(means or {}))


def _open_locations(config: JobConfig) -> tuple[Location, Location]:
    """The output and store locations (probed with a write by :func:`limits_ray.runs.validate.validate_job`)."""
    storage = config.storage
    output = open_location(config.output_dir, storage.endpoint_override, storage.region, where="output_dir")
    if not config.store.enabled:
        return output, output.join(".work", "store")
    return output, open_location(config.store_uri, storage.endpoint_override, storage.region, where="store.path")


def _clear_tables(output: Location) -> None:
    """Remove the per-prompt tables of an earlier run in ``output`` (they are rewritten whole)."""
    for name in ("frontier", "bon", "convergence", "winrate"):
        location = output.join(f"{name}.parquet")
        if location.is_file():
            location.delete()
        else:
            location.delete_tree()


@dataclasses.dataclass
class StreamedRounds:
    """What streaming a run's missing rounds did (over every attempt)."""

    generated: int
    from_store: int
    corrupt: list[str]
    prepare_seconds: float
    busy: dict[str, float]


def _stream_missing_rounds(config: JobConfig, context: BucketContext, buckets: list[int],
                           quarantine: Quarantine) -> StreamedRounds:
    """Plan each bucket's missing rounds and stream them through the stages into the store.

    When a node is lost under the stages and Ray reports it as their error, start again from the store
    (up to ``config.cluster_retries`` times), leaving out the rounds this run quarantined.
    """
    work = context.work
    first_stored, corrupt, prepare_seconds = None, [], 0.0
    for retry in range(config.cluster_retries + 1):
        work.join("todo").delete_tree()  # a retry's todo: what the store still lacks
        skip = frozenset((record.prompt_id, record.round) for record in quarantine.records()) if retry else frozenset()
        prepared = map_tasks(prepare_bucket, [(bucket,) for bucket in buckets], shared=(context, skip), retries=3)
        todo = sum(int(counts["todo"]) for counts in prepared)
        requests = _read_todo(work) if todo else None
        stored = sum(int(counts["stored"]) for counts in prepared)
        first_stored = stored if first_stored is None else first_stored
        corrupt += [path for counts in prepared for path in counts["corrupt"]]
        prepare_seconds += sum(float(counts["seconds"]) for counts in prepared)
        alive = alive_nodes()
        try:
            times = run_stages(config, requests, todo, context, quarantine, stored_rounds=stored)
            break
        except PipelineError as error:
            if retry == config.cluster_retries or not is_cluster_fault(error) or not (lost := lost_nodes(alive)):
                raise
            print(f"limits-ray: {len(lost)} node(s) lost under the stages ({error}); resuming from the sample "
                  f"store (cluster retry {retry + 1} of {config.cluster_retries})", file=sys.stderr, flush=True)
    # earlier attempts' rounds were in the store when the last one began
    return StreamedRounds(times.rounds + stored - first_stored, first_stored, corrupt, prepare_seconds, times.busy)


def _run(config: JobConfig, context: BucketContext, prompt_set: Any, targets: dict[str, int], starts: dict[str, int],
         output: Location, run_id: str, started: float, figures: bool) -> tuple[pa.Table, RunReport]:
    """The run after its checks: plan buckets, stream the missing rounds, finalize buckets, write the results."""
    store, work = context.store, context.work
    buckets = _write_prompts(work, prompt_set, targets, starts, store.buckets)
    quarantine = Quarantine(store.quarantine, run_id)
    init_ray(config.ray_address)
    streamed = _stream_missing_rounds(config, context, buckets, quarantine)
    quarantined = quarantine.records()
    _clear_tables(output)
    summaries = map_tasks(finalize_bucket, [(bucket,) for bucket in buckets], retries=3, shared=(
        context, output, {record.prompt_id for record in quarantined}, config.analysis.best_of_n, config.analysis.convergence,
        config.analysis.winrate))
    if not sum(summary.prompts for summary in summaries):
        reasons = "; ".join(map(str, quarantined[:3]))
        raise PipelineError(f"no prompt finished: every prompt was quarantined ({reasons})")
    pooled = {name: merge_khat_sums([summary.khat_sums[name] for summary in summaries], name) for name in POOLED_TABLES}
    summaries = map_tasks(gate_bucket, [(summary,) for summary in summaries], shared=(context, output, pooled), retries=3)
    frontier_mean = mean_from_sums([summary.sums for summary in summaries])
    output.join("frontier_mean.parquet").write_table(frontier_mean)
    means = {"winrate_mean": winrate_mean([summary.winrate_sums for summary in summaries]),
             "bracket": bracket_table(frontier_mean, bon_means([summary.bon_sums for summary in summaries]))}
    for name, table in means.items():
        output.join(f"{name}.parquet").write_table(table)
    report = RunReport(
        name=config.name,
        prompts=len(prompt_set.prompts),
        skipped_prompts=[dataclasses.asdict(skipped) for skipped in prompt_set.skipped],
        duplicate_prompts=dict(prompt_set.duplicates),
        rounds_generated=streamed.generated,
        rounds_from_store=streamed.from_store,
        samples_generated=streamed.generated * config.generation.n,
        samples=sum(summary.samples for summary in summaries),
        quarantined=[dataclasses.asdict(record) for record in quarantined],
        corrupt_store_files=streamed.corrupt + [path for summary in summaries for path in summary.corrupt],
        wall_seconds=time.perf_counter() - started,
        stage_seconds={**streamed.busy, "statistics": streamed.prepare_seconds + sum(summary.seconds for summary in summaries)},
        versions=versions(),
        config=dataclasses.asdict(config),
    )
    if figures:
        _write_figures(_plot_sample(summaries, frontier_mean, means=means), output, config.name)
    output.join("report.json").write_json(dataclasses.asdict(report))
    return frontier_mean, report


def run_job(config: JobConfig, round_targets: Mapping[str, int] | None = None,
            round_starts: Mapping[str, int] | None = None, *, validated: bool = False,
            figures: bool = True) -> tuple[StoredResult, RunReport]:
    """Run the whole job and write ``output_dir``; returns the results and the report.

    Each prompt gets rounds ``start .. target - 1`` (``generation.rounds`` unless ``round_targets``
    names its prompt_id; start 0 unless ``round_starts`` does); rounds already in the sample store
    are merged from there, not generated.

    Every value of ``config`` is checked first (:func:`limits_ray.runs.validate.validate_job`, which
    also probes the output and the store with a write), unless the caller has just done so
    (``validated``). With ``figures`` off, no PNG is drawn (the nightly report draws them).
    """
    started = time.perf_counter()
    if not validated:
        validate_job(config)
    output, store_root = _open_locations(config)
    prompt_set = load_prompt_set(config)
    targets = {prompt.prompt_id: config.generation.rounds for prompt in prompt_set.prompts}
    targets.update({key: value for key, value in (round_targets or {}).items() if key in targets})
    starts = {key: int(value) for key, value in (round_starts or {}).items() if key in targets}
    reward_names = [reward.name for reward in config.rewards]
    plan = config.analysis.plan(reward_names)
    betas = np.asarray(config.analysis.betas)

    planned = sum(targets.values()) * config.generation.n
    store = SampleStore(store_root, config.store.buckets or auto_buckets(planned, len(targets)))
    store.check_manifest(setup_identity(config))
    run_id = uuid.uuid4().hex[:16]
    work = store_root.join(".runs", run_id)
    context = BucketContext(store, analysis_key(plan, betas), plan, betas, reward_names, work)
    try:
        frontier_mean, report = _run(config, context, prompt_set, targets, starts, output, run_id, started, figures)
    finally:
        work.delete_tree()
        if not config.store.enabled:
            store_root.delete_tree()
    return StoredResult(output, frontier_mean), report


def stored_round_counts(config: JobConfig) -> dict[str, int]:
    """Per prompt in the config's store: its stored rounds (largest round + 1), from the merged statistics.

    Compacts every bucket first (Ray tasks), so rounds of an interrupted run count too.
    """
    _, store_root = _open_locations(config)
    store = SampleStore(store_root, config.store.buckets or 1)
    if not store.manifest.is_file():
        return {}
    store.check_manifest(setup_identity(config))
    reward_names = [reward.name for reward in config.rewards]
    plan = config.analysis.plan(reward_names)
    betas = np.asarray(config.analysis.betas)
    context = BucketContext(store, analysis_key(plan, betas), plan, betas, reward_names, store_root.join(".runs", "counts"))
    buckets = [int(location.name.removeprefix("bucket=")) for location in store.samples.subdirectories()]
    if not buckets:
        return {}
    init_ray(config.ray_address)
    counts: dict[str, int] = {}
    for bucket_counts in map_tasks(bucket_round_counts, [(bucket,) for bucket in buckets], shared=(context,), retries=3):
        counts.update(bucket_counts)
    return counts


def _write_figures(result: ReduceResult, output: Location, title: str) -> None:
    """The figures into ``output`` (drawn in a temporary directory first when it is an object store)."""
    from limits_ray.outputs.figures import write_plots

    if output.local:
        write_plots(result, output.local_path, title=title)
        return
    with tempfile.TemporaryDirectory() as scratch:
        for path in write_plots(result, scratch, title=title):
            output.join(path.name).write_bytes(path.read_bytes())


def _read_todo(work: Location):
    """The todo rounds as a Ray dataset of Arrow blocks, one per bucket: each table is read and put in
    the object store in turn (the driver holds one bucket's todo table at a time). No read task is
    involved: Ray Data's read API lists files in a task of one full CPU, which on a small cluster can
    wait forever behind the engine actors."""
    import ray

    refs = [ray.put(location.read_table()) for location in work.join("todo").files(suffix=".parquet")]
    return ray.data.from_arrow_refs(refs)
