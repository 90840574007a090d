"""Tests of limits_ray.core.frontier: the prompt-averaged frontier and the KL-budget query."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from limits_ray.core.fixed_kl import interpolation_error
from limits_ray.core.frontier import (
    FrontierPoint,
    between_prompt_se,
    frontier_sums,
    mean_from_sums,
    mean_frontier,
    merge_moments,
    merge_sums,
    point_at_kl,
    trusted_kl_range,
)
from limits_ray.core.schemas import SCHEMAS


def per_prompt_table(rows: list[dict]) -> pa.Table:
    """Rows as a frontier table; reliability columns a row leaves out default to a reliable, unbiased cell
    (the delta-method SEs to the interval SEs, no bias allowance)."""
    defaults = {"gain_bc": lambda row: row["gain"], "kl_bc": lambda row: row["kl"], "khat": lambda row: 0.3,
                "khat_pooled": lambda row: 0.2, "body_sd": lambda row: 1.0, "reliable": lambda row: True,
                "gain_se_delta": lambda row: row["gain_se"], "kl_se_delta": lambda row: row["kl_se"],
                "gain_kl_cov": lambda row: 0.0, "gain_dbeta": lambda row: -1.0 / row["beta"] ** 2,
                "kl_dbeta": lambda row: -1.0 / row["beta"] ** 3, "reward_max": lambda row: 3.0, "top_tied": lambda row: False, "log_z": lambda row: 1.0,
                "bias_allowance": lambda row: 0.0, "tie_bias_at_kl": lambda row: math.nan, "gain_drift": lambda row: math.nan, "kl_drift": lambda row: math.nan}
    columns = {name: [row[name] if name in row else defaults[name](row) for row in rows] for name in SCHEMAS["frontier"].names}
    return pa.table(columns, schema=SCHEMAS["frontier"])


def random_frontier(seed: int, prompts: int, betas: list[float], pairs: list[tuple[str, str]]):
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in range(prompts):
        for align, evaluation in pairs:
            for beta in betas:
                rows.append({
                    "prompt_id": f"p{prompt}", "align": align, "eval": evaluation, "beta": beta, "n": 64,
                    "gain": rng.normal(1 / beta, 0.3), "gain_se": rng.uniform(0.01, 0.2),
                    "kl": rng.uniform(0, 2) / beta**2, "kl_se": rng.uniform(0.001, 0.1), "ess": rng.uniform(1, 64),
                    "gain_bc": rng.normal(1 / beta, 0.3), "kl_bc": rng.uniform(0, 2) / beta**2,
                    "khat": rng.uniform(0, 1), "reliable": bool(rng.uniform() < 0.7),
                })
    rng.shuffle(rows)  # input order must not matter
    return rows


def test_mean_frontier_averages_over_prompts():
    """Centre: the mean of the bias-corrected estimates; error bar: sqrt(sum se_delta^2)/P (no t-factor);
    spread: of the bias-corrected estimates; every prompt's bias allowance 0 here."""
    betas = [0.5, 1.0, 4.0]
    pairs = [("gold", "gold"), ("proxy", "gold"), ("mean(a,b)", "gold")]
    rows = random_frontier(0, 7, betas, pairs)
    for row in rows:
        row.update(gain_se_delta=row["gain_se"] / 1.5, kl_se_delta=row["kl_se"] / 1.5, bias_allowance=0.0)
    result = mean_frontier(per_prompt_table(rows))
    assert result.schema == SCHEMAS["frontier_mean"]
    assert result.num_rows == len(betas) * len(pairs)
    keys = list(zip(result["align"].to_pylist(), result["eval"].to_pylist(), result["beta"].to_pylist()))
    assert keys == sorted(keys)  # sorted by align, eval, beta
    for row in result.to_pylist():
        group = [r for r in rows if (r["align"], r["eval"], r["beta"]) == (row["align"], row["eval"], row["beta"])]
        assert row["prompts"] == len(group) == 7
        assert row["gain"] == pytest.approx(np.mean([r["gain_bc"] for r in group]), rel=1e-13)
        assert row["kl"] == pytest.approx(np.mean([r["kl_bc"] for r in group]), rel=1e-13)
        assert row["gain_plugin"] == pytest.approx(np.mean([r["gain"] for r in group]), rel=1e-13)
        assert row["kl_plugin"] == pytest.approx(np.mean([r["kl"] for r in group]), rel=1e-13)
        assert row["gain_se"] == pytest.approx(math.sqrt(sum(r["gain_se_delta"] ** 2 for r in group)) / 7, rel=1e-13)
        assert row["kl_se"] == pytest.approx(math.sqrt(sum(r["kl_se_delta"] ** 2 for r in group)) / 7, rel=1e-13)
        assert row["reliable"] == sum(r["reliable"] for r in group) / 7
        assert row["gain_spread_se"] == pytest.approx(np.std([r["gain_bc"] for r in group], ddof=1) / math.sqrt(7), rel=1e-9)
        assert row["kl_spread_se"] == pytest.approx(np.std([r["kl_bc"] for r in group], ddof=1) / math.sqrt(7), rel=1e-9)
        assert row["slope"] == pytest.approx(row["beta"], rel=1e-13)  # the defaults: d gain / d KL = beta
        assert row["gain_se_at_kl"] == pytest.approx(math.sqrt(sum(r["gain_se_delta"] ** 2 + (row["beta"] * r["kl_se_delta"]) ** 2
                                                                   for r in group)) / 7, rel=1e-12)  # gain_kl_cov 0


