"""Tests of limits_ray.core.frontier: the prompt-averaged frontier and the KL-budget query."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

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
    """Rows as a frontier table; reliability columns a row leaves out default to a reliable, unbiased cell."""
    defaults = {"gain_bc": lambda row: row["gain"], "kl_bc": lambda row: row["kl"], "khat": lambda row: 0.3,
                "khat_pooled": lambda row: row.get("khat", 0.3), "body_sd": lambda row: 1.0, "reliable": lambda row: True}
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
    betas = [0.5, 1.0, 4.0]
    pairs = [("gold", "gold"), ("proxy", "gold"), ("mean(a,b)", "gold")]
    rows = random_frontier(0, 7, betas, pairs)
    result = mean_frontier(per_prompt_table(rows))
    assert result.schema == SCHEMAS["frontier_mean"]
    assert result.num_rows == len(betas) * len(pairs)
    keys = list(zip(result["align"].to_pylist(), result["eval"].to_pylist(), result["beta"].to_pylist()))
    assert keys == sorted(keys)  # sorted by align, eval, beta
    for row in result.to_pylist():
        group = [r for r in rows if (r["align"], r["eval"], r["beta"]) == (row["align"], row["eval"], row["beta"])]
        assert row["prompts"] == len(group) == 7
        assert row["gain"] == pytest.approx(np.mean([r["gain"] for r in group]), rel=1e-13)
        assert row["kl"] == pytest.approx(np.mean([r["kl"] for r in group]), rel=1e-13)
        assert row["gain_se"] == pytest.approx(math.sqrt(sum(r["gain_se"] ** 2 for r in group)) / 7, rel=1e-13)
        assert row["kl_se"] == pytest.approx(math.sqrt(sum(r["kl_se"] ** 2 for r in group)) / 7, rel=1e-13)
        assert row["gain_bc"] == pytest.approx(np.mean([r["gain_bc"] for r in group]), rel=1e-13)
        assert row["kl_bc"] == pytest.approx(np.mean([r["kl_bc"] for r in group]), rel=1e-13)
        assert row["reliable"] == sum(r["reliable"] for r in group) / 7
        assert row["gain_spread_se"] == pytest.approx(np.std([r["gain"] for r in group], ddof=1) / math.sqrt(7), rel=1e-9)
        assert row["kl_spread_se"] == pytest.approx(np.std([r["kl"] for r in group], ddof=1) / math.sqrt(7), rel=1e-9)


def test_mean_frontier_has_no_standard_error_where_a_prompt_has_none():
    """A prompt without an interval (unreliable weights) leaves the mean without one: NaN, not a smaller SE."""
    rows = random_frontier(4, 3, [1.0, 2.0], [("a", "a")])
    for row in rows:
        if row["prompt_id"] == "p1" and row["beta"] == 1.0:
            row.update(gain_se=math.nan, kl_se=math.nan, reliable=False)
    result = mean_frontier(per_prompt_table(rows)).to_pylist()
    assert math.isnan(result[0]["gain_se"]) and math.isnan(result[0]["kl_se"])
    assert math.isfinite(result[1]["gain_se"])


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
        assert (row["gain"], row["gain_se"], row["kl"], row["kl_se"]) == pytest.approx(
            (source["gain"], source["gain_se"], source["kl"], source["kl_se"]), rel=1e-15)
        assert math.isnan(row["gain_spread_se"]) and math.isnan(row["kl_spread_se"])  # no spread from one prompt


def test_mean_frontier_of_an_empty_table_is_empty():
    result = mean_frontier(SCHEMAS["frontier"].empty_table())
    assert result.num_rows == 0
    assert result.schema == SCHEMAS["frontier_mean"]


def gaussian_frontier_mean(betas, align="r", evaluation="r", sigma=1.0, reliable=None) -> pa.Table:
    betas = np.asarray(betas, float)
    return pa.table({
        "align": [align] * betas.size, "eval": [evaluation] * betas.size, "beta": betas,
        "prompts": np.full(betas.size, 5, dtype=np.int64), "gain": sigma**2 / betas,
        "gain_se": np.full(betas.size, 0.01), "kl": sigma**2 / (2 * betas**2), "kl_se": np.full(betas.size, 0.01),
        "gain_bc": sigma**2 / betas, "kl_bc": sigma**2 / (2 * betas**2),
        "reliable": np.ones(betas.size) if reliable is None else np.asarray(reliable, float),
        "gain_spread_se": np.full(betas.size, 0.1), "kl_spread_se": np.full(betas.size, 0.1),
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
    assert outside.gain == pytest.approx(0.5 + (0.3 - 0.125) / (0.5 - 0.125) * 0.5, rel=1e-13)  # still answered


def test_point_at_kl_on_grid_points_and_between():
    table = gaussian_frontier_mean([1.0, 2.0, 4.0, 8.0])  # kl = 0.5, 0.125, 0.03125, 0.0078125
    point = point_at_kl(table, 0.125, "r", "r")
    assert isinstance(point, FrontierPoint)
    assert (point.align, point.eval, point.kl) == ("r", "r", 0.125)
    assert point.beta == pytest.approx(2.0, rel=1e-14)
    assert point.gain == pytest.approx(0.5, rel=1e-14)
    # between grid points: gain and log beta linear in KL
    budget = 0.3
    t = (budget - 0.125) / (0.5 - 0.125)
    point = point_at_kl(table, budget, "r", "r")
    assert point.gain == pytest.approx(0.5 + t * (1.0 - 0.5), rel=1e-13)
    assert point.beta == pytest.approx(math.exp((1 - t) * math.log(2.0) + t * math.log(1.0)), rel=1e-13)
    assert 1.0 < point.beta < 2.0
    # the range ends are included
    assert point_at_kl(table, 0.5, "r", "r").beta == pytest.approx(1.0, rel=1e-14)
    assert point_at_kl(table, 0.0078125, "r", "r").gain == pytest.approx(1 / 8, rel=1e-14)


def test_point_at_kl_picks_the_requested_pair():
    table = pa.concat_tables([
        gaussian_frontier_mean([1.0, 2.0, 4.0], "a", "a", sigma=1.0),
        gaussian_frontier_mean([1.0, 2.0, 4.0], "b", "gold", sigma=2.0),
    ])
    point = point_at_kl(table, 0.5, "b", "gold")  # sigma = 2: kl = 2 / beta^2 = 0.5 at beta = 2
    assert point.beta == pytest.approx(2.0, rel=1e-14)
    assert point.gain == pytest.approx(2.0, rel=1e-14)


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
    shards = [[r for r in rows if int(r["prompt_id"][1:]) % 3 == k] for k in range(3)]
    sums = [frontier_sums(per_prompt_table(shard)) for shard in shards]
    assert sums[0].column_names == ["align", "eval", "beta", "prompts", "gain_mean", "gain_m2", "kl_mean", "kl_m2",
                                    "gain_var_sum", "kl_var_sum", "gain_bc_sum", "kl_bc_sum", "reliable_sum"]
    assert sums[0]["prompts"].to_pylist() == [3] * 4
    whole = mean_frontier(per_prompt_table(rows))
    for combined in (mean_from_sums(merge_sums(sums)), mean_from_sums(sums)):
        assert combined.schema == SCHEMAS["frontier_mean"]
        assert combined.select(["align", "eval", "beta", "prompts"]).equals(whole.select(["align", "eval", "beta", "prompts"]))
        for name in ("gain", "gain_se", "kl", "kl_se", "gain_bc", "kl_bc", "reliable"):
            np.testing.assert_allclose(combined[name].to_numpy(), whole[name].to_numpy(), rtol=1e-13)
        for name in ("gain_spread_se", "kl_spread_se"):
            np.testing.assert_allclose(combined[name].to_numpy(), whole[name].to_numpy(), rtol=1e-10)
    group = [r for r in rows if (r["align"], r["beta"]) == ("b", 2.0)]
    assert merge_sums(sums).filter(pc.equal(merge_sums(sums)["align"], "b"))["gain_mean"][1].as_py() == pytest.approx(
        np.mean([r["gain"] for r in group]), rel=1e-14)
