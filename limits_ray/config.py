"""The typed configuration shared by the CLI and the jobs, loaded from YAML.

Every section is a frozen dataclass; :func:`from_mapping` builds one from plain data and rejects
unknown keys by naming them and the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import numpy as np
import yaml

from limits_ray.reward_spec import RewardSpec

__all__ = ["AnalysisConfig", "ConfigError", "from_mapping", "load_yaml", "parse_betas"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


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
        start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
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
    return tuple(sorted(set(values)))


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
    """

    betas: tuple[float, ...] = parse_betas("0.01:100:41")
    rewards: tuple[str, ...] = ()
    align: tuple[str, ...] = ()
    evals: tuple[str, ...] = ()
    best_of_n: bool = True
    convergence: bool = True

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


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Coerce plain YAML data to ``annotation`` (dataclass, tuple, Optional, scalar)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return None if value is None else _convert(value, options[0], where)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            return value  # a scalar form (e.g. "0.01:100:41" for betas): the dataclass parses it
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_convert(item, item_type, f"{where}[{index}]") for index, item in enumerate(value))
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation in (int, float, str, bool):
        if annotation is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming them."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = {item.name: item for item in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    missing = [
        name for name, item in fields.items()
        if name not in values and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load dataclass ``cls`` from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as handle:
        return from_mapping(cls, yaml.safe_load(handle), where=str(path))

