"""Tests of limits_ray.config: beta grids, the analysis plan, from_mapping and job validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from limits_ray.config import (
    GenerationConfig,
    JobConfig,
    PromptsConfig,
    RewardModelConfig,
    StoreConfig,
    from_mapping,
    load_yaml,
)
from limits_ray.core.analysis import AnalysisConfig, parse_betas
from limits_ray.core.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# parse_betas
# ----------------------------------------------------------------------------------------------


def test_comma_list_is_sorted_and_deduplicated():
    assert parse_betas("0.1,1,10") == (0.1, 1.0, 10.0)
    assert parse_betas(" 10, 1 ,0.1 ") == (0.1, 1.0, 10.0)
    assert parse_betas("2,1,2,1e-3") == (1e-3, 1.0, 2.0)
    assert parse_betas("0.5,") == (0.5,)
    assert all(isinstance(b, float) for b in parse_betas("1,2"))


def test_log_spaced_grid_is_inclusive_and_geometric():
    grid = parse_betas("0.01:100:5")
    assert len(grid) == 5
    assert grid[0] == pytest.approx(0.01, rel=1e-14) and grid[-1] == pytest.approx(100.0, rel=1e-14)
    np.testing.assert_allclose(grid, [0.01, 0.1, 1.0, 10.0, 100.0], rtol=1e-13)
    grid = parse_betas("1e-3:1e3:61")
    ratios = np.diff(np.log(grid))
    np.testing.assert_allclose(ratios, math.log(1e6) / 60, rtol=1e-10)
    assert parse_betas("100:0.01:5") == pytest.approx(parse_betas("0.01:100:5"), rel=1e-14)  # sorted
    assert parse_betas("2:2:1") == (2.0,)


def test_numbers_and_lists():
    assert parse_betas(2) == (2.0,)
    assert parse_betas(0.5) == (0.5,)
    assert parse_betas([3, 1, 2.5]) == (1.0, 2.5, 3.0)
    assert parse_betas((1.0,)) == (1.0,)


@pytest.mark.parametrize("text", [
    "0,1", "-1", "1,-2", "0", "0:1:3", "-1:1:3", "1:0:3", "1:10:0", "1:10:-2", [0.0], [1.0, -1.0], -1.0, 0,
    "nan", "inf", "1,inf",
])
def test_non_positive_or_non_finite_betas_raise(text):
    with pytest.raises(ConfigError, match="beta"):
        parse_betas(text)


@pytest.mark.parametrize("text", ["", " , ", "a,b", "1:2", "1:2:3:4", []])
def test_malformed_grids_raise_config_error(text):
    with pytest.raises(ConfigError, match="betas"):
        parse_betas(text)


@pytest.mark.parametrize("text", ["0.1:10:many", "x:10:3", "0.1:y:3", "0.1:10:2.5"])
def test_malformed_log_grids_raise_config_error_naming_the_grid(text):
    # A config error, like every other bad grid, so that from_mapping prefixes the key and the
    # message shows the form to write (not a bare "invalid literal for int()").
    with pytest.raises(ConfigError) as error:
        parse_betas(text)
    assert text in str(error.value)


# ----------------------------------------------------------------------------------------------
# AnalysisConfig
# ----------------------------------------------------------------------------------------------

def test_analysis_defaults_and_normalisation():
    config = AnalysisConfig()
    assert len(config.betas) == 41
    assert config.betas[0] == pytest.approx(0.01) and config.betas[-1] == pytest.approx(100.0)
    assert config.best_of_n and config.convergence
    config = AnalysisConfig(betas="1,0.1", rewards="gold", align=["gold"], evals="gold")
    assert config.betas == (0.1, 1.0)
    assert config.rewards == ("gold",) and config.align == ("gold",) and config.evals == ("gold",)
    with pytest.raises(ConfigError, match="beta"):
        AnalysisConfig(betas="0,1")
    with pytest.raises(ConfigError, match="max\\(a,b\\)"):
        AnalysisConfig(align=("max(a,b)",))
    with pytest.raises(ConfigError):
        AnalysisConfig(evals=("1bad",))


def test_analysis_plan():
    plan = AnalysisConfig().plan(["a", "b"])
    assert [(align.name, [e.name for e in evals]) for align, evals in plan] == [("a", ["a"]), ("b", ["b"])]
    plan = AnalysisConfig(align=("mean(a,b)", "a"), evals=("c",)).plan(["a", "b", "c"])
    assert [(align.name, [e.name for e in evals]) for align, evals in plan] == [("mean(a,b)", ["c"]), ("a", ["c"])]
    with pytest.raises(ConfigError) as error:
        AnalysisConfig(align=("mean(a,zz)",)).plan(["a", "b"])
    assert "zz" in str(error.value) and "['a', 'b']" in str(error.value)
    with pytest.raises(ConfigError, match="gold"):
        AnalysisConfig(evals=("gold",)).plan(["a"])


# ----------------------------------------------------------------------------------------------
# from_mapping
# ----------------------------------------------------------------------------------------------

def job_mapping(**changes) -> dict:
    data = {
        "name": "run",
        "output_dir": "/tmp/limits-ray-out",
        "prompts": {"inline": ["Say hi.", "Tell a joke."]},
        "generation": {"model": "/models/base", "samples_per_prompt": 64, "n": 16},
        "rewards": [{"name": "gold", "kind": "vllm", "model": "/models/rm"},
                    {"name": "len", "kind": "function", "function": "mod:length"}],
    }
    data.update(changes)
    return data


def test_from_mapping_builds_nested_dataclasses():
    job = from_mapping(JobConfig, job_mapping(analysis={"betas": "0.1:10:3", "rewards": ["gold"], "best_of_n": False}))
    assert isinstance(job.prompts, PromptsConfig) and job.prompts.inline == ("Say hi.", "Tell a joke.")
    assert isinstance(job.generation, GenerationConfig) and job.generation.rounds == 4
    assert [r.name for r in job.rewards] == ["gold", "len"]
    assert all(isinstance(r, RewardModelConfig) for r in job.rewards)
    assert job.analysis.betas == pytest.approx((0.1, 1.0, 10.0))
    assert job.analysis.rewards == ("gold",) and job.analysis.best_of_n is False
    assert job.store == StoreConfig()
    assert str(Path(job.store_uri)) == "/tmp/limits-ray-out/store"
    assert str(from_mapping(JobConfig, job_mapping(store={"path": "/data/s"})).store_uri) == "/data/s"
    assert from_mapping(AnalysisConfig, None) == AnalysisConfig()


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        from_mapping(AnalysisConfig, {"betaz": "1,2"})
    message = str(error.value)
    assert "betaz" in message
    for valid in ("betas", "rewards", "align", "evals", "best_of_n", "convergence"):
        assert valid in message
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, job_mapping(generation={"model": "m", "temprature": 0.7}))
    message = str(error.value)
    assert "config.generation" in message and "temprature" in message and "temperature" in message
    with pytest.raises(ConfigError, match="colour"):
        from_mapping(JobConfig, job_mapping(colour="blue"))


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="config.generation.samples_per_prompt"):
        from_mapping(JobConfig, job_mapping(generation={"model": "m", "samples_per_prompt": "lots"}))
    with pytest.raises(ConfigError, match="config.analysis.best_of_n"):
        from_mapping(JobConfig, job_mapping(analysis={"best_of_n": "yes"}))
    with pytest.raises(ConfigError, match="config.rewards"):
        from_mapping(JobConfig, job_mapping(rewards={"name": "gold", "kind": "vllm", "model": "m"}))
    with pytest.raises(ConfigError, match="config.generation.engine_kwargs"):
        from_mapping(JobConfig, job_mapping(generation={"model": "m", "engine_kwargs": [1, 2]}))
    with pytest.raises(ConfigError, match="mapping"):
        from_mapping(AnalysisConfig, ["betas"])
    assert from_mapping(GenerationConfig, {"model": "m", "n": "8", "samples_per_prompt": 16}).n == 8


def test_missing_required_keys_are_named():
    data = job_mapping()
    del data["name"], data["generation"]
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, data)
    assert "name" in str(error.value) and "generation" in str(error.value)


def test_bad_beta_grid_in_a_mapping_names_the_key():
    with pytest.raises(ConfigError, match="config.analysis"):
        from_mapping(JobConfig, job_mapping(analysis={"betas": "0,1"}))
    with pytest.raises(ConfigError, match="config.analysis"):
        from_mapping(JobConfig, job_mapping(analysis={"betas": "0.01:100:many"}))


@pytest.mark.parametrize("cls, data, field", [
    (GenerationConfig, {"model": "m", "stop": "###"}, "stop"),
    (PromptsConfig, {"inline": "Say hi."}, "inline"),
])
def test_scalar_for_a_list_of_strings_is_not_split_into_characters(cls, data, field):
    """``stop: "###"`` or ``inline: "a prompt"`` in YAML: either rejected with a ConfigError or
    taken as one item; never kept as a str that consumers iterate character by character."""
    try:
        config = from_mapping(cls, data)
    except ConfigError:
        return
    value = getattr(config, field)
    assert isinstance(value, tuple) and value == (data[field],), f"{cls.__name__}.{field} = {value!r}"


def test_scalar_rewards_are_a_config_error():
    with pytest.raises(ConfigError, match="rewards"):
        from_mapping(JobConfig, job_mapping(rewards="gold"))


# ----------------------------------------------------------------------------------------------
# section validations
# ----------------------------------------------------------------------------------------------

def test_job_needs_unique_rewards():
    with pytest.raises(ConfigError, match="at least one"):
        from_mapping(JobConfig, job_mapping(rewards=[]))
    duplicate = [{"name": "gold", "kind": "vllm", "model": "a"}, {"name": "gold", "kind": "vllm", "model": "b"}]
    with pytest.raises(ConfigError, match="unique"):
        from_mapping(JobConfig, job_mapping(rewards=duplicate))


def test_generation_samples_must_be_a_multiple_of_n():
    for samples, n in ((60, 16), (0, 1), (16, 0)):
        with pytest.raises(ConfigError, match="multiple"):
            GenerationConfig(model="m", samples_per_prompt=samples, n=n)
    assert GenerationConfig(model="m", samples_per_prompt=48, n=16).rounds == 3
    with pytest.raises(ConfigError, match="config.generation"):
        from_mapping(JobConfig, job_mapping(generation={"model": "m", "samples_per_prompt": 10, "n": 3}))


def test_generation_kind_synthetic_needs_no_model_but_vllm_does():
    assert from_mapping(GenerationConfig, {"kind": "synthetic"}).model == ""
    with pytest.raises(ConfigError, match="generation.model is required for kind vllm"):
        from_mapping(JobConfig, job_mapping(generation={"samples_per_prompt": 16}))
    with pytest.raises(ConfigError, match=r"generation.kind 'onnx': valid kinds are \['vllm', 'synthetic'\]"):
        GenerationConfig(kind="onnx")


def test_reward_model_validation():
    with pytest.raises(ConfigError, match="kind"):
        RewardModelConfig(name="g", kind="onnx", model="m")
    with pytest.raises(ConfigError, match="module:function"):
        RewardModelConfig(name="g", kind="function", function="length")
    for kind in ("vllm", "transformers"):
        with pytest.raises(ConfigError, match="model"):
            RewardModelConfig(name="g", kind=kind)
    assert RewardModelConfig(name="g", kind="function", function="m:f").kind == "function"
    with pytest.raises(ConfigError, match="config.rewards\\[0\\]"):
        from_mapping(JobConfig, job_mapping(rewards=[{"name": "g", "kind": "onnx", "model": "m"}]))


def test_prompts_need_exactly_one_source_and_a_prompt_placeholder():
    with pytest.raises(ConfigError, match="exactly one"):
        PromptsConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        PromptsConfig(dataset="d", path="p.jsonl")
    with pytest.raises(ConfigError, match="\\{prompt\\}"):
        PromptsConfig(inline=("hi",), template="Question: {question}")
    assert PromptsConfig(path="p.jsonl").path == "p.jsonl"


def test_load_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: run\noutput_dir: out\nprompts:\n  inline: [hello]\ngeneration:\n  model: m\n  samples_per_prompt: 8\n"
        "  n: 4\nrewards:\n  - {name: len, kind: function, function: 'mod:f'}\nanalysis:\n  betas: 0.1,1\n"
    )
    job = load_yaml(JobConfig, path)
    assert job.analysis.betas == (0.1, 1.0) and job.generation.rounds == 2
    path.write_text("name: run\nbogus: 1\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(JobConfig, path)
    assert str(path) in str(error.value) and "bogus" in str(error.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(JobConfig, tmp_path / "missing.yaml")
