"""Every config value checked on the driver before Ray starts, each failure one clear error.

:func:`validate_job` runs once per run before ``ray.init``: the command line calls it first (then
``run_job``, ``compare`` and ``run_adaptive`` get ``validated=True``), and :func:`limits_ray.runs.job.run_job`
calls it itself otherwise (the nightly and convergence jobs, a notebook). It raises
:class:`~limits_ray.core.errors.ConfigError` with a message ``<key>: <what is wrong>; <the fix>``, which
the CLI prints as one ``error:`` line with exit code 2. Without it such values reach the actors and
fail there, late and wrapped (an ``ActorDiedError`` for a reward function that does not exist,
every round quarantined for ``temperature: -1``).

Checked: model paths (local directories must exist and hold ``config.json``; hub names ``org/name``
pass unchecked, so a missing local path written ``dir/name`` passes too), reward functions
(imported), sampling parameters (through vLLM's own ``SamplingParams``), the prompts file or dataset
(opened: a ``save_to_disk`` directory, or the dataset's builder, which reads hub metadata),
alignment/evaluation rewards against the reward names, batch sizes and resources per actor (actor
counts and engine sizes are checked when the config loads), and that ``output_dir`` and ``store.path``
accept a write (the run's only probe of its storage).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable

from limits_ray.config import GenerationConfig, JobConfig, PromptsConfig, RewardModelConfig
from limits_ray.core.errors import ConfigError
from limits_ray.pipeline.prompts import JSONL_SUFFIXES, PARQUET_SUFFIXES
from limits_ray.storage.location import StorageError, check_writable, open_location

log = logging.getLogger(__name__)

__all__ = ["check_model", "check_reward_function", "check_sampling", "validate_job"]

SAMPLING_FIXES = {
    "n": "use n >= 1 (samples per request)",
    "temperature": "use a temperature >= 0 (1 samples the model as it is; 0 is greedy)",
    "top_p": "use 0 < top_p <= 1 (1 keeps the whole distribution)",
    "max_tokens": "use max_tokens >= 1",
    "stop": "give a list of stop strings",
}


def check_model(model: str, key: str, revision: str = "") -> None:
    """A local model directory must exist and hold ``config.json`` (and has no ``revision``: its files are
    fingerprinted); a hub name ``org/name`` passes, with a warning when no ``revision`` pins it."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {model!r} is a directory without config.json, not a model; point it at a model directory")
        if revision:
            raise ConfigError(
                f"{key}: revision {revision!r} is for hub models, but {model!r} is a local directory (its files "
                "are fingerprinted instead); remove the revision or name the hub model"
            )
        return
    if path.exists():
        raise ConfigError(f"{key}: {model!r} is a file, not a model directory; point it at a model directory")
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"{key}: model path {model!r} does not exist; build it (limits-ray make-tiny-models runs/tiny-models "
            "for the tiny configs) or fix the path"
        )
    if not revision:
        log.warning("%s: hub model %r has no revision: a later run may load another one under the same name; "
                    "pin its commit with %s", key, model, key.rsplit(".", 1)[0] + ".revision")


def check_reward_function(reward: RewardModelConfig) -> Callable[..., Any]:
    """Import ``module:function`` of a ``function`` reward; returns the callable."""
    key = f"rewards[{reward.name}].function"
    module_name, _, name = reward.function.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{key}: cannot import module {module_name!r} ({error}); give module:function of an importable module"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        available = sorted(item for item, value in vars(module).items()
                           if inspect.isfunction(value) and value.__module__ == module_name and not item.startswith("_"))
        raise ConfigError(f"{key}: module {module_name!r} has no function {name!r}; its functions: {available}")
    return function


