"""Reward scorers on the tiny reward models: vLLM pooling vs transformers, functions, rendering, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from limits_ray.config import RewardModelConfig
from limits_ray.pipeline.scoring import (
    FunctionRewardScorer,
    TransformersRewardScorer,
    VllmRewardScorer,
    make_scorer_class,
    render_reward_inputs,
)
from limits_ray.tiny_models import TinyModels

from _tiny import ENGINE_KWARGS, session_tiny_models

PROMPTS = ["The river ran", "Please write a short poem about the sea.", "Why?", "Numbers help us reason"]
RESPONSES = [" quietly past the old mill.", " The sea is wide and blue, and the wind", "", " one, two, three"]


def samples(prompts: list[str] = PROMPTS, responses: list[str] = RESPONSES) -> dict[str, np.ndarray]:
    """A scored-sample batch: prompt_id, sample_idx, prompt (and prompt_text: the same), response."""
    return {
        "prompt_id": np.array([f"id{i}" for i in range(len(prompts))], dtype=object),
        "sample_idx": np.arange(len(prompts), dtype=np.int64),
        "prompt": np.array(prompts, dtype=object),
        "prompt_text": np.array(prompts, dtype=object),
        "response": np.array(responses, dtype=object),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return session_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def two_label_model(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny reward model re-headed with num_labels=2."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("two_labels")
    model = AutoModelForSequenceClassification.from_pretrained(tiny.reward, num_labels=2, ignore_mismatched_sizes=True)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny.reward).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vllm_scorer(tiny: TinyModels) -> VllmRewardScorer:
    config = RewardModelConfig(name="rm", kind="vllm", model=str(tiny.reward), engine_kwargs=ENGINE_KWARGS)
    return VllmRewardScorer(config)


def test_make_scorer_class() -> None:
    assert make_scorer_class(RewardModelConfig(name="a", kind="vllm", model="m")) is VllmRewardScorer
    assert make_scorer_class(RewardModelConfig(name="a", kind="transformers", model="m")) is TransformersRewardScorer
    assert make_scorer_class(RewardModelConfig(name="a", kind="function", function="m:f")) is FunctionRewardScorer


def test_render_input_template() -> None:
    config = RewardModelConfig(name="rm", kind="vllm", model="m", input_template="Q: {prompt}\nA:{response}")
    assert render_reward_inputs(config, ["hi"], [" there"]) == ["Q: hi\nA: there"]


def test_render_chat_template(tiny: TinyModels) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.reward)
    config = RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward), chat_template=True)
    assert render_reward_inputs(config, ["hi"], ["hello"], tokenizer) == ["<|user|>\nhi\n<|assistant|>\nhello\n"]
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render_reward_inputs(config, ["hi"], ["hello"], tokenizer)


def test_transformers_scorer(tiny: TinyModels) -> None:
    scorer = TransformersRewardScorer(RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward)))
    batch = samples()
    out = scorer(batch)
    assert out["rm"].dtype == np.float64 and out["rm"].shape == (len(PROMPTS),)
    assert np.isfinite(out["rm"]).all() and np.unique(out["rm"]).size == len(PROMPTS)
    assert all(np.array_equal(out[key], batch[key]) for key in batch)
    single = [scorer(samples([p], [r]))["rm"][0] for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(out["rm"], single, atol=1e-5)  # padding does not change the scores


def test_transformers_chat_template(tiny: TinyModels) -> None:
    config = RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward), chat_template=True)
    template = "<|user|>\n{prompt}\n<|assistant|>\n{response}\n"
    plain = RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward), input_template=template)
    np.testing.assert_allclose(
        TransformersRewardScorer(config)(samples())["rm"], TransformersRewardScorer(plain)(samples())["rm"], atol=1e-6
    )


def test_a_chat_template_reward_receives_the_source_prompt_once(tiny: TinyModels) -> None:
    """Generation sees the prompt in the base model's chat template; a chat-templated reward model gets
    the source's text in its own template (not the rendered prompt templated a second time)."""
    from transformers import AutoTokenizer

    from limits_ray.config import PromptsConfig
    from limits_ray.pipeline.prompts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    prompt = load_prompts(PromptsConfig(inline=("Why is the sea salty?",), chat_template=True), tokenizer, 64).prompts[0]
    assert prompt.rendered == "<|user|>\nWhy is the sea salty?\n<|assistant|>\n"
    batch = samples([prompt.rendered], [" Rocks."])
    batch["prompt_text"] = np.array([prompt.text], dtype=object)
    chat = RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward), chat_template=True)
    assert TransformersRewardScorer(chat).model_inputs(batch) == ["<|user|>\nWhy is the sea salty?\n<|assistant|>\n Rocks.\n"]
    plain = RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward))
    assert TransformersRewardScorer(plain).model_inputs(batch) == [prompt.rendered + " Rocks."]


