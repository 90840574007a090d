"""Estimator convergence from prefix statistics in dyadic shells: O(log N) states per prompt.

Sample ``i`` (its ``sample_idx``) belongs to shell ``0`` if ``i == 0`` and to shell
``floor(log2 i) + 1`` otherwise, so shell ``k`` covers ``[2^(k-1), 2^k)``. The prefix of the first
``2^k`` samples is the merge of shells ``0..k``: every estimate at N = 1, 2, 4, ... comes from
``log2 N + 1`` mergeable states, whatever order the samples arrive in and without a second pass.
The merge of all shells is the prompt's full statistics. Pure numpy.

Memory per prompt and alignment reward: one :class:`TiltStats` per non-empty shell, i.e.
``log2 N + 1`` states of ``3 B (1 + 2Y)`` sums plus a tail of ``min(2^(k-1), K)`` rows of ``Y``
floats (``K = tail_cap`` = 1024 by default): at ``N = 1e5``, ``B = 64``, ``Y = 4``, about 18 states
of 13.5 KiB of sums and 8 full tails of 32 KiB, ~0.5 MiB.

:meth:`DyadicStats.to_bytes` / :meth:`DyadicStats.from_bytes` serialise a state without pickling
classes (an ``np.savez`` archive of plain arrays with a format version), for storing and merging
per-prompt statistics anywhere.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from limits_ray.psis import TAIL_CAP
from limits_ray.stats import TiltStats

FORMAT_VERSION = 1
"""Version of the :meth:`DyadicStats.to_bytes` archive; :meth:`DyadicStats.from_bytes` refuses others."""

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
        for shell in np.unique(shells):
            batch = TiltStats.from_samples(self.betas, targets[shells == shell], self.tail_cap)
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

    def prefixes(self) -> Iterator[TiltStats]:
        """Cumulative statistics of shells ``0..k`` for each shell ``k`` present, in order."""
        running = TiltStats.empty(self.betas, self.n_targets, self.tail_cap)
        for shell in sorted(self.shells):
            running = running.merge(self.shells[shell])
            yield running

    def total(self) -> TiltStats:
        """Statistics of every sample absorbed."""
        running = TiltStats.empty(self.betas, self.n_targets, self.tail_cap)
        for shell in sorted(self.shells):
            running = running.merge(self.shells[shell])
        return running

    def to_bytes(self) -> bytes:
        """A class-free archive of every field (``np.savez`` of plain arrays, ``FORMAT_VERSION``)."""
        shells = sorted(self.shells)
        states = [self.shells[shell] for shell in shells]
        y_count, b_count = self.n_targets, self.betas.size
        arrays = {
            "version": np.array(FORMAT_VERSION, dtype=np.int64),
            "betas": self.betas,
            "n_targets": np.array(self.n_targets, dtype=np.int64),
            "tail_cap": np.array(self.tail_cap, dtype=np.int64),
            "shell": np.array(shells, dtype=np.int64),
            "n": np.array([state.n for state in states], dtype=np.int64),
            "r_max": np.array([state.r_max for state in states], dtype=np.float64),
            "shift": np.array([state.shift for state in states], dtype=np.float64).reshape(len(states), y_count),
            "moments": np.array([state.moments for state in states], dtype=np.float64).reshape(
                len(states), 3, b_count, 1 + 2 * y_count),
            "tail_rows": np.array([state.tail.shape[0] for state in states], dtype=np.int64),
            "tail": np.concatenate([state.tail for state in states]) if states else np.zeros((0, y_count)),
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DyadicStats":
        """The state :meth:`to_bytes` wrote (no pickle is loaded)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            version = int(archive["version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"DyadicStats archive has format version {version}; this code reads {FORMAT_VERSION}")
            arrays = {name: archive[name] for name in archive.files}
        betas, tail_cap = arrays["betas"], int(arrays["tail_cap"])
        tails = np.split(arrays["tail"], np.cumsum(arrays["tail_rows"])[:-1]) if arrays["shell"].size else []
        shells = {
            int(shell): TiltStats(betas.copy(), int(n), float(r_max), shift, moments, tail, tail_cap)
            for shell, n, r_max, shift, moments, tail in zip(
                arrays["shell"], arrays["n"], arrays["r_max"], arrays["shift"], arrays["moments"], tails)
        }
        return cls(betas, int(arrays["n_targets"]), shells, tail_cap)
