"""The job on object storage: store and results on an S3 server (moto, loopback), a killed run resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from limits_ray.config import JobConfig, from_mapping
from limits_ray.runs.job import run_job

from _tiny import tiny_job_mapping

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _mapping(models, output_dir: str, store: str = "", endpoint: str = "") -> dict:
    mapping = tiny_job_mapping(models, Path("unused"), prompts={"inline": ["The cat sat on the", "Once upon a time",
                                                                          "The river ran quietly past"]})
    mapping["output_dir"] = output_dir
    mapping["generation"].update(samples_per_prompt=96, n=16)
    mapping["rewards"] = [reward for reward in mapping["rewards"] if reward["name"] == "length"]
    mapping["analysis"] = {"betas": "0.1:10:5", "align": ["length"]}
    mapping["store"] = {"path": store, "buckets": 2, "batch_samples": 16}  # a part per round: the kill finds some
    if endpoint:
        mapping["storage"] = {"endpoint_override": endpoint}
    return mapping


def _frontier(table):
    return table.sort_by([("prompt_id", "ascending"), ("beta", "ascending")])


def _parts(filesystem: pafs.FileSystem, prefix: str) -> int:
    infos = filesystem.get_file_info(pafs.FileSelector(prefix, allow_not_found=True, recursive=True))
    return sum(1 for info in infos if info.base_name.startswith("part-"))


def test_a_killed_run_on_s3_resumes_and_equals_a_local_run(tiny_models, tmp_path, s3_bucket, ray_local):
    uri, endpoint = s3_bucket
    local, _ = run_job(from_mapping(JobConfig, _mapping(tiny_models, str(tmp_path / "local"))))

    config_path = tmp_path / "s3.yaml"
    mapping = _mapping(tiny_models, f"{uri}/out", store=f"{uri}/store", endpoint=endpoint)
    mapping["ray_address"] = ""
    config_path.write_text(yaml.safe_dump(mapping))
    filesystem = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")
    prefix = f"{uri.removeprefix('s3://')}/store/samples"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, str(REPO / "jobs" / "frontier.py"), "--config", str(config_path)],
                              env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _parts(filesystem, prefix) == 0 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    stored = _parts(filesystem, prefix)
    assert stored > 0, "the killed run stored nothing"

    resumed, report = run_job(from_mapping(JobConfig, mapping))
    assert report.rounds_from_store >= 1 and report.rounds_generated + report.rounds_from_store == 3 * 6
    got = _frontier(pq.read_table(f"{uri.removeprefix('s3://')}/out/frontier.parquet", filesystem=filesystem))
    want = _frontier(local.frontier)
    assert got["prompt_id"].to_pylist() == want["prompt_id"].to_pylist()
    for column in ("n", "gain", "gain_se", "kl", "kl_se", "ess"):
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=column)
    listed = filesystem.get_file_info(pafs.FileSelector(uri.removeprefix("s3://"), recursive=True))
    names = {info.base_name for info in listed}
    assert {"frontier_mean.parquet", "report.json", "frontier.png", "manifest.json"} <= names
    assert not [name for name in names if "partial" in name or name.startswith(".probe")]


def test_a_missing_bucket_fails_before_any_actor_starts(tiny_models, s3_server):
    mapping = _mapping(tiny_models, "s3://no-such-bucket/out", endpoint=s3_server)
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"output_dir s3://no-such-bucket/out: not writable .*bucket does not exist"):
        run_job(from_mapping(JobConfig, mapping))
    assert time.monotonic() - started < 30
