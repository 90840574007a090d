"""Bad config values are refused on the driver before Ray starts: one ``error:`` line, exit code 2.

One test per row of README's bad-config table, through the CLI's ``main``. The models here are
directories with a ``config.json`` only: validation never loads them, and no Ray starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from limits_ray.cli import main
from limits_ray.config import JobConfig, from_mapping
from limits_ray.runs.validate import validate_job


def _model(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return str(path)


@pytest.fixture
def good(tmp_path: Path) -> dict:
    return {
        "name": "bad-config",
        "output_dir": str(tmp_path / "out"),
        "prompts": {"inline": ["The cat sat on the"]},
        "generation": {"model": _model(tmp_path / "policy"), "samples_per_prompt": 32, "n": 16},
        "rewards": [
            {"name": "rm", "kind": "transformers", "model": _model(tmp_path / "reward")},
            {"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length"},
        ],
        "policies": [{"name": "blend", "model": _model(tmp_path / "blend")}],
    }


def _error(tmp_path: Path, config: dict, capsys: pytest.CaptureFixture, command: str = "run") -> str:
    """Run ``limits-ray <command> --config`` on ``config``; assert exit 2 and return its one stderr line."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([command, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


def _with(config: dict, edit) -> dict:
    config = copy.deepcopy(config)
    edit(config)
    return config


def test_a_good_config_passes(good):
    validate_job(from_mapping(JobConfig, good))


def test_a_reward_function_that_does_not_exist(tmp_path, good, capsys):
    config = _with(good, lambda c: c["rewards"][1].update(function="limits_ray.reward_functions:nope"))
    assert _error(tmp_path, config, capsys) == (
        "limits-ray run: error: rewards[length].function: module 'limits_ray.reward_functions' has no function "
        "'nope'; its functions: ['contains_word', 'response_length']"
    )


def test_a_reward_function_module_that_does_not_import(tmp_path, good, capsys):
    config = _with(good, lambda c: c["rewards"][1].update(function="no_such_module:score"))
    assert _error(tmp_path, config, capsys) == (
        "limits-ray run: error: rewards[length].function: cannot import module 'no_such_module' (No module named "
        "'no_such_module'); give module:function of an importable module"
    )


@pytest.mark.parametrize("key, value, line", [
    ("temperature", -1, "generation.temperature: -1.0 is refused by vLLM (temperature must be non-negative, got -1.0); "
                        "use a temperature >= 0 (1 samples the model as it is; 0 is greedy)"),
    ("top_p", 0, "generation.top_p: 0.0 is refused by vLLM (top_p must be in (0, 1], got 0.0); "
                 "use 0 < top_p <= 1 (1 keeps the whole distribution)"),
    ("max_tokens", 0, "generation.max_tokens: 0 is refused by vLLM (max_tokens must be at least 1, got 0); "
                      "use max_tokens >= 1"),
])
def test_sampling_parameters_vllm_refuses(tmp_path, good, capsys, key, value, line):
    config = _with(good, lambda c: c["generation"].update({key: value}))
    assert _error(tmp_path, config, capsys) == f"limits-ray run: error: {line}"


def test_a_prompts_file_that_does_not_exist(tmp_path, good, capsys):
    missing = str(tmp_path / "prompts.jsonl")
    config = _with(good, lambda c: c.update(prompts={"path": missing}))
    assert _error(tmp_path, config, capsys) == (
        f"limits-ray run: error: prompts.path: {missing!r} is not a file; give a .jsonl or .parquet file of prompts"
    )


def test_a_prompts_file_of_another_type(tmp_path, good, capsys):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\nhello\n")
    config = _with(good, lambda c: c.update(prompts={"path": str(path)}))
    assert _error(tmp_path, config, capsys) == (
        f"limits-ray run: error: prompts.path: {str(path)!r} has an unsupported type '.csv'; "
        "use one of ['.jsonl', '.ndjson', '.parquet', '.pq']"
    )


def test_a_model_path_that_does_not_exist(tmp_path, good, capsys):
    missing = str(tmp_path / "nowhere")
    config = _with(good, lambda c: c["generation"].update(model=missing))
    assert _error(tmp_path, config, capsys) == (
        f"limits-ray run: error: generation.model: model path {missing!r} does not exist; build it "
        "(limits-ray make-tiny-models runs/tiny-models for the tiny configs) or fix the path"
    )


