"""Generation: a real vLLM engine on the tiny policy (seeding, layout, log-probabilities); the synthetic generator."""

from __future__ import annotations

import dataclasses
import math
import os
import threading

import numpy as np
import pytest

from limits_ray.config import EngineResources, GenerationConfig
from limits_ray.pipeline.generation import (
    OUTPUT_COLUMNS,
    SYNTHETIC_VOCABULARY,
    Generator,
    SyntheticGenerator,
    prompt_token_count,
    round_seed,
    set_cpu_env_defaults,
    synthetic_word_probabilities,
)
from limits_ray.storage.rounds import ROUND_COLUMNS, per_round, per_sample, round_lengths
from limits_ray.tiny_models import TinyModels

from _tiny import ENGINE_KWARGS, session_tiny_models

N = 4
MAX_TOKENS = 12
PROMPTS = {"p0": "The river ran", "p1": "Please write a short poem about the sea.", "p2": "Numbers help"}


def requests(pairs: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """A request batch for (prompt_id, round) pairs."""
    return {
        "prompt_id": np.array([pid for pid, _ in pairs], dtype=object),
        "prompt": np.array([PROMPTS[pid] for pid, _ in pairs], dtype=object),
        "prompt_text": np.array([PROMPTS[pid] for pid, _ in pairs], dtype=object),
        "round": np.array([rnd for _, rnd in pairs], dtype=np.int64),
    }


def flat(output: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One value per sample for every column (the output has one row per round)."""
    lengths = round_lengths(output)
    return {
        column: per_round(output[column], lengths) if column in ROUND_COLUMNS else per_sample(output[column])
        for column in OUTPUT_COLUMNS
    }


def rows_of(output: dict[str, np.ndarray], prompt_id: str, round: int) -> dict[str, list]:
    """The samples of one request, as column lists."""
    samples = flat(output)
    mask = (samples["prompt_id"] == prompt_id) & (samples["round"] == round)
    return {column: samples[column][mask].tolist() for column in OUTPUT_COLUMNS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return session_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(tiny: TinyModels) -> Generator:
    config = GenerationConfig(
        model=str(tiny.policy), samples_per_prompt=2 * N, n=N, seed=7, max_tokens=MAX_TOKENS,
        engine_kwargs=ENGINE_KWARGS, logprobs=True,
    )
    return Generator(config)


@pytest.fixture(scope="module")
def first(generator: Generator) -> dict[str, np.ndarray]:
    return generator(requests([("p0", 0), ("p1", 0), ("p0", 1), ("p2", 3)]))


def test_round_seed_is_stable_and_bounded() -> None:
    assert round_seed(0, "abc", 0) == round_seed(0, "abc", 0) == 1645918737
    assert round_seed(0, "abc", np.int64(2)) == round_seed(0, "abc", 2)
    seeds = {round_seed(base, pid, rnd) for base in (0, 1) for pid in ("a", "b") for rnd in range(5)}
    assert len(seeds) == 20
    assert all(0 <= seed < 2**31 for seed in seeds)


def test_cpu_env_defaults_follow_the_config_and_keep_existing_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    set_cpu_env_defaults(EngineResources(num_gpus=1))  # a GPU engine: nothing set, whatever this machine has
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    set_cpu_env_defaults(EngineResources(num_gpus=0))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


@pytest.mark.slow
def test_schema_and_layout(first: dict[str, np.ndarray]) -> None:
    assert set(first) == set(OUTPUT_COLUMNS)
    assert all(len(column) == 4 for column in first.values())  # one row per round
    assert all(len(row) == N for column in OUTPUT_COLUMNS if column not in ROUND_COLUMNS for row in first[column])
    for name in ("round", "seed", "sample_idx", "response_tokens"):
        assert first[name].dtype == np.int64
    assert first["logprob"].dtype == np.float64
    for pid, rnd in (("p0", 0), ("p1", 0), ("p0", 1), ("p2", 3)):
        rows = rows_of(first, pid, rnd)
        assert rows["sample_idx"] == [rnd * N + j for j in range(N)]
        assert set(rows["seed"]) == {round_seed(7, pid, rnd)}
        assert set(rows["prompt"]) == {PROMPTS[pid]}


@pytest.mark.slow
def test_values(first: dict[str, np.ndarray]) -> None:
    samples = flat(first)
    assert np.isfinite(samples["logprob"]).all() and (samples["logprob"] <= 0).all()
    assert (samples["response_tokens"] > 0).all() and (samples["response_tokens"] <= MAX_TOKENS).all()
    assert set(samples["finish_reason"]) <= {"length", "stop"}
    assert all(isinstance(text, str) for text in samples["response"])


@pytest.mark.slow
def test_reproducible_across_batches(generator: Generator, first: dict[str, np.ndarray]) -> None:
    again = generator(requests([("p2", 3), ("p0", 1), ("p1", 5)]))
    for pid, rnd in (("p2", 3), ("p0", 1)):
        assert rows_of(again, pid, rnd) == rows_of(first, pid, rnd)  # bit-for-bit, logprobs included


@pytest.mark.slow
def test_batches_in_flight_share_the_engine_and_each_gets_its_own_rounds(generator: Generator,
                                                                         first: dict[str, np.ndarray]) -> None:
    """Three batches called at once (threads, as Ray Data runs ``batches_in_flight`` calls): the engine
    holds their requests together, and each batch gets exactly its rounds, bit-for-bit as alone."""
    batches = [[("p2", 3), ("p0", 7)], [("p0", 1), ("p1", 2)], [("p1", 0), ("p0", 0)]]
    engine = generator.llm.llm_engine
    step, held = engine.step, []

    def counted_step():
        held.append(engine.get_num_unfinished_requests())
        return step()

    start = threading.Barrier(len(batches))
    outputs: list = [None] * len(batches)

    def call(index: int) -> None:
        start.wait()
        outputs[index] = generator(requests(batches[index]))

    engine.step = counted_step
    try:
        threads = [threading.Thread(target=call, args=(index,)) for index in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.step = step  # the engine guard's timed step
    assert max(held) > 2 * N  # more than one batch's samples were in the engine at once
    in_first = set(zip(first["prompt_id"], first["round"]))
    for pairs, output in zip(batches, outputs):
        assert list(zip(output["prompt_id"], output["round"])) == pairs
        alone = generator(requests(pairs))
        for pid, rnd in pairs:
            assert rows_of(output, pid, rnd) == rows_of(alone, pid, rnd)
            if (pid, rnd) in in_first:
                assert rows_of(output, pid, rnd) == rows_of(first, pid, rnd)


@pytest.mark.slow
def test_without_logprobs_the_same_samples_come_with_nan_logprobs(generator: Generator, first: dict[str, np.ndarray]) -> None:
    """The default: vLLM computes no log-probabilities (nothing in the frontier uses them); sampling is unchanged."""
    config = generator.config
    generator.config = dataclasses.replace(config, logprobs=False)
    try:
        assert generator.sampling_params("p0", 0).logprobs is None
        plain = generator(requests([("p0", 1), ("p2", 3)]))
    finally:
        generator.config = config
    assert generator.sampling_params("p0", 0).logprobs == 0
    for pid, rnd in (("p0", 1), ("p2", 3)):
        without, with_logprobs = rows_of(plain, pid, rnd), rows_of(first, pid, rnd)
        assert np.isnan(without.pop("logprob")).all() and np.isfinite(with_logprobs.pop("logprob")).all()
        assert without == with_logprobs


@pytest.mark.slow
def test_rounds_differ(first: dict[str, np.ndarray]) -> None:
    round0, round1 = rows_of(first, "p0", 0), rows_of(first, "p0", 1)
    assert round0["response"] != round1["response"]
    assert len(set(round0["response"])) > 1  # the n samples of one request differ too


@pytest.mark.slow
def test_logprob_matches_transformers(tiny: TinyModels, generator: Generator, first: dict[str, np.ndarray]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    model = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    row = rows_of(first, "p1", 0)
    params = generator.sampling_params("p1", 0)
    completions = generator.llm.generate([PROMPTS["p1"]], params, use_tqdm=False)[0].outputs
    prompt_ids = tokenizer(PROMPTS["p1"]).input_ids
    for completion, response, logprob in zip(completions, row["response"], row["logprob"]):
        assert (completion.text, completion.cumulative_logprob) == (response, logprob)
        ids = torch.tensor([prompt_ids + list(completion.token_ids)])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        start = len(prompt_ids) - 1
        expected = sum(logprobs[start + i, token].item() for i, token in enumerate(completion.token_ids))
        assert math.isclose(logprob, expected, abs_tol=1e-3)


@pytest.mark.slow
def test_empty_batch(generator: Generator) -> None:
    output = generator(requests([]))
    assert set(output) == set(OUTPUT_COLUMNS) and all(len(column) == 0 for column in output.values())


@pytest.mark.slow
def test_prompt_token_count(generator: Generator) -> None:
    tokenizer = generator.llm.get_tokenizer()
    assert prompt_token_count(tokenizer, PROMPTS["p1"]) == len(tokenizer(PROMPTS["p1"]).input_ids) > 0


# --------------------------------------------------------------------------------------------------
# The synthetic generator (generation.kind: synthetic): no model, so these tests are fast.

def synthetic(max_tokens: int = MAX_TOKENS, n: int = N) -> SyntheticGenerator:
    config = GenerationConfig(kind="synthetic", samples_per_prompt=2 * n, n=n, seed=7, max_tokens=max_tokens)
    return SyntheticGenerator(config)


def test_synthetic_follows_the_generator_contract() -> None:
    output = synthetic()(requests([("p0", 0), ("p1", 0), ("p0", 1), ("p2", 3)]))
    assert set(output) == set(OUTPUT_COLUMNS)
    for name in ("round", "seed", "sample_idx", "response_tokens"):
        assert output[name].dtype == np.int64
    for pid, rnd in (("p0", 0), ("p1", 0), ("p0", 1), ("p2", 3)):
        rows = rows_of(output, pid, rnd)
        assert rows["sample_idx"] == [rnd * N + j for j in range(N)]
        assert set(rows["seed"]) == {round_seed(7, pid, rnd)} and set(rows["prompt"]) == {PROMPTS[pid]}
    samples = flat(output)
    words = [text.split(" ") for text in samples["response"]]
    assert [len(text) for text in words] == samples["response_tokens"].tolist()
    assert set(word for text in words for word in text) <= set(SYNTHETIC_VOCABULARY)
    assert (samples["response_tokens"] >= 1).all() and (samples["response_tokens"] <= MAX_TOKENS).all()
    expected_reasons = np.where(samples["response_tokens"] == MAX_TOKENS, "length", "stop")
    assert samples["finish_reason"].tolist() == expected_reasons.tolist()
    assert synthetic()(requests([]))["sample_idx"].shape == (0, N)


def test_synthetic_logprob_is_the_sequence_probability() -> None:
    probabilities = dict(zip(SYNTHETIC_VOCABULARY, synthetic_word_probabilities()))
    samples = flat(synthetic()(requests([("p0", 0), ("p1", 2)])))
    for text, logprob in zip(samples["response"], samples["logprob"]):
        expected = -math.log(MAX_TOKENS) + sum(math.log(probabilities[word]) for word in text.split(" "))
        assert math.isclose(logprob, expected, rel_tol=1e-12)


def test_synthetic_samples_follow_their_logprobs() -> None:
    """One-word responses: each text's frequency over 40,000 draws matches exp(logprob) (5 binomial sigmas)."""
    generator = synthetic(max_tokens=1, n=1000)
    samples = flat(generator(requests([(pid, rnd) for pid in PROMPTS for rnd in range(14)][:40])))
    texts, counts = np.unique(samples["response"], return_counts=True)
    probability = {text: math.exp(lp) for text, lp in zip(samples["response"], samples["logprob"])}
    total = samples["response"].size
    for text, count in zip(texts, counts):
        p = probability[text]
        assert abs(count - total * p) <= 5 * math.sqrt(total * p * (1 - p)) + 1, text
    assert math.isclose(sum(synthetic_word_probabilities()), 1.0, rel_tol=1e-15)


def test_synthetic_rounds_are_reproducible_and_independent() -> None:
    first = synthetic()(requests([("p0", 0), ("p0", 1), ("p1", 0)]))
    again = synthetic()(requests([("p1", 0), ("p0", 1)]))
    for pid, rnd in (("p0", 1), ("p1", 0)):
        assert rows_of(again, pid, rnd) == rows_of(first, pid, rnd)
    assert rows_of(first, "p0", 0)["response"] != rows_of(first, "p0", 1)["response"]
