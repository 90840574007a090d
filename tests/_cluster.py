"""Ray clusters for tests: a head and worker nodes started as separate ``ray start`` processes on this
machine (each in a process group of its own, stopped by the test that started it, never by name)."""

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
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
GCS_PATIENCE = "RAY_gcs_rpc_server_reconnect_timeout_s"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (the probes stay open together, so the OS cannot hand one out twice)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def ray_env() -> dict[str, str]:
    """The environment for ``ray start`` and ``ray job submit``: token auth disabled on both (they must
    match), this virtual environment's ``ray`` first on PATH, no ``RAY_ADDRESS`` inherited."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop(GCS_PATIENCE, None)  # the cluster's own processes keep Ray's default (see tests/conftest.py)
    return env


@dataclass
class RayNode:
    """One ``ray start --block`` process and the node it runs (raylet, agents, workers)."""

    process: subprocess.Popen
    log: Path
    temp_dir: str

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")

    def raylet_pid(self) -> int:
        """The pid of this node's raylet (a direct child of its ``ray start`` process)."""
        for child in psutil.Process(self.process.pid).children():
            try:
                if child.name() == "raylet":
                    return child.pid
            except psutil.NoSuchProcess:  # a short-lived child that has just exited
                continue
        raise RuntimeError(f"no raylet under ray start pid {self.process.pid}:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        except ProcessLookupError:  # it had exited (its start failed, or its node was killed): nothing to stop
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start(arguments: list[str], agent_port: int, log: Path) -> RayNode:
    """``ray start`` with ``arguments``; the agent's HTTP port is a free one rather than Ray's fixed
    default (52365): a local Ray of another test still closing may hold that one, and the agent then
    serves no job API ("No available agent"). Draw every port of a cluster in one :func:`free_ports`
    call: drawn one at a time, two of them can come back equal."""
    # A temp dir of its own (short: Unix socket paths are limited) keeps the node's address file out
    # of /tmp/ray, where a later plain ray.init() would find it after the node is gone.
    temp_dir = tempfile.mkdtemp(prefix="lr-", dir="/tmp")
    command = [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}",
               f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats", *arguments]
    with log.open("w") as output:
        process = subprocess.Popen(command, env=ray_env(), stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return RayNode(process, log, temp_dir)


def start_head(log_dir: Path, num_cpus: int, num_gpus: int = 0) -> tuple[RayNode, str, str]:
    """A head with the dashboard (for ``ray job submit``); returns it, the dashboard URL and the GCS address."""
    dashboard_port, gcs_port, agent_port = free_ports(3)
    head = _start(["--head", f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"],
                  agent_port, log_dir / "head.log")
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/api/version", timeout=2), head, "the dashboard")
    except BaseException:
        head.stop()
        raise
    return head, url, f"127.0.0.1:{gcs_port}"


def start_workers(gcs_address: str, log_dir: Path, names: list[str], num_cpus: int, num_gpus: int) -> dict[str, RayNode]:
    """Worker nodes joining ``gcs_address``, each with (fake) GPUs and the custom resource ``{name: 1}``
    (not waited for: see :func:`wait_for_nodes`)."""
    workers: dict[str, RayNode] = {}
    for name, agent_port in zip(names, free_ports(len(names))):
        workers[name] = _start([f"--address={gcs_address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                                f"--resources={json.dumps({name: 1})}"], agent_port, log_dir / f"{name}.log")
    return workers


def wait_for_nodes(url: str, nodes: list[RayNode], timeout: float = 180) -> None:
    """Wait until the cluster behind ``url`` has ``len(nodes)`` live nodes."""
    from ray.util.state import list_nodes

    def all_alive() -> None:
        alive = list_nodes(address=url, filters=[("state", "=", "ALIVE")])
        if len(alive) < len(nodes):
            raise OSError(f"{len(alive)} of {len(nodes)} nodes alive")
    for node in nodes:
        node.check_running()
    _wait(all_alive, nodes[0], f"{len(nodes)} nodes", timeout)


def _wait(probe, node: RayNode, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        node.check_running()
        try:
            probe()
            return
        except Exception as error:  # noqa: BLE001 - not up yet, whatever the client says
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready in {timeout} s ({error}):\n{node.log.read_text()[-4000:]}")
            time.sleep(1)


def submit(url: str, working_dir: Path, runtime_env: dict, entrypoint: list[str], timeout: float = 1200,
           ) -> subprocess.CompletedProcess:
    """``ray job submit`` (waits for the job); retried while the head's job agent is not up yet."""
    command = [str(BIN / "ray"), "job", "submit", f"--address={url}", f"--working-dir={working_dir}",
               f"--runtime-env-json={json.dumps(runtime_env)}", "--", *entrypoint]
    for _ in range(60):  # the head's job agent can start minutes after its dashboard answers on a loaded machine
        result = subprocess.run(command, env=ray_env(), capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in result.stdout + result.stderr:
            return result
        time.sleep(5)
    return result
