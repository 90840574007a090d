"""The cross-prompt reliability gate of the per-prompt tables (limits_ray.core.reliability)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.exact import gaussian_gain, gaussian_kl
from limits_ray.core.reliability import POOLED_KHAT_LIMIT, apply_pooled, khat_sums, merge_khat_sums, pool_whole
from limits_ray.core.tables import PromptRows, TableBuilder, reduce_table


def ungated_tables(rewards: np.ndarray, betas: list[float]) -> dict[str, pa.Table]:
    """Frontier and convergence rows of prompts ``rewards[p]`` (one reward ``r``), before the gate."""
    from limits_ray.core.samples import PromptSamples
    from limits_ray.core.tables import prompt_statistics

    config = AnalysisConfig(betas=tuple(betas), best_of_n=False)
    plan = config.plan(["r"])
    builders = {name: TableBuilder(name) for name in ("frontier", "convergence", "bon")}
    rows = PromptRows(builders, plan, convergence=True, best_of_n=False)
    for p, values in enumerate(rewards):
        samples = PromptSamples(f"p{p:03d}", np.arange(values.size), {"r": values})
        rows.add(samples.prompt_id, prompt_statistics(samples, plan, np.asarray(betas)))
    rows.flush()
    return {name: builders[name].table() for name in ("frontier", "convergence")}


def column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False)


def test_the_gate_judges_a_cell_of_alike_prompts_together_and_keeps_benign_cells():
    """Gaussian rewards, N = 1000: at beta = 0.5 sigma (k-hat ~0.67) a third to a half of the prompts
    pass their own test but none the pooled one; at beta = 1.5 sigma (k-hat ~0.17) all stay reliable."""
    rewards = np.random.default_rng(21).normal(size=(120, 1000))
    tables = ungated_tables(rewards, [0.5, 1.5])
    frontier = tables["frontier"]
    gated = pool_whole(frontier, "frontier")
    at = {beta: column(frontier, "beta") == beta for beta in (0.5, 1.5)}
    own, final = column(frontier, "reliable"), column(gated, "reliable")
    assert 0.2 < own[at[0.5]].mean() < 0.8 and not final[at[0.5]].any()
    assert final[at[1.5]].all()
    pooled = column(gated, "khat_pooled")
    assert np.ptp(pooled[at[0.5]]) < 0.05 and pooled[at[0.5]].min() >= POOLED_KHAT_LIMIT
    np.testing.assert_array_equal(column(frontier, "khat_pooled"), column(frontier, "khat"))  # before the gate
    assert np.isnan(column(gated, "gain_se")[~final]).all() and np.isnan(column(gated, "kl_se")[~final]).all()
    assert np.isfinite(column(gated, "gain_se")[final]).all()
    unchanged = [name for name in frontier.schema.names
                 if name not in ("reliable", "gain_se", "kl_se", "khat_pooled", "bias_allowance", "tie_bias_at_kl")]
    assert gated.select(unchanged).equals(frontier.select(unchanged))


def test_the_gate_of_parts_equals_the_gate_of_the_whole_table():
    """Sums of any split of the prompts, added, gate each part as the whole: the buckets' two passes."""
    rng = np.random.default_rng(22)
    rewards = np.concatenate([rng.normal(size=(40, 500)), 2 * rng.normal(size=(40, 500))])  # two kinds of prompt
    for name, table in ungated_tables(rewards, [0.4, 0.8, 2.0]).items():
        whole = pool_whole(table, name)
        owner = np.array([int(p[1:]) % 3 for p in column(table, "prompt_id")])
        parts = [table.filter(pa.array(owner == part)) for part in range(3)]
        sums = merge_khat_sums([khat_sums(part, name) for part in parts], name)
        gated = pa.concat_tables([apply_pooled(part, sums, name) for part in parts])
        gated, expected = (t.take(pc.sort_indices(t, [("prompt_id", "ascending")])) for t in (gated, whole))
        for field in whole.schema:
            if pa.types.is_string(field.type):
                assert gated[field.name].equals(expected[field.name])
            else:
                np.testing.assert_allclose(column(gated, field.name).astype(float), column(expected, field.name).astype(float),
                                           rtol=1e-12, equal_nan=True, err_msg=f"{name}.{field.name}")
        assert 0 < column(whole, "reliable").mean() < 1