def check_sampling(generation: GenerationConfig, key: str = "generation") -> None:
    """Build vLLM's ``SamplingParams`` from each sampling value alone, then from all of them."""
    from vllm import SamplingParams

    values = {"n": generation.n, "temperature": generation.temperature, "top_p": generation.top_p,
              "max_tokens": generation.max_tokens, "stop": list(generation.stop)}
    for name, value in values.items():
        try:
            SamplingParams(**{name: value})
        except Exception as error:  # noqa: BLE001 - vLLM's validation errors share no base class with ValueError
            reason = str(error.args[0] if error.args else error).rstrip(".")
            raise ConfigError(f"{key}.{name}: {value!r} is refused by vLLM ({reason}); {SAMPLING_FIXES[name]}") from None
    try:
        SamplingParams(**values)
    except Exception as error:  # noqa: BLE001
        reason = str(error.args[0] if error.args else error).rstrip(".")
        raise ConfigError(f"{key}: the sampling parameters {values} are refused by vLLM ({reason})") from None


def _check_dataset(name: str) -> None:
    """A ``save_to_disk`` directory, or a dataset ``datasets.load_dataset_builder`` can open (the hub's metadata)."""
    import datasets

    directory = Path(name).expanduser()
    if (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file():
        return
    try:
        datasets.load_dataset_builder(name)
    except Exception as error:  # noqa: BLE001 - datasets raises FileNotFoundError, ConnectionError, ValueError, its own
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"prompts.dataset: cannot open {name!r} ({type(error).__name__}: {reason}); give a Hugging Face dataset "
            "name (with network access) or a directory written by save_to_disk"
        ) from None


def _check_prompts(prompts: PromptsConfig) -> None:
    if prompts.dataset:
        _check_dataset(prompts.dataset)
    if not prompts.path:
        return
    path = Path(prompts.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts.path: {prompts.path!r} is not a file; give a .jsonl or .parquet file of prompts")
    if path.suffix.lower() not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise ConfigError(
            f"prompts.path: {prompts.path!r} has an unsupported type {path.suffix or '(none)'!r}; "
            f"use one of {list(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ConfigError(f"prompts.path: cannot read {prompts.path!r} ({error.strerror}); fix its permissions") from None


def _check_counts(config: JobConfig) -> None:
    stages: list[tuple[str, Any]] = [("generation", config.generation)]
    stages += [(f"rewards[{reward.name}]", reward) for reward in config.rewards]
    for key, section in stages:
        if section.batch_size < 1:
            raise ConfigError(f"{key}.batch_size: must be >= 1, got {section.batch_size}")
        for name in ("num_cpus", "num_gpus"):
            if getattr(section, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(section, name)}")


def _check_locations(config: JobConfig) -> None:
    """``output_dir`` and ``store.path`` (paths or URIs) accept a write (see :func:`limits_ray.storage.location.check_writable`)."""
    storage = config.storage
    places = [("output_dir", config.output_dir)] + ([("store.path", config.store_uri)] if config.store.enabled else [])
    for key, uri in places:
        try:
            check_writable(open_location(uri, storage.endpoint_override, storage.region, where=key), key)
        except StorageError as error:
            raise ConfigError(str(error)) from None


def validate_job(config: JobConfig) -> None:
    """Check every value of ``config`` that Ray would otherwise meet first; raises :class:`ConfigError`."""
    if config.generation.kind == "vllm":
        check_model(config.generation.model, "generation.model", config.generation.revision)
    check_sampling(config.generation)
    _check_counts(config)
    for reward in config.rewards:
        if reward.kind == "function":
            check_reward_function(reward)
        else:
            check_model(reward.model, f"rewards[{reward.name}].model", reward.revision)
    for policy in config.policies:
        check_model(policy.model, f"policies[{policy.name}].model", policy.revision)
    _check_prompts(config.prompts)
    try:
        config.analysis.plan([reward.name for reward in config.rewards])
    except ConfigError as error:
        raise ConfigError(f"analysis.align/analysis.evals: {error}; name rewards of the rewards section") from None
    _check_locations(config)