def test_proxy_and_gold_differ(tiny: TinyModels) -> None:
    proxy = TransformersRewardScorer(RewardModelConfig(name="proxy", kind="transformers", model=str(tiny.reward)))
    gold = TransformersRewardScorer(RewardModelConfig(name="gold", kind="transformers", model=str(tiny.reward_b)))
    out = gold(proxy(samples()))
    assert not np.allclose(out["proxy"], out["gold"])


@pytest.mark.parametrize("kind", ["transformers", "vllm"])
def test_wrong_num_labels_raises(kind: str, two_label_model: Path) -> None:
    config = RewardModelConfig(name="rm", kind=kind, model=str(two_label_model))
    with pytest.raises(ValueError, match=r"num_labels=2.*num_labels=1"):
        make_scorer_class(config)(config)


def test_a_transformers_reward_configured_on_a_gpu_does_not_fall_back_to_cpu(tiny: TinyModels) -> None:
    config = RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward), num_gpus=1)
    with pytest.raises(RuntimeError, match=r"rewards\[rm\]: num_gpus is 1 but this actor sees no CUDA device.*does not "
                                           r"fall back to CPU"):
        TransformersRewardScorer(config, device_available=lambda: False)


def test_an_input_longer_than_the_reward_model_s_context_is_a_round_fault(tiny: TinyModels, tmp_path: Path) -> None:
    """Refused before the model sees it (on a GPU the position lookup would be a device-side assert: an
    engine fault that ends the actor and, retried, stops the run): the round is quarantined."""
    from limits_ray.pipeline.faults import Quarantine, run_with_quarantine
    from limits_ray.storage.location import open_location

    scorer = TransformersRewardScorer(RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward)))
    assert scorer.context == 256  # the tiny models' max_position_embeddings
    long = " the river" * 200
    with pytest.raises(ValueError, match=r"reward 'rm': an input of \d+ tokens is longer than the 256-token context"):
        scorer(samples(["The river ran"], [long]))
    quarantine = Quarantine(open_location(tmp_path), "run")
    batch = samples(PROMPTS[:2], [RESPONSES[0], long])
    batch["round"] = np.arange(2, dtype=np.int64)
    output = run_with_quarantine(scorer, batch, "score_rm", quarantine, attempts=2)
    assert output["prompt_id"].tolist() == ["id0"]
    [record] = quarantine.records()
    assert record.prompt_id == "id1" and "longer than the 256-token context" in record.error


