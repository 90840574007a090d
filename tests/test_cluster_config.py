"""cluster.yaml must validate against Ray's own cluster-launcher schema, offline and without credentials.

``ray.autoscaler._private.util.prepare_config`` merges the provider's defaults (it only reads
ray/autoscaler/aws/defaults.yaml: no boto3, no network) and ``validate_config`` runs jsonschema with
ray/autoscaler/ray-schema.json plus Ray's cross-field checks: exactly what ``ray up`` does before it
talks to the cloud provider.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
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


def test_nothing_is_installed_when_a_node_starts(prepared):
    """Nodes run the prebuilt image as it is (so nodes started hours apart cannot drift): no setup or start
    command installs anything, and no file mount replaces the image's project."""
    for name, node in prepared["available_node_types"].items():
        commands = [*prepared["initialization_commands"], *prepared["setup_commands"],
                    *node.get("worker_setup_commands", prepared["worker_setup_commands"]), *prepared["head_setup_commands"]]
        assert not [command for command in commands if re.search(r"\b(pip|uv|conda|apt(-get)?)\b.*\binstall\b", command)], name
    assert set(prepared["file_mounts"]) == {"~/.ray/auth_token"}


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
GIB = 2**30
# Host memory (GiB), GPUs and usable memory per GPU (GiB) of the instance types cluster.yaml may name
# (AWS's published sizes; an A10G has 24 GB, 22.5 GiB of it usable).
INSTANCE_SIZES = {"g5.xlarge": (16, 1, 22.5), "g5.2xlarge": (32, 1, 22.5), "g5.4xlarge": (64, 1, 22.5),
                  "g5.12xlarge": (192, 4, 22.5), "g5.48xlarge": (768, 8, 22.5), "g6e.xlarge": (32, 1, 44.5),
                  "p4d.24xlarge": (1152, 8, 39.4), "p5.48xlarge": (2048, 8, 79.1)}
# Parameters of the models the GPU configs name (by directory name): a config naming another model fails
# here until its size is added.
MODEL_PARAMETERS = {
    "zephyr-7b-beta": 7.24e9, "zephyr-7b-safety-rm": 7.11e9,  # Mistral-7B; the reward model has no LM head
    "EleutherAI_pythia-1b-deduped__sft__tldr": 1.01e9, "EleutherAI_pythia-1b-deduped__reward__tldr": 1.01e9,
}
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_SHARE = 0.2  # of what an engine claims, at least this much must be left for its KV cache and activations
VLLM_DEFAULT_SHARE = 0.92  # vllm/config/cache.py, CacheConfig.gpu_memory_utilization


def _ray_pin() -> str:
    pyproject = (REPO / "pyproject.toml").read_text()
    return next(line.split("==")[1].strip('", ') for line in pyproject.splitlines() if line.strip().startswith('"ray['))


def _version() -> str:
    return re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_every_node_runs_the_image_built_from_the_dockerfile_on_ray_s_pinned_release(raw):
    image = raw["docker"]["image"]
    assert image.endswith(f"/limits-ray:{_version()}"), image
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{_ray_pin()}-py311-gpu" in dockerfile  # Ray's image of the pinned version
    assert f"docker build -f docker/Dockerfile -t {image} ." in dockerfile and f"docker push {image}" in dockerfile
    assert 'pip install --no-cache-dir -e ".[gpu]" "boto3' in dockerfile  # the stack and the head's autoscaler
    registry = image.split("/")[0]
    assert any("docker login" in command and command.endswith(registry) for command in raw["initialization_commands"])


def _bucket(raw) -> str:
    roots = {part.split("=", 1)[1] for command in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
             for part in command.split() if part.startswith("LIMITS_RAY_ROOT=")}
    assert len(roots) == 1, roots
    return next(iter(roots)).removeprefix("s3://").split("/")[0]


def _mirror_command(raw) -> str:
    [command] = [command for command in raw["setup_commands"] if "copy_files" in command]
    return command


def _mirror(raw) -> tuple[str, str]:
    """The model mirror of the setup commands: (source URI, local directory)."""
    return re.search(r"copy_files\('([^']+)', '([^']+)'", _mirror_command(raw)).groups()


def test_every_node_can_write_the_store_and_read_the_models(raw):
    """Each node type has an instance profile (Ray attaches its default one to the head only); the
    policies in iam/ give both the bucket of LIMITS_RAY_ROOT (store and model mirror) and the image, and
    the head may start workers with theirs."""
    bucket = _bucket(raw)
    assert _mirror(raw)[0].startswith(f"s3://{bucket}/")
    profiles = {}
    for name, node in raw["available_node_types"].items():
        profile = node["node_config"]["IamInstanceProfile"]["Name"]
        policy = json.loads((REPO / "iam" / f"{profile}.json").read_text())
        allowed = {(action, resource) for statement in policy["Statement"] if statement["Effect"] == "Allow"
                   for action in statement["Action"] for resource in
                   (statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]])}
        for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject"):
            assert (action, f"arn:aws:s3:::{bucket}/*") in allowed, (name, action)
        assert ("s3:ListBucket", f"arn:aws:s3:::{bucket}") in allowed, name
        assert ("ecr:BatchGetImage", "*") in allowed, name
        profiles[name] = (profile, allowed)
    head_profile, head_allowed = profiles.pop(raw["head_node_type"])
    assert ("ec2:RunInstances", "*") in head_allowed
    for name, (profile, _) in profiles.items():
        assert profile != head_profile, f"{name} would get the head's rights"
        assert ("iam:PassRole", f"arn:aws:iam::*:role/{profile}") in head_allowed, name


