"""Tests of limits_ray.core.dyadic: dyadic shells and prefix statistics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limits_ray.core.dyadic import DyadicStats, shell_of
from limits_ray.core.tilt import TiltEstimate, TiltStats

BETAS = np.array([0.01, 0.3, 1.0, 10.0, 1e3])
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def assert_estimates_close(got: TiltEstimate, want: TiltEstimate, targets: np.ndarray, rtol: float = 1e-12) -> None:
    """Equal to ``rtol`` relative, plus an absolute floor of ``rtol`` x the size of the terms that
    cancel in each quantity (range of the column for gains; range(r)/beta + log N + 1 for the
    KLs and log Z; squared scales for the SEs, compared as variances). Without it a gain or KL
    that is ~0 at large beta would need rounding noise to agree relatively."""
    span = np.ptp(targets, axis=0)
    kl_scale = span[0] / got.betas + math.log(targets.shape[0]) + 1
    assert got.n == want.n

    def close(a, b, scale, name):
        a, b = np.asarray(a, float), np.asarray(b, float)
        ok = (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= rtol * np.abs(b) + rtol * scale)
        assert ok.all(), f"{name}: {a[~ok]} != {b[~ok]}"

    close(got.gain, want.gain, span[None, :], "gain")
    close(got.mean_base, want.mean_base, np.abs(targets).max(axis=0), "mean_base")
    close(got.kl, want.kl, kl_scale, "kl")
    close(got.reverse_kl, want.reverse_kl, kl_scale, "reverse_kl")
    close(got.log_z, want.log_z, np.abs(targets[:, 0]).max() / got.betas + kl_scale, "log_z")
    close(got.ess, want.ess, 0.0, "ess")
    close(got.gain_se**2, want.gain_se**2, span[None, :] ** 2, "gain_se^2")
    close(got.kl_se**2, want.kl_se**2, (span[0] / got.betas + 1) ** 2, "kl_se^2")
    close(got.gain_bc, want.gain_bc, span[None, :], "gain_bc")
    np.testing.assert_array_equal(got.reliable, want.reliable)
    finite = np.isfinite(want.khat)
    np.testing.assert_array_equal(got.khat[~finite], want.khat[~finite])
    close(got.khat[finite], want.khat[finite], 1.0, "khat")


def finalize(stats: TiltStats) -> TiltEstimate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one sample: NaN SEs by design
        return stats.finalize()


# ----------------------------------------------------------------------------------------------
# shell_of
# ----------------------------------------------------------------------------------------------

def test_shell_of_values():
    idx = np.array([0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 1023, 1024, 2**40, 2**52, 2**53 - 1])
    want = [0, 1, 2, 2, 3, 3, 3, 4, 4, 5, 10, 11, 41, 53, 53]
    assert shell_of(idx).tolist() == want
    # definition: 0 for 0, floor(log2 i) + 1 otherwise
    many = np.arange(1, 5000)
    np.testing.assert_array_equal(shell_of(many), np.floor(np.log2(many)).astype(int) + 1)
    assert shell_of(np.array([], dtype=np.int64)).size == 0
    # shell k covers [2^(k-1), 2^k)
    for k in range(1, 20):
        assert shell_of(np.array([2 ** (k - 1), 2**k - 1])).tolist() == [k, k]


def test_shell_of_rejects_bad_indices():
    with pytest.raises(ValueError, match="non-negative"):
        shell_of(np.array([3, -1]))
    with pytest.raises(ValueError, match="2\\*\\*53"):
        shell_of(np.array([2**53]))


# ----------------------------------------------------------------------------------------------
# prefixes
# ----------------------------------------------------------------------------------------------

@PROPERTY
@given(n=st.integers(1, 140), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_prefixes_equal_stats_of_the_first_2k_samples_in_any_arrival_order(n, seed, data):
    rng = np.random.default_rng(seed)
    targets = np.column_stack([rng.normal(0, 2, n), rng.normal(size=n)])
    if data.draw(st.booleans(), label="ties"):
        targets = np.round(targets)
    idx = np.arange(n)
    arrival = rng.permutation(n)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts"))
    # half the batches go to one DyadicStats, half to another; merged at the end
    first, second = DyadicStats(BETAS, 2), DyadicStats(BETAS, 2)
    for k, batch in enumerate(np.split(arrival, cuts)):
        (first if k % 2 == 0 else second).update(idx[batch], targets[batch])
    dyadic = second.merge(first) if data.draw(st.booleans(), label="swap") else first.merge(second)
    assert dyadic.n == n
    prefixes = list(dyadic.prefixes())
    expected_sizes = [min(2**k, n) for k in range(len(prefixes))]
    assert [p.n for p in prefixes] == expected_sizes
    assert len(prefixes) == (1 if n == 1 else math.ceil(math.log2(n)) + 1)
    for prefix, size in zip(prefixes, expected_sizes):
        want = TiltStats.from_samples(BETAS, targets[:size])
        assert_estimates_close(finalize(prefix), finalize(want), targets[:size])
    assert_estimates_close(finalize(dyadic.total()), finalize(TiltStats.from_samples(BETAS, targets)), targets)


def test_shells_hold_the_right_samples():
    n = 100
    targets = np.arange(n, dtype=float)[:, None]  # reward = sample_idx
    dyadic = DyadicStats(BETAS, 1).update(np.arange(n)[::-1], targets[::-1])
    assert sorted(dyadic.shells) == list(range(8))  # 100 samples: shells 0..7
    for shell, stats in dyadic.shells.items():
        low, high = (0, 1) if shell == 0 else (2 ** (shell - 1), min(2**shell, n))
        assert stats.n == high - low
        assert stats.r_max == high - 1  # the largest reward is the largest index in the shell
        np.testing.assert_allclose(finalize(stats).mean_base, [(low + high - 1) / 2], rtol=1e-14)


def test_total_equals_full_statistics_and_merge_does_not_mutate():
    rng = np.random.default_rng(3)
    targets = rng.normal(size=(300, 3))
    idx = rng.permutation(300)  # sample_idx assigned at random to rows
    a = DyadicStats(BETAS, 3).update(idx[:170], targets[:170])
    b = DyadicStats(BETAS, 3).update(idx[170:], targets[170:])
    shells_before = {k: v.n for k, v in a.shells.items()}
    total = a.merge(b).total()
    assert {k: v.n for k, v in a.shells.items()} == shells_before
    assert total.n == 300
    assert_estimates_close(finalize(total), finalize(TiltStats.from_samples(BETAS, targets)), targets)
    # prefixes are by sample_idx, not by arrival: the first 64 are the rows with idx < 64
    sixty_four = [p for p in a.merge(b).prefixes() if p.n == 64][0]
    assert_estimates_close(finalize(sixty_four), finalize(TiltStats.from_samples(BETAS, targets[idx < 64])),
                           targets[idx < 64])


def test_empty_dyadic_stats():
    empty = DyadicStats(BETAS, 2)
    assert empty.n == 0
    assert list(empty.prefixes()) == []
    assert empty.total().n == 0
    full = DyadicStats(BETAS, 2).update(np.arange(5), np.ones((5, 2)))
    assert empty.merge(full).n == 5 and full.merge(empty).n == 5


# ----------------------------------------------------------------------------------------------
# serialisation
# ----------------------------------------------------------------------------------------------

def assert_same_dyadic(got: DyadicStats, want: DyadicStats) -> None:
    np.testing.assert_array_equal(got.betas, want.betas)
    assert got.n_targets == want.n_targets and got.tail_cap == want.tail_cap
    assert sorted(got.shells) == sorted(want.shells)
    for shell, state in want.shells.items():
        other = got.shells[shell]
        assert (other.n, other.r_max, other.tail_cap) == (state.n, state.r_max, state.tail_cap)
        for name in ("betas", "shift", "moments", "tail"):
            np.testing.assert_array_equal(getattr(other, name), getattr(state, name))


def test_to_bytes_round_trip_keeps_every_field_and_merges_like_the_original():
    rng = np.random.default_rng(9)
    targets = rng.normal(size=(700, 3))
    a = DyadicStats(BETAS, 3, tail_cap=50).update(np.arange(400), targets[:400])
    b = DyadicStats(BETAS, 3, tail_cap=50).update(np.arange(400, 700), targets[400:])
    for state in (a, b, DyadicStats(BETAS, 3)):
        data = state.to_bytes()
        assert isinstance(data, bytes)
        assert_same_dyadic(DyadicStats.from_bytes(data), state)
    merged = DyadicStats.from_bytes(a.to_bytes()).merge(DyadicStats.from_bytes(b.to_bytes()))
    assert_same_dyadic(merged, a.merge(b))
    assert_estimates_close(finalize(merged.total()), finalize(a.merge(b).total()), targets, rtol=0)


def test_from_bytes_refuses_another_format_version():
    data = bytearray(DyadicStats(BETAS, 1).to_bytes())
    data[:8] = np.array([99], dtype="<i8").tobytes()
    with pytest.raises(ValueError, match="format version 99"):
        DyadicStats.from_bytes(bytes(data))
    with pytest.raises(ValueError, match="format version -1"):
        DyadicStats.from_bytes(b"")


def test_merge_refuses_different_tail_caps():
    with pytest.raises(ValueError, match="tails capped"):
        DyadicStats(BETAS, 1, tail_cap=8).merge(DyadicStats(BETAS, 1))
