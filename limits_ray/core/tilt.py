"""Mergeable log-space sufficient statistics of a tilted base distribution, and their estimators.

For one prompt, one alignment reward ``r`` and target rewards ``y_1..y_Y`` (column 0 is ``r``
itself, the others are evaluation rewards), over a grid of betas, :class:`TiltStats` keeps

    moments[p, b, :] = sum_i u_ib^p * [1, y_i - c, (y_i - c)^2, (y_i - c)(r_i - c_r)],   p = 0, 1, 2,
    u_ib = exp((r_i - r_max) / beta_b),

where ``r_max`` is the running maximum of ``r`` and ``c`` a per-column shift (the "online
softmax" of ../shared/MATH.md, "Numerics"), and the *tail*: the rows ``[r, y_2, ..., y_Y]`` of the
``K`` largest ``r`` (``K = tail_cap``, default :data:`limits_ray.core.psis.TAIL_CAP` = 1024), from which
the Pareto k-hat of the weights is fitted at every beta (the ranking by ``r`` is the same for every
beta; the top ``K`` of a union is the top ``K`` of the merged tails). Everything is float64. Two states merge exactly
(up to rounding) by rescaling with ``exp((r_max_old - r_max_new)/beta)`` and re-centring the
polynomial moments; the merge is associative and commutative, so samples may arrive in any
order, in any batches, on any number of machines. The cross products with ``r`` (the last group,
kept for the evaluation columns ``y_2..y_Y`` only: for ``r`` itself it is the square) give the
covariance of a gain with the KL and the slope of the frontier (:meth:`TiltStats.finalize`). Memory of
one state: ``3 B 3Y`` sums plus at most ``K Y`` tail values, float64 (``K Y 8`` bytes = 32 KiB at ``Y = 4``).

:meth:`TiltStats.finalize` turns the sums into the Monte Carlo estimators of Def. 1 and Def. 2
of the paper, their delta-method standard errors, the Kish effective sample size, the PSIS k-hat
and the reliability flag, first-order bias-corrected estimates and the interval standard errors
(../shared/MATH.md, "Reliability of the importance weights").
No Ray or vLLM import here: this module is the functional core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import stdtrit

from limits_ray.core.psis import TAIL_CAP, khat_many, tail_size
from limits_ray.core.reliability import khat_thresholds, own_reliable

__all__ = ["TiltEstimate", "TiltStats", "finalize_many", "interval_ratio", "moment_columns", "recentre_matrix"]

_Z975 = 1.959963984540054
_DF_DIVISOR = 3.0  # df = nu / 3 (see TiltStats.finalize)

_CHUNK_ROWS = 4096  # rows per update chunk: bounds the [2B + 1, rows] work buffers (about 4 MiB at B = 64)


def moment_columns(y_count: int) -> int:
    """Sums kept per (power, beta) for ``y_count`` target columns: ``[1, y, y^2]`` and ``y r`` for ``y != r``: ``3Y``."""
    return 3 * y_count


@dataclass
class TiltEstimate:
    """Per-beta estimates for one prompt (Def. 1, Def. 2, Theorem 1).

    Shapes: ``B`` betas, ``Y`` target columns (column 0 is the alignment reward); from
    :func:`finalize_many`, every field has a leading axis of ``S`` states (``n`` an ``[S]`` array).

    Attributes:
        betas: ``[B]`` the KL penalties.
        n: number of base samples.
        log_z: ``[B]`` ``log Zhat = log mean_i exp(r_i/beta)``.
        mean_base: ``[Y]`` ``mean_i y_i`` (the estimate of ``E_pi0[y]``).
        mean_tilted: ``[B, Y]`` ``sum_i w_i y_i / sum_i w_i`` (the estimate of ``E_pi_beta[y]``).
        gain: ``[B, Y]`` ``mean_tilted - mean_base`` (Theorem 2, Def. 1).
        gain_se: ``[B, Y]`` interval standard error: ``gain_bc +- 1.96 gain_se`` is the 95% interval;
            ``gain_se_delta * t_nu(0.975) / 1.96`` where reliable, NaN elsewhere (see :meth:`TiltStats.finalize`).
        gain_se_delta: ``[B, Y]`` plain delta-method standard error of ``gain``.
        gain_bc: ``[B, Y]`` first-order bias-corrected gain.
        kl: ``[B]`` ``KL(pi_beta||pi0) = E_pi_beta[r]/beta - log Z`` (Def. 2).
        kl_se: ``[B]`` interval standard error of ``kl_bc`` (as ``gain_se``; NaN where not reliable).
        kl_se_delta: ``[B]`` plain delta-method standard error of ``kl``.
        kl_bc: ``[B]`` first-order bias-corrected KL.
        gain_kl_cov: ``[B, Y]`` delta-method covariance of ``gain`` and ``kl`` (the frontier at a fixed KL, see
            :meth:`TiltStats.finalize`).
        gain_dbeta: ``[B, Y]`` ``d gain / d beta`` of the empirical tilt: ``-Cov_w(y, r) / beta^2``.
        kl_dbeta: ``[B]`` ``d KL / d beta`` of the empirical tilt: ``-Var_w(r) / beta^3``; the frontier's slope
            ``d gain / d KL`` is ``gain_dbeta / kl_dbeta`` (``beta`` exactly for ``y = r``).
        reverse_kl: ``[B]`` ``KL(pi0||pi_beta) = log Z - E_pi0[r]/beta``.
        jeffreys: ``[B]`` ``kl + reverse_kl``; Theorem 1: ``gain[:, 0] == betas * jeffreys``.
        ess: ``[B]`` Kish effective sample size ``(sum w)^2 / sum w^2``.
        khat: ``[B]`` Pareto k-hat of the weights (:func:`limits_ray.core.psis.khat`).
        body_sd: standard deviation of the alignment reward ``r`` over the samples below the fitted
            tail (all but the ``M + 1`` largest, ``M`` :func:`limits_ray.core.psis.tail_size`); NaN with
            fewer than 2 such samples. The covariate of the pooled k-hat (:mod:`limits_ray.core.reliability`):
            a spread of the rewards that a missed upper tail hardly moves.
        reliable: ``[B]`` ``khat < min(1 - 1/log10 N, 0.7)`` (or k-hat NaN: tied top rewards) and
            ``ess >= ESS_FLOOR``: the prompt's own test. A k-hat that cannot be fitted for ties is not a
            passed test: the tables' gate (:mod:`limits_ray.core.reliability`) decides such rows from the
            other prompts of their cell; here they count as passing so that their interval SE is computed.
        reward_max: the largest alignment reward.
        top_tied: whether the largest alignment reward occurs more than once, or k-hat is NaN (the
            largest rewards tied): the weights look bounded, and only other prompts can tell whether
            a higher reward was missed.
    """

    betas: np.ndarray
    n: int
    log_z: np.ndarray
    mean_base: np.ndarray
    mean_tilted: np.ndarray
    gain: np.ndarray
    gain_se: np.ndarray
    gain_se_delta: np.ndarray
    gain_bc: np.ndarray
    kl: np.ndarray
    kl_se: np.ndarray
    kl_se_delta: np.ndarray
    kl_bc: np.ndarray
    gain_kl_cov: np.ndarray
    gain_dbeta: np.ndarray
    kl_dbeta: np.ndarray
    reverse_kl: np.ndarray
    jeffreys: np.ndarray
    ess: np.ndarray
    khat: np.ndarray
    body_sd: np.ndarray
    reliable: np.ndarray
    reward_max: np.ndarray
    top_tied: np.ndarray

    def select(self, index: int) -> "TiltEstimate":
        """State ``index`` of a batched estimate (:func:`finalize_many`)."""
        fields = {name: value[index] for name, value in vars(self).items()}
        return TiltEstimate(**{**fields, "n": int(fields["n"])})


def _polynomial(centred: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``[N, Y] -> [3Y, N]``: the rows ``[1, y, y^2, y_2 r, ..., y_Y r]`` whose weighted sums are kept.

    Written into ``out`` (at least ``[3Y, N]``, C-ordered), whose first ``N`` columns are returned.
    """
    y_count, rows = centred.shape[1], centred.shape[0]
    poly = out[:, :rows]
    poly[0] = 1.0
    poly[1 : 1 + y_count] = centred.T
    np.multiply(poly[1 : 1 + y_count], poly[1 : 1 + y_count], out=poly[1 + y_count : 1 + 2 * y_count])
    np.multiply(poly[2 : 1 + y_count], poly[1], out=poly[1 + 2 * y_count :])
    return poly


