"""GPU smoke test: the checks CPU tests cannot make, in one script (meant to take under 10 minutes on one GPU).

    python bench/gpu_smoke.py                 # a GPU machine: PyTorch with CUDA; vLLM and Ray optional
    .venv/bin/python bench/gpu_smoke.py       # this CPU machine: every GPU check is skipped, saying so

Each check prints one line, ``PASS``, ``FAIL`` or ``SKIP`` with its numbers or the reason; the exit
status is 1 when any check failed, else 0 (skips included). Checks:

1. ``classify-oom``: allocating twice the GPU's memory raises torch's out-of-memory error, which
   :func:`limits_ray.pipeline.faults.is_engine_fault` takes for an engine fault (the actor is replaced; nothing is
   quarantined).
2. ``classify-device-assert``: an out-of-range index on the GPU (what an over-long input does to a
   model's position lookup) is a device-side assert, an engine fault; run in a subprocess, since it
   leaves the CUDA context unusable.
3. ``long-input-is-a-round-fault``: the transformers scorer on the GPU refuses an input longer than its
   model's context with a ``ValueError`` (a round fault) before the device sees it, and scores the next
   batch normally.
4. ``reward-precision``: the tiny reward model's scores in bfloat16 and float16 against float32
   (transformers; and vLLM's pooling runner when vLLM is installed): all finite, largest difference
   within ``PRECISION_TOLERANCE`` of the float32 scores' standard deviation.
5. ``memory-freed-after-engine-fault``: a child process (standing for an actor) starts an engine with
   its core in a process of its own (vLLM, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``; without vLLM, a torch
   process holding 2 GiB), then ends through :func:`limits_ray.pipeline.faults.fail_actor`; as soon as the child
   has exited, no process of its tree is left, and the GPU's free memory is back to within
   ``MEMORY_SLACK`` of what it was before it started within ``FREED_WITHIN_S`` (the time is printed).
6. ``end-to-end``: ``bench/bench_pipeline.py --gpu --size small`` (one pair, small workload): the tiny
   job on the GPU through Ray Data and vLLM, against plain vLLM (needs vLLM and Ray).

Not run on a GPU yet (the machine this was written on has none): README's "Unproven" list says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISION_TOLERANCE = {"bfloat16": 0.1, "float16": 0.05}  # max |score - fp32 score| / std(fp32 scores)
MEMORY_SLACK = 256 * 2**20
FREED_WITHIN_S = 5.0  # the device's memory is free this soon after the faulted actor's exit is seen
HOLD_BYTES = 2 * 2**30
MIB = 2**20
TEXTS = [" quietly past the old mill.", " The sea is wide and blue, and the wind", "", " one, two, three",
         " and then the children were sent to clear the leaves", " A good answer is short, honest and kind."]
PROMPTS = ["The river ran", "Please write a short poem about the sea.", "Why?", "Numbers help us reason",
           "In autumn", "Explain kindly"]

results: list[tuple[str, str, str]] = []


def report(name: str, status: str, detail: str) -> None:
    results.append((name, status, detail))
    print(f"{status:<4}  {name}: {detail}", flush=True)


def installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def environment() -> dict:
    info = {"torch": installed("torch"), "vllm": installed("vllm"), "ray": installed("ray"), "gpu": False}
    if info["torch"]:
        import torch

        info["gpu"] = bool(torch.cuda.is_available())
        if info["gpu"]:
            info["device"] = torch.cuda.get_device_name(0)
    return info


def check_oom() -> None:
    import torch

    from limits_ray.pipeline.faults import EngineFault, engine_call, is_engine_fault

    _, total = torch.cuda.mem_get_info()
    try:
        with engine_call("reward model forward pass"):
            torch.empty(2 * total, dtype=torch.uint8, device="cuda")
    except EngineFault as fault:
        inner = fault.__cause__
        ok = is_engine_fault(fault) and type(inner).__name__ == "OutOfMemoryError"
        report("classify-oom", "PASS" if ok else "FAIL", f"{type(inner).__name__} -> engine fault: {is_engine_fault(fault)}")
    except Exception as error:  # noqa: BLE001
        report("classify-oom", "FAIL", f"not an engine fault: {type(error).__name__}: {error}")
    else:
        report("classify-oom", "FAIL", f"allocating {2 * total / 2**30:.0f} GiB did not fail")
    torch.cuda.empty_cache()


DEVICE_ASSERT = """
import json, torch
from limits_ray.pipeline.faults import engine_call, is_engine_fault, is_request_error
weights = torch.zeros(8, 4, device="cuda")
try:
    with engine_call("reward model forward pass"):
        torch.nn.functional.embedding(torch.tensor([100], device="cuda"), weights).cpu()
    print(json.dumps({"raised": None}))
