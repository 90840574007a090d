"""Checks on a finished run's outputs shared by the fault tests (tests/test_reliability.py, tests/test_multinode.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

FRONTIER_COLUMNS = ("gain", "gain_se", "kl", "kl_se", "ess")


def frontier(out_dir: Path):
    """The run's frontier table, sorted by prompt, alignment reward and beta."""
    return pq.read_table(out_dir / "frontier.parquet").sort_by(
        [("prompt_id", "ascending"), ("align", "ascending"), ("beta", "ascending")])


def assert_same_frontier(left: Path, right: Path, columns: tuple[str, ...] = FRONTIER_COLUMNS) -> None:
    """The two runs' frontiers have the same rows and ``columns`` agree to 1e-9 relative."""
    a, b = frontier(left), frontier(right)
    assert a["prompt_id"].to_pylist() == b["prompt_id"].to_pylist()
    assert a["n"].to_pylist() == b["n"].to_pylist()
    for column in columns:
        np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=column)


def assert_store_has_each_sample_once(store: Path, expected: int) -> None:
    """The sample store holds ``expected`` samples, none twice."""
    table = ds.dataset(str(store / "samples"), format="parquet").to_table(columns=["prompt_id", "sample_idx"])
    keys = set(zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist()))
    assert table.num_rows == len(keys) == expected


def stored_parts(store: Path) -> int:
    """How many sample parts the store holds."""
    return len(list((store / "samples").rglob("part-*.parquet"))) if (store / "samples").is_dir() else 0
