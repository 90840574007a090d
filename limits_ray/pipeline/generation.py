"""Sampling from the base model with vLLM, as a callable class for Ray Data ``map_batches``.

One input row is one *request*: a prompt and a round number; one output row is that *round*. A
request draws ``config.n`` samples with a seed derived from ``(config.seed, prompt_id, round)`` by
:func:`round_seed`, so every round is reproducible on its own and rounds can be added later without
redrawing earlier ones. Sample ``j`` of round ``r`` gets ``sample_idx = r * n + j``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from limits_ray.config import EngineResources, GenerationConfig, engine_revision_kwargs
from limits_ray.pipeline.engine_guard import EngineGuard, engine_memory_fraction, wait_for_device_memory
from limits_ray.pipeline.faults import engine_call
from limits_ray.pipeline.placement import vllm_parallel_kwargs

__all__ = [
    "CPU_ENV_DEFAULTS", "Generator", "OUTPUT_COLUMNS", "SharedEngine", "SYNTHETIC_VOCABULARY", "SyntheticGenerator", "WordTokenizer",
    "prompt_token_count", "round_seed", "synthetic_word_probabilities",
]

SEED_MODULUS = 2**31  # vLLM seeds are safest as non-negative 32-bit ints
REQUEST_COLUMNS = ("prompt_id", "prompt", "prompt_text", "round")
OUTPUT_COLUMNS = (
    "prompt_id", "prompt", "prompt_text", "round", "seed", "sample_idx", "response", "response_tokens", "logprob", "finish_reason",
)
CPU_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # run the engine core in this process (actor)
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; vLLM's CPU default is far larger
}
SYNTHETIC_VOCABULARY = (
    "the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "with", "as", "river", "light",
    "stone", "quietly", "morning", "remembered", "between", "garden", "silver", "wind", "across", "story",
    "because", "numbers", "bright", "under", "window", "again",
)


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


def set_cpu_env_defaults(resources: EngineResources) -> None:
    """For an engine configured to run on CPU (``num_gpus: 0``), set the vLLM CPU variables not already set.

    Decided by the config, not by probing: an actor of a multi-GPU engine on the ``ray`` backend
    holds no GPU itself (its workers do), so it would look like a CPU machine. A value already in the
    environment wins: ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` runs a CPU engine's core in a child process,
    as every GPU engine's runs (the fault tests run both layouts).
    """
    if resources.num_gpus:
        return
    for name, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def engine_kwargs(config: GenerationConfig) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for the generation config (its size and backend: :func:`vllm_parallel_kwargs`;
    its dtype, always explicit)."""
    kwargs: dict[str, Any] = {"seed": config.seed, "dtype": config.engine_dtype, **vllm_parallel_kwargs(config)}
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    kwargs.update(config.engine_kwargs)
    kwargs.update(engine_revision_kwargs(config.revision))  # the config's wins: the store identity records it
    return kwargs


def start_engine(config: GenerationConfig, stage: str) -> Any:
    """A ``vllm.LLM`` for ``config`` (CPU variables set for a CPU engine), started once its GPUs have the
    memory it will claim free (:func:`~limits_ray.pipeline.engine_guard.wait_for_device_memory`)."""
    set_cpu_env_defaults(config)
    from vllm import LLM

    if config.num_gpus:
        wait_for_device_memory(f"stage {stage}", fraction=engine_memory_fraction(config))
    return LLM(model=config.model, **engine_kwargs(config))


def empty_output(n: int) -> dict[str, np.ndarray]:
    """A zero-row output batch with the output column dtypes and shapes."""
    strings, ints = np.array([], dtype=object), np.array([], dtype=np.int64)
    return {
        "prompt_id": strings, "prompt": strings, "prompt_text": strings, "round": ints, "seed": ints,
        "sample_idx": np.zeros((0, n), dtype=np.int64), "response": strings,
        "response_tokens": np.zeros((0, n), dtype=np.int64), "logprob": np.zeros((0, n)), "finish_reason": strings,
    }


class SharedEngine:
    """One ``vllm.LLM`` engine serving several callers (threads) at once, each waiting for its own requests.

    A thread of its own (the engine loop) owns the engine: between two ``LLM.llm_engine.step()`` calls it
    adds the requests callers have submitted (``LLM.enqueue``), and hands each caller its outputs once
    all of its requests have finished. So a batch's requests join the engine's running set while an
    earlier batch's last samples are still decoding, and a caller that has its outputs builds its rows
    while the engine keeps running: the equivalent, for an engine in the actor's own process, of
    ``ray.data.llm``'s several batches in flight on vLLM's async engine. A request error (a prompt vLLM
    refuses) reaches the caller that submitted it; any other error in the loop (inside ``step``)
    reaches every waiting caller and every later one: the engine is broken (see :mod:`limits_ray.pipeline.faults`).
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.submitted: queue.Queue = queue.Queue()
        self.broken: BaseException | None = None
        threading.Thread(target=self._loop, name="vllm-engine-loop", daemon=True).start()

    def generate(self, prompts: list[str], params: list[Any], tokenization_kwargs: dict[str, Any]) -> list[Any]:
        """The ``RequestOutput`` of each prompt, in order (as ``LLM.generate`` returns them)."""
        def enqueue() -> list[str]:
            return self.llm.enqueue(prompts, params, use_tqdm=False, tokenization_kwargs=tokenization_kwargs)
        return self._submit(enqueue, requests=True)

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` in the engine loop between two steps (nothing else touches the engine meanwhile)."""
        return self._submit(function, requests=False)

    def _submit(self, function: Callable[[], Any], requests: bool) -> Any:
        done: Future = Future()
        self.submitted.put((function, requests, done))
        return done.result()

    def _loop(self) -> None:
        waiting: dict[str, _Caller] = {}  # request id -> the caller it belongs to
        try:
            self._serve(waiting)
        except BaseException as error:  # noqa: BLE001 - the engine is broken: every caller, now and later, is told
            self.broken = error
            for caller in set(waiting.values()):
                caller.fail(error)
            while True:
                self._admit(self.submitted.get(), waiting)

    def _serve(self, waiting: dict[str, "_Caller"]) -> None:
        """Admit submissions between steps, step while any caller waits; returns only by raising."""
        engine = self.llm.llm_engine
        while True:
            if not waiting:  # idle: wait for work
                self._admit(self.submitted.get(), waiting)
            while True:
                try:
                    self._admit(self.submitted.get_nowait(), waiting)
                except queue.Empty:
                    break
            if not waiting:
                continue
            for output in engine.step():
                if output.finished and output.request_id in waiting:
                    waiting.pop(output.request_id).finish(output)
            if waiting and not engine.has_unfinished_requests():
                raise RuntimeError(f"vLLM has no unfinished requests but requests {sorted(waiting)} never finished")

    def _admit(self, item: tuple[Callable[[], Any], bool, Future], waiting: dict[str, "_Caller"]) -> None:
        """Run one submitted function; for requests, remember whose they are."""
        function, requests, done = item
        if self.broken is not None:
            done.set_exception(self.broken)
            return
        try:
            result = function()
        except BaseException as error:  # noqa: BLE001 - vLLM has aborted a refused batch's requests
            done.set_exception(error)
            return
        if not requests:
            done.set_result(result)
            return
        # ``enqueue`` returns the engine's ids ("<id>-<8 random characters>"); outputs carry the LLM's own
        # request id, a counter (vLLM's ``InputProcessor.assign_request_id``)
        caller = _Caller([request_id.rsplit("-", 1)[0] for request_id in result], done)
        if not caller.request_ids:
            done.set_result([])
        for request_id in caller.request_ids:
            waiting[request_id] = caller


class _Caller:
    """The requests of one :meth:`SharedEngine.generate` call and the outputs finished so far."""

    def __init__(self, request_ids: list[str], done: Future) -> None:
        self.request_ids = request_ids
        self.done = done
        self.outputs: dict[str, Any] = {}

    def finish(self, output: Any) -> None:
        self.outputs[output.request_id] = output
        if len(self.outputs) == len(self.request_ids):
            self.done.set_result([self.outputs[request_id] for request_id in self.request_ids])

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class Generator:
    """Draws ``config.n`` samples per request with one vLLM engine; for ``map_batches``.

    Input columns: ``prompt_id`` (str), ``prompt`` (rendered text), ``prompt_text`` (the source's text,
    passed through for rewards), ``round`` (int64). Output: one row per request (see
    :mod:`limits_ray.storage.rounds`) with ``prompt_id``, ``prompt``, ``prompt_text``, ``round``, ``seed``
    and the sample columns (``n`` values per row) ``sample_idx``, ``response``, ``response_tokens`` (int64),
    ``logprob`` (float64, the sampled sequence's log-probability under the model, before
    temperature/top-p; NaN unless ``config.logprobs``) and ``finish_reason``.

    ``add_special_tokens=False`` is for prompts rendered with a chat template, which already carries
    the tokenizer's special tokens (vLLM would otherwise add a second BOS). The engine runs in
    ``config.engine_dtype``, starts once its GPUs are free (:func:`start_engine`) and is watched by an
    :class:`~limits_ray.pipeline.engine_guard.EngineGuard` (``label``: the stage named in its messages).
    """

    def __init__(self, config: GenerationConfig, add_special_tokens: bool = True, label: str = "generate") -> None:
        self.config = config
        self.add_special_tokens = add_special_tokens
        self.llm = start_engine(config, label)
        self.guard = EngineGuard(self.llm, label, config.stall_timeout_s)
        self.engine = SharedEngine(self.llm)

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
            logprobs=0 if config.logprobs else None,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generate every request of ``batch`` in the shared engine; one output row per round. Threads
        may call this at once (``generation.batches_in_flight``)."""
        missing = [column for column in REQUEST_COLUMNS if column not in batch]
        if missing:
            raise KeyError(f"generation input lacks column(s) {missing}; got {sorted(batch)}")
        prompt_ids = [str(value) for value in batch["prompt_id"]]
        prompts = [str(value) for value in batch["prompt"]]
        texts = [str(value) for value in batch["prompt_text"]]
        rounds = [int(value) for value in batch["round"]]
        if not prompts:
            return empty_output(self.config.n)
        params = [self.sampling_params(pid, rnd) for pid, rnd in zip(prompt_ids, rounds)]
        with engine_call("vLLM generate"):
            outputs = self.engine.generate(prompts, params, {"add_special_tokens": self.add_special_tokens})
        rows = [
            {"prompt_text": text, **self._round(pid, prompt, rnd, param.seed, output)}
            for pid, prompt, text, rnd, param, output in zip(prompt_ids, prompts, texts, rounds, params, outputs)
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
            "logprob": [_logprob(completion, prompt_id) if self.config.logprobs else np.nan for completion in completions],
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


SYNTHETIC_SLOT_BITS = 16  # words are drawn as one of 2**16 equally likely slots


def synthetic_word_probabilities(vocabulary_size: int = len(SYNTHETIC_VOCABULARY)) -> np.ndarray:
    """Probabilities of the synthetic words: Zipf's law ``p_k ~ 1/(k+1)`` rounded to multiples of ``2**-16``.

    Each word gets ``max(1, floor(2**16 p_k))`` of the ``2**16`` slots (the first word the rest), so
    the probabilities are exact dyadic rationals: what the generator samples is exactly this.
    """
    slots = 2**SYNTHETIC_SLOT_BITS
    weights = 1.0 / np.arange(1, vocabulary_size + 1)
    counts = np.maximum(1, np.floor(weights / weights.sum() * slots)).astype(np.int64)
    counts[0] += slots - counts.sum()
    return counts / slots


class SyntheticGenerator:
    """Model-free rounds with :class:`Generator`'s contract, for tests and benchmarks (``generation.kind: synthetic``).

    Each round draws from ``numpy.random.default_rng(round_seed(config.seed, prompt_id, round))``:
    per sample a length ``L`` uniform on ``1 .. max_tokens``, then ``L`` words i.i.d. from
    :data:`SYNTHETIC_VOCABULARY` with probabilities :func:`synthetic_word_probabilities`, joined by
    single spaces. ``response_tokens = L``; ``finish_reason`` is ``"length"`` when ``L = max_tokens``,
    else ``"stop"``; ``logprob`` is the response's exact log-probability under this distribution,
    ``-log(max_tokens) + sum_i log p(w_i)`` (distinct word sequences spell distinct texts). The prompt
    is not read: responses depend only on the round seed. ``add_special_tokens`` is accepted for the
    stage's constructor signature and unused. Texts are assembled as bytes with numpy, so a core
    produces hundreds of thousands of samples per second.
    """

    def __init__(self, config: GenerationConfig, add_special_tokens: bool = True) -> None:
        self.config = config
        probabilities = synthetic_word_probabilities(len(SYNTHETIC_VOCABULARY))
        self.word_logprobs = np.log(probabilities)
        slot_counts = np.rint(probabilities * 2**SYNTHETIC_SLOT_BITS).astype(np.int64)
        self.slots = np.repeat(np.arange(probabilities.size), slot_counts)  # slot -> word index
        spelled = [f"{word} ".encode("ascii") for word in SYNTHETIC_VOCABULARY]
        self.spelled = np.zeros((len(spelled), max(map(len, spelled))), dtype=np.uint8)
        for index, word in enumerate(spelled):
            self.spelled[index, :len(word)] = np.frombuffer(word, dtype=np.uint8)
        self.spelled_lengths = np.array([len(word) for word in spelled], dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One output row per request: ``n`` synthetic samples each."""
        missing = [column for column in REQUEST_COLUMNS if column not in batch]
        if missing:
            raise KeyError(f"generation input lacks column(s) {missing}; got {sorted(batch)}")
        prompt_ids = [str(value) for value in batch["prompt_id"]]
        if not prompt_ids:
            return empty_output(self.config.n)
        rounds = np.asarray(batch["round"], dtype=np.int64)
        seeds = np.array(
            [round_seed(self.config.seed, pid, int(rnd)) for pid, rnd in zip(prompt_ids, rounds)], dtype=np.int64,
        )
        drawn = [self._draw(int(seed)) for seed in seeds]
        lengths = np.stack([length for length, _ in drawn])
        words = np.concatenate([word for _, word in drawn])
        starts = np.cumsum(lengths.reshape(-1)) - lengths.reshape(-1)
        logprobs = np.add.reduceat(self.word_logprobs[words], starts) - np.log(self.config.max_tokens)
        shape = lengths.shape
        return {
            "prompt_id": _column("prompt_id", prompt_ids), "prompt": _column("prompt", list(batch["prompt"])),
            "prompt_text": _column("prompt_text", list(batch["prompt_text"])), "round": rounds, "seed": seeds,
            "sample_idx": rounds[:, None] * self.config.n + np.arange(self.config.n, dtype=np.int64),
            "response": self._texts(words, lengths.reshape(-1)).reshape(shape),
            "response_tokens": lengths,
            "logprob": logprobs.reshape(shape),
            "finish_reason": np.where(lengths == self.config.max_tokens, "length", "stop").astype(object),
        }

    def _draw(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One round: its ``n`` lengths and the word indices of its ``n`` responses, concatenated."""
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, self.config.max_tokens, size=self.config.n, endpoint=True, dtype=np.int64)
        slots = rng.integers(0, self.slots.size - 1, size=int(lengths.sum()), endpoint=True, dtype=np.int64)
        return lengths, self.slots[slots]

    def _texts(self, words: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The responses spelled out: each word and a space, less the last space of each response."""
        spelled = self.spelled[words]
        data = spelled[spelled != 0]
        ends = np.cumsum(self.spelled_lengths[words])[np.cumsum(lengths) - 1]
        data = np.delete(data, ends - 1)
        offsets = np.concatenate([[0], ends - np.arange(1, ends.size + 1)]).astype(np.int32)
        texts = pa.StringArray.from_buffers(ends.size, pa.py_buffer(offsets), pa.py_buffer(data))
        return texts.to_numpy(zero_copy_only=False)


class WordTokenizer:
    """The synthetic generator's tokenizer: a token is a whitespace-separated word.

    Enough of a Hugging Face tokenizer's call interface for :func:`limits_ray.pipeline.prompts.load_prompts`
    to count prompt tokens with ``generation.kind: synthetic``; it has no chat template.
    """

    chat_template = None
    name_or_path = "synthetic words"

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        """``{"input_ids": [[0] * words for each text]}``."""
        return {"input_ids": [[0] * len(text.split()) for text in texts]}
