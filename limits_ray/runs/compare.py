"""Real policies against the frontier: checkpoints, best-of-n, proxy vs gold, reward ensembles.

``limits-ray compare --config CONFIG.yaml`` (:func:`compare`) runs, in one command:

1. the base job (:func:`limits_ray.runs.job.run_job`; rounds already in the sample store are reused);
2. for each ``config.policies`` checkpoint, a Ray Data run on the same prompts::

       requests -> PolicyGenerator (vLLM, the checkpoint; keeps token ids)
                -> BaseLogprobScorer (vLLM, the base model: log pi0 of each response)
                -> one scorer pool per reward (the base run's reward configs)

   and from its samples the KL ``E_pi[log pi - log pi0]`` and gains ``E_pi[e] - E_pi0[e]`` with
   standard errors (:mod:`limits_ray.core.policy_stats`), beside the frontier's gain at that KL;
3. best-of-n points from the base samples already stored (``bon.parquet`` of the run);
4. proxy vs gold (Prop. 3): gold gain against KL for every alignment reward evaluated by the gold;
5. ensembles (Theorem 3): M = 1..M_max synthetic proxies ``gold + sigma * z_k`` (``z_k`` a
   deterministic standard normal per (prompt_id, sample_idx) and k) averaged and aligned to, offline
   from the stored base samples; the gold gain at a fixed beta against M, with ``c / sqrt(M)``;
6. policy samples as proposals (:mod:`limits_ray.core.proposals`; ``CompareOptions.proposals``, on by
   default): the base model's rounds sampled again with their token ids (its seed: the stored rounds) and
   scored under every policy, every policy's samples scored under every other policy, and the frontier
   from all of them with balance-heuristic weights, beside the base-only one: trusted up to the KL the
   policies' samples reach;
7. the certified bracket past the trusted range (:mod:`limits_ray.core.bracket`) again, now with the
   checkpoints among its certified points (``bracket.parquet``);
8. figures and ``compare.md`` (:mod:`limits_ray.outputs.compare_report`).

The samples' log-probability convention is :mod:`limits_ray.pipeline.policy_stages`'s; the tables are
:mod:`limits_ray.core.compare_tables`'s.

Outputs in ``<output_dir>``: ``policies.parquet`` (:data:`limits_ray.core.compare_tables.POLICY_SCHEMA`), ``proxy_gold.parquet``
(:data:`limits_ray.core.compare_tables.PROXY_GOLD_SCHEMA`), ``ensembles.parquet`` (:data:`limits_ray.core.compare_tables.ENSEMBLE_SCHEMA`),
``policies/<name>.parquet`` (each checkpoint's scored samples), with proposals ``proposals.parquet`` and
``proposals_mean.parquet`` (:data:`~limits_ray.core.proposals.PROPOSAL_SCHEMA`,
:data:`~limits_ray.core.proposals.PROPOSAL_MEAN_SCHEMA`) and ``proposals/base.parquet`` (the base model's
samples as a proposal), ``bracket.parquet`` rewritten with the checkpoints, the PNGs and ``compare.md``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.config import JobConfig
from limits_ray.core.bracket import bon_means, bon_sums, bracket_table
from limits_ray.core.compare_tables import (
    POLICY_SCHEMA,
    beta_near_one_nat,
    bon_points,
    ensemble_table,
    policy_points,
    proxy_gold_table,
)
from limits_ray.core.errors import ConfigError
from limits_ray.core.proposals import proposal_frontier, proposal_mean
from limits_ray.outputs.compare_report import write_compare_report
from limits_ray.pipeline.policy_stages import BASE_PROPOSAL, base_proposal, proposal_column, sample_policy
from limits_ray.pipeline.prompts import load_prompt_set
from limits_ray.runs.job import run_job
from limits_ray.runs.validate import validate_job
from limits_ray.storage.sample_io import read_samples, write_table

__all__ = ["CompareOptions", "CompareResult", "compare"]


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
        proposals: with policies, also the frontier from every proposal's samples (module doc, step 6).
    """

    gold: str = ""
    proxy: str = ""
    members: int = 8
    noise: float = 1.0
    beta: float = 0.0
    proposals: bool = True


@dataclass
class CompareResult:
    """The comparison's tables and the files written (``proposals``: the per-prompt rows and the prompt means of
    the frontier from every proposal, None without policies or with ``CompareOptions.proposals`` off)."""

    policies: pa.Table
    proxy_gold: pa.Table | None
    ensembles: pa.Table | None
    paths: list[Path]
    proposals: tuple[pa.Table, pa.Table] | None = None


