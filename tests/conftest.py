"""Shared fixtures: the tiny models, built once per session (see tests/_tiny.py)."""

from __future__ import annotations

import pytest

from _tiny import session_tiny_models
from limits_ray.tiny_models import TinyModels


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tokenizer, two causal LMs and two reward models, built locally."""
    return session_tiny_models(tmp_path_factory)