def recentre_matrix(delta: np.ndarray) -> np.ndarray:
    """Matrix ``M`` with ``P(y + d) = P(y) @ M`` for per-column shifts ``d``, ``P`` the rows of :func:`_polynomial`.

    ``(y + d)^2 = y^2 + 2 d y + d^2`` and ``(y + d)(r + d_r) = y r + d_r y + d r + d d_r``. Moving a state
    from shift ``c_old`` to ``c_new`` uses ``d = c_old - c_new``.
    """
    y_count = delta.shape[0]
    size = moment_columns(y_count)
    matrix = np.eye(size)
    first, second = np.arange(1, 1 + y_count), np.arange(1 + y_count, 1 + 2 * y_count)
    matrix[0, first] = delta
    matrix[0, second] = delta * delta
    matrix[first, second] = 2 * delta
    cross = np.arange(1 + 2 * y_count, size)  # y_j r for j = 2..Y (0-based 1..Y-1)
    others = np.arange(1, y_count)
    matrix[0, cross] = delta[others] * delta[0]
    matrix[1 + others, cross] = delta[0]  # d_r y_j
    matrix[1, cross] = delta[others]  # d_j r
    return matrix


def _top_rows(rows: np.ndarray, cap: int) -> np.ndarray:
    """The ``cap`` rows of largest column 0, descending; ties ordered by the next columns, descending.

    The order is a total order on row values, so the top of a union does not depend on how the
    rows were split or merged.
    """
    if rows.shape[0] > 2 * cap:  # cheap pre-selection: keep every row tied with the cap-th largest r
        cut = np.partition(rows[:, 0], rows.shape[0] - cap)[rows.shape[0] - cap]
        rows = rows[rows[:, 0] >= cut]
    order = np.lexsort(tuple(-rows[:, column] for column in reversed(range(rows.shape[1]))))
    return rows[order[:cap]].copy()


