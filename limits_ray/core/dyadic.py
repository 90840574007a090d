"""Estimator convergence from prefix statistics in dyadic shells: O(log N) states per prompt.

Sample ``i`` (its ``sample_idx``) belongs to shell ``0`` if ``i == 0`` and to shell
``floor(log2 i) + 1`` otherwise, so shell ``k`` covers ``[2^(k-1), 2^k)``. The prefix of the first
``2^k`` samples is the merge of shells ``0..k``: every estimate at N = 1, 2, 4, ... comes from
``log2 N + 1`` mergeable states, whatever order the samples arrive in and without a second pass.
The merge of all shells is the prompt's full statistics. Pure numpy.

Memory per prompt and alignment reward: one :class:`TiltStats` per non-empty shell, i.e.
``log2 N + 1`` states of ``3 B 3Y`` sums plus a tail of ``min(2^(k-1), K)`` rows of ``Y``
floats (``K = tail_cap`` = 1024 by default): at ``N = 1e5``, ``B = 64``, ``Y = 4``, about 18 states
of 18 KiB of sums and 8 full tails of 32 KiB, ~0.5 MiB.

:meth:`DyadicStats.to_bytes` / :meth:`DyadicStats.from_bytes` serialise a state without pickling
classes (raw int64 and float64 arrays behind a format version), for storing and merging per-prompt
statistics anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from limits_ray.core.psis import TAIL_CAP
from limits_ray.core.tilt import TiltStats, moment_columns, recentre_matrix

FORMAT_VERSION = 3
"""Version of the :meth:`DyadicStats.to_bytes` record (3: the cross sums with r; 2: raw arrays; 1 was an ``np.savez`` archive);
:meth:`DyadicStats.from_bytes` refuses others."""

__all__ = ["DyadicStats", "shell_of"]


def shell_of(sample_idx: np.ndarray) -> np.ndarray:
    """Shell of each sample index: ``0`` for 0, ``floor(log2 i) + 1`` for ``i >= 1``."""
    sample_idx = np.asarray(sample_idx, dtype=np.int64)
    if sample_idx.size and sample_idx.min() < 0:
        raise ValueError("sample_idx must be non-negative")
    if sample_idx.size and sample_idx.max() >= 2**53:
        raise ValueError("sample_idx must be below 2**53")
    # frexp(i) = (m, k) with i = m 2^k, 0.5 <= m < 1: k is the bit length of i (0 for i = 0),
    # exact for integers below 2**53.
    return np.frexp(sample_idx.astype(np.float64))[1].astype(np.int64)


@dataclass
class DyadicStats:
    """Per-shell :class:`TiltStats` of one prompt and one alignment reward (tails capped at ``tail_cap`` rows)."""

    betas: np.ndarray
    n_targets: int
    shells: dict[int, TiltStats] = field(default_factory=dict)
    tail_cap: int = TAIL_CAP

    def update(self, sample_idx: np.ndarray, targets: np.ndarray) -> "DyadicStats":
        """Absorb samples (``targets[:, 0]`` the alignment reward) into their shells, in place."""
        targets = np.asarray(targets, dtype=np.float64).reshape(len(sample_idx), self.n_targets)
        shells = shell_of(sample_idx)
        order = np.argsort(shells, kind="stable")
        present, starts = np.unique(shells[order], return_index=True)
        bounds = np.append(starts, order.size)
        for shell, batch in zip(present, TiltStats.from_segments(self.betas, targets[order], bounds, self.tail_cap)):
            current = self.shells.get(int(shell))
            self.shells[int(shell)] = batch if current is None else current.merge(batch)
        return self

    def merge(self, other: "DyadicStats") -> "DyadicStats":
        """Shell-wise merge of two states (a new object)."""
        if self.tail_cap != other.tail_cap:
            raise ValueError(f"cannot merge tails capped at {self.tail_cap} and {other.tail_cap} rows")
        merged = DyadicStats(self.betas, self.n_targets, dict(self.shells), self.tail_cap)
        for shell, stats in other.shells.items():
            current = merged.shells.get(shell)
            merged.shells[shell] = stats if current is None else current.merge(stats)
        return merged

    @property
    def n(self) -> int:
        """Number of samples absorbed."""
        return sum(stats.n for stats in self.shells.values())

    def prefixes(self) -> list[TiltStats]:
        """Cumulative statistics of shells ``0..k`` for each shell ``k`` present, in order.

        Computed at once rather than by a chain of merges: with ``R_k = max_{j<=k} r_max_j`` and every
        shell re-centred on the first shell's shift, prefix ``k`` holds
        ``sum_{j<=k} exp((r_max_j - R_k)/beta)^p * moments_j[p]`` (the merge's rescaling, all factors
        <= 1) and the top ``tail_cap`` rows of the shells' tails.
        """
        if not self.shells:
            return []
        order = sorted(self.shells)
        states = [self.shells[shell] for shell in order]
        shift = states[0].shift
        r_max = np.array([state.r_max for state in states])
        running_max = np.maximum.accumulate(r_max)
        moments = np.stack([state.moments @ recentre_matrix(state.shift - shift) for state in states])  # [K, 3, B, C]
        included = np.tril(np.ones((len(states), len(states)), dtype=bool))  # [prefix k, shell j]
        gap = np.where(included, r_max[None, :] - running_max[:, None], -np.inf)  # <= 0; -inf: shell not in prefix
        scale = np.exp(gap[:, :, None] / self.betas)  # [k, j, B]
        powers = np.stack([included[:, :, None] * np.ones_like(scale), scale, scale * scale], axis=2)  # [k, j, 3, B]
        prefix_moments = np.einsum("kjpb,jpbc->kpbc", powers, moments)
        counts = np.cumsum([state.n for state in states])
        rows = np.concatenate([state.tail for state in states])
        owner = np.repeat(np.arange(len(states)), [state.tail.shape[0] for state in states])
        ranked = np.lexsort(tuple(-rows[:, column] for column in reversed(range(rows.shape[1]))))
        rows, owner = rows[ranked], owner[ranked]
        return [
            TiltStats(self.betas, int(counts[k]), float(running_max[k]), shift.copy(), prefix_moments[k],
                      rows[owner <= k][: self.tail_cap].copy(), self.tail_cap)
            for k in range(len(states))
        ]

    def total(self) -> TiltStats:
        """Statistics of every sample absorbed (the last prefix; an empty state when there is none)."""
        prefixes = self.prefixes()
        return prefixes[-1] if prefixes else TiltStats.empty(self.betas, self.n_targets, self.tail_cap)

    def to_bytes(self) -> bytes:
        """A class-free record of every field: raw little-endian int64 and float64 arrays (``FORMAT_VERSION``).

        Layout: int64 ``[version, n_targets, tail_cap, B, S, shell[S], n[S], tail_rows[S]]``, then float64
        ``betas[B], r_max[S], shift[S, Y], moments[S, 3, B, 3Y], tail[sum tail_rows, Y]``.
        """
        shells = sorted(self.shells)
        states = [self.shells[shell] for shell in shells]
        header = np.array([FORMAT_VERSION, self.n_targets, self.tail_cap, self.betas.size, len(states), *shells,
                           *[state.n for state in states], *[state.tail.shape[0] for state in states]], dtype="<i8")
        floats = [self.betas, [state.r_max for state in states], *[state.shift for state in states],
                  *[state.moments.ravel() for state in states], *[state.tail.ravel() for state in states]]
        return header.tobytes() + np.concatenate([np.asarray(part, dtype="<f8").ravel() for part in floats]).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DyadicStats":
        """The state :meth:`to_bytes` wrote (no pickle is loaded)."""
        version = int(np.frombuffer(data, dtype="<i8", count=1)[0]) if len(data) >= 8 else -1
        if version != FORMAT_VERSION:
            raise ValueError(f"DyadicStats record has format version {version}; this code reads {FORMAT_VERSION}")
        _, y_count, tail_cap, b_count, s_count = (int(value) for value in np.frombuffer(data, dtype="<i8", count=5))
        header = np.frombuffer(data, dtype="<i8", count=5 + 3 * s_count)
        shells, counts, tail_rows = header[5:].reshape(3, s_count)
        floats = np.frombuffer(data, dtype="<f8", offset=header.nbytes).astype(np.float64)
        moments_size = 3 * b_count * moment_columns(y_count)
        ends = np.cumsum([b_count, s_count, s_count * y_count, s_count * moments_size])
        betas, r_max, shift, moments, tail = np.split(floats, ends)
        shift, moments = shift.reshape(s_count, y_count), moments.reshape(s_count, 3, b_count, moment_columns(y_count))
        tails = np.split(tail.reshape(-1, y_count), np.cumsum(tail_rows)[:-1]) if s_count else []
        states = {
            int(shell): TiltStats(betas.copy(), int(n), float(r_max[index]), shift[index].copy(), moments[index].copy(),
                                  tails[index].copy(), tail_cap)
            for index, (shell, n) in enumerate(zip(shells, counts))
        }
        return cls(betas, y_count, states, tail_cap)
