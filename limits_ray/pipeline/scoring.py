"""Reward scorers: callable classes for Ray Data ``map_batches``, one per reward kind.

Each scorer is built from a :class:`~limits_ray.config.RewardModelConfig`, reads a prompt column and
the ``response`` column of a batch, and adds a float64 column named ``config.name``:

* :class:`VllmRewardScorer`: a sequence classifier served by vLLM's pooling runner; the raw logit.
* :class:`TransformersRewardScorer`: the same with ``AutoModelForSequenceClassification``.
* :class:`FunctionRewardScorer`: a Python function ``module:function`` of ``(prompts, responses)``.

Model rewards score ``config.input_template.format(prompt=..., response=...)`` with the prompt as the
base model saw it (column ``prompt``, its template applied) or, with ``config.chat_template``, the
reward tokenizer's chat template applied to ``[user: prompt_text, assistant: response]`` with the
prompt as the source gave it (column ``prompt_text``): never a template inside a template. A reward that is NaN or infinite raises ``ValueError`` naming the reward and
the prompt.

Model rewards run in ``config.engine_dtype`` (bfloat16 on GPUs, float32 on CPU unless ``dtype`` says
otherwise) and start once their GPU has the memory they will claim free
(:func:`~limits_ray.pipeline.engine_guard.wait_for_device_memory`); a vLLM reward's engine is watched by an
:class:`~limits_ray.pipeline.engine_guard.EngineGuard`. The transformers scorer refuses to start without the GPU
it is configured for (no silent CPU fallback), refuses an input longer than the model's context with
a ``ValueError`` before it reaches the model (a round fault on every device: on a GPU the model would
hit a device-side assert, an engine fault), and gives a model without a pad token one of its own, so
rows are still scored in padded batches.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Sequence

import numpy as np

from limits_ray.config import RewardModelConfig, engine_revision_kwargs, hub_kwargs
from limits_ray.pipeline.engine_guard import EngineGuard, engine_memory_fraction, wait_for_device_memory
from limits_ray.pipeline.faults import engine_call
from limits_ray.pipeline.generation import set_cpu_env_defaults
from limits_ray.pipeline.placement import vllm_parallel_kwargs
from limits_ray.storage.rounds import per_round, per_sample, regroup, round_lengths

__all__ = [
    "FunctionRewardScorer", "RewardScorer", "TransformersRewardScorer", "VllmRewardScorer",
    "check_single_label", "load_function", "make_scorer_class", "render_reward_inputs",
]

DEFAULT_INPUT_TEMPLATE = "{prompt}{response}"


def render_reward_inputs(
    config: RewardModelConfig, prompts: Sequence[str], responses: Sequence[str], tokenizer: Any = None
) -> list[str]:
    """The texts a reward model scores: the input template, or the tokenizer's chat template."""
    if not config.chat_template:
        return [config.input_template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"reward {config.name!r}: chat_template is set but the tokenizer of {config.model!r} has no chat "
            "template; set chat_template: false and use input_template, or use a reward model with a template"
        )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(prompts, responses)
    ]


def check_single_label(config: RewardModelConfig, num_labels: int) -> None:
    """Raise ``ValueError`` unless the reward model has a single-logit head."""
    if num_labels != 1:
        raise ValueError(
            f"reward {config.name!r}: model {config.model!r} has num_labels={num_labels}, but a reward model "
            "must output one logit (num_labels=1); use a single-label sequence-classification reward model, "
            "or wrap this classifier in a kind: function reward that reduces its logits to one number"
        )


def load_function(spec: str) -> Callable[[list[str], list[str]], Sequence[float]]:
    """Import ``module:function``."""
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward function {spec!r} cannot be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"reward function {spec!r} is not callable")
    return function