def test_gating_in_slices_of_rows_changes_nothing(monkeypatch):
    """Tables longer than GATE_ROWS are summed and gated a slice at a time (slices cut through cells)."""
    import limits_ray.core.reliability as gate

    table = ungated_tables(np.random.default_rng(25).normal(size=(30, 300)), [0.5, 0.8, 1.5])["convergence"]
    whole = pool_whole(table, "convergence")
    monkeypatch.setattr(gate, "GATE_ROWS", 7)
    sliced = pool_whole(table, "convergence")
    assert table.num_rows > 50 * 7
    for field in whole.schema:  # the sums of slices add in another order: equal up to rounding
        if pa.types.is_floating(field.type):
            np.testing.assert_allclose(column(sliced, field.name), column(whole, field.name), rtol=1e-12, equal_nan=True)
        else:
            assert sliced[field.name].equals(whole[field.name]), field.name
    assert 0 < column(whole, "reliable").mean() < 1 and np.isfinite(column(whole, "khat_pooled")).any()


def test_small_or_missing_cells_are_not_pooled_and_keep_the_own_test():
    """Nine prompts at beta = 0.6 sigma (k-hat about 0.55): too few to pool, so the own test alone decides."""
    table = ungated_tables(np.random.default_rng(23).normal(size=(9, 400)), [0.6])["frontier"]
    assert (column(table, "reliable") & (column(table, "khat") >= POOLED_KHAT_LIMIT)).any()  # a 0.45 cut would bite
    for sums in (khat_sums(table, "frontier"), khat_sums(table.slice(0, 0), "frontier")):
        gated = apply_pooled(table, sums, "frontier")
        assert np.isnan(column(gated, "khat_pooled")).all()
        np.testing.assert_array_equal(column(gated, "reliable"), column(table, "reliable"))


def test_reported_intervals_cover_where_the_gate_says_reliable():
    """300 prompts of Gaussian rewards, N = 1000, per beta: coverage of ``gain_bc +- 1.96 gain_se`` (and of
    the KL) over the reliable prompts is at least 0.90, and the benign betas keep >= 95% of the prompts.

    Before the gate (own test only) beta = 0.5 sigma covered about 0.80 over its reliable half (the
    prompts whose sample missed the upper tail); bench/bench_coverage.py measures the full grid.
    """
    rng = np.random.default_rng(24)
    betas = [0.5, 0.6, 0.8, 1.0, 1.5]
    prompts = 300
    rewards = rng.normal(size=(prompts, 1000))
    table = pa.table({"prompt_id": np.repeat([f"p{p:03d}" for p in range(prompts)], 1000),
                      "sample_idx": np.tile(np.arange(1000), prompts), "r": rewards.reshape(-1)})
    frontier = reduce_table(table, ["r"], AnalysisConfig(betas=tuple(betas), best_of_n=False, convergence=False)).frontier
    beta, reliable = column(frontier, "beta"), column(frontier, "reliable")
    for b in betas:
        at = beta == b
        ok = at & reliable
        gain_cover = np.abs(column(frontier, "gain_bc")[ok] - gaussian_gain(1.0, b)) <= 1.96 * column(frontier, "gain_se")[ok]
        kl_cover = np.abs(column(frontier, "kl_bc")[ok] - gaussian_kl(1.0, b)) <= 1.96 * column(frontier, "kl_se")[ok]
        if ok.sum() >= 30:
            assert gain_cover.mean() >= 0.90 and kl_cover.mean() >= 0.90, (b, gain_cover.mean(), kl_cover.mean())
        if b >= 0.8:
            assert reliable[at].mean() >= 0.95, (b, reliable[at].mean())


