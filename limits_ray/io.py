"""Reading scored samples and writing results: the Parquet contract of ``limits-ray reduce``.

Input: a Parquet file or a directory of them with ``prompt_id`` (string), ``sample_idx`` (int64)
and one float column per reward model; other columns are ignored. Output: the four tables whose
schemas are defined here (``frontier``, ``frontier_mean``, ``bon``, ``convergence``); ``limits-ray
reduce`` writes the three per-prompt ones as directories of shards (:mod:`limits_ray.offline`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

__all__ = [
    "InputError",
    "PromptSamples",
    "SCHEMAS",
    "cast_samples",
    "check_keys",
    "iter_prompts",
    "open_samples",
    "read_columns",
    "read_samples",
    "validate_samples",
    "write_table",
]

KEY_COLUMNS = ("prompt_id", "sample_idx")
SAMPLE_ATTRIBUTES = ("logprob", "base_logprob")
"""Float columns of the sample store and policy tables that describe a sample, not a reward: never a
default reward column (``logprob`` is NaN unless ``generation.logprobs``)."""

SCHEMAS: dict[str, pa.Schema] = {
    "frontier": pa.schema([
        ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()),
        ("n", pa.int64()), ("gain", pa.float64()), ("gain_se", pa.float64()), ("kl", pa.float64()),
        ("kl_se", pa.float64()), ("ess", pa.float64()), ("gain_bc", pa.float64()), ("kl_bc", pa.float64()),
        ("gain_se_delta", pa.float64()), ("kl_se_delta", pa.float64()), ("gain_kl_cov", pa.float64()),
        ("gain_dbeta", pa.float64()), ("kl_dbeta", pa.float64()),
        ("khat", pa.float64()), ("body_sd", pa.float64()), ("reward_max", pa.float64()), ("top_tied", pa.bool_()),
        ("khat_pooled", pa.float64()), ("reliable", pa.bool_()), ("bias_allowance", pa.float64()),
        ("gain_drift", pa.float64()), ("kl_drift", pa.float64()),
    ]),
    "frontier_mean": pa.schema([
        ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()), ("prompts", pa.int64()),
        ("gain", pa.float64()), ("gain_se", pa.float64()), ("kl", pa.float64()), ("kl_se", pa.float64()),
        ("gain_spread_se", pa.float64()), ("kl_spread_se", pa.float64()),
        ("gain_plugin", pa.float64()), ("kl_plugin", pa.float64()), ("reliable", pa.float64()),
        ("slope", pa.float64()), ("kl_dbeta", pa.float64()), ("gain_se_at_kl", pa.float64()),
    ]),
    "bon": pa.schema([
        ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("n", pa.int64()),
        ("reward", pa.float64()), ("gain", pa.float64()), ("kl", pa.float64()),
        ("reward_se", pa.float64()), ("gain_se", pa.float64()),
    ]),
    "convergence": pa.schema([
        ("prompt_id", pa.string()), ("align", pa.string()), ("eval", pa.string()), ("beta", pa.float64()),
        ("n_samples", pa.int64()), ("gain", pa.float64()), ("gain_se", pa.float64()), ("kl", pa.float64()),
        ("kl_se", pa.float64()), ("ess", pa.float64()), ("gain_bc", pa.float64()), ("kl_bc", pa.float64()),
        ("gain_se_delta", pa.float64()), ("kl_se_delta", pa.float64()), ("khat", pa.float64()),
        ("body_sd", pa.float64()), ("reward_max", pa.float64()), ("top_tied", pa.bool_()),
        ("khat_pooled", pa.float64()), ("reliable", pa.bool_()), ("bias_allowance", pa.float64()),
        ("gain_drift", pa.float64()), ("kl_drift", pa.float64()),
    ]),
}


class InputError(ValueError):
    """Input that cannot be reduced; the message names the input and the fix."""


def _open_dataset(path: Path) -> ds.Dataset:
    if not path.exists():
        raise InputError(f"--samples {path}: no such file or directory")
    try:
        dataset = ds.dataset(str(path), format="parquet", exclude_invalid_files=False)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"--samples {path}: not readable as Parquet ({error})") from None
    if not dataset.files:
        raise InputError(f"--samples {path}: the directory holds no Parquet files")
    return dataset


def _reward_columns(schema: pa.Schema, requested: tuple[str, ...], path: Path) -> list[str]:
    names = schema.names
    missing = [name for name in (*KEY_COLUMNS, *requested) if name not in names]
    if missing:
        raise InputError(f"--samples {path}: missing column(s) {missing}; the file has {names}")
    floats = [field.name for field in schema if pa.types.is_floating(field.type)]
    not_float = [name for name in requested if name not in floats]
    if not_float:
        raise InputError(f"--samples {path}: reward column(s) {not_float} are not float; float columns: {floats}")
    columns = list(requested) or [name for name in floats if name not in SAMPLE_ATTRIBUTES]
    if not columns:
        raise InputError(f"--samples {path}: no float reward column; the file has {names}")
    return columns


def open_samples(path: str | Path, rewards: tuple[str, ...] = ()) -> tuple[ds.Dataset, list[str]]:
    """Open scored samples without reading them; returns the dataset and the reward column names.

    Raises :class:`InputError` for a missing path, an empty directory, unreadable Parquet or a
    missing or non-float reward column.
    """
    path = Path(path)
    dataset = _open_dataset(path)
    return dataset, _reward_columns(dataset.schema, tuple(rewards), path)


def read_samples(
    path: str | Path, rewards: tuple[str, ...] = (), extra: tuple[str, ...] = ()
) -> tuple[pa.Table, list[str]]:
    """Read and validate scored samples; returns the table sorted by (prompt_id, sample_idx).

    Returns the table (key columns, reward columns, then the ``extra`` columns asked for) and the
    reward column names. The whole input is read into memory: ``limits-ray reduce`` streams it
    instead (:mod:`limits_ray.offline`).

    Raises :class:`InputError` for a missing path or column, an empty input, NaN or infinite
    rewards (naming the prompt and the column), negative or duplicated (prompt_id, sample_idx).
    """
    path = Path(path)
    dataset, columns = open_samples(path, rewards)
    missing_extra = [name for name in extra if name not in dataset.schema.names]
    if missing_extra:
        raise InputError(f"--samples {path}: missing column(s) {missing_extra}; the file has {dataset.schema.names}")
    table = read_columns(dataset, [*KEY_COLUMNS, *columns, *extra], path)
    if table.num_rows == 0:
        raise InputError(f"--samples {path}: no rows; nothing to reduce")
    return validate_samples(table, columns, path), columns


def read_columns(dataset: ds.Dataset, columns: list[str], path: Path) -> pa.Table:
    """``dataset.to_table(columns)``, an unreadable file reported as :class:`InputError` naming ``path``."""
    try:
        return dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"--samples {path}: a file could not be read ({error}); remove or rewrite it") from None


def cast_samples(table: pa.Table, columns: list[str]) -> pa.Table:
    """Cast the key columns to (string, int64) and the reward ``columns`` to float64."""
    table = table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", pc.cast(table["prompt_id"], pa.string()))
    table = table.set_column(table.schema.get_field_index("sample_idx"), "sample_idx", pc.cast(table["sample_idx"], pa.int64()))
    for name in columns:
        table = table.set_column(table.schema.get_field_index(name), name, pc.cast(table[name], pa.float64()))
    return table


def validate_samples(table: pa.Table, columns: list[str], path: Path) -> pa.Table:
    """Cast, check and sort samples read from ``path`` (the messages name it); see :func:`read_samples`."""
    table = cast_samples(table, columns)
    check_keys(table, path)
    table = table.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
    _check_finite(table, columns, path)
    _check_unique(table, path)
    return table


def check_keys(table: pa.Table, path: Path) -> None:
    """Raise :class:`InputError` for a null key or a negative ``sample_idx``."""
    for name in KEY_COLUMNS:
        if table[name].null_count:
            raise InputError(f"--samples {path}: column {name} has {table[name].null_count} null value(s)")
    if pc.min(table["sample_idx"]).as_py() < 0:
        raise InputError(f"--samples {path}: sample_idx must be >= 0")


def _check_finite(table: pa.Table, columns: list[str], path: Path) -> None:
    for name in columns:
        values = table[name].to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            row = int(bad[0])
            raise InputError(
                f"--samples {path}: reward column {name!r} has {bad.size} NaN/infinite value(s), first at "
                f"prompt_id={table['prompt_id'][row].as_py()!r} sample_idx={table['sample_idx'][row].as_py()}; "
                "fix or drop those rows (or leave the column out with --rewards)"
            )


def _check_unique(table: pa.Table, path: Path) -> None:
    if table.num_rows < 2:
        return
    prompt_ids, sample_idx = table["prompt_id"], table["sample_idx"]
    same = pc.and_(
        pc.equal(prompt_ids.slice(1), prompt_ids.slice(0, table.num_rows - 1)),
        pc.equal(sample_idx.slice(1), sample_idx.slice(0, table.num_rows - 1)),
    )
    duplicates = np.flatnonzero(same.to_numpy(zero_copy_only=False))
    if duplicates.size:
        row = int(duplicates[0])
        raise InputError(
            f"--samples {path}: {duplicates.size} duplicated (prompt_id, sample_idx), first "
            f"({prompt_ids[row].as_py()!r}, {sample_idx[row].as_py()}); each sample must appear once"
        )


@dataclass
class PromptSamples:
    """One prompt's samples: ``sample_idx`` ``[N]``, reward columns and other columns ``{name: [N]}``."""

    prompt_id: str
    sample_idx: np.ndarray
    rewards: dict[str, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def subset(self, mask: np.ndarray) -> "PromptSamples":
        """The samples where ``mask`` holds."""
        return PromptSamples(
            self.prompt_id, self.sample_idx[mask],
            {name: values[mask] for name, values in self.rewards.items()},
            {name: values[mask] for name, values in self.extra.items()},
        )


def iter_prompts(table: pa.Table, columns: list[str], extra: tuple[str, ...] = ()) -> Iterator[PromptSamples]:
    """Split a table sorted by prompt_id into per-prompt numpy arrays (rewards, then ``extra``)."""
    prompt_ids = table["prompt_id"].combine_chunks()
    changes = pc.not_equal(prompt_ids.slice(1), prompt_ids.slice(0, len(prompt_ids) - 1))
    starts = np.concatenate([[0], np.flatnonzero(changes.to_numpy(zero_copy_only=False)) + 1, [len(prompt_ids)]])
    sample_idx = table["sample_idx"].to_numpy()
    rewards = {name: table[name].to_numpy() for name in columns}
    others = {name: table[name].to_numpy(zero_copy_only=False) for name in extra}
    for start, stop in zip(starts[:-1], starts[1:]):
        yield PromptSamples(
            prompt_id=prompt_ids[int(start)].as_py(),
            sample_idx=sample_idx[start:stop],
            rewards={name: values[start:stop] for name, values in rewards.items()},
            extra={name: values[start:stop] for name, values in others.items()},
        )


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write Parquet atomically: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
