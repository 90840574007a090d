"""cluster.yaml must validate against Ray's own cluster-launcher schema, offline and without credentials.

``ray.autoscaler._private.util.prepare_config`` merges the provider's defaults (it only reads
ray/autoscaler/aws/defaults.yaml: no boto3, no network) and ``validate_config`` runs jsonschema with
ray/autoscaler/ray-schema.json plus Ray's cross-field checks: exactly what ``ray up`` does before it
talks to the cloud provider.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def raw() -> dict:
    with CLUSTER_YAML.open() as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return prepare_config(copy.deepcopy(raw))


def gpu_worker_types(config: dict) -> dict[str, dict]:
    return {
        name: node for name, node in config["available_node_types"].items()
        if name != config["head_node_type"] and node["resources"].get("GPU", 0) > 0
    }


def test_raw_file_matches_ray_schema(raw):
    jsonschema.validate(raw, json.loads(RAY_SCHEMA.read_text()))


def test_ray_validate_config_accepts_prepared_config(prepared):
    validate_config(prepared)  # raises on any schema or cross-field error


def test_aws_us_west_2(raw):
    assert raw["provider"]["type"] == "aws"
    assert raw["provider"]["region"] == "us-west-2"


def test_head_is_cpu_only(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] > 0


def test_gpu_worker_autoscales_from_zero(raw):
    workers = gpu_worker_types(raw)
    assert workers, "cluster.yaml needs a worker type with GPU resources"
    for node in workers.values():
        assert node["min_workers"] == 0
        assert node["max_workers"] >= 1
        assert node["max_workers"] <= raw["max_workers"]


def test_gpu_worker_installs_the_gpu_extra(prepared):
    for name, node in gpu_worker_types(prepared).items():
        # a node type's own worker_setup_commands replace the merged global ones
        commands = node.get("worker_setup_commands", prepared["worker_setup_commands"])
        installs = [command for command in commands if "install" in command and ".[gpu]" in command]
        assert installs, f"{name}: no setup command installs the project with its gpu extra: {commands}"


def test_project_is_synced_to_the_install_directory(raw):
    assert raw["file_mounts"]["~/limits-ray"] == "."
    assert any("cd ~/limits-ray" in command for command in raw["setup_commands"])


def test_start_commands_agree_on_auth_mode(raw):
    def modes(commands: list[str]) -> set[str]:
        parts = [part for command in commands for part in command.split()]
        return {part.split("=", 1)[1] for part in parts if part.startswith("RAY_AUTH_MODE=")}

    head, worker = modes(raw["head_start_ray_commands"]), modes(raw["worker_start_ray_commands"])
    assert head and head == worker, (head, worker)
    assert any("ray start --head" in command for command in raw["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in command for command in raw["worker_start_ray_commands"])
    if head == {"token"}:
        assert "~/.ray/auth_token" in raw["file_mounts"], "token mode needs the token on every node"


def test_validation_is_not_vacuous(raw):
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # a typo Ray must reject
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


REPO = CLUSTER_YAML.parent
# Host memory (GiB) and GPUs of the instance types cluster.yaml may name (AWS's published sizes).
INSTANCE_SIZES = {"g5.xlarge": (16, 1), "g5.2xlarge": (32, 1), "g5.4xlarge": (64, 1), "g5.12xlarge": (192, 4),
                  "g5.48xlarge": (768, 8), "g6e.xlarge": (32, 1), "p4d.24xlarge": (1152, 8), "p5.48xlarge": (2048, 8)}
ZEPHYR_WEIGHTS_GB = 14.5  # 7.24e9 parameters in bf16


def _ray_pin() -> str:
    pyproject = (REPO / "pyproject.toml").read_text()
    return next(line.split("==")[1].strip('", ') for line in pyproject.splitlines() if line.strip().startswith('"ray['))


def test_every_node_starts_from_ray_s_release_image_of_the_pinned_version(raw):
    image = f"rayproject/ray:{_ray_pin()}-py311-gpu"
    assert raw["docker"]["image"] == image
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE={image}" in dockerfile  # the prebuilt image extends the same base
    assert 'pip install --no-cache-dir -e ".[gpu]"' in dockerfile


def test_gpu_workers_have_host_memory_for_a_7b_engine_next_to_the_object_store(raw):
    """vLLM reads the weights through host memory; Ray's object store takes 30% of it by default."""
    for name, node in gpu_worker_types(raw).items():
        memory_gib, gpus = INSTANCE_SIZES[node["node_config"]["InstanceType"]]
        assert node["resources"]["GPU"] == gpus, name
        assert 0.7 * memory_gib / gpus >= 1.5 * ZEPHYR_WEIGHTS_GB, (name, memory_gib, gpus)


def test_the_zephyr_config_fits_one_engine_per_worker_gpu(raw):
    from limits_ray.config import JobConfig, load_yaml

    config = load_yaml(JobConfig, REPO / "configs" / "zephyr_safety.yaml")
    gpus_per_node = min(node["resources"]["GPU"] for node in gpu_worker_types(raw).values())
    for stage in (config.generation, *[reward for reward in config.rewards if reward.kind != "function"]):
        assert stage.num_gpus * stage.gpus_per_engine <= gpus_per_node  # one engine never spans nodes here