def test_unreliable_prompts_widen_the_error_bar_or_take_it_away():
    """Allowance 0 (a prompt that failed only its own test in a benign cell) keeps the plain bar; a share of
    allowance-1 prompts small enough widens it to sqrt(se^2 + A^2); an infinite allowance or too large a
    share leaves no bar (NaN), the spread SE likewise."""
    def mean_with(allowances):
        rows = [{"prompt_id": f"p{i}", "align": "r", "eval": "r", "beta": 1.0, "n": 100, "gain": 1.0 + 0.01 * i,
                 "gain_se": math.nan, "gain_se_delta": 0.1, "kl": 0.5, "kl_se": math.nan, "kl_se_delta": 0.05,
                 "ess": 50.0, "reliable": a == 0, "bias_allowance": a} for i, a in enumerate(allowances)]
        return mean_frontier(per_prompt_table(rows)).to_pylist()[0]

    plain = mean_with([0.0] * 100)
    assert plain["gain_se"] == pytest.approx(0.1 / 10, rel=1e-12) and plain["kl_se"] == pytest.approx(0.005, rel=1e-12)
    widened = mean_with([1.0] * 5 + [0.0] * 95)  # A = 5 * 0.1 / 100 = 0.005 <= 0.75 * 0.01
    assert widened["gain_se"] == pytest.approx(math.hypot(0.01, 0.005), rel=1e-12)
    assert widened["gain_spread_se"] == pytest.approx(math.hypot(plain["gain_spread_se"], 0.005), rel=1e-9)
    assert math.isnan(mean_with([1.0] * 8 + [0.0] * 92)["gain_se"])  # A = 0.008 > 0.0075
    gone = mean_with([math.inf] + [0.0] * 99)
    assert math.isnan(gone["gain_se"]) and math.isnan(gone["kl_se"]) and math.isnan(gone["gain_spread_se"])
    assert math.isnan(gone["gain_se_at_kl"]) and gone["gain"] == pytest.approx(plain["gain"])


def moments(values: np.ndarray) -> tuple[float, float, float]:
    """(count, mean, M2) of one bucket; (0, 0, 0) for an empty one."""
    if values.size == 0:
        return 0.0, 0.0, 0.0
    return float(values.size), float(values.mean()), float(np.sum((values - values.mean()) ** 2))


