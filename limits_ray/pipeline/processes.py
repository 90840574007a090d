"""The processes an actor started: found, and ended before the actor itself ends.

vLLM runs its engine core in a child process when ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (its default,
and what every GPU engine does): ``EngineCore`` (vLLM's ``CoreEngineProcManager``, started with the
``spawn`` method inside a Ray actor), which starts its own workers (``VLLM::Worker``, one per GPU of a
multi-GPU engine on the ``mp`` backend). They hold the device's memory. An actor that ends after an
engine fault (:func:`limits_ray.pipeline.faults.fail_actor`) first ends every process below it, and every other
process of its process group (Ray starts each worker as a group leader; a worker orphaned by its
killed engine core stays in the group: :func:`end_process_tree`), so the replacement actor Ray starts
finds the device free; what Ray itself ends later (it ends a dead worker's children some 0.3 s after
the worker, measured on Ray 2.60 locally) is not relied on.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

__all__ = ["descendants", "end_process_tree", "engine_processes", "group_members"]

END_WAIT_S = 10.0  # how long end_process_tree waits for killed processes to be gone


def descendants(pid: int | None = None) -> list[Any]:
    """Every live process below ``pid`` (default: this one), children first, as ``psutil.Process``."""
    import psutil

    try:
        return psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def group_members(pid: int | None = None) -> list[Any]:
    """The other processes of ``pid``'s process group (default: this one's) when ``pid`` leads it, as Ray
    makes each worker do; none otherwise (the group is then someone else's). A process whose parent died
    (an engine core killed by the OOM killer leaves its workers to init) is no descendant any more, but
    it keeps its group."""
    import psutil

    pid = pid or os.getpid()
    try:
        if os.getpgid(pid) != pid:
            return []
    except ProcessLookupError:
        return []
    members = []
    for other in psutil.pids():
        try:
            if other != pid and os.getpgid(other) == pid:
                members.append(psutil.Process(other))
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def end_process_tree(pid: int | None = None, wait_s: float = END_WAIT_S) -> list[int]:
    """SIGKILL every process below ``pid`` (default: this one), and the rest of its process group when it
    leads one (:func:`group_members`), and wait, up to ``wait_s``, until each is gone (reaped, or a
    zombie: a zombie holds no memory); returns the pids that were killed.

    The processes are listed before anything is killed (a killed parent's children are re-parented, so
    they could not be found from it afterwards); a process whose engine is broken gets no graceful
    shutdown, which could itself hang.
    """
    import psutil

    found = {process.pid: process for process in [*descendants(pid), *group_members(pid)]}
    processes = list(found.values())
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    deadline = time.monotonic() + wait_s
    pending = list(processes)
    while pending and time.monotonic() < deadline:
        _, pending = psutil.wait_procs(pending, timeout=0.05)
        pending = [process for process in pending if not _ended(process)]
    return [process.pid for process in processes]


def _ended(process: Any) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def engine_processes(client: Any) -> list[Any]:
    """The engine-core processes (``multiprocessing`` processes) vLLM's multiprocess client ``client``
    (``llm.llm_engine.engine_core``) started; none for an in-process engine."""
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    return list(getattr(manager, "processes", None) or [])