@dataclass
class TiltStats:
    """Mergeable sufficient statistics for one prompt and one alignment reward (see module doc).

    Attributes:
        betas: ``[B]`` the beta grid, positive.
        n: number of samples absorbed.
        r_max: running maximum of the alignment reward (``-inf`` while empty).
        shift: ``[Y]`` centring constants ``c`` of the target columns.
        moments: ``[3, B, 3Y]`` the sums ``sum u^p [1, y-c, (y-c)^2, (y-c)(r-c_r)]``, ``p = 0, 1, 2`` (the
            cross products for the evaluation columns only, see :func:`_polynomial`).
        tail: ``[T, Y]``, ``T <= tail_cap``: the rows of the ``T = min(n, tail_cap)`` largest ``r``
            (uncentred), ordered by ``r`` descending, ties by the other columns descending.
        tail_cap: ``K``, the most rows ``tail`` keeps.
    """

    betas: np.ndarray
    n: int
    r_max: float
    shift: np.ndarray
    moments: np.ndarray
    tail: np.ndarray
    tail_cap: int = TAIL_CAP

    @classmethod
    def empty(cls, betas: np.ndarray, n_targets: int, tail_cap: int = TAIL_CAP) -> "TiltStats":
        """A state with no samples, for ``n_targets`` columns (alignment reward included)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not np.all(betas > 0):
            raise ValueError(f"betas must be a non-empty 1-d array of positive numbers, got {betas!r}")
        if tail_cap < 1:
            raise ValueError(f"tail_cap must be a positive number of rows, got {tail_cap}")
        return cls(
            betas=betas,
            n=0,
            r_max=-np.inf,
            shift=np.zeros(n_targets),
            moments=np.zeros((3, betas.size, moment_columns(n_targets))),
            tail=np.zeros((0, n_targets)),
            tail_cap=int(tail_cap),
        )

    @classmethod
    def from_samples(cls, betas: np.ndarray, targets: np.ndarray, tail_cap: int = TAIL_CAP) -> "TiltStats":
        """Statistics of a batch; ``targets[:, 0]`` is the alignment reward ``r``.

        Args:
            betas: ``[B]`` positive KL penalties.
            targets: ``[N, Y]`` float rewards, finite; column 0 aligns, every column is evaluated.
            tail_cap: rows of the largest ``r`` kept for k-hat (see the class).
        """
        targets = np.asarray(targets, dtype=np.float64)
        if targets.ndim == 2 and targets.shape[0] == 0 and targets.shape[1]:
            return cls.empty(betas, targets.shape[1], tail_cap)
        return cls.from_segments(betas, targets, np.array([0, targets.shape[0] if targets.ndim else 0]), tail_cap)[0]

    @classmethod
    def from_segments(cls, betas: np.ndarray, targets: np.ndarray, bounds: np.ndarray,
                      tail_cap: int = TAIL_CAP) -> list["TiltStats"]:
        """:meth:`from_samples` of each non-empty row segment ``targets[bounds[s]:bounds[s + 1]]``, checked once."""
        targets = np.asarray(targets, dtype=np.float64)
        if targets.ndim != 2 or targets.shape[1] == 0:
            raise ValueError(f"targets must be a 2-d [samples, columns] array, got shape {targets.shape}")
        template = cls.empty(betas, targets.shape[1], tail_cap)
        if not np.all(np.isfinite(targets)):
            raise ValueError("targets contain NaN or infinite rewards")
        bounds = np.asarray(bounds, dtype=np.int64)
        if np.any(np.diff(bounds) <= 0):
            raise ValueError(f"segments must be non-empty and in order, got bounds {bounds.tolist()}")
        if bounds.size < 2:
            return []
        inverse_betas = 1.0 / template.betas
        rows = int(min(np.diff(bounds).max(), _CHUNK_ROWS))
        # Work buffers reused by every chunk: the weights u (rows 0..B-1), u^2 (rows B..2B-1) and a
        # row of ones (row 2B, for the plain sums), then the polynomial rows [1, y-c, (y-c)^2, y r].
        weights = np.empty((2 * template.betas.size + 1, rows))
        weights[-1] = 1.0
        poly = np.empty((moment_columns(targets.shape[1]), rows))
        states = []
        for first, stop in zip(bounds[:-1], bounds[1:]):
            segment = targets[first:stop]
            state = cls(template.betas, segment.shape[0], float(segment[:, 0].max()), segment.mean(axis=0),
                        np.zeros_like(template.moments), _top_rows(segment, template.tail_cap), template.tail_cap)
            for start in range(0, state.n, _CHUNK_ROWS):
                state._absorb(segment[start : start + _CHUNK_ROWS], inverse_betas, weights, poly)
            states.append(state)
        return states

    def _absorb(self, block: np.ndarray, inverse_betas: np.ndarray, weights: np.ndarray, poly: np.ndarray) -> None:
        """Add one block's sums in place (shift and r_max already cover the block).

        ``weights`` (``[2B + 1, >= rows]``, last row all ones) and ``poly`` (``[3Y, >= rows]``) are
        scratch buffers. One matrix product gives every sum at once: ``poly @ weights.T`` holds
        the sums of :func:`_polynomial`'s rows times ``u^p`` for ``p = 1`` (columns ``0..B-1``), ``p = 2``
        (``B..2B-1``) and ``p = 0`` (column ``2B``).
        """
        rows, beta_count = block.shape[0], inverse_betas.size
        poly = _polynomial(block - self.shift, poly)
        work = weights[:, :rows]
        tilt = work[:beta_count]
        np.multiply(inverse_betas[:, None], (block[:, 0] - self.r_max)[None, :], out=tilt)
        np.exp(tilt, out=tilt)
        np.multiply(tilt, tilt, out=work[beta_count : 2 * beta_count])
        sums = poly @ work.T  # [3Y, 2B + 1]
        self.moments[0] += sums[:, 2 * beta_count]
        self.moments[1] += sums[:, :beta_count].T
        self.moments[2] += sums[:, beta_count : 2 * beta_count].T

    def update(self, targets: np.ndarray) -> "TiltStats":
        """Return the merge of this state with a batch of samples (see :meth:`from_samples`)."""
        return self.merge(TiltStats.from_samples(self.betas, targets, self.tail_cap))

    def _rebased(self, r_max: float, shift: np.ndarray) -> np.ndarray:
        """This state's moments expressed with another ``r_max`` and ``shift``."""
        if self.n == 0:
            return np.zeros_like(self.moments)
        scale = np.exp((self.r_max - r_max) / self.betas)  # <= 1 when r_max is the larger
        scaled = self.moments * np.stack([np.ones_like(scale), scale, scale * scale])[:, :, None]
        return scaled @ recentre_matrix(self.shift - shift)

    def merge(self, other: "TiltStats") -> "TiltStats":
        """The statistics of the union of both sample sets (exact up to rounding).

        The merged state keeps this state's shift (the other's if this one is empty) and the
        larger ``r_max``; every moment is rescaled by ``exp((r_max_old - r_max_new)/beta)^p``.
        """
        if not np.array_equal(self.betas, other.betas):
            raise ValueError("cannot merge statistics computed on different beta grids")
        if self.shift.shape != other.shift.shape:
            raise ValueError(f"cannot merge {self.shift.size} target columns with {other.shift.size}")
        if self.tail_cap != other.tail_cap:
            raise ValueError(f"cannot merge tails capped at {self.tail_cap} and {other.tail_cap} rows")
        if other.n == 0:
            return self.copy()
        if self.n == 0:
            return other.copy()
        r_max = max(self.r_max, other.r_max)
        moments = self._rebased(r_max, self.shift) + other._rebased(r_max, self.shift)
        tail = _top_rows(np.concatenate([self.tail, other.tail]), self.tail_cap)
        return TiltStats(self.betas, self.n + other.n, r_max, self.shift.copy(), moments, tail, self.tail_cap)

    def copy(self) -> "TiltStats":
        """A deep copy."""
        return TiltStats(
            self.betas.copy(), self.n, self.r_max, self.shift.copy(), self.moments.copy(), self.tail.copy(), self.tail_cap
        )

    def finalize(self) -> TiltEstimate:
        """Estimates at every beta: Def. 1 (gain), Def. 2 (KL), Theorem 1 (Jeffreys), errors, reliability.

        With ``w_i = exp(r_i/beta)`` and ``R_y = sum w y / sum w``:

        - ``gain_y = R_y - mean(y)`` and ``KL = R_r/beta - log mean(w)``;
        - delta-method standard errors (``*_se_delta``) from the influence functions
          ``IF_gain,i = w_i (y_i - R_y)/mean(w) - (y_i - mean(y))`` and
          ``IF_KL,i = w_i ((r_i - R_r)/beta - 1)/mean(w) + 1``, with
          ``se^2 = sum_i IF_i^2 / (N (N - 1))``;
        - ``ESS = (sum w)^2 / sum w^2`` (Kish) and ``khat`` (:func:`limits_ray.core.psis.khat` on the tail);
          ``reliable = (khat < min(1 - 1/log10 N, 0.7) or khat is NaN) and ESS >= ESS_FLOOR`` (the
          per-prompt test; a NaN k-hat, tied top rewards, is no passed test: the result tables decide
          such rows, and add the cross-prompt tests, in :mod:`limits_ray.core.reliability`);
        - the frontier at a fixed KL (MATH.md, "The frontier at a fixed KL"): the covariance
          ``gain_kl_cov = sum_i IF_gain,i IF_KL,i / (N (N - 1))``, from the cross sums ``sum w^p (y - c)(r - c_r)``,
          and the derivatives of the empirical tilt, ``d R_y / d beta = -Cov_w(y, r)/beta^2`` (``gain_dbeta``)
          and ``d KL / d beta = -Var_w(r)/beta^3`` (``kl_dbeta``), whose ratio is the slope ``d gain / d KL``;
        - first-order bias corrections (second-order Taylor expansion of a ratio of means and of
          ``log mean(w)``): ``E[R_y_hat] - R_y ~ -E[w^2 (y - R_y)] / (N E[w]^2)`` and
          ``E[log mean(w)] - log E[w] ~ -Var(w) / (2 N E[w]^2)``, estimated by
          ``gain_bc = gain + sum w^2 (y - R_y) / (sum w)^2`` and
          ``kl_bc = kl + sum w^2 (r - R_r) / (beta (sum w)^2) - (1/ESS - 1/N) / 2``;
        - interval standard errors ``gain_se = gain_se_delta t_df(0.975) / z(0.975)`` (likewise ``kl_se``),
          so that ``gain_bc +- 1.96 gain_se`` is a 95% interval: ``t_df`` is Student's quantile with
          ``df = max(nu / 3, 1)``, ``nu = (sum IF^2)^2 / sum_tail IF^4`` the effective number of terms
          behind the variance estimate (``N/3`` for normal influence terms, a handful when a few
          weights dominate). ``sum_tail`` runs over the tail rows (all samples while ``N <= tail_cap``;
          beyond, the body's terms are left out, which can only raise ``nu``). The factor is an
          empirical calibration (bench/bench_coverage.py): Satterthwaite's ``2 nu`` assumes the error
          independent of the SE, but with heavy weights a sample that missed the upper tail has both a
          low estimate and a small SE; with the pooled k-hat gate of the tables
          (:mod:`limits_ray.core.reliability`), ``nu/3`` keeps the coverage at or above 0.90 wherever an
          interval is given, and at 0.92-0.98 where the weights are benign.
          Where not ``reliable`` the variance may be infinite and ``gain_se``, ``kl_se`` are NaN.

        ``kl_se`` comes from a difference of nearly equal sums when ``beta`` is far above the spread
        of ``r``: it keeps ~4 digits at ``beta = 1e3 sigma_r`` and none beyond ``~1e4 sigma_r``, where
        the KL itself is below ``1e-8``.
        """
        return finalize_many([self]).select(0)