def test_a_reward_model_directory_that_is_not_a_model(tmp_path, good, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = _with(good, lambda c: c["rewards"][0].update(model=str(empty)))
    assert _error(tmp_path, config, capsys) == (
        f"limits-ray run: error: rewards[rm].model: {str(empty)!r} is a directory without config.json, not a model; "
        "point it at a model directory"
    )


def test_a_policy_checkpoint_that_does_not_exist(tmp_path, good, capsys):
    missing = str(tmp_path / "policy_blend")
    config = _with(good, lambda c: c["policies"][0].update(model=missing))
    assert _error(tmp_path, config, capsys, command="compare") == (
        f"limits-ray compare: error: policies[blend].model: model path {missing!r} does not exist; build it "
        "(limits-ray make-tiny-models runs/tiny-models for the tiny configs) or fix the path"
    )


def test_an_alignment_reward_that_is_not_a_reward(tmp_path, good, capsys):
    config = _with(good, lambda c: c.update(analysis={"align": ["gold"]}))
    assert _error(tmp_path, config, capsys) == (
        "limits-ray run: error: analysis.align/analysis.evals: reward 'gold' uses columns ['gold'] that are not reward "
        "columns; available: ['rm', 'length']; name rewards of the rewards section"
    )


def test_an_actor_count_below_one(tmp_path, good, capsys):
    config = _with(good, lambda c: c["generation"].update(concurrency=0))
    message = _error(tmp_path, config, capsys)
    assert message.startswith("limits-ray run: error: ") and "config.yaml.generation" in message
    assert message.endswith("generation.concurrency must be N >= 1 or [min, max] with 1 <= min <= max, got [0]")
    config = _with(good, lambda c: c["generation"].update(batch_size=0))
    assert _error(tmp_path, config, capsys) == "limits-ray run: error: generation.batch_size: must be >= 1, got 0"


def test_an_output_dir_that_cannot_be_created(tmp_path, good, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = _with(good, lambda c: c.update(output_dir=str(blocker / "out")))
    message = _error(tmp_path, config, capsys)
    assert message.startswith(f"limits-ray run: error: output_dir {blocker / 'out'}: not writable (")
    assert "Not a directory" in message and message.endswith("; create it or fix the path")


def test_a_prompts_dataset_that_cannot_be_opened(tmp_path, good, capsys):
    missing = str(tmp_path / "prompts_dataset")
    config = _with(good, lambda c: c.update(prompts={"dataset": missing}))
    assert _error(tmp_path, config, capsys) == (
        f"limits-ray run: error: prompts.dataset: cannot open {missing!r} (FileNotFoundError: Couldn't find any data file "
        f"at {missing}.); give a Hugging Face dataset name (with network access) or a directory written by save_to_disk"
    )


def test_a_model_path_that_is_a_file(tmp_path, good, capsys):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    config = _with(good, lambda c: c["generation"].update(model=str(file)))
    assert _error(tmp_path, config, capsys) == (
        f"limits-ray run: error: generation.model: {str(file)!r} is a file, not a model directory; "
        "point it at a model directory"
    )


def test_a_revision_given_for_a_local_model_directory(tmp_path, good, capsys):
    config = _with(good, lambda c: c["rewards"][0].update(revision="v2"))
    assert _error(tmp_path, config, capsys) == (
        f"limits-ray run: error: rewards[rm].model: revision 'v2' is for hub models, but {good['rewards'][0]['model']!r} "
        "is a local directory (its files are fingerprinted instead); remove the revision or name the hub model"
    )


def test_hub_models_are_identified_by_name_and_revision_and_unpinned_ones_warned_of(good, caplog):
    from limits_ray.runs.identity import setup_identity

    pinned = _with(good, lambda c: c["generation"].update(model="org/base", revision="abc123"))
    unpinned = _with(good, lambda c: c["generation"].update(model="org/base"))
    assert setup_identity(from_mapping(JobConfig, pinned))["base_model"] == "org/base@abc123"
    assert setup_identity(from_mapping(JobConfig, unpinned))["base_model"] == "org/base"
    validate_job(from_mapping(JobConfig, pinned))
    assert "revision" not in caplog.text
    validate_job(from_mapping(JobConfig, unpinned))
    assert "generation.model: hub model 'org/base' has no revision" in caplog.text
    assert "pin its commit with generation.revision" in caplog.text
