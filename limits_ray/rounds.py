"""The row layout of the pipeline: one row per *round* (one request of ``n`` samples of a prompt).

Round columns (``prompt_id``, ``prompt``, ``round``, ``seed``) hold one value per row; sample
columns (``sample_idx``, ``response``, ``response_tokens``, ``logprob``, ``finish_reason`` and each
reward) hold ``n`` values per row: a ``[rows, n]`` array, or, after Ray Data has moved the batch,
an object array of ``n``-arrays. A row whose sample columns hold scalars is a round of one sample.
Keeping rounds whole makes a round the unit of storage, retry and merging.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ROUND_COLUMNS", "SAMPLE_COLUMNS", "is_round_layout", "per_round", "per_sample", "regroup", "round_lengths"]

ROUND_COLUMNS = ("prompt_id", "prompt", "round", "seed")
SAMPLE_COLUMNS = ("sample_idx", "response", "response_tokens", "logprob", "finish_reason")


def _is_nested(values: np.ndarray) -> bool:
    return values.ndim > 1 or (values.dtype == object and values.size > 0 and isinstance(values[0], (np.ndarray, list)))


def _reference(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(batch["sample_idx"] if "sample_idx" in batch else batch["response"])


def is_round_layout(batch: dict[str, np.ndarray]) -> bool:
    """Whether the batch's sample columns hold arrays (rounds) rather than scalars (samples)."""
    return _is_nested(_reference(batch))


def round_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Samples per row, read off ``sample_idx`` (or ``response`` if there is no ``sample_idx``)."""
    values = _reference(batch)
    if values.ndim > 1:
        return np.full(values.shape[0], values.shape[1], dtype=np.int64)
    if _is_nested(values):
        return np.array([len(row) for row in values], dtype=np.int64)
    return np.ones(values.shape[0], dtype=np.int64)


def per_sample(values: np.ndarray) -> np.ndarray:
    """A sample column flattened to one value per sample, in row order."""
    values = np.asarray(values)
    if values.ndim > 1:
        return values.reshape(-1)
    if _is_nested(values):
        return np.concatenate([np.asarray(row) for row in values])
    return values


def per_round(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A round column repeated once per sample."""
    return np.repeat(np.asarray(values), lengths)


def regroup(flat: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Per-sample values back to the batch's rows: ``[rows, n]`` when every row has ``n`` samples."""
    flat = np.asarray(flat)
    if not is_round_layout(batch):
        return flat
    lengths = round_lengths(batch)
    if np.all(lengths == lengths[0]):
        return flat.reshape(lengths.size, int(lengths[0]))
    rows = np.empty(lengths.size, dtype=object)
    rows[:] = np.split(flat, np.cumsum(lengths)[:-1])
    return rows
