"""The tiny local models: deterministic, idempotent, loadable by transformers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from _tiny import session_tiny_models
from limits_ray.tiny_models import MAX_POSITIONS, MARKER, TinyModels, build_tiny_models, derive_seed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return session_tiny_models(tmp_path_factory)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_layout(tiny: TinyModels) -> None:
    assert (tiny.root / MARKER).is_file()
    for path in (tiny.policy, tiny.policy_b, tiny.reward, tiny.reward_b):
        assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
        assert (path / "model.safetensors").is_file()


def test_idempotent(tiny: TinyModels) -> None:
    before = _digests(tiny.root)
    mtime = (tiny.root / MARKER).stat().st_mtime_ns
    assert build_tiny_models(tiny.root, seed=0) == tiny
    assert (tiny.root / MARKER).stat().st_mtime_ns == mtime
    assert _digests(tiny.root) == before


def test_deterministic_given_seed(tiny: TinyModels, tmp_path: Path) -> None:
    again = build_tiny_models(tmp_path / "again", seed=0)
    assert _digests(again.root) == _digests(tiny.root)


def test_derived_seeds_differ() -> None:
    names = ("policy", "policy_b", "reward", "reward_b")
    seeds = {derive_seed(seed, name) for seed in (0, 1) for name in names}
    assert len(seeds) == 8 and all(0 <= value < 2**31 for value in seeds)


def test_tokenizer(tiny: TinyModels) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    assert 512 <= len(tokenizer) <= 1000
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "The river ran quietly past the old mill."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>\nHello?\n<|assistant|>\n"


def test_causal_lms_load_and_differ(tiny: TinyModels) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    ids = torch.tensor([tokenizer("Tell me a story").input_ids])
    logits = []
    for path in (tiny.policy, tiny.policy_b):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        assert model.config.max_position_embeddings == MAX_POSITIONS
        assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM CPU attention
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert logits[0].shape == (1, ids.shape[1], len(tokenizer))
    assert not torch.allclose(logits[0], logits[1])


def test_reward_models_load_and_differ(tiny: TinyModels) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.reward)
    batch = tokenizer(["A good answer is short.", "Numbers help us reason"], padding=True, return_tensors="pt")
    scores = []
    for path in (tiny.reward, tiny.reward_b):
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        assert model.config.num_labels == 1
        with torch.no_grad():
            scores.append(model(**batch).logits)
    assert scores[0].shape == (2, 1)
    assert torch.isfinite(scores[0]).all()
    assert not torch.allclose(scores[0], scores[1])
