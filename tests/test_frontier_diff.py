"""The difference of two frontiers paired by prompt (core/frontier_diff.py), on simulated prompts.

The per-prompt plug-in gain and KL of simulated rewards are computed here with numpy (the estimators
of MATH.md, checked against the core's reduce in the first test) so that hundreds of simulated run
pairs take seconds. Families: Gaussian prompts of different spreads (the design family), and, fixed in
advance as the hold-out, discrete scores 0..4 with ties and a cell that mixes both.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.exact import finite_tilt, gaussian_gain, gaussian_kl
from limits_ray.core.frontier import mean_frontier, point_at_kl
from limits_ray.core.frontier_diff import gain_at_kl, kl_terms, pair_difference, prompt_grid, quantile, verdict
from limits_ray.core.tables import reduce_table

BETAS = np.geomspace(0.3, 10, 15)
BUDGETS = np.array([0.05, 0.2, 0.5])
SCORES = np.arange(5.0)


def plug_in(rewards: np.ndarray, betas: np.ndarray = BETAS) -> tuple[np.ndarray, np.ndarray]:
    """rewards ``[..., P, N]`` -> plug-in gain and KL ``[..., P, B]`` (``w = exp(r/beta)``)."""
    logw = rewards[..., None, :] / betas[:, None]
    top = logw.max(axis=-1, keepdims=True)
    w = np.exp(logw - top)
    total = w.sum(axis=-1)
    tilted = (w * rewards[..., None, :]).sum(axis=-1) / total
    gain = tilted - rewards.mean(axis=-1)[..., None]
    kl = tilted / betas - (np.log(total / rewards.shape[-1]) + top[..., 0])
    return gain, kl


def frontier_table(gain: np.ndarray, kl: np.ndarray, prompt_ids: list[str], betas: np.ndarray = BETAS) -> pa.Table:
    """A per-prompt frontier table of one (align, eval) = (r, r) (SE columns a constant 0.01: the prompt mean
    gives an error bar, and the spread SE, only where every prompt has one)."""
    prompts, count = gain.shape
    se = np.full(prompts * count, 0.01)
    return pa.table({
        "prompt_id": np.repeat(prompt_ids, count), "align": ["r"] * (prompts * count), "eval": ["r"] * (prompts * count),
        "beta": np.tile(betas, prompts), "n": np.ones(prompts * count, np.int64), "gain": gain.ravel(), "gain_se": se,
        "kl": kl.ravel(), "kl_se": se, "gain_bc": gain.ravel(), "kl_bc": kl.ravel(), "reliable": np.ones(prompts * count, bool),
    })


def compare(rewards_a: np.ndarray, rewards_b: np.ndarray, ids_a: list[str], ids_b: list[str], betas: bool = False):
    table_a, table_b = frontier_table(*plug_in(rewards_a), ids_a), frontier_table(*plug_in(rewards_b), ids_b)
    return pair_difference(table_a, table_b, mean_frontier(table_a), mean_frontier(table_b), "r", "r", BUDGETS, betas=betas)


def ids(count: int, start: int = 0) -> list[str]:
    return [f"p{index:03d}" for index in range(start, start + count)]


def discrete(rng, probabilities: np.ndarray, samples: int) -> np.ndarray:
    """Scores 0..4 (ties) per prompt from its probabilities ``[P, 5]``."""
    cumulative = np.cumsum(probabilities, axis=-1)
    draws = rng.random(probabilities.shape[:-1] + (samples,))
    return (draws[..., None] > cumulative[..., None, :]).sum(axis=-1).astype(np.float64)


def test_the_simulated_plug_in_is_the_reduce():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(3, 200)) * np.array([[0.5], [1.0], [2.0]])
    table = pa.table({"prompt_id": np.repeat(ids(3), 200), "sample_idx": np.tile(np.arange(200), 3), "r": rewards.ravel()})
    reduced = reduce_table(table, ["r"], AnalysisConfig(betas=",".join(map(repr, BETAS.tolist())), best_of_n=False,
                                                        convergence=False)).frontier.sort_by([("prompt_id", "ascending"),
                                                                                              ("beta", "ascending")])
    gain, kl = plug_in(rewards)
    np.testing.assert_allclose(reduced["gain"].to_numpy(), gain.ravel(), rtol=1e-10)
    np.testing.assert_allclose(reduced["kl"].to_numpy(), kl.ravel(), rtol=1e-9, atol=1e-12)


def test_gain_at_kl_interpolates_the_mean_frontier_and_its_errors():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(4, 300)) * np.array([[0.5], [1.0], [1.5], [2.0]])
    table = frontier_table(*plug_in(rewards), ids(4))
    table = table.set_column(table.schema.get_field_index("gain_se"), "gain_se", pa.array(np.full(table.num_rows, 0.1)))
    mean = mean_frontier(table)
    point = gain_at_kl(mean, 0.3, "r", "r")
    reference = point_at_kl(mean, 0.3, "r", "r")
    assert (point.gain, point.beta, point.trusted) == (reference.gain, reference.beta, reference.trusted)
    assert point.se == pytest.approx(0.1 / 2) and point.prompts == 4
    assert point.interval == pytest.approx((point.gain - 1.96 * 0.05, point.gain + 1.96 * 0.05), rel=1e-4)
    spread = mean.sort_by("kl")
    assert point.spread_se == pytest.approx(np.interp(0.3, spread["kl"].to_numpy(), spread["gain_spread_se"].to_numpy()))
    assert gain_at_kl(mean, 1e6, "r", "r") is None
    with pytest.raises(ValueError, match="no frontier for align='x'"):
        gain_at_kl(mean, 0.3, "x", "r")


def test_kl_terms_average_to_the_gain_at_the_budget():
    rng = np.random.default_rng(2)
    gain, kl = plug_in(rng.normal(size=(6, 400)) * rng.uniform(0.5, 2, size=(6, 1)))
    table = frontier_table(gain, kl, ids(6))
    terms, beta = kl_terms(prompt_grid(table, "r", "r"), BUDGETS)
    for index, budget in enumerate(BUDGETS):
        point = point_at_kl(mean_frontier(table), budget, "r", "r")
        assert terms[:, index].mean() == pytest.approx(point.gain, rel=1e-12)
        assert beta[index] == pytest.approx(point.beta, rel=1e-12)


def test_the_same_tables_differ_by_nothing_and_the_unpaired_errors_are_the_spread_errors():
    rng = np.random.default_rng(3)
    rewards_a = rng.normal(size=(5, 300)) * rng.uniform(0.5, 2, size=(5, 1))
    same = compare(rewards_a, rewards_a, ids(5), ids(5), betas=True).table
    assert set(same["verdict"].to_pylist()) == {"not distinguishable"}
    assert np.all(same["diff_paired"].to_numpy() == 0) and np.all(same["diff_se_paired"].to_numpy() == 0)
    rewards_b = rng.normal(size=(5, 300))
    other = compare(rewards_a, rewards_b, ids(5), ids(5), betas=True).table
    for row in other.to_pylist():
        assert row["diff"] == pytest.approx(row["gain_b"] - row["gain_a"], rel=1e-9, abs=1e-12)
        assert row["diff_paired"] == pytest.approx(row["diff"], rel=1e-9, abs=1e-12)  # the same prompts
        assert row["basis"] == "paired" and row["prompts_common"] == 5
        half = quantile(4) * row["diff_se_paired"]
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((row["diff_paired"] - half, row["diff_paired"] + half))
    at_beta = other.filter(pa.compute.equal(other["at"], "beta"))
    assert at_beta["beta_a"].to_pylist() == pytest.approx(BETAS.tolist())
    spread = [mean_frontier(frontier_table(*plug_in(rewards), ids(5))).sort_by("beta")["gain_spread_se"].to_numpy()
              for rewards in (rewards_a, rewards_b)]
    np.testing.assert_allclose(at_beta["diff_se_unpaired"].to_numpy(), np.hypot(*spread), rtol=1e-9)


def test_prompts_of_one_run_only_are_named_and_left_out_of_the_pairs():
    rng = np.random.default_rng(4)
    result = compare(rng.normal(size=(6, 200)), rng.normal(size=(5, 200)), ids(6), ids(5, start=3))
    assert result.only_a == ["p000", "p001", "p002"] and result.only_b == ["p006", "p007"] and result.common == 3
    assert set(result.table["prompts_common"].to_pylist()) == {3}
    assert set(result.table["prompts_a"].to_pylist()) == {6} and set(result.table["prompts_b"].to_pylist()) == {5}
    disjoint = compare(rng.normal(size=(4, 200)), rng.normal(size=(4, 200)), ids(4), ids(4, start=10))
    assert disjoint.common == 0 and set(disjoint.table["basis"].to_pylist()) == {"unpaired"}
    assert np.all(np.isnan(disjoint.table["diff_paired"].to_numpy()))


def test_verdict():
    assert verdict(1.0, 0.4) == "higher" and verdict(-1.0, 0.4) == "lower"
    assert verdict(1.0, 0.6) == "not distinguishable"
    assert verdict(1.0, 0.4, df=2) == "not distinguishable"  # t_2(0.975) = 4.30
    assert verdict(1.0, math.nan) == "unknown" and verdict(1.0, 0.1, df=0) == "unknown"
    assert quantile(math.inf) == pytest.approx(1.959964) and quantile(2) == pytest.approx(4.302653)


def _family(name: str, rng, prompts: int):
    """A family of prompts: a sampler ``(change, samples, draw) -> rewards [P, N]`` of one run, and the
    exact prompt-mean frontier's gain at given KL budgets for a change (the frontier's prompt mean at one
    beta, as frontier_mean defines it). A change scales a Gaussian prompt's spread by ``1 + change`` and
    tilts a discrete prompt's scores by ``exp(change * score)``."""
    sigma = rng.uniform(0.5, 1.5, prompts)
    centre = rng.normal(0, 2, prompts)
    probabilities = rng.dirichlet(np.ones(5) * 2, prompts)
    gaussian = np.full(prompts, name == "gaussian") if name != "mixed" else np.arange(prompts) < prompts // 2

    def moved(change: float) -> np.ndarray:
        tilted = probabilities * np.exp(change * SCORES)
        return tilted / tilted.sum(axis=1, keepdims=True)

    def sample(change: float, samples: int, draw) -> np.ndarray:
        normal = centre[:, None] + (1 + change) * sigma[:, None] * draw.normal(size=(prompts, samples))
        return np.where(gaussian[:, None], normal, discrete(draw, moved(change), samples))

    def exact(change: float, budgets: np.ndarray) -> np.ndarray:
        betas = np.geomspace(0.05, 50, 400)
        gain, kl = np.zeros(betas.size), np.zeros(betas.size)
        for prompt in range(prompts):
            if gaussian[prompt]:
                gain += gaussian_gain((1 + change) * sigma[prompt], betas)
                kl += gaussian_kl((1 + change) * sigma[prompt], betas)
            else:
                tilts = [finite_tilt(moved(change)[prompt], SCORES, SCORES, beta) for beta in betas]
                gain += [tilt.gain[0] for tilt in tilts]
                kl += [tilt.kl for tilt in tilts]
        order = np.argsort(kl)
        return np.interp(budgets, kl[order] / prompts, gain[order] / prompts)

    return sample, exact


