"""Mergeable log-space sufficient statistics of a tilted base distribution, and their estimators.

For one prompt, one alignment reward ``r`` and target rewards ``y_1..y_Y`` (column 0 is ``r``
itself, the others are evaluation rewards), over a grid of betas, :class:`TiltStats` keeps

    moments[p, b, :] = sum_i u_ib^p * [1, y_i - c, (y_i - c)^2],   p = 0, 1, 2,
    u_ib = exp((r_i - r_max) / beta_b),

where ``r_max`` is the running maximum of ``r`` and ``c`` a per-column shift (the "online
softmax" of ../shared/MATH.md, "Numerics"). Everything is float64. Two states merge exactly
(up to rounding) by rescaling with ``exp((r_max_old - r_max_new)/beta)`` and re-centring the
polynomial moments; the merge is associative and commutative, so samples may arrive in any
order, in any batches, on any number of machines.

:meth:`TiltStats.finalize` turns the sums into the Monte Carlo estimators of Def. 1 and Def. 2
of the paper, their delta-method standard errors and the Kish effective sample size.
No Ray or vLLM import here: this module is the functional core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TiltStats", "TiltEstimate"]

_CHUNK_ROWS = 4096  # rows per update chunk: bounds the [2B + 1, rows] work buffers (about 4 MiB at B = 64)


@dataclass
class TiltEstimate:
    """Per-beta estimates for one prompt (Def. 1, Def. 2, Theorem 1).

    Shapes: ``B`` betas, ``Y`` target columns (column 0 is the alignment reward).

    Attributes:
        betas: ``[B]`` the KL penalties.
        n: number of base samples.
        log_z: ``[B]`` ``log Zhat = log mean_i exp(r_i/beta)``.
        mean_base: ``[Y]`` ``mean_i y_i`` (the estimate of ``E_pi0[y]``).
        mean_tilted: ``[B, Y]`` ``sum_i w_i y_i / sum_i w_i`` (the estimate of ``E_pi_beta[y]``).
        gain: ``[B, Y]`` ``mean_tilted - mean_base`` (Theorem 2, Def. 1).
        gain_se: ``[B, Y]`` delta-method standard error of ``gain``.
        kl: ``[B]`` ``KL(pi_beta||pi0) = E_pi_beta[r]/beta - log Z`` (Def. 2).
        kl_se: ``[B]`` delta-method standard error of ``kl``.
        reverse_kl: ``[B]`` ``KL(pi0||pi_beta) = log Z - E_pi0[r]/beta``.
        jeffreys: ``[B]`` ``kl + reverse_kl``; Theorem 1: ``gain[:, 0] == betas * jeffreys``.
        ess: ``[B]`` Kish effective sample size ``(sum w)^2 / sum w^2``.
    """

    betas: np.ndarray
    n: int
    log_z: np.ndarray
    mean_base: np.ndarray
    mean_tilted: np.ndarray
    gain: np.ndarray
    gain_se: np.ndarray
    kl: np.ndarray
    kl_se: np.ndarray
    reverse_kl: np.ndarray
    jeffreys: np.ndarray
    ess: np.ndarray


def _polynomial(centred: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``[N, Y] -> [1 + 2Y, N]``: the rows ``[1, y, y^2]`` whose weighted sums are kept.

    Written into ``out`` (at least ``[1 + 2Y, N]``, C-ordered), whose first ``N`` columns are returned.
    """
    y_count, rows = centred.shape[1], centred.shape[0]
    poly = out[:, :rows]
    poly[0] = 1.0
    poly[1 : 1 + y_count] = centred.T
    np.multiply(poly[1 : 1 + y_count], poly[1 : 1 + y_count], out=poly[1 + y_count :])
    return poly


def _recentre_matrix(delta: np.ndarray) -> np.ndarray:
    """Matrix ``M`` with ``[1, y+d, (y+d)^2] = [1, y, y^2] @ M`` for per-column shifts ``d``.

    Moving a state from shift ``c_old`` to ``c_new`` uses ``d = c_old - c_new``.
    """
    y_count = delta.shape[0]
    size = 1 + 2 * y_count
    matrix = np.eye(size)
    first, second = np.arange(1, 1 + y_count), np.arange(1 + y_count, size)
    matrix[0, first] = delta
    matrix[0, second] = delta * delta
    matrix[first, second] = 2 * delta
    return matrix


