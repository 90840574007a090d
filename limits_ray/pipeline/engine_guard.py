"""A vLLM engine inside an actor: found dead or stalled within seconds, and started on a free device.

**Dead or stalled.** With the engine core in a child process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``,
vLLM's default and what every GPU engine runs), an engine core that dies (the OOM killer, a segfault,
an NCCL abort) leaves the actor waiting for ever, in vLLM 0.32 (``vllm/v1/engine/core_client.py``):
``SyncMPClient.get_output`` blocks on its output queue with no timeout, and vLLM's own monitor
(``MPClient.start_engine_core_monitor``, waiting on the engine-core processes' sentinels) sets
``BackgroundResources.engine_dead`` and shuts the client down, which ends the thread feeding that
queue without putting anything in it. Every ``LLMEngine.step`` then blocks: the generation loop's
(:class:`~limits_ray.pipeline.generation.SharedEngine`) and those inside ``LLM.classify`` and ``LLM.generate``
(``_run_engine``). An engine core that hangs (alive, making no progress) looks the same. Measured
here before this module: the tiny job, its ``EngineCore`` killed with SIGKILL mid-generation, made
no progress in the 4 minutes it was watched; only the stage's ``timeout_s`` watchdog (default
1,800 s) would have ended it.

:class:`EngineGuard` times every step of one engine (it wraps ``llm.llm_engine.step``) and watches
it from a thread of its own. While a step runs, it ends the actor (:func:`~limits_ray.pipeline.faults.fail_actor`,
which first ends the engine's processes) as soon as vLLM's engine-dead flag is set or an engine-core
process has exited (both checked every :data:`POLL_S`), or once the step has run past
``stall_timeout_s``. With the engine core in the actor's own process (``=0``), a dead core ends the
actor with it or raises inside ``step`` (an engine fault), and a hung one is a stalled step. A dead
engine between calls is found by the next call: vLLM refuses its requests with ``EngineDeadError``,
an engine fault.

**A free device.** A replacement actor started while its device still holds the memory of its
predecessor's engine fails vLLM's start-up check (``request_memory`` in ``vllm/v1/worker/utils.py``:
free memory must be at least ``gpu_memory_utilization`` x total). :func:`wait_for_device_memory`
waits, at most :data:`DEVICE_WAIT_S`, until that much is free on every GPU the actor holds (read with
NVML, :func:`nvml_memory`, which opens no CUDA context in the actor); on CPU, or without NVML, it
returns at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from limits_ray.config import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION, EngineResources
from limits_ray.pipeline.faults import fail_actor
from limits_ray.pipeline.processes import engine_processes

__all__ = [
    "DEVICE_WAIT_S", "EngineGuard", "engine_memory_fraction", "nvml_memory", "wait_for_device_memory",
]

POLL_S = 0.5  # how often the guard looks at its engine, and the device wait at the device
DEVICE_WAIT_S = 120.0  # the longest a starting engine waits for its device memory
GIB = 2**30

MemoryProbe = Callable[[], list[tuple[int, int]]]


class EngineGuard:
    """Ends the actor when its vLLM engine dies or stalls while a step waits on it (see the module doc).

    ``on_fault(stage, reason)`` is called once, from the guard's thread (default:
    :func:`~limits_ray.pipeline.faults.fail_actor`, which does not return).
    """

    def __init__(self, llm: Any, stage: str, stall_timeout_s: float, poll_s: float = POLL_S,
                 on_fault: Callable[[str, str], Any] = fail_actor, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = llm.llm_engine
        self.stage = stage
        self.stall_timeout_s = stall_timeout_s
        self.poll_s = poll_s
        self.on_fault = on_fault
        self.clock = clock
        self.stepping_since: float | None = None
        self.stopped = threading.Event()
        step = self.engine.step

        def guarded_step() -> Any:
            self.stepping_since = self.clock()
            try:
                return step()
            finally:
                self.stepping_since = None

        self.engine.step = guarded_step
        self.thread = threading.Thread(target=self._watch, name="vllm-engine-guard", daemon=True)
        self.thread.start()

    def problem(self) -> str | None:
        """Why the engine is broken while a step waits on it; None when no step runs or all is well."""
        since = self.stepping_since
        if since is None:
            return None
        client = getattr(self.engine, "engine_core", None)
        if getattr(getattr(client, "resources", None), "engine_dead", False):
            return "vLLM's engine core is dead (its engine-dead flag is set) while a step waits for it"
        for process in engine_processes(client):
            if process.exitcode is not None:
                return (f"vLLM's engine-core process {process.name} (pid {process.pid}) exited with code "
                        f"{process.exitcode} while a step waits for it")
        waited = self.clock() - since
        if self.stall_timeout_s > 0 and waited > self.stall_timeout_s:
            return f"a vLLM engine step has not returned for {waited:.0f} s (stall_timeout_s {self.stall_timeout_s:g})"
        return None

    def close(self) -> None:
        """Stop watching (the engine keeps its timed step)."""
        self.stopped.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_s):
            reason = self.problem()
            if reason is not None:
                self.on_fault(self.stage, reason)
                return


def engine_memory_fraction(resources: EngineResources) -> float:
    """The share of each GPU a vLLM engine claims: ``gpu_memory_utilization``, else vLLM's default."""
    return resources.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION


