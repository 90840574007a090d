"""Engine placement: remote arguments per topology, and real actor pools on a local Ray with fake GPUs."""

from __future__ import annotations

import numpy as np
import pytest

from limits_ray.config import EngineResources, GenerationConfig, PolicyConfig, RewardModelConfig, from_mapping
from limits_ray.core.errors import ConfigError
from limits_ray.pipeline.placement import EnginePlacement, vllm_parallel_kwargs


def test_a_cpu_or_single_gpu_engine_reserves_its_devices_on_the_actor():
    cpu = EnginePlacement(EngineResources(num_cpus=2), engine=True)
    assert cpu.remote_args() == {"num_cpus": 2, "num_gpus": 0.0}
    gpu = EnginePlacement(EngineResources(num_gpus=0.5, accelerator_type="L4"), engine=True)
    assert gpu.remote_args() == {"num_cpus": 1.0, "num_gpus": 0.5, "accelerator_type": "L4"}
    assert vllm_parallel_kwargs(gpu.resources) == {
        "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "distributed_executor_backend": "uni"}


def test_a_multi_gpu_engine_reserves_every_shard_on_the_actor_with_mp():
    resources = EngineResources(num_gpus=1, tensor_parallel_size=2, pipeline_parallel_size=2, gpu_memory_utilization=0.8)
    placement = EnginePlacement(resources, engine=True)
    assert not placement.uses_placement_groups
    assert placement.remote_args() == {"num_cpus": 1.0, "num_gpus": 4}
    assert vllm_parallel_kwargs(resources) == {
        "tensor_parallel_size": 2, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp",
        "gpu_memory_utilization": 0.8}


def test_a_multi_gpu_engine_on_the_ray_backend_gets_a_placement_group_per_actor():
    resources = EngineResources(num_gpus=1, tensor_parallel_size=2, distributed_executor_backend="ray", accelerator_type="H100")
    placement = EnginePlacement(resources, engine=True)
    args = placement.remote_args()
    assert args["num_gpus"] == 0 and args["accelerator_type"] == "H100" and args["ray_remote_args_fn"] == placement.placement_group
    assert placement.bundles() == [{"GPU": 1.0, "CPU": 1.0, "accelerator_type:H100": 0.001}] * 2
    four_cpus = EngineResources(num_gpus=1, num_cpus=4, tensor_parallel_size=2, distributed_executor_backend="ray")
    assert [bundle["CPU"] for bundle in EnginePlacement(four_cpus, engine=True).bundles()] == [4.0, 1.0]  # the actor fits
    assert vllm_parallel_kwargs(resources)["distributed_executor_backend"] == "ray"


def test_a_function_reward_ignores_engine_sizes_and_keeps_its_gpus():
    reward = RewardModelConfig(name="len", kind="function", function="m:f", num_gpus=0.25)
    assert EnginePlacement(reward, engine=False).remote_args() == {"num_cpus": 1.0, "num_gpus": 0.25}


@pytest.mark.parametrize("mapping, message", [
    ({"concurrency": [4, 2]}, "concurrency must be N >= 1 or \\[min, max\\]"),
    ({"concurrency": 0}, "concurrency must be N >= 1"),
    ({"concurrency": [1, 2, 3]}, "concurrency must be N >= 1"),
    ({"tensor_parallel_size": 2, "num_gpus": 0.5}, "num_gpus must be 1 \\(one GPU per shard\\)"),
    ({"pipeline_parallel_size": 0}, "pipeline_parallel_size must be >= 1"),
    ({"distributed_executor_backend": "uni"}, "valid backends are \\['mp', 'ray'\\]"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must lie in"),
    ({"tensor_parallel_size": 2, "num_gpus": 1, "distributed_executor_backend": "ray", "concurrency": [1, 2]},
     "a fixed concurrency"),
    ({"concurrency": 1.5}, "concurrency\\[0\\]: expected int, got 1.5"),
    ({"engine_kwargs": {"tensor_parallel_size": 2}}, "engine_kwargs: \\['tensor_parallel_size'\\] set where the actors are placed"),
    ({"batches_in_flight": 0}, "batches_in_flight must be >= 1"),
])
def test_inconsistent_engine_settings_are_refused_naming_the_key(mapping, message):
    with pytest.raises(ConfigError, match=f"generation.*{message}"):
        from_mapping(GenerationConfig, {"model": "m", **mapping}, where="generation")


@pytest.mark.parametrize("where, mapping", [
    ("generation", {"model": "m", "num_gpus": 0.5}),
    ("generation", {"model": "m", "num_gpus": 0.5, "gpu_memory_utilization": 0.6}),
    ("rewards\\[rm\\]", {"name": "rm", "kind": "vllm", "model": "m", "num_gpus": 0.25, "gpu_memory_utilization": 0.9}),
    ("rewards\\[rm\\]", {"name": "rm", "kind": "transformers", "model": "m", "num_gpus": 0.25}),
])
def test_a_model_on_a_fraction_of_a_gpu_must_claim_at_most_that_fraction(where, mapping):
    """Two engines on one GPU each claim their gpu_memory_utilization of it (vLLM's default 0.92 would not
    leave the other its share): refused when the config loads, naming both keys."""
    cls = GenerationConfig if where == "generation" else RewardModelConfig
    with pytest.raises(ConfigError, match=rf"{where}.gpu_memory_utilization \(.*\) does not fit {where}.num_gpus "
                                          rf"\({mapping['num_gpus']:g}\).*at most {mapping['num_gpus']:g}"):
        from_mapping(cls, mapping, where=where.replace("\\", ""))
    fitted = from_mapping(cls, {**mapping, "gpu_memory_utilization": mapping["num_gpus"]})
    assert fitted.gpu_memory_utilization == mapping["num_gpus"]
    assert RewardModelConfig(name="len", kind="function", function="m:f", num_gpus=0.25).num_gpus == 0.25  # no model


def test_vllm_s_default_share_is_named_when_it_does_not_fit():
    with pytest.raises(ConfigError, match=r"\(unset: vLLM's default 0.92\)"):
        GenerationConfig(model="m", num_gpus=0.5)


def test_dtype_is_explicit_recorded_and_not_an_engine_kwarg():
    assert GenerationConfig(model="m").engine_dtype == "float32"  # CPU
    assert GenerationConfig(model="m", num_gpus=1).engine_dtype == "bfloat16"  # GPU
    assert RewardModelConfig(name="rm", kind="transformers", model="m", num_gpus=1, dtype="float16").engine_dtype == "float16"
    with pytest.raises(ConfigError, match=r"generation.dtype 'auto': valid dtypes are \['bfloat16', 'float16', 'float32'\]"):
        from_mapping(GenerationConfig, {"model": "m", "dtype": "auto"}, where="generation")
    with pytest.raises(ConfigError, match=r"rewards\[rm\].engine_kwargs: dtype set inside engine_kwargs; move it to "
                                          r"rewards\[rm\].dtype"):
        RewardModelConfig(name="rm", kind="vllm", model="m", engine_kwargs={"dtype": "float16"})
    with pytest.raises(ConfigError, match=r"policies\[p\].engine_kwargs: dtype"):
        PolicyConfig(name="p", model="m", engine_kwargs={"dtype": "float16"})


def test_every_stage_has_a_timeout_and_engines_a_stall_timeout():
    reward = RewardModelConfig(name="len", kind="function", function="m:f")
    generation = GenerationConfig(model="m")
    assert (reward.timeout_s, generation.timeout_s, generation.stall_timeout_s) == (1800.0, 1800.0, 300.0)
    with pytest.raises(ConfigError, match=r"rewards\[rm\].stall_timeout_s must be >= 0"):
        RewardModelConfig(name="rm", kind="vllm", model="m", stall_timeout_s=-1)
    with pytest.raises(ConfigError, match=r"rewards\[len\].timeout_s must be >= 0"):
        RewardModelConfig(name="len", kind="function", function="m:f", timeout_s=-5)


def test_parallelism_needs_a_vllm_engine():
    with pytest.raises(ConfigError, match="rewards\\[rm\\]: tensor and pipeline parallelism need a vllm engine"):
        RewardModelConfig(name="rm", kind="transformers", model="m", num_gpus=1, tensor_parallel_size=2)


def test_synthetic_generation_takes_no_device_settings():
    synthetic = from_mapping(GenerationConfig, {"kind": "synthetic", "num_gpus": 1, "tensor_parallel_size": 2,
                                                "concurrency": [1, 3]})
    assert synthetic.max_actors == 3  # the engine settings are ignored (documented), the pool is not


def test_batches_in_flight_are_concurrent_calls_in_threads_of_each_actor():
    placement = EnginePlacement(EngineResources(concurrency=(1, 3)), engine=True)
    one_at_a_time, three = placement.pool(), placement.pool(3)
    assert one_at_a_time.max_concurrent_calls_per_actor in (None, 1) and not one_at_a_time.enable_true_multi_threading
    assert three.max_concurrent_calls_per_actor == 3 and three.enable_true_multi_threading
    assert three.max_tasks_in_flight_per_actor == 6 and (three.min_size, three.max_size) == (1, 3)


def test_concurrency_is_a_fixed_pool_or_a_range():
    assert GenerationConfig(model="m", concurrency=3).concurrency == (3,)
    assert EngineResources(concurrency=[2, 5]).concurrency == (2, 5)
    ranged = from_mapping(GenerationConfig, {"model": "m", "concurrency": [1, 4]})
    assert ranged.concurrency == (1, 4) and ranged.max_actors == 4


# --------------------------------------------------------------------------------------------------
# Real actor pools on a local Ray instance with 4 fake GPUs (the probe stage runs no engine)


class Probe:
    """Reports where its actor runs: its placement group and the resources Ray assigned to it."""

    def __init__(self) -> None:
        import ray

        context = ray.get_runtime_context()
        self.group = context.get_placement_group_id() or ""
        self.gpus = float(context.get_assigned_resources().get("GPU", 0.0))
        self.actor = context.get_actor_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        return {"group": np.full(rows, self.group), "gpus": np.full(rows, self.gpus), "actor": np.full(rows, self.actor)}


@pytest.fixture(scope="module")
def fake_gpus():
    import sys

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Probe travels by value: workers cannot import tests
    ray.init(address="local", num_cpus=6, num_gpus=4, resources={"accelerator_type:H100": 4},
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _probe(placement: EnginePlacement, rows: int = 8) -> dict[str, np.ndarray]:
    import ray

    from limits_ray.pipeline.stages import remote_args_accepted

    with remote_args_accepted():
        dataset = ray.data.range(rows, override_num_blocks=rows).map_batches(
            Probe, compute=placement.pool(), batch_size=1, **placement.remote_args())
    batches = list(dataset.iter_batches(batch_size=None))  # one execution: each one starts its own actors
    return {name: np.concatenate([batch[name] for batch in batches]) for name in ("group", "gpus", "actor")}


@pytest.mark.slow
def test_ray_backend_actors_run_in_two_gpu_packs_that_are_removed_at_the_end(fake_gpus):
    from ray.util import placement_group_table

    placement = EnginePlacement(EngineResources(num_gpus=1, tensor_parallel_size=2, distributed_executor_backend="ray",
                                                concurrency=(2,), accelerator_type="H100"), engine=True)
    seen = _probe(placement)
    groups = {group.id.hex(): group for group in placement.groups}
    used = set(seen["group"])
    pairs = set(zip(seen["actor"], seen["group"]))
    # every actor that ran did so in a pack of its own; no more packs than the pool's actors (an extra
    # actor Ray Data may ask for is handed an existing pack, where it waits instead of reserving GPUs)
    assert len(groups) == 2 and used <= set(groups) and len(pairs) == len(used) == len(set(seen["actor"]))
    assert set(seen["gpus"]) == {0.0}  # the actor holds none: the bundles are for vLLM's workers
    for group in groups.values():
        table = placement_group_table(group)
        assert table["strategy"] == "PACK" and table["state"] == "CREATED"
        assert [bundle["GPU"] for bundle in table["bundles"].values()] == [1.0, 1.0]
    placement.release()
    assert placement.groups == []
    assert {placement_group_table(group)["state"] for group in groups.values()} == {"REMOVED"}


@pytest.mark.slow
def test_mp_backend_actors_hold_all_their_gpus_and_pools_autoscale_within_the_range(fake_gpus):
    placement = EnginePlacement(EngineResources(num_gpus=1, tensor_parallel_size=2, concurrency=(1, 2)), engine=True)
    seen = _probe(placement)
    assert set(seen["gpus"]) == {2.0} and set(seen["group"]) == {""}
    assert 1 <= len(set(seen["actor"])) <= 2  # 4 fake GPUs fit at most 2 engines of 2
    assert placement.groups == []