def test_the_model_mirror_copies_the_bucket_s_models_to_every_node(raw, s3_bucket, tmp_path):
    """The setup command itself, run against an S3 server with the bucket and directory swapped for the
    test's: every file of the models/ prefix arrives, nested directories included."""
    import pyarrow.fs as pafs

    uri, endpoint = s3_bucket
    source, target = _mirror(raw)
    remote = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")
    files = {"zephyr-7b-beta/config.json": b"{}", "zephyr-7b-beta/model-00001.safetensors": b"weights",
             "rm/tokenizer/vocab.json": b"[]"}
    for name, data in files.items():
        with remote.open_output_stream(f"{uri.removeprefix('s3://')}/models/{name}") as stream:
            stream.write(data)
    local = tmp_path / "models"
    command = _mirror_command(raw).replace(source, f"{uri}/models").replace(target, str(local))
    command = command.replace("python ", f"{sys.executable} ", 1)
    env = {"AWS_ENDPOINT_URL": f"http://{endpoint}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    subprocess.run(command, shell=True, check=True, env=env, timeout=120)
    assert {str(path.relative_to(local)): path.read_bytes() for path in local.rglob("*") if path.is_file()} == files


def _gpu_configs() -> dict:
    from limits_ray.config import JobConfig, load_yaml

    configs = {path.name: load_yaml(JobConfig, path) for path in sorted((REPO / "configs").glob("*.yaml"))}
    return {name: config for name, config in configs.items()
            if any(stage.num_gpus for stage in (config.generation, *config.rewards))}


def _model_stages(config) -> list:
    return [("generation", config.generation)] + [(f"rewards[{reward.name}]", reward) for reward in config.rewards
                                                   if reward.kind != "function"]


def test_the_gpu_configs_are_the_paper_setups():
    assert sorted(_gpu_configs()) == ["pythia_tldr.yaml", "zephyr_safety.yaml"]


def test_every_gpu_config_names_models_every_node_reads(raw):
    """A model is a directory of the mirror (every node has it at the same path) or a hub name pinned to a
    revision; never a node-local path or a floating hub name."""
    mirror = _mirror(raw)[1]
    for name, config in _gpu_configs().items():
        for key, stage in _model_stages(config):
            in_mirror = stage.model.startswith(mirror.rstrip("/") + "/")
            pinned_hub = not stage.model.startswith(("/", ".")) and bool(stage.revision)
            assert in_mirror or pinned_hub, f"{name}: {key}.model {stage.model!r}"


def _fits(stage, node: dict) -> tuple[bool, str]:
    """Whether one engine of ``stage`` fits a node of the type: its GPUs, their memory and the host's."""
    memory_gib, gpus, gpu_gib = INSTANCE_SIZES[node["node_config"]["InstanceType"]]
    engine_gpus = stage.gpus_per_engine if stage.gpus_per_engine > 1 else math.ceil(stage.num_gpus)
    weights_per_gpu = MODEL_PARAMETERS[Path(stage.model).name] * BYTES[stage.engine_dtype] / stage.gpus_per_engine
    share = stage.gpu_memory_utilization or VLLM_DEFAULT_SHARE  # of each GPU (a fraction of a GPU: at most num_gpus)
    checks = {
        "GPUs": engine_gpus <= gpus,
        "GPU memory": weights_per_gpu <= (1 - KV_SHARE) * share * gpu_gib * GIB,
        "host memory": 0.7 * memory_gib * GIB / gpus >= 1.5 * weights_per_gpu,  # weights pass through host memory
    }
    return all(checks.values()), ", ".join(name for name, ok in checks.items() if not ok)


def test_every_gpu_stage_of_every_shipped_config_fits_a_worker_type(raw):
    """GPUs per engine, its weights in the claimed share of each GPU's memory with room left for the KV
    cache, and the weights in host memory next to Ray's object store (30% of it)."""
    workers = gpu_worker_types(raw)
    for name, config in _gpu_configs().items():
        for key, stage in _model_stages(config):
            fits = {node_name: _fits(stage, node) for node_name, node in workers.items()}
            assert any(ok for ok, _ in fits.values()), f"{name}: {key} fits no worker type: {fits}"


def test_a_tensor_parallel_engine_has_a_worker_type_with_its_gpus(raw):
    """zephyr_safety.yaml's commented option (tensor_parallel_size: 2 on the mp backend: one node) and a
    4-way engine fit the multi-GPU worker type; neither fits a one-GPU worker, where it would wait for ever."""
    import dataclasses

    zephyr = _gpu_configs()["zephyr_safety.yaml"]
    workers = gpu_worker_types(raw)
    for size in (2, 4):
        stage = dataclasses.replace(zephyr.generation, tensor_parallel_size=size)
        fitting = [node_name for node_name, node in workers.items() if _fits(stage, node)[0]]
        assert fitting and all(workers[node_name]["resources"]["GPU"] >= size for node_name in fitting), (size, fitting)
        assert not _fits(stage, workers["gpu_worker"])[0]


def test_the_memory_checks_are_not_vacuous(raw):
    """A 7B engine in float32 (29 GB) does not fit a 24 GB A10G, nor one in bf16 on half of it; a 7B
    model in bf16 does not fit g5.xlarge's 16 GiB of host memory."""
    import dataclasses

    zephyr = _gpu_configs()["zephyr_safety.yaml"]
    worker = gpu_worker_types(raw)["gpu_worker"]
    assert _fits(dataclasses.replace(zephyr.generation, dtype="float32"), worker) == (False, "GPU memory, host memory")
    half = dataclasses.replace(zephyr.generation, num_gpus=0.5, gpu_memory_utilization=0.5)
    assert _fits(half, worker) == (False, "GPU memory")
    small = {"node_config": {"InstanceType": "g5.xlarge"}}
    assert _fits(zephyr.generation, small) == (False, "host memory")
