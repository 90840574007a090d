"""The distributed job: Ray Data stages around vLLM, streaming statistics to a reducer.

    prompts -> requests (prompt_id, round) -> Generator actors (vLLM, n samples per request)
            -> one scorer actor pool per reward model -> the sample store (one part per bucket and batch)
            -> per-bucket tasks (limits_ray.pipeline.bucket_tasks): statistics, frontier, bon, convergence shards

A row is one *round*: one request of ``n`` samples of one prompt, seeded by (prompt_id, round).
Rounds stay whole through every stage, so a round is the unit of storage, retry and merging:
nothing but counts reaches the driver, and a round is merged at most once.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from limits_ray.config import EngineResources, GenerationConfig, JobConfig, RewardModelConfig
from limits_ray.pipeline.faults import (
    Quarantine,
    Watchdog,
    error_chain,
    fail_actor,
    inject_start_fault,
    inject_test_fault,
    is_engine_fault,
    run_failing_fast,
    run_with_quarantine,
)
from limits_ray.pipeline.placement import EnginePlacement
from limits_ray.pipeline.progress import Progress
from limits_ray.storage.location import Location
from limits_ray.storage.rounds import round_lengths, to_arrow
from limits_ray.storage.sample_store import flatten_rounds

if TYPE_CHECKING:
    from limits_ray.pipeline.bucket_tasks import BucketContext

__all__ = [
    "PipelineError", "Stage", "StageTimes", "Timed", "generation_stage", "released", "root_cause", "run_stages",
    "scorer_stage", "store_rounds", "tolerate_start_deaths",
]

QUARANTINE_COUNT_S = 10.0  # how often the driver lists the quarantine for the progress line


class PipelineError(RuntimeError):
    """A stage failed and the run stopped (``fail_fast``, or an error outside any round)."""


def root_cause(error: BaseException) -> str:
    """The user-code error inside a Ray-wrapped exception, as ``Type: first line``.

    Ray chains its own wrappers (task errors, stream ends, system exceptions) around the error a
    stage raised; the first exception in the chain that is not Ray's own and has a message is it.
    """
    for candidate in error_chain(error):
        message = str(candidate).strip()
        if message and not type(candidate).__module__.startswith("ray") and not isinstance(candidate, StopIteration):
            return f"{type(candidate).__name__}: {message.splitlines()[0]}"
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


class BusyClock:
    """Busy time of an actor whose calls may overlap (threads): the time during which at least one call
    runs. :meth:`stop` returns the busy time not yet reported by any call, so the sums of what the
    calls report is the actor's busy time, counted once."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.running = 0
        self.busy = 0.0
        self.since = 0.0
        self.reported = 0.0

    def _advance(self) -> None:
        now = self.clock()
        if self.running:
            self.busy += now - self.since
        self.since = now

    def start(self) -> None:
        with self.lock:
            self._advance()
            self.running += 1

    def stop(self, report: bool = True) -> float:
        """End one call; returns the busy seconds to report for it (``report=False``: a call that reports
        nothing, whose time the next reporting call takes up)."""
        with self.lock:
            self._advance()
            self.running -= 1
            if not report:
                return 0.0
            seconds, self.reported = self.busy - self.reported, self.busy
            return seconds


