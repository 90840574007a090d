"""Reliability on the real pipeline: killed actors, killed drivers, failing rewards, a broken store."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest
import yaml

from limits_ray.config import JobConfig, from_mapping
from limits_ray.pipeline.faults import TEST_FAULTS_ENV
from limits_ray.pipeline.prompts import prompt_id_for
from limits_ray.pipeline.stages import PipelineError
from limits_ray.runs.job import run_job

from _results import assert_same_frontier, assert_store_has_each_sample_once, frontier, stored_parts
from _tiny import tiny_job_mapping

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sat on the", "Once upon a time", "The river ran quietly past"]
FAULTY_REWARDS = '''
import math
import pathlib
import time


def nan_for_river(prompts, responses):
    return [math.nan if "river" in prompt else len(response) / 10.0 for prompt, response in zip(prompts, responses)]


def raise_for_river(prompts, responses):
    if any("river" in prompt for prompt in prompts):
        raise RuntimeError("the river reward is broken")
    return [len(response) / 10.0 for response in responses]
'''


@pytest.fixture(scope="module")
def ray_with_faulty_rewards(tmp_path_factory):
    """Local Ray whose workers can import the test's reward module (through PYTHONPATH) and see the
    directory where tests arm engine faults (``$LIMITS_RAY_TEST_FAULTS``, see limits_ray.pipeline.faults)."""
    import ray

    module_dir = tmp_path_factory.mktemp("faulty_rewards")
    (module_dir / "faulty_rewards.py").write_text(FAULTY_REWARDS)
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(module_dir), previous]))
    os.environ[TEST_FAULTS_ENV] = str(module_dir)
    sys.path.insert(0, str(module_dir))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield module_dir
    ray.shutdown()
    sys.path.remove(str(module_dir))
    os.environ.pop(TEST_FAULTS_ENV)
    if previous is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = previous


def _mapping(models, out_dir: Path, **overrides) -> dict:
    mapping = tiny_job_mapping(models, out_dir, prompts={"inline": PROMPTS}, **overrides)
    mapping["generation"]["samples_per_prompt"] = 128
    mapping["store"] = {**mapping.get("store", {}), "batch_samples": 16}  # a part per round: kills find some stored
    mapping["rewards"] = [reward for reward in mapping["rewards"] if reward["name"] in ("rm_b", "length")]
    mapping["analysis"]["align"] = ["rm_b", "length"]
    return mapping


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory, ray_with_faulty_rewards) -> Path:
    """An uninterrupted run to compare every interrupted one with."""
    out_dir = tmp_path_factory.mktemp("reference")
    run_job(from_mapping(JobConfig, _mapping(tiny_models, out_dir)))
    return out_dir


def test_killed_actors_are_restarted_and_nothing_is_counted_twice(reference, tiny_models, tmp_path):
    config = from_mapping(JobConfig, _mapping(tiny_models, tmp_path))
    killed: list[int] = []

    def kill_workers_mid_run() -> None:
        deadline = time.monotonic() + 300
        while stored_parts(Path(config.store_uri)) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in psutil.process_iter(["cmdline"]):
            if process.info["cmdline"] and process.info["cmdline"][0].startswith("ray::MapWorker"):
                process.kill()
                killed.append(process.pid)

    killer = threading.Thread(target=kill_workers_mid_run)
    killer.start()
    _, report = run_job(config)
    killer.join()
    assert killed, "no actor process was found to kill"
    assert stored_parts(Path(config.store_uri)) > 0 and report.quarantined == []
    assert_store_has_each_sample_once(Path(config.store_uri), 3 * 128)
    assert_same_frontier(reference, tmp_path)


def test_driver_killed_three_times_gives_the_same_frontier(reference, tiny_models, tmp_path):
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(_mapping(tiny_models, tmp_path / "out", ray_address="")))
    store = tmp_path / "out" / "store"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, str(REPO / "jobs" / "frontier.py"), "--config", str(config_path)]
    chance = random.Random(3)
    interrupted = 0
    for _ in range(3):
        before = stored_parts(store)
        driver = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while stored_parts(store) == before and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(chance.uniform(0.0, 0.5))
        if driver.poll() is None:  # a run that already finished (its rounds were all stored) is not killed
            os.killpg(driver.pid, signal.SIGKILL)
            interrupted += 1
        driver.wait()
    assert interrupted >= 1 and stored_parts(store) > 0
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "from the store" in finished.stdout
    assert_store_has_each_sample_once(store, 3 * 128)
    assert_same_frontier(reference, tmp_path / "out")


def test_an_actor_whose_start_fails_is_retried_also_when_it_replaces_a_faulted_one(tmp_path, ray_with_faulty_rewards):
    """The constructor of a generation actor raises (as vLLM's start-up check does while its GPU still holds
    the memory of the engine it replaces) twice: at the first start, and when it restarts after a batch
    hung past timeout_s. With Ray Data 2.60's defaults either stops the job (no retry of a constructor;
    no actor death tolerated at start; an actor whose constructor raised is never restarted by Ray);
    the pipeline sets them (limits_ray.pipeline.stages.tolerate_start_deaths) and the run completes."""
    faults = ray_with_faulty_rewards
    (faults / "generate.start_death").touch()
    (faults / "generate.hang").touch()

    def arm_again_once_the_hang_fired() -> None:
        deadline = time.monotonic() + 120
        while not (faults / "generate.hang.fired").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (faults / "generate.start_death.fired").rename(faults / "generate.start_death.fired-first")
        (faults / "generate.start_death").touch()

    mapping = {
        "name": "start-death", "output_dir": str(tmp_path), "ray_address": "local", "prompts": {"inline": PROMPTS},
        "generation": {"kind": "synthetic", "samples_per_prompt": 128, "n": 16, "batch_size": 1, "num_cpus": 0.25,
                       "timeout_s": 5},
        "rewards": [{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                     "num_cpus": 0.25}],
        "analysis": {"betas": "0.1:10:3", "align": ["length"], "best_of_n": False, "convergence": False},
    }
    armer = threading.Thread(target=arm_again_once_the_hang_fired)
    armer.start()
    _, report = run_job(from_mapping(JobConfig, mapping))
    armer.join()
    fired = sorted(path.name for path in faults.glob("generate.*"))
    assert fired == ["generate.hang.fired", "generate.start_death.fired", "generate.start_death.fired-first"], fired
    assert report.quarantined == []
    assert_store_has_each_sample_once(tmp_path / "store", 3 * 128)


def test_a_nan_reward_beyond_the_quarantined_fraction_stops_the_run(tiny_models, tmp_path, ray_with_faulty_rewards):
    mapping = _mapping(tiny_models, tmp_path)
    mapping["rewards"].append({"name": "bad", "kind": "function", "function": "faulty_rewards:nan_for_river",
                               "num_cpus": 0.25})
    with pytest.raises(PipelineError, match=r"of 24 rounds were quarantined, more than max_quarantined_fraction "
                                            r"\(0.01\): .* in score_bad: ValueError: reward 'bad' is nan"):
        run_job(from_mapping(JobConfig, mapping))


def test_a_nan_reward_quarantines_its_prompt_and_names_it(tiny_models, tmp_path, ray_with_faulty_rewards):
    mapping = _mapping(tiny_models, tmp_path, max_quarantined_fraction=0.5)
    mapping["rewards"].append({"name": "bad", "kind": "function", "function": "faulty_rewards:nan_for_river",
                               "num_cpus": 0.25})
    _, report = run_job(from_mapping(JobConfig, mapping))
    river = {record["prompt_id"] for record in report.quarantined}
    assert len(river) == 1
    assert all("'bad' is nan" in record["error"] and record["stage"] == "score_bad" for record in report.quarantined)
    frontier_prompts = set(frontier(tmp_path)["prompt_id"].to_pylist())
    assert len(frontier_prompts) == 2 and not frontier_prompts & river


def test_fail_fast_stops_at_a_raising_reward_and_keeps_finished_rounds(tiny_models, tmp_path, ray_with_faulty_rewards):
    mapping = _mapping(tiny_models, tmp_path, fail_fast=True)
    mapping["rewards"].append({"name": "bad", "kind": "function", "function": "faulty_rewards:raise_for_river",
                               "num_cpus": 0.25})
    river = prompt_id_for("The river ran quietly past")
    with pytest.raises(PipelineError, match=rf"prompt_id '{river}' round \d+ failed in score_bad: "
                                            "RuntimeError: the river reward is broken"):
        run_job(from_mapping(JobConfig, mapping))
    # Whatever finished before the failure stays in the store, in whole rounds, and never a round of
    # the failing prompt. (How much finished depends on the order Ray Data hands rounds out in.)
    samples = tmp_path / "store" / "samples"
    if samples.is_dir():
        stored = ds.dataset(str(samples), format="parquet").to_table()
        assert stored.num_rows % 16 == 0
        assert river not in set(stored["prompt_id"].to_pylist())


def test_a_store_written_by_another_setup_is_refused(tiny_models, tmp_path, reference):
    mapping = _mapping(tiny_models, tmp_path)
    mapping["store"] = {"path": str(reference / "store")}
    mapping["generation"]["temperature"] = 0.7
    with pytest.raises(ValueError, match="different setup.*sampling"):
        run_job(from_mapping(JobConfig, mapping))