def test_a_retried_gate_task_gates_the_same_shards_again(tmp_path):
    """The job retries a bucket's gate task (a lost worker): the second call must see the ungated shards
    and return the same sums, plot rows and shards as the first (pipeline.bucket_tasks.gate_shards)."""
    from limits_ray.core.frontier import mean_from_sums
    from limits_ray.pipeline.bucket_tasks import gate_shards, shard
    from limits_ray.storage.location import local_location

    tables = ungated_tables(np.random.default_rng(3).normal(size=(12, 200)), [0.5, 1.0, 2.0])
    scratch, output = local_location(tmp_path / "ungated"), local_location(tmp_path / "out")
    for name, table in tables.items():
        shard(scratch, name, 7).write_table(table)
    pooled = {name: khat_sums(table, name) for name, table in tables.items()}
    first_sums, first_rows = gate_shards(scratch, output, 7, pooled, plot_prompts=3)
    first_sums = first_sums["frontier"]
    first_shard = shard(output, "frontier", 7).read_table()
    again_sums, again_rows = gate_shards(scratch, output, 7, pooled, plot_prompts=3)
    again_sums = again_sums["frontier"]

    def assert_same(first: pa.Table, again: pa.Table) -> None:
        assert first.schema == again.schema and first.num_rows == again.num_rows > 0
        for name in first.column_names:  # NaN where a prompt has no interval: equal to itself here
            np.testing.assert_array_equal(column(first, name), column(again, name))

    assert first_sums.num_rows == 3
    assert_same(first_sums, again_sums)
    assert_same(mean_from_sums(first_sums), mean_from_sums(again_sums))
    for name in tables:  # the tables written ungated (frontier, convergence)
        assert_same(first_rows[name], again_rows[name])
    assert len(set(first_rows["frontier"]["prompt_id"].to_pylist())) == 3
    assert_same(shard(output, "frontier", 7).read_table(), first_shard)


def gate_fields(rewards: np.ndarray, betas: list[float]) -> dict[str, np.ndarray]:
    """The gate's per-row fields (limits_ray.core.reliability.ROW_FIELDS) of prompts ``rewards[p]``, ``[P, B]`` each."""
    from limits_ray.core.reliability import ROW_FIELDS
    from limits_ray.core.tilt import TiltStats, finalize_many

    prompts, size = rewards.shape
    betas = np.asarray(betas, float)
    estimate = finalize_many(TiltStats.from_segments(betas, rewards.reshape(-1, 1), np.arange(0, prompts * size + 1, size)))
    fields = {"n": np.full((prompts, betas.size), size), "beta": np.broadcast_to(betas, (prompts, betas.size))}
    for name in (field for field in ROW_FIELDS if field != "same"):
        if name in fields:
            continue
        value = np.asarray(getattr(estimate, name))
        value = value[:, :, 0] if value.ndim == 3 else value
        fields[name] = np.broadcast_to(value[:, None], (prompts, betas.size)) if value.ndim == 1 else value
    return fields


def test_tied_top_rewards_pass_only_where_no_prompt_of_the_cell_drew_a_higher_reward():
    """Scores 0, 1, 2 with the top level at 0.003: at beta 1 the prompts that never drew a 2 (tied top at 1,
    estimate many SEs low) are not reliable; those that did are. In a cell of 6 prompts ties never pass."""
    from limits_ray.core.reliability import gate_cells

    rng = np.random.default_rng(31)
    rewards = rng.choice([0.0, 1.0, 2.0], size=(60, 1000), p=[0.6, 0.397, 0.003])
    fields = gate_fields(rewards, [1.0])
    saw_top = rewards.max(axis=1) == 2.0
    assert fields["top_tied"][:, 0].all() and 0 < saw_top.mean() < 1
    own = fields["reliable"][:, 0]
    assert own[~saw_top].all()  # their own test passes: bounded, tied weights
    gate = gate_cells(fields)
    np.testing.assert_array_equal(gate.reliable[:, 0], own & saw_top)
    assert np.isinf(gate.bias_allowance[~saw_top, 0]).all()
    small = gate_cells({name: value[:6] for name, value in fields.items()})
    assert not small.reliable.any()


