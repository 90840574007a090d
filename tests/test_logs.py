"""Log routing: Ray Data's and vLLM's INFO to <output_dir>/logs, warnings to the console.

Run in a fresh interpreter (routing changes process-wide logging and environment); no Ray starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, logging, sys
from limits_ray.pipeline.logs import ray_init_kwargs, route_logs
log_dir = route_logs(sys.argv[1], verbose=sys.argv[2] == "verbose")
import ray.data
for name in ("ray.data", "vllm.engine"):
    logging.getLogger(name).info("%s info line", name)
    logging.getLogger(name).warning("%s warning line", name)
kwargs = ray_init_kwargs()
print(json.dumps({"log_dir": str(log_dir), "kwargs": kwargs,
                  "progress_bars": ray.data.DataContext.get_current().enable_progress_bars}))
"""


def _route(tmp_path: Path, mode: str) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RAY_DATA_LOGGING_CONFIG", "LIMITS_RAY_LOG_DIR", "VLLM_CONFIGURE_LOGGING"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), mode], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_info_goes_to_the_run_directory_and_warnings_to_the_console(tmp_path):
    result, stderr = _route(tmp_path, "quiet")
    log_dir = tmp_path / "run" / "logs"
    assert result["log_dir"] == str(log_dir.resolve())
    ray_data, vllm = (log_dir / "ray-data.log").read_text(), (log_dir / "vllm.log").read_text()
    assert "ray.data info line" in ray_data and "ray.data warning line" in ray_data
    assert "vllm.engine info line" in vllm and "vllm.engine warning line" in vllm
    assert "info line" not in stderr
    assert "ray.data warning line" in stderr and "vllm.engine warning line" in stderr
    assert result["progress_bars"] is False
    assert result["kwargs"]["logging_level"] == 30
    runtime_env = result["kwargs"]["runtime_env"]
    assert runtime_env["worker_process_setup_hook"] == "limits_ray.pipeline.logs.setup_worker_logging"
    assert runtime_env["env_vars"]["LIMITS_RAY_LOG_DIR"] == str(log_dir.resolve())
    assert runtime_env["env_vars"]["VLLM_CONFIGURE_LOGGING"] == "0"


def test_verbose_leaves_everything_on_the_console(tmp_path):
    result, stderr = _route(tmp_path, "verbose")
    assert result["log_dir"] == "None" and result["kwargs"] == {} and result["progress_bars"] is True
    assert not (tmp_path / "run" / "logs").exists()
    assert "ray.data info line" in stderr
