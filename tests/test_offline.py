"""Tests of limits_ray.runs.reduce: the bucket-by-bucket reduce equals the in-memory reduce_samples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.errors import InputError
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tables import ReduceResult
from limits_ray.runs.reduce import PER_PROMPT, reduce_dataset, reduce_samples
from limits_ray.storage.buckets import bucket_name, bucket_of
from limits_ray.storage.results import write_result

CONFIG = AnalysisConfig(betas="0.2:5:4", align=("a", "mean(a,b)"), evals=("a", "b"))
KEYS = {"frontier": ["prompt_id", "align", "eval", "beta"], "bon": ["prompt_id", "align", "eval", "n"],
        "convergence": ["prompt_id", "align", "eval", "beta", "n_samples"], "frontier_mean": ["align", "eval", "beta"],
        "winrate": ["prompt_id", "align", "eval", "beta"], "winrate_mean": ["align", "eval", "beta"],
        "bracket": ["align", "eval", "kl"]}
ALL = (*PER_PROMPT, "frontier_mean", "winrate_mean", "bracket")



def assert_identical(left: pa.Table, right: pa.Table) -> None:
    """Same schema and values, NaN where NaN (the SEs of unreliable cells are NaN; Table.equals calls NaN != NaN)."""
    assert left.schema == right.schema and left.num_rows == right.num_rows
    for column in left.column_names:
        np.testing.assert_array_equal(left[column].to_numpy(zero_copy_only=False),
                                      right[column].to_numpy(zero_copy_only=False), err_msg=column)

def samples(prompts: int = 40, n: int = 24, seed: int = 0) -> pa.Table:
    """Scored samples in shuffled row order; prompts have different sizes (n - p % 5 samples)."""
    rng = np.random.default_rng(seed)
    ids = [f"q{p:03d}" for p in range(prompts) for _ in range(n - p % 5)]
    idx = [i for p in range(prompts) for i in range(n - p % 5)]
    rows = len(ids)
    table = pa.table({
        "prompt_id": ids, "sample_idx": pa.array(idx, pa.int64()),
        "a": rng.normal(0.0, 1.0, rows), "b": pa.array(rng.normal(1.0, 2.0, rows), pa.float32()),
        "text": ["x"] * rows,
    })
    return table.take(rng.permutation(rows))


def sort(table: pa.Table, name: str) -> pa.Table:
    return table.sort_by([(key, "ascending") for key in KEYS[name]])


def assert_same_result(out, expected: ReduceResult) -> None:
    for name in ALL:
        got = pq.read_table(out / f"{name}.parquet")
        want = getattr(expected, name)
        assert got.schema.equals(SCHEMAS[name]), name
        assert got.num_rows == want.num_rows > 0, name
        got, want = sort(got, name), sort(want, name)
        for column in got.column_names:
            left, right = got[column].to_numpy(zero_copy_only=False), want[column].to_numpy(zero_copy_only=False)
            if pa.types.is_floating(got[column].type):
                # the rank tilts' win rates are the same for every prompt of one N (no ties): their spread is rounding
                atol = 1e-15 if name == "winrate_mean" and column.endswith("_spread_se") else 0
                np.testing.assert_allclose(left, right, rtol=1e-12, atol=atol, err_msg=f"{name}.{column}")
            else:
                np.testing.assert_array_equal(left, right, err_msg=f"{name}.{column}")


@pytest.mark.parametrize("bucket_rows", [10**6, 97])
def test_one_file_in_any_order_equals_the_in_memory_reduce(tmp_path, bucket_rows):
    pq.write_table(samples(), tmp_path / "s.parquet")
    result = reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=bucket_rows)
    assert_same_result(tmp_path / "out", reduce_samples(tmp_path / "s.parquet", CONFIG))
    assert (result.rows, result.prompts) == (40 * 24 - 8 * (1 + 2 + 3 + 4), 40)
    spilled_into = 1 if bucket_rows > 1000 else len(set(bucket_of([f"q{p:03d}" for p in range(40)], 10).tolist()))
    assert result.buckets == spilled_into > (1 if bucket_rows < 1000 else 0)
    assert result.spilled == (result.buckets > 1) and not result.partitioned
    assert [path.name for path in result.paths] == ["frontier.parquet", "bon.parquet", "convergence.parquet",
                                                    "winrate.parquet", "frontier_mean.parquet", "winrate_mean.parquet",
                                                    "bracket.parquet"]
    assert (tmp_path / "out" / "frontier_mean.parquet").is_file()
    shards = sorted(path.name for path in (tmp_path / "out" / "frontier.parquet").iterdir())
    assert len(shards) == result.buckets and shards[0] == "part-00000.parquet"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "s.parquet"]  # no staging or spill left


def test_flushes_and_gate_batches_that_cut_through_prompts_change_nothing(tmp_path, monkeypatch):
    """37 rows a flush and a gate batch: batches end inside prompts (16 frontier rows each, more convergence rows)."""
    import limits_ray.pipeline.bucket_tasks as bucket_tasks
    import limits_ray.runs.reduce as offline

    monkeypatch.setattr(offline, "FLUSH_ROWS", 37)
    monkeypatch.setattr(bucket_tasks, "GATE_BATCH_ROWS", 37)
    pq.write_table(samples(), tmp_path / "s.parquet")
    reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=300)
    assert_same_result(tmp_path / "out", reduce_samples(tmp_path / "s.parquet", CONFIG))


def test_many_files_equal_one_file(tmp_path):
    table = samples(prompts=30, seed=1)
    (tmp_path / "parts").mkdir()
    for k, start in enumerate(range(0, table.num_rows, 53)):
        pq.write_table(table.slice(start, 53), tmp_path / "parts" / f"part-{k:03d}.parquet")
    pq.write_table(table, tmp_path / "one.parquet")
    result = reduce_dataset(tmp_path / "parts", tmp_path / "out", CONFIG, bucket_rows=150)
    assert result.buckets > 1 and result.spilled
    assert_same_result(tmp_path / "out", reduce_samples(tmp_path / "one.parquet", CONFIG))


def test_rows_are_sorted_by_prompt_within_a_shard_and_shards_by_bucket(tmp_path):
    pq.write_table(samples(prompts=25), tmp_path / "s.parquet")
    result = reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=100)
    frontier = pq.read_table(tmp_path / "out" / "frontier.parquet")
    ids = frontier["prompt_id"].to_pylist()
    buckets = bucket_of(ids, result.buckets)
    assert np.all(np.diff(buckets) >= 0)
    for bucket in set(buckets.tolist()):
        within = [p for p, b in zip(ids, buckets) if b == bucket]
        assert within == sorted(within)
    again = reduce_dataset(tmp_path / "s.parquet", tmp_path / "out2", CONFIG, bucket_rows=100)
    for name in ALL:
        assert_identical(pq.read_table(tmp_path / "out2" / f"{name}.parquet"), pq.read_table(tmp_path / "out" / f"{name}.parquet"))
    np.testing.assert_array_equal(again.frontier_mean["gain"].to_numpy(), result.frontier_mean["gain"].to_numpy())


def write_store(table: pa.Table, root, buckets: int) -> None:
    """The sample store's layout: <root>/bucket=NNNNN/part-*.parquet, rows of a prompt in its bucket only."""
    codes = bucket_of(table["prompt_id"].to_pylist(), buckets)
    for bucket in set(codes.tolist()):
        rows = table.filter(pa.array(codes == bucket))
        directory = root / bucket_name(bucket)
        directory.mkdir(parents=True)
        half = rows.num_rows // 2
        pq.write_table(rows.slice(0, half), directory / "part-0.parquet")
        pq.write_table(rows.slice(half), directory / "part-1.parquet")


