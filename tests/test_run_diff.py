"""``limits-ray compare-runs`` end to end on synthetic runs (no model), against the exact frontiers.

Synthetic rounds (``generation.kind: synthetic``) draw ``L`` uniform on ``1..max_tokens`` words from a
known distribution, so the ``response_length`` reward (characters / 10) of every prompt has a known finite
distribution and the frontier an exact value (enumeration, :func:`limits_ray.core.exact.finite_tilt`).
Three runs of 12 prompts x 512 samples: A and A' (the same setup, other seeds) and B, whose responses run
to 12 words instead of 8, so its rewards are spread wider and its frontier higher by a known amount.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from limits_ray.cli import main
from limits_ray.config import JobConfig, from_mapping
from limits_ray.core.exact import finite_tilt
from limits_ray.pipeline.generation import SYNTHETIC_VOCABULARY, synthetic_word_probabilities
from limits_ray.runs.job import run_job

pytestmark = pytest.mark.slow

BETAS = "0.2:20:13"


def synthetic_job(out, seed: int, max_tokens: int, prompts: int = 12, samples: int = 512) -> JobConfig:
    return from_mapping(JobConfig, {
        "name": f"synthetic-{max_tokens}-{seed}", "output_dir": str(out), "ray_address": "local",
        "prompts": {"inline": [f"prompt number {index}" for index in range(prompts)], "template": "Q: {prompt}\nA:"},
        "generation": {"kind": "synthetic", "samples_per_prompt": samples, "n": 64, "seed": seed, "max_tokens": max_tokens,
                       "batch_size": 4, "num_cpus": 0.5},
        "rewards": [{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                     "num_cpus": 0.5, "batch_size": 4096}],
        "analysis": {"betas": BETAS},
        "store": {"enabled": False},
    })


def exact_lengths(max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact distribution (probabilities, rewards) of ``response_length`` on synthetic responses of up to
    ``max_tokens`` words: ``L`` uniform, the letters of ``L`` words from the vocabulary's probabilities, and
    ``L - 1`` spaces."""
    word = np.zeros(max(map(len, SYNTHETIC_VOCABULARY)) + 1)
    np.add.at(word, [len(text) for text in SYNTHETIC_VOCABULARY], synthetic_word_probabilities())
    total, letters = np.zeros(1), np.array([1.0])
    for words in range(1, max_tokens + 1):
        letters = np.convolve(letters, word)
        shifted = np.concatenate([np.zeros(words - 1), letters])
        total = np.pad(total, (0, shifted.size - total.size)) + shifted / max_tokens
    support = np.flatnonzero(total > 0)
    return total[support], support / 10.0


def exact_length_frontier(max_tokens: int, budgets: np.ndarray) -> np.ndarray:
    """The exact gain at each KL budget of that distribution (the same for every prompt)."""
    probabilities, reward = exact_lengths(max_tokens)
    tilts = [finite_tilt(probabilities, reward, reward, beta) for beta in np.geomspace(0.05, 200, 600)]
    kl, gain = np.array([tilt.kl for tilt in tilts]), np.array([tilt.gain[0] for tilt in tilts])
    order = np.argsort(kl)
    return np.interp(budgets, kl[order], gain[order])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("run_diff")
    for name, seed, max_tokens in (("a", 0, 8), ("a_again", 1, 8), ("b", 2, 12)):
        run_job(synthetic_job(root / name, seed, max_tokens), figures=False)
    return root


def test_the_exact_length_distribution_is_the_generators():
    from limits_ray.config import GenerationConfig
    from limits_ray.pipeline.generation import SyntheticGenerator

    config = GenerationConfig(kind="synthetic", samples_per_prompt=20000, n=20000, seed=3, max_tokens=8)
    output = SyntheticGenerator(config)({"prompt_id": np.array(["p"]), "prompt": np.array(["q"]),
                                         "prompt_text": np.array(["q"]), "round": np.array([0])})
    lengths = np.array([len(text) / 10 for text in output["response"][0]])
    probabilities, reward = exact_lengths(8)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12) and set(lengths) <= set(reward.round(10))
    expected = np.array([probabilities[reward.round(10) <= value].sum() for value in (1.0, 2.0, 3.0, 4.0)])
    observed = np.array([np.mean(lengths <= value) for value in (1.0, 2.0, 3.0, 4.0)])
    np.testing.assert_allclose(observed, expected, atol=4 * np.sqrt(0.25 / lengths.size))  # the CDF, to 4 SE


def test_compare_runs_finds_the_known_difference(runs, tmp_path, capsys):
    assert main(["compare-runs", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path), "--kl", "0.05,0.1,0.2,0.5"]) == 0
    printed = capsys.readouterr().out
    for name in ("frontier_diff.parquet", "frontier_diff.md", "frontier_diff.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
        assert f"wrote {tmp_path / name}" in printed
    table = pq.read_table(tmp_path / "frontier_diff.parquet")
    at_kl = table.filter(pc.equal(table["at"], "kl")).to_pylist()
    assert [row["kl_a"] for row in at_kl] == [0.05, 0.1, 0.2, 0.5]
    truth = exact_length_frontier(12, np.array([0.05, 0.1, 0.2, 0.5])) - exact_length_frontier(8, np.array([0.05, 0.1, 0.2, 0.5]))
    assert np.all(truth > 0.1)
    trusted = 0
    for row, exact in zip(at_kl, truth):
        assert row["basis"] == "paired" and row["prompts_common"] == 12 and row["verdict"] == "higher"
        if row["trusted_a"] and row["trusted_b"]:
            trusted += 1
            assert row["ci_low"] <= exact <= row["ci_high"], (row, exact)
    assert trusted >= 2
    text = (tmp_path / "frontier_diff.md").read_text()
    assert "## align length, eval length" in text and "**higher**" in text and "12 prompts in both." in text


def test_two_runs_of_one_setup_are_not_distinguishable(runs, tmp_path):
    assert main(["compare-runs", str(runs / "a"), str(runs / "a_again"), "--out", str(tmp_path)]) == 0
    table = pq.read_table(tmp_path / "frontier_diff.parquet")
    assert set(table.filter(pc.equal(table["at"], "kl"))["verdict"].to_pylist()) == {"not distinguishable"}
    assert set(table.filter(pc.equal(table["at"], "beta"))["beta_a"].to_pylist()) == set(
        pq.read_table(runs / "a" / "frontier_mean.parquet")["beta"].to_pylist())


def test_compare_runs_names_what_it_cannot_compare(runs, tmp_path, capsys):
    assert main(["compare-runs", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path), "--align", "nope"]) == 2
    assert "share no (align, eval) frontier among the ones asked for" in capsys.readouterr().err
    assert main(["compare-runs", str(runs / "a"), str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "frontier_mean.parquet does not exist: point compare-runs at" in capsys.readouterr().err
