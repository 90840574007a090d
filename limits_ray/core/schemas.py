"""The result tables: ``frontier``, ``frontier_mean``, ``bon``, ``convergence``, ``winrate``, ``winrate_mean``
and ``bracket`` (README, "Output").

Every writer (the job's bucket tasks, the offline reduce, the in-memory reduce) builds its tables
with these schemas, and every reader casts to them.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["SCHEMAS"]


SCHEMAS: dict[str, pa.Schema] = {
    "frontier": pa.schema([
        ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()),
        ("n", pa.int64()), ("gain", pa.float64()), ("gain_se", pa.float64()), ("kl", pa.float64()),
        ("kl_se", pa.float64()), ("ess", pa.float64()), ("gain_bc", pa.float64()), ("kl_bc", pa.float64()),
        ("gain_se_delta", pa.float64()), ("kl_se_delta", pa.float64()), ("gain_kl_cov", pa.float64()),
        ("gain_dbeta", pa.float64()), ("kl_dbeta", pa.float64()),
        ("khat", pa.float64()), ("body_sd", pa.float64()), ("reward_max", pa.float64()), ("top_tied", pa.bool_()), ("log_z", pa.float64()),
        ("khat_pooled", pa.float64()), ("reliable", pa.bool_()), ("bias_allowance", pa.float64()),
        ("tie_bias_at_kl", pa.float64()), ("gain_drift", pa.float64()), ("kl_drift", pa.float64()),
    ]),
    "frontier_mean": pa.schema([
        ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()), ("prompts", pa.int64()),
        ("gain", pa.float64()), ("gain_se", pa.float64()), ("kl", pa.float64()), ("kl_se", pa.float64()),
        ("gain_spread_se", pa.float64()), ("kl_spread_se", pa.float64()),
        ("gain_plugin", pa.float64()), ("kl_plugin", pa.float64()), ("reliable", pa.float64()),
        ("slope", pa.float64()), ("kl_dbeta", pa.float64()), ("gain_se_at_kl", pa.float64()),
    ]),
    "bon": pa.schema([
        ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("n", pa.int64()),
        ("reward", pa.float64()), ("gain", pa.float64()), ("kl", pa.float64()),
        ("reward_se", pa.float64()), ("gain_se", pa.float64()),
        ("winrate", pa.float64()), ("winrate_se", pa.float64()),  # limits_ray.core.winrate (best-of-n over pi0)
    ]),
    "convergence": pa.schema([
        ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()),
        ("n_samples", pa.int64()), ("gain", pa.float64()), ("gain_se", pa.float64()), ("kl", pa.float64()),
        ("kl_se", pa.float64()), ("ess", pa.float64()), ("gain_bc", pa.float64()), ("kl_bc", pa.float64()),
        ("gain_se_delta", pa.float64()), ("kl_se_delta", pa.float64()), ("khat", pa.float64()),
        ("body_sd", pa.float64()), ("reward_max", pa.float64()), ("top_tied", pa.bool_()), ("log_z", pa.float64()),
        ("khat_pooled", pa.float64()), ("reliable", pa.bool_()), ("bias_allowance", pa.float64()),
        ("tie_bias_at_kl", pa.float64()), ("gain_drift", pa.float64()), ("kl_drift", pa.float64()),
    ]),
    # limits_ray.core.winrate: the tilts' (and the rank tilts', align "rank(<eval>)") win rates over pi0
    "winrate": pa.schema([
        ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()),
        ("n", pa.int64()), ("winrate", pa.float64()), ("winrate_se", pa.float64()), ("winrate_bc", pa.float64()),
        ("winrate_se_delta", pa.float64()), ("kl", pa.float64()), ("kl_se", pa.float64()), ("kl_bc", pa.float64()),
        ("kl_se_delta", pa.float64()), ("ess", pa.float64()), ("khat", pa.float64()), ("body_sd", pa.float64()),
        ("reward_max", pa.float64()), ("top_tied", pa.bool_()), ("log_z", pa.float64()), ("khat_pooled", pa.float64()), ("reliable", pa.bool_()),
        ("bias_allowance", pa.float64()),
    ]),
    "winrate_mean": pa.schema([
        ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()), ("prompts", pa.int64()),
        ("winrate", pa.float64()), ("winrate_se", pa.float64()), ("winrate_bc", pa.float64()), ("kl", pa.float64()),
        ("kl_se", pa.float64()), ("kl_bc", pa.float64()), ("reliable", pa.float64()),
        ("winrate_spread_se", pa.float64()), ("kl_spread_se", pa.float64()),
    ]),
    # limits_ray.core.bracket: per align = eval frontier, lower <= g*(kl) <= upper past the trusted range
    "bracket": pa.schema([
        ("align", pa.string()), ("eval", pa.string()), ("kl", pa.float64()), ("lower", pa.float64()),
        ("upper", pa.float64()), ("lower_source", pa.string()), ("anchor_beta", pa.float64()),
        ("anchor_kl", pa.float64()), ("anchor_gain_hi", pa.float64()),
    ]),
}