@pytest.mark.parametrize("family", ["gaussian", "discrete", "mixed"])
def test_two_runs_of_one_setup_differ_at_the_stated_rate(family):
    """150 pairs of independent runs of 20 prompts x 512 samples: a verdict other than 'not distinguishable'
    at a KL budget comes up about 5% of the time (each budget is one 95% test)."""
    rng = np.random.default_rng({"gaussian": 10, "discrete": 11, "mixed": 12}[family])
    prompts, sims = 20, 150
    sample, _ = _family(family, rng, prompts)
    verdicts, ratios = [], []
    for _ in range(sims):
        result = compare(sample(0.0, 512, rng), sample(0.0, 512, rng), ids(prompts), ids(prompts)).table
        assert result.num_rows == BUDGETS.size
        verdicts.append(result["verdict"].to_pylist())
        ratios.append(result["diff_se_unpaired"].to_numpy() / result["diff_se_paired"].to_numpy())
    flagged = np.mean(np.array(verdicts) != "not distinguishable")
    assert 0.015 <= flagged <= 0.09, flagged
    if family != "discrete":  # prompts of different spreads: pairing removes it
        assert np.median(ratios) > 3


@pytest.mark.parametrize("family, change, direction", [("gaussian", 0.2, "higher"), ("discrete", 0.5, "lower"),
                                                       ("mixed", 0.5, None)])
