"""Shared test helpers: the tiny models (built once per pytest session) and engine settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from limits_ray.config import JobConfig, from_mapping
from limits_ray.tiny_models import TinyModels, build_tiny_models

# Eager mode skips ~10-20 s of torch.compile warm-up per engine. (The dtype is a config key of its own,
# float32 by default on CPU: vLLM's "auto" would downcast the float32 tiny models.)
ENGINE_KWARGS = {"enforce_eager": True}


def session_tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The session's tiny models; the marker file makes every call after the first a no-op."""
    return build_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models", seed=0)


TINY_PROMPTS = ("The cat sat on the", "Once upon a time", "The river ran quietly past")


def tiny_job_mapping(models: TinyModels, out_dir: Path, **overrides: dict) -> dict:
    """Plain data for a small JobConfig on the tiny models (CPU, local Ray)."""
    mapping = {
        "name": "tiny-test",
        "output_dir": str(out_dir),
        "ray_address": "local",
        "prompts": {"inline": list(TINY_PROMPTS)},
        "generation": {
            "model": str(models.policy), "samples_per_prompt": 64, "n": 16, "max_tokens": 8,
            "batch_size": 2, "num_cpus": 0.5, "engine_kwargs": ENGINE_KWARGS,
        },
        "rewards": [
            {"name": "rm", "kind": "vllm", "model": str(models.reward), "batch_size": 64, "num_cpus": 0.5,
             "engine_kwargs": ENGINE_KWARGS},
            {"name": "rm_b", "kind": "transformers", "model": str(models.reward_b), "batch_size": 64, "num_cpus": 0.5},
            {"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
             "num_cpus": 0.25},
        ],
        "analysis": {"betas": "0.01:10:7", "align": ["rm", "rm_b", "mean(rm,rm_b)", "length"]},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(mapping.get(section), dict):
            mapping[section] = {**mapping[section], **values}
        else:
            mapping[section] = values
    return mapping


def tiny_job(models: TinyModels, out_dir: Path, **overrides: dict) -> JobConfig:
    """A JobConfig on the tiny models (see :func:`tiny_job_mapping`)."""
    return from_mapping(JobConfig, tiny_job_mapping(models, out_dir, **overrides))
