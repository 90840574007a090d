"""Simulated prompts through the library's own estimators, gate and prompt mean (the coverage benchmarks).

:func:`prompt_fields` draws prompts of one :class:`_families.Kind` and returns the per-prompt row values
that the tables hold (``TiltStats`` finalized many at a time, N rewards per prompt aligned and evaluated
on themselves); :func:`gated` applies :func:`limits_ray.core.reliability.gate_cells` to cells of prompts;
:func:`as_table` makes rows that :func:`limits_ray.core.prompt_mean.prompt_sums` reads.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from limits_ray.core.reliability import gate_cells, gated_interval
from limits_ray.core.tilt import TiltStats, finalize_many

FIELDS = ("gain", "gain_bc", "gain_se", "gain_se_delta", "kl", "kl_bc", "kl_se", "kl_se_delta", "gain_kl_cov",
          "gain_dbeta", "kl_dbeta", "khat", "reliable", "ess", "body_sd", "reward_max", "top_tied", "log_z")


def _estimate(rewards: np.ndarray, betas: np.ndarray, tails: bool = True):
    """``finalize_many`` of each row of ``rewards``; without ``tails`` the states' tails are dropped first (no
    k-hat fits: the bias-corrected estimates and SEs come from the sums alone)."""
    count, size = rewards.shape
    states = TiltStats.from_segments(betas, np.ascontiguousarray(rewards).reshape(-1, 1), np.arange(0, count * size + 1, size))
    if not tails:
        for state in states:
            state.tail = state.tail[:0]
    return finalize_many(states)


def prefix_size(n: int) -> int:
    """The largest dyadic prefix below ``n`` samples (the tables' drift compares with it)."""
    return 1 << (int(n - 1).bit_length() - 1)


def prompt_fields(rewards: np.ndarray, betas: np.ndarray, drift: bool = True) -> dict[str, np.ndarray]:
    """Per prompt (rows of ``rewards`` ``[P, N]``) and beta, the frontier row values before the gate: ``[P, B]`` each
    (with ``drift``, the drift from the first :func:`prefix_size` samples, else NaN)."""
    count, size = rewards.shape
    estimate = _estimate(rewards, betas)
    out = {"gain_drift": np.full((count, betas.size), np.nan), "kl_drift": np.full((count, betas.size), np.nan)}
    if drift:
        half = _estimate(rewards[:, :prefix_size(size)], betas, tails=False)
        out = {"gain_drift": estimate.gain_bc[:, :, 0] - half.gain_bc[:, :, 0], "kl_drift": estimate.kl_bc - half.kl_bc}
    for name in FIELDS:
        value = np.asarray(getattr(estimate, name))
        if value.ndim == 3:
            value = value[:, :, 0]
        elif value.ndim == 1:
            value = np.broadcast_to(value[:, None], (count, betas.size))
        out[name] = np.array(value, dtype=bool if name in ("reliable", "top_tied") else np.float64)
    out["n"] = np.full((count, betas.size), float(size))
    out["beta"] = np.broadcast_to(betas, (count, betas.size)).copy()
    return out


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def gated(fields: dict[str, np.ndarray], cell: np.ndarray) -> dict[str, np.ndarray]:
    """``fields`` with ``reliable``, ``khat_pooled``, ``bias_allowance`` (and NaN interval SEs) of the tables' gate,
    the prompts of each value of ``cell`` (``[P]``) forming one cell per beta."""
    out = {name: value.copy() for name, value in fields.items()}
    out["khat_pooled"] = np.full(fields["khat"].shape, np.nan)
    out["bias_allowance"] = np.full(fields["khat"].shape, np.inf)
    out["tie_bias_at_kl"] = np.full(fields["khat"].shape, np.nan)
    for value in np.unique(cell):
        rows = np.flatnonzero(cell == value)
        result = gate_cells({name: fields[name][rows] for name in fields}, axis=0)
        out["reliable"][rows] = result.reliable
        out["khat_pooled"][rows] = result.khat_pooled
        out["bias_allowance"][rows] = result.bias_allowance
        out["tie_bias_at_kl"][rows] = result.tie_bias_at_kl
    for name in ("gain_se", "kl_se"):
        out[name] = gated_interval(out[name], out["reliable"], out["bias_allowance"])
    return out


def as_table(fields: dict[str, np.ndarray], group: np.ndarray) -> pa.Table:
    """Rows ``(group, beta)`` with the frontier columns the prompt mean reads (``group`` ``[P]``)."""
    count, betas = fields["gain"].shape
    columns = {"group": np.repeat(group, betas), "beta": fields["beta"].reshape(-1)}
    for name in ("gain", "gain_bc", "gain_se_delta", "kl", "kl_bc", "kl_se_delta", "gain_kl_cov", "gain_dbeta", "kl_dbeta",
                 "reliable", "bias_allowance", "tie_bias_at_kl", "gain_drift", "kl_drift", "khat", "khat_pooled"):
        columns[name] = fields[name].reshape(-1)
    return pa.table(columns)
