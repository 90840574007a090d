"""The exact one-token setup of bench_bracket.py and bench_proposals.py (the tiny models, built here).

With responses of one token, ``pi0(y|x)`` is the tiny base model's next-token softmax over its 768-token
vocabulary after prompt ``x``, and every expectation is a finite sum: the frontier of a prompt set at each beta
is the prompt mean of :func:`limits_ray.core.exact.finite_tilt`. The reward is ``response_length`` of the text vLLM
returns for the token (:func:`limits_ray.tiny_models.one_token_texts`; 11 levels, many ties) or, as a continuous
reward, a standard normal per token (a reward model's scores of the 768 responses, no ties). Samples are drawn from the exact distributions with numpy, so many
replicates cost seconds (tests/test_proposals.py checks that the pipeline's samples and log-probabilities are these).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from limits_ray.core.exact import finite_tilt
from limits_ray.reward_functions import response_length
from limits_ray.tiny_models import build_tiny_models, next_token_logprobs, one_token_texts

PROMPTS = (
    "The cat sat on the", "Once upon a time", "The river ran quietly past", "A good answer is short,",
    "Scientists measure the world", "The recipe is simple. Warm the", "Cities grow along roads and",
    "Numbers help us reason: one, two,",
)


@dataclass
class OneToken:
    """pi0 ``[P, V]`` after each prompt, the rewards ``{name: [V]}`` and the tiny models."""

    pi0: np.ndarray
    rewards: dict[str, np.ndarray]
    models: object


def one_token_setup(root: Path) -> OneToken:
    models = build_tiny_models(root / "tiny_models", seed=0)
    pi0 = np.exp(next_token_logprobs(models.policy, list(PROMPTS)))
    pi0 /= pi0.sum(axis=1, keepdims=True)
    texts = one_token_texts(models.policy)
    length = np.array(response_length(list(PROMPTS[:1]) * len(texts), texts))
    normal = np.random.default_rng(123).normal(size=length.size)
    return OneToken(pi0, {"length (11 levels, ties)": length, "normal per token (continuous)": normal}, models)


def exact_frontier(pi0: np.ndarray, reward: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(KL, gain)`` of the prompt set's frontier at each beta: the prompt means of the exact tilts."""
    kl = np.array([np.mean([finite_tilt(p, reward, reward, beta).kl for p in pi0]) for beta in betas])
    gain = np.array([np.mean([finite_tilt(p, reward, reward, beta).gain[0] for p in pi0]) for beta in betas])
    return kl, gain


def frontier_function(pi0: np.ndarray, reward: np.ndarray):
    """``K -> g*(K)`` of the prompt set (a fine beta grid, interpolated: the curve is concave; its maximum beyond
    the largest KL a tilt reaches)."""
    betas = np.geomspace(1e-4, 1e3, 1200)
    grid_kl, grid_gain = exact_frontier(pi0, reward, betas)
    order = np.argsort(grid_kl)
    return lambda kl: np.interp(kl, grid_kl[order], grid_gain[order], left=0.0, right=grid_gain.max())


def draw(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """``[P, n]`` token ids, row ``x`` drawn from ``probs[x]``."""
    cumulative = np.cumsum(probs, axis=1)
    cumulative[:, -1] = 1.0
    return np.stack([np.searchsorted(row, rng.random(n), side="right") for row in cumulative])