def test_moments_of_buckets_of_prompts_merge_exactly():
    values = np.random.default_rng(4).normal(2.0, 0.5, 40)
    buckets = [values[:7], values[7:8], values[8:8], values[8:]]  # any partition, even one prompt or none
    merged = moments(buckets[0])
    for bucket in buckets[1:]:
        merged = merge_moments(merged, moments(bucket))
    assert merged[0] == 40 and merged[1] == pytest.approx(values.mean(), rel=1e-14)
    assert between_prompt_se(merged[0], merged[2]) == pytest.approx(values.std(ddof=1) / math.sqrt(40), rel=1e-12)
    assert merge_moments(moments(values[:0]), moments(values[:0]))[0] == 0
    assert np.isnan(between_prompt_se(1, 0.0)) and np.isnan(between_prompt_se(0, 0.0))


def test_spread_keeps_its_digits_when_prompts_agree_to_many_digits():
    """At small beta every prompt's KL nears log N: sums of squares would cancel to 0 or noise."""
    kls = np.log(32) + np.random.default_rng(9).normal(0, 1e-8, 5)
    rows = [{"prompt_id": f"p{i}", "align": "r", "eval": "r", "beta": 0.01, "n": 32, "gain": 3.0 + kl, "gain_se": 0.1,
             "kl": kl, "kl_se": 0.01, "ess": 1.0} for i, kl in enumerate(kls)]
    row = mean_frontier(per_prompt_table(rows)).to_pylist()[0]
    assert row["kl_spread_se"] == pytest.approx(kls.std(ddof=1) / math.sqrt(5), rel=1e-6)
    halves = merge_moments(moments(kls[:2]), moments(kls[2:]))
    assert between_prompt_se(halves[0], halves[2]) == pytest.approx(kls.std(ddof=1) / math.sqrt(5), rel=1e-6)


def test_the_spread_se_is_the_convergence_study_s():
    from limits_ray.core.convergence import summarize

    rows = random_frontier(5, 9, [0.5, 2.0], [("a", "a"), ("a", "b")])
    table = per_prompt_table(rows)
    study = summarize(table.append_column("n_samples", table["n"]).drop_columns(["n"])).to_pylist()
    mean = mean_frontier(table).to_pylist()
    for ours, theirs in zip(mean, study):
        assert (ours["align"], ours["eval"], ours["beta"]) == (theirs["align"], theirs["eval"], theirs["beta"])
        assert ours["gain_spread_se"] == pytest.approx(theirs["gain_spread_se"], rel=1e-10)
        assert ours["kl_spread_se"] == pytest.approx(theirs["kl_spread_se"], rel=1e-10)
        assert ours["gain_se"] == pytest.approx(theirs["gain_mc_se"], rel=1e-12)


def test_between_prompt_se_covers_the_population_mean_and_the_within_se_does_not():
    """Prompts drawn from a population (true gains spread sd 0.3) with Monte Carlo noise (se 0.05):
    the between-prompt interval covers the population mean ~95%; the within-prompt one, far less."""
    rng = np.random.default_rng(8)
    prompts, reps, covered_between, covered_within = 20, 400, 0, 0
    for _ in range(reps):
        truth = rng.normal(1.0, 0.3, prompts)
        rows = [{"prompt_id": f"p{i}", "align": "r", "eval": "r", "beta": 1.0, "n": 64, "gain": g + rng.normal(0, 0.05),
                 "gain_se": 0.05, "kl": 0.5, "kl_se": 0.01, "ess": 10.0} for i, g in enumerate(truth)]
        row = mean_frontier(per_prompt_table(rows)).to_pylist()[0]
        covered_between += abs(row["gain"] - 1.0) <= 1.96 * row["gain_spread_se"]
        covered_within += abs(row["gain"] - 1.0) <= 1.96 * row["gain_se"]
    assert 0.91 <= covered_between / reps <= 0.98
    assert covered_within / reps < 0.5