def _resolve(config: JobConfig, options: CompareOptions) -> CompareOptions:
    names = [reward.name for reward in config.rewards]
    gold = options.gold or (config.analysis.evals[-1] if config.analysis.evals else names[0])
    proxy = options.proxy or next((name for name in names if name != gold), gold)
    return dataclasses.replace(options, gold=gold, proxy=proxy)


def _base_samples(config: JobConfig, prompt_ids: set[str]) -> pa.Table:
    """The run's stored base samples (rounds below the target) of ``prompt_ids``."""
    rewards = tuple(reward.name for reward in config.rewards)
    table, _ = read_samples(Path(config.store_uri) / "samples", rewards, extra=("round",))
    keep = pc.and_(pc.is_in(table["prompt_id"], pa.array(sorted(prompt_ids), pa.string())),
                   pc.less(table["round"], config.generation.rounds))
    return table.filter(keep)


def compare(config: JobConfig, options: CompareOptions = CompareOptions(), *, validated: bool = False) -> CompareResult:
    """Run the base job, place every ``config.policies`` checkpoint and best-of-n against the frontier,
    and write the proxy-vs-gold and ensemble studies, figures and ``compare.md`` (see the module doc).

    ``config`` (every model, the policies' too) is checked before the base run starts, unless the caller
    has just done so (``validated``)."""
    if not config.store.enabled:
        raise ConfigError("compare reads the base samples from the sample store: set store.enabled: true")
    if not validated:
        validate_job(config)
    options = _resolve(config, options)
    started = time.perf_counter()
    result, _ = run_job(config, validated=True)
    output = Path(config.output_dir)
    prompt_ids = set(result.frontier["prompt_id"].to_pylist())
    base = _base_samples(config, prompt_ids)

    prompts = [prompt for prompt in load_prompt_set(config).prompts if prompt.prompt_id in prompt_ids]
    rows: list[dict[str, Any]] = []
    with_proposals = options.proposals and bool(config.policies)
    sampled = {}
    for policy in config.policies:
        others = tuple(other for other in config.policies if other.name != policy.name) if with_proposals else ()
        samples = sampled[policy.name] = sample_policy(config, policy, prompts, score_under=others)
        write_table(samples, output / "policies" / f"{policy.name}.parquet")
        rows += policy_points(policy.name, samples, base, result.frontier_mean)
    rows += bon_points(result.bon, result.frontier_mean, base.num_rows)
    policies = pa.Table.from_pylist(rows, schema=POLICY_SCHEMA)
    write_table(policies, output / "policies.parquet")
    proposals = _proposal_frontier(config, prompts, sampled, output) if with_proposals else None
    bracket = bracket_table(result.frontier_mean, bon_means(bon_sums(result.bon)), policies)
    write_table(bracket, output / "bracket.parquet")

    evals = set(result.frontier_mean["eval"].to_pylist())
    proxy_gold = proxy_gold_table(result.frontier_mean, options.gold) if options.gold in evals else None
    if proxy_gold is not None:
        write_table(proxy_gold, output / "proxy_gold.parquet")
    ensembles = None
    if options.members > 0:
        beta = options.beta or beta_near_one_nat(result.frontier_mean, options.gold, config.analysis.betas)
        ensembles = ensemble_table(base, options.gold, options.members, options.noise, beta)
        write_table(ensembles, output / "ensembles.parquet")
    paths = write_compare_report(
        output, title=f"{config.name} ({len(prompt_ids)} prompts, N = {config.generation.samples_per_prompt} base samples per prompt)",
        result=result, policies=policies, proxy_gold=proxy_gold, ensembles=ensembles,
        gold=options.gold, proxy=options.proxy, seconds=time.perf_counter() - started,
        proposals=None if proposals is None else proposals[1], bracket=bracket,
    )
    return CompareResult(policies, proxy_gold, ensembles, paths, proposals)


def _proposal_frontier(config: JobConfig, prompts: list, sampled: dict[str, pa.Table],
                       output: Path) -> tuple[pa.Table, pa.Table]:
    """The frontier from the base model's and every policy's samples (module doc, step 6); writes its tables."""
    base_samples = sample_policy(config, base_proposal(config), prompts, score_under=tuple(config.policies))
    write_table(base_samples, output / "proposals" / "base.parquet")
    tables = {BASE_PROPOSAL: base_samples, **sampled}
    names = list(tables)
    columns = {
        name: {other: "base_logprob" if other == BASE_PROPOSAL else "logprob" if other == name else proposal_column(other)
               for other in names}
        for name in names
    }
    plan = config.analysis.plan([reward.name for reward in config.rewards])
    rows = proposal_frontier(tables, columns, plan, np.asarray(config.analysis.betas), BASE_PROPOSAL)
    mean = proposal_mean(rows)
    write_table(rows, output / "proposals.parquet")
    write_table(mean, output / "proposals_mean.parquet")
    return rows, mean