except Exception as error:
    inner = error.__cause__ or error
    print(json.dumps({"raised": type(error).__name__, "inner": type(inner).__name__, "message": str(inner)[:300],
                      "engine_fault": is_engine_fault(error), "request_error": is_request_error(inner)}))
"""


def check_device_assert() -> None:
    done = subprocess.run([sys.executable, "-c", DEVICE_ASSERT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    try:
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report("classify-device-assert", "FAIL", f"the probe printed nothing (exit {done.returncode}): {done.stderr[-500:]}")
        return
    ok = outcome["raised"] == "EngineFault" and outcome["engine_fault"] and not outcome["request_error"]
    report("classify-device-assert", "PASS" if ok else "FAIL", json.dumps(outcome))


def check_long_input(models) -> None:
    import numpy as np

    from limits_ray.config import RewardModelConfig
    from limits_ray.pipeline.scoring import TransformersRewardScorer

    scorer = TransformersRewardScorer(RewardModelConfig(name="rm", kind="transformers", model=str(models.reward), num_gpus=1))
    long = " the river" * (scorer.context + 10)
    try:
        scorer(_batch(["The river ran"], [long]))
    except ValueError as error:
        after = scorer(_batch(PROMPTS, TEXTS))["rm"]
        ok = "longer than the" in str(error) and np.isfinite(after).all()
        report("long-input-is-a-round-fault", "PASS" if ok else "FAIL",
               f"ValueError before the device ({str(error)[:80]}...); the next batch scored {after.size} finite rewards")
    except Exception as error:  # noqa: BLE001
        report("long-input-is-a-round-fault", "FAIL", f"{type(error).__name__}: {str(error)[:200]}")
    else:
        report("long-input-is-a-round-fault", "FAIL", "an input longer than the context was scored")


def _batch(prompts: list[str], responses: list[str]) -> dict:
    import numpy as np

    return {
        "prompt_id": np.array([f"id{i}" for i in range(len(prompts))], dtype=object),
        "sample_idx": np.arange(len(prompts), dtype=np.int64),
        "prompt": np.array(prompts, dtype=object), "prompt_text": np.array(prompts, dtype=object),
        "response": np.array(responses, dtype=object),
    }


def _compare(name: str, scores: dict[str, "object"]) -> None:
    import numpy as np

    reference = np.asarray(scores["float32"])
    spread = float(np.std(reference)) or 1.0
    parts, ok = [], bool(np.isfinite(reference).all())
    for dtype, tolerance in PRECISION_TOLERANCE.items():
        values = np.asarray(scores[dtype])
        finite = bool(np.isfinite(values).all())
        worst = float(np.max(np.abs(values - reference))) / spread if finite else float("inf")
        ok &= finite and worst <= tolerance
        parts.append(f"{dtype}: max |diff| {worst:.4f} x std(fp32) (tolerance {tolerance})")
    report(name, "PASS" if ok else "FAIL", "; ".join(parts))


def check_precision_transformers(models) -> None:
    import torch

    from limits_ray.config import RewardModelConfig
    from limits_ray.pipeline.scoring import TransformersRewardScorer

    scores = {}
    for dtype in ("float32", *PRECISION_TOLERANCE):
        config = RewardModelConfig(name="rm", kind="transformers", model=str(models.reward), num_gpus=1, dtype=dtype)
        scorer = TransformersRewardScorer(config)
        scores[dtype] = scorer(_batch(PROMPTS, TEXTS))["rm"]
        del scorer
        torch.cuda.empty_cache()
    _compare("reward-precision (transformers)", scores)


VLLM_SCORES = """
import json, sys
import numpy as np
from limits_ray.config import RewardModelConfig
from limits_ray.pipeline.scoring import VllmRewardScorer

