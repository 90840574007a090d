"""Tests of limits_ray.core.prompt_mean (the one centre and error bar of prompt means) and limits_ray.core.fixed_kl, against
exact Gaussian values and by coverage over simulated prompts at tiny sizes."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from limits_ray.core.fixed_kl import at_kl
from limits_ray.core.prompt_mean import (
    ALLOWANCE_LIMIT,
    DRIFT_Z,
    merge_prompt_sums,
    prompt_means,
    prompt_sums,
    variance_factor,
    widened,
    within_prompt_se,
)
from limits_ray.core.reliability import gate_cells
from limits_ray.core.tilt import TiltStats, finalize_many

BETAS = np.array([1.0, 1.5, 3.0])


def rows_table(gain_bc: np.ndarray, **columns: np.ndarray) -> pa.Table:
    """One cell (beta 1) of ``P`` prompts: delta SEs 0.1 (gain) and 0.05 (KL), everything else benign."""
    count = gain_bc.size
    values = {"beta": np.ones(count), "gain": gain_bc, "gain_bc": gain_bc, "gain_se_delta": np.full(count, 0.1),
              "kl": np.full(count, 0.5), "kl_bc": np.full(count, 0.5), "kl_se_delta": np.full(count, 0.05),
              "gain_kl_cov": np.zeros(count), "gain_dbeta": np.full(count, -1.0), "kl_dbeta": np.full(count, -1.0),
              "reliable": np.ones(count, bool), "bias_allowance": np.zeros(count),
              "gain_drift": np.full(count, np.nan), "kl_drift": np.full(count, np.nan)}
    values.update(columns)
    return pa.table(values)


def means(table: pa.Table) -> dict:
    return {name: value[0] for name, value in prompt_means(prompt_sums(table, ["beta"]), ["beta"]).items()}


def test_widened_keeps_a_bar_only_while_the_allowance_is_small():
    assert widened(0.1, 0.0) == pytest.approx(0.1) and widened(0.1, 0.05) == pytest.approx(math.hypot(0.1, 0.05))
    assert widened(0.1, ALLOWANCE_LIMIT * 0.1) == pytest.approx(0.125)  # at most 1.25 se
    assert math.isnan(widened(0.1, 0.076)) and math.isnan(widened(0.1, math.inf)) and math.isnan(widened(math.nan, 0.0))


def test_heavier_weights_scale_the_delta_method_se_up():
    np.testing.assert_allclose(variance_factor(np.array([-0.5, 0.25, 0.41, 0.45, np.nan, np.inf])),
                               [1.0, 1.0, 1 / 0.84, 1 / 0.8, 1.0, 1.0])
    table = rows_table(np.ones(3), khat=np.array([0.1, 0.45, 0.45]), khat_pooled=np.array([0.1, 0.45, np.nan]))
    gain_se, kl_se = within_prompt_se(table)
    np.testing.assert_allclose(gain_se, [0.1, 0.1 / 0.8, 0.1 / 0.8])  # the pooled k-hat, else the own one
    assert means(table)["gain_se"] == pytest.approx(math.sqrt(0.01 + 2 * (0.1 / 0.8) ** 2) / 3, rel=1e-12)


def test_a_drift_within_its_noise_adds_nothing_and_a_clear_one_joins_the_allowance():
    rng = np.random.default_rng(1)
    count = 400
    plain = means(rows_table(rng.normal(1.0, 0.1, count)))
    assert plain["gain_se"] == pytest.approx(0.1 / math.sqrt(count), rel=1e-12)
    quiet = rng.normal(0.0, 0.1, count)
    quiet -= quiet.mean()  # mean drift exactly 0
    assert means(rows_table(rng.normal(1.0, 0.1, count), gain_drift=quiet, kl_drift=quiet))["gain_se"] == pytest.approx(
        plain["gain_se"], rel=1e-12)
    moving = quiet + 0.008  # D = 0.008, se(D) = 0.1 / 20 = 0.005: excess 0.008 - 2 * 0.005 < 0: none
    assert means(rows_table(rng.normal(1.0, 0.1, count), gain_drift=moving, kl_drift=quiet))["gain_se"] == pytest.approx(
        plain["gain_se"], rel=1e-12)
    sd = quiet.std(ddof=1) / math.sqrt(count)
    moving = quiet + DRIFT_Z * sd + 0.003  # excess 0.003 <= 0.75 * 0.005: the bar widens
    result = means(rows_table(rng.normal(1.0, 0.1, count), gain_drift=moving, kl_drift=quiet))
    assert result["gain_se"] == pytest.approx(math.hypot(0.005, 0.003), rel=1e-9)
    assert result["kl_se"] == pytest.approx(0.05 / 20, rel=1e-12)  # the KL did not move
    assert math.isnan(means(rows_table(rng.normal(1.0, 0.1, count), gain_drift=quiet + 0.02, kl_drift=quiet))["gain_se"])


def test_prompt_sums_of_parts_merge_to_the_sums_of_the_whole():
    rng = np.random.default_rng(2)
    count = 60
    table = rows_table(rng.normal(1.0, 0.1, count), gain_drift=rng.normal(0.0, 0.1, count), kl_drift=rng.normal(0, 0.05, count),
                       bias_allowance=np.where(np.arange(count) == 3, 1.0, 0.0))
    table = pa.concat_tables([table, table.set_column(0, "beta", pa.array(np.full(count, 2.0)))])
    whole = prompt_means(prompt_sums(table, ["beta"]), ["beta"])
    parts = [table.slice(0, 17), table.slice(17, 70), table.slice(87)]  # cut through cells; a part without beta 1
    merged = prompt_means(merge_prompt_sums([prompt_sums(part, ["beta"]) for part in parts], ["beta"]), ["beta"])
    for name, value in whole.items():
        np.testing.assert_allclose(merged[name], value, rtol=1e-10, err_msg=name)


def simulate_groups(groups: int, prompts: int, size: int, seed: int) -> list[dict]:
    """``groups`` independent runs of ``prompts`` N(0, 1) prompts of ``size`` rewards each: each run's prompt means."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(groups):
        rewards = rng.normal(size=(prompts, size))
        full = finalize_many(TiltStats.from_segments(BETAS, rewards.reshape(-1, 1), np.arange(0, prompts * size + 1, size)))
        fields = {name: np.asarray(getattr(full, name)) for name in (
            "gain", "gain_bc", "gain_se_delta", "kl", "kl_bc", "kl_se_delta", "gain_kl_cov", "gain_dbeta", "khat",
            "reliable", "ess", "body_sd", "top_tied", "kl_dbeta", "reward_max", "log_z")}
        fields = {name: (value[:, :, 0] if value.ndim == 3 else value) for name, value in fields.items()}
        for name in ("reward_max", "body_sd"):
            fields[name] = np.broadcast_to(fields[name][:, None], (prompts, BETAS.size))
        fields["n"] = np.full((prompts, BETAS.size), size)
        fields["beta"] = np.broadcast_to(BETAS, (prompts, BETAS.size))
        gate = gate_cells(fields, axis=0)
        table = pa.table({**{name: fields[name].reshape(-1) for name in (
            "gain", "gain_bc", "gain_se_delta", "kl", "kl_bc", "kl_se_delta", "gain_kl_cov", "gain_dbeta", "kl_dbeta")},
            "beta": fields["beta"].reshape(-1), "reliable": gate.reliable.reshape(-1),
            "bias_allowance": gate.bias_allowance.reshape(-1)})
        out.append(prompt_means(prompt_sums(table, ["beta"]), ["beta"]))
    return out