def test_a_bias_correction_as_large_as_the_error_or_a_zero_se_is_no_interval():
    """Bernoulli rewards at beta 0.15: the tilted mean saturates, the gain is a flat function of the count of
    ones and its delta SE tiny; where |gain_bc - gain| > gain_se_delta the row is not reliable. Constant rewards
    (se 0) never are."""
    from limits_ray.core.reliability import gate_cells

    rng = np.random.default_rng(32)
    rewards = (rng.random((40, 1000)) < 0.03).astype(float)
    rewards[0] = 0.0  # never drew a 1: constant, its top tied below the cell's
    fields = gate_fields(rewards, [0.15, 1.0])
    gate = gate_cells(fields)
    correction = np.abs(fields["gain_bc"] - fields["gain"]) / fields["gain_se_delta"]
    assert (correction[:, 0] > 1).any() and not gate.reliable[correction[:, 0] > 1, 0].any()
    assert not gate.reliable[0].any()
    assert gate.reliable[1:, 1].all()  # beta 1: benign


def test_a_heavier_minority_that_body_sd_does_not_set_apart_takes_the_cell_with_it():
    """270 Gaussian and 30 Laplace prompts of equal spread at beta 0.6 sigma: the minority's k-hats spread the
    cell, the shrinkage stops and the Gaussian prompts whose sample missed the tail would pass on their own
    k-hat; the cell's line (about 0.6 at their covariate) keeps all but the odd one at the edge of the covariate's
    range unreliable (bench/bench_coverage.py: 8% at 0.71 coverage before, 1% at 0.97 after). At beta 1.5 the
    cell passes."""
    from limits_ray.core.reliability import gate_cells, pooled_khat_of_cells

    rng = np.random.default_rng(33)
    rewards = np.concatenate([rng.normal(size=(270, 1000)), rng.laplace(scale=1 / np.sqrt(2), size=(30, 1000))])
    fields = gate_fields(rewards, [0.6, 1.5])
    covariate = fields["body_sd"] / fields["beta"]
    pooled_only = fields["reliable"] & ~(pooled_khat_of_cells(fields["khat"], fields["n"], covariate) >= POOLED_KHAT_LIMIT)
    gate = gate_cells(fields)
    assert pooled_only[:270, 0].sum() >= 10 * max(gate.reliable[:, 0].sum(), 1)  # the rule before passed 10x as many
    assert gate.reliable[:, 0].mean() <= 0.01 and gate.reliable[:270, 1].mean() >= 0.95


def test_bias_allowances_by_why_a_row_is_not_reliable():
    """Identical Gaussian prompts at beta 0.8: the few that fail only their own test (they drew the tail) are
    ordinary members of a benign cell (allowance 0); at beta 0.5 the cell's k-hat fails: no row is bounded,
    whether its own test passes (those are the prompts whose sample missed the tail) or not."""
    from limits_ray.core.reliability import gate_cells

    rewards = np.random.default_rng(34).normal(size=(300, 1000))
    fields = gate_fields(rewards, [0.5, 0.8])
    gate = gate_cells(fields)
    own = fields["reliable"]
    assert (~own[:, 1]).any() and (gate.bias_allowance[:, 1] == 0).all()
    assert not gate.reliable[:, 0].any()
    assert own[:, 0].any() and np.isinf(gate.bias_allowance[:, 0]).all()


