"""Estimator convergence from prefix statistics in dyadic shells: O(log N) states per prompt.

Sample ``i`` (its ``sample_idx``) belongs to shell ``0`` if ``i == 0`` and to shell
``floor(log2 i) + 1`` otherwise, so shell ``k`` covers ``[2^(k-1), 2^k)``. The prefix of the first
``2^k`` samples is the merge of shells ``0..k``: every estimate at N = 1, 2, 4, ... comes from
``log2 N + 1`` mergeable states, whatever order the samples arrive in and without a second pass.
The merge of all shells is the prompt's full statistics. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from limits_ray.stats import TiltStats

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
    """Per-shell :class:`TiltStats` of one prompt and one alignment reward."""

    betas: np.ndarray
    n_targets: int
    shells: dict[int, TiltStats] = field(default_factory=dict)

    def update(self, sample_idx: np.ndarray, targets: np.ndarray) -> "DyadicStats":
        """Absorb samples (``targets[:, 0]`` the alignment reward) into their shells, in place."""
        targets = np.asarray(targets, dtype=np.float64).reshape(len(sample_idx), self.n_targets)
        shells = shell_of(sample_idx)
        for shell in np.unique(shells):
            batch = TiltStats.from_samples(self.betas, targets[shells == shell])
            current = self.shells.get(int(shell))
            self.shells[int(shell)] = batch if current is None else current.merge(batch)
        return self

    def merge(self, other: "DyadicStats") -> "DyadicStats":
        """Shell-wise merge of two states (a new object)."""
        merged = DyadicStats(self.betas, self.n_targets, dict(self.shells))
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
        running = TiltStats.empty(self.betas, self.n_targets)
        for shell in sorted(self.shells):
            running = running.merge(self.shells[shell])
            yield running

    def to_bytes(self) -> bytes:
        """This state as bytes (see :meth:`from_bytes`)."""
        import pickle

        return pickle.dumps(self, protocol=5)

    @classmethod
    def from_bytes(cls, data: bytes) -> "DyadicStats":
        """The state :meth:`to_bytes` wrote."""
        import pickle

        return pickle.loads(data)

    def total(self) -> TiltStats:
        """Statistics of every sample absorbed."""
        running = TiltStats.empty(self.betas, self.n_targets)
        for shell in sorted(self.shells):
            running = running.merge(self.shells[shell])
        return running