def test_the_prompt_mean_and_its_fixed_kl_gain_cover_the_exact_gaussian_frontier():
    """60 runs of 100 Gaussian prompts (N = 512): the bias-corrected prompt mean at each beta is covered by
    ``gain ± 1.96 gain_se`` (the raw delta-method bar, SE/SD 0.8-1.25), and the gain at a fixed KL, Hermite
    between betas, by its fixed-KL bar against the exact sqrt(2K), which is half the fixed-beta bar or less."""
    runs = simulate_groups(60, 100, 512, seed=3)
    for b, beta in enumerate(BETAS):
        gain = np.array([run["gain"][b] for run in runs])
        bar = np.array([run["gain_se"][b] for run in runs])
        assert np.isfinite(bar).all()
        assert 0.8 <= bar.mean() / gain.std(ddof=1) <= 1.25, beta
        assert np.mean(np.abs(gain - 1 / beta) <= 1.96 * bar) >= 0.88, beta
        assert all(run["slope"][b] == pytest.approx(beta, rel=1e-12) for run in runs)  # d gain / d KL = beta exactly
    for budget in (0.1, 0.3):
        estimates = [at_kl(run["kl"], BETAS, run["gain"], budget, run["slope"], run["kl_dbeta"], run["gain_se_at_kl"])
                     for run in runs]
        value = np.array([item[1] for item in estimates])
        se = np.array([item[2] for item in estimates])
        assert np.isfinite(se).all()
        assert 0.75 <= se.mean() / value.std(ddof=1) <= 1.33, budget
        assert np.mean(np.abs(value - math.sqrt(2 * budget)) <= 1.96 * se) >= 0.88, budget
        fixed_beta = np.array([np.interp(budget, run["kl"][::-1], run["gain_se"][::-1]) for run in runs])
        assert np.mean(se / fixed_beta) <= 0.6


def test_the_drift_columns_are_the_same_with_and_without_the_convergence_table():
    """Without the convergence table, PromptRows still finalizes the largest dyadic prefix below N (tail dropped:
    no k-hat fit) for the drift: the frontier is the same either way, and the drift is bc(N) - bc(prefix)."""
    from limits_ray.core.analysis import AnalysisConfig
    from limits_ray.core.tables import reduce_table

    rng = np.random.default_rng(5)
    prompts, size = 12, 300
    table = pa.table({"prompt_id": np.repeat([f"p{i:02d}" for i in range(prompts)], size),
                      "sample_idx": np.tile(np.arange(size), prompts), "r": rng.normal(size=prompts * size)})
    config = AnalysisConfig(betas=(0.7, 2.0), best_of_n=False)
    full = reduce_table(table, ["r"], config)
    lean = reduce_table(table, ["r"], AnalysisConfig(betas=(0.7, 2.0), best_of_n=False, convergence=False))
    for name in full.frontier.column_names:
        left, right = full.frontier[name].to_numpy(zero_copy_only=False), lean.frontier[name].to_numpy(zero_copy_only=False)
        if left.dtype.kind == "f":
            np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-15, err_msg=name)
        else:
            np.testing.assert_array_equal(left, right, err_msg=name)
    first = table.slice(0, 256)["r"].to_numpy()[:, None]  # prompt p00: the prefix of 256 samples below N = 300
    want = TiltStats.from_samples(np.array([0.7, 2.0]), table.slice(0, size)["r"].to_numpy()[:, None]).finalize().gain_bc[:, 0] \
        - TiltStats.from_samples(np.array([0.7, 2.0]), first).finalize().gain_bc[:, 0]
    np.testing.assert_allclose(full.frontier.slice(0, 2)["gain_drift"].to_numpy(), want, rtol=1e-10)
