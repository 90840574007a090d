"""Tests of limits_ray.storage.sample_io: reading and validating scored samples, splitting prompts, writing tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from limits_ray.core.errors import InputError
from limits_ray.core.samples import iter_prompts
from limits_ray.core.schemas import SCHEMAS
from limits_ray.storage.sample_io import open_samples, read_samples, validate_samples, write_table


def samples_table(prompts=("p0", "p1"), n=5, seed=0, **extra) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = len(prompts) * n
    columns = {
        "prompt_id": pa.array([p for p in prompts for _ in range(n)], pa.string()),
        "sample_idx": pa.array(np.tile(np.arange(n), len(prompts)), pa.int64()),
        "gold": pa.array(rng.normal(size=rows), pa.float64()),
        "proxy": pa.array(rng.normal(size=rows), pa.float32()),
    }
    columns.update(extra)
    return pa.table(columns)


def test_contract_schemas():
    assert SCHEMAS["frontier"].names == [
        "prompt_id", "align", "eval", "beta", "n", "gain", "gain_se", "kl", "kl_se", "ess", "gain_bc", "kl_bc",
        "gain_se_delta", "kl_se_delta", "gain_kl_cov", "gain_dbeta", "kl_dbeta", "khat", "body_sd", "reward_max",
        "top_tied", "log_z", "khat_pooled", "reliable", "bias_allowance", "tie_bias_at_kl", "gain_drift", "kl_drift"]
    assert SCHEMAS["frontier_mean"].names == [
        "align", "eval", "beta", "prompts", "gain", "gain_se", "kl", "kl_se", "gain_spread_se", "kl_spread_se",
        "gain_plugin", "kl_plugin", "reliable", "slope", "kl_dbeta", "gain_se_at_kl"]
    assert SCHEMAS["bon"].names == ["prompt_id", "align", "eval", "n", "reward", "gain", "kl", "reward_se", "gain_se",
                                    "winrate", "winrate_se"]
    assert SCHEMAS["convergence"].names == [
        "prompt_id", "align", "eval", "beta", "n_samples", "gain", "gain_se", "kl", "kl_se", "ess", "gain_bc", "kl_bc",
        "gain_se_delta", "kl_se_delta", "khat", "body_sd", "reward_max", "top_tied", "log_z", "khat_pooled", "reliable",
        "bias_allowance", "tie_bias_at_kl", "gain_drift", "kl_drift"]
    assert SCHEMAS["frontier"].field("reliable").type == pa.bool_()
    assert SCHEMAS["frontier_mean"].field("reliable").type == pa.float64()
    assert SCHEMAS["frontier"].field("n").type == pa.int64()
    assert SCHEMAS["frontier_mean"].field("prompts").type == pa.int64()
    assert SCHEMAS["bon"].field("n").type == pa.int64()
    assert SCHEMAS["convergence"].field("n_samples").type == pa.int64()


def test_read_samples_sorts_casts_and_finds_float_columns(tmp_path):
    table = samples_table(tokens=pa.array(np.arange(10), pa.int32()), response=pa.array(["x"] * 10))
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))
    pq.write_table(shuffled, tmp_path / "s.parquet")
    result, columns = read_samples(tmp_path / "s.parquet")
    assert columns == ["gold", "proxy"]  # the int and string columns are not rewards
    assert result.column_names == ["prompt_id", "sample_idx", "gold", "proxy"]
    assert result["proxy"].type == pa.float64()
    keys = list(zip(result["prompt_id"].to_pylist(), result["sample_idx"].to_pylist()))
    assert keys == sorted(keys)
    # rows kept together: the gold value of (p1, 3) is the original one
    original = {(p, i): g for p, i, g in zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist(),
                                             table["gold"].to_pylist())}
    assert all(original[k] == g for k, g in zip(keys, result["gold"].to_pylist()))


def test_read_samples_casts_keys(tmp_path):
    table = samples_table().set_column(0, "prompt_id", pa.array([7] * 5 + [8] * 5, pa.int64()))
    table = table.set_column(1, "sample_idx", pa.array(list(range(5)) * 2, pa.int32()))
    pq.write_table(table, tmp_path / "s.parquet")
    result, _ = read_samples(tmp_path / "s.parquet")
    assert result["prompt_id"].type == pa.string() and result["sample_idx"].type == pa.int64()
    assert result["prompt_id"].to_pylist()[:1] == ["7"]


def test_read_samples_picks_requested_rewards(tmp_path):
    table = samples_table(bad=pa.array([np.nan] * 10))  # NaN only in a column left out
    pq.write_table(table, tmp_path / "s.parquet")
    result, columns = read_samples(tmp_path / "s.parquet", rewards=("proxy",))
    assert columns == ["proxy"]
    assert result.column_names == ["prompt_id", "sample_idx", "proxy"]


def test_read_samples_from_a_directory(tmp_path):
    table = samples_table(prompts=("a", "b", "c"), n=4)
    pq.write_table(table.slice(0, 5), tmp_path / "part-0.parquet")
    pq.write_table(table.slice(5, 7), tmp_path / "part-1.parquet")
    result, _ = read_samples(tmp_path)
    assert result.num_rows == 12
    assert sorted(result["gold"].to_pylist()) == sorted(table["gold"].to_pylist())


@pytest.mark.parametrize("problem, message", [
    ("missing_column", "missing column"),
    ("nan", "NaN"),
    ("inf", "NaN/infinite"),
    ("duplicate", "duplicated"),
    ("negative_idx", "sample_idx"),
    ("null_prompt", "null"),
    ("empty", "no rows"),
    ("not_float", "not float"),
    ("no_float_column", "no float reward column"),
])
def test_read_samples_rejects_bad_input(tmp_path, problem, message):
    table, rewards = samples_table(), ()
    if problem == "missing_column":
        table = table.drop_columns(["sample_idx"])
    elif problem in ("nan", "inf"):
        gold = table["gold"].to_numpy().copy()
        gold[7] = np.nan if problem == "nan" else -np.inf
        table = table.set_column(2, "gold", pa.array(gold))
    elif problem == "duplicate":
        table = pa.concat_tables([table, table.slice(3, 1)])
    elif problem == "negative_idx":
        table = table.set_column(1, "sample_idx", pa.array([-1] + list(range(1, 10)), pa.int64()))
    elif problem == "null_prompt":
        table = table.set_column(0, "prompt_id", pa.array([None] + ["p"] * 9, pa.string()))
    elif problem == "empty":
        table = table.slice(0, 0)
    elif problem == "not_float":
        table, rewards = samples_table(tokens=pa.array(np.arange(10))), ("gold", "tokens")
    elif problem == "no_float_column":
        table = table.drop_columns(["gold", "proxy"])
    path = tmp_path / "s.parquet"
    pq.write_table(table, path)
    with pytest.raises(InputError, match=message) as error:
        read_samples(path, rewards)
    assert str(path) in str(error.value)


def test_nan_message_names_prompt_sample_and_column(tmp_path):
    table = samples_table(prompts=("alpha", "beta"), n=5)
    proxy = table["proxy"].to_numpy().copy()
    proxy[6] = np.nan  # prompt beta, sample 1
    pq.write_table(table.set_column(3, "proxy", pa.array(proxy, pa.float32())), tmp_path / "s.parquet")
    with pytest.raises(InputError) as error:
        read_samples(tmp_path / "s.parquet")
    assert "'proxy'" in str(error.value) and "'beta'" in str(error.value) and "sample_idx=1" in str(error.value)


def test_missing_requested_column_is_named(tmp_path):
    pq.write_table(samples_table(), tmp_path / "s.parquet")
    with pytest.raises(InputError, match="rm_zz"):
        read_samples(tmp_path / "s.parquet", rewards=("gold", "rm_zz"))


def test_duplicate_message_names_the_key(tmp_path):
    table = samples_table(prompts=("q",), n=4)
    pq.write_table(pa.concat_tables([table, table.slice(2, 1)]), tmp_path / "s.parquet")
    with pytest.raises(InputError) as error:
        read_samples(tmp_path / "s.parquet")
    assert "('q', 2)" in str(error.value)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_samples(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files"):
        read_samples(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="junk|Parquet|read"):
        read_samples(tmp_path / "junk.parquet")


def test_open_samples_checks_the_schema_without_reading_rows(tmp_path):
    gold = np.arange(10, dtype=float)
    gold[3] = np.nan  # a bad value is not seen until the rows are read
    pq.write_table(samples_table().set_column(2, "gold", pa.array(gold)), tmp_path / "s.parquet")
    dataset, columns = open_samples(tmp_path / "s.parquet")
    assert columns == ["gold", "proxy"] and dataset.count_rows() == 10
    with pytest.raises(InputError, match="rm_zz"):
        open_samples(tmp_path / "s.parquet", ("rm_zz",))


def test_validate_samples_is_read_samples_on_a_table(tmp_path):
    table = samples_table(prompts=("b", "a"), n=4)
    shuffled = table.take(np.random.default_rng(2).permutation(table.num_rows))
    pq.write_table(shuffled, tmp_path / "s.parquet")
    read, columns = read_samples(tmp_path / "s.parquet")
    assert validate_samples(shuffled, columns, tmp_path / "s.parquet").equals(read)
    with pytest.raises(InputError, match=r"elsewhere\.parquet: .*duplicated"):
        validate_samples(pa.concat_tables([shuffled, shuffled.slice(0, 1)]), columns, tmp_path / "elsewhere.parquet")


def test_iter_prompts_splits_a_sorted_table():
    table = samples_table(prompts=("a", "b", "c"), n=3).sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
    chunks = list(iter_prompts(table, ["gold"]))
    assert [c.prompt_id for c in chunks] == ["a", "b", "c"]
    gold = table["gold"].to_numpy()
    for k, chunk in enumerate(chunks):
        np.testing.assert_array_equal(chunk.sample_idx, [0, 1, 2])
        np.testing.assert_array_equal(chunk.rewards["gold"], gold[3 * k:3 * k + 3])
    single = list(iter_prompts(table.slice(0, 1), ["gold"]))
    assert len(single) == 1 and single[0].sample_idx.tolist() == [0]


def test_write_table_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "deep" / "dir" / "t.parquet"
    first = pa.table({"x": [1, 2]})
    write_table(first, path)
    assert pq.read_table(path).equals(first)
    second = pa.table({"x": [3]})
    write_table(second, path)
    assert pq.read_table(path).equals(second)
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.parquet"]  # no partial file left


def test_readme_lists_every_table_with_its_schema_columns():
    """README's output table names each result table's columns exactly as SCHEMAS has them (in order)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, schema in SCHEMAS.items():
        row = re.search(rf"^\| `{name}\.parquet` \| .*? \| ([^|\n]*) \|$", readme, re.M)
        assert row is not None, f"README lists no {name}.parquet"
        assert row.group(1).split(", ") == schema.names, name
