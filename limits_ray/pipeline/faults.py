"""Fault classes: a broken engine replaces its actor; a round whose data or reward code fails is quarantined.

* Engine faults (:class:`EngineFault`: an error inside a vLLM or model call that is not about the
  request, a device out of memory or CUDA error, vLLM's ``EngineDeadError``), a stage call running
  past its stage's ``timeout_s`` (:class:`Watchdog`), and a vLLM engine found dead or stalled by
  :class:`~limits_ray.pipeline.engine_guard.EngineGuard` end the actor's process (:func:`fail_actor`), after
  ending every process it started (vLLM's engine core and workers, which hold the device:
  :func:`~limits_ray.pipeline.processes.end_process_tree`): Ray Data starts a new actor and retries the batch
  there (``max_restarts``/``max_task_retries``, set by the pipeline). A dead engine is never reused,
  and no round is quarantined for it.
* Round faults (a reward function that raises, a NaN reward, an input too long for a reward model:
  :func:`is_request_error`): the batch is retried round by round; a round that fails ``attempts``
  times is written as a JSON record into the quarantine directory (in the sample store, so every
  node of a cluster can reach it) and dropped from the stream. The run stops once more than
  ``max_quarantined_fraction`` of its rounds are quarantined (checked by the stage that adds a
  record, and by the driver); otherwise the driver leaves the affected prompts out of the results
  and names them in the report. A later run retries them (they are not in the sample store).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np

from limits_ray.storage.location import Location

__all__ = [
    "EngineFault", "Quarantine", "QuarantinedRound", "RoundFailure", "Watchdog", "engine_call", "error_chain",
    "fail_actor", "inject_start_fault", "inject_test_fault", "is_cluster_fault", "is_engine_fault", "run_failing_fast", "run_with_quarantine",
]

ENGINE_FAULT_EXIT_CODE = 75  # the actor's exit status after an engine fault (EX_TEMPFAIL: try again)
ENGINE_FAULT_TYPES = ("EngineDeadError", "EngineGenerateError", "OutOfMemoryError", "AcceleratorError")
ENGINE_FAULT_MESSAGES = ("out of memory", "cuda error")
# Ray's errors when the cluster fails under a task: a node lost, an actor unreachable meanwhile, an object gone.
CLUSTER_FAULT_TYPES = (
    "ActorUnavailableError", "ActorDiedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
    "ObjectReconstructionFailedError", "ObjectFetchTimedOutError", "WorkerCrashedError",
)
# Errors about the request itself (too long an input, a bad value): the round's fault, not the engine's.
REQUEST_ERRORS = (ValueError, TypeError, KeyError, IndexError)
REQUEST_ERROR_TYPES = ("VLLMClientError",)  # vLLM's request errors (VLLMValidationError is one)
TEST_FAULTS_ENV = "LIMITS_RAY_TEST_FAULTS"
TEST_FAULTS = ("engine_dead", "engine_kill", "engine_hang", "hang")


class EngineFault(RuntimeError):
    """The engine or the device failed, not the round's data: the actor is replaced, its batch retried."""


