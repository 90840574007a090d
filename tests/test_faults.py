"""Fault classes (limits_ray.pipeline.faults): quarantined rounds, engine faults that end the actor, the watchdog."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from limits_ray.pipeline.faults import (
    ENGINE_FAULT_EXIT_CODE,
    EngineFault,
    Quarantine,
    QuarantinedRound,
    RoundFailure,
    Watchdog,
    engine_call,
    is_engine_fault,
    run_with_quarantine,
)
from limits_ray.pipeline.stages import PipelineError, Timed, check_quarantined, root_cause
from limits_ray.storage.location import open_location


def _batch(prompt_ids: list[str]) -> dict[str, np.ndarray]:
    return {"prompt_id": np.array(prompt_ids, dtype=object), "round": np.arange(len(prompt_ids), dtype=np.int64)}


class FailsOn:
    """A stage that raises for one prompt and counts its calls."""

    def __init__(self, bad: str) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, batch):
        self.calls += 1
        if self.bad in batch["prompt_id"]:
            raise ValueError(f"reward 'rm' is nan for prompt_id {self.bad!r}")
        return {**batch, "rm": np.ones(len(batch["prompt_id"]))}


def test_a_failing_round_is_quarantined_and_the_rest_pass(tmp_path):
    quarantine = Quarantine(open_location(tmp_path), run_id="run-1")
    stage = FailsOn("b")
    output = run_with_quarantine(stage, _batch(["a", "b", "c"]), "score_rm", quarantine, attempts=3)
    assert output["prompt_id"].tolist() == ["a", "c"] and output["rm"].tolist() == [1.0, 1.0]
    assert quarantine.records() == [QuarantinedRound("b", 1, "score_rm", "ValueError: reward 'rm' is nan for prompt_id 'b'")]
    assert stage.calls == 1 + 1 + 2 + 1  # the batch, then a, b twice, c
    assert Quarantine(open_location(tmp_path), run_id="run-2").records() == []  # another run's records are not ours


def test_every_round_failing_gives_no_output(tmp_path):
    assert run_with_quarantine(FailsOn("a"), _batch(["a"]), "generate", Quarantine(open_location(tmp_path), "r"), 2) is None


def test_timed_yields_nothing_for_a_fully_quarantined_batch_and_raises_when_failing_fast(tmp_path):
    quarantined = Timed(FailsOn, "score_rm", quarantine_dir=open_location(tmp_path), run_id="r", fail_fast=False, bad="a")
    assert list(quarantined(_batch(["a"]))) == []
    [output] = list(quarantined(_batch(["c"])))
    assert output.num_rows == 1 and output["seconds_score_rm"].type == pa.float64()  # an Arrow table
    strict = Timed(FailsOn, "score_rm", bad="b")
    with pytest.raises(RoundFailure, match=r"^prompt_id 'b' round 1 failed in score_rm: ValueError: reward 'rm' is nan "
                                           r"for prompt_id 'b'$") as failure:
        list(strict(_batch(["a", "b", "c"])))
    assert isinstance(failure.value.__cause__, ValueError)


def _raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` as ``raise outer from inner`` leaves it."""
    outer.__cause__ = inner
    return outer


def test_root_cause_finds_the_user_error_inside_wrappers():
    inner = ValueError("reward 'rm' is nan for prompt_id 'p'\nmore detail")
    assert root_cause(_raised_from(RuntimeError(""), inner)) == "ValueError: reward 'rm' is nan for prompt_id 'p'"


class OutOfMemoryError(RuntimeError):
    """Named as torch's: faults are recognised by type name, without importing torch."""


