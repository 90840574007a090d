"""Win rates over pi0 (limits_ray.core.winrate): definitions, exact values, and the tables' reliability."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm

from limits_ray.cli import main
from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.bon import bon_kl_bound
from limits_ray.core.tables import reduce_table
from limits_ray.core.winrate import (
    RANK_BETAS,
    bon_winrate,
    loo_midranks,
    midcdf,
    rank_label,
    rank_tilt_at_kl,
    rank_tilt_curve,
    tilted_winrate,
)


def _samples(prompts: int, n: int, seed: int = 0, draw=None) -> pa.Table:
    rng = np.random.default_rng(seed)
    values = draw(rng, prompts * n) if draw is not None else rng.normal(size=prompts * n)
    return pa.table({"prompt_id": np.repeat([f"p{i:03d}" for i in range(prompts)], n),
                     "sample_idx": np.tile(np.arange(n), prompts), "a": values})


def test_ranks_follow_their_definitions_with_ties():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    loo = [(sum(v < x for j, v in enumerate(values) if j != i) + 0.5 * sum(v == x for j, v in enumerate(values) if j != i))
           / (values.size - 1) for i, x in enumerate(values)]
    np.testing.assert_allclose(loo_midranks(values), loo)
    np.testing.assert_allclose(midcdf(values), [(np.sum(values < x) + 0.5 * np.sum(values == x)) / values.size for x in values])
    assert np.isnan(loo_midranks(np.array([1.0]))).all()


def test_the_estimate_and_its_influence_function_are_the_sums_of_the_docstring():
    rng = np.random.default_rng(1)
    r, e = rng.normal(size=40), np.round(rng.normal(size=40), 1)  # ties in e
    beta = 0.7
    got = tilted_winrate(r, e[:, None], np.array([beta]))
    w = np.exp(r / beta)
    f = loo_midranks(e)
    winrate = np.sum(w * f) / np.sum(w)
    beaten = np.array([np.sum(w * ((e > x) + 0.5 * (e == x))) / np.sum(w) for x in e])
    influence = w / w.mean() * (f - winrate) + beaten - winrate
    assert got.winrate[0, 0] == pytest.approx(winrate, rel=1e-12)
    assert got.se_delta[0, 0] == pytest.approx(np.sqrt(np.sum(influence**2) / (40 * 39)), rel=1e-10)
    assert got.if4[0, 0] == pytest.approx(np.sum(influence**4), rel=1e-10)
    assert got.winrate_bc[0, 0] == pytest.approx(winrate + np.sum(w**2 * (f - winrate)) / np.sum(w) ** 2, rel=1e-12)


def test_without_a_tilt_the_win_rate_is_one_half():
    rng = np.random.default_rng(2)
    got = tilted_winrate(rng.normal(size=500), rng.normal(size=(500, 2)), np.array([1e9]))
    np.testing.assert_allclose(got.winrate, 0.5, atol=1e-9)
    assert np.all(got.se_delta < 1e-4)  # O(N^-1.5): F_(-i) leaves i out, G_i counts it


def test_a_finite_response_set_with_ties_gives_the_enumerated_win_rate():
    """pi0 on 5 responses, two tied in e: W = sum_y pi_beta(y) F0(e(y)) with the mid-CDF F0."""
    probs = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    r = np.array([0.0, 1.0, 0.5, 2.0, 1.5])
    e = np.array([0.0, 1.0, 1.0, 2.0, 0.5])
    beta = 0.8
    mid = np.array([np.sum(probs[e < x]) + 0.5 * np.sum(probs[e == x]) for x in e])
    tilted = probs * np.exp(r / beta)
    exact = np.sum(tilted / tilted.sum() * mid)
    rng = np.random.default_rng(3)
    draws = rng.choice(5, size=20_000, p=probs)
    got = tilted_winrate(r[draws], e[draws, None], np.array([beta]))
    assert abs(got.winrate_bc[0, 0] - exact) < 4 * got.se_delta[0, 0], (got.winrate_bc[0, 0], exact)
    assert got.se_delta[0, 0] < 0.005


def test_gaussian_tilts_beat_the_base_with_phi_of_mean_over_root_two():
    """N(0, 1) tilted by exp(r/beta) is N(1/beta, 1): W = Phi(1/(beta sqrt 2))."""
    result = reduce_table(_samples(1, 4000, seed=4), ["a"], AnalysisConfig(betas=(1.0, 2.0)))
    rows = result.winrate.filter(pc.equal(result.winrate["align"], "a")).to_pylist()
    for row in rows:
        exact = norm.cdf(1 / (row["beta"] * math.sqrt(2)))
        assert row["reliable"] and abs(row["winrate_bc"] - exact) < 4 * row["winrate_se"], row


def test_rank_tilts_and_best_of_n_reach_their_closed_forms():
    """Continuous rewards: the rank tilts give W = e^t/(e^t - 1) - 1/t at KL = t W - log((e^t - 1)/t), best-of-n
    W = n/(n+1); both from N = 4000 samples to 2e-3 (bench/bench_winrate.py: 1e-3 at N = 1e4)."""
    result = reduce_table(_samples(1, 4000, seed=5), ["a"], AnalysisConfig(betas=(1.0,)))
    ranked = result.winrate.filter(pc.equal(result.winrate["align"], rank_label("a")))
    betas = ranked["beta"].to_numpy()
    np.testing.assert_allclose(betas, RANK_BETAS)
    exact_w, exact_kl = rank_tilt_curve(betas)
    usable = betas >= 0.01
    np.testing.assert_allclose(ranked["winrate"].to_numpy()[usable], exact_w[usable], atol=2e-3)
    np.testing.assert_allclose(ranked["kl"].to_numpy()[usable], exact_kl[usable], atol=2e-3)
    bon = result.bon.to_pylist()
    assert [row["n"] for row in bon] == [2**k for k in range(12)]
    for row in bon:
        assert row["winrate"] == pytest.approx(row["n"] / (row["n"] + 1), abs=1e-3)
    # the closed forms: the KL inverse, and best-of-n under the optimum (and close to it beyond n = 16)
    for kl in (0.05, 0.5, 2.0, 5.0):
        beta, winrate = rank_tilt_at_kl(kl)
        assert rank_tilt_curve(np.array([beta]))[1][0] == pytest.approx(kl, rel=1e-9)
    for n in (2, 4, 16, 256):
        optimum = rank_tilt_at_kl(float(bon_kl_bound(np.array([n]))[0]))[1]
        assert bon_winrate(np.array([n]))[0] < optimum < bon_winrate(np.array([n]))[0] + (0.01 if n < 16 else 2e-4)
    assert rank_tilt_curve(np.array([1e6]))[0][0] == pytest.approx(0.5, abs=1e-6)


def test_win_rate_rows_carry_the_frontier_rows_weights_and_gate():
    """Same weights exp(r/beta): the rows' KL, k-hat, ESS and the gated reliable flag are the frontier's."""
    table = _samples(24, 300, seed=6, draw=lambda rng, size: rng.exponential(size=size))
    result = reduce_table(table, ["a"], AnalysisConfig(betas="1.2:10:6"))
    keys = [("prompt_id", "ascending"), ("beta", "ascending")]
    frontier = result.frontier.sort_by(keys)
    winrate = result.winrate.filter(pc.equal(result.winrate["align"], "a")).sort_by(keys)
    assert frontier.num_rows == winrate.num_rows == 24 * 6
    for column in ("kl", "kl_se", "ess", "khat", "body_sd", "khat_pooled"):
        np.testing.assert_array_equal(winrate[column].to_numpy(), frontier[column].to_numpy(), err_msg=column)
    assert winrate["reliable"].to_pylist() == frontier["reliable"].to_pylist()
    assert 0 < np.mean(frontier["reliable"].to_numpy()) < 1  # the gate matters in this cell
    assert np.array_equal(np.isnan(winrate["winrate_se"].to_numpy()), ~winrate["reliable"].to_numpy(zero_copy_only=False))
    mean = result.winrate_mean.filter(pc.equal(result.winrate_mean["align"], "a")).sort_by("beta")
    for row in mean.to_pylist():
        group = winrate.filter(pc.equal(winrate["beta"], row["beta"]))
        assert row["prompts"] == 24
        assert row["winrate"] == pytest.approx(np.mean(group["winrate"].to_numpy()), rel=1e-12)
        assert row["reliable"] == pytest.approx(np.mean(group["reliable"].to_numpy()))
        assert row["winrate_bc"] == pytest.approx(np.mean(group["winrate_bc"].to_numpy()), rel=1e-12)
        # the prompt mean's error bar: the rows' delta-method SEs (no t-factor), scaled for heavy weights
        # (limits_ray.core.prompt_mean.variance_factor), plus the unreliable rows' bias allowances
        khat = group["khat_pooled"].to_numpy()
        factor = 1 / (1 - np.clip(np.where(np.isfinite(khat), khat, 0.0) - 0.25, 0, 0.9))
        se = group["winrate_se_delta"].to_numpy() * factor
        allowance = group["bias_allowance"].to_numpy()
        if np.all(allowance == 0):
            assert row["winrate_se"] == pytest.approx(np.sqrt(np.sum(se**2)) / 24, rel=1e-9)
        elif np.isinf(allowance).any():
            assert np.isnan(row["winrate_se"])


def test_query_winrate_prints_the_win_rate_and_the_optimum(tmp_path, capsys):
    pq.write_table(_samples(12, 400, seed=7), tmp_path / "s.parquet")
    assert main(["reduce", "--samples", str(tmp_path / "s.parquet"), "--out", str(tmp_path / "o"), "--betas", "0.3:5:8"]) == 0
    capsys.readouterr()
    assert main(["query", str(tmp_path / "o"), "--kl", "0.1,1", "--winrate"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("a ", "rank(a) "))]
    assert [(row[0], row[2]) for row in rows] == [("a", "0.1"), ("a", "1"), ("rank(a)", "0.1"), ("rank(a)", "1")]
    for row in rows:
        assert float(row[-1]) == pytest.approx(rank_tilt_at_kl(float(row[2]))[1], abs=1e-4)
        assert 0.5 < float(row[4]) <= float(row[-1]) + 0.01
    for flag in ("--no-bon", "--no-winrate"):
        assert main(["reduce", "--samples", str(tmp_path / "s.parquet"), "--out", str(tmp_path / flag), flag]) == 0
        assert pq.read_table(tmp_path / flag / "winrate.parquet").num_rows == 0
        assert main(["query", str(tmp_path / flag), "--kl", "0.1", "--winrate"]) == 2
        assert "best-of-n" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "--no-winrate" / "bon.parquet").num_rows > 0
