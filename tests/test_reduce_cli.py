"""Tests of limits_ray.core.tables and the ``limits-ray`` CLI, run in-process on small Parquet files."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from limits_ray.cli import main
from limits_ray.core.bon import best_of_n
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tilt import TiltStats

OUTPUTS = ("frontier", "frontier_mean", "bon", "convergence")


def write_samples(path, prompts: int = 3, n: int = 20, seed: int = 0, sigma: float = 1.0, **extra) -> pa.Table:
    """Scored samples: rewards a, b (float64), gold (float32), shuffled rows; extra columns appended."""
    rng = np.random.default_rng(seed)
    rows = prompts * n
    table = pa.table({
        "prompt_id": pa.array([f"prompt-{p}" for p in range(prompts) for _ in range(n)], pa.string()),
        "sample_idx": pa.array(np.tile(np.arange(n), prompts), pa.int64()),
        "a": rng.normal(0.0, sigma, rows),
        "b": rng.normal(1.0, sigma, rows),
        "gold": pa.array(rng.normal(size=rows), pa.float32()),
        **extra,
    })
    table = table.take(rng.permutation(rows))
    pq.write_table(table, path)
    return table


def read_outputs(out) -> dict[str, pa.Table]:
    tables = {name: pq.read_table(out / f"{name}.parquet") for name in OUTPUTS}
    for name, table in tables.items():
        assert table.schema.names == SCHEMAS[name].names, name  # exactly the contract columns
        assert table.schema.equals(SCHEMAS[name]), name
    return tables


def rewards_of(table: pa.Table, prompt: str, sample_order: bool = True) -> dict[str, np.ndarray]:
    rows = table.filter(pc.equal(table["prompt_id"], prompt))
    order = np.argsort(rows["sample_idx"].to_numpy()) if sample_order else slice(None)
    return {name: rows[name].to_numpy().astype(np.float64)[order] for name in ("a", "b", "gold") if name in rows.column_names}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------
# the output contract
# ----------------------------------------------------------------------------------------------

def test_reduce_writes_the_four_tables(tmp_path, capsys):
    samples = write_samples(tmp_path / "s.parquet", prompts=3, n=20)
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", out, "--betas", "0.5,2")
    assert code == 0
    for name in OUTPUTS:
        assert str(out / f"{name}.parquet") in stdout
    tables = read_outputs(out)
    frontier = tables["frontier"]
    rewards = ["a", "b", "gold"]
    assert frontier.num_rows == 3 * len(rewards) * 2  # prompts x (align = eval = each reward) x betas
    assert set(frontier["align"].to_pylist()) == set(rewards)
    assert frontier["align"].to_pylist() == frontier["eval"].to_pylist()
    assert set(frontier["n"].to_pylist()) == {20}
    assert sorted(set(frontier["beta"].to_pylist())) == [0.5, 2.0]
    # per-prompt values are TiltStats of that prompt's rewards
    for row in frontier.to_pylist():
        r = rewards_of(samples, row["prompt_id"])[row["align"]]
        est = TiltStats.from_samples(np.array([row["beta"]]), r[:, None]).finalize()
        assert row["gain"] == pytest.approx(est.gain[0, 0], rel=1e-12, abs=1e-14)
        assert row["kl"] == pytest.approx(est.kl[0], rel=1e-12, abs=1e-14)
        assert row["gain_se"] == pytest.approx(est.gain_se[0, 0], rel=1e-10, nan_ok=True)
        assert row["kl_se"] == pytest.approx(est.kl_se[0], rel=1e-10, nan_ok=True)
        assert row["ess"] == pytest.approx(est.ess[0], rel=1e-12)
        assert row["gain_bc"] == pytest.approx(est.gain_bc[0, 0], rel=1e-12, abs=1e-14)
        assert row["kl_bc"] == pytest.approx(est.kl_bc[0], rel=1e-12, abs=1e-14)
        assert row["khat"] == est.khat[0] == np.inf  # N = 20: a tail of M = 4 weights cannot be fitted
        assert row["reliable"] is False and math.isnan(row["gain_se"])
    mean = tables["frontier_mean"]
    assert mean.num_rows == len(rewards) * 2 and set(mean["prompts"].to_pylist()) == {3}
    for row in mean.to_pylist():
        group = [r for r in frontier.to_pylist() if (r["align"], r["eval"], r["beta"]) == (row["align"], row["eval"], row["beta"])]
        assert row["gain"] == pytest.approx(np.mean([g["gain_bc"] for g in group]), rel=1e-12)  # the centre
        assert row["gain_plugin"] == pytest.approx(np.mean([g["gain"] for g in group]), rel=1e-12)
        assert row["reliable"] == 0.0
        assert math.isnan(row["kl_se"]) and math.isnan(row["gain_se"])  # N = 20: no prompt's variance is bounded
    # best-of-n: n = 1, 2, 4, 8, 16 for N = 20, the values of best_of_n
    bon = tables["bon"]
    assert sorted(set(bon["n"].to_pylist())) == [1, 2, 4, 8, 16]
    for row in bon.to_pylist():
        r = rewards_of(samples, row["prompt_id"])[row["align"]]
        want = best_of_n(r, r, sizes=np.array([row["n"]]))
        assert row["reward"] == pytest.approx(want.reward[0, 0], rel=1e-12)
        assert row["gain"] == pytest.approx(want.gain[0, 0], rel=1e-12, abs=1e-13)
        assert row["kl"] == pytest.approx(want.kl[0], rel=1e-12, abs=1e-15)
        assert row["reward_se"] == pytest.approx(want.reward_se[0, 0], rel=1e-12, nan_ok=True)
        assert row["gain_se"] == pytest.approx(want.gain_se[0, 0], rel=1e-12, abs=1e-14, nan_ok=True)
        assert math.isnan(row["reward_se"]) == (row["n"] > 20 / 16)  # the jackknife's SE up to n = N/16 only
    # convergence: N = 1, 2, 4, 8, 16, 20 per prompt; the first 2^k samples by sample_idx
    convergence = tables["convergence"]
    assert sorted(set(convergence["n_samples"].to_pylist())) == [1, 2, 4, 8, 16, 20]
    for row in convergence.to_pylist():
        r = rewards_of(samples, row["prompt_id"])[row["align"]][: row["n_samples"]]
        est = TiltStats.from_samples(np.array([row["beta"]]), r[:, None]).finalize()
        assert row["gain"] == pytest.approx(est.gain[0, 0], rel=1e-12, abs=1e-13)
        assert row["kl"] == pytest.approx(est.kl[0], rel=1e-12, abs=1e-13)
    last = [r for r in convergence.to_pylist() if r["n_samples"] == 20]
    by_key = {(r["prompt_id"], r["align"], r["beta"]): r for r in frontier.to_pylist()}
    for row in last:
        assert row["gain"] == pytest.approx(by_key[(row["prompt_id"], row["align"], row["beta"])]["gain"], rel=1e-12, abs=1e-13)


def test_directory_of_files_gives_the_same_result_as_one_file(tmp_path, capsys):
    table = write_samples(tmp_path / "one.parquet", prompts=4, n=16, seed=1)
    parts = tmp_path / "parts"
    parts.mkdir()
    for k, start in enumerate(range(0, table.num_rows, 17)):
        pq.write_table(table.slice(start, 17), parts / f"part-{k:03d}.parquet")
    assert run(capsys, "reduce", "--samples", tmp_path / "one.parquet", "--out", tmp_path / "o1", "--betas", "0.3,3")[0] == 0
    assert run(capsys, "reduce", "--samples", parts, "--out", tmp_path / "o2", "--betas", "0.3,3")[0] == 0
    one, two = read_outputs(tmp_path / "o1"), read_outputs(tmp_path / "o2")
    for name in OUTPUTS:
        left = one[name].sort_by([(c, "ascending") for c in one[name].column_names[:5]])
        right = two[name].sort_by([(c, "ascending") for c in two[name].column_names[:5]])
        assert left.num_rows == right.num_rows > 0
        for column in left.column_names:
            a, b = left[column].to_pylist(), right[column].to_pylist()
            if isinstance(a[0], float):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
            else:
                assert a == b


def test_small_buckets_give_the_same_tables_and_the_output_names_its_shards(tmp_path, capsys):
    write_samples(tmp_path / "s.parquet", prompts=9, n=16, seed=3)
    code, stdout, _ = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o1", "--betas", "0.5,2")
    assert code == 0 and "read as 1 bucket(s)" in stdout and "reduced 9 prompt(s), 144 sample(s)" in stdout
    code, stdout, _ = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o2", "--betas", "0.5,2",
                          "--bucket-rows", "40")
    assert code == 0 and "spilled into" in stdout
    buckets = len(list((tmp_path / "o2" / "frontier.parquet").iterdir()))
    assert buckets > 1 and f"wrote {tmp_path / 'o2' / 'frontier.parquet'} ({buckets} shard(s))" in stdout
    assert f"wrote {tmp_path / 'o2' / 'frontier_mean.parquet'}\n" in stdout
    one, two = read_outputs(tmp_path / "o1"), read_outputs(tmp_path / "o2")
    for name in OUTPUTS:
        keys = [(c, "ascending") for c in one[name].column_names[:5]]
        left, right = one[name].sort_by(keys), two[name].sort_by(keys)
        assert left.num_rows == right.num_rows > 0
        for column in left.column_names:
            if pa.types.is_floating(left[column].type):
                np.testing.assert_allclose(left[column].to_numpy(), right[column].to_numpy(), rtol=1e-12, atol=0)
            else:
                assert left[column].to_pylist() == right[column].to_pylist()


def test_non_float_columns_are_ignored_and_rewards_select(tmp_path, capsys):
    rows = 2 * 8
    write_samples(tmp_path / "s.parquet", prompts=2, n=8,
                  response=pa.array(["text"] * rows), tokens=pa.array(np.arange(rows), pa.int64()),
                  flag=pa.array([True] * rows), logprob=pa.array([math.nan] * rows))  # the store's, logprobs off
    assert run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "all", "--betas", "1")[0] == 0
    assert set(read_outputs(tmp_path / "all")["frontier"]["align"].to_pylist()) == {"a", "b", "gold"}  # no logprob
    code, _, _ = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "some",
                     "--betas", "1", "--rewards", "gold,b")
    assert code == 0
    tables = read_outputs(tmp_path / "some")
    for name in OUTPUTS:
        assert set(tables[name]["align"].to_pylist()) == {"b", "gold"}, name


def test_ensemble_alignment_and_gold_evaluation(tmp_path, capsys):
    samples = write_samples(tmp_path / "s.parquet", prompts=2, n=32, seed=3)
    code, _, _ = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o", "--betas", "0.5,2",
                     "--align", "mean(a,b)", "--align", "a", "--eval", "gold", "--eval", "a")
    assert code == 0
    tables = read_outputs(tmp_path / "o")
    pairs = set(zip(tables["frontier"]["align"].to_pylist(), tables["frontier"]["eval"].to_pylist()))
    assert pairs == {("mean(a,b)", "gold"), ("mean(a,b)", "a"), ("a", "gold"), ("a", "a")}
    for row in tables["frontier"].to_pylist():
        rewards = rewards_of(samples, row["prompt_id"])
        align = (rewards["a"] + rewards["b"]) / 2 if row["align"] == "mean(a,b)" else rewards["a"]
        est = TiltStats.from_samples(np.array([row["beta"]]), np.column_stack([align, rewards[row["eval"]]])).finalize()
        assert row["gain"] == pytest.approx(est.gain[0, 1], rel=1e-12, abs=1e-14)
        assert row["kl"] == pytest.approx(est.kl[0], rel=1e-12, abs=1e-14)
    for row in tables["bon"].to_pylist():
        rewards = rewards_of(samples, row["prompt_id"])
        align = (rewards["a"] + rewards["b"]) / 2 if row["align"] == "mean(a,b)" else rewards["a"]
        want = best_of_n(align, rewards[row["eval"]], sizes=np.array([row["n"]]))
        assert row["reward"] == pytest.approx(want.reward[0, 0], rel=1e-12, abs=1e-14)


def test_no_bon_and_no_convergence_write_empty_tables(tmp_path, capsys):
    write_samples(tmp_path / "s.parquet", prompts=2, n=8)
    code, _, _ = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o", "--betas", "1",
                     "--no-bon", "--no-convergence")
    assert code == 0
    tables = read_outputs(tmp_path / "o")
    assert tables["bon"].num_rows == 0 and tables["convergence"].num_rows == 0
    assert tables["frontier"].num_rows == 2 * 3


def test_gaussian_end_to_end_matches_sigma2_over_beta(tmp_path, capsys):
    sigma, prompts, n = 1.3, 6, 4000
    write_samples(tmp_path / "s.parquet", prompts=prompts, n=n, seed=5, sigma=sigma)
    code, _, _ = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o",
                     "--betas", "1.5,3,10", "--rewards", "a", "--no-bon", "--no-convergence")
    assert code == 0
    mean = read_outputs(tmp_path / "o")["frontier_mean"].to_pylist()
    assert [row["beta"] for row in mean] == [1.5, 3.0, 10.0]
    for row in mean:
        assert row["prompts"] == prompts
        assert abs(row["gain"] - sigma**2 / row["beta"]) <= 4 * row["gain_se"], row
        assert abs(row["kl"] - sigma**2 / (2 * row["beta"] ** 2)) <= 4 * row["kl_se"], row
        assert 0 < row["gain_se"] < 0.1 * sigma**2 / row["beta"]
    # and the query answers at a KL budget inside the grid
    budget = sigma**2 / (2 * 3.0**2)
    code, stdout, _ = run(capsys, "query", tmp_path / "o", "--kl", str(budget))
    assert code == 0
    header, line = stdout.splitlines()[0], [l for l in stdout.splitlines() if l.startswith("a ")][0]
    assert "95% interval" in header
    kl, beta, gain = (float(v) for v in line.split()[2:5])
    low, high = (float(v) for v in line.split("[")[1].split("]")[0].split(","))
    assert kl == pytest.approx(budget, rel=1e-3)
    assert beta == pytest.approx(3.0, rel=0.1) and gain == pytest.approx(sigma**2 / 3.0, rel=0.1)
    # the 95% interval at that fixed KL: centred on the gain, and holding the exact sigma sqrt(2 K) here
    at_kl = read_outputs(tmp_path / "o")["frontier_mean"].to_pylist()[1]["gain_se_at_kl"]
    assert (low + high) / 2 == pytest.approx(gain, rel=1e-3) and (high - low) / 2 == pytest.approx(1.96 * at_kl, rel=0.05)
    assert low <= sigma * math.sqrt(2 * budget) <= high


# ----------------------------------------------------------------------------------------------
# bad input: exit status 2 and a message naming the problem
# ----------------------------------------------------------------------------------------------

def test_missing_column(tmp_path, capsys):
    write_samples(tmp_path / "s.parquet")
    pq.write_table(pq.read_table(tmp_path / "s.parquet").drop_columns(["sample_idx"]), tmp_path / "s.parquet")
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o")
    assert code == 2 and "sample_idx" in err and "missing column" in err
    assert not (tmp_path / "o").exists()


def test_missing_requested_reward(tmp_path, capsys):
    write_samples(tmp_path / "s.parquet")
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o", "--rewards", "a,zz")
    assert code == 2 and "zz" in err


def test_nan_reward_names_prompt_and_column(tmp_path, capsys):
    table = write_samples(tmp_path / "s.parquet", prompts=3, n=6)
    b = table["b"].to_numpy().copy()
    target = np.flatnonzero((table["prompt_id"].to_numpy(zero_copy_only=False) == "prompt-2"))[0]
    b[target] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("b"), "b", pa.array(b)), tmp_path / "s.parquet")
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o")
    assert code == 2
    assert "'prompt-2'" in err and "'b'" in err and "NaN" in err
    # leaving the column out works
    assert run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o", "--rewards", "a,gold",
               "--betas", "1")[0] == 0


@pytest.mark.parametrize("betas", ["0,1", "-1", "1,-0.5", "0:1:5"])
def test_non_positive_beta(tmp_path, capsys, betas):
    write_samples(tmp_path / "s.parquet")
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o", f"--betas={betas}")
    assert code == 2 and "beta" in err and "error" in err


def test_duplicated_sample(tmp_path, capsys):
    table = write_samples(tmp_path / "s.parquet", prompts=2, n=5)
    duplicate = table.filter(pc.and_(pc.equal(table["prompt_id"], "prompt-1"),
                                             pc.equal(table["sample_idx"], 3)))
    pq.write_table(pa.concat_tables([table, duplicate]), tmp_path / "s.parquet")
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o")
    assert code == 2 and "duplicated" in err and "('prompt-1', 3)" in err


def test_empty_input(tmp_path, capsys):
    table = write_samples(tmp_path / "s.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "s.parquet")
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o")
    assert code == 2 and "no rows" in err
    (tmp_path / "empty_dir").mkdir()
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "empty_dir", "--out", tmp_path / "o")
    assert code == 2 and "no Parquet files" in err


def test_nonexistent_path(tmp_path, capsys):
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "nowhere.parquet", "--out", tmp_path / "o")
    assert code == 2 and "nowhere.parquet" in err and "no such file" in err


def test_unknown_align_column(tmp_path, capsys):
    write_samples(tmp_path / "s.parquet")
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o",
                       "--align", "mean(a,zz)")
    assert code == 2 and "zz" in err
    code, _, err = run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o",
                       "--align", "max(a,b)")
    assert code == 2 and "max(a,b)" in err


def test_query_errors(tmp_path, capsys):
    code, _, err = run(capsys, "query", tmp_path / "nothing", "--kl", "0.1")
    assert code == 2 and "frontier_mean.parquet" in err
    write_samples(tmp_path / "s.parquet", prompts=2, n=50)
    assert run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o", "--betas", "1,10",
               "--rewards", "a", "--no-bon", "--no-convergence")[0] == 0
    code, _, err = run(capsys, "query", tmp_path / "o", "--kl", "1000")
    assert code == 2 and "outside" in err


def test_query_warns_when_the_budget_lies_outside_the_trusted_range(tmp_path, capsys):
    """Gaussian rewards, N = 400: beta = 0.05 sigma is unreliable for every prompt, beta >= 1 reliable."""
    rng = np.random.default_rng(4)
    prompts, n = 4, 400
    pq.write_table(pa.table({
        "prompt_id": np.repeat([f"p{i}" for i in range(prompts)], n), "sample_idx": np.tile(np.arange(n), prompts),
        "a": rng.normal(size=prompts * n),
    }), tmp_path / "s.parquet")
    assert run(capsys, "reduce", "--samples", tmp_path / "s.parquet", "--out", tmp_path / "o", "--betas", "0.05,1,2,3",
               "--no-bon", "--no-convergence")[0] == 0
    code, stdout, err = run(capsys, "query", tmp_path / "o", "--kl", "0.1,3")
    assert code == 0
    lines = [line.split() for line in stdout.splitlines() if line.startswith("a ")]
    assert [line[-1] for line in lines] == ["yes", "NO"]
    assert "warning" in err and "KL 3 lies outside the trusted KL range" in err and "sample more" in err


def test_streamed_rounds_give_the_offline_reduce_values_reliability_included():
    """The job's path (per-round statistics, serialised, merged in any order into a bucket's MergedBucket,
    rows from the merged statistics) and the offline reduce give the same tables: khat and reliable
    exactly, the floats to rounding."""
    from limits_ray.core.analysis import AnalysisConfig
    from limits_ray.core.dyadic import DyadicStats
    from limits_ray.core.reliability import pool_whole
    from limits_ray.core.samples import iter_prompts
    from limits_ray.core.tables import PromptRows, TableBuilder, prompt_statistics, reduce_table
    from limits_ray.storage.sample_store import MergedBucket

    rng = np.random.default_rng(12)
    prompts, n = 3, 600
    table = pa.table({
        "prompt_id": np.repeat([f"p{i}" for i in range(prompts)], n), "sample_idx": np.tile(np.arange(n), prompts),
        "a": rng.normal(size=prompts * n), "b": rng.exponential(size=prompts * n),
    })
    config = AnalysisConfig(betas="0.2:20:7", best_of_n=False)
    offline = reduce_table(table, ["a", "b"], config)
    plan, betas = config.plan(["a", "b"]), np.asarray(config.betas)
    rounds = []
    for samples in iter_prompts(table, ["a", "b"]):
        for index, chunk in enumerate(np.array_split(rng.permutation(n), 5)):
            statistics = prompt_statistics(samples.subset(np.isin(np.arange(n), chunk)), plan, betas)
            rounds.append((samples.prompt_id, index, {k: DyadicStats.from_bytes(v.to_bytes()) for k, v in statistics.items()}))
    merged = MergedBucket({}, {}, set())
    for position in rng.permutation(len(rounds)):
        assert merged.add(*rounds[position])
    assert not merged.add(*rounds[0])  # a replayed round is merged once
    builders = {name: TableBuilder(name) for name in ("frontier", "convergence", "bon")}
    rows = PromptRows(builders, plan, best_of_n=False)
    for prompt_id in sorted(merged.statistics):
        rows.add(prompt_id, merged.statistics[prompt_id])
    rows.flush()
    for name in ("frontier", "convergence"):
        got, want = pool_whole(builders[name].table(), name), getattr(offline, name)
        assert got.schema == want.schema and got.num_rows == want.num_rows
        for column in ("khat", "reliable", "n" if name == "frontier" else "n_samples"):
            np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
        for column in [f.name for f in SCHEMAS[name] if f.type == pa.float64()]:
            np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-9, atol=1e-12)
    assert 0 < offline.frontier["reliable"].to_numpy().mean() < 1  # both kinds of cell are compared


def test_prompt_rows_give_the_same_tables_in_any_batch_size_and_refuse_an_empty_prompt(monkeypatch):
    """Estimates are finalized a batch of prompts at a time: batch boundaries change no row and no order."""
    import limits_ray.core.tables as reduce
    from limits_ray.core.analysis import AnalysisConfig
    from limits_ray.core.dyadic import DyadicStats

    rng = np.random.default_rng(3)
    sizes = [1, 20, 64, 100, 700]  # k-hat inf (n <= 20), fitted, a tail cut by N
    table = pa.table({
        "prompt_id": np.repeat([f"p{i}" for i in range(len(sizes))], sizes),
        "sample_idx": np.concatenate([np.arange(n) for n in sizes]),
        "a": rng.standard_t(3, sum(sizes)), "b": rng.integers(0, 4, sum(sizes)).astype(float),
    })
    config = AnalysisConfig(betas="0.1:10:5")
    whole = reduce.reduce_table(table, ["a", "b"], config)
    monkeypatch.setattr(reduce, "PROMPT_BATCH", 2)
    batched = reduce.reduce_table(table, ["a", "b"], config)
    for name in ("frontier", "convergence", "bon", "frontier_mean"):
        got, want = getattr(batched, name), getattr(whole, name)
        assert got.schema == want.schema and got.num_rows == want.num_rows > 0, name
        for column in got.column_names:
            x, y = got[column].to_numpy(zero_copy_only=False), want[column].to_numpy(zero_copy_only=False)
            if x.dtype.kind == "f":  # the padded tail sums of a batch may round differently
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15, err_msg=f"{name}.{column}")
            else:
                assert (x == y).all(), f"{name}.{column}"
    rows = reduce.PromptRows({name: reduce.TableBuilder(name) for name in ("frontier", "convergence", "bon")},
                             config.plan(["a", "b"]), best_of_n=False)
    empty = {align.name: DyadicStats(np.asarray(config.betas), 2) for align, _ in config.plan(["a", "b"])}
    with pytest.raises(ValueError, match="prompt 'x': no samples"):
        rows.add("x", empty)