def finalize_many(states: list[TiltStats]) -> TiltEstimate:
    """:meth:`TiltStats.finalize` of ``S`` states at once (same betas and target columns).

    Every field of the result gains a leading axis ``S`` (``n`` becomes an ``[S]`` array);
    :meth:`TiltEstimate.select` takes one state's. Vectorised over states: one call costs about as
    much as a few single ones, whatever ``S``.
    """
    if not states:
        raise ValueError("no states to finalize")
    betas = states[0].betas
    if any(state.n == 0 for state in states):
        raise ValueError("no samples: cannot estimate anything from an empty state")
    if any(not np.array_equal(state.betas, betas) or state.shift.shape != states[0].shift.shape for state in states):
        raise ValueError("cannot finalize states of different beta grids or target columns together")
    n = np.array([state.n for state in states], dtype=np.int64)
    r_max = np.array([state.r_max for state in states])
    shift = np.stack([state.shift for state in states])  # [S, Y]
    moments = np.stack([state.moments for state in states])  # [S, 3, B, 3Y]
    y_count = shift.shape[1]
    first, second = slice(1, 1 + y_count), slice(1 + y_count, 1 + 2 * y_count)
    plain, tilt, tilt2 = moments[:, 0, 0], moments[:, 1], moments[:, 2]

    def cross(part: np.ndarray) -> np.ndarray:  # sum u^p (y - c)(r - c_r) for every column, [..., Y]
        return np.concatenate([part[..., 1 + y_count : 2 + y_count], part[..., 1 + 2 * y_count :]], axis=-1)

    s0, s2 = tilt[:, :, 0], tilt2[:, :, 0]  # [S, B]
    count = n[:, None].astype(np.float64)

    mean_plain = plain[:, first] / count  # [S, Y], centred
    mean_tilt = tilt[:, :, first] / s0[:, :, None]  # [S, B, Y], centred R_y
    gain = mean_tilt - mean_plain[:, None, :]
    log_mean_w = np.log(s0 / count)
    log_z = r_max[:, None] / betas + log_mean_w
    r_tilt = mean_tilt[:, :, 0] + shift[:, None, 0]
    r_base = mean_plain[:, 0] + shift[:, 0]
    kl = (r_tilt - r_max[:, None]) / betas - log_mean_w
    reverse_kl = (r_max - r_base)[:, None] / betas + log_mean_w

    # Second-order sums about the estimates (centred coordinates throughout).
    tilt2_dev = tilt2[:, :, first] - mean_tilt * s2[:, :, None]  # sum u^2 (y - R_y)
    tilt2_dev2 = tilt2[:, :, second] - 2 * mean_tilt * tilt2[:, :, first] + mean_tilt**2 * s2[:, :, None]
    tilt_dev2 = tilt[:, :, second] - tilt[:, :, first] ** 2 / s0[:, :, None]
    plain_dev2 = plain[:, second] - plain[:, first] ** 2 / count
    ratio = count / s0  # [S, B]
    gain_if2 = ratio[:, :, None] ** 2 * tilt2_dev2 - 2 * ratio[:, :, None] * tilt_dev2 + plain_dev2[:, None, :]
    kl_weighted = tilt2_dev2[:, :, 0] / betas**2 - 2 * tilt2_dev[:, :, 0] / betas + s2
    kl_if2 = ratio**2 * kl_weighted - count
    denominator = np.where(n > 1, count[:, 0] * (count[:, 0] - 1), np.nan)[:, None]
    gain_se_delta = np.sqrt(np.clip(gain_if2, 0, None) / denominator[:, :, None])
    kl_se_delta = np.sqrt(np.clip(kl_if2, 0, None) / denominator)
    # Cross terms with r: the tilted covariance of y and r, and sum IF_gain IF_KL (see TiltStats.finalize).
    r_tilt_c = mean_tilt[:, :, :1]  # R_r, centred
    tilt_cross = cross(tilt) - r_tilt_c * tilt[:, :, first]  # sum u (y - R_y)(r - R_r)
    tilt2_cross = (cross(tilt2) - r_tilt_c * tilt2[:, :, first] - mean_tilt * tilt2[:, :, 1:2]
                   + mean_tilt * r_tilt_c * s2[:, :, None])  # sum u^2 (y - R_y)(r - R_r)
    beta_y = betas[None, :, None]
    cov_if = (ratio[:, :, None] ** 2 * (tilt2_cross / beta_y - tilt2_dev)
              - ratio[:, :, None] * (tilt_cross / beta_y - s0[:, :, None] * gain))
    tilted_cov = tilt_cross / s0[:, :, None]  # Cov_w(y, r)

    ess = s0**2 / s2
    k_hat = khat_many([state.tail[:, 0] for state in states], n, betas)
    reliable = own_reliable(k_hat, khat_thresholds(n)[:, None], ess)
    # The interval SEs exist only where reliable: the tail terms and t quantiles are computed there only.
    used = np.flatnonzero(reliable.any(axis=1))
    gain_if4, kl_if4 = np.zeros(gain.shape), np.zeros(kl.shape)
    if used.size:
        gain_if4[used], kl_if4[used] = _tail_if4([states[index] for index in used], shift[used], r_max[used],
                                                 mean_plain[used], mean_tilt[used], ratio[used])
    return TiltEstimate(
        betas=np.broadcast_to(betas, (n.size, betas.size)).copy(),
        n=n,
        log_z=log_z,
        mean_base=mean_plain + shift,
        mean_tilted=mean_tilt + shift[:, None, :],
        gain=gain,
        gain_se=gain_se_delta * _t_ratio(gain_if2, gain_if4, reliable[:, :, None]),
        gain_se_delta=gain_se_delta,
        gain_bc=gain + tilt2_dev / s0[:, :, None] ** 2,
        kl=kl,
        kl_se=kl_se_delta * _t_ratio(kl_if2, kl_if4, reliable),
        kl_se_delta=kl_se_delta,
        kl_bc=kl + tilt2_dev[:, :, 0] / (betas * s0**2) - (s2 / s0**2 - 1.0 / count) / 2,
        gain_kl_cov=cov_if / denominator[:, :, None],
        gain_dbeta=-tilted_cov / beta_y**2,
        kl_dbeta=-tilted_cov[:, :, 0] / betas**3,
        reverse_kl=reverse_kl,
        jeffreys=kl + reverse_kl,
        ess=ess,
        khat=k_hat,
        body_sd=_body_sd(states, n, plain[:, 1], plain[:, 1 + y_count], shift[:, 0]),
        reliable=reliable,
        reward_max=r_max,
        top_tied=_tied_top(states)[:, None] | np.isnan(k_hat),
    )


