"""Ray on the driver: joining or starting a cluster, fanning work out as tasks, and watching its nodes.

* :func:`init_ray`: the one ``ray.init`` of a run (the job, the offline reduce on Ray);
* :func:`map_tasks`: ``[function(*args) for args in calls]`` as Ray tasks, a bounded number in flight,
  results in call order: the bucket tasks of the job and of the offline reduce;
* :func:`alive_nodes`, :func:`lost_nodes`: which nodes a cluster fault took away (the job's cluster
  retries, :func:`limits_ray.runs.job.run_job`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence, TypeVar

from limits_ray.core.errors import InputError
from limits_ray.pipeline.logs import ray_init_kwargs

__all__ = ["NODE_DEATH_WAIT_S", "alive_nodes", "init_ray", "lost_nodes", "map_tasks"]


NODE_DEATH_WAIT_S = 60.0
"""How long a cluster fault waits for Ray to record the lost node before the run stops."""
T = TypeVar("T")


def init_ray(address: str = "") -> None:
    """Connect to ``address``; empty means ``RAY_ADDRESS`` (set by ``ray job submit``) or a new local instance.

    Nothing happens when Ray is already initialised in this process. A new local instance is asked for
    explicitly, so a stale cluster file left by a dead head on this machine cannot make the run hang
    trying to reach it; ``auto`` joins a running local cluster.
    """
    import ray

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


def map_tasks(function: Callable[..., T], calls: Sequence[tuple], *, shared: tuple = (), in_flight: int | None = None,
              retries: int = 0) -> list[T]:
    """``[function(*shared, *args) for args in calls]`` as Ray tasks of one CPU each; results in call order.

    ``shared`` arguments go to the object store once, not once per task. At most ``in_flight`` tasks
    run at once (None: all are submitted together); a task that fails is retried ``retries`` times,
    then stops the whole map: tasks not yet submitted never start, those in flight are cancelled, and
    an :class:`~limits_ray.core.errors.InputError` raised inside a task reaches the caller as itself.
    """
    import ray

    remote = ray.remote(num_cpus=1, max_retries=retries)(function)
    shared_refs = [ray.put(value) for value in shared]
    refs: list = []
    pending: list = []
    try:
        for args in calls:
            if in_flight is not None and len(pending) >= in_flight:
                done, pending = ray.wait(pending, num_returns=1)
                _get(ray, done)  # a failed task stops the map now
            refs.append(remote.remote(*shared_refs, *args))
            pending.append(refs[-1])
        return _get(ray, refs)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


def _get(ray: Any, refs: list) -> list:
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, InputError):
            raise error.cause from None
        raise


def alive_nodes() -> set[str]:
    """Ids of the cluster's live nodes."""
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def lost_nodes(alive: set[str], wait_s: float = NODE_DEATH_WAIT_S) -> set[str]:
    """The nodes of ``alive`` that are dead now, waiting up to ``wait_s`` for Ray to declare one dead
    (a task can fail on an unreachable actor before its node's death is recorded)."""
    deadline = time.monotonic() + wait_s
    while not (lost := alive - alive_nodes()) and time.monotonic() < deadline:
        time.sleep(1.0)
    return lost