if __name__ == "__main__":  # vLLM may start its engine core with spawn
    prompts, texts = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    config = RewardModelConfig(name="rm", kind="vllm", model=sys.argv[1], num_gpus=1, dtype=sys.argv[2],
                               gpu_memory_utilization=0.3, engine_kwargs={"enforce_eager": True})
    scorer = VllmRewardScorer(config)
    batch = {"prompt_id": np.array([f"id{i}" for i in range(len(prompts))], dtype=object),
             "sample_idx": np.arange(len(prompts)), "prompt": np.array(prompts, dtype=object),
             "prompt_text": np.array(prompts, dtype=object), "response": np.array(texts, dtype=object)}
    print("SCORES " + json.dumps(scorer(batch)["rm"].tolist()), flush=True)
    scorer.llm.llm_engine.engine_core.shutdown()
"""


def check_precision_vllm(models) -> None:
    scores = {}
    script = models.root / "vllm_scores.py"  # spawn re-imports the main module: run it from a file
    script.write_text(VLLM_SCORES)
    for dtype in ("float32", *PRECISION_TOLERANCE):
        done = subprocess.run([sys.executable, str(script), str(models.reward), dtype, json.dumps(PROMPTS),
                               json.dumps(TEXTS)], capture_output=True, text=True, timeout=300, env=_env())
        lines = [line for line in done.stdout.splitlines() if line.startswith("SCORES ")]
        if not lines:
            report("reward-precision (vLLM)", "FAIL", f"{dtype}: no scores (exit {done.returncode}): {done.stderr[-800:]}")
            return
        scores[dtype] = json.loads(lines[-1].removeprefix("SCORES "))
    _compare("reward-precision (vLLM)", scores)


ACTOR_VLLM = """
import sys
import numpy as np
import psutil
from limits_ray.config import GenerationConfig
from limits_ray.pipeline.faults import fail_actor
from limits_ray.pipeline.generation import Generator