def test_a_reward_model_without_a_pad_token_gets_one_and_keeps_batching(tiny: TinyModels, tmp_path: Path) -> None:
    """Its own pad token (not EOS, which a text may end with): scores equal the original model's, rows
    still share padded batches."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    unpadded = tmp_path / "reward_b_no_pad"
    shutil.copytree(tiny.reward_b, unpadded)
    tokenizer = AutoTokenizer.from_pretrained(unpadded)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(unpadded)
    model_config = AutoConfig.from_pretrained(unpadded)
    model_config.pad_token_id = None
    model_config.save_pretrained(unpadded)
    assert AutoTokenizer.from_pretrained(unpadded).pad_token_id is None
    scorer = TransformersRewardScorer(RewardModelConfig(name="rm", kind="transformers", model=str(unpadded)))
    assert scorer.tokenizer.pad_token == "<|limits_ray_pad|>" and scorer.micro_batch_size == 16
    assert scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id
    original = TransformersRewardScorer(RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward_b)))
    texts = [" quietly past the old mill.<|endoftext|>", *RESPONSES]  # one ends with EOS: pooled at the EOS
    np.testing.assert_allclose(scorer(samples(PROMPTS + ["Why?"], texts))["rm"],
                               original(samples(PROMPTS + ["Why?"], texts))["rm"], atol=1e-5)


def test_a_transformers_reward_runs_in_its_configured_dtype(tiny: TinyModels) -> None:
    import torch

    full = TransformersRewardScorer(RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward)))
    half = TransformersRewardScorer(RewardModelConfig(name="rm", kind="transformers", model=str(tiny.reward), dtype="bfloat16"))
    assert next(full.model.parameters()).dtype == torch.float32 and next(half.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(half(samples())["rm"], full(samples())["rm"], atol=0.05)


def test_function_scorer() -> None:
    config = RewardModelConfig(name="len", kind="function", function="limits_ray.reward_functions:response_length")
    out = FunctionRewardScorer(config)(samples())
    np.testing.assert_array_equal(out["len"], [len(r) / 10 for r in RESPONSES])
    config = RewardModelConfig(name="the", kind="function", function="limits_ray.reward_functions:contains_word")
    np.testing.assert_array_equal(FunctionRewardScorer(config)(samples())["the"], [1, 1, 0, 0])


def test_function_scorer_rejects_templates() -> None:
    config = RewardModelConfig(
        name="len", kind="function", function="limits_ray.reward_functions:response_length", chat_template=True
    )
    with pytest.raises(ValueError, match="remove input_template/chat_template"):
        FunctionRewardScorer(config)


def test_function_import_error() -> None:
    config = RewardModelConfig(name="x", kind="function", function="limits_ray.reward_functions:missing")
    with pytest.raises(ValueError, match="cannot be imported"):
        FunctionRewardScorer(config)


def test_nan_reward_names_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nan_reward_module.py").write_text(
        "def reward(prompts, responses):\n"
        "    return [float('nan') if r == '' else 1.0 for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RewardModelConfig(name="bad", kind="function", function="nan_reward_module:reward")
    with pytest.raises(ValueError, match=r"reward 'bad' is nan for prompt_id 'id2' sample_idx 2"):
        FunctionRewardScorer(config)(samples())


def test_wrong_length_raises() -> None:
    config = RewardModelConfig(name="len", kind="function", function="limits_ray.reward_functions:response_length")
    scorer = FunctionRewardScorer(config)
    scorer.function = lambda prompts, responses: [1.0]
    with pytest.raises(ValueError, match="shape"):
        scorer(samples())


def test_empty_batch() -> None:
    config = RewardModelConfig(name="len", kind="function", function="limits_ray.reward_functions:response_length")
    out = FunctionRewardScorer(config)(samples([], []))
    assert out["len"].dtype == np.float64 and out["len"].shape == (0,)


@pytest.mark.slow
def test_vllm_matches_transformers(tiny: TinyModels, vllm_scorer: VllmRewardScorer) -> None:
    transformers_scorer = TransformersRewardScorer(dataclasses.replace(vllm_scorer.config, kind="transformers"))
    batch = samples()
    from_vllm, from_transformers = vllm_scorer(batch)["rm"], transformers_scorer(batch)["rm"]
    assert from_vllm.dtype == np.float64
    np.testing.assert_allclose(from_vllm, from_transformers, atol=1e-4)


@pytest.mark.slow
def test_vllm_raw_logit_not_sigmoid(vllm_scorer: VllmRewardScorer) -> None:
    raw = vllm_scorer(samples())["rm"]
    texts = render_reward_inputs(vllm_scorer.config, PROMPTS, RESPONSES)
    default = [output.outputs.probs[0] for output in vllm_scorer.llm.classify(texts, use_tqdm=False)]
    np.testing.assert_allclose(default, 1 / (1 + np.exp(-raw)), atol=1e-6)  # vLLM's default is the sigmoid
