"""bench/gpu_smoke.py runs where there is no GPU (here), and without vLLM and Ray: every GPU check is skipped
with its reason, nothing fails. (On a GPU it has not been run yet: README, "Unproven".)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"
CHECKS = ["classify-oom", "classify-device-assert", "long-input-is-a-round-fault", "reward-precision (transformers)",
          "reward-precision (vLLM)", "memory-freed-after-engine-fault", "end-to-end"]


@pytest.mark.parametrize("hidden", [(), ("vllm", "ray")], ids=["as-installed", "without-vllm-and-ray"])
def test_the_gpu_smoke_test_skips_every_gpu_check_on_a_cpu_machine_saying_why(hidden):
    blocked = "".join(f"sys.modules[{name!r}] = None; " for name in hidden)  # import then raises ImportError
    runner = f"import runpy, sys; {blocked}sys.argv = [{str(SCRIPT)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu-smoke: torch yes, GPU none, ")
    assert (", vLLM no, Ray no" in lines[0]) == bool(hidden)
    for check in CHECKS:
        assert f"SKIP  {check}: no CUDA device (torch.cuda.is_available() is False)" in lines
    assert lines[-1].startswith("gpu-smoke: 0 passed, 0 failed, 7 skipped")