def test_bucket_directories_are_reduced_as_they_are(tmp_path):
    table = samples(prompts=30, seed=2)
    pq.write_table(table, tmp_path / "one.parquet")
    write_store(table, tmp_path / "store", buckets=7)
    result = reduce_dataset(tmp_path / "store", tmp_path / "out", CONFIG, bucket_rows=10)
    assert result.partitioned and not result.spilled and result.buckets == len(list((tmp_path / "store").iterdir()))
    assert_same_result(tmp_path / "out", reduce_samples(tmp_path / "one.parquet", CONFIG))
    shards = sorted(path.name for path in (tmp_path / "out" / "bon.parquet").iterdir())
    assert shards == sorted(f"part-{d.name.split('=')[1]}.parquet" for d in (tmp_path / "store").iterdir())


def test_bucket_directories_that_split_a_prompt_are_refused(tmp_path):
    table = samples(prompts=6)
    for k, start in enumerate(range(0, table.num_rows, table.num_rows // 2 + 1)):
        (tmp_path / "store" / bucket_name(k)).mkdir(parents=True)
        pq.write_table(table.slice(start, table.num_rows // 2 + 1), tmp_path / "store" / bucket_name(k) / "part-0.parquet")
    with pytest.raises(InputError, match=r"more than one bucket directory, e.g. in bucket=00000 and bucket=00001"):
        reduce_dataset(tmp_path / "store", tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_bad_rows_in_a_later_bucket_leave_the_previous_results(tmp_path):
    good = samples(prompts=12)
    pq.write_table(good, tmp_path / "s.parquet")
    reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=50)
    before = pq.read_table(tmp_path / "out" / "frontier.parquet")
    a = good["a"].to_numpy().copy()
    row = good["prompt_id"].to_pylist().index("q011")
    a[row] = np.inf
    pq.write_table(good.set_column(2, "a", pa.array(a)), tmp_path / "s.parquet")
    with pytest.raises(InputError, match=r"'a'.*prompt_id='q011'"):
        reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=50)
    assert_identical(pq.read_table(tmp_path / "out" / "frontier.parquet"), before)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "s.parquet"]


def test_an_earlier_result_of_single_files_is_replaced(tmp_path):
    pq.write_table(samples(prompts=8), tmp_path / "s.parquet")
    expected = reduce_samples(tmp_path / "s.parquet", CONFIG)
    other = reduce_samples(tmp_path / "s.parquet", AnalysisConfig(betas=(1.0,)))
    write_result(other, tmp_path / "out")
    assert (tmp_path / "out" / "frontier.parquet").is_file()
    reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=40)
    assert (tmp_path / "out" / "frontier.parquet").is_dir()
    assert_same_result(tmp_path / "out", expected)


def test_bad_input_in_the_spill_names_the_input(tmp_path):
    table = samples(prompts=4)
    pq.write_table(table.set_column(0, "prompt_id", pa.array([None] + table["prompt_id"].to_pylist()[1:])),
                   tmp_path / "s.parquet")
    with pytest.raises(InputError, match=r"s\.parquet.*prompt_id has 1 null"):
        reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=10)
    assert not (tmp_path / "out").exists()