def test_a_known_change_is_found_and_its_interval_covers_it(family, change, direction):
    """B's rewards changed by a known amount (Gaussian prompts: spread x 1.2, so the frontier's gain at KL
    k is x 1.2 exactly, ``sqrt(2 k mean sigma^2)``; scores: each prompt's distribution tilted toward its
    high scores, which leaves less to gain; exact by enumeration): the verdict finds the direction and the
    95% interval covers the exact difference of this prompt set. In the mixed cell the change raises half
    the prompts' frontiers and lowers the others': the paired interval (prompts a sample) is then wide,
    and only its coverage is asserted."""
    rng = np.random.default_rng({"gaussian": 20, "discrete": 21, "mixed": 22}[family])
    prompts, sims = 20, 60
    sample, exact = _family(family, rng, prompts)
    truth = exact(change, BUDGETS) - exact(0.0, BUDGETS)
    if family == "gaussian":
        np.testing.assert_allclose(exact(0.0, BUDGETS) * 1.2, exact(change, BUDGETS), rtol=1e-3)
    covered, verdicts = [], []
    for _ in range(sims):
        result = compare(sample(0.0, 512, rng), sample(change, 512, rng), ids(prompts), ids(prompts)).table
        low, high = result["ci_low"].to_numpy(), result["ci_high"].to_numpy()
        covered.append((low <= truth) & (truth <= high))
        verdicts += result["verdict"].to_pylist()
    assert np.mean(covered) >= 0.9, np.mean(covered, axis=0)
    if direction:
        assert np.mean(np.array(verdicts) == direction) >= 0.95
