"""The round layout: rows of n samples, as numpy arrays or as Ray Data hands them back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from limits_ray.storage.rounds import ARROW_TYPES, is_round_layout, per_round, per_sample, regroup, round_lengths, to_arrow


def test_two_dimensional_rounds():
    batch = {"prompt_id": np.array(["a", "b"], dtype=object), "sample_idx": np.arange(6).reshape(2, 3)}
    assert round_lengths(batch).tolist() == [3, 3] and is_round_layout(batch)
    assert per_round(batch["prompt_id"], round_lengths(batch)).tolist() == ["a"] * 3 + ["b"] * 3
    assert regroup(np.arange(6.0) * 2, batch).tolist() == [[0, 2, 4], [6, 8, 10]]


def test_object_rows_of_lists_as_ray_data_returns_them():
    rows = np.empty(2, dtype=object)
    rows[:] = [["x", "y"], ["z"]]
    batch = {"response": rows}
    assert round_lengths(batch).tolist() == [2, 1]
    assert per_sample(rows).tolist() == ["x", "y", "z"]
    regrouped = regroup(np.array([1.0, 2.0, 3.0]), batch)
    assert [list(row) for row in regrouped] == [[1.0, 2.0], [3.0]]


def test_rows_of_single_samples_pass_through():
    batch = {"sample_idx": np.array([4, 5, 6])}
    assert not is_round_layout(batch)
    assert round_lengths(batch).tolist() == [1, 1, 1]
    assert regroup(np.array([1.0, 2.0, 3.0]), batch).tolist() == [1.0, 2.0, 3.0]


def test_to_arrow_types_round_and_sample_columns():
    batch = {
        "prompt_id": np.array(["a", "b"], dtype=object), "prompt": np.array(["x", "y"], dtype=object),
        "prompt_text": np.array(["x", "y"], dtype=object), "round": np.array([0, 1]), "seed": np.array([5, 6]),
        "sample_idx": np.arange(6).reshape(2, 3),
        "response": np.array([["r0", "r1", "r2"], ["r3", "r4", "r5"]], dtype=object),
        "response_tokens": np.ones((2, 3), dtype=np.int32), "logprob": -np.ones((2, 3), dtype=np.float32),
        "finish_reason": np.full((2, 3), "stop", dtype=object), "gold": np.arange(6.0).reshape(2, 3),
        "seconds_generate": np.array([0.5, 0.5]), "payload": np.array([b"\x00", b"\x01"], dtype=object),
    }
    table = to_arrow(batch)
    types = dict(zip(table.schema.names, table.schema.types))
    for name, expected in ARROW_TYPES.items():
        assert types[name] == expected, name
    assert types["gold"] == pa.list_(pa.float64()) and types["seconds_generate"] == pa.float64()
    assert types["payload"] == pa.binary()
    assert table["response"].to_pylist() == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]
    assert table["gold"].to_pylist()[1] == [3.0, 4.0, 5.0]


def test_to_arrow_reads_ray_data_rows_of_different_lengths():
    responses, rewards, indices = (np.empty(2, dtype=object) for _ in range(3))
    responses[:] = [np.array(["x", "y"], dtype=object), np.array(["z"], dtype=object)]
    rewards[:] = [np.array([1.0, 2.0]), np.array([3.0])]
    indices[:] = [np.array([0, 1]), np.array([2])]
    table = to_arrow({"prompt_id": np.array(["a", "b"], dtype=object), "sample_idx": indices,
                      "response": responses, "gold": rewards})
    assert table["response"].to_pylist() == [["x", "y"], ["z"]]
    assert table["gold"].type == pa.list_(pa.float64()) and table["gold"].to_pylist() == [[1.0, 2.0], [3.0]]
    assert per_sample(table["gold"].to_numpy(zero_copy_only=False)).tolist() == [1.0, 2.0, 3.0]


def test_to_arrow_keeps_padded_token_ids_as_a_tensor():
    ids = np.arange(12, dtype=np.int64).reshape(2, 3, 2)
    table = to_arrow({"prompt_id": np.array(["a", "b"], dtype=object), "sample_idx": np.arange(6).reshape(2, 3),
                      "response_token_ids": ids})
    assert np.array_equal(table["response_token_ids"].combine_chunks().to_numpy_ndarray(), ids)
