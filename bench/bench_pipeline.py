"""Benchmark of the whole pipeline against plain vLLM generation and plain scoring in one process.

Not a test: run it by hand and it rewrites its own section of docs/benchmarks.md.

    .venv/bin/python bench/bench_pipeline.py                 # tiny models on CPU (about 13 min on 2 cores)
    .venv/bin/python bench/bench_pipeline.py --no-docs       # measure and print only
    python bench/bench_pipeline.py --gpu                     # GPU machine with vllm and ray installed:
                                                             # a ~1B Llama with random weights
    .venv/bin/python bench/bench_pipeline.py --gpu --size small --build-only   # check the GPU model build on CPU

Both sides do the same work on the same job config (same prompts, rounds, seeded ``SamplingParams``,
reward models and statistics):

* baseline: one Python process, no Ray. ``limits_ray.pipeline.generation.Generator`` (one ``vllm.LLM``) draws
  every round in one ``generate`` call, each reward scorer (``limits_ray.pipeline.scoring.make_scorer_class``)
  scores every sample in one call, and ``limits_ray.core.tables.reduce_prompts`` computes the statistics,
  best-of-n and convergence; the result tables and plots are written as the job writes them.
* pipeline: ``limits_ray.runs.job.run_job(config)`` on a new local Ray instance (``ray_address: local``):
  Ray Data actors for generation and each reward, the statistics stage, the sample store, the
  driver-side reducer, the result tables and plots.

Each side runs in a fresh subprocess (so each pays its own imports; ``--repeats`` pairs are run
interleaved, the first side alternating) and times itself from its first line: imports, model or
engine load, the work, and (pipeline) ``ray.init``, dataset execution, time to the first merged round
and the actors' constructor times read off ``ray.timeline()``. The table reports wall times, their
ratio, and the ratio without fixed start-up and tear-down costs (imports, ``ray.init`` and
``ray.shutdown``, engine/model loads; for the pipeline: everything before its dataset started
executing plus the actors' constructors, which run before their first batch).
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the side's clock starts before any heavy import

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import DOCS, ROOT, cpu_description, load_average, update_docs, utc_now  # noqa: E402

SECTION = "## Pipeline overhead (bench/bench_pipeline.py)"
TARGET_OVERHEAD = 0.15

PROMPTS = (
    "The cat sat on the", "Once upon a time there was a", "The best way to learn a language is",
    "In the morning the river", "She opened the old wooden door and", "A good summary of the story is",
    "The recipe is simple. Warm the milk and", "Scientists measure the world with", "Cities grow along roads and",
    "Please write a short poem about", "Ten times ten is", "When someone asks a question,",
    "The miller and his daughter", "A surprising result is not a failure:", "Over many years the streets",
    "Let the dough rest for an hour and", "The children were sent to", "If you do not know, say so and",
    "Small steps, repeated patiently,", "The wheel turned faster in",
)

# Real-size architectures for --gpu (Llama, random weights, the tiny tokenizer's 768-token vocabulary).
SIZES = {
    # TinyLlama-1.1B's shape: ~0.97B parameters with the small vocabulary.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "max_position_embeddings": 2048},
    # Llama-3-8B's shape (less the vocabulary): ~7B parameters.
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 4096},
    # For checking the build on CPU.
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 1024},
}


# --------------------------------------------------------------------------------------------------
# Models and the job config


def build_real_size_models(out_dir: Path, size: str, dtype: str = "bfloat16") -> dict[str, Path]:
    """A Llama causal LM and a Llama sequence classifier (num_labels=1) of ``size``, random weights.

    Built from a config (no download) with the tiny tokenizer, saved with ``save_pretrained``; a
    marker file makes a second call with the same size a no-op.
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from limits_ray.tiny_models import train_tokenizer

    out_dir = Path(out_dir)
    paths = {"policy": out_dir / "policy", "reward": out_dir / "reward", "reward_b": out_dir / "reward_b"}
    marker = out_dir / "real_size_models.json"
    identity = {"size": size, "dtype": dtype, "shape": SIZES[size]}
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return paths
    marker.unlink(missing_ok=True)
    tokenizer = train_tokenizer()
    torch_dtype = getattr(torch, dtype)

    def config(**extra):
        return LlamaConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **SIZES[size], **extra,
        )

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # initialise directly in the target dtype (half the memory)
    try:
        for name, path in paths.items():
            shutil.rmtree(path, ignore_errors=True)
            torch.manual_seed(len(name))
            if name == "policy":
                # A wider init than the default 0.02 gives a non-uniform next-token distribution.
                model = LlamaForCausalLM(config(initializer_range=0.05))
            else:
                model = LlamaForSequenceClassification(config(num_labels=1))
            model.eval().save_pretrained(path)
            tokenizer.save_pretrained(path)
            del model
    finally:
        torch.set_default_dtype(previous)
    marker.write_text(json.dumps(identity))
    return paths


