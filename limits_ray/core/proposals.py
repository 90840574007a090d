"""The frontier from several proposals: base samples and policy samples, with balance-heuristic weights.

MATH.md, "Several proposals". Base samples alone reach ``pi_beta`` only where it overlaps ``pi0``: at
small beta (large KL) a few samples carry the tilt and the estimates are not trusted. A policy's samples
lie where the policy puts its mass, often near ``pi_beta`` at the policy's KL. With proposals
``q_0 = pi0, q_1, ..., q_K`` (the base model and each policy), ``N_k`` samples of a prompt from each
(``N = sum N_k``) and every sample's log-probability under every proposal, the balance heuristic (Veach
and Guibas, "Optimally combining sampling techniques for Monte Carlo rendering", SIGGRAPH 1995) weighs a
sample ``y`` by its density under the mixture ``q_mix(y) = sum_k (N_k/N) q_k(y)``:

    v(y) = pi0(y) / q_mix(y),        w(y) = v(y) exp(r(y)/beta),

and the estimates are self-normalised as the base-only ones (:mod:`limits_ray.core.tilt`; with base
samples only, ``v = 1`` and every formula below is that module's):

* ``gain = R_e - M_e``, ``R_e = sum w e / sum w`` (``E_pi_beta[e]``), ``M_e = sum v e / sum v`` (``E_pi0[e]``);
* ``KL = R_r / beta - log Z``, ``Z = sum w / sum v`` (``E_pi0[exp(r/beta)]``);
* influence functions ``IF_gain = w (e - R_e)/mean(w) - v (e - M_e)/mean(v)`` and
  ``IF_KL = w ((r - R_r)/beta - 1)/mean(w) + v/mean(v)``. The counts ``N_k`` are fixed, so the samples
  are independent draws from their own proposal, not from ``q_mix``: the variance is stratified,
  ``se^2 = sum_k N_k var_k(IF) / N^2`` (``var_k`` over proposal k's samples, ``ddof = 1``); the interval
  SE scales it by ``t_df(0.975)/1.96`` as the base-only one (:func:`limits_ray.core.tilt.interval_ratio`);
* first-order bias corrections ``gain_bc = gain + sum w^2 (e - R_e)/(sum w)^2 - sum v^2 (e - M_e)/(sum v)^2`` and
  ``kl_bc = kl + sum w^2 (r - R_r)/(beta (sum w)^2) - (sum w^2/(sum w)^2 - sum v^2/(sum v)^2)/2``;
* Kish ``ESS = (sum w)^2 / sum w^2`` and the Pareto k-hat of the weights ``w`` (:func:`limits_ray.core.psis.khat_many`
  on ``log w``); a row is reliable by the rows' own test (:func:`limits_ray.core.reliability.own_reliable`:
  k-hat below ``min(1 - 1/log10 N, 0.7)``, ESS at least 20). The cross-prompt gate of the base-only
  tables is not applied: its covariate (the spread of ``r`` below the tail, over beta) describes weights
  ``exp(r/beta)``, not these.

The estimator is consistent like the base-only one, and far less variable where some ``q_k`` is close to
``pi_beta``; the trusted KL range (:func:`limits_ray.core.frontier.trusted_kl_range` of the prompt means,
:mod:`limits_ray.core.headline`) then reaches the policies' KL. Every log-probability must be of the same
token sequence under the same prompt (:mod:`limits_ray.pipeline.policy_stages` scores token ids), and the
samples of each proposal must be its own i.i.d. samples. Pure numpy/pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
from scipy.special import logsumexp

from limits_ray.core.analysis import Plan
from limits_ray.core.headline import mean_sums, mean_table
from limits_ray.core.psis import khat_many
from limits_ray.core.reliability import khat_thresholds, own_reliable
from limits_ray.core.tilt import interval_ratio

__all__ = [
    "MEAN_COLUMNS", "PROPOSAL_MEAN_SCHEMA", "PROPOSAL_SCHEMA", "ProposalEstimate", "balance_log_weights", "proposal_estimate",
    "proposal_frontier", "proposal_mean",
]

PROPOSAL_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()),
    ("n", pa.int64()),             # samples of every proposal
    ("n_base", pa.int64()),        # of which base samples
    ("gain", pa.float64()), ("gain_se", pa.float64()), ("gain_bc", pa.float64()),
    ("kl", pa.float64()), ("kl_se", pa.float64()), ("kl_bc", pa.float64()),
    ("ess", pa.float64()), ("khat", pa.float64()), ("reliable", pa.bool_()),
])
"""Per (prompt, align, eval, beta): the frontier estimated from every proposal's samples (``*_se``: interval
SEs, NaN where not reliable)."""

MEAN_COLUMNS = {"gain": "gain", "gain_se": "gain_se", "gain_bc": "gain_bc", "kl": "kl", "kl_se": "kl_se",
                "kl_bc": "kl_bc", "reliable": "reliable"}
"""The columns that play the frontier's parts in the prompt mean (:mod:`limits_ray.core.headline`)."""