def test_mean_frontier_counts_prompts_per_group():
    rows = random_frontier(1, 3, [1.0, 2.0], [("a", "a")])
    rows = [r for r in rows if not (r["prompt_id"] == "p0" and r["beta"] == 2.0)]  # one missing point
    result = mean_frontier(per_prompt_table(rows)).to_pylist()
    assert [row["prompts"] for row in result] == [3, 2]
    group = [r for r in rows if r["beta"] == 2.0]
    assert result[1]["gain_se"] == pytest.approx(math.sqrt(sum(r["gain_se"] ** 2 for r in group)) / 2, rel=1e-13)


def test_mean_frontier_of_a_single_prompt_is_that_prompt():
    rows = random_frontier(2, 1, [0.1, 1.0, 10.0], [("r", "r")])
    result = mean_frontier(per_prompt_table(rows))
    by_beta = {r["beta"]: r for r in rows}
    for row in result.to_pylist():
        source = by_beta[row["beta"]]
        assert (row["gain"], row["gain_se"], row["kl"], row["kl_se"], row["gain_plugin"]) == pytest.approx(
            (source["gain_bc"], source["gain_se"], source["kl_bc"], source["kl_se"], source["gain"]), rel=1e-15)
        assert math.isnan(row["gain_spread_se"]) and math.isnan(row["kl_spread_se"])  # no spread from one prompt


def test_mean_frontier_of_an_empty_table_is_empty():
    result = mean_frontier(SCHEMAS["frontier"].empty_table())
    assert result.num_rows == 0
    assert result.schema == SCHEMAS["frontier_mean"]


def gaussian_frontier_mean(betas, align="r", evaluation="r", sigma=1.0, reliable=None) -> pa.Table:
    """The exact frontier_mean of Gaussian rewards (gain sigma^2/beta, KL sigma^2/(2 beta^2), slope beta)."""
    betas = np.asarray(betas, float)
    return pa.table({
        "align": [align] * betas.size, "eval": [evaluation] * betas.size, "beta": betas,
        "prompts": np.full(betas.size, 5, dtype=np.int64), "gain": sigma**2 / betas,
        "gain_se": np.full(betas.size, 0.01), "kl": sigma**2 / (2 * betas**2), "kl_se": np.full(betas.size, 0.01),
        "gain_spread_se": np.full(betas.size, 0.1), "kl_spread_se": np.full(betas.size, 0.1),
        "gain_plugin": sigma**2 / betas, "kl_plugin": sigma**2 / (2 * betas**2),
        "reliable": np.ones(betas.size) if reliable is None else np.asarray(reliable, float),
        "slope": betas, "kl_dbeta": -sigma**2 / betas**3, "gain_se_at_kl": 0.004 * betas,
    }, schema=SCHEMAS["frontier_mean"])


def test_trusted_kl_range_runs_down_from_the_largest_beta():
    table = gaussian_frontier_mean([1.0, 2.0, 4.0, 8.0], reliable=[0.5, 0.95, 0.9, 1.0])  # KL 0.5 .. 0.0078
    assert trusted_kl_range(table, "r", "r") == (0.0078125, 0.125)
    assert trusted_kl_range(table, "r", "r", min_reliable=0.92) == (0.0078125, 0.0078125)
    assert trusted_kl_range(gaussian_frontier_mean([1.0, 2.0], reliable=[1.0, 0.2]), "r", "r") is None
    gappy = gaussian_frontier_mean([1.0, 2.0, 4.0], reliable=[1.0, 0.0, 1.0])  # a gap ends the trusted run
    assert trusted_kl_range(gappy, "r", "r") == (0.03125, 0.03125)
    assert trusted_kl_range(table.drop_columns(["reliable"]), "r", "r") is None


