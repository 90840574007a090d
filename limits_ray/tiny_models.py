"""Tiny, randomly initialised models for tests and smoke runs; built locally, no hub access needed.

:func:`build_tiny_models` trains a byte-level BPE tokenizer on a small embedded English corpus and
saves, each with that tokenizer (and a chat template):

* ``policy`` and ``policy_b``: two Llama causal LMs with different seeds (``policy_b`` can stand
  in for an "aligned" checkpoint);
* ``reward`` and ``reward_b``: two Llama sequence classifiers (``num_labels=1``) with different
  seeds, so proxy/gold reward analyses have two distinct rewards;
* ``policy_blend``: the weight blend ``0.9 policy + 0.1 policy_b`` (a stand-in for a mildly aligned
  checkpoint, near pi0; ``configs/tiny_policies.yaml`` compares it with the frontier).

:func:`tilted_checkpoint` fine-tunes a causal LM toward the tilt ``pi0 exp(r/beta)/Z`` of its next-token
distribution after given prompts (a stand-in for an aligned checkpoint several nats from pi0 whose KL
and gain are known exactly for one-token responses: tests/test_proposals.py, bench/bench_proposals.py).

Everything is deterministic given the seed, and a marker file makes a second call a no-op.

Why Llama and not GPTNeoX: vLLM 0.32 has no native GPTNeoX and serves it through its Transformers
backend, which monkey-patches ``transformers``' ``GPTNeoXModel`` class in place (torch.compile
wrapper); afterwards that class cannot be instantiated outside a vLLM engine in the same process,
so a transformers scorer or check next to a vLLM engine fails. Llama is native in vLLM (generation,
and sequence classification through its ``as_seq_cls_model`` adapter) and leaves transformers alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "CORPUS", "TinyModels", "blend_checkpoint", "build_tiny_models", "next_token_logprobs",
           "one_token_texts", "tilted_checkpoint"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 768
MAX_POSITIONS = 256
HIDDEN_SIZE = 128  # 4 heads of 32: vLLM's CPU attention rejects head_dim 16
NUM_HEADS = 4
NUM_LAYERS = 2
MARKER = "tiny_models.json"
FORMAT_VERSION = 2  # 2: adds policy_blend
BLEND_WEIGHT = 0.1

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = (
    "The river ran quietly past the old mill, where the miller and his daughter counted sacks of "
    "grain every morning. In spring the water rose and the wheel turned faster; in autumn the leaves "
    "gathered in the race and the children were sent to clear them before breakfast.",
    "A good answer is short, honest and kind. When someone asks a question, listen to the whole of "
    "it, think about what they really need to know, and then explain it plainly. If you do not know, "
    "say so, and suggest where they might find out.",
    "Scientists measure the world with care. They write down what they expect, run the experiment, "
    "and compare the result with the prediction. A surprising result is not a failure: it is a reason "
    "to check the instruments, repeat the measurement, and perhaps to change the theory.",
    "The recipe is simple. Warm the milk, stir in the flour a spoonful at a time, and add a pinch of "
    "salt. Let the dough rest for an hour under a clean cloth, then shape it into small loaves and bake "
    "them until the crust is golden and the kitchen smells of fresh bread.",
    "Cities grow along roads and rivers. Markets appear where travellers stop, schools where families "
    "settle, and libraries where people want to remember. Over many years the streets fill with "
    "stories: who built this bridge, who planted that tree, who opened the first shop on the corner.",
    "Please write a short poem about the sea. Tell me a story about a friendly robot. What is the "
    "capital of France? How do plants make food from sunlight? Explain why the sky is blue. Give three "
    "tips for learning a new language. Summarise the plot of a famous novel in two sentences.",
    "Numbers help us reason: one, two, three, four, five, six, seven, eight, nine and ten. Ten times "
    "ten is one hundred, and a thousand is ten hundreds. Small steps, repeated patiently, add up to "
    "long journeys; that is true of walking, of reading, and of learning mathematics.",
)


@dataclass(frozen=True)
class TinyModels:
    """Paths of the built tiny models; every directory also holds the tokenizer.

    Attributes:
        root: the output directory.
        policy: tokenizer and causal LM (the base policy).
        policy_b: a second causal LM with another seed (e.g. an "aligned" checkpoint).
        reward: a sequence-classification reward model, ``num_labels=1``.
        reward_b: a second reward model with another seed (e.g. the "gold" reward).
        policy_blend: ``(1 - BLEND_WEIGHT) policy + BLEND_WEIGHT policy_b`` (a checkpoint near pi0).
        seed: the seed they were built from.
    """

    root: Path
    policy: Path
    policy_b: Path
    reward: Path
    reward_b: Path
    policy_blend: Path
    seed: int

    @classmethod
    def at(cls, root: Path, seed: int) -> TinyModels:
        """The layout under ``root`` (built or not)."""
        return cls(root, root / "policy", root / "policy_b", root / "reward", root / "reward_b", root / "policy_blend", seed)


def derive_seed(seed: int, name: str) -> int:
    """A stable per-model seed from the base seed and the model's name (sha256, < 2**31)."""
    digest = hashlib.sha256(f"tiny:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :data:`CORPUS`, with pad and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(CORPUS), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _llama_config(tokenizer, **extra):
    """The shared Llama architecture, sized to the tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        num_hidden_layers=NUM_LAYERS,
        intermediate_size=2 * HIDDEN_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _build_policy(tokenizer, out: Path, seed: int) -> None:
    """A random causal LM; the wider init (0.1) gives non-uniform next-token distributions."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, initializer_range=0.1)).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_reward(tokenizer, out: Path, seed: int) -> None:
    """A random sequence classifier with one label; its head is scaled so rewards are O(1)."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1, initializer_range=0.1))
    with torch.no_grad():
        model.score.weight.normal_(0.0, HIDDEN_SIZE**-0.5)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_built(root: Path, seed: int) -> bool:
    """Whether ``root`` holds a complete build for ``seed`` (the marker is written last)."""
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return data == {"seed": seed, "version": FORMAT_VERSION}


def build_tiny_models(out_dir: Path, seed: int = 0) -> TinyModels:
    """Build (or reuse) the tiny tokenizer, two causal LMs, their blend and two reward models under ``out_dir``.

    Deterministic given ``seed``; idempotent: if ``out_dir`` already holds a complete build for the
    same seed (its marker file), nothing is rebuilt. A partial or different-seed build is replaced.
    """
    out_dir = Path(out_dir)
    models = TinyModels.at(out_dir, seed)
    if _is_built(out_dir, seed):
        return models
    (out_dir / MARKER).unlink(missing_ok=True)
    tokenizer = train_tokenizer()
    builders = {"policy": _build_policy, "policy_b": _build_policy, "reward": _build_reward, "reward_b": _build_reward}
    for name, build in builders.items():
        path = getattr(models, name)
        shutil.rmtree(path, ignore_errors=True)
        build(tokenizer, path, derive_seed(seed, name))
    shutil.rmtree(models.policy_blend, ignore_errors=True)
    blend_checkpoint(models.policy, models.policy_b, BLEND_WEIGHT, models.policy_blend)
    (out_dir / MARKER).write_text(json.dumps({"seed": seed, "version": FORMAT_VERSION}))
    return models


def blend_checkpoint(base: str | Path, other: str | Path, weight: float, out: str | Path) -> Path:
    """Save ``(1 - weight) * base + weight * other`` (every parameter) with the base's tokenizer to ``out``.

    Two checkpoints of one architecture; a small ``weight`` gives a policy near pi0 (a stand-in for a
    mildly aligned checkpoint whose KL lies inside the frontier's range). A no-op if ``out`` exists.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    target = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_((1.0 - weight) * tensor + weight * target[name])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def next_token_logprobs(model_path: str | Path, prompts: list[str]):
    """``[P, V]`` float64 numpy: the model's next-token log-probabilities after each prompt (tokenized as vLLM
    does, with the tokenizer's default special tokens), in float32 as the tests' engines run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = [torch.log_softmax(model(**tokenizer(text, return_tensors="pt")).logits[0, -1].double(), -1)
                for text in prompts]
    return torch.stack(rows).numpy()


def one_token_texts(model_path: str | Path) -> list[str]:
    """The text of each one-token response as vLLM returns it: the token decoded without special tokens (EOS is
    ``""``), an incomplete UTF-8 character at its end withheld (a byte token of a multi-byte character is ``""``,
    where the tokenizer's ``decode`` gives the replacement character)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [tokenizer.decode([token], skip_special_tokens=True).rstrip("\ufffd") for token in range(len(tokenizer))]


def tilted_checkpoint(base: str | Path, prompts: list[str], token_rewards, beta: float, out: str | Path) -> Path:
    """A checkpoint whose next-token distribution after each prompt ``x`` is ``pi0(y|x) exp(r(y)/beta) / Z``.

    ``token_rewards``: ``[V]`` the reward of each one-token response (pass a noisy copy of the true reward for
    a policy aligned to a proxy, hence not on the true frontier). The logits are ``W h_x`` with ``h_x`` the
    final hidden state after the prompt and ``W`` the output layer (not tied to the input embeddings), so the
    rank-one edit ``W + (r / beta) u^T`` with ``h_x . u = 1`` for every prompt (the least-norm ``u``, at most
    ``hidden_size`` prompts) adds ``r(y)/beta`` to every prompt's next-token logits and leaves the rest of the
    model alone: a fine-tune in closed form. Saved with the base's tokenizer to ``out``; a no-op if ``out`` exists.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if model.config.tie_word_embeddings:
        raise ValueError(f"{base}: the output layer is tied to the input embeddings; the edit needs it untied")
    with torch.no_grad():
        hidden = np.stack([model.model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1].double().numpy()
                           for text in prompts])  # [P, H]
        direction = hidden.T @ np.linalg.solve(hidden @ hidden.T, np.ones(len(prompts)))  # h_x . u = 1
        rewards = np.asarray(token_rewards, dtype=np.float64) / beta
        weight = model.lm_head.weight
        weight.add_(torch.from_numpy(np.outer(rewards, direction)).to(weight.dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
