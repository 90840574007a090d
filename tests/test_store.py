"""The sample store: whole rounds per file, atomic writes, manifest checks, crash recovery."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest

from limits_ray.store import SampleStore, StoreMismatchError, flatten_rounds


def _rounds(prompt_id: str, rounds: list[int], n: int = 4) -> dict[str, np.ndarray]:
    """A batch of rounds in the pipeline's layout (sample columns of n values per row)."""
    count = len(rounds)
    sample_idx = np.array([[r * n + j for j in range(n)] for r in rounds], dtype=np.int64)
    return {
        "prompt_id": np.array([prompt_id] * count, dtype=object),
        "prompt": np.array(["a prompt"] * count, dtype=object),
        "round": np.array(rounds, dtype=np.int64),
        "seed": np.arange(count, dtype=np.int64),
        "sample_idx": sample_idx,
        "response": np.array([[f"r{i}" for i in row] for row in sample_idx.tolist()], dtype=object),
        "response_tokens": np.ones((count, n), dtype=np.int64),
        "logprob": -np.ones((count, n)),
        "finish_reason": np.array([["length"] * n] * count, dtype=object),
        "rm": sample_idx / 10.0,
    }


def test_flatten_rounds_gives_one_row_per_sample_in_order():
    table = flatten_rounds(_rounds("p", [0, 2]), ["rm"], keep_text=True)
    assert table.num_rows == 8
    assert table["sample_idx"].to_pylist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert table["round"].to_pylist() == [0] * 4 + [2] * 4
    assert table["response"].to_pylist()[4] == "r8"
    assert "response" not in flatten_rounds(_rounds("p", [0]), ["rm"], keep_text=False).column_names


def test_a_rewritten_batch_replaces_its_own_file(tmp_path):
    store = SampleStore(tmp_path)
    first = store.write_rounds(flatten_rounds(_rounds("p", [0, 1]), ["rm"], False))
    again = store.write_rounds(flatten_rounds(_rounds("p", [1, 0]), ["rm"], False))
    other = store.write_rounds(flatten_rounds(_rounds("q", [0]), ["rm"], False))
    assert first == again != other
    assert store.stored_rounds() == {("p", 0), ("p", 1), ("q", 0)}
    assert ds.dataset(str(store.samples_dir), format="parquet").count_rows() == 12


def test_recover_sets_aside_unreadable_files_and_drops_partial_writes(tmp_path):
    store = SampleStore(tmp_path)
    store.write_rounds(flatten_rounds(_rounds("p", [0]), ["rm"], False))
    broken = store.samples_dir / "part-broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    partial = store.samples_dir / ".part-x.parquet.partial"
    partial.write_bytes(b"half a file")
    moved = store.recover()
    assert moved == [tmp_path / "corrupt" / "part-broken.parquet"] and moved[0].exists()
    assert not partial.exists() and not broken.exists()
    assert store.stored_rounds() == {("p", 0)}


def test_a_store_refuses_samples_of_another_setup(tmp_path):
    store = SampleStore(tmp_path)
    identity = {"base_model": "abc", "sampling": {"temperature": 1.0}}
    store.check_manifest(identity)
    store.check_manifest(dict(identity))  # same setup: fine
    with pytest.raises(StoreMismatchError, match=r"base_model: stored 'abc', now 'def'"):
        store.check_manifest({**identity, "base_model": "def"})
