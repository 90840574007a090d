"""The distributed job: Ray Data stages around vLLM, streaming statistics to a reducer.

    prompts -> requests (prompt_id, round) -> Generator actors (vLLM, n samples per request)
            -> one scorer actor pool per reward model -> round statistics (+ sample store)
            -> driver-side StatisticsReducer -> frontier, frontier_mean, bon, convergence

A row is one *round*: one request of ``n`` samples of one prompt, seeded by (prompt_id, round).
Rounds stay whole through every stage, so a round is the unit of storage, retry and merging:
no text reaches the reducer, and a round is merged at most once.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa

from limits_ray.config import GenerationConfig, JobConfig, RewardModelConfig
from limits_ray.faults import Quarantine, run_with_quarantine
from limits_ray.io import PromptSamples
from limits_ray.prompts import PromptSet
from limits_ray.reduce import Plan, StatisticsReducer, prompt_statistics
from limits_ray.rounds import per_sample, round_lengths, to_arrow
from limits_ray.store import SampleStore, flatten_rounds

__all__ = [
    "PipelineError", "StageTimes", "Timed", "build_requests", "engine_remote_args", "generation_stage", "root_cause",
    "round_statistics", "run_stages", "scorer_stage",
]

class PipelineError(RuntimeError):
    """A stage failed and the run stopped (``fail_fast``, or an error outside any round)."""


def root_cause(error: BaseException) -> str:
    """The user-code error inside a Ray-wrapped exception, as ``Type: first line``.

    Ray chains its own wrappers (task errors, stream ends, system exceptions) around the error a
    stage raised; the first exception in the chain that is not Ray's own and has a message is it.
    """
    chain, seen = [], set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        chain.append(current)
        for attribute in ("cause", "__cause__", "__context__"):
            inner = getattr(current, attribute, None)
            if isinstance(inner, BaseException):
                pending.append(inner)
    for candidate in chain:
        message = str(candidate).strip()
        if message and not type(candidate).__module__.startswith("ray") and not isinstance(candidate, StopIteration):
            return f"{type(candidate).__name__}: {message.splitlines()[0]}"
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def build_requests(prompts: PromptSet, round_targets: Mapping[str, int], skip: set[tuple[str, int]]) -> list[dict]:
    """One request row per (prompt, round < its target) not in ``skip`` (rounds already merged)."""
    return [
        {"prompt_id": prompt.prompt_id, "prompt": prompt.rendered, "round": round_index}
        for prompt in prompts.prompts
        for round_index in range(round_targets[prompt.prompt_id])
        if (prompt.prompt_id, round_index) not in skip
    ]


class Timed:
    """Wraps a stage class for ``map_batches``: records busy time and quarantines failing rounds.

    Adds the column ``seconds_<name>``: the call's wall time (the conversion to Arrow included)
    divided among the batch's rows, so summing it over the output gives the stage's busy time.
    With ``quarantine_dir`` set and ``fail_fast`` off, a batch that raises is retried round by
    round and rounds that still fail are quarantined (:mod:`limits_ray.faults`) instead of
    failing the run.
    """

    def __init__(
        self, stage: type, name: str, quarantine_dir: str = "", run_id: str = "", fail_fast: bool = True,
        attempts: int = 2, **kwargs: Any,
    ) -> None:
        self.name = name
        self.stage = stage(**kwargs)
        self.quarantine = None if fail_fast or not quarantine_dir else Quarantine(quarantine_dir, run_id)
        self.attempts = attempts

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        """Yield the stage's output for ``batch`` as Arrow (:func:`~limits_ray.rounds.to_arrow`; nothing when
        every round was quarantined), so rounds travel as typed list columns rather than pickled objects."""
        started = time.perf_counter()
        if self.quarantine is None:
            output = self.stage(batch)
        else:
            output = run_with_quarantine(self.stage, batch, self.name, self.quarantine, self.attempts)
        if output is None or len(output["prompt_id"]) == 0:
            return
        table = to_arrow(output)
        seconds = np.full(table.num_rows, (time.perf_counter() - started) / table.num_rows)
        yield table.append_column(f"seconds_{self.name}", pa.array(seconds, pa.float64()))


def round_statistics(
    batch: dict[str, np.ndarray], *, plan: Plan, betas: np.ndarray, rewards: list[str],
    store_root: str, keep_text: bool,
) -> dict[str, np.ndarray]:
    """Scored rounds -> the sample store (if on) and one row of pickled statistics per round.

    Output columns: prompt_id, round, samples, payload (pickled ``{align: DyadicStats}``) and the
    ``seconds_*`` columns of earlier stages summed per round.
    """
    started = time.perf_counter()
    if store_root:
        SampleStore(store_root).write_rounds(flatten_rounds(batch, rewards, keep_text))
    lengths = round_lengths(batch)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    sample_idx = per_sample(batch["sample_idx"])
    reward_values = {name: per_sample(batch[name]) for name in rewards}
    payloads = []
    for row, prompt_id in enumerate(batch["prompt_id"]):
        rows = slice(bounds[row], bounds[row + 1])
        samples = PromptSamples(str(prompt_id), sample_idx[rows], {name: values[rows] for name, values in reward_values.items()})
        payloads.append(pickle.dumps(prompt_statistics(samples, plan, betas)))
    rows = len(payloads)
    output = {
        "prompt_id": np.asarray(batch["prompt_id"]),
        "round": np.asarray(batch["round"]),
        "samples": lengths,
        "payload": np.array(payloads, dtype=object),
    }
    for name in batch:
        if name.startswith("seconds_"):
            output[name] = np.asarray(batch[name])
    output["seconds_statistics"] = np.full(rows, (time.perf_counter() - started) / max(rows, 1))
    return output


def engine_remote_args(generation: GenerationConfig) -> dict[str, Any]:
    """Ray remote arguments for an actor owning one vLLM engine of ``generation.model``.

    Without GPUs the engine runs in the actor's process (the stage sets vLLM's CPU variables). With
    tensor parallelism, the actor takes no GPU itself and a PACK placement group of one
    ``{GPU: 1, CPU: 1}`` bundle per shard is created for vLLM's Ray executor (as ``ray.data.llm``).
    """
    args: dict[str, Any] = {"num_cpus": generation.num_cpus}
    if generation.tensor_parallel_size == 1:
        args["num_gpus"] = generation.num_gpus
        return args
    args["num_gpus"] = 0
    args["ray_remote_args_fn"] = _placement_group_strategy(generation.tensor_parallel_size)
    return args


def _placement_group_strategy(bundles: int):
    def strategy() -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.placement_group([{"GPU": 1, "CPU": 1}] * bundles, strategy="PACK")
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}

    return strategy


@dataclass
class StageTimes:
    """Busy seconds per stage (summed over actors) and wall time of the whole stream."""

    busy: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for name, values in batch.items():
            if name.startswith("seconds_"):
                stage = name.removeprefix("seconds_")
                self.busy[stage] = self.busy.get(stage, 0.0) + float(np.sum(values))


def generation_stage(dataset, generation: GenerationConfig, add_special_tokens: bool, faults: dict[str, Any] | None = None,
                     stage: type | None = None, name: str = "generate"):
    """The actor pool sampling rounds with ``stage``: by default :class:`~limits_ray.generation.Generator`
    (one vLLM engine per actor), or :class:`~limits_ray.generation.SyntheticGenerator` for
    ``generation.kind: synthetic`` (no engine, no GPU: ``num_cpus`` per actor only)."""
    from ray.data import ActorPoolStrategy

    from limits_ray.generation import Generator, SyntheticGenerator

    synthetic = generation.kind == "synthetic"
    return dataset.map_batches(
        Timed,
        fn_constructor_kwargs={
            "stage": stage or (SyntheticGenerator if synthetic else Generator), "name": name, "config": generation,
            "add_special_tokens": add_special_tokens, **(faults or {}),
        },
        compute=ActorPoolStrategy(size=generation.concurrency),
        batch_size=generation.batch_size,
        **({"num_cpus": generation.num_cpus} if synthetic else engine_remote_args(generation)),
    )


def scorer_stage(dataset, reward: RewardModelConfig, samples_per_round: int, faults: dict[str, Any] | None = None):
    """One actor pool scoring whole rounds; ``reward.batch_size`` samples per call, rounded to rounds."""
    from ray.data import ActorPoolStrategy

    from limits_ray.scoring import make_scorer_class

    return dataset.map_batches(
        Timed,
        fn_constructor_kwargs={
            "stage": make_scorer_class(reward), "name": f"score_{reward.name}", "config": reward, **(faults or {}),
        },
        compute=ActorPoolStrategy(size=reward.concurrency),
        batch_size=max(1, reward.batch_size // samples_per_round),
        num_cpus=reward.num_cpus,
        num_gpus=reward.num_gpus,
    )


def run_stages(
    config: JobConfig, plan: Plan, requests: list[dict], reducer: StatisticsReducer, quarantine: Quarantine,
) -> StageTimes:
    """Run generation, scoring and statistics on Ray Data, merging each round into ``reducer``.

    Rounds that keep failing in generation or scoring go to ``quarantine`` unless ``config.fail_fast``.
    """
    import ray

    generation = config.generation
    reward_names = [reward.name for reward in config.rewards]
    times = StageTimes()
    if not requests:
        return times
    faults = {
        "quarantine_dir": str(quarantine.directory), "run_id": quarantine.run_id,
        "fail_fast": config.fail_fast, "attempts": config.attempts,
    }
    started = time.perf_counter()
    dataset = ray.data.from_items(requests, override_num_blocks=max(1, len(requests) // generation.batch_size))
    dataset = generation_stage(dataset, generation, not config.prompts.chat_template, faults)
    for reward in config.rewards:
        dataset = scorer_stage(dataset, reward, generation.n, faults)
    dataset = dataset.map_batches(
        round_statistics,
        fn_kwargs={
            "plan": plan, "betas": np.asarray(config.analysis.betas), "rewards": reward_names,
            "store_root": str(config.store_path) if config.store.enabled else "",
            "keep_text": config.store.keep_text,
        },
        num_cpus=0.25,
    )
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            times.add(batch)
            for prompt_id, round_index, payload in zip(batch["prompt_id"], batch["round"], batch["payload"]):
                reducer.add(str(prompt_id), int(round_index), pickle.loads(payload))
    except Exception as error:  # noqa: BLE001 - Ray wraps user errors; name the root cause instead
        raise PipelineError(
            f"the pipeline stopped: {root_cause(error)} ({len(reducer.rounds)} rounds had finished and are "
            "kept in the sample store; a rerun resumes from there)"
        ) from error
    times.wall = time.perf_counter() - started
    return times
