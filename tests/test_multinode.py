"""A multi-node cluster on this machine: a head and three worker nodes with fake GPUs, each a ``ray
start`` process of its own, and the tiny job sent to it with ``ray job submit``.

Generation is two tensor-parallel (TP=2, ``mp`` backend) vLLM engines of 2 GPUs each, and the reward
actors hold half a GPU each; the engines really run on CPU (fake GPUs only steer placement). A node
has 3 GPUs, so two engines can never share one, and whichever node is lost, the other two still have
room for every actor (the third node is the spare). The first run is uninterrupted: where its actors
ran is read back from Ray's state API. The second loses a node that runs an engine mid-run (its
raylet is killed) and must end with the first run's results.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from _cluster import start_head, start_workers, submit, wait_for_nodes
from _results import assert_same_frontier, assert_store_has_each_sample_once, frontier, stored_parts
from _tiny import tiny_job_mapping

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sat on the", "Once upon a time", "The river ran quietly past", "In the morning the"]
SAMPLES = 64
WORKERS = ["node_a", "node_b", "node_c"]
GPUS_PER_NODE = 3  # one engine (2 GPUs) per node at most; two nodes hold every actor (2 x 2 + 2 x 0.5)
# The engines run on CPU although Ray hands them (fake) GPUs: vLLM's CPU settings come from the job's env.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # TP workers share this machine's cores: no NUMA binding


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (no GPU; the job's driver) and worker nodes ``node_a``, ``node_b``, ``node_c`` with 3 fake GPUs each."""
    logs = tmp_path_factory.mktemp("cluster")
    head, url, gcs = start_head(logs, num_cpus=1)
    workers = {}
    try:
        workers = start_workers(gcs, logs, WORKERS, num_cpus=4, num_gpus=GPUS_PER_NODE)
        wait_for_nodes(url, [head, *workers.values()])
        yield url, workers
    finally:
        for node in [*workers.values(), head]:
            node.stop()


def _config(models, tmp_path: Path, name: str) -> Path:
    mapping = tiny_job_mapping(models, Path("runs") / name, ray_address="", prompts={"inline": PROMPTS})
    mapping["generation"].update(samples_per_prompt=SAMPLES, n=16, batch_size=1, num_cpus=0.5, num_gpus=1,
                                 tensor_parallel_size=2, distributed_executor_backend="mp", concurrency=2,
                                 dtype="float32")  # fake GPUs, CPU engines: not the GPU default, bfloat16
    mapping["rewards"] = [{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                           "num_cpus": 0.25, "num_gpus": 0.5, "concurrency": 2}]
    mapping["analysis"]["align"] = ["length"]
    mapping["store"] = {"batch_samples": 16}  # a part per round: the node is killed once some are stored
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def _submit(url: str, config: Path, root: Path):
    return submit(url, REPO, {"env_vars": {"LIMITS_RAY_ROOT": str(root), **ENGINE_ENV}},
                  ["python", "jobs/frontier.py", "--config", str(config)])


def _stage_actors(url: str, job_id: str = "", state: str = "") -> list[dict]:
    """Ray Data actors (of job ``job_id``, in ``state``, when given): id, node, GPUs and state of each."""
    from ray.util.state import list_actors

    filters = ([("job_id", "=", job_id)] if job_id else []) + ([("state", "=", state)] if state else [])
    actors = list_actors(address=url, detail=True, limit=10_000, filters=filters)
    return [{"id": actor.actor_id, "node": actor.node_id, "gpus": float(actor.required_resources.get("GPU", 0.0)),
             "state": actor.state}
            for actor in actors if "MapWorker" in (actor.repr_name or actor.class_name)]


def _node_names(url: str) -> dict[str, str]:
    from ray.util.state import list_nodes

    return {node.node_id: next((name for name in WORKERS if name in node.resources_total), "head")
            for node in list_nodes(address=url, detail=True)}


def _wait_for_a_busy_engine(url: str, runner: threading.Thread, timeout: float = 900) -> dict:
    """An engine actor (of the run now going: the earlier one's have ended) while it runs a batch."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while True:
        assert runner.is_alive() and time.monotonic() < deadline, "the run ended before an engine was seen working"
        for engine in [actor for actor in _stage_actors(url, state="ALIVE") if actor["gpus"] == 2]:
            if list_tasks(address=url, filters=[("actor_id", "=", engine["id"]), ("state", "=", "RUNNING")]):
                return engine
        time.sleep(0.5)


def _job_id(url: str, submit_output: str) -> str:
    """The Ray job id (what actors record) of the submission ``ray job submit`` printed."""
    import re

    from ray.util.state import list_jobs

    submission = re.search(r"Job '(\S+)' submitted successfully", submit_output).group(1)
    (job,) = [job for job in list_jobs(address=url) if job.submission_id == submission]
    return job.job_id


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_models, tmp_path_factory):
    url, _ = cluster
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result = _submit(url, _config(tiny_models, tmp_path, "whole"), tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return tmp_path / "runs" / "whole", _job_id(url, result.stdout)


def test_each_engine_holds_two_gpus_of_one_node_and_no_actor_runs_on_the_head(cluster, uninterrupted):
    url, _ = cluster
    out_dir, job_id = uninterrupted
    names = _node_names(url)
    actors = _stage_actors(url, job_id)
    engines = [actor for actor in actors if actor["gpus"] == 2]  # TP=2: tp x pp GPUs on the engine's actor
    rewards = [actor for actor in actors if actor["gpus"] == 0.5]
    assert len(engines) == 2 and len(rewards) == 2 and len(actors) == 4, actors
    assert len({actor["node"] for actor in engines}) == 2  # 3 GPUs a node: the engines are on two workers
    assert "head" not in {names[actor["node"]] for actor in actors}, actors
    assert set(frontier(out_dir)["n"].to_pylist()) == {SAMPLES}
    assert json.loads((out_dir / "report.json").read_text())["quarantined"] == []


def test_a_lost_worker_node_mid_run_leaves_the_results_unchanged(cluster, uninterrupted, tiny_models, tmp_path):
    url, workers = cluster
    reference, _ = uninterrupted
    out_dir = tmp_path / "runs" / "lost"
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=_submit(url, _config(tiny_models, tmp_path, "lost"), tmp_path)))
    runner.start()
    busy = _wait_for_a_busy_engine(url, runner)
    stored_at_kill = stored_parts(out_dir / "store")
    lost = _node_names(url)[busy["node"]]
    os.kill(workers[lost].raylet_pid(), signal.SIGKILL)
    runner.join()
    result = outcome["result"]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert stored_at_kill < stored_parts(out_dir / "store")  # the node was lost mid-run, with rounds left to store
    # Ray restarts the lost actors elsewhere, or (when the batches sent to the lost engine used up their
    # retries while Ray declared the node dead) the job starts the stages again from the store
    names = _node_names(url)
    engines = [actor for actor in _stage_actors(url, _job_id(url, result.stdout)) if actor["gpus"] == 2]
    assert all(actor["state"] == "DEAD" for actor in engines)
    # a new engine replaced the lost one: the same actor restarted off the lost node, or a new actor
    assert len(engines) > 2 or lost not in {names[actor["node"]] for actor in engines}, engines
    assert result.stdout.count("resuming from the sample store") <= 2  # cluster_retries
    report = json.loads((out_dir / "report.json").read_text())
    assert report["quarantined"] == []
    assert_store_has_each_sample_once(out_dir / "store", len(PROMPTS) * SAMPLES)
    assert_same_frontier(reference, out_dir, columns=("gain", "gain_se", "kl", "kl_se"))