class RoundFailure(RuntimeError):
    """One round failed in a stage (``fail_fast``); the message names the prompt, round and error."""


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every error it wraps, outermost first: ``__cause__``, ``__context__`` and the
    ``cause`` attribute Ray's wrappers keep the task's own error in; each error once."""
    chain: list[BaseException] = []
    seen: set[int] = set()
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
    return chain


def is_engine_fault(error: BaseException) -> bool:
    """Whether ``error`` (or an error it wraps) is an engine fault: :class:`EngineFault`, one of vLLM's
    engine errors, torch's out-of-memory or accelerator error (by type name, so neither needs
    importing), or a message saying the device ran out of memory or hit a CUDA error."""
    return any(
        isinstance(current, EngineFault) or type(current).__name__ in ENGINE_FAULT_TYPES
        or any(message in str(current).lower() for message in ENGINE_FAULT_MESSAGES)
        for current in error_chain(error)
    )


def is_cluster_fault(error: BaseException) -> bool:
    """Whether ``error`` (or an error it wraps) is Ray's report of a cluster failure under the stages
    (``CLUSTER_FAULT_TYPES``): the run resumes from the sample store instead of stopping."""
    return any(type(current).__name__ in CLUSTER_FAULT_TYPES for current in error_chain(error))


def is_request_error(error: BaseException) -> bool:
    """An error about the request itself (``ValueError``, ``TypeError``, ``KeyError``, ``IndexError``,
    vLLM's ``VLLMClientError`` such as an input longer than the context): the round's fault."""
    if is_engine_fault(error):
        return False
    return isinstance(error, REQUEST_ERRORS) or any(cls.__name__ in REQUEST_ERROR_TYPES for cls in type(error).__mro__)


@contextlib.contextmanager
def engine_call(what: str) -> Iterator[None]:
    """Re-raise an error inside the block as an :class:`EngineFault` naming ``what``, unless it is about
    the request (:func:`is_request_error`): that one stays a round fault, quarantined or named."""
    try:
        yield
    except EngineFault:
        raise
    except Exception as error:  # noqa: BLE001 - the engine failed unless the request was bad
        if is_request_error(error):
            raise
        raise EngineFault(f"{what} failed: {type(error).__name__}: {error}") from error


_failing = threading.Lock()


def fail_actor(stage: str, reason: str) -> NoReturn:
    """End this actor's process so that Ray Data starts a new one and retries its batch there: first
    every process it started (vLLM's engine core and its workers, holding the device's memory), then
    itself. Several threads may find the fault at once; the first ends the process."""
    _failing.acquire()  # never released: the process ends under it
    print(f"limits-ray: stage {stage}: {reason}; ending this actor so that Ray restarts it and retries its batch",
          file=sys.stderr, flush=True)
    try:
        from limits_ray.pipeline.processes import end_process_tree

        ended = end_process_tree()
        if ended:
            print(f"limits-ray: stage {stage}: ended the actor's {len(ended)} child process(es) {ended}",
                  file=sys.stderr, flush=True)
    finally:
        os._exit(ENGINE_FAULT_EXIT_CODE)


class Watchdog:
    """``with Watchdog(seconds, stage):`` ends the actor (:func:`fail_actor`) if the block runs past
    ``seconds`` (a hung engine call cannot be interrupted from Python); ``seconds <= 0``: no limit."""

    def __init__(self, seconds: float, stage: str) -> None:
        self.seconds = seconds
        self.stage = stage
        self.timer: threading.Timer | None = None

    def __enter__(self) -> "Watchdog":
        if self.seconds > 0:
            reason = f"a batch ran past its timeout of {self.seconds:g} s"
            self.timer = threading.Timer(self.seconds, fail_actor, args=(self.stage, reason))
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer.join()


def inject_test_fault(stage_name: str, stage: Any, calls: int) -> None:
    """For the fault tests only; does nothing unless ``$LIMITS_RAY_TEST_FAULTS`` names a directory.

    A file ``<stage_name>.<fault>`` there arms one fault, fired on an actor's second or later batch
    by the first actor to rename the file to ``<fault>.fired`` (so it fires once per arming, across
    restarts), which then holds the actor's pid and the time it fired; one fault per call:

    * ``engine_dead``: shut the stage's real vLLM engine down (the next step fails inside vLLM, or, with
      the engine core in a child process, waits for ever on it);
    * ``engine_kill``: SIGKILL the process the engine core runs in: its child process, or this actor
      when the core runs in-process (as a segfault or the OOM killer would);
    * ``engine_hang``: the engine core stops making progress, alive: its child process is stopped
      (SIGSTOP), or an in-process core's step blocks for an hour;
    * ``hang``: the batch itself blocks for an hour, outside the engine.
    """
    directory = os.environ.get(TEST_FAULTS_ENV)
    if not directory or calls < 1:
        return
    for fault in TEST_FAULTS:
        if _claim(Path(directory) / f"{stage_name}.{fault}"):
            break
    else:
        return
    if fault == "hang":
        time.sleep(3600)
        return
    engine = getattr(stage, "engine", None)  # a shared engine is changed between two of its steps
    act = {"engine_dead": _shut_down, "engine_kill": _kill_core, "engine_hang": _hang_core}[fault]
    if engine is None:
        act(stage.llm)
    else:
        engine.call(lambda: act(stage.llm))


def inject_start_fault(stage_name: str) -> None:
    """For the fault tests only: a file ``<stage_name>.start_death`` in ``$LIMITS_RAY_TEST_FAULTS`` makes
    the constructor of the stage's next actor raise (once per arming), as vLLM's start-up check does when
    its GPU's memory is still held: Ray does not restart an actor whose constructor raised."""
    directory = os.environ.get(TEST_FAULTS_ENV)
    if directory and _claim(Path(directory) / f"{stage_name}.start_death"):
        raise ValueError("Free memory on device cuda:0 on startup is less than desired GPU memory utilization "
                         "(a test fault: start_death)")


def _claim(armed: Path) -> bool:
    """Rename an armed fault to ``.fired`` (one actor wins) and record this actor's pid and the time in it."""
    fired = armed.with_name(armed.name + ".fired")
    try:
        os.rename(armed, fired)
    except FileNotFoundError:
        return False
    fired.write_text(f"{os.getpid()} {time.time()}\n")
    return True


