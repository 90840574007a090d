"""Prompt buckets: a stable partition of prompt ids, shared by the sample store and the offline reducer.

A bucket is the unit of work of every per-prompt task that must not run on the driver (merging
stored statistics, best-of-n, per-prompt tables): one task reads one bucket's files only.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

__all__ = ["bucket_name", "bucket_of"]


def bucket_of(prompt_ids: Iterable[str], buckets: int) -> np.ndarray:
    """Bucket of each prompt id: the first 8 bytes of ``sha1(prompt_id)`` (UTF-8), big-endian, modulo ``buckets``.

    Stable across processes, machines and Python versions (unlike ``hash``).
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return np.fromiter(
        (int.from_bytes(hashlib.sha1(str(prompt_id).encode("utf-8")).digest()[:8], "big") % buckets for prompt_id in prompt_ids),
        dtype=np.int64,
    )


def bucket_name(bucket: int) -> str:
    """The partition directory of a bucket, ``bucket=00042`` (Hive style, so pyarrow reads ``bucket`` as a column)."""
    return f"bucket={int(bucket):05d}"
