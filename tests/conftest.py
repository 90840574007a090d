"""Shared fixtures: the tiny models, built once per session (see tests/_tiny.py)."""

from __future__ import annotations

import pytest

from _tiny import session_tiny_models
from limits_ray.tiny_models import TinyModels


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tokenizer, two causal LMs and two reward models, built locally."""
    return session_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of the test module's own (never a running cluster), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-protocol server (moto) on loopback for the session; yields ``endpoint`` (host:port).

    Credentials are dummies set in the environment, as a real deployment would set real ones.
    """
    import os

    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the session's S3 server; yields ``(uri, endpoint)``."""
    import uuid

    import pyarrow.fs as pafs

    name = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(name)
    yield f"s3://{name}", s3_server
