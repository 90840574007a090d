"""Sampling from the base model with vLLM, as a callable class for Ray Data ``map_batches``.

One input row is one *request*: a prompt and a round number; one output row is that *round*. A
request draws ``config.n`` samples with a seed derived from ``(config.seed, prompt_id, round)`` by
:func:`round_seed`, so every round is reproducible on its own and rounds can be added later without
redrawing earlier ones. Sample ``j`` of round ``r`` gets ``sample_idx = r * n + j``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from limits_ray.config import GenerationConfig

__all__ = ["CPU_ENV_DEFAULTS", "Generator", "OUTPUT_COLUMNS", "prompt_token_count", "round_seed"]

SEED_MODULUS = 2**31  # vLLM seeds are safest as non-negative 32-bit ints
REQUEST_COLUMNS = ("prompt_id", "prompt", "round")
OUTPUT_COLUMNS = (
    "prompt_id", "prompt", "round", "seed", "sample_idx", "response", "response_tokens", "logprob", "finish_reason",
)
CPU_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # run the engine core in this process (actor)
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; vLLM's CPU default is far larger
}


def round_seed(base_seed: int, prompt_id: str, round: int) -> int:
    """The sampling seed of one request: sha256 of ``"{base_seed}:{prompt_id}:{round}"``, in ``[0, 2**31)``.

    Stable across processes and machines (unlike Python's ``hash``).
    """
    text = f"{int(base_seed)}:{prompt_id}:{int(round)}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def prompt_token_count(tokenizer: Any, text: str) -> int:
    """Number of tokens ``tokenizer`` encodes ``text`` to (with its default special tokens, as vLLM does)."""
    return len(tokenizer.encode(text))


def has_gpu() -> bool:
    """Whether a CUDA device is visible to this process."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def set_cpu_env_defaults() -> None:
    """On a machine without a GPU, set the vLLM CPU variables that are not already set."""
    if has_gpu():
        return
    for name, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def engine_kwargs(config: GenerationConfig) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for the generation config."""
    kwargs: dict[str, Any] = {"seed": config.seed, "tensor_parallel_size": config.tensor_parallel_size}
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    kwargs.update(config.engine_kwargs)
    return kwargs


def empty_output(n: int) -> dict[str, np.ndarray]:
    """A zero-row output batch with the output column dtypes and shapes."""
    strings, ints = np.array([], dtype=object), np.array([], dtype=np.int64)
    return {
        "prompt_id": strings, "prompt": strings, "round": ints, "seed": ints,
        "sample_idx": np.zeros((0, n), dtype=np.int64), "response": strings,
        "response_tokens": np.zeros((0, n), dtype=np.int64), "logprob": np.zeros((0, n)), "finish_reason": strings,
    }


class Generator:
    """Draws ``config.n`` samples per request with one vLLM engine; for ``map_batches``.

    Input columns: ``prompt_id`` (str), ``prompt`` (rendered text), ``round`` (int64). Output: one
    row per request (see :mod:`limits_ray.rounds`) with ``prompt_id``, ``prompt``, ``round``, ``seed``
    and the sample columns (``n`` values per row) ``sample_idx``, ``response``, ``response_tokens`` (int64),
    ``logprob`` (float64, the sampled sequence's log-probability under the model, before
    temperature/top-p) and ``finish_reason``.

    ``add_special_tokens=False`` is for prompts rendered with a chat template, which already carries
    the tokenizer's special tokens (vLLM would otherwise add a second BOS).
    """

    def __init__(self, config: GenerationConfig, add_special_tokens: bool = True) -> None:
        set_cpu_env_defaults()
        from vllm import LLM

        self.config = config
        self.add_special_tokens = add_special_tokens
        self.llm = LLM(model=config.model, **engine_kwargs(config))

    def sampling_params(self, prompt_id: str, round: int):
        """The seeded ``SamplingParams`` of one request."""
        from vllm import SamplingParams

        config = self.config
        return SamplingParams(
            n=config.n,
            seed=round_seed(config.seed, prompt_id, round),
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_tokens,
            stop=list(config.stop) or None,
            logprobs=0,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generate every request of ``batch`` in one ``llm.generate`` call; one output row per round."""
        missing = [column for column in REQUEST_COLUMNS if column not in batch]
        if missing:
            raise KeyError(f"generation input lacks column(s) {missing}; got {sorted(batch)}")
        prompt_ids = [str(value) for value in batch["prompt_id"]]
        prompts = [str(value) for value in batch["prompt"]]
        rounds = [int(value) for value in batch["round"]]
        if not prompts:
            return empty_output(self.config.n)
        params = [self.sampling_params(pid, rnd) for pid, rnd in zip(prompt_ids, rounds)]
        outputs = self.llm.generate(
            prompts, params, use_tqdm=False, tokenization_kwargs={"add_special_tokens": self.add_special_tokens},
        )
        rows = [
            self._round(pid, prompt, rnd, param.seed, output)
            for pid, prompt, rnd, param, output in zip(prompt_ids, prompts, rounds, params, outputs)
        ]
        return {column: _column(column, [row[column] for row in rows]) for column in OUTPUT_COLUMNS}

    def _round(self, prompt_id: str, prompt: str, round: int, seed: int, output: Any) -> dict[str, Any]:
        """The row of one ``RequestOutput``: sample columns ordered by completion index."""
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        if len(completions) != self.config.n:
            raise RuntimeError(
                f"prompt {prompt_id!r} round {round}: vLLM returned {len(completions)} of {self.config.n} samples"
            )
        return {
            "prompt_id": prompt_id, "prompt": prompt, "round": round, "seed": seed,
            "sample_idx": [round * self.config.n + completion.index for completion in completions],
            "response": [completion.text for completion in completions],
            "response_tokens": [len(completion.token_ids) for completion in completions],
            "logprob": [_logprob(completion, prompt_id) for completion in completions],
            "finish_reason": [str(completion.finish_reason) for completion in completions],
        }


def _logprob(completion: Any, prompt_id: str) -> float:
    """The completion's cumulative log-probability (requested with ``logprobs=0``)."""
    if completion.cumulative_logprob is None:
        raise RuntimeError(f"prompt {prompt_id!r}: vLLM returned no cumulative_logprob (logprobs=0 was requested)")
    return float(completion.cumulative_logprob)


def _column(name: str, values: list[Any]) -> np.ndarray:
    """One output column: int64 or float64 (``[rows, n]`` for sample columns), else object."""
    if name in ("round", "seed", "sample_idx", "response_tokens"):
        return np.asarray(values, dtype=np.int64)
    if name == "logprob":
        return np.asarray(values, dtype=np.float64)
    array = np.empty(len(values), dtype=object)  # str, or a list of str per round (Arrow: list<string>)
    array[:] = values
    return array