def test_point_at_kl_says_whether_the_budget_is_trusted():
    table = gaussian_frontier_mean([1.0, 2.0, 4.0, 8.0], reliable=[0.5, 0.95, 0.9, 1.0])
    inside, outside = point_at_kl(table, 0.1, "r", "r"), point_at_kl(table, 0.3, "r", "r")
    assert inside.trusted and inside.trusted_kl == (0.0078125, 0.125)
    assert not outside.trusted and outside.trusted_kl == (0.0078125, 0.125)
    assert outside.gain == pytest.approx(math.sqrt(2 * 0.3), rel=1e-3)  # still answered
    no_bar = table.set_column(table.schema.get_field_index("gain_se_at_kl"), "gain_se_at_kl", pa.array([0.004, 0.008, 0.016, math.nan]))
    assert not point_at_kl(no_bar, 0.02, "r", "r").trusted  # inside the range, but no error bar there
    assert point_at_kl(no_bar, 0.1, "r", "r").trusted


def test_point_at_kl_is_the_exact_gaussian_frontier_between_grid_points():
    """Gaussian rewards: gain = sigma sqrt(2 K) and beta = sigma / sqrt(2 K) at every KL budget K. With the
    known slopes (beta) the Hermite interpolant in log KL is within 1e-3 (relative) on a grid of betas a
    factor 2 apart (log beta exact), where the chord is off by up to 3%; the fixed-KL error bar is linear in
    KL between grid points."""
    table = gaussian_frontier_mean([1.0, 2.0, 4.0, 8.0])  # kl = 0.5, 0.125, 0.03125, 0.0078125
    point = point_at_kl(table, 0.125, "r", "r")
    assert isinstance(point, FrontierPoint)
    assert (point.align, point.eval, point.kl) == ("r", "r", 0.125)
    assert point.beta == pytest.approx(2.0, rel=1e-14) and point.gain == pytest.approx(0.5, rel=1e-14)
    assert point.gain_se == pytest.approx(0.008, rel=1e-12)
    worst_chord = 0.0
    for budget in np.geomspace(0.0078125, 0.5, 41):
        point = point_at_kl(table, budget, "r", "r")
        assert point.gain == pytest.approx(math.sqrt(2 * budget), rel=1e-3)
        assert point.beta == pytest.approx(1 / math.sqrt(2 * budget), rel=1e-12)
        chord = point_at_kl(table.drop_columns(["slope", "kl_dbeta"]), budget, "r", "r")
        worst_chord = max(worst_chord, abs(chord.gain / math.sqrt(2 * budget) - 1))
    assert worst_chord > 0.02
    # the error bar: linear in KL, widened by the interpolant's own error (cubic against quintic Hermite)
    t = (0.3 - 0.125) / (0.5 - 0.125)
    kl_sorted, order = np.sort(table["kl"].to_numpy()), np.argsort(table["kl"].to_numpy())
    error = interpolation_error(kl_sorted, table["gain"].to_numpy()[order], table["slope"].to_numpy()[order], 0.3)
    assert 0 < error < 1e-3 * math.sqrt(0.6) and error == pytest.approx(abs(point_at_kl(table, 0.3, "r", "r").gain - math.sqrt(0.6)), rel=0.2)
    assert point_at_kl(table, 0.3, "r", "r").gain_se == pytest.approx(math.hypot(0.008 + t * (0.004 - 0.008), error), rel=1e-12)
    tight = table.set_column(table.schema.get_field_index("gain_se_at_kl"), "gain_se_at_kl", pa.array([1e-5] * 4))
    assert math.isnan(point_at_kl(tight, 0.3, "r", "r").gain_se)  # a bar smaller than the interpolation error: none
    assert point_at_kl(table, 0.5, "r", "r").beta == pytest.approx(1.0, rel=1e-14)  # the range ends are included
    assert point_at_kl(table, 0.0078125, "r", "r").gain == pytest.approx(1 / 8, rel=1e-14)