def _tied_top(states: list[TiltStats]) -> np.ndarray:
    """``[S]`` whether each state's largest alignment reward occurs more than once (its tail holds the top rows)."""
    return np.array([state.tail.shape[0] > 1 and state.tail[0, 0] == state.tail[1, 0] for state in states])


def _body_sd(states: list[TiltStats], n: np.ndarray, total: np.ndarray, total_sq: np.ndarray,
             shift: np.ndarray) -> np.ndarray:
    """``[S]`` SD of ``r`` without the ``min(M + 1, T)`` largest: from the tail's other rows where it holds
    every sample (``N <= T``), else the sums of all ``N`` (centred by ``shift``) less those of the top
    tail rows; states with the same count removed are done together."""
    removed = np.array([min(int(tail_size(count)) + 1, state.tail.shape[0]) for state, count in zip(states, n)])
    whole = np.array([state.tail.shape[0] == count for state, count in zip(states, n)])
    out = np.full(n.size, np.nan)
    for index in np.flatnonzero(whole & (n - removed >= 2)):
        out[index] = states[index].tail[removed[index]:, 0].std(ddof=1)
    top, top_sq = np.zeros(n.size), np.zeros(n.size)
    for count in np.unique(removed[removed > 0]):
        chosen = np.flatnonzero(removed == count)
        rows = np.stack([states[index].tail[:count, 0] for index in chosen]) - shift[chosen, None]
        top[chosen], top_sq[chosen] = rows.sum(axis=1), (rows * rows).sum(axis=1)
    body = (n - removed).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = ((total_sq - top_sq) - (total - top) ** 2 / body) / (body - 1.0)
    return np.where(whole, out, np.where(body >= 2, np.sqrt(np.clip(variance, 0.0, None)), np.nan))


