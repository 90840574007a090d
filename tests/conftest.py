"""Shared fixtures: the tiny models, built once per session (see tests/_tiny.py)."""

from __future__ import annotations

import os
import sys

# The tests start and stop many local Ray instances in this one process. A GCS client of a stopped
# instance that is still used after ``ray.shutdown()`` ends the process with exit status 1 once it has
# not reached its GCS for 60 s ("Failed to connect to GCS within 60 seconds ... The program will
# terminate", in a driver log here, 2.5 min after its shutdown): a pytest run that stops mid-way with
# no summary. Set before Ray is imported, this gives that client a day; clusters the tests start with
# ``ray start`` keep Ray's default (tests/_cluster.py).
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "86400")

import pytest

from limits_ray.tiny_models import TinyModels

from _tiny import session_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tokenizer, two causal LMs and two reward models, built locally."""
    return session_tiny_models(tmp_path_factory)


@pytest.fixture(autouse=True)
def no_llvmlite_in_the_test_process():
    """Fail the test that imports numba's llvmlite into the pytest process (arviz does, on import):
    vLLM's kernel registration scans every loaded module and breaks on llvmlite's objects, so every
    in-process vLLM engine started after it (tests/test_scoring.py, test_generation.py) would fail."""
    loaded_before = "llvmlite" in sys.modules
    yield
    assert loaded_before or "llvmlite" not in sys.modules, (
        "this test imported llvmlite (numba; arviz imports it) into the pytest process, which breaks every "
        "later in-process vLLM engine: run that code in a subprocess (see tests/test_psis.py)"
    )


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of the test module's own (never a running cluster), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-protocol server (moto's ``moto_server``) on loopback for the session; yields ``host:port``.

    It runs in a process of its own: moto imports Flask, whose context proxies break vLLM's kernel
    registration when both live in one process. Credentials are dummies set in the environment, as a
    real deployment would set real ones.
    """
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the session's S3 server; yields ``(uri, endpoint)``."""
    import uuid

    import pyarrow.fs as pafs

    name = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(name)
    yield f"s3://{name}", s3_server
