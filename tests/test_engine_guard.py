"""The engine guard's rules and the device-memory wait (limits_ray.pipeline.engine_guard), on stand-ins.

The guard on real engines, in both of vLLM's process layouts, is tested end to end in
tests/test_engine_faults.py; here each rule is checked alone, without a model: a stand-in engine
whose ``step`` blocks until released, and a client shaped as vLLM 0.32's multiprocess client
(``engine_core.resources.engine_dead``, ``engine_core.resources.engine_manager.processes``).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from types import SimpleNamespace

import pytest

from limits_ray.config import EngineResources
from limits_ray.pipeline.engine_guard import EngineGuard, engine_memory_fraction, nvml_memory, wait_for_device_memory

GIB = 2**30


class SteppingEngine:
    """``step`` blocks until ``release`` is set; ``engine_core`` is shaped as vLLM's multiprocess client."""

    def __init__(self, processes: list | None = None) -> None:
        self.release = threading.Event()
        self.engine_core = SimpleNamespace(resources=SimpleNamespace(
            engine_dead=False, engine_manager=SimpleNamespace(processes=processes or [])))

    def step(self) -> list:
        self.release.wait(30)
        return []


def _guard(engine: SteppingEngine, stall_timeout_s: float) -> tuple[EngineGuard, list]:
    faults: list = []
    guard = EngineGuard(SimpleNamespace(llm_engine=engine), "generate", stall_timeout_s, poll_s=0.02,
                        on_fault=lambda stage, reason: faults.append((stage, reason)))
    return guard, faults


def _stepping(engine: SteppingEngine) -> threading.Thread:
    thread = threading.Thread(target=engine.step)  # the guard's timed step (engine.step is replaced)
    thread.start()
    return thread


def _wait_for(faults: list, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not faults and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_step_that_runs_past_the_stall_timeout_ends_the_actor():
    engine = SteppingEngine()
    guard, faults = _guard(engine, stall_timeout_s=0.3)
    started = time.monotonic()
    stepping = _stepping(engine)
    _wait_for(faults)
    took = time.monotonic() - started
    engine.release.set()
    stepping.join()
    assert faults and faults[0][0] == "generate" and "has not returned for" in faults[0][1] and "stall_timeout_s 0.3" in faults[0][1]
    assert 0.3 <= took < 3.0
    assert not guard.thread.is_alive()  # one fault, then the guard is done


def test_a_dead_engine_flag_while_a_step_waits_ends_the_actor_but_not_while_idle():
    engine = SteppingEngine()
    guard, faults = _guard(engine, stall_timeout_s=0)  # no stall limit: only the flag can fire
    engine.engine_core.resources.engine_dead = True
    time.sleep(0.2)
    assert faults == []  # idle: the next call finds the dead engine itself (EngineDeadError)
    stepping = _stepping(engine)
    _wait_for(faults)
    engine.release.set()
    stepping.join()
    assert faults and "engine-dead flag is set" in faults[0][1]


def test_an_engine_core_process_that_exited_while_a_step_waits_ends_the_actor():
    core = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,), name="EngineCore")
    core.start()
    core.join()
    engine = SteppingEngine(processes=[core])
    guard, faults = _guard(engine, stall_timeout_s=0)
    stepping = _stepping(engine)
    _wait_for(faults)
    engine.release.set()
    stepping.join()
    assert faults and f"engine-core process EngineCore (pid {core.pid}) exited with code 0" in faults[0][1]


def test_steps_that_return_in_time_are_left_alone():
    engine = SteppingEngine()
    engine.release.set()
    guard, faults = _guard(engine, stall_timeout_s=0.2)
    for _ in range(20):
        engine.step()
        time.sleep(0.02)
    guard.close()
    assert faults == [] and guard.stepping_since is None


def test_the_device_wait_returns_once_the_memory_is_free_and_gives_up_after_its_timeout(capsys):
    readings = iter([[(2 * GIB, 24 * GIB)], [(10 * GIB, 24 * GIB)], [(23 * GIB, 24 * GIB)]])
    now = [0.0]
    waited = wait_for_device_memory("stage generate", fraction=0.92, timeout_s=60, probe=lambda: next(readings),
                                    sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert waited == 1.0  # two polls of 0.5 s, then 23 of 24 GiB free >= 0.92 x 24
    assert "waited 1.0 s for device memory" in capsys.readouterr().err

    now[0] = 0.0
    waited = wait_for_device_memory("stage score_rm", needed_bytes=3 * GIB, timeout_s=5, probe=lambda: [(GIB, 24 * GIB)],
                                    sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert waited == 5.0
    assert "stage score_rm: after 5 s, device 0 has 1.0 of 24.0 GiB free, less than the 3.0 GiB" in capsys.readouterr().err


def test_the_device_wait_is_a_no_op_without_a_gpu(monkeypatch):
    slept: list = []
    assert wait_for_device_memory("stage generate", fraction=0.92, probe=lambda: [], sleep=slept.append) == 0.0
    assert slept == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray gives an actor that holds no GPU
    assert nvml_memory() == []


@pytest.mark.parametrize("utilization, expected", [(0.0, 0.92), (0.45, 0.45)])
def test_an_engine_claims_its_configured_share_or_vllm_s_default(utilization, expected):
    assert engine_memory_fraction(EngineResources(num_gpus=1, gpu_memory_utilization=utilization)) == expected