def _engine_processes(llm: Any) -> list[Any]:
    from limits_ray.pipeline.processes import engine_processes

    return engine_processes(llm.llm_engine.engine_core)


def _shut_down(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def _kill_core(llm: Any) -> None:
    for process in _engine_processes(llm) or [None]:
        os.kill(process.pid if process else os.getpid(), signal.SIGKILL)


def _hang_core(llm: Any) -> None:
    processes = _engine_processes(llm)
    for process in processes:
        os.kill(process.pid, signal.SIGSTOP)
    if not processes:
        llm.llm_engine.engine_core.engine_core.step_fn = lambda: time.sleep(3600)


@dataclass(frozen=True)
class QuarantinedRound:
    """One round set aside: where it failed and why."""

    prompt_id: str
    round: int
    stage: str
    error: str

    def __str__(self) -> str:
        return f"{self.prompt_id} round {self.round} in {self.stage}: {self.error}"


class Quarantine:
    """Quarantine records of one run: one JSON object each under ``<directory>/<run_id>/``."""

    def __init__(self, directory: Location, run_id: str) -> None:
        self.directory = directory
        self.run_id = run_id

    def add(self, record: QuarantinedRound) -> None:
        """Write one record (whole; a retried write rewrites the same name)."""
        key = hashlib.sha1(f"{record.stage}:{record.prompt_id}:{record.round}".encode()).hexdigest()[:20]
        self.directory.join(self.run_id, f"{key}.json").write_text(json.dumps({"run_id": self.run_id, **record.__dict__}))

    def count(self) -> int:
        """How many rounds this run has quarantined so far (a listing; no record is read)."""
        return len(self.directory.join(self.run_id).files(suffix=".json"))

    def records(self) -> list[QuarantinedRound]:
        """This run's records, sorted by prompt and round."""
        found = []
        for location in self.directory.join(self.run_id).files(suffix=".json"):
            data = json.loads(location.read_text())
            data.pop("run_id")
            found.append(QuarantinedRound(**data))
        return sorted(found, key=lambda record: (record.prompt_id, record.round, record.stage))


def _row(batch: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    return {name: values[index : index + 1] for name, values in batch.items()}


def _concatenate(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([output[name] for output in outputs]) for name in outputs[0]}


def _message(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


Stage = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def run_failing_fast(call: Stage, batch: dict[str, np.ndarray], stage: str) -> dict[str, np.ndarray] | None:
    """``call(batch)``; if it raises, find the failing round by calling round by round, and raise
    :class:`RoundFailure` naming its prompt and round (an engine fault is raised as it is)."""

    def stop(record: QuarantinedRound, error: BaseException) -> NoReturn:
        raise RoundFailure(
            f"prompt_id {record.prompt_id!r} round {record.round} failed in {stage}: {record.error}"
        ) from error

    return _round_by_round(call, batch, stage, 1, stop)


def run_with_quarantine(
    call: Stage, batch: dict[str, np.ndarray], stage: str, quarantine: Quarantine, attempts: int,
) -> dict[str, np.ndarray] | None:
    """``call(batch)``; if it raises, retry each round alone up to ``attempts`` times in all.

    Rounds that still fail are recorded in ``quarantine`` and left out of the result (``None``
    when every round failed). An engine fault (:func:`is_engine_fault`) is raised, never quarantined.
    """
    return _round_by_round(call, batch, stage, attempts - 1, lambda record, _: quarantine.add(record))


def _round_by_round(
    call: Stage, batch: dict[str, np.ndarray], stage: str, tries: int,
    failed: Callable[[QuarantinedRound, BaseException], None],
) -> dict[str, np.ndarray] | None:
    """``call(batch)``; if it raises (not an engine fault), each round alone, ``tries`` times at most
    (at least once), handing a round that still fails to ``failed``; the rounds that passed, or None."""
    try:
        return call(batch)
    except Exception as first_error:  # noqa: BLE001 - any failure of user code is the rounds' to answer
        if is_engine_fault(first_error):
            raise
        batch_error = first_error
    outputs = []
    for index in range(len(batch["prompt_id"])):
        row = _row(batch, index)
        error: BaseException = batch_error
        for _ in range(max(tries, 1)):
            try:
                outputs.append(call(row))
                break
            except Exception as retry_error:  # noqa: BLE001
                if is_engine_fault(retry_error):
                    raise
                error = retry_error
        else:
            failed(QuarantinedRound(str(row["prompt_id"][0]), int(row["round"][0]), stage, _message(error)), error)
    return _concatenate(outputs) if outputs else None