def parameter_count(path: Path) -> int:
    """Parameters of a saved model, read off its safetensors headers."""
    total = 0
    for file in Path(path).glob("*.safetensors"):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def job_mapping(args: argparse.Namespace, models: dict[str, Path], out_dir: Path) -> dict:
    """The job both sides run (plain data for ``from_mapping(JobConfig, ...)``)."""
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i // len(PROMPTS)})")
               for i in range(args.prompts)]
    if args.gpu:
        gen_gpus, rm_gpus = args.stage_gpus
        # Stages sharing one GPU split its memory, each at most its fraction of the GPU (the config refuses
        # more); with a GPU per stage vLLM's default is kept.
        shared = gen_gpus < 1
        generation = {"num_gpus": gen_gpus, "num_cpus": 1, "batch_size": args.batch_size, "dtype": "bfloat16",
                      **({"gpu_memory_utilization": 0.45} if shared else {})}
        rm = {"num_gpus": rm_gpus, "num_cpus": 1, "dtype": "bfloat16", **({"gpu_memory_utilization": 0.2} if shared else {})}
        rm_b = {"num_gpus": rm_gpus, "num_cpus": 1, "dtype": "bfloat16", **({"gpu_memory_utilization": 0.2} if shared else {})}
    else:
        engine = {"enforce_eager": True}
        generation = {"num_cpus": 0.5, "batch_size": args.batch_size, "dtype": "float32", "engine_kwargs": engine}
        rm = {"num_cpus": 0.5, "dtype": "float32", "engine_kwargs": engine}
        rm_b = {"num_cpus": 0.5}
    rewards = [
        {"name": "rm", "kind": "vllm", "model": str(models["reward"]), "batch_size": args.score_batch, **rm},
        {"name": "rm_b", "kind": "transformers", "model": str(models["reward_b"]), "batch_size": args.score_batch,
         **rm_b},
    ]
    align = ["rm", "rm_b", "mean(rm,rm_b)"]
    if args.function_reward:
        rewards.append({"name": "length", "kind": "function",
                        "function": "limits_ray.reward_functions:response_length", "num_cpus": 0.25})
        align.append("length")
    return {
        "name": "bench-pipeline",
        "output_dir": str(out_dir),
        "ray_address": "local",
        "prompts": {"inline": prompts},
        "generation": {
            "model": str(models["policy"]), "samples_per_prompt": args.samples, "n": args.n,
            "max_tokens": args.max_tokens, "seed": 0, **generation,
        },
        "rewards": rewards,
        "analysis": {"betas": "0.003:30:29", "align": align},
        "store": {"enabled": True},
    }


# --------------------------------------------------------------------------------------------------
# The two sides (each in its own subprocess)