class Timed:
    """Wraps a stage class for ``map_batches``: records busy time, sorts faults (:mod:`limits_ray.pipeline.faults`).

    Adds the column ``seconds_<name>``: the actor's busy time (the conversion to Arrow included)
    since its previous call ended, divided among the batch's rows, so summing it over the output gives
    the stage's busy time, also when an actor runs several calls at once (:class:`BusyClock`).
    An engine fault, or a stage call running past ``timeout_s`` (> 0), ends the actor so that Ray Data
    restarts it and retries the batch. With ``quarantine_dir`` set and ``fail_fast`` off, a batch
    whose rounds fail otherwise is retried round by round and rounds that still fail are
    quarantined instead of failing the run, until more than ``max_quarantined_fraction`` of the
    run's ``total_rounds`` are (:func:`check_quarantined`, which then stops the run from here).
    """

    def __init__(
        self, stage: type, name: str, quarantine_dir: Location | None = None, run_id: str = "", fail_fast: bool = True,
        attempts: int = 2, timeout_s: float = 0.0, total_rounds: int = 0, max_quarantined_fraction: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.name = name
        inject_start_fault(name)
        self.stage = stage(**kwargs)
        self.quarantine = None if fail_fast or not quarantine_dir else Quarantine(quarantine_dir, run_id)
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.total_rounds = total_rounds
        self.max_quarantined_fraction = max_quarantined_fraction
        self.calls = 0
        self.clock = BusyClock()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        """Yield the stage's output for ``batch`` as Arrow (:func:`~limits_ray.storage.rounds.to_arrow`; nothing when
        every round was quarantined), so rounds travel as typed list columns rather than pickled objects."""
        self.clock.start()
        table = None
        try:
            output = self._run(batch)
            table = None if output is None or len(output["prompt_id"]) == 0 else to_arrow(output)
        except Exception as error:  # noqa: BLE001 - sorted by kind: an engine fault replaces the actor
            if is_engine_fault(error):
                fail_actor(self.name, root_cause(error))
            raise
        finally:
            busy = self.clock.stop(report=table is not None)
        self.calls += 1
        if table is not None:
            seconds = np.full(table.num_rows, busy / table.num_rows)
            yield table.append_column(f"seconds_{self.name}", pa.array(seconds, pa.float64()))

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        if self.quarantine is None:
            return run_failing_fast(self._call, batch, self.name)
        output = run_with_quarantine(self._call, batch, self.name, self.quarantine, self.attempts)
        quarantined_some = output is None or len(output["prompt_id"]) < len(batch["prompt_id"])
        if quarantined_some and self.total_rounds:
            check_quarantined(self.quarantine, self.quarantine.count(), self.total_rounds, self.max_quarantined_fraction)
        return output

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the stage, under the watchdog (each retry of a round gets its own time)."""
        with Watchdog(self.timeout_s, self.name):
            inject_test_fault(self.name, self.stage, self.calls)
            return self.stage(batch)


def store_rounds(batch: dict[str, np.ndarray], *, context: "BucketContext", keep_text: bool) -> dict[str, np.ndarray]:
    """Scored rounds -> the sample store, one part per bucket; one small row per round comes out.

    Output columns: prompt_id, round, samples and the ``seconds_*`` columns of earlier stages. Neither
    samples nor statistics travel to the driver: bucket tasks compute and merge the statistics from
    the store (:mod:`limits_ray.pipeline.bucket_tasks`).
    """
    started = time.perf_counter()
    context.store.write_rounds(flatten_rounds(batch, context.rewards, keep_text))
    rows = len(batch["prompt_id"])
    output = {
        "prompt_id": np.asarray(batch["prompt_id"]).astype(str),
        "round": np.asarray(batch["round"], dtype=np.int64),
        "samples": round_lengths(batch),
    }
    for name in batch:
        if name.startswith("seconds_"):
            output[name] = np.asarray(batch[name], dtype=np.float64)
    output["seconds_store"] = np.full(rows, (time.perf_counter() - started) / max(rows, 1))
    return output


@dataclass
class StageTimes:
    """Busy seconds per stage (summed over actors) and wall time of the whole stream."""

    busy: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    rounds: int = 0

    def add(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Add the ``seconds_*`` columns of ``batch``; returns this batch's busy seconds per stage."""
        added = {name.removeprefix("seconds_"): float(np.sum(values)) for name, values in batch.items() if name.startswith("seconds_")}
        for stage, seconds in added.items():
            self.busy[stage] = self.busy.get(stage, 0.0) + seconds
        return added


def restart_args(batch_retries: int) -> dict[str, int]:
    """Actor options of every engine stage, set explicitly: an actor that ended (an engine fault, a
    timeout, a lost node) is always started again, and its batch is retried up to ``batch_retries``
    times, so one batch that breaks every engine it meets stops the run instead of looping (Ray
    Data's default retries it forever). Pass them inside :func:`remote_args_accepted`."""
    return {"max_restarts": -1, "max_task_retries": batch_retries}


def tolerate_start_deaths(dataset, batch_retries: int):
    """``dataset`` with Ray Data's tolerance for actors that fail while they start set explicitly, in the
    dataset's own ``DataContext`` (Ray Data copies the current context when a source dataset is made,
    and every dataset derived from it shares that copy, so this covers all of its stages):

    * ``actor_init_retry_on_errors`` on, ``actor_init_max_retries`` = ``batch_retries``: a stage
      constructor that raises is retried in the same actor. This is what saves a *restarted* actor (one
      that replaces an actor ended by an engine fault): Ray does not restart an actor whose constructor
      raised, so without it one failed start-up (vLLM's free-memory check, while the memory of the
      predecessor's engine is not yet free) stops the run;
    * ``max_consecutive_actor_init_deaths`` = ``batch_retries``: an actor that still fails while it
      first starts is replaced, that many times in a row.

    Ray 2.60's defaults (no retry, 0 deaths) fail the whole job at the first such failure. A stage whose
    actors never start (a broken model, a missing GPU) still stops the run, after those retries."""
    context = dataset.context
    context.actor_init_retry_on_errors = True
    context.actor_init_max_retries = batch_retries
    context.max_consecutive_actor_init_deaths = batch_retries
    return dataset


@contextlib.contextmanager
def remote_args_accepted() -> Iterator[None]:
    """Silence Ray 2.60's deprecation warning for ``map_batches(**ray_remote_args)``: actor restarts
    and task retries have no named parameter yet, and the warning would reach every user's console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args(_fn)?` is deprecated")
        yield


@dataclass(frozen=True)
class Stage:
    """One actor-pool stage of the pipeline, declared once: what each actor runs, on what, and in batches of how many.

    Modelled on ``ray.data.llm``'s ``StatefulStage`` (a callable class, its constructor arguments and
    the ``map_batches`` options kept apart and combined in one place). Every stage runs inside
    :class:`Timed` (busy time, fault sorting, the quarantine, the watchdog), with the actor options of
    :func:`restart_args` and the placement of :class:`~limits_ray.pipeline.placement.EnginePlacement`.
    The values are checked when the stage is declared, before Ray sees them.

    Attributes:
        name: the stage's name (its busy-time column ``seconds_<name>`` and its actors' label).
        fn: the callable class each actor builds once (an engine, a scorer, ...).
        config: its ``config`` constructor argument; ``kwargs`` are the others.
        resources: the placement keys (``concurrency``, ``num_gpus``, parallelism, ...).
        engine: whether the actors run a model engine (multi-GPU engines get placement groups).
        batch_size: rows (rounds) per call.
        calls_in_flight: calls each actor runs at once (threads).
        timeout_s: a call running longer ends its actor (0: no limit).
    """

    name: str
    fn: type
    config: Any
    resources: EngineResources
    engine: bool
    batch_size: int
    calls_in_flight: int = 1
    timeout_s: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.calls_in_flight < 1 or not self.timeout_s >= 0:
            raise ValueError(f"stage {self.name}: batch_size {self.batch_size} and calls_in_flight {self.calls_in_flight} "
                             f"must be >= 1 and timeout_s {self.timeout_s} >= 0")
        reserved = {"stage", "name", "config", "timeout_s"} & set(self.kwargs)
        if reserved:
            raise ValueError(f"stage {self.name}: {sorted(reserved)} are set by the stage itself, not in kwargs")

    def apply(self, dataset, faults: dict[str, Any] | None = None, batch_retries: int = 3,
              placements: list[EnginePlacement] | None = None):
        """``dataset.map_batches`` through this stage; its placement is appended to ``placements`` (release
        it when the dataset is consumed, :func:`released`). ``faults``: :class:`Timed`'s quarantine options."""
        placement = EnginePlacement(self.resources, self.engine)
        if placements is not None:
            placements.append(placement)
        with remote_args_accepted():
            return dataset.map_batches(
                Timed,
                fn_constructor_kwargs={"stage": self.fn, "name": self.name, "config": self.config,
                                       "timeout_s": self.timeout_s, **self.kwargs, **(faults or {})},
                compute=placement.pool(self.calls_in_flight),
                batch_size=self.batch_size,
                **placement.remote_args(),
                **restart_args(batch_retries),
            )


