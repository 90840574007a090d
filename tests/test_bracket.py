"""The certified bracket past the trusted range (limits_ray.core.bracket): its bounds, its table, query and figure."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from limits_ray.cli import main
from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.bracket import bracket_at, bracket_table, lower_bound
from limits_ray.core.frontier import trusted_kl_range
from limits_ray.core.tables import reduce_table

SIGMAS = (0.5, 1.0, 2.0)


def _gaussian(prompts: int = 30, n: int = 1000, seed: int = 0) -> tuple[pa.Table, float]:
    """Prompts of three spreads; the prompt set's exact frontier is sigma_rms sqrt(2 K)."""
    rng = np.random.default_rng(seed)
    sigma = np.array([SIGMAS[p % 3] for p in range(prompts)])
    table = pa.table({"prompt_id": np.repeat([f"p{p:03d}" for p in range(prompts)], n),
                      "sample_idx": np.tile(np.arange(n), prompts),
                      "a": (rng.normal(size=(prompts, n)) * sigma[:, None]).ravel()})
    return table, float(np.sqrt(np.mean(sigma**2)))


def test_the_lower_bound_is_the_concave_envelope_then_flat():
    kl = np.array([0.0, 1.0, 2.0, 3.0, 2.5])
    gain = np.array([0.0, 1.0, 1.2, 2.0, 0.5])
    names = ["base", "a", "b", "c", "d"]
    values, labels = lower_bound(kl, gain, names, np.array([0.5, 1.0, 1.5, 2.0, 3.0, 9.0]))
    # b lies under the chord from a to c and d is dominated: the envelope is base - a - c, then flat
    np.testing.assert_allclose(values, [0.5, 1.0, 1.25, 1.5, 2.0, 2.0])
    assert labels == ["mix(base, a)", "a", "mix(a, c)", "mix(a, c)", "c", "c"]


def test_gaussian_bracket_contains_the_exact_frontier_past_the_trusted_range():
    table, sigma = _gaussian()
    result = reduce_table(table, ["a"], AnalysisConfig(betas="0.05:10:20"))
    bracket = result.bracket.to_pylist()
    trusted = trusted_kl_range(result.frontier_mean, "a", "a")
    assert bracket and trusted is not None
    anchor_kl = bracket[0]["anchor_kl"]
    assert anchor_kl == pytest.approx(trusted[1], rel=0.05)  # the last trusted point (bias-corrected KL)
    assert bracket[0]["kl"] == pytest.approx(anchor_kl)
    assert max(row["kl"] for row in bracket) >= np.log(1000)
    for row in bracket:
        exact = sigma * np.sqrt(2 * row["kl"])
        assert row["lower"] <= exact <= row["upper"], row
        assert row["upper"] == pytest.approx(row["anchor_gain_hi"] + row["anchor_beta"] * (row["kl"] - anchor_kl))
    lower = np.array([row["lower"] for row in bracket])
    assert np.all(np.diff(lower) >= -1e-12) and lower[-1] > 0
    assert any(row["lower_source"].startswith("best-of-") for row in bracket)


def test_bracket_at_reads_the_table_at_any_budget_past_its_start():
    table, _ = _gaussian(prompts=12, n=400, seed=1)
    result = reduce_table(table, ["a"], AnalysisConfig(betas="0.05:10:12"))
    rows = result.bracket.to_pylist()
    for row in rows[::5]:
        found = bracket_at(result.bracket, row["kl"], "a", "a")
        assert (found.lower, found.upper) == pytest.approx((row["lower"], row["upper"]))
    far = bracket_at(result.bracket, 50.0, "a", "a")
    assert far.lower == pytest.approx(rows[-1]["lower"])
    assert far.upper == pytest.approx(rows[0]["anchor_gain_hi"] + rows[0]["anchor_beta"] * (50.0 - rows[0]["anchor_kl"]))
    middle = 0.5 * (rows[3]["kl"] + rows[4]["kl"])
    assert bracket_at(result.bracket, middle, "a", "a").lower >= min(rows[3]["lower"], rows[4]["lower"])
    assert bracket_at(result.bracket, rows[0]["kl"] / 2, "a", "a") is None  # inside the trusted range
    assert bracket_at(result.bracket, 1.0, "b", "b") is None


def test_without_a_trusted_beta_there_is_no_upper_bound_and_a_policy_raises_the_lower_one():
    table, _ = _gaussian(prompts=6, n=64, seed=2)
    result = reduce_table(table, ["a"], AnalysisConfig(betas=(0.01, 0.02)))
    assert trusted_kl_range(result.frontier_mean, "a", "a") is None
    rows = result.bracket.to_pylist()
    assert rows and all(np.isnan(row["upper"]) and np.isnan(row["anchor_beta"]) for row in rows)
    assert rows[-1]["lower"] > 0 and rows[-1]["lower_source"].startswith("best-of-")
    policy = pa.table({"policy": ["ppo"], "kind": ["checkpoint"], "align": ["a"], "eval": ["a"], "kl": [1.0],
                       "kl_se": [0.01], "gain": [50.0], "gain_se": [0.1]})
    with_policy = bracket_table(result.frontier_mean, None, policy).to_pylist()
    last = with_policy[-1]
    assert last["lower"] == pytest.approx(50.0 - 1.96 * 0.1, rel=1e-3) and last["lower_source"] == "policy ppo"


def test_query_prints_the_bracket_past_the_trusted_range(tmp_path, capsys):
    table, _ = _gaussian(prompts=12, n=400, seed=3)
    pq.write_table(table, tmp_path / "s.parquet")
    assert main(["reduce", "--samples", str(tmp_path / "s.parquet"), "--out", str(tmp_path / "o"), "--betas", "0.3:10:8"]) == 0
    bracket = pq.read_table(tmp_path / "o" / "bracket.parquet")
    frontier_kl = max(pq.read_table(tmp_path / "o" / "frontier_mean.parquet")["kl"].to_pylist())
    beyond = 0.5 * (frontier_kl + max(bracket["kl"].to_pylist()))  # past the frontier's grid, inside the bracket's
    capsys.readouterr()
    assert main(["query", str(tmp_path / "o"), "--kl", f"0.01,2,{beyond}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("a ")]
    assert [row.split()[-1] for row in rows] == ["yes", "NO", "NO"]
    certified = [line for line in lines if line.startswith("    certified bracket at KL")]
    assert len(certified) == 2 and "best-of-" in certified[-1] and "tangent at the last trusted point" in certified[0]
    assert rows[-1].split()[3:5] == ["-", "-"]  # no estimate beyond the grid, only the bracket
    assert main(["query", str(tmp_path / "o"), "--kl", "1000"]) == 2
    assert "outside" in capsys.readouterr().err
