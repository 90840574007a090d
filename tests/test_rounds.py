"""The round layout: rows of n samples, as numpy arrays or as Ray Data hands them back."""

from __future__ import annotations

import numpy as np

from limits_ray.rounds import is_round_layout, per_round, per_sample, regroup, round_lengths


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
