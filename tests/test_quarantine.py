"""Quarantine of rounds that keep failing (limits_ray.faults), and root causes of wrapped errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from limits_ray.faults import Quarantine, QuarantinedRound, run_with_quarantine
from limits_ray.pipeline import Timed, root_cause
from limits_ray.storage import open_location


def _batch(prompt_ids: list[str]) -> dict[str, np.ndarray]:
    return {"prompt_id": np.array(prompt_ids, dtype=object), "round": np.arange(len(prompt_ids), dtype=np.int64)}


class FailsOn:
    """A stage that raises for one prompt and counts its calls."""

    def __init__(self, bad: str) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, batch):
        self.calls += 1
        if self.bad in batch["prompt_id"]:
            raise ValueError(f"reward 'rm' is nan for prompt_id {self.bad!r}")
        return {**batch, "rm": np.ones(len(batch["prompt_id"]))}


def test_a_failing_round_is_quarantined_and_the_rest_pass(tmp_path):
    quarantine = Quarantine(open_location(tmp_path), run_id="run-1")
    stage = FailsOn("b")
    output = run_with_quarantine(stage, _batch(["a", "b", "c"]), "score_rm", quarantine, attempts=3)
    assert output["prompt_id"].tolist() == ["a", "c"] and output["rm"].tolist() == [1.0, 1.0]
    assert quarantine.records() == [QuarantinedRound("b", 1, "score_rm", "ValueError: reward 'rm' is nan for prompt_id 'b'")]
    assert stage.calls == 1 + 1 + 2 + 1  # the batch, then a, b twice, c
    assert Quarantine(open_location(tmp_path), run_id="run-2").records() == []  # another run's records are not ours


def test_every_round_failing_gives_no_output(tmp_path):
    assert run_with_quarantine(FailsOn("a"), _batch(["a"]), "generate", Quarantine(open_location(tmp_path), "r"), 2) is None


def test_timed_yields_nothing_for_a_fully_quarantined_batch_and_raises_when_failing_fast(tmp_path):
    quarantined = Timed(FailsOn, "score_rm", quarantine_dir=open_location(tmp_path), run_id="r", fail_fast=False, bad="a")
    assert list(quarantined(_batch(["a"]))) == []
    [output] = list(quarantined(_batch(["c"])))
    assert output.num_rows == 1 and output["seconds_score_rm"].type == pa.float64()  # an Arrow table
    strict = Timed(FailsOn, "score_rm", bad="a")
    with pytest.raises(ValueError, match="nan"):
        list(strict(_batch(["a"])))


def test_root_cause_finds_the_user_error_inside_wrappers():
    try:
        try:
            raise ValueError("reward 'rm' is nan for prompt_id 'p'\nmore detail")
        except ValueError as inner:
            raise RuntimeError("") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "ValueError: reward 'rm' is nan for prompt_id 'p'"
