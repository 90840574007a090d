"""The tables of ``limits-ray compare``: policies and best-of-n against the frontier, proxy vs gold, ensembles.

* :data:`POLICY_SCHEMA` rows (:func:`policy_points`, :func:`bon_points`): a checkpoint's or best-of-n's
  prompt-mean KL and gain (:mod:`limits_ray.core.policy_stats`) beside the frontier's gain at that KL
  and the gap, with its standard error;
* :data:`PROXY_GOLD_SCHEMA` (:func:`proxy_gold_table`): every alignment reward evaluated by the gold,
  with Prop. 3's loss against the gold-aligned policy at the same beta;
* :data:`ENSEMBLE_SCHEMA` (:func:`ensemble_table`): Theorem 3 offline, the gold gain of aligning to the
  mean of M synthetic proxies against M, with the ``c / sqrt(M)`` reference.

Pure numpy and pyarrow; :mod:`limits_ray.runs.compare` samples the checkpoints and writes the tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.errors import ConfigError
from limits_ray.core.fixed_kl import at_kl
from limits_ray.core.policy_stats import (
    PolicyEstimate,
    between_or_within_se,
    frontier_gain_at_kl,
    frontier_slope_at_kl,
    gap_se,
    hash_normal,
    inverse_sqrt_reference,
    mean_over_prompts,
    prompt_estimate,
)
from limits_ray.core.reward_spec import RewardSpec
from limits_ray.core.tables import reduce_table

__all__ = [
    "ENSEMBLE_SCHEMA", "POLICY_SCHEMA", "PROXY_GOLD_SCHEMA", "beta_near_one_nat", "bon_points", "ensemble_table",
    "policy_estimates", "policy_points", "proxy_gold_table",
]


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
    The gain's se is :func:`~limits_ray.core.policy_stats.between_or_within_se` of the per-prompt
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

    Proxy k is ``gold + sigma * z_k`` with ``z_k`` :func:`~limits_ray.core.policy_stats.hash_normal` of
    (prompt_id, sample_idx) and ``sigma = noise * (pooled within-prompt sd of gold)``. The residual is
    a fixed function of the sample (not of the response text: equal texts in two samples get
    different residuals, negligible where responses rarely repeat).
    """
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


def beta_near_one_nat(frontier_mean: pa.Table, gold: str, betas: tuple[float, ...]) -> float:
    """The beta whose gold-aligned prompt-mean KL is nearest 1 nat (the median beta when there is no such frontier)."""
    frontier = _frontier_arrays(frontier_mean, gold, gold)
    if frontier["kl"].size == 0:
        return float(np.median(betas))
    return float(frontier["beta"][int(np.argmin(np.abs(frontier["kl"] - 1.0)))])
