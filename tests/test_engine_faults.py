"""Engine faults in both of vLLM's process layouts, on the real pipeline.

On a GPU vLLM runs its engine core in a child process of the actor (``VLLM_ENABLE_V1_MULTIPROCESSING=1``);
the CPU engines of the other tests run it inside the actor (``=0``). Each layout gets one run of the
tiny job with every engine fault armed at once (limits_ray.pipeline.faults.inject_test_fault), each firing once
on some actor's second or later batch:

* generation: the engine core killed with SIGKILL (its child process; in-process, the actor itself),
  and the engine core hung (its child process stopped with SIGSTOP; in-process, a step that blocks);
* the vLLM reward: its engine shut down, and its engine core hung;
* the function reward: a batch that hangs outside any engine (the stage's ``timeout_s``).

(The faults are spread over the two engine stages so that their restarts overlap: each costs an
engine start.)

Every run must end with nothing quarantined, every sample stored once and the frontier of an
uninterrupted run; every faulted actor must end within seconds of its fault (a dead engine: its
engine-dead flag or engine-core process; a hung one: ``stall_timeout_s``), while the stages'
``timeout_s`` watchdogs of generation and the vLLM reward are set far beyond the test's length; and no
vLLM process (engine core, workers) of a faulted actor may outlive it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from limits_ray.config import JobConfig, from_mapping
from limits_ray.pipeline.faults import TEST_FAULTS_ENV
from limits_ray.runs.job import run_job

from _results import assert_same_frontier, assert_store_has_each_sample_once
from _tiny import tiny_job_mapping

pytestmark = pytest.mark.slow

PROMPTS = ["The cat sat on the", "Once upon a time", "The river ran quietly past"]
SAMPLES = 3 * 64
STALL_S = 10.0  # stall_timeout_s of the vLLM stages, and timeout_s of the function reward
WATCHDOG_S = 900.0  # timeout_s of the vLLM stages: never reached within the test
DEAD_ENGINE_S = 15.0  # a dead engine's actor ends within this of the fault (load included)
FAULTS = {  # armed fault file -> how long its actor may take to end after it fires
    "generate.engine_kill": DEAD_ENGINE_S,
    "generate.engine_hang": STALL_S + DEAD_ENGINE_S,
    "score_rm.engine_dead": DEAD_ENGINE_S,
    "score_rm.engine_hang": STALL_S + DEAD_ENGINE_S,
    "score_length.hang": STALL_S + DEAD_ENGINE_S,
}


def _mapping(models, out_dir: Path) -> dict:
    mapping = tiny_job_mapping(models, out_dir, prompts={"inline": PROMPTS})
    mapping["generation"].update(samples_per_prompt=64, batch_size=1, timeout_s=WATCHDOG_S, stall_timeout_s=STALL_S)
    mapping["store"] = {"batch_samples": 16}
    rm = next(reward for reward in mapping["rewards"] if reward["name"] == "rm")
    rm.update(timeout_s=WATCHDOG_S, stall_timeout_s=STALL_S, batch_size=32)  # 6 batches: two faults, retries
    length = next(reward for reward in mapping["rewards"] if reward["name"] == "length")
    length.update(timeout_s=STALL_S, batch_size=32)
    mapping["rewards"] = [rm, length]
    mapping["analysis"]["align"] = ["rm", "length"]
    return mapping


@pytest.fixture(scope="module", params=["0", "1"], ids=["core-in-actor", "core-in-child-process"])
def layout(request, tmp_path_factory):
    """A local Ray whose actors run vLLM's engine core in-process (``0``) or in a child process (``1``, as
    on GPUs), and arm faults in a directory of their own; yields ``(layout, fault directory)``."""
    import ray

    faults = tmp_path_factory.mktemp(f"faults-{request.param}")
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": request.param, TEST_FAULTS_ENV: str(faults)}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield request.param, faults
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(layout, tiny_models, tmp_path_factory) -> Path:
    """An uninterrupted run, made once (in the first layout) and compared with both layouts' faulted runs."""
    out_dir = tmp_path_factory.getbasetemp() / "engine-faults-reference"
    if not (out_dir / "frontier.parquet").exists():
        run_job(from_mapping(JobConfig, _mapping(tiny_models, out_dir)))
    return out_dir


class ProcessWatch:
    """Samples the Ray actors below this (the driver's) process every 50 ms: the vLLM processes seen
    below each actor, when each actor was first seen gone, and which of its vLLM processes were alive then."""

    def __init__(self) -> None:
        self.engines: dict[int, set[int]] = {}
        self.ended: dict[int, float] = {}
        self.outlived: dict[int, list[int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            for process in psutil.Process().children(recursive=True):
                try:
                    if not process.cmdline()[0].startswith("ray::MapWorker"):
                        continue
                    below = {child.pid for child in process.children(recursive=True) if child.name().startswith("VLLM::")}
                except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                    continue
                self.engines.setdefault(process.pid, set()).update(below)
            now = time.time()
            for pid, engines in self.engines.items():
                if pid not in self.ended and not _alive(pid):
                    self.ended[pid] = now
                    self.outlived[pid] = [engine for engine in engines if _alive(engine)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_every_engine_fault_is_found_within_seconds_and_the_run_completes(layout, reference, tiny_models, tmp_path):
    multiprocessing, faults = layout
    for name in FAULTS:
        (faults / name).touch()
    with ProcessWatch() as watch:
        _, report = run_job(from_mapping(JobConfig, _mapping(tiny_models, tmp_path)))
        time.sleep(0.5)  # the watch's last samples
    fired = {name: (faults / f"{name}.fired").read_text().split() for name in FAULTS if (faults / f"{name}.fired").exists()}
    assert sorted(fired) == sorted(FAULTS), f"faults that never fired: {sorted(set(FAULTS) - set(fired))}"
    assert report.quarantined == []
    assert_store_has_each_sample_once(tmp_path / "store", SAMPLES)
    assert_same_frontier(reference, tmp_path)
    for name, (pid, when) in fired.items():
        pid, when = int(pid), float(when)
        assert pid in watch.ended, f"{name}: actor {pid} did not end"
        took = watch.ended[pid] - when
        print(f"{name}: actor {pid} ended {took:.1f} s after its fault (bound {FAULTS[name]:g} s)")
        assert took < FAULTS[name], f"{name}: actor {pid} ended {took:.1f} s after its fault"
        assert watch.outlived[pid] == [], f"{name}: vLLM processes {watch.outlived[pid]} outlived actor {pid}"
    if multiprocessing == "1":  # the hung engine cores were child processes, stopped and then ended with their actor
        for name in ("generate.engine_hang", "score_rm.engine_hang"):
            assert watch.engines[int(fired[name][0])], f"{name}: no engine-core process was seen below its actor"