def test_the_tie_bound_is_the_largest_change_from_mass_the_sample_missed():
    """tie_bound against brute force: every mass u <= TIE_MASS/N put at any level between the sample's top (9)
    and the cell's (10), on a sample of nine levels, renormalised; the exact changes of the tilt's KL and
    gain (in their SEs) and of the tangent's intercept gain - beta KL (the frontier at a fixed KL) never
    exceed their bounds and reach them."""
    from limits_ray.core.reliability import TIE_MASS, tie_bound

    rng = np.random.default_rng(33)
    levels, size, kl_se, gain_se = np.arange(1.0, 10.0), 500, 0.01, 0.03
    for beta in (0.2, 0.5, 1.0, 2.0, 5.0, 20.0):
        empirical = rng.multinomial(size, rng.dirichlet(np.ones(levels.size))) / size
        weights = empirical * np.exp(levels / beta)
        log_z = np.log(weights.sum())
        kl = (weights * levels).sum() / weights.sum() / beta - log_z
        gain = (weights * levels).sum() / weights.sum() - (empirical * levels).sum()
        intercept = gain - beta * kl  # the tangent's intercept, beta log Z - mean(r)
        worst = worst_intercept = 0.0
        for mass in np.linspace(1e-6, TIE_MASS / size, 120):
            for top in (9.0 + 1e-9, 9.25, 9.5, 9.75, 10.0):
                base = np.append(empirical, mass) / (1 + mass)
                values = np.append(levels, top)
                tilted = base * np.exp(values / beta)
                new_kl = (tilted * values).sum() / tilted.sum() / beta - np.log(tilted.sum())
                new_gain = (tilted * values).sum() / tilted.sum() - (base * values).sum()
                worst = max(worst, abs(new_kl - kl) / kl_se, abs(new_gain - gain) / gain_se)
                worst_intercept = max(worst_intercept, abs(new_gain - beta * new_kl - intercept))
        bound, at_kl = (float(value) for value in tie_bound(size, beta, log_z, kl, 10.0, kl_se, gain, gain_se, 9.0))
        assert worst <= bound * (1 + 1e-6) and worst >= 0.99 * bound, (beta, worst, bound)
        assert worst_intercept <= at_kl * (1 + 1e-6) + 1e-15 and worst_intercept >= 0.99 * at_kl, (beta, worst_intercept, at_kl)


def test_a_tied_top_below_the_cells_passes_where_the_tilt_hardly_sees_the_missed_level():
    """Scores 0..4 (top level at 0.002): at beta 0.3 the prompts that never drew a 4 are not reliable (the top
    level dominates the tilt); at beta 20 the level they missed moves their tilt by a small fraction of its SE,
    so they pass with that bound as their bias allowance (and intervals widened by it), and their KL
    (bias-corrected) lies within allowance + 2 SE of the exact one."""
    from limits_ray.core.exact import finite_tilt
    from limits_ray.core.reliability import gate_cells

    rng = np.random.default_rng(34)
    probabilities, levels = np.array([0.2, 0.3, 0.3, 0.198, 0.002]), np.arange(5.0)
    rewards = rng.choice(levels, size=(60, 1000), p=probabilities)
    fields = gate_fields(rewards, [0.3, 20.0])
    missed = rewards.max(axis=1) < 4.0
    assert missed.sum() >= 4
    gate = gate_cells(fields)
    assert not gate.reliable[missed, 0].any() and np.isinf(gate.bias_allowance[missed, 0]).all()
    assert gate.reliable[missed, 1].all()
    allowance = gate.bias_allowance[missed, 1]
    assert (allowance > 0).all() and (allowance < 0.5).all()
    assert (gate.bias_allowance[~missed & gate.reliable[:, 1], 1] == 0).all()
    exact = finite_tilt(probabilities, levels, levels, 20.0).kl
    error = np.abs(fields["kl_bc"][missed, 1] - exact) / fields["kl_se_delta"][missed, 1]
    assert (error <= allowance + 2.0).mean() >= 0.75