@dataclass
class TiltStats:
    """Mergeable sufficient statistics for one prompt and one alignment reward (see module doc).

    Attributes:
        betas: ``[B]`` the beta grid, positive.
        n: number of samples absorbed.
        r_max: running maximum of the alignment reward (``-inf`` while empty).
        shift: ``[Y]`` centring constants ``c`` of the target columns.
        moments: ``[3, B, 1 + 2Y]`` the sums ``sum u^p [1, y-c, (y-c)^2]``, ``p = 0, 1, 2``.
    """

    betas: np.ndarray
    n: int
    r_max: float
    shift: np.ndarray
    moments: np.ndarray

    @classmethod
    def empty(cls, betas: np.ndarray, n_targets: int) -> "TiltStats":
        """A state with no samples, for ``n_targets`` columns (alignment reward included)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not np.all(betas > 0):
            raise ValueError(f"betas must be a non-empty 1-d array of positive numbers, got {betas!r}")
        return cls(
            betas=betas,
            n=0,
            r_max=-np.inf,
            shift=np.zeros(n_targets),
            moments=np.zeros((3, betas.size, 1 + 2 * n_targets)),
        )

    @classmethod
    def from_samples(cls, betas: np.ndarray, targets: np.ndarray) -> "TiltStats":
        """Statistics of a batch; ``targets[:, 0]`` is the alignment reward ``r``.

        Args:
            betas: ``[B]`` positive KL penalties.
            targets: ``[N, Y]`` float rewards, finite; column 0 aligns, every column is evaluated.
        """
        targets = np.asarray(targets, dtype=np.float64)
        if targets.ndim != 2 or targets.shape[1] == 0:
            raise ValueError(f"targets must be a 2-d [samples, columns] array, got shape {targets.shape}")
        state = cls.empty(betas, targets.shape[1])
        if targets.shape[0] == 0:
            return state
        if not np.all(np.isfinite(targets)):
            raise ValueError("targets contain NaN or infinite rewards")
        state.n = targets.shape[0]
        state.r_max = float(targets[:, 0].max())
        state.shift = targets.mean(axis=0)
        inverse_betas = 1.0 / state.betas
        rows = min(state.n, _CHUNK_ROWS)
        # Work buffers reused by every chunk: the weights u (rows 0..B-1), u^2 (rows B..2B-1) and a
        # row of ones (row 2B, for the plain sums), then the polynomial rows [1, y-c, (y-c)^2].
        weights = np.empty((2 * state.betas.size + 1, rows))
        weights[-1] = 1.0
        poly = np.empty((1 + 2 * targets.shape[1], rows))
        for start in range(0, state.n, _CHUNK_ROWS):
            block = targets[start : start + _CHUNK_ROWS]
            state._absorb(block, inverse_betas, weights, poly)
        return state

    def _absorb(self, block: np.ndarray, inverse_betas: np.ndarray, weights: np.ndarray, poly: np.ndarray) -> None:
        """Add one block's sums in place (shift and r_max already cover the block).

        ``weights`` (``[2B + 1, >= rows]``, last row all ones) and ``poly`` (``[1 + 2Y, >= rows]``) are
        scratch buffers. One matrix product gives every sum at once: ``poly @ weights.T`` holds
        ``sum u^p [1, y-c, (y-c)^2]`` for ``p = 1`` (columns ``0..B-1``), ``p = 2`` (``B..2B-1``) and
        ``p = 0`` (column ``2B``).
        """
        rows, beta_count = block.shape[0], inverse_betas.size
        poly = _polynomial(block - self.shift, poly)
        work = weights[:, :rows]
        tilt = work[:beta_count]
        np.multiply(inverse_betas[:, None], (block[:, 0] - self.r_max)[None, :], out=tilt)
        np.exp(tilt, out=tilt)
        np.multiply(tilt, tilt, out=work[beta_count : 2 * beta_count])
        sums = poly @ work.T  # [1 + 2Y, 2B + 1]
        self.moments[0] += sums[:, 2 * beta_count]
        self.moments[1] += sums[:, :beta_count].T
        self.moments[2] += sums[:, beta_count : 2 * beta_count].T

    def update(self, targets: np.ndarray) -> "TiltStats":
        """Return the merge of this state with a batch of samples (see :meth:`from_samples`)."""
        return self.merge(TiltStats.from_samples(self.betas, targets))

    def _rebased(self, r_max: float, shift: np.ndarray) -> np.ndarray:
        """This state's moments expressed with another ``r_max`` and ``shift``."""
        if self.n == 0:
            return np.zeros_like(self.moments)
        scale = np.exp((self.r_max - r_max) / self.betas)  # <= 1 when r_max is the larger
        scaled = self.moments * np.stack([np.ones_like(scale), scale, scale * scale])[:, :, None]
        return scaled @ _recentre_matrix(self.shift - shift)

    def merge(self, other: "TiltStats") -> "TiltStats":
        """The statistics of the union of both sample sets (exact up to rounding).

        The merged state keeps this state's shift (the other's if this one is empty) and the
        larger ``r_max``; every moment is rescaled by ``exp((r_max_old - r_max_new)/beta)^p``.
        """
        if not np.array_equal(self.betas, other.betas):
            raise ValueError("cannot merge statistics computed on different beta grids")
        if self.shift.shape != other.shift.shape:
            raise ValueError(f"cannot merge {self.shift.size} target columns with {other.shift.size}")
        if other.n == 0:
            return self.copy()
        if self.n == 0:
            return other.copy()
        r_max = max(self.r_max, other.r_max)
        moments = self._rebased(r_max, self.shift) + other._rebased(r_max, self.shift)
        return TiltStats(self.betas, self.n + other.n, r_max, self.shift.copy(), moments)

    def copy(self) -> "TiltStats":
        """A deep copy."""
        return TiltStats(self.betas.copy(), self.n, self.r_max, self.shift.copy(), self.moments.copy())

    def finalize(self) -> TiltEstimate:
        """Estimates at every beta: Def. 1 (gain), Def. 2 (KL), Theorem 1 (Jeffreys) and errors.

        With ``w_i = exp(r_i/beta)`` and ``R_y = sum w y / sum w``:

        - ``gain_y = R_y - mean(y)`` and ``KL = R_r/beta - log mean(w)``;
        - standard errors by the delta method on the influence functions
          ``IF_gain,i = w_i (y_i - R_y)/mean(w) - (y_i - mean(y))`` and
          ``IF_KL,i = w_i ((r_i - R_r)/beta - 1)/mean(w) + 1``, with
          ``se^2 = sum_i IF_i^2 / (N (N - 1))``;
        - ``ESS = (sum w)^2 / sum w^2`` (Kish).

        ``kl_se`` comes from a difference of nearly equal sums when ``beta`` is far above the spread
        of ``r``: it keeps ~4 digits at ``beta = 1e3 sigma_r`` and none beyond ``~1e4 sigma_r``, where
        the KL itself is below ``1e-8``.
        """
        if self.n == 0:
            raise ValueError("no samples: cannot estimate anything from an empty state")
        n, betas = self.n, self.betas
        y_count = self.shift.size
        first, second = slice(1, 1 + y_count), slice(1 + y_count, 1 + 2 * y_count)
        plain, tilt, tilt2 = self.moments[0, 0], self.moments[1], self.moments[2]
        s0, s2 = tilt[:, 0], tilt2[:, 0]

        mean_plain = plain[first] / n  # centred
        mean_tilt = tilt[:, first] / s0[:, None]  # centred R_y
        gain = mean_tilt - mean_plain
        log_mean_w = np.log(s0 / n)
        log_z = self.r_max / betas + log_mean_w
        r_tilt = mean_tilt[:, 0] + self.shift[0]
        r_base = mean_plain[0] + self.shift[0]
        kl = (r_tilt - self.r_max) / betas - log_mean_w
        reverse_kl = (self.r_max - r_base) / betas + log_mean_w

        # Second-order sums about the estimates (centred coordinates throughout).
        tilt2_dev2 = tilt2[:, second] - 2 * mean_tilt * tilt2[:, first] + mean_tilt**2 * s2[:, None]
        tilt_dev2 = tilt[:, second] - tilt[:, first] ** 2 / s0[:, None]
        plain_dev2 = plain[second] - plain[first] ** 2 / n
        ratio = n / s0
        gain_if2 = ratio[:, None] ** 2 * tilt2_dev2 - 2 * ratio[:, None] * tilt_dev2 + plain_dev2
        tilt2_dev_r = tilt2[:, 1] - mean_tilt[:, 0] * s2
        kl_weighted = tilt2_dev2[:, 0] / betas**2 - 2 * tilt2_dev_r / betas + s2
        kl_if2 = ratio**2 * kl_weighted - n
        denominator = n * (n - 1) if n > 1 else np.nan
        return TiltEstimate(
            betas=betas.copy(),
            n=n,
            log_z=log_z,
            mean_base=mean_plain + self.shift,
            mean_tilted=mean_tilt + self.shift,
            gain=gain,
            gain_se=np.sqrt(np.clip(gain_if2, 0, None) / denominator),
            kl=kl,
            kl_se=np.sqrt(np.clip(kl_if2, 0, None) / denominator),
            reverse_kl=reverse_kl,
            jeffreys=kl + reverse_kl,
            ess=s0**2 / s2,
        )
