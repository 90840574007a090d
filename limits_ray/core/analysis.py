"""What an analysis computes from scored samples: the beta grid, and which rewards align and evaluate.

:class:`AnalysisConfig` is the part of a job's configuration that the statistics need (the
``analysis`` section of :class:`limits_ray.config.JobConfig`, and the options of ``limits-ray
reduce``); :meth:`AnalysisConfig.plan` resolves it against the reward columns present into a
:data:`Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from limits_ray.core.errors import ConfigError
from limits_ray.core.reward_spec import RewardSpec

__all__ = ["AnalysisConfig", "Plan", "parse_betas"]

Plan = list[tuple[RewardSpec, list[RewardSpec]]]
"""``[(align, [evals])]``: which rewards align and which evaluate (see :meth:`AnalysisConfig.plan`)."""


def parse_betas(text: str | float | list | tuple) -> tuple[float, ...]:
    """Parse a beta grid: ``"0.1,1,10"``, ``"start:stop:count"`` (log-spaced, inclusive) or a list.

    Returns the betas sorted ascending and de-duplicated; every beta must be positive and finite.
    """
    if isinstance(text, (int, float)):
        values = [float(text)]
    elif isinstance(text, (list, tuple)):
        values = [float(value) for value in text]
    elif ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ConfigError(f"betas {text!r}: a log-spaced grid is written start:stop:count, e.g. 0.01:100:64")
        try:
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise ConfigError(f"betas {text!r}: start and stop must be numbers and count an integer") from None
        if start <= 0 or stop <= 0 or count < 1:
            raise ConfigError(f"betas {text!r}: start and stop must be > 0 and count >= 1")
        values = list(np.geomspace(start, stop, count))
    else:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError as error:
            raise ConfigError(f"betas {text!r}: write a comma list such as 0.1,1,10 ({error})") from None
    if not values:
        raise ConfigError("betas: the grid is empty; give at least one beta > 0")
    bad = [value for value in values if not (np.isfinite(value) and value > 0)]
    if bad:
        raise ConfigError(f"betas must be positive and finite (KL penalty beta > 0); got {bad}")
    return tuple(sorted({float(value) for value in values}))


@dataclass(frozen=True)
class AnalysisConfig:
    """What the reducer computes from scored samples.

    Attributes:
        betas: the beta grid (see :func:`parse_betas`).
        rewards: reward columns to read; empty means every float column of the samples.
        align: alignment rewards (column names or ``mean(a,b)``); empty means each reward column.
        evals: evaluation rewards; empty means each alignment reward evaluated on itself.
        best_of_n: compute best-of-n (needs each prompt's rewards in memory).
        convergence: compute the dyadic convergence table.
        winrate: with best-of-n, also the win rates over pi0 (``winrate``, ``winrate_mean``:
            :mod:`limits_ray.core.winrate`; they take about 60% more time in the per-prompt pass).
    """

    betas: tuple[float, ...] = parse_betas("0.01:100:41")
    rewards: tuple[str, ...] = ()
    align: tuple[str, ...] = ()
    evals: tuple[str, ...] = ()
    best_of_n: bool = True
    convergence: bool = True
    winrate: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", parse_betas(self.betas))
        for name in ("rewards", "align", "evals"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        for spec in (*self.align, *self.evals):
            try:
                RewardSpec.parse(spec)
            except ValueError as error:
                raise ConfigError(str(error)) from None

    def plan(self, reward_columns: list[str]) -> list[tuple[RewardSpec, list[RewardSpec]]]:
        """``[(align, [evals])]`` resolved against the reward columns present."""
        aligns = [RewardSpec.parse(text) for text in self.align] or [RewardSpec.parse(c) for c in reward_columns]
        evals = [RewardSpec.parse(text) for text in self.evals]
        for spec in (*aligns, *evals):
            missing = [column for column in spec.columns if column not in reward_columns]
            if missing:
                raise ConfigError(
                    f"reward {spec.name!r} uses columns {missing} that are not reward columns; "
                    f"available: {reward_columns}"
                )
        return [(align, evals or [align]) for align in aligns]