def generation_stage(generation: GenerationConfig, add_special_tokens: bool, fn: type | None = None,
                     name: str = "generate") -> Stage:
    """The actor pool sampling rounds with ``fn``: by default :class:`~limits_ray.pipeline.generation.Generator`
    (one vLLM engine per actor, ``generation.batches_in_flight`` batches at once in it), or
    :class:`~limits_ray.pipeline.generation.SyntheticGenerator` for ``generation.kind: synthetic`` (no
    engine, no GPU: ``num_cpus`` per actor only). A batch running past ``generation.timeout_s`` ends its
    actor (:class:`~limits_ray.pipeline.faults.Watchdog`), and so does an engine that dies or stalls
    (:class:`~limits_ray.pipeline.engine_guard.EngineGuard`)."""
    from limits_ray.pipeline.generation import Generator, SyntheticGenerator

    synthetic = generation.kind == "synthetic"
    return Stage(
        name=name, fn=fn or (SyntheticGenerator if synthetic else Generator), config=generation,
        resources=generation.placed, engine=not synthetic, batch_size=generation.batch_size,
        calls_in_flight=1 if synthetic else generation.batches_in_flight, timeout_s=generation.timeout_s,
        kwargs={"add_special_tokens": add_special_tokens, **({} if synthetic else {"label": name})},
    )


