"""Where engine actors run: Ray remote arguments, actor pools and placement groups of one stage.

One :class:`EnginePlacement` per stage turns its :class:`~limits_ray.config.EngineResources` into what
``Dataset.map_batches`` takes, as ``ray.data.llm`` does for vLLM engines:

- a CPU engine (``num_gpus: 0``), a function reward or a single-GPU engine: ``num_cpus``/``num_gpus``
  per actor;
- a multi-GPU engine (``tensor_parallel_size * pipeline_parallel_size > 1``) with the ``mp`` backend:
  the actor reserves all ``tp * pp`` GPUs (one node); with the ``ray`` backend: the actor takes no GPU
  and each actor start makes a PACK placement group of ``tp * pp`` ``{GPU: 1, CPU: 1}`` bundles that
  vLLM's Ray workers are scheduled into; at most ``concurrency`` groups are made, and a replacement
  actor is handed an existing one (it starts when the actor it replaces has ended), so no GPU is
  reserved twice. :meth:`EnginePlacement.release` removes the groups when the run's stages end (also
  on failure);
- ``accelerator_type`` on the actor, and on every bundle;
- ``concurrency: [min, max]``: an autoscaling actor pool.
"""

from __future__ import annotations

from typing import Any

from limits_ray.config import EngineResources

__all__ = ["EnginePlacement", "vllm_parallel_kwargs"]


def vllm_parallel_kwargs(resources: EngineResources) -> dict[str, Any]:
    """``vllm.LLM`` arguments for the engine's size, its executor backend always explicit.

    One device: vLLM's in-process ``uni`` executor; several: the configured ``mp`` or ``ray``.
    """
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": resources.tensor_parallel_size,
        "pipeline_parallel_size": resources.pipeline_parallel_size,
        "distributed_executor_backend": "uni" if resources.gpus_per_engine == 1 else resources.distributed_executor_backend,
    }
    if resources.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = resources.gpu_memory_utilization
    return kwargs


class EnginePlacement:
    """Remote arguments, actor pool and placement groups of one stage's actors (see the module doc)."""

    def __init__(self, resources: EngineResources, engine: bool) -> None:
        self.resources = resources
        self.engine = engine
        self.groups: list[Any] = []
        self.handed = 0
        self.closed = False

    @property
    def uses_placement_groups(self) -> bool:
        """Whether actors start inside placement groups (a multi-GPU engine on the ``ray`` backend)."""
        resources = self.resources
        return self.engine and resources.gpus_per_engine > 1 and resources.distributed_executor_backend == "ray"

    def remote_args(self) -> dict[str, Any]:
        """Keyword arguments for ``map_batches``: resources per actor, or the placement-group function."""
        resources = self.resources
        args: dict[str, Any] = {"num_cpus": resources.num_cpus}
        if resources.accelerator_type:
            args["accelerator_type"] = resources.accelerator_type
        if self.uses_placement_groups:
            args["num_gpus"] = 0
            args["ray_remote_args_fn"] = self.placement_group
        else:
            args["num_gpus"] = resources.num_gpus * (resources.gpus_per_engine if self.engine else 1)
        return args

    def pool(self, calls_per_actor: int = 1):
        """The stage's ``ActorPoolStrategy``: fixed size, or autoscaling between ``[min, max]``; with
        ``calls_per_actor > 1`` each actor runs that many calls at once, in threads (and has as many
        batches again queued)."""
        from ray.data import ActorPoolStrategy

        low, high = self.resources.concurrency[0], self.resources.concurrency[-1]
        size = {"size": low} if low == high else {"min_size": low, "max_size": high}
        if calls_per_actor > 1:
            size.update(max_concurrent_calls_per_actor=calls_per_actor, enable_true_multi_threading=True,
                        max_tasks_in_flight_per_actor=2 * calls_per_actor)
        return ActorPoolStrategy(**size)

    def bundles(self) -> list[dict[str, float]]:
        """One ``{GPU: 1, CPU: 1}`` bundle per engine shard (with the accelerator type's label); the first
        also holds the actor itself, so it has at least ``num_cpus`` CPUs."""
        bundle = {"GPU": 1.0, "CPU": 1.0}
        if self.resources.accelerator_type:
            bundle[f"accelerator_type:{self.resources.accelerator_type}"] = 0.001
        bundles = [dict(bundle) for _ in range(self.resources.gpus_per_engine)]
        bundles[0]["CPU"] = max(1.0, float(self.resources.num_cpus))
        return bundles

    def placement_group(self) -> dict[str, Any]:
        """Ray Data's ``ray_remote_args_fn``: the placement group for the actor being started.

        At most ``concurrency`` groups are made; later actors (a replacement, or one Ray Data asks for
        beyond the pool) are handed the existing groups in turn, so they wait for the actor they replace
        to end instead of reserving more GPUs. After :meth:`release`, nothing is reserved any more.
        """
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.closed:
            return {}
        if len(self.groups) < self.resources.max_actors:
            self.groups.append(ray.util.placement_group(self.bundles(), strategy="PACK"))
            group = self.groups[-1]
        else:
            group = self.groups[self.handed % len(self.groups)]
        self.handed += 1
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}

    def release(self) -> None:
        """Remove every placement group this stage made (their actors, if still alive, end with them)."""
        import ray

        self.closed = True
        while self.groups:
            ray.util.remove_placement_group(self.groups.pop())