def test_point_at_kl_picks_the_requested_pair():
    table = pa.concat_tables([
        gaussian_frontier_mean([1.0, 2.0, 4.0], "a", "a", sigma=1.0),
        gaussian_frontier_mean([1.0, 2.0, 4.0], "b", "gold", sigma=2.0),
    ])
    point = point_at_kl(table, 0.5, "b", "gold")  # sigma = 2: kl = 2 / beta^2 = 0.5 at beta = 2
    assert point.beta == pytest.approx(2.0, rel=1e-14)
    assert point.gain == pytest.approx(2.0, rel=1e-14)
    assert point_at_kl(table, 1.0, "b", "gold").gain == pytest.approx(2 * math.sqrt(2.0), rel=1e-3)  # sigma sqrt(2 K)


def test_point_at_kl_outside_the_range_raises():
    table = gaussian_frontier_mean([1.0, 2.0, 4.0])  # KL in [0.03125, 0.5]
    for budget in (0.6, 0.01, -1.0):
        with pytest.raises(ValueError, match="outside") as error:
            point_at_kl(table, budget, "r", "r")
        assert "0.03125" in str(error.value) and "0.5" in str(error.value)
    with pytest.raises(ValueError, match="no frontier") as error:
        point_at_kl(table, 0.1, "r", "gold")
    assert "('r', 'r')" in str(error.value)


def test_sums_of_prompt_shards_add_up_to_the_mean_of_all():
    rows = random_frontier(4, 9, [0.5, 2.0], [("a", "a"), ("b", "a")])
    for index, row in enumerate(rows):  # unequal covariances, slopes and allowances, one prompt without a bound
        row.update(gain_kl_cov=0.001 * (index % 5), gain_dbeta=-1.0 - 0.1 * (index % 3),
                   bias_allowance=math.inf if (row["prompt_id"], row["beta"]) == ("p3", 2.0) else float(index % 7 == 0))
    shards = [[r for r in rows if int(r["prompt_id"][1:]) % 3 == k] for k in range(3)]
    sums = [frontier_sums(per_prompt_table(shard)) for shard in shards]
    assert sums[0].column_names == ["align", "eval", "beta", "prompts", "gain_mean", "gain_m2", "kl_mean", "kl_m2",
                                    "gain_plugin_sum", "kl_plugin_sum", "gain_var_sum", "kl_var_sum", "gain_kl_cov_sum",
                                    "gain_bound_sum", "kl_bound_sum", "gain_bound_k_sum", "kl_bound_k_sum", "tie_at_kl_sum", "reliable_sum", "gain_dbeta_sum", "kl_dbeta_sum",
                                    "drift_count", "gain_drift_sum", "gain_drift_sq_sum", "kl_drift_sum", "kl_drift_sq_sum",
                                    "gain_kl_drift_sum"]
    assert sums[0]["prompts"].to_pylist() == [3] * 4
    whole = mean_frontier(per_prompt_table(rows))
    for combined in (mean_from_sums(merge_sums(sums)), mean_from_sums(sums)):
        assert combined.schema == SCHEMAS["frontier_mean"]
        assert combined.select(["align", "eval", "beta", "prompts"]).equals(whole.select(["align", "eval", "beta", "prompts"]))
        for name in ("gain", "gain_se", "kl", "kl_se", "gain_plugin", "kl_plugin", "reliable", "slope", "kl_dbeta",
                     "gain_se_at_kl"):
            np.testing.assert_allclose(combined[name].to_numpy(), whole[name].to_numpy(), rtol=1e-13)
        for name in ("gain_spread_se", "kl_spread_se"):
            np.testing.assert_allclose(combined[name].to_numpy(), whole[name].to_numpy(), rtol=1e-10)
    assert np.isnan(whole.filter(pc.equal(whole["beta"], 2.0))["gain_se"].to_numpy()).all()  # the unbounded prompt's cells
    group = [r for r in rows if (r["align"], r["beta"]) == ("b", 2.0)]
    assert merge_sums(sums).filter(pc.equal(merge_sums(sums)["align"], "b"))["gain_mean"][1].as_py() == pytest.approx(
        np.mean([r["gain_bc"] for r in group]), rel=1e-14)