def scorer_stage(reward: RewardModelConfig, samples_per_round: int) -> Stage:
    """One actor pool scoring whole rounds with ``reward``'s scorer; ``reward.batch_size`` samples per call,
    rounded to rounds; a call running past ``reward.timeout_s`` ends its actor."""
    from limits_ray.pipeline.scoring import make_scorer_class

    return Stage(name=f"score_{reward.name}", fn=make_scorer_class(reward), config=reward, resources=reward,
                 engine=reward.kind == "vllm", batch_size=max(1, reward.batch_size // samples_per_round),
                 timeout_s=reward.timeout_s)


@contextlib.contextmanager
def released(placements: list[EnginePlacement]) -> Iterator[list[EnginePlacement]]:
    """Yield ``placements`` (for the stages to fill); remove their placement groups on the way out."""
    try:
        yield placements
    finally:
        for placement in placements:
            placement.release()


def check_quarantined(quarantine: Quarantine, count: int, total_rounds: int, fraction: float) -> None:
    """Stop the run (:class:`PipelineError`) once more than ``fraction`` of its ``total_rounds`` (those it
    generates and those it takes from the store: a small adaptive wave is not judged alone) are quarantined."""
    if count <= fraction * total_rounds:
        return
    examples = "; ".join(map(str, quarantine.records()[:3]))
    raise PipelineError(
        f"{count} of {total_rounds} rounds were quarantined, more than max_quarantined_fraction "
        f"({fraction:g}): {examples}. Fix the cause (every record is under {quarantine.directory.uri}/"
        f"{quarantine.run_id}) or raise max_quarantined_fraction; finished rounds are kept in the sample store"
    )


def run_stages(config: JobConfig, requests, total_rounds: int, context: "BucketContext", quarantine: Quarantine,
               stored_rounds: int = 0) -> StageTimes:
    """Run generation, scoring and statistics on Ray Data over ``requests`` (a dataset of todo rounds).

    Every scored round goes to the sample store; the driver only counts the
    small rows that come back. Rounds that keep failing in generation or scoring go to
    ``quarantine`` unless ``config.fail_fast``.
    """
    generation = config.generation
    times = StageTimes()
    if total_rounds == 0:
        return times
    planned = total_rounds + stored_rounds  # the quarantine limit's base: this run's rounds, stored or new
    faults = {
        "quarantine_dir": quarantine.directory, "run_id": quarantine.run_id, "fail_fast": config.fail_fast,
        "attempts": config.attempts, "total_rounds": planned,
        "max_quarantined_fraction": config.max_quarantined_fraction,
    }
    started = time.perf_counter()
    with released([]) as placements:
        stages = [generation_stage(generation, not config.prompts.chat_template),
                  *(scorer_stage(reward, generation.n) for reward in config.rewards)]
        dataset = tolerate_start_deaths(requests, config.batch_retries)
        for stage in stages:
            dataset = stage.apply(dataset, faults, config.batch_retries, placements)
        dataset = dataset.map_batches(
            store_rounds, fn_kwargs={"context": context, "keep_text": config.store.keep_text}, num_cpus=0.25,
            batch_size=max(1, config.store.batch_samples // generation.n),
        )
        done = _consume(dataset, config, quarantine, times, total_rounds, stored_rounds)
    times.rounds = done
    times.wall = time.perf_counter() - started
    return times


def _consume(dataset, config: JobConfig, quarantine: Quarantine, times: StageTimes, total_rounds: int,
             stored_rounds: int) -> int:
    """Drain the stages' output (small per-batch rows), with progress and the quarantine limit; returns rounds done."""
    generation = config.generation
    planned = total_rounds + stored_rounds
    actors = {"generate": generation.max_actors, **{f"score_{reward.name}": reward.max_actors for reward in config.rewards}}
    progress = Progress(total_rounds, generation.n, actors, from_store=stored_rounds).start()
    done, counted = 0, time.perf_counter()
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            busy = times.add(batch)
            done += len(batch["prompt_id"])
            quarantined = None
            if time.perf_counter() - counted > QUARANTINE_COUNT_S:  # a listing, not one per batch
                quarantined, counted = quarantine.count(), time.perf_counter()
                check_quarantined(quarantine, quarantined, planned, config.max_quarantined_fraction)
            progress.update(len(batch["round"]), int(np.sum(batch["samples"])), busy, quarantined)
        check_quarantined(quarantine, quarantine.count(), planned, config.max_quarantined_fraction)
    except PipelineError:
        raise
    except Exception as error:  # noqa: BLE001 - Ray wraps user errors; name the root cause instead
        raise PipelineError(
            f"the pipeline stopped: {root_cause(error)} ({done} of {total_rounds} rounds had finished and are "
            "kept in the sample store; a rerun resumes from there)"
        ) from error
    finally:
        progress.update(0, 0, quarantined=quarantine.count())
        progress.close()
    return done
