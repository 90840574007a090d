"""Small rule-based rewards for ``kind: function`` reward configs (``limits_ray.reward_functions:NAME``).

A reward function takes the lists of prompts and responses and returns one float per pair.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["contains_word", "response_length"]


def response_length(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The response's length in characters, divided by 10."""
    return [len(response) / 10.0 for response in responses]


def contains_word(prompts: Sequence[str], responses: Sequence[str], word: str = "the") -> list[float]:
    """1.0 when the response contains ``word`` as a whole word (case-insensitive), else 0.0."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    return [1.0 if pattern.search(response) else 0.0 for response in responses]