def _prepare(config) -> dict:
    """The request batch of every round, as ``run_job`` writes its todo rounds (prompt, rendered
    prompt, source text, round)."""
    import numpy as np
    from transformers import AutoTokenizer

    from limits_ray.pipeline.prompts import load_prompts, max_prompt_tokens

    tokenizer = AutoTokenizer.from_pretrained(config.generation.model)
    prompt_set = load_prompts(config.prompts, tokenizer, max_prompt_tokens(config, tokenizer))
    rounds = [(prompt, rnd) for prompt in prompt_set.prompts for rnd in range(config.generation.rounds)]
    return {
        "prompt_id": np.array([prompt.prompt_id for prompt, _ in rounds], dtype=object),
        "prompt": np.array([prompt.rendered for prompt, _ in rounds], dtype=object),
        "prompt_text": np.array([prompt.text for prompt, _ in rounds], dtype=object),
        "round": np.array([rnd for _, rnd in rounds], dtype=np.int64),
    }


def run_baseline(mapping: dict) -> dict:
    """Plain in-process work: one engine, one generate call, one scoring call per reward, the statistics."""
    times: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - mark
        mark = now

    import numpy as np

    from limits_ray.config import JobConfig, from_mapping
    from limits_ray.core.samples import PromptSamples
    from limits_ray.core.tables import reduce_prompts
    from limits_ray.outputs.figures import write_plots
    from limits_ray.pipeline.generation import Generator
    from limits_ray.pipeline.scoring import make_scorer_class
    from limits_ray.storage.results import write_result
    from limits_ray.storage.rounds import per_round, per_sample, round_lengths

    config = from_mapping(JobConfig, mapping)
    batch = _prepare(config)
    lap("import")
    import vllm  # noqa: F401  (counted as import, not as engine load)

    lap("import")
    generator = Generator(config.generation, add_special_tokens=not config.prompts.chat_template)
    lap("load_generate")
    batch = generator(batch)
    lap("generate")
    for reward in config.rewards:
        scorer = make_scorer_class(reward)(reward)
        lap(f"load_score_{reward.name}")
        batch = scorer(batch)
        lap(f"score_{reward.name}")
    names = [reward.name for reward in config.rewards]
    lengths = round_lengths(batch)
    prompt_ids = per_round(batch["prompt_id"], lengths)
    sample_idx = per_sample(batch["sample_idx"])
    rewards = {name: per_sample(batch[name]) for name in names}
    order = np.lexsort((sample_idx, prompt_ids))
    prompts = []
    for prompt_id in sorted(set(prompt_ids)):
        rows = order[prompt_ids[order] == prompt_id]
        prompts.append(PromptSamples(str(prompt_id), sample_idx[rows], {n: v[rows] for n, v in rewards.items()}))
    result = reduce_prompts(prompts, config.analysis.plan(names), config.analysis)
    output = Path(config.output_dir)
    write_result(result, output)
    lap("statistics")
    write_plots(result, output, title=config.name)
    lap("plots")
    return {"times": times, "samples": int(lengths.sum()), "frontier_rows": result.frontier.num_rows,
            "bon_rows": result.bon.num_rows}


def _actor_inits() -> tuple[list[float], float]:
    """Seconds each actor spent in its constructor (engine and model loads), and when the last one
    finished (epoch seconds), read off ``ray.timeline()``."""
    import ray

    seconds, last_end = [], 0.0
    try:
        events = ray.timeline()
    except Exception:  # noqa: BLE001 - informational only
        return seconds, last_end
    for event in events:
        if str(event.get("name", "")).endswith("__init__") and event.get("ph") == "X":
            seconds.append(float(event.get("dur", 0.0)) / 1e6)
            last_end = max(last_end, (float(event.get("ts", 0.0)) + float(event.get("dur", 0.0))) / 1e6)
    return sorted(seconds, reverse=True), last_end