def test_the_tables_name_every_reduced_prompt_once(tmp_path):
    pq.write_table(samples(prompts=33), tmp_path / "s.parquet")
    reduce_dataset(tmp_path / "s.parquet", tmp_path / "out", CONFIG, bucket_rows=64)
    frontier = pq.read_table(tmp_path / "out" / "frontier.parquet")
    assert len(set(frontier["prompt_id"].to_pylist())) == 33
    assert frontier.num_rows == 33 * 2 * 2 * 4  # prompts x align x eval x betas
    assert set(pq.read_table(tmp_path / "out" / "frontier_mean.parquet")["prompts"].to_pylist()) == {33}


@pytest.mark.slow
def test_ray_gives_the_tables_of_the_local_run(tmp_path):
    import ray

    table = samples(prompts=30, seed=3)
    (tmp_path / "parts").mkdir()
    for k, start in enumerate(range(0, table.num_rows, 200)):
        pq.write_table(table.slice(start, 200), tmp_path / "parts" / f"part-{k}.parquet")
    write_store(table, tmp_path / "store", buckets=5)
    local = reduce_dataset(tmp_path / "parts", tmp_path / "local", CONFIG, bucket_rows=120)
    local_store = reduce_dataset(tmp_path / "store", tmp_path / "local_store", CONFIG)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = reduce_dataset(tmp_path / "parts", tmp_path / "ray", CONFIG, use_ray=True, bucket_rows=120,
                                max_in_flight=2)
        remote_store = reduce_dataset(tmp_path / "store", tmp_path / "ray_store", CONFIG, use_ray=True)
        bad = table.set_column(1, "sample_idx", pa.array([-1] + table["sample_idx"].to_pylist()[1:], pa.int64()))
        pq.write_table(bad, tmp_path / "bad.parquet")
        with pytest.raises(InputError, match="sample_idx must be >= 0") as error:
            reduce_dataset(tmp_path / "bad.parquet", tmp_path / "bad", CONFIG, use_ray=True, bucket_rows=120)
        assert type(error.value) is InputError  # the task's error itself, not Ray's wrapper
    finally:
        ray.shutdown()
    assert (remote.buckets, remote.rows, remote.prompts) == (local.buckets, local.rows, local.prompts)
    assert remote_store.buckets == local_store.buckets == 5
    for left, right in (("local", "ray"), ("local_store", "ray_store")):
        for name in ALL:
            assert_identical(pq.read_table(tmp_path / right / f"{name}.parquet"), pq.read_table(tmp_path / left / f"{name}.parquet"))
    assert_same_result(tmp_path / "ray", reduce_samples(tmp_path / "parts", CONFIG))