class RewardScorer:
    """Base class: turns a batch into prompts and responses, checks the rewards, adds the column.

    Subclasses implement :meth:`score`. ``prompt_column`` is the prompt the reward sees: ``prompt_text``
    (the source's text) under a chat template, else ``prompt`` (as rendered for the base model).
    """

    def __init__(self, config: RewardModelConfig) -> None:
        self.config = config
        self.prompt_column = "prompt_text" if config.chat_template else "prompt"

    def pairs(self, batch: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
        """The (prompt, response) texts of every sample of ``batch``, in sample order."""
        lengths = round_lengths(batch)
        prompts = [str(value) for value in per_round(batch[self.prompt_column], lengths)]
        return prompts, [str(value) for value in per_sample(batch["response"])]

    def score(self, prompts: list[str], responses: list[str]) -> Sequence[float]:
        """One reward per (prompt, response) pair."""
        raise NotImplementedError

    def model_inputs(self, batch: dict[str, np.ndarray]) -> list[str]:
        """The exact texts a reward model receives for ``batch`` (see :func:`render_reward_inputs`)."""
        return render_reward_inputs(self.config, *self.pairs(batch), getattr(self, "tokenizer", None))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score ``batch`` and return it with a float64 column ``config.name``.

        Rows may be rounds (sample columns of ``n`` values, see :mod:`limits_ray.storage.rounds`) or single
        samples; the reward column takes the same shape as ``response``.
        """
        lengths = round_lengths(batch)
        prompts, responses = self.pairs(batch)
        rewards = self.score(prompts, responses) if prompts else []
        out = dict(batch)
        checked = self._checked(np.asarray(rewards, dtype=np.float64), batch, lengths)
        out[self.config.name] = regroup(checked, batch)
        return out

    def _checked(self, rewards: np.ndarray, batch: dict[str, np.ndarray], lengths: np.ndarray) -> np.ndarray:
        """``rewards`` if it has one finite value per sample; otherwise a ``ValueError`` naming the prompt."""
        samples = int(lengths.sum())
        if rewards.shape != (samples,):
            raise ValueError(f"reward {self.config.name!r} returned shape {rewards.shape} for {samples} samples")
        bad = np.flatnonzero(~np.isfinite(rewards))
        if bad.size:
            index = int(bad[0])
            prompt_ids = per_round(batch["prompt_id"], lengths) if "prompt_id" in batch else None
            prompt_id = prompt_ids[index] if prompt_ids is not None else f"sample {index}"
            where = f" sample_idx {per_sample(batch['sample_idx'])[index]}" if "sample_idx" in batch else ""
            raise ValueError(
                f"reward {self.config.name!r} is {rewards[index]} for prompt_id {str(prompt_id)!r}{where} "
                f"({bad.size} non-finite of {samples} in this batch)"
            )
        return rewards


class VllmRewardScorer(RewardScorer):
    """A sequence-classification reward model on vLLM's pooling runner; the raw (pre-sigmoid) logit."""

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__(config)
        from transformers import AutoConfig, AutoTokenizer

        pinned = hub_kwargs(config.revision)
        check_single_label(config, AutoConfig.from_pretrained(config.model, **pinned).num_labels)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, **pinned) if config.chat_template else None
        set_cpu_env_defaults(config)
        from vllm import LLM
        from vllm.pooling_params import PoolingParams

        stage = f"score_{config.name}"
        if config.num_gpus:
            wait_for_device_memory(f"stage {stage}", fraction=engine_memory_fraction(config))
        self.llm = LLM(model=config.model, runner="pooling", dtype=config.engine_dtype, **{
            **vllm_parallel_kwargs(config), **config.engine_kwargs, **engine_revision_kwargs(config.revision)})
        self.guard = EngineGuard(self.llm, stage, config.stall_timeout_s)
        self.pooling_params = PoolingParams(use_activation=False)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Classify the rendered texts in one call; each output must hold exactly one logit."""
        texts = render_reward_inputs(self.config, prompts, responses, self.tokenizer)
        with engine_call("vLLM classify"):
            outputs = self.llm.classify(
                texts, pooling_params=self.pooling_params, use_tqdm=False,
                tokenization_kwargs={"add_special_tokens": not self.config.chat_template},
            )
        for output in outputs:
            check_single_label(self.config, len(output.outputs.probs))
        return [output.outputs.probs[0] for output in outputs]


PAD_TOKEN = "<|limits_ray_pad|>"  # given to a reward model whose tokenizer has no pad token
ACTIVATION_MARGIN = 1.25  # a transformers reward waits for its weights' bytes times this to be free on its GPU


class TransformersRewardScorer(RewardScorer):
    """A sequence-classification reward model with transformers: eval mode, no grad, padded batches.

    ``device_available`` (default ``torch.cuda.is_available``) is what the scorer asks before it places
    a GPU-configured model; ``memory_probe`` is handed to :func:`wait_for_device_memory`.
    """

    def __init__(self, config: RewardModelConfig, micro_batch_size: int = 16,
                 device_available: Callable[[], bool] | None = None, memory_probe: Any = None) -> None:
        super().__init__(config)
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        stage = f"score_{config.name}"
        self.device = "cpu"
        if config.num_gpus > 0:
            if not (device_available or torch.cuda.is_available)():
                raise RuntimeError(
                    f"rewards[{config.name}]: num_gpus is {config.num_gpus:g} but this actor sees no CUDA device "
                    f"(torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                    "a reward configured on a GPU does not fall back to CPU: give the cluster GPU workers and a "
                    "CUDA build of torch, or set num_gpus: 0 to score on CPU"
                )
            self.device = "cuda"
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, **hub_kwargs(config.revision))
        model = AutoModelForSequenceClassification.from_pretrained(
            config.model, dtype=getattr(torch, config.engine_dtype), **hub_kwargs(config.revision))
        check_single_label(config, model.config.num_labels)
        if self.tokenizer.pad_token_id is None:
            self._add_pad_token(model)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.context = _context_length(model.config, self.tokenizer)
        if self.device == "cuda":
            if config.gpu_memory_utilization:
                torch.cuda.set_per_process_memory_fraction(config.gpu_memory_utilization)
            weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
            wait_for_device_memory(f"stage {stage}", needed_bytes=int(ACTIVATION_MARGIN * weights),
                                   **({"probe": memory_probe} if memory_probe else {}))
        self.model = model.to(self.device).eval()
        self.micro_batch_size = micro_batch_size

    def _add_pad_token(self, model: Any) -> None:
        """A pad token of its own (not EOS, which a scored text may end with: the model pools at the last
        token that is not padding), with an embedding row when the model has none to spare; pad
        positions are masked out, so scores do not depend on it."""
        self.tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if self.tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Render, then run the model over micro-batches."""
        texts = render_reward_inputs(self.config, prompts, responses, self.tokenizer)
        size = self.micro_batch_size
        return [value for start in range(0, len(texts), size) for value in self._logits(texts[start:start + size])]

    def _logits(self, texts: list[str]) -> list[float]:
        """The single logit of each text in one padded forward pass."""
        import torch

        encoded = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not self.config.chat_template)
        longest = int(encoded["attention_mask"].sum(dim=1).max()) if texts else 0
        if self.context and longest > self.context:
            raise ValueError(
                f"reward {self.config.name!r}: an input of {longest} tokens is longer than the {self.context}-token "
                f"context of {self.config.model!r}; shorten generation.max_tokens or the prompts, or use a reward "
                "model with a longer context"
            )
        # CUDA errors surface asynchronously (at .to or .cpu): the whole device round trip is the engine's
        with torch.no_grad(), engine_call("reward model forward pass"):
            logits = self.model(**encoded.to(self.device)).logits
            return logits[:, 0].float().cpu().tolist()


