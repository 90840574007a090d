"""The row layout of the pipeline: one row per *round* (one request of ``n`` samples of a prompt).

Round columns (``prompt_id``, ``prompt`` as rendered for the model, ``prompt_text`` as the source
gave it, ``round``, ``seed``) hold one value per row; sample
columns (``sample_idx``, ``response``, ``response_tokens``, ``logprob``, ``finish_reason`` and each
reward) hold ``n`` values per row: a ``[rows, n]`` array, or, after Ray Data has moved the batch,
an object array of ``n``-arrays. A row whose sample columns hold scalars is a round of one sample.
Keeping rounds whole makes a round the unit of storage, retry and merging.

Between stages a batch of rounds travels as an Arrow table (:func:`to_arrow`): round columns as
scalars, sample columns as ``list<...>`` (Ray Data hands them to the next stage as object arrays of
``n``-arrays, which the functions here read), never as pickled Python objects.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = [
    "ARROW_TYPES", "ROUND_COLUMNS", "SAMPLE_COLUMNS", "is_round_layout", "per_round", "per_sample", "regroup",
    "round_lengths", "to_arrow",
]

ROUND_COLUMNS = ("prompt_id", "prompt", "prompt_text", "round", "seed")
SAMPLE_COLUMNS = ("sample_idx", "response", "response_tokens", "logprob", "finish_reason")
ARROW_TYPES = {
    "prompt_id": pa.string(), "prompt": pa.string(), "prompt_text": pa.string(), "round": pa.int64(), "seed": pa.int64(),
    "sample_idx": pa.list_(pa.int64()), "response": pa.list_(pa.string()), "response_tokens": pa.list_(pa.int64()),
    "logprob": pa.list_(pa.float64()), "finish_reason": pa.list_(pa.string()),
}


def _is_nested(values: np.ndarray) -> bool:
    return values.ndim > 1 or (values.dtype == object and values.size > 0 and isinstance(values[0], (np.ndarray, list)))


def _reference(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(batch["sample_idx"] if "sample_idx" in batch else batch["response"])


def is_round_layout(batch: dict[str, np.ndarray]) -> bool:
    """Whether the batch's sample columns hold arrays (rounds) rather than scalars (samples)."""
    return _is_nested(_reference(batch))


def round_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Samples per row, read off ``sample_idx`` (or ``response`` if there is no ``sample_idx``)."""
    return _lengths(_reference(batch))


def _lengths(values: np.ndarray) -> np.ndarray:
    """Values per row of one column: ``n`` of a ``[rows, n]`` array, each row's length, or 1 for scalars."""
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


def to_arrow(batch: dict[str, np.ndarray]) -> pa.Table:
    """The batch of rounds as an Arrow table with an explicit type per column.

    Known columns take :data:`ARROW_TYPES`; ``seconds_*`` columns are float64; any other column
    holding ``n`` values per row (a reward, say) is ``list<double>`` for floats, ``list<int64>`` for
    integers, else ``list<string>``; a numeric column of three or more dimensions (token ids padded
    to ``[rows, n, width]``) is a fixed-shape tensor, which Ray Data hands back as that ndarray; any
    other column of one value per row keeps the type Arrow infers (string, binary, int64, ...).
    """
    return pa.table({name: _arrow_column(name, np.asarray(values)) for name, values in batch.items()})


def _arrow_column(name: str, values: np.ndarray) -> pa.Array:
    """One column of :func:`to_arrow`."""
    known = ARROW_TYPES.get(name)
    if name.startswith("seconds_"):
        return pa.array(values, pa.float64())
    if values.dtype != object and values.ndim > 2:
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))
    if known is not None and not pa.types.is_list(known):
        return pa.array(values, known)
    if known is None and not _is_nested(values):
        return pa.array(values)
    flat = per_sample(values)
    offsets = pa.array(np.concatenate([[0], np.cumsum(_lengths(values))]), pa.int32())
    value_type = known.value_type if known is not None else _value_type(flat)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, value_type))


def _value_type(flat: np.ndarray) -> pa.DataType:
    """The Arrow type of a sample column without a fixed type: float64, int64, bool or string."""
    if flat.dtype.kind == "f":
        return pa.float64()
    if flat.dtype.kind in "iu":
        return pa.int64()
    if flat.dtype.kind == "b":
        return pa.bool_()
    return pa.string()
