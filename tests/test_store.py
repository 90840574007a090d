"""The sample store: bucketed parts named by their rounds, compacted statistics, manifest, corrupt parts."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.samples import PromptSamples
from limits_ray.core.tables import prompt_statistics
from limits_ray.pipeline.bucket_tasks import BucketContext, compact
from limits_ray.storage.buckets import bucket_of
from limits_ray.storage.location import open_location
from limits_ray.storage.sample_store import SampleStore, StoreMismatchError, flatten_rounds

BETAS = np.array([0.1, 1.0, 10.0])
PLAN = AnalysisConfig(betas=tuple(BETAS)).plan(["rm"])


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
        "rm": np.sin(sample_idx + len(prompt_id)),
    }


def _store(uri, buckets: int = 4, endpoint: str = "") -> SampleStore:
    return SampleStore(open_location(uri, endpoint_override=endpoint), buckets)


def _write(store: SampleStore, prompt_id: str, rounds: list[int]) -> list[str]:
    return store.write_rounds(flatten_rounds(_rounds(prompt_id, rounds), ["rm"], False))


def _context(store: SampleStore, tmp_path, analysis: str = "a") -> BucketContext:
    return BucketContext(store, analysis, PLAN, BETAS, ["rm"], open_location(tmp_path / "work"))


def test_flatten_rounds_gives_one_row_per_sample_in_order():
    table = flatten_rounds(_rounds("p", [0, 2]), ["rm"], keep_text=True)
    assert table.num_rows == 8
    assert table["sample_idx"].to_pylist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert table["round"].to_pylist() == [0] * 4 + [2] * 4
    assert table["response"].to_pylist()[4] == "r8"
    assert "response" not in flatten_rounds(_rounds("p", [0]), ["rm"], keep_text=False).column_names


def test_a_rewritten_batch_writes_the_same_part_into_its_bucket(tmp_path):
    store = _store(tmp_path)
    first = _write(store, "p", [0, 1])
    again = _write(store, "p", [1, 0])
    other = _write(store, "q", [0])
    assert first == again != other
    buckets = bucket_of(["p", "q"], 4)
    parts = {key for bucket in set(buckets.tolist()) for key in store.sample_parts(int(bucket))}
    assert parts == {*first, *other}
    assert set(store.sample_parts(int(buckets[0]))) >= set(first)
    assert ds.dataset(str(tmp_path / "samples"), format="parquet").count_rows() == 12


def test_compaction_merges_only_new_parts_and_equals_statistics_of_all_samples(tmp_path):
    store = _store(tmp_path, buckets=1)
    context = _context(store, tmp_path)
    _write(store, "p", [0, 1])
    merged, _ = compact(context, 0)
    assert merged.rounds == {"p": {0, 1}} and merged.generation == 1
    _write(store, "p", [2])
    _write(store, "p", [1])  # a round written again (a retried round) counts once
    merged, _ = compact(context, 0)
    assert merged.rounds == {"p": {0, 1, 2}} and merged.generation == 2
    samples = _rounds("p", [0, 1, 2])
    expected = prompt_statistics(PromptSamples("p", samples["sample_idx"].ravel(), {"rm": samples["rm"].ravel()}), PLAN, BETAS)
    got = merged.statistics["p"]["rm"].total().finalize()
    want = expected["rm"].total().finalize()
    np.testing.assert_allclose(got.gain, want.gain, rtol=1e-12)
    np.testing.assert_allclose(got.kl, want.kl, rtol=1e-10, atol=1e-15)
    # Nothing new: reading back changes nothing and writes nothing.
    again, _ = compact(context, 0)
    assert again.generation == 2 and again.rounds == merged.rounds
    names = [location.name for location in store.bucket_stats("a", 0).files()]
    assert len(names) == 1 and names[0].startswith("merged-00000002-")  # older compactions are removed


def test_a_new_analysis_computes_its_statistics_from_the_stored_rewards(tmp_path):
    store = _store(tmp_path, buckets=1)
    _write(store, "p", [0, 1])
    merged_a, _ = compact(_context(store, tmp_path, "a"), 0)
    merged_b, _ = compact(_context(store, tmp_path, "b"), 0)
    assert merged_b.rounds == merged_a.rounds
    np.testing.assert_allclose(merged_b.statistics["p"]["rm"].total().finalize().gain,
                               merged_a.statistics["p"]["rm"].total().finalize().gain, rtol=1e-12)


def test_an_unreadable_part_is_set_aside_and_its_rounds_count_as_missing(tmp_path):
    store = _store(tmp_path, buckets=1)
    _write(store, "p", [0])
    broken = store.bucket_samples(0).join("part-broken.parquet")
    broken.write_bytes(b"PAR1 this is not a parquet file")
    merged, corrupt = compact(_context(store, tmp_path), 0)
    assert merged.rounds == {"p": {0}}
    assert corrupt == [str(tmp_path / "corrupt" / "part-broken.parquet")]
    assert not broken.exists() and (tmp_path / "corrupt" / "part-broken.parquet").exists()


def test_a_store_refuses_samples_of_another_setup_and_keeps_its_bucket_count(tmp_path):
    store = _store(tmp_path, buckets=4)
    identity = {"base_model": "abc", "sampling": {"temperature": 1.0}}
    store.check_manifest(identity)
    reopened = _store(tmp_path, buckets=64)
    reopened.check_manifest(dict(identity))  # same setup: fine, and the store's own bucket count wins
    assert reopened.buckets == 4
    with pytest.raises(StoreMismatchError, match=r"base_model: stored 'abc', now 'def'"):
        reopened.check_manifest({**identity, "base_model": "def"})


def test_a_store_refuses_another_software_stack_and_takes_an_older_manifest_unchecked(tmp_path, caplog):
    """The stack (dtype, device, vLLM/torch versions) is refused like a model when it differs. A store made
    before it was recorded (no "stack" in its manifest) stays usable: the stack cannot be compared, a
    warning says so, and every other key is still checked."""
    stack = {"models": {"base": {"dtype": "bfloat16", "device": "gpu"}}, "versions": {"vllm": "vllm==0.32.0"}}
    identity = {"base_model": "abc", "sampling": {"temperature": 1.0}, "stack": stack}
    _store(tmp_path / "new", buckets=1).check_manifest(identity)
    on_cpu = {**identity, "stack": {**stack, "models": {"base": {"dtype": "float32", "device": "cpu"}}}}
    with pytest.raises(StoreMismatchError, match=r"stack: stored .*'bfloat16'.*now .*'float32'"):
        _store(tmp_path / "new", buckets=1).check_manifest(on_cpu)

    old = _store(tmp_path / "old", buckets=1)
    old.manifest.write_json({"identity": {"base_model": "abc", "sampling": {"temperature": 1.0}}, "layout": 2, "buckets": 1})
    with caplog.at_level("WARNING", logger="limits_ray.storage.sample_store"):
        old.check_manifest(identity)
    assert "predates limits-ray's record of ['stack']" in caplog.text
    assert "stack" not in old.manifest.read_json()["identity"]  # the manifest is written once, never rewritten
    with pytest.raises(StoreMismatchError, match=r"base_model: stored 'abc', now 'def'"):
        old.check_manifest({**identity, "base_model": "def"})


def test_the_store_works_the_same_on_an_s3_server(s3_bucket, tmp_path):
    uri, endpoint = s3_bucket
    remote, local = _store(f"{uri}/store", buckets=2, endpoint=endpoint), _store(tmp_path / "store", buckets=2)
    for store in (remote, local):
        store.check_manifest({"base_model": "abc"})
        _write(store, "p", [0, 1])
        _write(store, "q", [0])
    for bucket in range(2):
        got, _ = compact(_context(remote, tmp_path, "a"), bucket)
        want, _ = compact(_context(local, tmp_path, "a"), bucket)
        assert got.rounds == want.rounds
        for prompt_id in want.statistics:
            np.testing.assert_array_equal(got.statistics[prompt_id]["rm"].total().moments,
                                          want.statistics[prompt_id]["rm"].total().moments)
    assert not [location for location in remote.root.files(recursive=True) if ".partial" in location.path]


def test_bucket_rounds_keep_each_sample_once_when_a_round_was_written_twice(tmp_path):
    store = _store(tmp_path, buckets=1)
    _write(store, "p", [0, 1])
    _write(store, "p", [1])  # a round written again by a retried batch
    _write(store, "q", [0])
    table = store.bucket_rounds(0, ["rm"], {"p", "q"})
    keys = sorted(zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist()))
    assert keys == [("p", index) for index in range(8)] + [("q", index) for index in range(4)]