def run_pipeline(mapping: dict) -> dict:
    """``run_job`` on a new local Ray instance, with its stages timed from outside."""
    times: dict[str, float] = {}
    mark = time.perf_counter()
    import ray

    from limits_ray.config import JobConfig, from_mapping
    from limits_ray.pipeline import stages as pipeline
    from limits_ray.runs.job import run_job

    config = from_mapping(JobConfig, mapping)
    times["import"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # The same call run_job makes (it skips its own when Ray is up), timed on its own.
    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    times["ray_init"] = time.perf_counter() - mark

    stages: dict[str, float] = {}
    original_stages, original_progress = pipeline.run_stages, pipeline.Progress

    def timed_stages(*args, **kwargs):  # run_stages(config, requests, total_rounds, context, quarantine, ...)
        started = time.perf_counter()
        stages["before_stages"] = started - job_started
        stages["started_epoch"] = time.time()
        stages["_started"] = started
        try:
            return original_stages(*args, **kwargs)
        finally:
            stages["stages"] = time.perf_counter() - started

    class TimedProgress(original_progress):
        def update(self, rounds, *args, **kwargs):
            if rounds and "first_round" not in stages:
                stages["first_round"] = time.perf_counter() - stages["_started"]
            return super().update(rounds, *args, **kwargs)

    pipeline.run_stages, pipeline.Progress = timed_stages, TimedProgress
    job_started = time.perf_counter()
    try:
        _, report = run_job(config)
    finally:
        pipeline.run_stages, pipeline.Progress = original_stages, original_progress
        stages.pop("_started", None)
    times["run_job"] = time.perf_counter() - job_started
    inits, last_init_end = _actor_inits()
    if last_init_end and "started_epoch" in stages:
        stages["actors_ready"] = last_init_end - stages["started_epoch"]
    mark = time.perf_counter()
    ray.shutdown()
    shutdown = time.perf_counter() - mark
    return {
        "times": times, "stages": stages, "stage_busy": report.stage_seconds, "actor_init": inits,
        "shutdown": shutdown, "samples": report.samples, "versions": report.versions,
    }


def side_main(args: argparse.Namespace) -> int:
    """Child process: run one side, write its measurements as JSON."""
    mapping = json.loads(Path(args.mapping).read_text())
    if not args.gpu:
        from limits_ray.config import EngineResources
        from limits_ray.pipeline.generation import set_cpu_env_defaults

        set_cpu_env_defaults(EngineResources())
    shutil.rmtree(mapping["output_dir"], ignore_errors=True)
    result = run_baseline(mapping) if args.side == "baseline" else run_pipeline(mapping)
    result["wall"] = time.perf_counter() - _STARTED
    result["interpreter"] = _STARTED - args.spawned if args.spawned else 0.0
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------------------------------
# The driver


class TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants, by polling ``/proc``.

    Ray's workers are grandchildren of the side's process (through the raylet) and are killed at
    shutdown, so ``getrusage(RUSAGE_CHILDREN)`` would miss them; a process's last half second before
    it exits is missed here. Under a loaded machine CPU seconds are steadier than wall time.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, float] = {}
        self.tick = os.sysconf("SC_CLK_TCK")

    def _stat(self, pid: int) -> tuple[int, float] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick  # ppid, utime + stime

    def sample(self) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = self._stat(int(entry))
                if stat is not None:
                    stats[int(entry)] = stat
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        for pid in tree:
            if pid in stats:
                self.seen[pid] = max(self.seen.get(pid, 0.0), stats[pid][1])

    def total(self) -> float:
        return sum(self.seen.values())


