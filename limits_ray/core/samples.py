"""Scored samples in memory: their key columns, and a table's split into per-prompt arrays.

A samples table holds ``prompt_id`` (string), ``sample_idx`` (int64) and one float column per
reward; sorted by ``(prompt_id, sample_idx)`` it is split prompt by prompt with :func:`iter_prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["KEY_COLUMNS", "SAMPLE_ATTRIBUTES", "PromptSamples", "iter_prompts"]


KEY_COLUMNS = ("prompt_id", "sample_idx")


SAMPLE_ATTRIBUTES = ("logprob", "base_logprob")
"""Float columns of the sample store and policy tables that describe a sample, not a reward: never a
default reward column (``logprob`` is NaN unless ``generation.logprobs``)."""


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
