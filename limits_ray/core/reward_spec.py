"""Reward specifications: a reward column by name, or ``mean(a,b,c)``, an ensemble (Theorem 3).

An ensemble aligns with (or evaluates) the per-sample mean of the named columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = ["RewardSpec"]

_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_MEAN = re.compile(rf"^mean\(\s*({_NAME}(?:\s*,\s*{_NAME})*)\s*\)$")


@dataclass(frozen=True)
class RewardSpec:
    """A reward derived from reward columns.

    Attributes:
        name: canonical text, ``col`` or ``mean(a,b,c)``; used as the ``align``/``eval`` label.
        columns: the reward columns it averages (one for a plain column).
    """

    name: str
    columns: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "RewardSpec":
        """Parse ``NAME`` or ``mean(NAME,NAME,...)``."""
        text = text.strip()
        ensemble = _MEAN.match(text)
        if ensemble:
            columns = tuple(part.strip() for part in ensemble.group(1).split(","))
            return cls(name=f"mean({','.join(columns)})", columns=columns)
        if re.fullmatch(_NAME, text):
            return cls(name=text, columns=(text,))
        raise ValueError(
            f"reward spec {text!r} is neither a column name nor 'mean(a,b,...)': "
            "write e.g. 'gold' or 'mean(proxy_0,proxy_1)'"
        )

    def values(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The per-sample reward: the mean of the spec's columns."""
        missing = [name for name in self.columns if name not in columns]
        if missing:
            raise KeyError(f"reward spec {self.name!r} needs columns {missing}, have {sorted(columns)}")
        if len(self.columns) == 1:
            return np.asarray(columns[self.columns[0]], dtype=np.float64)
        return np.mean([np.asarray(columns[name], dtype=np.float64) for name in self.columns], axis=0)
