"""Real policies against the frontier: checkpoints, best-of-n, proxy vs gold, reward ensembles.

``limits-ray compare --config CONFIG.yaml`` (:func:`compare`) runs, in one command:

1. the base job (:func:`limits_ray.job.run_job`; rounds already in the sample store are reused);
2. for each ``config.policies`` checkpoint, a Ray Data run on the same prompts::

       requests -> PolicyGenerator (vLLM, the checkpoint; keeps token ids)
                -> BaseLogprobScorer (vLLM, the base model: log pi0 of each response)
                -> one scorer pool per reward (the base run's reward configs)

   and from its samples the KL ``E_pi[log pi - log pi0]`` and gains ``E_pi[e] - E_pi0[e]`` with
   standard errors (:mod:`limits_ray.policy_stats`), beside the frontier's gain at that KL;
3. best-of-n points from the base samples already stored (``bon.parquet`` of the run);
4. proxy vs gold (Prop. 3): gold gain against KL for every alignment reward evaluated by the gold;
5. ensembles (Theorem 3): M = 1..M_max synthetic proxies ``gold + sigma * z_k`` (``z_k`` a
   deterministic standard normal per (prompt_id, sample_idx) and k) averaged and aligned to, offline
   from the stored base samples; the gold gain at a fixed beta against M, with ``c / sqrt(M)``;
6. figures and ``compare.md`` (:mod:`limits_ray.policy_plots`).

Log-probability convention. ``log pi`` is vLLM's cumulative log-probability of the sampled tokens
under the checkpoint and ``log pi0`` the sum of the base model's prompt log-probabilities of the same
token ids after the same prompt token ids; both are raw model log-probabilities (vLLM's default
``logprobs_mode="raw_logprobs"``: before temperature and top-p). They are the log-probabilities of
the *sampling* distributions only at temperature 1 and top_p 1; otherwise the KL reported is the
model-level ``E_pi[log pi_model - log pi0_model]`` over the tempered samples, and a warning says so.
The base frontier uses the same base samples (same temperature), so the comparison is consistent.
Token ids, not re-tokenised text, are scored: the KL is over token sequences (as in PPO/GRPO), a
response ending in EOS includes the EOS token in both log-probabilities, and responses that do
not round-trip through the tokenizer (partial UTF-8) are scored exactly.

Outputs in ``<output_dir>``: ``policies.parquet`` (:data:`POLICY_SCHEMA`), ``proxy_gold.parquet``
(:data:`PROXY_GOLD_SCHEMA`), ``ensembles.parquet`` (:data:`ENSEMBLE_SCHEMA`),
``policies/<name>.parquet`` (each checkpoint's scored samples), the PNGs and ``compare.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.config import AnalysisConfig, ConfigError, GenerationConfig, JobConfig, PolicyConfig
from limits_ray.faults import engine_call
from limits_ray.fixed_kl import at_kl
from limits_ray.generation import Generator, engine_kwargs, round_seed, set_cpu_env_defaults
from limits_ray.io import write_table
from limits_ray.policy_stats import (
    PolicyEstimate, between_or_within_se, frontier_gain_at_kl, frontier_slope_at_kl, gap_se, hash_normal,
    inverse_sqrt_reference, mean_over_prompts, prompt_estimate,
)
from limits_ray.prompts import Prompt
from limits_ray.reward_spec import RewardSpec
from limits_ray.rounds import per_round, per_sample, regroup, round_lengths

__all__ = [
    "BaseLogprobScorer", "CompareOptions", "CompareResult", "ENSEMBLE_SCHEMA", "POLICY_SCHEMA", "PROXY_GOLD_SCHEMA",
    "PolicyGenerator", "bon_points", "compare", "ensemble_table", "policy_generation_config", "policy_points",
    "proxy_gold_table", "sample_policy",
]

log = logging.getLogger(__name__)

POLICY_SCHEMA = pa.schema([
    ("policy", pa.string()),        # checkpoint name, or "best-of-<n>"
    ("kind", pa.string()),          # "checkpoint" | "best_of_n"
    ("bon_n", pa.int64()),          # n for best-of-n, 0 for a checkpoint
    ("align", pa.string()),         # the frontier compared with (best-of-n: its selection reward)
    ("eval", pa.string()),          # the evaluation reward of gain and frontier gain
    ("prompts", pa.int64()),
    ("samples", pa.int64()),        # policy samples (best-of-n: base samples), summed over prompts
    ("kl", pa.float64()),           # prompt mean of KL(pi || pi0), nats
    ("kl_se", pa.float64()),        # NaN for best-of-n (a function of the empirical reward levels)
    ("gain", pa.float64()),         # prompt mean of E_pi[e] - E_pi0[e]
    ("gain_se", pa.float64()),      # best-of-n: from the per-prompt jackknife se (bon.parquet)
    ("frontier_beta", pa.float64()),  # the beta where the frontier's mean KL equals kl (NaN off the grid)
    ("frontier_gain", pa.float64()),  # the frontier's gain at kl (anchored at (0, 0)); beyond the grid's
                                      # largest KL, the gain there (the frontier rises with KL: a lower bound)
    ("frontier_gain_se", pa.float64()),  # the frontier's error bar at that fixed KL (gain_se_at_kl)
    ("beyond_grid", pa.bool_()),    # kl > the frontier's largest KL (about log N): gap is a lower bound
    ("gap", pa.float64()),          # frontier_gain - gain: what is left at the policy's KL
    ("gap_se", pa.float64()),       # sqrt(gain_se^2 + s^2 kl_se^2 - 2 s cov(gain, kl) + F^2 + 2 F shared),
                                    # F = frontier_gain_se, s = the frontier's d gain / d KL at kl (0 beyond
                                    # the grid; best-of-n: its KL taken as exact), shared: the se of the
                                    # part of gain from the frontier's base samples (policy_stats.gap_se)
])

PROXY_GOLD_SCHEMA = pa.schema([
    ("align", pa.string()), ("gold", pa.string()), ("beta", pa.float64()), ("kl", pa.float64()),
    ("kl_se", pa.float64()), ("gold_gain", pa.float64()), ("gold_gain_se", pa.float64()),
    ("loss", pa.float64()),        # Prop. 3: gain_gold(gold, beta) - gain_gold(align, beta)
    ("loss_se", pa.float64()),
])

ENSEMBLE_SCHEMA = pa.schema([
    ("members", pa.int64()), ("align", pa.string()), ("gold", pa.string()), ("beta", pa.float64()),
    ("noise", pa.float64()),       # sigma of each synthetic proxy's residual, reward units
    ("kl", pa.float64()), ("gold_gain", pa.float64()), ("gold_gain_se", pa.float64()),
    ("gold_aligned_gain", pa.float64()),  # gain_gold(gold, beta): the M -> infinity limit
    ("gap", pa.float64()),         # gold_aligned_gain - gold_gain
    ("reference", pa.float64()),   # c / sqrt(M), c fitted to |gap| at M = 1
])


# --------------------------------------------------------------------------------------------------
# Ray Data stages


def _token_text(ids: Any) -> str:
    return " ".join(str(int(token)) for token in ids)


class PolicyGenerator(Generator):
    """:class:`~limits_ray.generation.Generator` that also keeps the token ids it sampled.

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
    log-probabilities, before temperature). Adds the float64 sample column ``base_logprob``.
    """

    def __init__(self, config: GenerationConfig) -> None:
        set_cpu_env_defaults(config)
        from vllm import LLM, SamplingParams

        # the base generation's engine (its seed only draws the one discarded token of each pass)
        self.llm = LLM(model=config.model, **engine_kwargs(config))
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
        out["base_logprob"] = regroup(values, batch)
        return out


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
    }
    for name in rewards:
        columns[name] = pa.array(per_sample(batch[name]), pa.float64())
    return pa.table(columns)


def sample_policy(config: JobConfig, policy: PolicyConfig, prompts: list[Prompt]) -> pa.Table:
    """Sample, base-score and reward-score one checkpoint on ``prompts`` (loaded and rendered as the job's).

    Returns one row per sample: prompt_id, round, sample_idx, logprob (log pi), base_logprob
    (log pi0), response_tokens, finish_reason, response and one float64 column per reward.
    Needs Ray initialised.
    """
    import ray

    from limits_ray.pipeline import (
        StageTimes, Timed, generation_stage, released, remote_args_accepted, restart_args, scorer_stage,
    )
    from limits_ray.placement import EnginePlacement
    from limits_ray.progress import Progress

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
              **{f"score_{reward.name}": reward.max_actors for reward in config.rewards}}
    tables = []
    with released([EnginePlacement(base, engine=True)]) as placements:
        dataset = ray.data.from_items(requests, override_num_blocks=max(1, len(requests) // generation.batch_size))
        dataset = generation_stage(
            dataset, generation, not config.prompts.chat_template, stage=PolicyGenerator, name=f"generate_{policy.name}",
            batch_retries=config.batch_retries, placements=placements,
        )
        with remote_args_accepted():
            dataset = dataset.map_batches(
                Timed,
                fn_constructor_kwargs={"stage": BaseLogprobScorer, "name": "base_logprob", "config": base},
                compute=placements[0].pool(),
                batch_size=generation.batch_size,
                **placements[0].remote_args(),
                **restart_args(config.batch_retries),
            )
        for reward in config.rewards:
            dataset = scorer_stage(dataset, reward, generation.n, batch_retries=config.batch_retries, placements=placements)
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


# --------------------------------------------------------------------------------------------------
# Tables


def _group(table: pa.Table) -> dict[str, np.ndarray]:
    """Row indices per prompt_id."""
    ids = np.asarray(table["prompt_id"].to_pylist(), dtype=object)
    return {prompt_id: np.flatnonzero(ids == prompt_id) for prompt_id in dict.fromkeys(ids)}


def _frontier_arrays(frontier_mean: pa.Table, align: str, evaluation: str) -> dict[str, np.ndarray | None]:
    """One frontier's columns; ``gain_se`` is its fixed-KL error bar (``gain_se_at_beta``: the fixed-beta one), and
    ``slope``/``kl_dbeta`` None for a table written before they existed (then linear interpolation and the
    fixed-beta error bar)."""
    rows = frontier_mean.filter(pc.and_(pc.equal(frontier_mean["align"], align), pc.equal(frontier_mean["eval"], evaluation)))
    arrays: dict[str, np.ndarray | None] = {name: rows[name].to_numpy() for name in ("beta", "kl", "gain")}
    arrays["gain_se"] = rows["gain_se_at_kl" if "gain_se_at_kl" in rows.column_names else "gain_se"].to_numpy()
    arrays["gain_se_at_beta"] = rows["gain_se"].to_numpy()
    for name in ("slope", "kl_dbeta"):
        arrays[name] = rows[name].to_numpy() if name in rows.column_names else None
    return arrays


def _compare_row(name: str, kind: str, bon_n: int, align: str, evaluation: str, frontier: dict[str, np.ndarray],
                 prompts: int, samples: int, kl: float, kl_se: float, gain: float, gain_se: float,
                 kl_gain_cov: float = 0.0, shared_se: float = 0.0) -> dict[str, Any]:
    beyond = bool(frontier["kl"].size and kl > frontier["kl"].max())
    reach = float(frontier["kl"].max()) if beyond else kl
    frontier_gain, frontier_se = frontier_gain_at_kl(frontier["kl"], frontier["gain"], reach, frontier["gain_se"],
                                                     frontier["slope"], frontier["kl_dbeta"], frontier["beta"])
    beta = float("nan")
    if frontier["kl"].size and frontier["kl"].min() <= kl <= frontier["kl"].max():
        beta = at_kl(frontier["kl"], frontier["beta"], frontier["gain"], kl, frontier["slope"], frontier["kl_dbeta"])[0]
    slope = 0.0 if beyond else frontier_slope_at_kl(frontier["kl"], frontier["gain"], kl, frontier["slope"])
    return {
        "policy": name, "kind": kind, "bon_n": bon_n, "align": align, "eval": evaluation, "prompts": prompts,
        "samples": samples, "kl": kl, "kl_se": kl_se, "gain": gain, "gain_se": gain_se, "frontier_beta": beta,
        "frontier_gain": frontier_gain, "frontier_gain_se": frontier_se, "beyond_grid": beyond,
        "gap": frontier_gain - gain,
        "gap_se": gap_se(gain_se, 0.0 if kind == "best_of_n" else kl_se, frontier_se, slope, kl_gain_cov, shared_se),
    }


def policy_estimates(samples: pa.Table, base: pa.Table, evals: list[RewardSpec]) -> tuple[PolicyEstimate, list[str]]:
    """The prompt-mean estimate of one policy over the prompts present in both tables.

    ``samples``: the policy's (prompt_id, logprob, base_logprob, reward columns); ``base``: the base
    samples (prompt_id, reward columns). Returns the estimate (gains in ``evals`` order) and its prompts.
    """
    policy_rows, base_rows = _group(samples), _group(base)
    prompts = [prompt_id for prompt_id in policy_rows if prompt_id in base_rows]
    if not prompts:
        raise ValueError("the policy's samples and the base samples share no prompt_id")
    policy_columns = {name: samples[name].to_numpy() for name in samples.column_names if name not in ("prompt_id", "response", "finish_reason")}
    base_columns = {name: base[name].to_numpy() for name in base.column_names if name != "prompt_id"}
    estimates = []
    for prompt_id in prompts:
        rows, rows_base = policy_rows[prompt_id], base_rows[prompt_id]
        e_pi = np.stack([spec.values({k: v[rows] for k, v in policy_columns.items()}) for spec in evals], axis=1)
        e_base = np.stack([spec.values({k: v[rows_base] for k, v in base_columns.items()}) for spec in evals], axis=1)
        estimates.append(prompt_estimate(policy_columns["logprob"][rows], policy_columns["base_logprob"][rows], e_pi, e_base))
    return mean_over_prompts(estimates), prompts


def policy_points(name: str, samples: pa.Table, base: pa.Table, frontier_mean: pa.Table) -> list[dict[str, Any]]:
    """One row of :data:`POLICY_SCHEMA` per (align, eval) frontier whose eval the policy's columns give."""
    pairs = sorted(set(zip(frontier_mean["align"].to_pylist(), frontier_mean["eval"].to_pylist())))
    evals = [RewardSpec.parse(text) for text in dict.fromkeys(evaluation for _, evaluation in pairs)]
    evals = [spec for spec in evals if all(column in samples.column_names and column in base.column_names for column in spec.columns)]
    estimate, prompts = policy_estimates(samples, base, evals)
    rows = []
    for align, evaluation in pairs:
        if evaluation not in [spec.name for spec in evals]:
            continue
        column = [spec.name for spec in evals].index(evaluation)
        rows.append(_compare_row(
            name, "checkpoint", 0, align, evaluation, _frontier_arrays(frontier_mean, align, evaluation),
            len(prompts), estimate.n, estimate.kl, estimate.kl_se, float(estimate.gain[column]),
            float(estimate.gain_se[column]), float(estimate.kl_gain_cov[column]), float(estimate.base_se[column]),
        ))
    return rows


def bon_points(bon: pa.Table, frontier_mean: pa.Table, base_samples: int = -1) -> list[dict[str, Any]]:
    """Prompt-mean best-of-n points (from the run's ``bon`` table) beside their frontier (same align, eval).

    ``base_samples``: the base samples behind them, summed over prompts (the ``samples`` column).
    The gain's se is :func:`~limits_ray.policy_stats.between_or_within_se` of the per-prompt
    jackknife se's (the between-prompt fallback where n = N leaves no jackknife). Best-of-n's KL
    is ``log n - (n-1)/n`` for continuous rewards, but the frontier estimated from N
    samples per prompt cannot exceed the sample maximum and is biased low as its KL nears log N
    (MATH.md: slow convergence at small beta), so points with n close to N can sit above it;
    the comparison is meaningful for n <= N/4 or so.
    """
    rows = []
    if bon.num_rows == 0:
        return rows
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for item in bon.select(["align", "eval", "n", "kl", "gain", "gain_se"]).to_pylist():
        groups.setdefault((item["align"], item["eval"], item["n"]), []).append(item)
    for (align, evaluation, n), items in sorted(groups.items()):
        frontier = _frontier_arrays(frontier_mean, align, evaluation)
        if frontier["kl"].size == 0:
            continue
        gains = np.array([item["gain"] for item in items])
        errors = np.array([np.nan if item["gain_se"] is None else item["gain_se"] for item in items])
        rows.append(_compare_row(
            f"best-of-{n}", "best_of_n", int(n), align, evaluation, frontier, len(items), base_samples,
            float(np.mean([item["kl"] for item in items])), float("nan"), float(gains.mean()),
            float(between_or_within_se(gains, errors)), shared_se=float(between_or_within_se(gains, errors)),
        ))
    return rows


def proxy_gold_table(frontier_mean: pa.Table, gold: str) -> pa.Table:
    """Every alignment reward evaluated by ``gold``, per beta, with Prop. 3's loss against the gold-aligned."""
    reference = _frontier_arrays(frontier_mean, gold, gold)
    if reference["kl"].size == 0:
        raise ConfigError(
            f"proxy vs gold needs the frontier align={gold!r} eval={gold!r}: put {gold!r} in analysis.align and in "
            "analysis.evals"
        )
    by_beta = dict(zip(reference["beta"], zip(reference["gain"], reference["gain_se_at_beta"])))  # same beta: fixed-beta se
    rows = frontier_mean.filter(pc.equal(frontier_mean["eval"], gold)).sort_by([("align", "ascending"), ("beta", "ascending")])
    output = []
    for item in rows.to_pylist():
        gold_gain, gold_se = by_beta.get(item["beta"], (float("nan"), float("nan")))
        output.append({
            "align": item["align"], "gold": gold, "beta": item["beta"], "kl": item["kl"], "kl_se": item["kl_se"],
            "gold_gain": item["gain"], "gold_gain_se": item["gain_se"], "loss": gold_gain - item["gain"],
            "loss_se": 0.0 if item["align"] == gold else float(np.hypot(gold_se, item["gain_se"])),
        })
    return pa.Table.from_pylist(output, schema=PROXY_GOLD_SCHEMA)


def ensemble_table(base: pa.Table, gold: str, members: int, noise: float, beta: float) -> pa.Table:
    """Theorem 3 offline: align to the mean of M synthetic proxies, evaluate with the gold, at ``beta``.

    Proxy k is ``gold + sigma * z_k`` with ``z_k`` :func:`~limits_ray.policy_stats.hash_normal` of
    (prompt_id, sample_idx) and ``sigma = noise * (pooled within-prompt sd of gold)``. The residual is
    a fixed function of the sample (not of the response text: equal texts in two samples get
    different residuals, negligible where responses rarely repeat).
    """
    from limits_ray.reduce import reduce_table

    table = base.select(["prompt_id", "sample_idx", gold])
    ids, idx = table["prompt_id"].to_numpy(zero_copy_only=False), table["sample_idx"].to_numpy()
    values = table[gold].to_numpy()
    groups = _group(table)
    pooled = float(np.sqrt(np.mean([values[rows].var() for rows in groups.values()])))
    sigma = noise * pooled
    names = [f"proxy_{k}" for k in range(1, members + 1)]
    for k, name in enumerate(names, start=1):
        table = table.append_column(name, pa.array(values + sigma * hash_normal(ids, idx, f"ensemble:{k}"), pa.float64()))
    aligns = [gold] + [f"mean({','.join(names[:m])})" for m in range(1, members + 1)]
    result = reduce_table(table, [gold, *names], AnalysisConfig(
        betas=(beta,), align=tuple(aligns), evals=(gold,), best_of_n=False, convergence=False,
    ))
    mean = result.frontier_mean
    gold_row = mean.filter(pc.equal(mean["align"], gold)).to_pylist()[0]
    rows = []
    for m in range(1, members + 1):
        item = mean.filter(pc.equal(mean["align"], aligns[m])).to_pylist()[0]
        rows.append({
            "members": m, "align": aligns[m], "gold": gold, "beta": item["beta"], "noise": sigma, "kl": item["kl"],
            "gold_gain": item["gain"], "gold_gain_se": item["gain_se"], "gold_aligned_gain": gold_row["gain"],
            "gap": gold_row["gain"] - item["gain"],
        })
    _, reference = inverse_sqrt_reference(np.arange(1, members + 1), np.abs([row["gap"] for row in rows]))
    for row, value in zip(rows, reference):
        row["reference"] = float(value)
    return pa.Table.from_pylist(rows, schema=ENSEMBLE_SCHEMA)


# --------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class CompareOptions:
    """What ``limits-ray compare`` studies beside the checkpoints.

    Attributes:
        gold: the gold reward (default: the last of ``analysis.evals``, else the first reward).
        proxy: the proxy reward (default: the first other reward); only used to order the plots.
        members: the largest ensemble size M of the Theorem 3 study (0: skip it).
        noise: each synthetic proxy's residual sd, in units of the gold's pooled within-prompt sd.
        beta: the fixed beta of the ensemble study (0: the grid beta whose gold-aligned mean KL is nearest 1 nat).
    """

    gold: str = ""
    proxy: str = ""
    members: int = 8
    noise: float = 1.0
    beta: float = 0.0


@dataclass
class CompareResult:
    """The comparison's tables and the files written."""

    policies: pa.Table
    proxy_gold: pa.Table | None
    ensembles: pa.Table | None
    paths: list[Path]


def _resolve(config: JobConfig, options: CompareOptions) -> CompareOptions:
    names = [reward.name for reward in config.rewards]
    gold = options.gold or (config.analysis.evals[-1] if config.analysis.evals else names[0])
    proxy = options.proxy or next((name for name in names if name != gold), gold)
    return dataclasses.replace(options, gold=gold, proxy=proxy)


def _base_samples(config: JobConfig, prompt_ids: set[str]) -> pa.Table:
    """The run's stored base samples (rounds below the target) of ``prompt_ids``."""
    from limits_ray.io import read_samples

    rewards = tuple(reward.name for reward in config.rewards)
    table, _ = read_samples(Path(config.store_uri) / "samples", rewards, extra=("round",))
    keep = pc.and_(pc.is_in(table["prompt_id"], pa.array(sorted(prompt_ids), pa.string())),
                   pc.less(table["round"], config.generation.rounds))
    return table.filter(keep)


def compare(config: JobConfig, options: CompareOptions = CompareOptions()) -> CompareResult:
    """Run the base job, place every ``config.policies`` checkpoint and best-of-n against the frontier,
    and write the proxy-vs-gold and ensemble studies, figures and ``compare.md`` (see the module doc)."""
    from limits_ray.job import _load_prompt_set, run_job
    from limits_ray.policy_plots import write_compare_report
    from limits_ray.validate import validate_job

    if not config.store.enabled:
        raise ConfigError("compare reads the base samples from the sample store: set store.enabled: true")
    validate_job(config)  # every model (the policies' too) before the base run starts
    options = _resolve(config, options)
    started = time.perf_counter()
    result, _ = run_job(config)
    output = Path(config.output_dir)
    prompt_ids = set(result.frontier["prompt_id"].to_pylist())
    base = _base_samples(config, prompt_ids)

    prompts = [prompt for prompt in _load_prompt_set(config).prompts if prompt.prompt_id in prompt_ids]
    rows: list[dict[str, Any]] = []
    for policy in config.policies:
        samples = sample_policy(config, policy, prompts)
        write_table(samples, output / "policies" / f"{policy.name}.parquet")
        rows += policy_points(policy.name, samples, base, result.frontier_mean)
    rows += bon_points(result.bon, result.frontier_mean, base.num_rows)
    policies = pa.Table.from_pylist(rows, schema=POLICY_SCHEMA)
    write_table(policies, output / "policies.parquet")

    evals = set(result.frontier_mean["eval"].to_pylist())
    proxy_gold = proxy_gold_table(result.frontier_mean, options.gold) if options.gold in evals else None
    if proxy_gold is not None:
        write_table(proxy_gold, output / "proxy_gold.parquet")
    ensembles = None
    if options.members > 0:
        beta = options.beta or _beta_near_one_nat(result.frontier_mean, options.gold, config.analysis.betas)
        ensembles = ensemble_table(base, options.gold, options.members, options.noise, beta)
        write_table(ensembles, output / "ensembles.parquet")
    paths = write_compare_report(
        output, title=f"{config.name} ({len(prompt_ids)} prompts, N = {config.generation.samples_per_prompt} base samples per prompt)",
        result=result, policies=policies, proxy_gold=proxy_gold, ensembles=ensembles,
        gold=options.gold, proxy=options.proxy, seconds=time.perf_counter() - started,
    )
    return CompareResult(policies, proxy_gold, ensembles, paths)


def _beta_near_one_nat(frontier_mean: pa.Table, gold: str, betas: tuple[float, ...]) -> float:
    frontier = _frontier_arrays(frontier_mean, gold, gold)
    if frontier["kl"].size == 0:
        return float(np.median(betas))
    return float(frontier["beta"][int(np.argmin(np.abs(frontier["kl"] - 1.0)))])


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
