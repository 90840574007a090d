"""Convergence of the prompt-mean estimates with N: prompt averages per N, the N where they settle, ESS.

The input is a ``convergence`` table (per prompt, beta and N = 1, 2, 4, ..., the whole N: gain, KL,
their standard errors, the Kish ESS, k-hat; written by the bucket tasks from the merged statistics of
every dyadic prefix, :mod:`limits_ray.core.dyadic`), or a table of prefix estimates of the same form.
:func:`summarize` averages over prompts with two error bars,
both from :func:`limits_ray.core.prompt_mean.prompt_means` (the frontier's own centre and bars),

- ``*_mc_se``: Monte Carlo error of the prompt mean, ``sqrt(sum_x se_x^2) / P`` of the delta-method
  SEs (prompts fixed), widened by the bias allowance of unreliable prompts, NaN where not trusted,
- ``*_spread_se``: the spread across prompts, ``sd_x / sqrt(P)`` (prompts drawn from a population),

and :func:`settle_table` reports per beta the N from which the prompt-mean estimate stays within a
stated tolerance of its value at the largest N: where small beta has not converged, it says so
(``settled`` false) next to the ESS per prompt (:func:`ess_per_prompt`).

The aggregation functions take plain tables, so they also serve ``limits-ray report`` on a
``convergence.parquet`` that has no standard-error columns. Pure numpy and pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from limits_ray.core.prompt_mean import between_prompt_se, prompt_means, prompt_sums

__all__ = ["StudyResult", "ess_per_prompt", "settle_table", "study_from_table", "summarize"]


def _groups(table: pa.Table, keys: list[str]) -> tuple[list[tuple], list[np.ndarray]]:
    """Row indices of each distinct key tuple, keys sorted."""
    columns = [table[key].to_pylist() for key in keys]
    index: dict[tuple, list[int]] = {}
    for row, key in enumerate(zip(*columns)):
        index.setdefault(key, []).append(row)
    ordered = sorted(index)
    return ordered, [np.asarray(index[key]) for key in ordered]


def summarize(table: pa.Table) -> pa.Table:
    """Prompt averages per (align, eval, beta, n_samples) of a prefix or convergence table.

    Columns: ``prompts``, ``gain``, ``gain_spread_se``, ``kl``, ``kl_spread_se`` (the centre and spread of
    :func:`limits_ray.core.prompt_mean.prompt_means`: bias-corrected means where the table has ``gain_bc``) and,
    when the input has standard errors, ``gain_mc_se``, ``kl_mc_se`` (its within-prompt error bars, NaN
    where not trusted), ``ess_median``, ``ess_min``, ``reliable`` (the fraction of reliable prompts). A
    prompt that has fewer samples than N does not enter the row for N.
    """
    keys = ["align", "eval", "beta", "n_samples"]
    has_se = "gain_se" in table.column_names or "gain_se_delta" in table.column_names
    has_ess = "ess" in table.column_names
    has_reliable = "reliable" in table.column_names
    sums = prompt_sums(table, keys)
    means = prompt_means(sums, keys)
    out = {key: sums[key] for key in keys}
    out.update(prompts=sums["prompts"], gain=means["gain"], gain_spread_se=means["gain_spread_se"], kl=means["kl"],
               kl_spread_se=means["kl_spread_se"])
    if not has_se:  # no errors at all: the spread alone, as for any table of estimates
        for name in ("gain", "kl"):
            out[f"{name}_spread_se"] = between_prompt_se(means["prompts"], sums[f"{name}_m2"].to_numpy())
    if has_se:
        out.update(gain_mc_se=means["gain_se"], kl_mc_se=means["kl_se"])
    if has_ess:
        order, groups = _groups(table, keys)
        ess = table["ess"].to_numpy()
        out["ess_median"] = [float(np.median(ess[rows])) for rows in groups]
        out["ess_min"] = [float(np.min(ess[rows])) for rows in groups]
    if has_reliable:
        out["reliable"] = means["reliable"]
    types = {"align": pa.string(), "eval": pa.string(), "n_samples": pa.int64(), "prompts": pa.int64()}
    return pa.table({name: pa.array(column, type=types.get(name, pa.float64())) for name, column in out.items()})


def _settle_index(means: np.ndarray, tolerance: float, atol: float) -> int:
    """First index from which every value stays within ``atol + tolerance |final|`` of the final one."""
    final = means[-1]
    inside = np.abs(means - final) <= atol + tolerance * abs(final)
    outside = np.flatnonzero(~inside)
    return 0 if outside.size == 0 else int(outside[-1]) + 1


def settle_table(summary: pa.Table, tolerance: float = 0.05, atol: float = 1e-3) -> pa.Table:
    """Per (align, eval, beta): the N from which gain and KL stay within tolerance of their largest-N value.

    The prompt-mean gain and KL (``summarize``) count as settled at N when, for every N' >= N
    on the dyadic grid, ``|mean(N') - mean(N_max)| <= atol + tolerance * |mean(N_max)|``. A series
    that only satisfies this at ``N_max`` itself (or at ``N_max / 2``: one doubling is no evidence)
    is reported ``settled = false``: sample more at that beta. Also gives the final estimates, their
    Monte Carlo standard errors (when known) and the median and smallest ESS over prompts.
    """
    keys = ["align", "eval", "beta"]
    order, groups = _groups(summary, keys)
    n_samples = summary["n_samples"].to_numpy()
    gain, kl = summary["gain"].to_numpy(), summary["kl"].to_numpy()
    optional = {name: summary[name].to_numpy() for name in ("gain_mc_se", "kl_mc_se", "ess_median", "ess_min")
                if name in summary.column_names}
    out: dict[str, list] = {name: [] for name in (*keys, "n_max", "prompts", "gain", "kl", "settle_n_gain", "settle_n_kl",
                                                   "settle_n", "settled", *optional)}
    prompts = summary["prompts"].to_numpy()
    for key, rows in zip(order, groups):
        rows = rows[np.argsort(n_samples[rows])]
        # Only the N every prompt reached: a partial row would mix prompt sets.
        rows = rows[prompts[rows] == prompts[rows].max()] if rows.size else rows
        if rows.size > 2:  # N = 1: every gain and KL is 0 by construction, no evidence of anything
            rows = rows[n_samples[rows] > 1]
        n = n_samples[rows]
        gain_at = _settle_index(gain[rows], tolerance, atol)
        kl_at = _settle_index(kl[rows], tolerance, atol)
        settle = max(gain_at, kl_at)
        for name, value in zip(keys, key):
            out[name].append(value)
        out["n_max"].append(int(n[-1]))
        out["prompts"].append(int(prompts[rows[-1]]))
        out["gain"].append(float(gain[rows[-1]]))
        out["kl"].append(float(kl[rows[-1]]))
        out["settle_n_gain"].append(int(n[gain_at]))
        out["settle_n_kl"].append(int(n[kl_at]))
        out["settle_n"].append(int(n[settle]))
        out["settled"].append(bool(settle <= len(n) - 3))
        for name, column in optional.items():
            out[name].append(float(column[rows[-1]]))
    types = {"align": pa.string(), "eval": pa.string(), "settled": pa.bool_()}
    for name in ("n_max", "prompts", "settle_n_gain", "settle_n_kl", "settle_n"):
        types[name] = pa.int64()
    return pa.table({name: pa.array(column, type=types.get(name, pa.float64())) for name, column in out.items()})


def ess_per_prompt(prefixes: pa.Table) -> pa.Table:
    """ESS per (align, prompt, beta) at each prompt's largest N; empty when the input has no ``ess``."""
    schema = pa.schema([("align", pa.string()), ("prompt_id", pa.string()), ("beta", pa.float64()),
                        ("n_samples", pa.int64()), ("ess", pa.float64())])
    if "ess" not in prefixes.column_names or prefixes.num_rows == 0:
        return schema.empty_table()
    n_samples = prefixes["n_samples"].to_numpy()
    order, groups = _groups(prefixes, ["align", "prompt_id", "beta"])
    ess = prefixes["ess"].to_numpy()
    rows = [(key, group[np.argmax(n_samples[group])]) for key, group in zip(order, groups)]
    return pa.table({
        "align": [key[0] for key, _ in rows], "prompt_id": [key[1] for key, _ in rows],
        "beta": [float(key[2]) for key, _ in rows], "n_samples": [int(n_samples[row]) for _, row in rows],
        "ess": [float(ess[row]) for _, row in rows],
    }, schema=schema)


@dataclass
class StudyResult:
    """A convergence study: per-prompt prefix estimates, their prompt averages, settle N, ESS."""

    prefixes: pa.Table
    summary: pa.Table
    settle: pa.Table
    ess: pa.Table
    tolerance: float
    atol: float
    title: str = ""


def study_from_table(prefixes: pa.Table, tolerance: float = 0.05, atol: float = 1e-3, title: str = "") -> StudyResult:
    """A :class:`StudyResult` from a prefix (or plain convergence) table."""
    summary = summarize(prefixes)
    return StudyResult(prefixes, summary, settle_table(summary, tolerance, atol), ess_per_prompt(prefixes),
                       tolerance, atol, title)