PROPOSAL_MEAN_SCHEMA = pa.schema([
    ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()), ("prompts", pa.int64()),
    ("gain", pa.float64()), ("gain_se", pa.float64()), ("gain_bc", pa.float64()), ("kl", pa.float64()),
    ("kl_se", pa.float64()), ("kl_bc", pa.float64()), ("reliable", pa.float64()),
    ("gain_spread_se", pa.float64()), ("kl_spread_se", pa.float64()),
])
"""The prompt means of :data:`PROPOSAL_SCHEMA` (``reliable``: the fraction of reliable prompts)."""


def balance_log_weights(log_q: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[N]`` ``log v = log pi0 - log q_mix``, ``q_mix = sum_k (N_k/N) q_k``; ``log_q[:, 0]`` is ``log pi0``.

    Args:
        log_q: ``[N, K]`` every sample's log-probability under every proposal.
        counts: ``[K]`` samples drawn from each proposal (a proposal with none adds nothing to ``q_mix``).
    """
    log_q = np.asarray(log_q, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    share = np.log(np.where(counts > 0, counts / counts.sum(), 1.0))
    log_mix = logsumexp(np.where(counts > 0, log_q + share, -np.inf), axis=1)
    return log_q[:, 0] - log_mix


@dataclass
class ProposalEstimate:
    """One prompt's frontier from several proposals: ``[B]`` (``[B, E]`` for the gains) per beta (module doc)."""

    betas: np.ndarray
    n: int
    gain: np.ndarray
    gain_se: np.ndarray
    gain_se_delta: np.ndarray
    gain_bc: np.ndarray
    kl: np.ndarray
    kl_se: np.ndarray
    kl_se_delta: np.ndarray
    kl_bc: np.ndarray
    ess: np.ndarray
    khat: np.ndarray
    reliable: np.ndarray


def _stratified(influence: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """``sum_k N_k var_k(IF) / N^2`` over the last axis (``ddof = 1``; a proposal with one sample adds 0)."""
    total = np.zeros(influence.shape[:-1])
    for stratum in np.unique(strata):
        part = influence[..., strata == stratum]
        if part.shape[-1] > 1:
            total += part.shape[-1] * part.var(axis=-1, ddof=1)
    return total / influence.shape[-1] ** 2


def proposal_estimate(align: np.ndarray, evals: np.ndarray, log_v: np.ndarray, strata: np.ndarray,
                      betas: np.ndarray) -> ProposalEstimate:
    """The frontier of one prompt from samples of several proposals (module doc).

    Args:
        align: ``[N]`` the alignment reward ``r``.
        evals: ``[N, E]`` evaluation rewards.
        log_v: ``[N]`` :func:`balance_log_weights`.
        strata: ``[N]`` the proposal each sample came from.
        betas: ``[B]`` positive.
    """
    r = np.asarray(align, dtype=np.float64)
    e = np.asarray(evals, dtype=np.float64).reshape(r.size, -1)
    log_v = np.asarray(log_v, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    count = r.size
    v = np.exp(log_v - log_v.max())
    v_sum, v_sq = v.sum(), (v * v).sum()
    base_mean = v @ e / v_sum  # M_e [E]
    log_w = log_v[None, :] + r[None, :] / betas[:, None]  # [B, N]
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    w_sum, w_sq = w.sum(axis=1), (w * w).sum(axis=1)
    tilted = w @ e / w_sum[:, None]  # R_e [B, E]
    tilted_r = w @ r / w_sum  # R_r [B]
    log_z = (np.log(w_sum) + log_w.max(axis=1)) - (np.log(v_sum) + log_v.max())
    gain = tilted - base_mean[None, :]
    kl = tilted_r / betas - log_z
    scaled_w = w * (count / w_sum)[:, None]  # w / mean(w)
    scaled_v = v * (count / v_sum)
    gain_if = (scaled_w[:, :, None] * (e[None, :, :] - tilted[:, None, :])
               - (scaled_v[:, None] * (e - base_mean[None, :]))[None, :, :])  # [B, N, E]
    kl_if = scaled_w * ((r[None, :] - tilted_r[:, None]) / betas[:, None] - 1.0) + scaled_v[None, :]
    gain_var = _stratified(np.moveaxis(gain_if, 1, -1), strata)  # [B, E]
    kl_var = _stratified(kl_if, strata)
    gain_se_delta, kl_se_delta = np.sqrt(gain_var), np.sqrt(kl_var)
    ess = w_sum**2 / w_sq
    khat = khat_many(list(log_w), np.full(betas.size, count), np.array([1.0]))[:, 0]
    reliable = own_reliable(khat, khat_thresholds(np.array([count]))[0], ess)
    gain_if2 = np.sum(gain_if**2, axis=1)
    kl_if2 = np.sum(kl_if**2, axis=1)
    gain_ratio = interval_ratio(gain_if2, np.sum(gain_if**4, axis=1), reliable[:, None])
    kl_ratio = interval_ratio(kl_if2, np.sum(kl_if**4, axis=1), reliable)
    w_dev = (w * w) @ e - tilted * w_sq[:, None]  # sum w^2 (e - R_e)
    v_dev = (v * v) @ e - base_mean * v_sq
    w_dev_r = (w * w) @ r - tilted_r * w_sq
    return ProposalEstimate(
        betas=betas, n=count, gain=gain, gain_se=gain_se_delta * gain_ratio, gain_se_delta=gain_se_delta,
        gain_bc=gain + w_dev / w_sum[:, None] ** 2 - (v_dev / v_sum**2)[None, :],
        kl=kl, kl_se=kl_se_delta * kl_ratio, kl_se_delta=kl_se_delta,
        kl_bc=kl + w_dev_r / (betas * w_sum**2) - (w_sq / w_sum**2 - v_sq / v_sum**2) / 2,
        ess=ess, khat=khat, reliable=reliable,
    )


def proposal_frontier(samples: Mapping[str, pa.Table], log_columns: Mapping[str, Mapping[str, str]], plan: Plan,
                      betas: np.ndarray, base: str) -> pa.Table:
    """Per-prompt rows (:data:`PROPOSAL_SCHEMA`) of the frontier from every proposal's samples.

    Args:
        samples: per proposal name, its samples: prompt_id, the reward columns and log-probability columns.
        log_columns: per proposal name (the table), per proposal name (the density), the column holding each
            sample's log-probability under that proposal.
        plan: alignment and evaluation rewards.
        betas: the beta grid.
        base: the name of the base model among the proposals (``pi0``).

    Prompts missing from the base proposal's table are left out.
    """
    names = [base, *[name for name in samples if name != base]]
    betas = np.asarray(betas, dtype=np.float64)
    columns = sorted({column for spec_pair in plan for spec in (spec_pair[0], *spec_pair[1]) for column in spec.columns})
    grouped = {name: _by_prompt(samples[name], [*columns, *(log_columns[name][other] for other in names)]) for name in names}
    rows: dict[str, list] = {field.name: [] for field in PROPOSAL_SCHEMA}
    for prompt_id in sorted(grouped[base]):
        parts = [(index, grouped[name][prompt_id]) for index, name in enumerate(names) if prompt_id in grouped[name]]
        values = {column: np.concatenate([part[column] for _, part in parts]) for column in columns}
        log_q = np.concatenate([np.stack([part[log_columns[names[index]][other]] for other in names], axis=1)
                                for index, part in parts])
        strata = np.concatenate([np.full(part[columns[0]].size, index) for index, part in parts])
        counts = np.bincount(strata, minlength=len(names))
        log_v = balance_log_weights(log_q, counts)
        for align, evals in plan:
            estimate = proposal_estimate(align.values(values), np.stack([spec.values(values) for spec in evals], axis=1),
                                         log_v, strata, betas)
            for column, spec in enumerate(evals):
                rows["prompt_id"] += [prompt_id] * betas.size
                rows["align"] += [align.name] * betas.size
                rows["eval"] += [spec.name] * betas.size
                rows["beta"] += betas.tolist()
                rows["n"] += [int(strata.size)] * betas.size
                rows["n_base"] += [int(counts[0])] * betas.size
                for name in ("gain", "gain_se", "gain_bc"):
                    rows[name] += getattr(estimate, name)[:, column].tolist()
                for name in ("kl", "kl_se", "kl_bc", "ess", "khat"):
                    rows[name] += getattr(estimate, name).tolist()
                rows["reliable"] += estimate.reliable.tolist()
    return pa.table(rows, schema=PROPOSAL_SCHEMA)


def _by_prompt(table: pa.Table, columns: list[str]) -> dict[str, dict[str, np.ndarray]]:
    ids = np.asarray(table["prompt_id"].to_pylist(), dtype=object)
    arrays = {column: table[column].to_numpy(zero_copy_only=False).astype(np.float64) for column in columns}
    bad = [column for column, values in arrays.items() if not np.all(np.isfinite(values))]
    if bad:
        raise ValueError(f"proposal samples: non-finite values in {bad} (a response some model cannot produce?)")
    order = np.argsort(ids, kind="stable")
    unique, starts = np.unique(ids[order], return_index=True)
    bounds = np.append(starts, ids.size)
    return {str(prompt_id): {column: values[order[bounds[k]:bounds[k + 1]]] for column, values in arrays.items()}
            for k, prompt_id in enumerate(unique)}


def proposal_mean(rows: pa.Table) -> pa.Table:
    """The prompt means (:data:`PROPOSAL_MEAN_SCHEMA`) of :func:`proposal_frontier` rows (:mod:`limits_ray.core.headline`)."""
    return mean_table(mean_sums(rows, MEAN_COLUMNS), MEAN_COLUMNS).select(PROPOSAL_MEAN_SCHEMA.names).cast(PROPOSAL_MEAN_SCHEMA)
