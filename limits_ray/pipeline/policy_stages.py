"""A checkpoint's samples on Ray Data: sampled with its token ids, scored under the base model and the rewards.

:func:`sample_policy` runs, on the job's prompts::

    requests -> PolicyGenerator (vLLM, the checkpoint; keeps token ids)
             -> BaseLogprobScorer (vLLM, the base model: log pi0 of each response)
             [-> ProposalLogprobScorer per other proposal (vLLM, its model: log q_k of each response)]
             -> one scorer pool per reward (the base run's reward configs)

With ``score_under`` (``limits-ray compare`` with policies: :mod:`limits_ray.core.proposals`), every
sample is also scored under each of the other proposals' models, so that each sample's log-probability
under every proposal is known; the base model's own samples come through the same path
(:func:`base_proposal`: the base generation's seed, so the stored base rounds regenerate bit for bit on
the same stack, with their token ids, which the store does not keep).

Log-probability convention. ``log pi`` is vLLM's cumulative log-probability of the sampled tokens
under the checkpoint and ``log pi0`` the sum of the base model's prompt log-probabilities of the same
token ids after the same prompt token ids; both are raw model log-probabilities (vLLM's default
``logprobs_mode="raw_logprobs"``: before temperature and top-p). They are the log-probabilities of
the *sampling* distributions only at temperature 1 and top_p 1; otherwise the KL reported is the
model-level ``E_pi[log pi_model - log pi0_model]`` over the tempered samples, and a warning says so.
Token ids, not re-tokenised text, are scored: the KL is over token sequences (as in PPO/GRPO), a
response ending in EOS includes the EOS token in both log-probabilities, and responses that do
not round-trip through the tokenizer (partial UTF-8) are scored exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import numpy as np
import pyarrow as pa

from limits_ray.config import GenerationConfig, JobConfig, PolicyConfig
from limits_ray.pipeline.engine_guard import EngineGuard
from limits_ray.pipeline.faults import engine_call
from limits_ray.pipeline.generation import Generator, round_seed, start_engine
from limits_ray.pipeline.progress import Progress
from limits_ray.pipeline.prompts import Prompt
from limits_ray.pipeline.stages import (
    Stage,
    StageTimes,
    generation_stage,
    released,
    scorer_stage,
    tolerate_start_deaths,
)
from limits_ray.storage.rounds import per_round, per_sample, regroup, round_lengths

__all__ = [
    "BASE_PROPOSAL", "BaseLogprobScorer", "PolicyGenerator", "ProposalLogprobScorer", "base_proposal", "policy_generation_config",
    "proposal_column", "sample_policy",
]

BASE_PROPOSAL = "<base>"
"""The base model's name as a proposal (never a column: its log-probability is ``base_logprob``)."""

log = logging.getLogger(__name__)


def _token_text(ids: Any) -> str:
    return " ".join(str(int(token)) for token in ids)