def nvml_memory() -> list[tuple[int, int]]:
    """``(free, total)`` bytes of each GPU this process may use (``CUDA_VISIBLE_DEVICES``: indices or
    UUIDs), read with NVML; empty without NVML (``pynvml``) or a GPU, or if NVML fails."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return []
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: no GPU to wait for
        return []
    try:
        names = [name.strip() for name in visible.split(",")] if visible else [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        found = []
        for name in names:
            handle = (pynvml.nvmlDeviceGetHandleByUUID(name) if name.startswith(("GPU-", "MIG-"))
                      else pynvml.nvmlDeviceGetHandleByIndex(int(name)))
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append((int(info.free), int(info.total)))
        return found
    except Exception:  # noqa: BLE001 - a device NVML cannot read is not waited for; vLLM checks it itself
        return []
    finally:
        pynvml.nvmlShutdown()


def wait_for_device_memory(what: str, fraction: float = 0.0, needed_bytes: int = 0, timeout_s: float = DEVICE_WAIT_S,
                           probe: MemoryProbe = nvml_memory, sleep: Callable[[float], Any] = time.sleep,
                           clock: Callable[[], float] = time.monotonic) -> float:
    """Wait until every device ``probe()`` reports has ``max(fraction x total, needed_bytes)`` bytes free,
    at most ``timeout_s``; returns the seconds waited. No device (CPU, no NVML): returns 0 at once.

    After ``timeout_s`` the engine starts anyway (vLLM's own check then names the memory it lacks),
    with a line on stderr (the actor's log) saying what was still missing.
    """
    started, polls = clock(), 0
    while True:
        devices = probe()
        if not devices:
            return 0.0
        short = [(index, free, total) for index, (free, total) in enumerate(devices)
                 if free < max(fraction * total, needed_bytes)]
        waited = clock() - started
        if not short:
            if polls:
                print(f"limits-ray: {what}: waited {waited:.1f} s for device memory to be free", file=sys.stderr, flush=True)
            return waited
        if waited >= timeout_s:
            index, free, total = short[0]
            need = max(fraction * total, needed_bytes)
            print(f"limits-ray: {what}: after {waited:.0f} s, device {index} has {free / GIB:.1f} of {total / GIB:.1f} GiB "
                  f"free, less than the {need / GIB:.1f} GiB it will claim; starting anyway", file=sys.stderr, flush=True)
            return waited
        sleep(POLL_S)
        polls += 1