if __name__ == "__main__":  # vLLM may start its engine core with spawn
    config = GenerationConfig(model=sys.argv[1], samples_per_prompt=4, n=4, max_tokens=8, num_gpus=1,
                              gpu_memory_utilization=0.3, engine_kwargs={"enforce_eager": True})
    generator = Generator(config)
    generator({"prompt_id": np.array(["p"], dtype=object), "prompt": np.array(["The river ran"], dtype=object),
               "prompt_text": np.array(["The river ran"], dtype=object), "round": np.array([0])})
    print("READY " + " ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
    fail_actor("generate", "smoke test: an engine fault")
"""

ACTOR_TORCH = """
import multiprocessing, sys, time

def hold(ready):
    import torch
    block = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
    block.fill_(1)
    torch.cuda.synchronize()
    ready.put(1)
    time.sleep(600)

if __name__ == "__main__":
    from limits_ray.pipeline.faults import fail_actor
    import psutil
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    core = context.Process(target=hold, args=(ready,), name="EngineCore")
    core.start()
    ready.get(timeout=300)
    print("READY " + " ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
    fail_actor("generate", "smoke test: an engine fault")
"""


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def check_memory_freed(models, with_vllm: bool) -> None:
    import psutil
    import torch

    from limits_ray.pipeline.faults import ENGINE_FAULT_EXIT_CODE

    torch.cuda.init()
    before, total = torch.cuda.mem_get_info()
    if with_vllm:
        source, argument = ACTOR_VLLM, str(models.policy)
        what = "a vLLM engine, its core in a child process"
    else:
        source, argument = ACTOR_TORCH, str(HOLD_BYTES)
        what = f"a child process holding {HOLD_BYTES / 2**30:.0f} GiB (vLLM not installed)"
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / "actor.py"  # spawn re-imports the main module: run the actor from a file
        script.write_text(source)
        log = Path(scratch) / "actor.log"  # a file, not a pipe: vLLM's logging could fill a pipe and block it
        with open(log, "w") as output:
            actor = subprocess.Popen([sys.executable, str(script), argument], stdout=output, stderr=subprocess.STDOUT,
                                     text=True, env=_env(VLLM_ENABLE_V1_MULTIPROCESSING="1"))
        started = time.monotonic()
        ready: list[str] = []
        while actor.poll() is None and not ready and time.monotonic() - started < 300:
            ready = [line for line in log.read_text().splitlines() if line.startswith("READY")]
            time.sleep(0.01)
        during = torch.cuda.mem_get_info()[0]
        pids = [int(pid) for pid in ready[0].split()[1:]] if ready else []
        code = actor.wait(timeout=300)
        exited = time.monotonic()
        left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        after = torch.cuda.mem_get_info()[0]
        while after < before - MEMORY_SLACK and time.monotonic() - exited < 30:
            time.sleep(0.1)
            after = torch.cuda.mem_get_info()[0]
        freed_after = time.monotonic() - exited
        stderr = log.read_text()
    if code != ENGINE_FAULT_EXIT_CODE or not pids:
        report("memory-freed-after-engine-fault", "FAIL", f"{what}: the actor exited with {code}: {stderr[-800:]}")
        return
    held = (before - during) / MIB
    ok = not left and held > MEMORY_SLACK / MIB and after >= before - MEMORY_SLACK and freed_after < FREED_WITHIN_S
    report("memory-freed-after-engine-fault", "PASS" if ok else "FAIL",
           f"{what}: held {held:.0f} MiB; processes left after the actor's exit: {left}; free memory "
           f"{after / MIB:.0f} MiB of {total / MIB:.0f} (before: {before / MIB:.0f}) {freed_after:.2f} s after the "
           f"exit; actor ran {exited - started:.0f} s")


def check_end_to_end(work: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--gpu", "--size", "small", "--repeats", "1",
               "--no-docs", "--prompts", "8", "--samples", "256", "--n", "64", "--max-tokens", "64",
               "--quiet-load", "1000", "--work", str(work / "bench_pipeline")]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=_env())
    except subprocess.TimeoutExpired:
        report("end-to-end", "FAIL", "bench_pipeline.py --gpu did not finish in 420 s")
        return
    took = time.monotonic() - started
    tail = " | ".join(line for line in done.stdout.splitlines()[-3:] if line.strip())
    report("end-to-end", "PASS" if done.returncode == 0 else "FAIL",
           f"bench_pipeline.py --gpu --size small: exit {done.returncode} after {took:.0f} s: "
           f"{tail if done.returncode == 0 else (done.stdout + done.stderr)[-1500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-end-to-end", action="store_true", help="leave out bench_pipeline.py --gpu")
    args = parser.parse_args(argv)
    began = time.monotonic()
    info = environment()
    print(f"gpu-smoke: torch {'yes' if info['torch'] else 'no'}, GPU {info.get('device', 'none')}, "
          f"vLLM {'yes' if info['vllm'] else 'no'}, Ray {'yes' if info['ray'] else 'no'}", flush=True)
    names = ["classify-oom", "classify-device-assert", "long-input-is-a-round-fault", "reward-precision (transformers)",
             "reward-precision (vLLM)", "memory-freed-after-engine-fault", "end-to-end"]
    if not info["gpu"]:
        reason = "no PyTorch" if not info["torch"] else "no CUDA device (torch.cuda.is_available() is False)"
        for name in names:
            report(name, "SKIP", reason)
        return _summary(began)
    from limits_ray.tiny_models import build_tiny_models

    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as scratch:
        work = Path(scratch)
        models = build_tiny_models(work / "tiny", seed=0)
        checks: list[tuple[str, Callable[[], None], str]] = [
            ("classify-oom", check_oom, ""),
            ("classify-device-assert", check_device_assert, ""),
            ("long-input-is-a-round-fault", lambda: check_long_input(models), ""),
            ("reward-precision (transformers)", lambda: check_precision_transformers(models), ""),
            ("reward-precision (vLLM)", lambda: check_precision_vllm(models), "" if info["vllm"] else "vLLM is not installed"),
            ("memory-freed-after-engine-fault", lambda: check_memory_freed(models, info["vllm"]), ""),
            ("end-to-end", lambda: check_end_to_end(work),
             "--skip-end-to-end" if args.skip_end_to_end else
             "" if info["vllm"] and info["ray"] else "needs vLLM and Ray (" +
             ", ".join(name for name in ("vllm", "ray") if not info[name]) + " not installed)"),
        ]
        for name, check, skip in checks:
            if skip:
                report(name, "SKIP", skip)
                continue
            try:
                check()
            except Exception as error:  # noqa: BLE001 - one broken check must not hide the others
                report(name, "FAIL", f"{type(error).__name__}: {textwrap.shorten(str(error), 600)}")
    return _summary(began)


def _summary(began: float) -> int:
    counts = {status: sum(1 for _, s, _ in results if s == status) for status in ("PASS", "FAIL", "SKIP")}
    print(f"gpu-smoke: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.monotonic() - began:.0f} s", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