def test_engine_faults_are_told_from_round_faults():
    assert is_engine_fault(EngineFault("vLLM generate failed"))
    assert is_engine_fault(OutOfMemoryError("tried to allocate 2 GiB"))
    assert is_engine_fault(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_engine_fault(_raised_from(RuntimeError("the batch failed"), OutOfMemoryError("device")))
    assert not is_engine_fault(ValueError("reward 'rm' is nan for prompt_id 'p1'"))
    with pytest.raises(EngineFault, match="vLLM generate failed: AssertionError: group is not initialized"):
        with engine_call("vLLM generate"):
            raise AssertionError("group is not initialized")


def test_a_lost_node_is_a_cluster_fault_and_a_round_error_is_not():
    from ray.exceptions import ActorUnavailableError, NodeDiedError

    from limits_ray.pipeline.faults import is_cluster_fault

    unreachable = ActorUnavailableError("RpcError: failed to connect to all addresses", b"\x00" * 16)
    assert is_cluster_fault(_raised_from(PipelineError("the pipeline stopped"), unreachable))
    assert is_cluster_fault(NodeDiedError("node 1 died"))
    assert not is_cluster_fault(_raised_from(PipelineError("the pipeline stopped"), ValueError("reward 'rm' is nan")))
    assert not is_cluster_fault(EngineFault("vLLM generate failed"))


def test_an_engine_fault_is_raised_not_quarantined(tmp_path):
    quarantine = Quarantine(open_location(str(tmp_path)), "run")

    def broken_engine(batch):
        with engine_call("vLLM generate"):
            raise AssertionError("the engine core is shut down")

    with pytest.raises(EngineFault):
        run_with_quarantine(broken_engine, _batch(["a", "b"]), "generate", quarantine, attempts=2)
    assert quarantine.count() == 0


ACTOR = """
import sys, time
import numpy as np
from limits_ray.pipeline.faults import engine_call
from limits_ray.pipeline.stages import Timed

class Stage:
    def __init__(self, fault):
        self.fault = fault
    def __call__(self, batch):
        if self.fault == "hang":
            time.sleep(60)
        with engine_call("vLLM generate"):
            raise AssertionError("the engine core is shut down")

timed = Timed(Stage, "generate", timeout_s=float(sys.argv[2]), fault=sys.argv[1])
list(timed({"prompt_id": np.array(["p"], dtype=object), "round": np.array([0])}))
"""


@pytest.mark.parametrize("fault, timeout_s, reason", [
    ("engine_dead", 0, "EngineFault: vLLM generate failed: AssertionError: the engine core is shut down"),
    ("hang", 0.5, "a batch ran past its timeout of 0.5 s"),
])
def test_an_engine_fault_or_a_hang_ends_the_actor_process(fault, timeout_s, reason):
    """The stage wrapper ends its process (Ray then restarts the actor and retries the batch: see
    tests/test_reliability.py for the whole run), with a line naming the stage and the cause."""
    done = subprocess.run([sys.executable, "-c", ACTOR, fault, str(timeout_s)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == ENGINE_FAULT_EXIT_CODE, done.stderr[-3000:]
    assert f"limits-ray: stage generate: {reason}; ending this actor" in done.stderr


TREE = """
import multiprocessing, sys, time
from limits_ray.pipeline.faults import fail_actor

def grandchild():
    time.sleep(600)

def child(queue):
    process = multiprocessing.get_context("spawn").Process(target=grandchild, name="worker")
    process.start()
    queue.put(process.pid)
    time.sleep(600)

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")  # as vLLM starts its engine core inside a Ray actor
    queue = context.Queue()
    core = context.Process(target=child, args=(queue,), name="EngineCore")
    core.start()
    print(core.pid, queue.get(timeout=60), flush=True)
    if sys.argv[1] == "kill-core":  # as the OOM killer would: its worker is left to init, still in our group
        import os, signal
        os.kill(core.pid, signal.SIGKILL)
        core.join()
    fail_actor("generate", "vLLM's engine core is dead")
"""


@pytest.mark.parametrize("core", ["alive", "kill-core"])
def test_an_ended_actor_ends_every_process_it_started_first(core, tmp_path):
    """An engine fault ends the actor's process only after its engine core and that core's workers (here
    a child and a grandchild that would sleep for 10 minutes): none of them outlives the actor, also
    when the core was killed first and its worker left to init (the actor leads its process group, as
    Ray's workers do)."""
    import psutil

    script = tmp_path / "actor.py"
    script.write_text(TREE)
    actor = subprocess.Popen([sys.executable, str(script), core], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    pids = [int(pid) for pid in actor.stdout.readline().split()]
    assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
    assert actor.wait(timeout=60) == ENGINE_FAULT_EXIT_CODE

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert [pid for pid in pids if alive(pid)] == []  # already gone when the actor's exit is seen
    assert "ended the actor's" in actor.stderr.read()


def test_a_watchdog_that_is_not_reached_does_nothing():
    with Watchdog(5.0, "generate") as watchdog:
        pass
    assert not watchdog.timer.is_alive()


def test_the_run_stops_beyond_the_quarantined_fraction(tmp_path):
    quarantine = Quarantine(open_location(str(tmp_path)), "run")
    for round_index in range(3):
        quarantine.add(QuarantinedRound("river", round_index, "score_bad", "ValueError: reward 'bad' is nan"))
    check_quarantined(quarantine, 3, total_rounds=300, fraction=0.01)  # exactly 1%: carries on
    with pytest.raises(PipelineError, match=r"3 of 299 rounds were quarantined, more than max_quarantined_fraction "
                                            r"\(0.01\): river round 0 in score_bad: ValueError: reward 'bad' is nan"):
        check_quarantined(quarantine, 3, total_rounds=299, fraction=0.01)


class VLLMClientError(ValueError):
    """Named as vLLM's request errors (its VLLMValidationError, e.g. an input longer than the context)."""


def test_errors_about_the_request_stay_round_faults_inside_an_engine_call():
    for error in (VLLMClientError("The decoder prompt (length 700) is longer than the maximum model length of 512"),
                  IndexError("index out of range in self"), ValueError("bad input")):
        with pytest.raises(type(error)):
            with engine_call("vLLM classify"):
                raise error
    with pytest.raises(EngineFault, match="CUDA error: an illegal memory access"):
        with engine_call("reward model forward pass"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    assert is_engine_fault(RuntimeError("CUDA error: device-side assert triggered"))


def test_a_stage_stops_the_run_once_its_quarantine_passes_the_fraction(tmp_path):
    timed = Timed(FailsOn, "score_rm", quarantine_dir=open_location(tmp_path), run_id="r", fail_fast=False,
                  total_rounds=10, max_quarantined_fraction=0.1, bad="a")
    [output] = list(timed(_batch(["a", "b"])))  # 1 of 10 quarantined: at the limit, carries on
    assert output.num_rows == 1
    with pytest.raises(PipelineError, match=r"2 of 10 rounds were quarantined, more than max_quarantined_fraction"):
        list(timed(_batch(["c", "a"])))  # round 1 of "a": a second record


def test_the_busy_clock_counts_overlapping_calls_once():
    from limits_ray.pipeline.stages import BusyClock

    now = [0.0]
    clock = BusyClock(clock=lambda: now[0])
    clock.start()
    now[0] = 1.0
    clock.start()  # a second call while the first runs
    now[0] = 3.0
    first = clock.stop()  # busy 0 -> 3
    now[0] = 4.0
    second = clock.stop()  # busy 3 -> 4, not counted again for the first call's time
    now[0] = 10.0  # idle: not busy
    clock.start()
    now[0] = 10.5
    third = clock.stop()
    assert (first, second, third) == (3.0, 1.0, 0.5)
    clock.start()
    now[0] = 11.0
    assert clock.stop(report=False) == 0.0  # a call with no rows to carry its time
    clock.start()
    now[0] = 11.5
    assert clock.stop() == 1.0  # the next call that reports takes it up