class PolicyGenerator(Generator):
    """:class:`~limits_ray.pipeline.generation.Generator` that also keeps the token ids it sampled.

    Adds ``prompt_token_ids`` (one string of space-separated ids per round, exactly what the engine
    saw) and ``response_token_ids`` (``[rows, n, max_tokens]`` int64, padded with -1).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calls = threading.local()  # per call: several batches may be in flight (generation.batches_in_flight)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._calls.token_ids = token_ids = []
        output = super().__call__(batch)
        width = self.config.max_tokens
        responses = np.full((len(token_ids), self.config.n, width), -1, dtype=np.int64)
        for row, (_, samples) in enumerate(token_ids):
            for column, ids in enumerate(samples):
                responses[row, column, :len(ids)] = ids[:width]
        prompts = np.empty(len(token_ids), dtype=object)
        prompts[:] = [prompt for prompt, _ in token_ids]
        output["prompt_token_ids"] = prompts
        output["response_token_ids"] = responses
        return output

    def _round(self, prompt_id: str, prompt: str, round: int, seed: int, output: Any) -> dict[str, Any]:
        row = super()._round(prompt_id, prompt, round, seed, output)
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        self._calls.token_ids.append((_token_text(output.prompt_token_ids), [list(c.token_ids) for c in completions]))
        return row


def _response_ids(batch: dict[str, np.ndarray]) -> list[list[int]]:
    """The per-sample response token ids of a batch (padding removed), in sample order."""
    rows = batch["response_token_ids"]
    if isinstance(rows, np.ndarray) and rows.dtype != object and rows.ndim == 3:
        flat = rows.reshape(-1, rows.shape[-1])
    else:
        flat = [sample for row in rows for sample in np.asarray(row).reshape(-1, np.asarray(row).shape[-1])]
    return [[int(token) for token in sample if token >= 0] for sample in flat]


class BaseLogprobScorer:
    """``log pi0(response | prompt)`` of every sample under the base model (one vLLM engine).

    For each sample, the prompt's token ids followed by the response's token ids go to the base
    model as a tokenized prompt with ``SamplingParams(max_tokens=1, prompt_logprobs=0)``; the sum of
    the returned prompt log-probabilities over the response positions is ``log pi0`` (raw model
    log-probabilities, before temperature). Adds the float64 sample column ``base_logprob``
    (:attr:`column`).
    """

    column = "base_logprob"

    def __init__(self, config: GenerationConfig, label: str = "base_logprob") -> None:
        from vllm import SamplingParams

        # the base generation's engine (its seed only draws the one discarded token of each pass)
        self.llm = start_engine(config, label)
        self.guard = EngineGuard(self.llm, label, config.stall_timeout_s)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        lengths = round_lengths(batch)
        prompt_ids = [[int(token) for token in str(text).split()] for text in per_round(batch["prompt_token_ids"], lengths)]
        response_ids = _response_ids(batch)
        values = np.zeros(len(response_ids), dtype=np.float64)
        todo = [index for index, ids in enumerate(response_ids) if ids]
        if todo:
            inputs = [TokensPrompt(prompt_token_ids=prompt_ids[index] + response_ids[index]) for index in todo]
            with engine_call("vLLM base log-probabilities"):
                outputs = self.llm.generate(inputs, self.params, use_tqdm=False)
            for index, output in zip(todo, outputs):
                tokens = prompt_ids[index] + response_ids[index]
                start = len(prompt_ids[index])
                logprobs = output.prompt_logprobs
                values[index] = sum(logprobs[position][tokens[position]].logprob for position in range(start, len(tokens)))
        out = dict(batch)
        out[self.column] = regroup(values, batch)
        return out


class ProposalLogprobScorer(BaseLogprobScorer):
    """``log q(response | prompt)`` of every sample under another model ``config.model`` (a proposal: a policy
    scoring the base samples and the other policies' samples), as :class:`BaseLogprobScorer` does for the base
    model; adds the float64 sample column ``column`` (:func:`proposal_column`)."""

    def __init__(self, config: GenerationConfig, column: str, label: str = "") -> None:
        super().__init__(config, label or f"logprob {column}")
        self.column = column


def proposal_column(name: str) -> str:
    """The sample column holding each sample's log-probability under proposal ``name``."""
    return f"logprob_{name}"


def base_proposal(config: JobConfig) -> PolicyConfig:
    """The base model as a proposal: its sampling setup and seed, so that its rounds are the stored base rounds."""
    return PolicyConfig(name=BASE_PROPOSAL, model=config.generation.model, revision=config.generation.revision,
                        samples_per_prompt=config.generation.samples_per_prompt, n=config.generation.n,
                        seed=config.generation.seed)


def policy_generation_config(config: JobConfig, policy: PolicyConfig) -> GenerationConfig:
    """The checkpoint's sampling setup: the base run's sampling parameters and resources, its own model,
    ``n``, samples, seed and engine arguments (over the base's), with log-probabilities (its KL needs them)."""
    seed = policy.seed if policy.seed >= 0 else round_seed(config.generation.seed, f"policy:{policy.name}", 0)
    return dataclasses.replace(
        config.generation, model=policy.model, revision=policy.revision, samples_per_prompt=policy.samples_per_prompt, n=policy.n, seed=seed,
        engine_kwargs={**config.generation.engine_kwargs, **policy.engine_kwargs}, logprobs=True,
    )


def _flatten(batch: dict[str, np.ndarray], rewards: list[str]) -> pa.Table:
    lengths = round_lengths(batch)
    columns: dict[str, Any] = {
        "prompt_id": pa.array(per_round(batch["prompt_id"], lengths).astype(str), pa.string()),
        "round": pa.array(per_round(batch["round"], lengths), pa.int64()),
        "sample_idx": pa.array(per_sample(batch["sample_idx"]), pa.int64()),
        "logprob": pa.array(per_sample(batch["logprob"]), pa.float64()),
        "base_logprob": pa.array(per_sample(batch["base_logprob"]), pa.float64()),
        "response_tokens": pa.array(per_sample(batch["response_tokens"]), pa.int64()),
        "finish_reason": pa.array([str(value) for value in per_sample(batch["finish_reason"])], pa.string()),
        "response": pa.array([str(value) for value in per_sample(batch["response"])], pa.string()),
        "response_token_ids": pa.array([" ".join(str(token) for token in ids) for ids in _response_ids(batch)], pa.string()),
    }
    for name in sorted(name for name in batch if name.startswith("logprob_")):
        columns[name] = pa.array(per_sample(batch[name]), pa.float64())
    for name in rewards:
        columns[name] = pa.array(per_sample(batch[name]), pa.float64())
    return pa.table(columns)


def sample_policy(config: JobConfig, policy: PolicyConfig, prompts: list[Prompt],
                  score_under: tuple[PolicyConfig, ...] = ()) -> pa.Table:
    """Sample, base-score and reward-score one checkpoint on ``prompts`` (loaded and rendered as the job's).

    Returns one row per sample: prompt_id, round, sample_idx, logprob (log pi), base_logprob
    (log pi0), response_tokens, finish_reason, response, response_token_ids (space-separated), a float64
    column :func:`proposal_column` per policy of ``score_under`` (the sample's log-probability under it)
    and one float64 column per reward. Needs Ray initialised.
    """
    import ray

    generation = policy_generation_config(config, policy)
    if generation.temperature != 1.0 or generation.top_p != 1.0:
        log.warning(
            "policy %s: temperature %s, top_p %s: the KL reported is E_pi[log pi_model - log pi0_model] over the "
            "tempered samples, not the KL of the sampling distributions (exact only at temperature 1, top_p 1)",
            policy.name, generation.temperature, generation.top_p,
        )
    requests = [
        {"prompt_id": prompt.prompt_id, "prompt": prompt.rendered, "prompt_text": prompt.text, "round": round_index}
        for prompt in prompts for round_index in range(generation.rounds)
    ]
    base = config.generation
    rewards = [reward.name for reward in config.rewards]
    actors = {f"generate_{policy.name}": generation.max_actors, "base_logprob": base.max_actors,
              **{f"logprob_{other.name}": base.max_actors for other in score_under},
              **{f"score_{reward.name}": reward.max_actors for reward in config.rewards}}
    tables = []
    stages = [
        generation_stage(generation, not config.prompts.chat_template, fn=PolicyGenerator, name=f"generate_{policy.name}"),
        Stage(name="base_logprob", fn=BaseLogprobScorer, config=base, resources=base, engine=True,
              batch_size=generation.batch_size, timeout_s=base.timeout_s),
        *(Stage(name=f"logprob_{other.name}", fn=ProposalLogprobScorer, config=policy_generation_config(config, other),
                resources=base, engine=True, batch_size=generation.batch_size, timeout_s=base.timeout_s,
                kwargs={"column": proposal_column(other.name)}) for other in score_under),
        *(scorer_stage(reward, generation.n) for reward in config.rewards),
    ]
    with released([]) as placements:
        dataset = tolerate_start_deaths(ray.data.from_items(
            requests, override_num_blocks=max(1, len(requests) // generation.batch_size)), config.batch_retries)
        for stage in stages:
            dataset = stage.apply(dataset, batch_retries=config.batch_retries, placements=placements)
        progress = Progress(len(requests), generation.n, actors, label=f"policy {policy.name}").start()
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                tables.append(_flatten(batch, rewards))
                progress.update(len(batch["prompt_id"]), tables[-1].num_rows, StageTimes().add(batch))
        finally:
            progress.close()
    if not tables:
        raise RuntimeError(f"policy {policy.name}: no samples came back")
    return pa.concat_tables(tables).sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
