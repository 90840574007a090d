"""`ray job submit` of the tiny job to a local Ray head started by the test (and stopped by it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from limits_ray.io import SCHEMAS
from _tiny import tiny_job_mapping

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (the probes stay open together, so the OS cannot hand one out twice)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the dashboard at {url} did not answer in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head of our own (token auth disabled, as the CLI must match), killed with its process group."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port, gcs_port, agent_port = _free_ports(3)
    log = tmp_path / "head.log"
    # A temp dir of its own (short: Unix socket paths are limited) keeps this head's address file out
    # of /tmp/ray, where a later plain ray.init() would find it after the head is gone.
    temp_dir = tempfile.mkdtemp(prefix="lr-", dir="/tmp")
    command = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        # the job agent's HTTP port, free rather than Ray's fixed default (52365): a local Ray of another test
        # still closing holds that one, and the agent then serves no job API ("No available agent")
        f"--dashboard-agent-listen-port={agent_port}",
        "--num-cpus=4", "--disable-usage-stats",
    ]
    with log.open("w") as output:
        head = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(url, head, log)
        yield url, env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except ProcessLookupError:  # the head had exited (its start failed): the error above says why
            pass
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_tiny_job_with_outputs_below_limits_ray_root(ray_head, tiny_models, tmp_path):
    """The README's rule: under ``ray job submit --working-dir``, a relative output_dir resolves below
    ``$LIMITS_RAY_ROOT`` (a path or bucket URI every node reaches), not in the job's working-dir copy."""
    url, env = ray_head
    root = tmp_path / "root"
    out_dir = root / "runs" / "submitted"
    mapping = tiny_job_mapping(tiny_models, Path("runs/submitted"), ray_address="",
                               prompts={"inline": ["The cat sat on the", "Once upon a time"]})
    mapping["generation"]["samples_per_prompt"] = 32
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(mapping))
    runtime_env = json.dumps({"env_vars": {"LIMITS_RAY_ROOT": str(root)}})
    command = [str(BIN / "ray"), "job", "submit", f"--address={url}", f"--working-dir={REPO}",
               f"--runtime-env-json={runtime_env}", "--", "python", "jobs/frontier.py", "--config", str(config_path)]
    for _ in range(60):  # the head's job agent can start minutes after its dashboard answers on a loaded machine
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stdout[-6000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    for name, schema in SCHEMAS.items():
        table = pq.read_table(out_dir / f"{name}.parquet")
        assert table.schema.equals(schema) and table.num_rows > 0
    assert set(pq.read_table(out_dir / "frontier.parquet")["n"].to_pylist()) == {32}
    assert (out_dir / "frontier.png").stat().st_size > 10_000
    assert (root / "runs" / "submitted" / "store" / "manifest.json").is_file()
