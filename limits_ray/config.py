"""The typed configuration shared by the CLI and the jobs, loaded from YAML.

Every section is a frozen dataclass; :func:`from_mapping` builds one from plain data and rejects
unknown keys by naming them and the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.errors import ConfigError

__all__ = [
    "AdaptiveConfig", "EngineResources", "GenerationConfig", "JobConfig", "NightlyConfig", "PolicyConfig",
    "PromptsConfig", "RewardModelConfig", "StorageConfig", "StoreConfig", "engine_revision_kwargs", "from_mapping",
    "hub_kwargs", "load_yaml",
]

T = TypeVar("T")


def hub_kwargs(revision: str) -> dict[str, str]:
    """``from_pretrained`` keyword arguments pinning a hub ``revision`` (none when it is empty)."""
    return {"revision": revision} if revision else {}


def engine_revision_kwargs(revision: str) -> dict[str, str]:
    """``vllm.LLM`` keyword arguments pinning a hub ``revision`` for weights and tokenizer (none when empty)."""
    return {"revision": revision, "tokenizer_revision": revision} if revision else {}


DUPLICATE_RULES = ("drop", "error")


@dataclass(frozen=True)
class PromptsConfig:
    """Where prompts come from and how they are rendered.

    Exactly one source: ``dataset`` (a Hugging Face dataset name, with ``split``), ``path`` (a local
    JSONL or Parquet file) or ``inline`` (prompts written in the config).

    Attributes:
        dataset: Hugging Face dataset name (``datasets.load_dataset(dataset, split=split)``).
        split: the dataset split.
        path: a local ``.jsonl`` or ``.parquet`` file.
        inline: prompt texts given directly.
        column: the column holding the prompt text.
        id_column: a column with stable ids; empty means ``sha1(text)[:16]``.
        template: a ``str.format`` template with ``{prompt}``, applied unless ``chat_template``.
        chat_template: render with the tokenizer's chat template (one user turn, generation prompt).
        limit: keep only the first ``limit`` prompts (0: all).
        duplicates: what a row repeating an earlier prompt (same id and same text) does: ``drop``
            keeps the first and counts the others (report.json's ``duplicate_prompts``), ``error``
            stops naming both rows. The same id with another text is always an error.
    """

    dataset: str = ""
    split: str = "train"
    path: str = ""
    inline: tuple[str, ...] = ()
    column: str = "prompt"
    id_column: str = ""
    template: str = "{prompt}"
    chat_template: bool = False
    limit: int = 0
    duplicates: str = "drop"

    def __post_init__(self) -> None:
        if self.duplicates not in DUPLICATE_RULES:
            raise ConfigError(f"prompts.duplicates must be one of {list(DUPLICATE_RULES)}, got {self.duplicates!r}")
        sources = [name for name in ("dataset", "path", "inline") if getattr(self, name)]
        if len(sources) != 1:
            raise ConfigError(f"prompts: give exactly one of dataset, path or inline (got {sources or 'none'})")
        if "{prompt}" not in self.template:
            raise ConfigError(f"prompts.template {self.template!r} must contain {{prompt}}")


EXECUTOR_BACKENDS = ("mp", "ray")
PLACEMENT_KEYS = {"tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "gpu_memory_utilization"}
DTYPES = ("bfloat16", "float16", "float32")
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # vllm/config/cache.py, CacheConfig.gpu_memory_utilization (0.32)


@dataclass(frozen=True, kw_only=True)
class EngineResources:
    """Where one stage's actors run, how big their engines are and how long their calls may take
    (generation and rewards share these keys).

    Attributes:
        concurrency: actors of the stage: ``N`` (a fixed pool) or ``[min, max]`` (Ray Data grows and
            shrinks the pool between them with the work queued).
        num_gpus: GPUs per engine shard; 0 runs the engine on CPU (and only then are vLLM's CPU variables
            set). With ``tensor_parallel_size * pipeline_parallel_size > 1`` it must be 1.
        num_cpus: CPUs per actor.
        tensor_parallel_size, pipeline_parallel_size: vLLM parallelism (``vllm`` engines only): one engine
            spans ``tp * pp`` GPUs.
        distributed_executor_backend: how a multi-GPU engine starts its workers, always passed to vLLM:
            ``mp`` (default: the actor reserves all ``tp * pp`` GPUs of one node and vLLM starts one
            process per GPU) or ``ray`` (the actor takes no GPU; a PACK placement group of ``tp * pp``
            ``{GPU: 1, CPU: 1}`` bundles is made for vLLM's Ray workers and removed when the run ends;
            it needs a fixed ``concurrency``).
            A single-GPU or CPU engine runs in the actor's process (vLLM's ``uni``).
        accelerator_type: the Ray accelerator type the actors need (e.g. ``H100``); empty: any.
        gpu_memory_utilization: the share of each GPU's memory the stage's model may claim: vLLM's
            ``gpu_memory_utilization`` (0: vLLM's default, 0.92 in vLLM 0.32, a per-engine limit), or for a
            ``transformers`` reward torch's per-process memory fraction (0: no limit). With a fraction of
            a GPU (``0 < num_gpus < 1``, so that stages share a device) a model stage must set it, at most
            ``num_gpus``: otherwise the config is refused when it loads.
        dtype: the weights' and activations' type: ``bfloat16``, ``float16`` or ``float32``; empty: bfloat16
            for a stage on GPUs (``num_gpus > 0``), float32 on CPU. Always passed explicitly (vLLM's and
            transformers' ``auto`` would run float32 checkpoints in float16 on CUDA) and recorded in the
            store's identity. Not inside ``engine_kwargs``.
        timeout_s: a stage call (one batch) running longer than this is taken for a hung actor: it ends,
            Ray starts a new one and retries the batch (``batch_retries``); 0: no limit. For generation,
            a batch's time sharing the engine with the other batches in flight counts.
        stall_timeout_s: a vLLM engine whose step (one scheduling iteration; vLLM's ``LLMEngine.step``)
            has not returned after this long is taken for hung, and its actor ends at once
            (:class:`~limits_ray.pipeline.engine_guard.EngineGuard`); 0: no limit. A dead engine (its engine-core
            process gone, vLLM's engine-dead flag) ends the actor within a second, whatever this is.
    """

    concurrency: tuple[int, ...] = (1,)
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "mp"
    accelerator_type: str = ""
    gpu_memory_utilization: float = 0.0
    dtype: str = ""
    timeout_s: float = 1800.0
    stall_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        concurrency = self.concurrency
        if isinstance(concurrency, (list, tuple)) and all(isinstance(value, int) for value in concurrency):
            object.__setattr__(self, "concurrency", tuple(concurrency))
        elif isinstance(concurrency, int) and not isinstance(concurrency, bool):
            object.__setattr__(self, "concurrency", (concurrency,))
        else:
            raise ConfigError(f"concurrency must be an integer N or [min, max], got {concurrency!r}")

    def check_resources(self, where: str, engine: bool, model: bool | None = None) -> None:
        """Raise :class:`ConfigError` naming ``where`` for inconsistent settings; ``engine``: a vLLM engine,
        ``model``: a model on a device (a vLLM engine or a transformers reward; default: ``engine``).

        The engine's size, backend and dtype belong to these keys, not to ``engine_kwargs`` (where vLLM would
        get them without the actor reserving the GPUs they need, or the store recording the dtype)."""
        model = engine if model is None else model
        if len(self.concurrency) not in (1, 2) or min(self.concurrency) < 1 or self.concurrency[0] > self.concurrency[-1]:
            raise ConfigError(f"{where}.concurrency must be N >= 1 or [min, max] with 1 <= min <= max, got {list(self.concurrency)}")
        placed = sorted(set(getattr(self, "engine_kwargs", {})) & PLACEMENT_KEYS)
        if placed:
            raise ConfigError(f"{where}.engine_kwargs: {placed} set where the actors are placed; move them out of "
                              f"engine_kwargs to {where}.{placed[0]} (and its siblings)")
        if "dtype" in getattr(self, "engine_kwargs", {}):
            raise ConfigError(f"{where}.engine_kwargs: dtype set inside engine_kwargs; move it to {where}.dtype "
                              "(passed to every engine and recorded in the store's identity)")
        if self.dtype and self.dtype not in DTYPES:
            raise ConfigError(f"{where}.dtype {self.dtype!r}: valid dtypes are {list(DTYPES)} (empty: bfloat16 on "
                              "GPUs, float32 on CPU)")
        for name in ("timeout_s", "stall_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"{where}.distributed_executor_backend {self.distributed_executor_backend!r}: valid "
                              f"backends are {list(EXECUTOR_BACKENDS)}")
        if not 0 <= self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization must lie in [0, 1] (0: vLLM's default), got "
                              f"{self.gpu_memory_utilization}")
        if self.gpus_per_engine > 1 and not engine:
            raise ConfigError(f"{where}: tensor and pipeline parallelism need a vllm engine; set both sizes to 1")
        if self.gpus_per_engine > 1 and self.distributed_executor_backend == "ray" and len(set(self.concurrency)) > 1:
            raise ConfigError(f"{where}: the ray backend needs a fixed concurrency (each new actor reserves a placement "
                              f"group until the run ends, so a pool that shrinks and grows would strand GPUs); got "
                              f"{list(self.concurrency)}")
        if self.gpus_per_engine > 1 and self.num_gpus != 1:
            raise ConfigError(f"{where}.num_gpus must be 1 (one GPU per shard) with tensor_parallel_size x "
                              f"pipeline_parallel_size = {self.gpus_per_engine}, got {self.num_gpus}")
        if model and 0 < self.num_gpus < 1 and not 0 < self.gpu_memory_utilization <= self.num_gpus:
            claimed = (self.gpu_memory_utilization if self.gpu_memory_utilization else
                       f"unset: vLLM's default {VLLM_DEFAULT_GPU_MEMORY_UTILIZATION}" if engine else "unset: no limit")
            raise ConfigError(f"{where}.gpu_memory_utilization ({claimed}) does not fit {where}.num_gpus "
                              f"({self.num_gpus:g}): a model on a fraction of a GPU shares the device and may claim at "
                              f"most that fraction of its memory; set gpu_memory_utilization to at most {self.num_gpus:g}")

    @property
    def engine_dtype(self) -> str:
        """The dtype the stage's model runs in: ``dtype``, else bfloat16 on GPUs and float32 on CPU."""
        return self.dtype or ("bfloat16" if self.num_gpus > 0 else "float32")

    @property
    def device_kind(self) -> str:
        """``cpu``, or ``gpu`` (``gpu:<accelerator_type>`` when one is set): as configured, not probed."""
        if not self.num_gpus:
            return "cpu"
        return f"gpu:{self.accelerator_type}" if self.accelerator_type else "gpu"

    @property
    def gpus_per_engine(self) -> int:
        """``tensor_parallel_size * pipeline_parallel_size``."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def max_actors(self) -> int:
        """The most actors the stage runs (``concurrency`` or its max)."""
        return self.concurrency[-1]


GENERATION_KINDS = ("vllm", "synthetic")


@dataclass(frozen=True)
class GenerationConfig(EngineResources):
    """Sampling from the base model with vLLM (one engine per actor), or synthetic samples.

    ``kind: synthetic`` is a test and benchmark tool, not a model: each round's responses are drawn
    by :class:`~limits_ray.pipeline.generation.SyntheticGenerator` from numpy's generator seeded by the round
    seed (random length 1..``max_tokens`` words of a small vocabulary, with their exact
    log-probability), so the whole pipeline (rewards, store, statistics, tables, plots) runs at scale
    without a model, GPU or tokenizer. ``model``, ``temperature``, ``top_p``, ``stop``, the engine and
    GPU settings do not apply to it, and prompts are rendered with ``prompts.template`` only (no
    chat template) and not length-checked.

    Attributes:
        model: a local model directory or hub name vLLM can load (``vllm`` only, where it is required).
        revision: the hub commit of a hub ``model`` (recorded in the store's identity, so a nightly series
            never mixes revisions; a branch or tag is recorded as given, which pins nothing); empty for a
            local directory, whose files are fingerprinted.
        kind: ``vllm`` (default) or ``synthetic``.
        samples_per_prompt: N, the base samples drawn per prompt; a multiple of ``n``.
        n: samples per request: one request is one *round*, seeded by (prompt_id, round).
        seed: the run's base seed; round seeds derive from (seed, prompt_id, round).
        temperature, top_p, max_tokens, stop: vLLM sampling parameters.
        concurrency, num_gpus, num_cpus, tensor_parallel_size, pipeline_parallel_size,
        distributed_executor_backend, accelerator_type, gpu_memory_utilization: see :class:`EngineResources`.
        batch_size: requests per actor call.
        batches_in_flight: calls (batches) each generation actor runs at once, their requests in its one
            engine together (:class:`~limits_ray.pipeline.generation.SharedEngine`): the engine starts the next
            batch while the last one's slowest samples finish and its rows are built and handed on;
            1: one batch at a time. vLLM only (synthetic generation runs one at a time).
        logprobs: also store each sample's log-probability under the model (vLLM's
            ``cumulative_logprob``, before temperature/top-p; NaN when off). Nothing in the frontier
            uses it, so it is off by default and vLLM computes no log-probabilities; a policy's
            samples always get theirs (their KL needs them), and synthetic samples theirs (exact, free).
        max_model_len: the engine's context length (0: the model's).
        dtype, timeout_s, stall_timeout_s: see :class:`EngineResources` (synthetic generation has only
            ``timeout_s``).
        engine_kwargs: further ``vllm.LLM`` arguments.
    """

    model: str = ""
    revision: str = ""
    kind: str = "vllm"
    samples_per_prompt: int = 64
    n: int = 16
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    batches_in_flight: int = 2
    logprobs: bool = False
    max_model_len: int = 0
    engine_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1 or self.samples_per_prompt < 1 or self.samples_per_prompt % self.n:
            raise ConfigError(
                f"generation.samples_per_prompt ({self.samples_per_prompt}) must be a positive multiple "
                f"of generation.n ({self.n})"
            )
        if self.kind not in GENERATION_KINDS:
            raise ConfigError(f"generation.kind {self.kind!r}: valid kinds are {list(GENERATION_KINDS)}")
        if self.timeout_s < 0:  # also checked with the other resources; synthetic generation keeps only this one
            raise ConfigError(f"generation.timeout_s must be >= 0 (0: no limit), got {self.timeout_s}")
        if self.batches_in_flight < 1:
            raise ConfigError(f"generation.batches_in_flight must be >= 1 (1: one batch at a time), got {self.batches_in_flight}")
        if self.kind == "vllm" and not self.model:
            raise ConfigError(
                "generation.model is required for kind vllm: give a model directory or hub name "
                "(or kind: synthetic for model-free test and benchmark runs)"
            )
        self.placed.check_resources("generation", engine=self.kind == "vllm")

    @property
    def placed(self) -> EngineResources:
        """The resources that apply: all of them for a vLLM engine; for synthetic generation (no engine,
        no device) only ``concurrency`` and ``num_cpus``."""
        return self if self.kind == "vllm" else EngineResources(concurrency=self.concurrency, num_cpus=self.num_cpus)

    @property
    def rounds(self) -> int:
        """Requests per prompt: ``samples_per_prompt / n``."""
        return self.samples_per_prompt // self.n


REWARD_KINDS = ("vllm", "transformers", "function")


@dataclass(frozen=True)
class RewardModelConfig(EngineResources):
    """One reward: a sequence classifier (vLLM pooling or transformers) or a Python function.

    Attributes:
        name: the reward column it fills.
        kind: ``vllm`` (pooling runner, raw logit), ``transformers`` or ``function``.
        model: the model directory or hub name (``vllm``, ``transformers``).
        revision: the hub commit of a hub ``model`` (recorded in the store's identity, so a nightly series
            never mixes revisions; a branch or tag is recorded as given, which pins nothing); empty for a
            local directory, whose files are fingerprinted.
        function: ``module:function`` taking ``(prompts, responses)`` lists, returning floats.
        input_template: ``str.format`` template with ``{prompt}`` and ``{response}``.
        chat_template: render ``[user: prompt, assistant: response]`` with the RM tokenizer's template.
        concurrency, num_gpus, num_cpus, tensor_parallel_size, pipeline_parallel_size,
        distributed_executor_backend, accelerator_type, gpu_memory_utilization, dtype, timeout_s,
        stall_timeout_s: see :class:`EngineResources` (parallelism, the backend and ``stall_timeout_s``
            apply to ``vllm`` rewards only, ``dtype`` and ``gpu_memory_utilization`` to model rewards;
            ``timeout_s`` to every reward).
        batch_size: samples per call.
        engine_kwargs: further ``vllm.LLM`` arguments.
    """

    name: str
    kind: str
    model: str = ""
    revision: str = ""
    function: str = ""
    input_template: str = "{prompt}{response}"
    chat_template: bool = False
    batch_size: int = 64
    engine_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in REWARD_KINDS:
            raise ConfigError(f"rewards[{self.name}].kind {self.kind!r}: valid kinds are {list(REWARD_KINDS)}")
        if self.kind == "function" and ":" not in self.function:
            raise ConfigError(f"rewards[{self.name}].function must be 'module:function', got {self.function!r}")
        if self.kind != "function" and not self.model:
            raise ConfigError(f"rewards[{self.name}]: kind {self.kind!r} needs a model path")
        self.check_resources(f"rewards[{self.name}]", engine=self.kind == "vllm", model=self.kind != "function")


@dataclass(frozen=True)
class StoreConfig:
    """The sample store: every scored sample as Parquet, so results can be recomputed and extended.

    Attributes:
        enabled: keep the store after the run (default on); off, the run uses a scratch store under
            ``<output_dir>/.work`` and deletes it at the end.
        path: its directory or URI (``s3://bucket/prefix``, ``gs://...``, ``file://...``; empty:
            ``<output_dir>/store``); a relative path is taken from ``$LIMITS_RAY_ROOT`` if set, else
            from the current directory.
        keep_text: also store prompt and response texts.
        buckets: prompt buckets of a new store (an existing store keeps its own): one per-bucket
            task reads one bucket, so aim at about 1e6 stored samples and 1e3 prompts per bucket; 0
            (default) picks one bucket per 1e6 samples or per 1e3 prompts of the run that creates
            the store, whichever gives more (at least 1, at most 4096).
        batch_samples: samples per store write (at least one round; one part per bucket per write):
            larger means fewer, larger objects; smaller means less work lost when a run is killed
            (rounds not yet written are generated again).
    """

    enabled: bool = True
    path: str = ""
    keep_text: bool = False
    buckets: int = 0
    batch_samples: int = 65536

    def __post_init__(self) -> None:
        if self.batch_samples < 1:
            raise ConfigError(f"store.batch_samples must be >= 1, got {self.batch_samples}")
        if self.buckets < 0:
            raise ConfigError(f"store.buckets must be >= 0 (0: one per 1e6 samples or 1e3 prompts of the first run), got {self.buckets}")


@dataclass(frozen=True)
class StorageConfig:
    """How ``s3://`` URIs in ``output_dir`` and ``store.path`` are reached (credentials come from the
    usual AWS variables, files or instance role; ``gs://`` from Google's default credentials).

    Attributes:
        endpoint_override: ``host:port`` or ``http://host:port`` of an S3-compatible server (MinIO, Ceph, moto).
        region: the bucket's region (empty: the client's default).
    """

    endpoint_override: str = ""
    region: str = ""


@dataclass(frozen=True)
class PolicyConfig:
    """An aligned policy (PPO/GRPO checkpoint, ...) to place against the frontier.

    Sampled with the base run's sampling parameters (temperature, top_p, max_tokens, stop) on the
    same prompts and scored by the same rewards (``limits-ray compare``, :mod:`limits_ray.runs.compare`).
    Its KL is ``E_pi[log pi - log pi0]`` with both log-probabilities those of the raw models
    (before temperature and top-p), so it is the KL of the sampling distribution only at
    temperature 1 and top_p 1 (a warning says so otherwise).

    Attributes:
        name: its label in outputs and plots.
        model: a vLLM-loadable checkpoint using the base model's tokenizer.
        revision: the hub commit of a hub ``model`` (a branch or tag is passed as given); empty for a
            local directory.
        samples_per_prompt: samples drawn per prompt (a multiple of ``n``).
        n: samples per request.
        seed: sampling seed; -1 derives one from the base seed and ``name`` (so the policy's samples
            are independent of the base samples even when ``model`` is the base model).
        engine_kwargs: further ``vllm.LLM`` arguments, over the base generation's ``engine_kwargs``
            (the checkpoint runs in the base generation's ``dtype``; ``dtype`` is refused here).
    """

    name: str
    model: str
    revision: str = ""
    samples_per_prompt: int = 64
    n: int = 16
    seed: int = -1
    engine_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n < 1 or self.samples_per_prompt < 1 or self.samples_per_prompt % self.n:
            raise ConfigError(
                f"policies[{self.name}].samples_per_prompt ({self.samples_per_prompt}) must be a positive "
                f"multiple of n ({self.n})"
            )
        if "dtype" in self.engine_kwargs:
            raise ConfigError(f"policies[{self.name}].engine_kwargs: dtype set inside engine_kwargs; a checkpoint runs "
                              "in generation.dtype (set it there)")


@dataclass(frozen=True)
class NightlyConfig:
    """Nightly recomputation: each night adds rounds to the stored series and recomputes.

    Attributes:
        rounds_per_night: rounds (of ``generation.n`` samples) added per prompt each night.
        root: where dated results and ``latest`` go (empty: ``<output_dir>/nightly``).
    """

    rounds_per_night: int = 1
    root: str = ""


@dataclass(frozen=True)
class AdaptiveConfig:
    """Adaptive sampling: a pilot decides each prompt's N (stop once its standard errors are under
    tolerance and its weights reliable), then N fresh samples give the results (:mod:`limits_ray.runs.adaptive`).

    Attributes:
        enabled: sample adaptively instead of ``samples_per_prompt`` for every prompt.
        gain_se: tolerance on ``gain_se`` at every beta of the grid.
        kl_se: tolerance on ``kl_se`` at every beta of the grid.
        max_samples_per_prompt: the most pilot samples per prompt (the confirmation draws as many again).
        rounds_per_wave: the least number of rounds added to a still-wide prompt per wave (it gets
            more when its standard errors project to need more, up to ``growth`` times its samples).
        total_samples: the budget of all prompts together, pilot and confirmation (0: only the
            per-prompt cap); the pilot gets half, and once it runs short, the prompts with the widest
            errors relative to the tolerance go first.
        growth: the most a prompt's sample count may grow in one wave (a factor).
    """

    enabled: bool = False
    gain_se: float = 0.05
    kl_se: float = 0.05
    max_samples_per_prompt: int = 4096
    rounds_per_wave: int = 1
    total_samples: int = 0
    growth: float = 4.0


@dataclass(frozen=True)
class JobConfig:
    """A whole run: prompts, generation, rewards, analysis, store, output, and the optional studies
    (policies to place against the frontier, nightly recomputation, adaptive sampling).

    Attributes:
        name: the run's name (used in reports).
        output_dir: where results, plots and the report go: a local directory or a URI
            (``s3://``, ``gs://``, ``file://``); relative paths as for ``store.path``.
        fail_fast: stop the run at the first round that fails; by default such a round is retried
            alone (``attempts`` tries in all) and then quarantined: its prompt is left out of the
            results and named in the report.
        attempts: tries per round before it is quarantined (at least 2: the batch, then the round alone).
        max_quarantined_fraction: the run stops (naming the first errors) once more than this fraction
            of its rounds are quarantined (default 1%): a fault that hits many rounds is a bug to fix,
            not rounds to leave out.
        batch_retries: how often a batch is retried on a new actor after its actor ended (an engine
            fault, a dead or stalled engine, a stage's ``timeout_s``, a lost node); actors themselves are
            always restarted. Also how often a stage's constructor is retried in place, and how many
            actors in a row may die while they start, before the run stops
            (:func:`~limits_ray.pipeline.stages.tolerate_start_deaths`).
        cluster_retries: how often the stages start again, resuming from the sample store, after a
            node was lost under them and Ray reported it as their error (an actor that could not be
            reached while its node was being declared dead, a lost object:
            :func:`~limits_ray.pipeline.faults.is_cluster_fault`); other errors stop the run at once.
        ray_address: ``ray.init`` address; empty: ``RAY_ADDRESS`` if set (as under ``ray job submit``),
            else a new local instance; ``auto``: the cluster already running on this machine.
    """

    name: str
    output_dir: str
    prompts: PromptsConfig
    generation: GenerationConfig
    rewards: tuple[RewardModelConfig, ...]
    analysis: AnalysisConfig = AnalysisConfig()
    store: StoreConfig = StoreConfig()
    storage: StorageConfig = StorageConfig()
    policies: tuple[PolicyConfig, ...] = ()
    nightly: NightlyConfig = NightlyConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()
    ray_address: str = ""
    fail_fast: bool = False
    attempts: int = 2
    max_quarantined_fraction: float = 0.01
    batch_retries: int = 3
    cluster_retries: int = 2

    def __post_init__(self) -> None:
        if self.attempts < 2:
            raise ConfigError(f"attempts must be >= 2 (the batch, then the round alone), got {self.attempts}")
        if not 0 <= self.max_quarantined_fraction <= 1:
            raise ConfigError(f"max_quarantined_fraction must lie in [0, 1], got {self.max_quarantined_fraction}")
        if self.batch_retries < 0:
            raise ConfigError(f"batch_retries must be >= 0, got {self.batch_retries}")
        if self.cluster_retries < 0:
            raise ConfigError(f"cluster_retries must be >= 0, got {self.cluster_retries}")
        names = [reward.name for reward in self.rewards]
        if not names:
            raise ConfigError("rewards: give at least one reward model or function")
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards: names must be unique, got {names}")

    @property
    def store_uri(self) -> str:
        """The sample store's path or URI (``store.path``, else ``<output_dir>/store``)."""
        return self.store.path or f"{self.output_dir.rstrip('/')}/store"


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Coerce plain YAML data to ``annotation`` (dataclass, tuple, Optional, scalar)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return None if value is None else _convert(value, options[0], where)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, str) and item_type is float:
            return value  # a grid such as "0.01:100:41": the dataclass parses it (parse_betas)
        if isinstance(value, (str, int, float)):
            value = [value]  # one item where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(item, item_type, f"{where}[{index}]") for index, item in enumerate(value))
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation in (int, float, str, bool):
        if annotation is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        if annotation is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming them."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = {item.name: item for item in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    missing = [
        name for name, item in fields.items()
        if name not in values and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load dataclass ``cls`` from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as handle:
        return from_mapping(cls, yaml.safe_load(handle), where=str(path))