def _context_length(model_config: Any, tokenizer: Any) -> int:
    """The most tokens the model reads: its position embeddings' count, else the tokenizer's limit
    (transformers' "no limit" is a huge number); 0 when neither says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0) or 0
    return int(limit) if 0 < limit < 1_000_000 else 0


class FunctionRewardScorer(RewardScorer):
    """A rule-based reward: ``fn(prompts, responses) -> floats`` imported from ``config.function``.

    The function sees the prompt and response texts themselves, so ``input_template`` and
    ``chat_template`` do not apply; setting either raises ``ValueError`` rather than being ignored.
    """

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__(config)
        if config.chat_template or config.input_template != DEFAULT_INPUT_TEMPLATE:
            raise ValueError(
                f"reward {config.name!r}: a function reward receives (prompts, responses) directly; "
                "remove input_template/chat_template from its config"
            )
        self.function = load_function(config.function)

    def score(self, prompts: list[str], responses: list[str]) -> Sequence[float]:
        """Call the function on the whole batch."""
        return self.function(prompts, responses)


SCORER_CLASSES: dict[str, type[RewardScorer]] = {
    "vllm": VllmRewardScorer,
    "transformers": TransformersRewardScorer,
    "function": FunctionRewardScorer,
}


def make_scorer_class(config: RewardModelConfig) -> type[RewardScorer]:
    """The scorer class for ``config.kind`` (construct it with ``config``)."""
    return SCORER_CLASSES[config.kind]