_IF4_ELEMENTS = 1 << 20  # float64 elements of one [states, B, T, Y] work array in _tail_if4 (8 MiB)


def _tail_if4(states: list[TiltStats], shift: np.ndarray, r_max: np.ndarray, mean_plain: np.ndarray,
              mean_tilt: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sum_tail IF^4`` of the gain (``[S, B, Y]``) and of the KL (``[S, B]``), over each state's tail rows.

    Tails are padded to a common length; a padded row's influence terms are set to 0.
    """
    betas = states[0].betas
    rows = np.array([state.tail.shape[0] for state in states])
    gain_if4 = np.zeros(mean_tilt.shape)
    kl_if4 = np.zeros(ratio.shape)
    order = np.argsort(rows, kind="stable")  # similar tail lengths together: little padding
    cells = betas.size * shift.shape[1]
    start = 0
    while start < order.size:
        stop = start + 1
        while stop < order.size and (stop + 1 - start) * cells * int(rows[order[stop]]) <= _IF4_ELEMENTS:
            stop += 1
        chosen = order[start:stop]
        length = int(rows[chosen].max())
        # Padding repeats a state's largest row (finite weights); its terms are then zeroed.
        tail = np.stack([np.concatenate([states[index].tail, np.repeat(states[index].tail[:1], length - rows[index], axis=0)])
                         for index in chosen])  # [G, T, Y]
        valid = (np.arange(length)[None, :] < rows[chosen, None]).astype(np.float64)  # [G, T]
        centred = tail - shift[chosen, None, :]
        u = np.exp((tail[:, None, :, 0] - r_max[chosen, None, None]) / betas[None, :, None])
        u *= ratio[chosen, :, None]  # [G, B, T], w / mean(w)
        gain_if = u[..., None] * (centred[:, None] - mean_tilt[chosen, :, None, :])
        gain_if -= (centred - mean_plain[chosen, None, :])[:, None]
        gain_if *= valid[:, None, :, None]
        kl_if = u * ((centred[:, None, :, 0] - mean_tilt[chosen, :, None, 0]) / betas[None, :, None] - 1.0) + 1.0
        kl_if *= valid[:, None, :]
        np.multiply(gain_if, gain_if, out=gain_if)
        np.multiply(kl_if, kl_if, out=kl_if)
        gain_if4[chosen] = np.einsum("gbty,gbty->gby", gain_if, gain_if)
        kl_if4[chosen] = np.einsum("gbt,gbt->gb", kl_if, kl_if)
        start = stop
    return gain_if4, kl_if4


def _t_ratio(if2: np.ndarray, if4: np.ndarray, reliable: np.ndarray) -> np.ndarray:
    """``t_df(0.975) / z(0.975)`` with ``df = max(if2^2 / (3 if4), 1)``; 1 (normal) where ``if4 = 0``; NaN
    where not ``reliable`` (broadcast to ``if2``'s shape)."""
    reliable = np.broadcast_to(reliable, if2.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(if4 > 0, np.clip(if2, 0, None) ** 2 / (_DF_DIVISOR * if4), np.inf)
    df = np.maximum(np.where(np.isnan(df), np.inf, df), 1.0)
    ratio = np.full(if2.shape, np.nan)
    ratio[reliable] = 1.0
    student = reliable & np.isfinite(df)
    ratio[student] = stdtrit(df[student], 0.975) / _Z975
    return ratio


def interval_ratio(if2: np.ndarray, if4: np.ndarray, reliable: np.ndarray) -> np.ndarray:
    """``t_df(0.975) / z(0.975)``, ``df = max((sum IF^2)^2 / (3 sum IF^4), 1)``: the factor that turns a
    delta-method SE into the interval SE of :meth:`TiltStats.finalize` (NaN where not ``reliable``), for
    other self-normalised estimators of the same weights (:mod:`limits_ray.core.winrate`,
    :mod:`limits_ray.core.proposals`)."""
    return _t_ratio(if2, if4, reliable)
