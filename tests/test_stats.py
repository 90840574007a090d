"""Tests of limits_ray.core.tilt: mergeable tilt statistics and their estimators.

Reference values come from the formulas of MATH.md computed independently here (direct sums,
per-sample influence functions), from exact enumeration (limits_ray.core.exact) and from Gaussian
closed forms; nothing is copied from the implementation's output.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from limits_ray.core.exact import finite_tilt, gaussian_gain, gaussian_kl
from limits_ray.core.tilt import TiltEstimate, TiltStats

BETAS = np.array([1e-3, 3e-2, 0.5, 1.0, 7.0, 1e2, 1e3])
PROPERTY = settings(
    max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def assert_estimates_close(got: TiltEstimate, want: TiltEstimate, targets: np.ndarray, rtol: float = 1e-12) -> None:
    """``got == want`` to ``rtol`` relative, with an absolute floor scaled to each quantity.

    A relative tolerance alone is meaningless for values that are ~0 because of cancellation
    (the gain and KL at large beta, the gain of a column that is constant, log Z when r_max/beta
    and log mean(w) nearly cancel). Rounding in such a value is of the order eps times the size
    of the terms that cancel, so the absolute floor is ``rtol`` times that size:

    - gain / mean columns: the column's range (resp. its largest magnitude), the size of the
      centred sums the estimator is a ratio of;
    - KL, reverse KL, Jeffreys: ``range(r)/beta + log N + 1``, the size of ``(R - r_max)/beta``
      and ``log mean(w)`` whose difference they are;
    - log Z: ``max|r|/beta + range(r)/beta + 1``;
    - standard errors are compared as variances, whose cancelling terms are of the order
      ``range^2`` (gain) and ``(range(r)/beta + 1)^2`` (KL).
    """
    span = np.ptp(targets, axis=0)
    biggest = np.abs(targets).max(axis=0)
    n = targets.shape[0]
    span_r = span[0]
    kl_scale = span_r / got.betas + math.log(n) + 1
    assert got.n == want.n == n
    np.testing.assert_array_equal(got.betas, want.betas)

    def close(a, b, scale, name):
        a, b = np.asarray(a, float), np.asarray(b, float)
        assert a.shape == b.shape, name
        both_nan = np.isnan(a) & np.isnan(b)
        ok = both_nan | (np.abs(a - b) <= rtol * np.abs(b) + rtol * scale)
        assert ok.all(), f"{name}: got {a[~ok]} want {b[~ok]} (scale {np.broadcast_to(scale, a.shape)[~ok]})"

    close(got.mean_base, want.mean_base, biggest, "mean_base")
    close(got.mean_tilted, want.mean_tilted, biggest[None, :], "mean_tilted")
    close(got.gain, want.gain, span[None, :], "gain")
    close(got.kl, want.kl, kl_scale, "kl")
    close(got.reverse_kl, want.reverse_kl, kl_scale, "reverse_kl")
    close(got.jeffreys, want.jeffreys, kl_scale, "jeffreys")
    close(got.log_z, want.log_z, biggest[0] / got.betas + kl_scale, "log_z")
    close(got.ess, want.ess, 0.0, "ess")
    close(got.gain_se_delta**2, want.gain_se_delta**2, span[None, :] ** 2, "gain_se^2")
    close(got.kl_se_delta**2, want.kl_se_delta**2, (span_r / got.betas + 1) ** 2, "kl_se^2")
    close(got.gain_se**2, want.gain_se**2, span[None, :] ** 2, "interval gain_se^2")
    close(got.kl_se**2, want.kl_se**2, (span_r / got.betas + 1) ** 2, "interval kl_se^2")
    close(got.gain_bc, want.gain_bc, span[None, :], "gain_bc")
    close(got.kl_bc, want.kl_bc, kl_scale, "kl_bc")
    finite = np.isfinite(want.khat)
    np.testing.assert_array_equal(np.isfinite(got.khat), finite)
    np.testing.assert_array_equal(got.khat[~finite], want.khat[~finite])
    close(got.khat[finite], want.khat[finite], 1.0, "khat")
    np.testing.assert_array_equal(got.reliable, want.reliable)


def assert_close(got, want, rtol: float, atol) -> None:
    """``|got - want| <= rtol |want| + atol`` elementwise; ``atol`` may be an array (broadcast)."""
    got, want = np.asarray(got, float), np.asarray(want, float)
    assert got.shape == want.shape
    bound = rtol * np.abs(want) + np.asarray(atol, float)
    bad = ~(np.abs(got - want) <= bound)
    assert not bad.any(), f"got {got[bad]}, want {want[bad]}, |diff| {np.abs(got - want)[bad]} > {np.broadcast_to(bound, got.shape)[bad]}"


def reference(targets: np.ndarray, beta: float) -> dict:
    """MATH.md's estimators and the docstring's influence-function SEs, by direct per-sample sums.

    Written for accuracy, not speed: weights relative to their maximum (no overflow), and the
    KL influence ``w/B ((r-R)/beta - 1) + 1`` as ``-expm1(log(w/B)) + (w/B)(r-R)/beta`` so that
    it keeps its digits at large beta.
    """
    r = targets[:, 0]
    n = r.size
    a = (r - r.max()) / beta
    u = np.exp(a)
    mean_u = u.mean()
    tilted = (u[:, None] * targets).sum(axis=0) / u.sum()
    base = targets.mean(axis=0)
    log_z = r.max() / beta + math.log(mean_u)
    kl = (tilted[0] - r.max()) / beta - math.log(mean_u)
    reverse_kl = (r.max() - base[0]) / beta + math.log(mean_u)
    ratio = u / mean_u
    influence_gain = ratio[:, None] * (targets - tilted) - (targets - base)
    log_ratio = a - math.log(mean_u)
    influence_kl = -np.expm1(log_ratio) + np.exp(log_ratio) * (r - tilted[0]) / beta
    return {
        "gain": tilted - base,
        "kl": kl,
        "reverse_kl": reverse_kl,
        "log_z": log_z,
        "gain_se": np.sqrt((influence_gain**2).sum(axis=0) / (n * (n - 1))),
        "kl_se": math.sqrt((influence_kl**2).sum() / (n * (n - 1))),
        "ess": u.sum() ** 2 / (u * u).sum(),
        "gain_bc": tilted - base + ((u * u)[:, None] * (targets - tilted)).sum(axis=0) / u.sum() ** 2,
        "kl_bc": kl + ((u * u) * (r - tilted[0])).sum() / (beta * u.sum() ** 2)
        - ((u * u).sum() / u.sum() ** 2 - 1 / n) / 2,
        "gain_df": (influence_gain**2).sum(axis=0) ** 2 / (influence_gain**4).sum(axis=0) / 3,  # df = nu / 3 (TiltStats.finalize)
        "kl_df": (influence_kl**2).sum() ** 2 / (influence_kl**4).sum() / 3,
    }


def tree_merge(states: list[TiltStats], data) -> TiltStats:
    """Merge states pairwise in an order and tree shape chosen by hypothesis."""
    pool = list(states)
    while len(pool) > 1:
        i = data.draw(st.integers(0, len(pool) - 1), label="left")
        left = pool.pop(i)
        j = data.draw(st.integers(0, len(pool) - 1), label="right")
        right = pool.pop(j)
        pool.append(left.merge(right))
    return pool[0]


@st.composite
def sample_sets(draw, max_rows: int = 48):
    """``[N, Y]`` rewards: continuous values, integer values (ties) or a single repeated value."""
    rows = draw(st.integers(1, max_rows))
    columns = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["float", "ties", "constant"]))
    if kind == "float":
        elements = st.floats(-20, 20, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    elif kind == "ties":
        elements = st.integers(-3, 3).map(float)
    else:
        elements = st.just(draw(st.floats(-20, 20, allow_nan=False, allow_subnormal=False)))
    return draw(hnp.arrays(np.float64, (rows, columns), elements=elements))


def split_points(data, n: int) -> list[int]:
    """Sorted cut points in [0, n], possibly repeated (empty batches are allowed)."""
    cuts = data.draw(st.lists(st.integers(0, n), max_size=8), label="cuts")
    return sorted(cuts)


# ----------------------------------------------------------------------------------------------
# 1. merge properties
# ----------------------------------------------------------------------------------------------

@PROPERTY
@given(targets=sample_sets(), data=st.data())
def test_any_split_and_any_merge_tree_gives_the_same_estimates(targets, data):
    order = data.draw(st.permutations(range(targets.shape[0])), label="order")
    shuffled = targets[list(order)]
    batches = np.split(shuffled, split_points(data, len(shuffled)))
    states = [TiltStats.from_samples(BETAS, batch) for batch in batches]
    merged = tree_merge(states, data)
    whole = TiltStats.from_samples(BETAS, targets)
    assert merged.n == targets.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # N = 1: the SEs are NaN by design
        assert_estimates_close(merged.finalize(), whole.finalize(), targets)


@PROPERTY
@given(targets=sample_sets(), data=st.data())
def test_sequential_updates_equal_one_batch(targets, data):
    batches = np.split(targets, split_points(data, len(targets)))
    state = TiltStats.empty(BETAS, targets.shape[1])
    for batch in batches:
        state = state.update(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_estimates_close(state.finalize(), TiltStats.from_samples(BETAS, targets).finalize(), targets)


@PROPERTY
@given(a=sample_sets(16), b=sample_sets(16), c=sample_sets(16))
def test_merge_is_associative_and_commutative(a, b, c):
    columns = min(a.shape[1], b.shape[1], c.shape[1])
    a, b, c = a[:, :columns], b[:, :columns], c[:, :columns]
    sa, sb, sc = (TiltStats.from_samples(BETAS, x) for x in (a, b, c))
    union = np.concatenate([a, b, c])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        left = sa.merge(sb).merge(sc).finalize()
        right = sa.merge(sb.merge(sc)).finalize()
        assert_estimates_close(left, right, union)
        assert_estimates_close(sb.merge(sa).finalize(), sa.merge(sb).finalize(), np.concatenate([a, b]))
        assert_estimates_close(sc.merge(sa.merge(sb)).finalize(), left, union)


@PROPERTY
@given(targets=sample_sets())
def test_merge_with_empty_is_identity(targets):
    state = TiltStats.from_samples(BETAS, targets)
    for empty in (TiltStats.empty(BETAS, targets.shape[1]), TiltStats.from_samples(BETAS, targets[:0])):
        for merged in (state.merge(empty), empty.merge(state)):
            assert merged.n == state.n
            assert merged.r_max == state.r_max
            np.testing.assert_array_equal(merged.shift, state.shift)
            np.testing.assert_array_equal(merged.moments, state.moments)
    both_empty = TiltStats.empty(BETAS, 2).merge(TiltStats.empty(BETAS, 2))
    assert both_empty.n == 0


def test_merge_does_not_modify_its_operands():
    rng = np.random.default_rng(1)
    a = TiltStats.from_samples(BETAS, rng.normal(size=(30, 2)))
    b = TiltStats.from_samples(BETAS, rng.normal(3, 2, size=(20, 2)))
    before = [(s.n, s.r_max, s.shift.copy(), s.moments.copy()) for s in (a, b)]
    merged = a.merge(b)
    merged.moments += 1.0  # the result owns its arrays
    for state, (n, r_max, shift, moments) in zip((a, b), before):
        assert (state.n, state.r_max) == (n, r_max)
        np.testing.assert_array_equal(state.shift, shift)
        np.testing.assert_array_equal(state.moments, moments)


def test_merge_rejects_incompatible_states():
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="beta"):
        TiltStats.from_samples([1.0, 2.0], x).merge(TiltStats.from_samples([1.0, 3.0], x))
    with pytest.raises(ValueError, match="column"):
        TiltStats.from_samples([1.0], x).merge(TiltStats.from_samples([1.0], np.ones((3, 3))))


@pytest.mark.parametrize("betas", [[], [1.0, 0.0], [-1.0], [[1.0, 2.0]]])
def test_invalid_betas_raise(betas):
    with pytest.raises(ValueError):
        TiltStats.empty(betas, 1)


def test_invalid_samples_raise():
    with pytest.raises(ValueError):
        TiltStats.from_samples([1.0], np.ones(4))  # 1-d
    with pytest.raises(ValueError):
        TiltStats.from_samples([1.0], np.ones((4, 0)))
    with pytest.raises(ValueError, match="NaN"):
        TiltStats.from_samples([1.0], np.array([[0.0], [np.nan]]))
    with pytest.raises(ValueError, match="NaN|infinite"):
        TiltStats.from_samples([1.0], np.array([[0.0], [np.inf]]))
    with pytest.raises(ValueError, match="empty|no samples"):
        TiltStats.empty([1.0], 1).finalize()


# ----------------------------------------------------------------------------------------------
# 2. numerics
# ----------------------------------------------------------------------------------------------

NUMERIC_BETAS = np.geomspace(1e-3, 1e3, 19)


def gaussian_targets(seed: int, n: int, sigma: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, sigma, n)
    e = 0.6 * r + rng.normal(0.0, 0.8, n)
    return np.stack([r, e], axis=1)


def finalize_strictly(targets: np.ndarray, betas: np.ndarray) -> TiltEstimate:
    """from_samples + finalize with overflow, invalid operations and divisions by zero as errors."""
    with np.errstate(over="raise", invalid="raise", divide="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        return TiltStats.from_samples(betas, targets).finalize()


def test_constant_offsets_of_1e4_do_not_change_gain_or_kl():
    targets = gaussian_targets(2, 3000)
    plain = finalize_strictly(targets, NUMERIC_BETAS)
    for offset in ([1e4, 0.0], [0.0, 1e4], [1e4, -1e4], [-1e4, 1e4]):
        shifted = finalize_strictly(targets + np.array(offset), NUMERIC_BETAS)
        np.testing.assert_allclose(shifted.gain, plain.gain, rtol=1e-6, atol=0)
        np.testing.assert_allclose(shifted.kl, plain.kl, rtol=1e-6, atol=0)
        np.testing.assert_allclose(shifted.reverse_kl, plain.reverse_kl, rtol=1e-6, atol=0)
        np.testing.assert_allclose(shifted.ess, plain.ess, rtol=1e-6, atol=0)
        np.testing.assert_allclose(shifted.gain_se_delta, plain.gain_se_delta, rtol=1e-6, atol=0)
        # log Z moves by exactly offset/beta (compare the remainder at the scale of log Z's terms).
        assert_close(shifted.log_z - offset[0] / NUMERIC_BETAS, plain.log_z, rtol=0, atol=1e-12 * (1e4 / NUMERIC_BETAS + 1))
        np.testing.assert_allclose(shifted.mean_base - offset, plain.mean_base, rtol=0, atol=1e-8)


def test_offsets_keep_kl_se_within_its_reference():
    """kl_se with an offset of 1e4 against the direct influence-function sum on unshifted data."""
    targets = gaussian_targets(3, 3000)
    shifted = finalize_strictly(targets + 1e4, NUMERIC_BETAS)
    for b, beta in enumerate(NUMERIC_BETAS):
        ref = reference(targets, beta)
        np.testing.assert_allclose(shifted.kl_se_delta[b], ref["kl_se"], rtol=kl_se_rtol(beta, targets[:, 0].std()))


def test_small_beta_with_spread_rewards_is_finite_and_exact():
    rng = np.random.default_rng(4)
    r = rng.uniform(-5.0, 4.9, 500)
    r[rng.integers(500)] = 5.0
    e = rng.normal(size=500)
    targets = np.stack([r, e], axis=1)
    est = finalize_strictly(targets, np.array([1e-3]))
    top = np.argmax(r)
    gap = np.sort(r)[-1] - np.sort(r)[-2]
    assert gap / 1e-3 > 40  # the tilt puts all its mass on the best sample
    for value in (est.gain, est.gain_se_delta, est.kl, est.kl_se_delta, est.log_z, est.reverse_kl, est.ess):
        assert np.all(np.isfinite(value))
    np.testing.assert_allclose(est.gain[0], [r[top] - r.mean(), e[top] - e.mean()], rtol=1e-12)
    np.testing.assert_allclose(est.kl, math.log(500), rtol=1e-12)
    np.testing.assert_allclose(est.log_z, r[top] / 1e-3 - math.log(500), rtol=1e-12)
    np.testing.assert_allclose(est.ess, 1.0, rtol=1e-12)


def test_extreme_betas_with_large_offsets_are_finite():
    targets = gaussian_targets(5, 200, sigma=3.0) + 1e4
    est = finalize_strictly(targets, np.array([1e-3, 1e-2, 1e3, 1e6]))
    for value in (est.gain, est.gain_se_delta, est.kl, est.kl_se_delta, est.log_z, est.reverse_kl, est.jeffreys, est.ess):
        assert np.all(np.isfinite(value))
    assert np.all(est.kl >= -1e-12) and np.all(est.reverse_kl >= -1e-12)


def kl_se_rtol(beta: float, sigma: float) -> float:
    """Tolerance for kl_se against the direct influence sum.

    finalize() forms sum IF^2 from one-pass moments, ``n^2/s0^2 (...) - n``: at large beta the
    terms are O(N) and the result O(N (sigma/beta)^4), so it keeps about
    ``-log10(eps (beta/sigma)^4)`` digits. Below that floor we demand 1e-6; for beta = 1e3,
    sigma = 1 the allowance is ~2e-2 (observed ~5e-4).
    """
    return max(1e-6, 100 * np.finfo(float).eps * (beta / sigma) ** 4)


@pytest.mark.parametrize("beta", NUMERIC_BETAS)
def test_estimates_and_standard_errors_match_direct_sums(beta):
    targets = gaussian_targets(6, 9001)  # more than two update chunks of 4096 rows, and a remainder
    est = finalize_strictly(targets, np.array([beta]))
    ref = reference(targets, beta)
    scale = np.ptp(targets, axis=0)
    np.testing.assert_allclose(est.gain[0], ref["gain"], rtol=1e-9, atol=1e-12 * scale.max())
    np.testing.assert_allclose(est.kl[0], ref["kl"], rtol=1e-9, atol=1e-13 * (scale[0] / beta + 1))
    np.testing.assert_allclose(est.reverse_kl[0], ref["reverse_kl"], rtol=1e-9, atol=1e-13 * (scale[0] / beta + 1))
    np.testing.assert_allclose(est.log_z[0], ref["log_z"], rtol=1e-12, atol=1e-13 * (scale[0] / beta + 1))
    np.testing.assert_allclose(est.ess[0], ref["ess"], rtol=1e-10)
    np.testing.assert_allclose(est.gain_se_delta[0], ref["gain_se"], rtol=1e-6)
    np.testing.assert_allclose(est.kl_se_delta[0], ref["kl_se"], rtol=kl_se_rtol(beta, targets[:, 0].std()))
    np.testing.assert_allclose(est.mean_tilted[0], est.gain[0] + est.mean_base, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(est.mean_base, targets.mean(axis=0), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# 3. exact values
# ----------------------------------------------------------------------------------------------

# A small response set: base probabilities, alignment reward r (with a tie between responses 1
# and 4 that have different e) and a second evaluation reward e.
COUNTS = np.array([7, 3, 12, 5, 9, 1, 6, 2])
PROBS = COUNTS / COUNTS.sum()
R = np.array([0.3, 1.7, -0.4, 2.9, 1.7, 4.0, 0.9, -1.5])
E = np.array([1.0, -0.5, 0.2, 2.5, 3.1, 0.7, -1.2, 0.4])
FINITE_BETAS = np.array([0.05, 0.3, 1.0, 3.0, 50.0])


def exact_columns(beta: float):
    """Exact gain [r, e], KL, reverse KL, log Z of the response set at ``beta``."""
    exact = finite_tilt(PROBS, R, np.stack([R, E], axis=1), beta)
    return exact.gain, exact.kl, exact.reverse_kl, exact.log_z


def test_sample_set_reproducing_the_distribution_gives_the_exact_values():
    """Each response repeated count_i times is pi0 exactly: the estimates are the exact values."""
    repeated = np.repeat(np.stack([R, E], axis=1), COUNTS * 25, axis=0)
    rng = np.random.default_rng(7)
    repeated = repeated[rng.permutation(len(repeated))]
    states = [TiltStats.from_samples(FINITE_BETAS, part) for part in np.array_split(repeated, 7)]
    merged = states[3].merge(states[0]).merge(states[6].merge(states[1])).merge(
        states[2].merge(states[5]).merge(states[4]))
    for est in (TiltStats.from_samples(FINITE_BETAS, repeated).finalize(), merged.finalize()):
        for b, beta in enumerate(FINITE_BETAS):
            gain, kl, reverse_kl, log_z = exact_columns(beta)
            # rtol 1e-12 plus a floor of 1e-13 x the size of the cancelling terms (see
            # assert_estimates_close) for the near-zero gain and KL at beta = 50.
            np.testing.assert_allclose(est.gain[b], gain, rtol=1e-12, atol=1e-13 * np.ptp(R))
            np.testing.assert_allclose(est.kl[b], kl, rtol=1e-12, atol=1e-13 * (np.ptp(R) / beta))
            np.testing.assert_allclose(est.reverse_kl[b], reverse_kl, rtol=1e-12, atol=1e-13 * (np.ptp(R) / beta))
            np.testing.assert_allclose(est.log_z[b], log_z, rtol=1e-12, atol=1e-13 * (np.abs(R).max() / beta))
            np.testing.assert_allclose(est.jeffreys[b], kl + reverse_kl, rtol=1e-12, atol=1e-13 * (np.ptp(R) / beta))


def test_sampled_discrete_distribution_matches_enumeration_within_standard_errors():
    rng = np.random.default_rng(8)
    n = 40_000
    index = rng.choice(len(PROBS), size=n, p=PROBS)
    targets = np.stack([R[index], E[index]], axis=1)
    est = TiltStats.from_samples(FINITE_BETAS, targets).finalize()
    for b, beta in enumerate(FINITE_BETAS):
        gain, kl, reverse_kl, log_z = exact_columns(beta)
        assert np.all(np.abs(est.gain[b] - gain) <= 4 * est.gain_se_delta[b]), (beta, est.gain[b], gain, est.gain_se_delta[b])
        assert abs(est.kl[b] - kl) <= 4 * est.kl_se_delta[b], (beta, est.kl[b], kl, est.kl_se_delta[b])
        # log Z and the reverse KL have no SE in the estimate: their delta-method SEs are
        # sd(w/mean(w))/sqrt(N) and sd(w/mean(w) - r/beta)/sqrt(N), computed here.
        ratio = np.exp((targets[:, 0] - targets[:, 0].max()) / beta)
        ratio /= ratio.mean()
        log_z_se = ratio.std(ddof=1) / math.sqrt(n)
        reverse_se = (ratio - targets[:, 0] / beta).std(ddof=1) / math.sqrt(n)
        assert abs(est.log_z[b] - log_z) <= 4 * log_z_se, (beta, est.log_z[b], log_z)
        assert abs(est.reverse_kl[b] - reverse_kl) <= 4 * reverse_se, (beta, est.reverse_kl[b], reverse_kl)
        assert est.gain_se_delta[b].min() > 0 and est.kl_se_delta[b] > 0


def test_gaussian_rewards_give_sigma2_over_beta_and_sigma2_over_2beta2():
    sigma = 1.5
    n = 200_000
    betas = np.array([1.2, 2.0, 5.0, 20.0, 100.0])
    r = np.random.default_rng(9).normal(3.0, sigma, n)
    est = TiltStats.from_samples(betas, r[:, None]).finalize()
    assert np.all(est.ess > 0.1 * n)
    z_gain = (est.gain[:, 0] - gaussian_gain(sigma, betas)) / est.gain_se_delta[:, 0]
    z_kl = (est.kl - gaussian_kl(sigma, betas)) / est.kl_se_delta
    assert np.all(np.abs(z_gain) < 4), z_gain
    assert np.all(np.abs(z_kl) < 4), z_kl
    # the SEs are of the right size: the scale of a Gaussian's fluctuation, not inflated
    assert np.all(est.gain_se_delta[:, 0] < 5 * sigma / math.sqrt(n) * np.sqrt(np.exp(sigma**2 / betas**2)))


def test_theorem_1_gain_of_r_is_beta_times_jeffreys():
    for seed, offset in ((10, 0.0), (11, 37.0)):
        targets = gaussian_targets(seed, 4000, sigma=2.0) + offset
        est = TiltStats.from_samples(NUMERIC_BETAS, targets).finalize()
        np.testing.assert_allclose(est.gain[:, 0], est.betas * est.jeffreys, rtol=1e-9, atol=0)
        np.testing.assert_allclose(est.jeffreys, est.kl + est.reverse_kl, rtol=1e-12, atol=0)
        assert np.all(est.kl > 0) and np.all(est.reverse_kl > 0)


def test_huge_beta_gives_full_ess_and_no_gain():
    targets = gaussian_targets(12, 1234)
    est = TiltStats.from_samples(np.array([1e9, 1e12]), targets).finalize()
    np.testing.assert_allclose(est.ess, 1234, rtol=1e-9)
    np.testing.assert_allclose(est.gain, 0.0, atol=1e-7)
    np.testing.assert_allclose(est.kl, 0.0, atol=1e-14)
    np.testing.assert_allclose(est.mean_tilted, est.mean_base + est.gain, rtol=1e-12)


def test_two_point_set_by_hand():
    """r = (0, 1), beta = 1: w = (1, e); everything in closed form."""
    est = TiltStats.from_samples(np.array([1.0]), np.array([[0.0, 5.0], [1.0, -1.0]])).finalize()
    tilted_r = math.e / (1 + math.e)
    log_z = math.log((1 + math.e) / 2)
    np.testing.assert_allclose(est.gain[0], [tilted_r - 0.5, (5 - math.e) / (1 + math.e) - 2.0], rtol=1e-14)
    np.testing.assert_allclose(est.log_z[0], log_z, rtol=1e-14)
    np.testing.assert_allclose(est.kl[0], tilted_r - log_z, rtol=1e-13)
    np.testing.assert_allclose(est.reverse_kl[0], log_z - 0.5, rtol=1e-13)
    np.testing.assert_allclose(est.ess[0], (1 + math.e) ** 2 / (1 + math.e**2), rtol=1e-14)


def test_constant_rewards_give_no_gain_and_no_kl():
    targets = np.column_stack([np.full(50, 2.5), np.linspace(-1, 1, 50)])
    est = TiltStats.from_samples(np.array([1e-3, 1.0, 1e3]), targets).finalize()
    np.testing.assert_array_equal(est.gain, 0.0)
    np.testing.assert_allclose(est.kl, 0.0, atol=1e-15)
    np.testing.assert_allclose(est.reverse_kl, 0.0, atol=1e-15)
    np.testing.assert_allclose(est.log_z, 2.5 / est.betas, rtol=1e-14)
    np.testing.assert_allclose(est.ess, 50, rtol=1e-14)


def test_single_sample_has_undefined_standard_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        est = TiltStats.from_samples(np.array([1.0]), np.array([[1.0, 2.0]])).finalize()
    assert est.n == 1
    np.testing.assert_array_equal(est.gain, 0.0)
    assert np.all(np.isnan(est.gain_se_delta)) and np.all(np.isnan(est.kl_se_delta))


# ----------------------------------------------------------------------------------------------
# 4. coverage of the 95% intervals
# ----------------------------------------------------------------------------------------------

def test_95_percent_intervals_cover_the_exact_values():
    """400 independent prompts, Gaussian rewards: gain +- 1.96 se covers sigma^2/beta ~95% of the time.

    With 400 trials the coverage count is Binomial(400, 0.95): sd 1.1%, so [0.90, 0.99] is a
    > 3.5 sd band. The seed is fixed; the band held for each of 30 seeds tried (0.91 - 0.97).
    """
    prompts, n, sigma = 400, 2000, 1.0
    # beta >= 1.5 sigma: the weights exp(r/beta) are light-tailed enough for the delta method
    # (at beta = sigma, KL coverage drops to ~0.9 at this N).
    betas = np.array([1.5, 2.0, 4.0])
    rewards = np.random.default_rng(13).normal(0.0, sigma, (prompts, n))
    gains, gain_ses, kls, kl_ses, ess = (np.empty((prompts, betas.size)) for _ in range(5))
    for p in range(prompts):
        est = TiltStats.from_samples(betas, rewards[p, :, None]).finalize()
        gains[p], gain_ses[p], kls[p], kl_ses[p], ess[p] = est.gain[:, 0], est.gain_se_delta[:, 0], est.kl, est.kl_se_delta, est.ess
    assert ess.min() > 0.2 * n
    gain_cover = (np.abs(gains - gaussian_gain(sigma, betas)) <= 1.96 * gain_ses).mean(axis=0)
    kl_cover = (np.abs(kls - gaussian_kl(sigma, betas)) <= 1.96 * kl_ses).mean(axis=0)
    assert np.all((gain_cover >= 0.90) & (gain_cover <= 0.99)), gain_cover
    assert np.all((kl_cover >= 0.90) & (kl_cover <= 0.99)), kl_cover


# ----------------------------------------------------------------------------------------------
# reliability: k-hat, the flag, bias corrections and interval standard errors
# ----------------------------------------------------------------------------------------------

def test_bias_corrections_and_interval_ses_match_direct_sums():
    """gain_bc, kl_bc and t-scaled SEs against per-sample sums (N = 600 <= tail cap: nu is exact)."""
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(11)
    targets = np.stack([rng.normal(size=600), rng.standard_t(5, size=600)], axis=1) + 50.0
    betas = np.array([0.7, 1.0, 3.0, 30.0])
    est = TiltStats.from_samples(betas, targets).finalize()
    assert est.reliable.all()
    for b, beta in enumerate(betas):
        ref = reference(targets, beta)
        np.testing.assert_allclose(est.gain_bc[b], ref["gain_bc"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(est.kl_bc[b], ref["kl_bc"], rtol=1e-8, atol=1e-12)
        t_gain = scipy_stats.t.ppf(0.975, np.maximum(ref["gain_df"], 1)) / scipy_stats.norm.ppf(0.975)
        t_kl = scipy_stats.t.ppf(0.975, max(ref["kl_df"], 1)) / scipy_stats.norm.ppf(0.975)
        np.testing.assert_allclose(est.gain_se[b], ref["gain_se"] * t_gain, rtol=1e-6)
        np.testing.assert_allclose(est.kl_se[b], ref["kl_se"] * t_kl, rtol=kl_se_rtol(beta, 1.0))
        assert np.all(t_gain > 1) and t_kl > 1


def test_weights_dominated_by_one_sample_are_flagged_and_get_no_interval():
    """Gaussian rewards, N = 4096, beta = 0.01 sigma (the issue's case): k-hat far above 0.7, no interval."""
    rng = np.random.default_rng(3)
    est = TiltStats.from_samples(np.array([0.01, 0.1, 2.0]), rng.normal(size=(4096, 1))).finalize()
    assert est.khat[0] > 0.7 and est.khat[1] > 0.7 and est.ess[0] < 2
    np.testing.assert_array_equal(est.reliable, [False, False, True])
    assert np.isnan(est.gain_se[:2]).all() and np.isnan(est.kl_se[:2]).all()
    assert np.isfinite(est.gain_se_delta).all()  # the plain delta-method number is still there
    assert np.isfinite(est.gain_se[2]).all() and est.khat[2] < 0.5


def test_tied_top_rewards_leave_khat_undefined_and_the_ess_decides():
    """Bounded weights (the largest rewards tied) have no tail to fit: k-hat NaN, reliability by ESS."""
    r = np.concatenate([np.full(300, 2.0), np.linspace(-1.0, 1.0, 700)])
    est = TiltStats.from_samples(np.array([0.01, 1.0]), r[:, None]).finalize()
    assert np.isnan(est.khat).all()
    assert est.reliable.all() and np.all(est.ess >= 20)
    lone = TiltStats.from_samples(np.array([0.01]), np.array([[3.0], [2.0], *([[0.0]] * 998)])).finalize()
    assert not lone.reliable[0] and lone.ess[0] < 20  # one sample carries the tilt


def test_tail_keeps_the_top_rows_of_the_union_in_any_merge_order():
    """The tail is the cap largest-r rows (ties broken by the other columns), whatever the splits."""
    rng = np.random.default_rng(5)
    targets = np.stack([rng.integers(0, 6, 400).astype(float), rng.normal(size=400)], axis=1)  # many ties in r
    betas = np.array([1.0])
    whole = TiltStats.from_samples(betas, targets, tail_cap=37)
    order = np.lexsort((-targets[:, 1], -targets[:, 0]))
    np.testing.assert_array_equal(whole.tail, targets[order[:37]])
    for seed in range(5):
        cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, 400), 6, replace=False))
        parts = [TiltStats.from_samples(betas, part, tail_cap=37) for part in np.split(targets, cuts)]
        np.random.default_rng(seed).shuffle(parts)
        merged = parts[0]
        for part in parts[1:]:
            merged = part.merge(merged) if seed % 2 else merged.merge(part)
        np.testing.assert_array_equal(merged.tail, whole.tail)
    with pytest.raises(ValueError, match="tails capped"):
        whole.merge(TiltStats.from_samples(betas, targets, tail_cap=10))


def test_bias_correction_cuts_the_bias_at_moderate_beta():
    """Gaussian rewards, N = 100, beta = 0.7 sigma: the plug-in gain and KL are biased low;
    the corrected ones have at most 60% of it (average over 400 data sets)."""
    rng = np.random.default_rng(8)
    beta = np.array([0.7])
    ests = [TiltStats.from_samples(beta, rng.normal(size=(100, 1))).finalize() for _ in range(400)]
    gain = np.mean([e.gain[0, 0] for e in ests]) - gaussian_gain(1.0, beta)[0]
    gain_bc = np.mean([e.gain_bc[0, 0] for e in ests]) - gaussian_gain(1.0, beta)[0]
    kl = np.mean([e.kl[0] for e in ests]) - gaussian_kl(1.0, beta)[0]
    kl_bc = np.mean([e.kl_bc[0] for e in ests]) - gaussian_kl(1.0, beta)[0]
    assert gain < 0 and abs(gain_bc) < 0.6 * abs(gain), (gain, gain_bc)
    assert kl < 0 and abs(kl_bc) < 0.6 * abs(kl), (kl, kl_bc)
