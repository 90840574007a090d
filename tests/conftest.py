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