def spawn(side: str, args: argparse.Namespace, mapping_path: Path, work: Path, index: int) -> dict:
    """Run one side in a fresh interpreter; returns its measurements plus the process's wall time."""
    result_path = work / f"{side}-{index}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--mapping", str(mapping_path),
               "--result", str(result_path), "--spawned", repr(time.perf_counter())]
    if args.gpu:
        command.append("--gpu")
    log = work / f"{side}-{index}.log"
    env = dict(os.environ)
    if not args.gpu:
        # One OpenMP/BLAS thread per process on both sides, as Ray gives its actors (num_cpus < 2):
        # on a shared 2-core box a 2-thread torch in the baseline spends most of its time in
        # OpenMP barriers whenever other processes hold a core (measured: 25 s vs 0.2 s to score
        # 128 samples with the tiny transformers reward model at load ~25).
        env.update({name: str(args.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    load_before = wait_for_quiet(args.quiet_load, args.quiet_wait)
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        cpu = TreeCpu(process.pid)
        while process.poll() is None:
            cpu.sample()
            time.sleep(0.5)
        code = process.returncode
    process_wall = time.perf_counter() - started
    if code != 0:
        sys.stdout.write(log.read_text()[-6000:])
        raise SystemExit(f"{side} side failed (exit {code}); log: {log}")
    result = json.loads(result_path.read_text())
    result["process_wall"] = process_wall
    result["cpu_seconds"] = cpu.total()
    result["load"] = [load_before, os.getloadavg()[0]]
    print(f"  {side:<8} run {index}: {result['wall']:7.1f} s in-process, {process_wall:7.1f} s with interpreter "
          f"start and exit (load {load_before:.2f} -> {os.getloadavg()[0]:.2f})", flush=True)
    return result


def wait_for_quiet(load: float, timeout: float) -> float:
    """Wait until the 1-minute load average is below ``load`` (at most ``timeout`` seconds); returns it."""
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] >= load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def fixed_costs(side: str, result: dict) -> float:
    """Seconds of one run that do not grow with the workload: imports, Ray start and stop, engine/model loads."""
    times = result["times"]
    if side == "baseline":
        return sum(v for k, v in times.items() if k == "import" or k.startswith("load_"))
    # Pipeline: everything before the dataset ran, plus the dataset's time until its last actor had
    # finished its constructor (worker start, imports, engine and model loads; no round is generated
    # before the generation actor is up). Fallback: the longest constructor.
    before = times["import"] + times["ray_init"] + result["stages"].get("before_stages", 0.0)
    ready = result["stages"].get("actors_ready")
    return before + (ready if ready is not None else max(result.get("actor_init") or [0.0])) + result.get("shutdown", 0.0)


def machine() -> dict[str, str]:
    info = {
        "date": f"{utc_now()} UTC",
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "load": load_average(),
        "memory": "",
        "gpu": "",
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return info


def summarize(runs: list[tuple[str, dict]]) -> dict:
    """Per-pair ratios and the medians the doc reports."""
    baselines = [r for s, r in runs if s == "baseline"]
    pipelines = [r for s, r in runs if s == "pipeline"]
    pairs = []
    for b, p in zip(baselines, pipelines):
        b_fixed, p_fixed = fixed_costs("baseline", b), fixed_costs("pipeline", p)
        pairs.append({
            "baseline": b["wall"], "pipeline": p["wall"], "ratio": p["wall"] / b["wall"],
            "baseline_steady": b["wall"] - b_fixed, "pipeline_steady": p["wall"] - p_fixed,
            "steady_ratio": (p["wall"] - p_fixed) / (b["wall"] - b_fixed),
            "baseline_fixed": b_fixed, "pipeline_fixed": p_fixed,
            "baseline_process": b["process_wall"], "pipeline_process": p["process_wall"],
            "baseline_cpu": b["cpu_seconds"], "pipeline_cpu": p["cpu_seconds"],
            "cpu_ratio": p["cpu_seconds"] / b["cpu_seconds"],
        })
    return {"pairs": pairs}


def _fmt_times(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in times.items())


def render(args, info: dict, runs: list[tuple[str, dict]], summary: dict, params: str, versions: dict) -> str:
    pairs = summary["pairs"]
    mode = "GPU" if args.gpu else "CPU"
    lines = [
        SECTION, "",
        "Generated by `bench/bench_pipeline.py`; rerun it to replace this section.", "",
        f"- Date: {info['date']}",
        f"- Machine: {info['cpu']}, {info['memory']} RAM" + (f"; GPU: {info['gpu']}" if info["gpu"] else ""),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Load average at the end of the run (1/5/15 min): {info['load']}; each side waited (at most "
        f"{args.quiet_wait:.0f} s) for a 1-min load below {args.quiet_load:g}; 1-min load when each side started: "
        + ", ".join(f"{s} {r['load'][0]:.2f}" for s, r in runs)
        + ("" if all(r["load"][0] < args.quiet_load for _, r in runs) else " (**not all below the threshold**)"),
        f"- Models: {params}",
        f"- Workload: {args.prompts} prompts x {args.samples} samples (rounds of n = {args.n}), max_tokens "
        f"{args.max_tokens}; rewards: " + ", ".join(
            ["rm (vLLM pooling)", "rm_b (transformers)"] + (["length (function)"] if args.function_reward else []))
        + f"; statistics on 29 betas; {mode}",
        (f"- OMP/BLAS threads per process (both sides, Ray actors included): {args.threads}\n" if not args.gpu else "")
        + f"- Sides run in fresh interpreters, interleaved: {' -> '.join(s for s, _ in runs)}",
        "",
        ("| pair | baseline wall (s) | pipeline wall (s) | ratio | overhead | baseline w/o fixed (s) "
         "| pipeline w/o fixed (s) | ratio w/o fixed | baseline CPU (s) | pipeline CPU (s) | CPU ratio |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, p in enumerate(pairs, 1):
        lines.append(
            f"| {i} | {p['baseline']:.1f} | {p['pipeline']:.1f} | {p['ratio']:.2f} | {100 * (p['ratio'] - 1):+.0f}% "
            f"| {p['baseline_steady']:.1f} | {p['pipeline_steady']:.1f} | {p['steady_ratio']:.2f} "
            f"| {p['baseline_cpu']:.0f} | {p['pipeline_cpu']:.0f} | {p['cpu_ratio']:.2f} |"
        )
    lines += ["", "Breakdown (seconds):", ""]
    for i, (side, r) in enumerate(runs):
        if side == "baseline":
            lines.append(f"- baseline: {_fmt_times(r['times'])}; process with interpreter start/exit "
                         f"{r['process_wall']:.1f}")
        else:
            lines.append(
                f"- pipeline: {_fmt_times(r['times'])}; run_job before the stages {r['stages'].get('before_stages', 0):.1f}, "
                f"dataset execution {r['stages'].get('stages', 0):.1f} (first round merged after "
                f"{r['stages'].get('first_round', float('nan')):.1f}, every actor constructed after "
                f"{r['stages'].get('actors_ready', float('nan')):.1f}), after the stages "
                f"{r['times']['run_job'] - r['stages'].get('before_stages', 0) - r['stages'].get('stages', 0):.1f}; "
                f"actor constructors {', '.join(f'{v:.1f}' for v in r['actor_init']) or 'n/a'}; stage busy "
                f"{_fmt_times(r['stage_busy'])}; ray.shutdown {r['shutdown']:.1f}; process with interpreter "
                f"start/exit {r['process_wall']:.1f}"
            )
    lines.append("")
    lines.append(READING_PLACEHOLDER)
    lines.append("")
    return "\n".join(lines)


READING_PLACEHOLDER = "<!-- reading -->"


def reading(args, summary: dict) -> str:
    """An automatic reading of the numbers (the hand-written part of the doc goes below it)."""
    pairs = summary["pairs"]
    ratio = sorted(p["ratio"] for p in pairs)[len(pairs) // 2]
    steady = sorted(p["steady_ratio"] for p in pairs)[len(pairs) // 2]
    verdict = "meets" if steady <= 1 + TARGET_OVERHEAD else "misses"
    return (
        f"Median ratio pipeline / baseline without fixed start-up and tear-down costs (imports, `ray.init` and "
        f"`ray.shutdown`, engine and model loads): {steady:.2f} ({100 * (steady - 1):+.0f}%), which {verdict} the target of at most "
        f"+{100 * TARGET_OVERHEAD:.0f}%; end to end, start-up included: {ratio:.2f} ({100 * (ratio - 1):+.0f}%)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="the models' directory (default: build them under --work)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--gpu", action="store_true", help="real-size random-weight models on the GPU")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="--gpu model shape")
    parser.add_argument("--build-only", action="store_true", help="build the models and the config, then stop")
    parser.add_argument("--prompts", type=int, help="prompts (CPU default 16, GPU 64)")
    parser.add_argument("--samples", type=int, help="samples per prompt (CPU default 1024, GPU 1024)")
    parser.add_argument("--n", type=int, help="samples per request (CPU default 64, GPU 128)")
    parser.add_argument("--max-tokens", type=int, help="CPU default 32, GPU 256")
    parser.add_argument("--batch-size", type=int, help="rounds per generation call (CPU default 8, GPU 16)")
    parser.add_argument("--score-batch", type=int, help="samples per scoring call (CPU default 512, GPU 2048)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: OMP/BLAS threads per process, both sides")
    parser.add_argument("--function-reward", action="store_true", help="add a Python-function reward stage")
    parser.add_argument("--repeats", type=int, default=3, help="baseline/pipeline pairs, interleaved")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--quiet-load", type=float, default=1.0, help="wait before each side until the 1-min load is below this")
    parser.add_argument("--quiet-wait", type=float, default=900.0, help="longest wait for that (seconds)")
    parser.add_argument("--side", choices=["baseline", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--mapping", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return side_main(args)

    if not args.gpu and not args.build_only:
        try:
            import torch

            args.gpu = bool(torch.cuda.is_available())
        except ImportError:
            pass
    defaults = ({"prompts": 64, "samples": 1024, "n": 128, "max_tokens": 256, "batch_size": 16, "score_batch": 2048}
                if args.gpu else
                {"prompts": 16, "samples": 1024, "n": 64, "max_tokens": 32, "batch_size": 8, "score_batch": 512})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)

    if args.gpu:
        visible = 0
        try:
            import torch

            visible = torch.cuda.device_count()
        except ImportError:
            pass
        # A GPU per stage when there are enough; otherwise the three engine stages share one.
        args.stage_gpus = (1, 1) if visible >= 3 else (0.5, 0.25)
        began = time.perf_counter()
        models = build_real_size_models(args.models or work / f"models-{args.size}", args.size)
        params = (f"Llama '{args.size}' shape {SIZES[args.size]}, random weights, bfloat16: policy "
                  f"{parameter_count(models['policy']) / 1e6:,.0f} M parameters, reward models "
                  f"{parameter_count(models['reward']) / 1e6:,.0f} M each; GPUs per stage (generation, rewards) "
                  f"{args.stage_gpus}")
        print(f"built {params} in {time.perf_counter() - began:.1f} s under {models['policy'].parent}")
    else:
        from limits_ray.tiny_models import build_tiny_models

        tiny = build_tiny_models(args.models or work / "tiny-models", seed=0)
        models = {"policy": tiny.policy, "reward": tiny.reward, "reward_b": tiny.reward_b}
        params = (f"the tiny models (Llama, 2 layers, hidden 128, vocabulary 768; "
                  f"{parameter_count(tiny.policy) / 1e6:.2f} M parameters), float32, eager")

    from limits_ray.config import JobConfig, from_mapping

    mapping = job_mapping(args, models, work / "out")
    from_mapping(JobConfig, mapping)  # validate before anything runs
    mapping_path = work / "job.json"
    mapping_path.write_text(json.dumps(mapping, indent=2))
    if args.build_only:
        print(f"models and job config ready: {mapping_path}")
        return 0

    began = time.perf_counter()
    runs: list[tuple[str, dict]] = []
    for index in range(args.repeats):
        order = ("baseline", "pipeline") if index % 2 == 0 else ("pipeline", "baseline")
        for side in order:
            runs.append((side, spawn(side, args, mapping_path, work, index)))
    summary = summarize(runs)
    info = machine()
    versions = next(r["versions"] for s, r in runs if s == "pipeline")
    section = render(args, info, runs, summary, params, versions)
    text = reading(args, summary)
    print(section.replace(READING_PLACEHOLDER, text))
    print(f"(benchmark took {time.perf_counter() - began:.1f} s; work directory {work})")
    (work / "summary.json").write_text(json.dumps({"runs": runs, "summary": summary, "info": info}, indent=2,
                                                  default=str))
    if not args.no_docs:
        update_docs(SECTION, section.replace(READING_PLACEHOLDER, text))
        print(f"updated {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
