"""Where Ray Data's and vLLM's own output goes: a log file in the run directory, not the console.

Unless ``--verbose``, :func:`route_logs` (called by the CLI before Ray starts) sends

- Ray Data's INFO output on the driver (execution plans, per-operator progress dumps every 10 s
  when stdout is not a terminal) to ``<output_dir>/logs/ray-data.log`` (Ray Data's
  ``RAY_DATA_LOGGING_CONFIG``) and turns Ray Data's progress bars off (the job prints its own,
  :mod:`limits_ray.pipeline.progress`);
- vLLM's INFO output (engine arguments, model loading), on the driver and in every actor, to
  ``<output_dir>/logs/vllm.log``: vLLM's own logging set-up is off (``VLLM_CONFIGURE_LOGGING=0``)
  and :func:`setup_worker_logging`, Ray's ``worker_process_setup_hook``, gives the ``vllm`` logger a
  file handler and a WARNING console handler; tqdm progress bars (weight loading) are off
  (``TQDM_DISABLE``) in actors and on the driver;
- Ray core's INFO lines on the driver (``Started a local Ray instance``) nowhere (``logging_level``).

Warnings and errors of all of them still reach the console. On a multi-node cluster the actors
write ``vllm.log`` under ``output_dir`` on their own node (where it is not a shared filesystem,
the file of the node of the driver has the driver's lines only). Ray Data's pickled-column warning
(``Failed to convert column ... falling back to serialize as pickled python objects``) is silenced
by allowing that fallback explicitly: rounds carry ragged per-sample arrays, which Arrow cannot
hold natively.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["LOG_DIR_ENV", "ray_init_kwargs", "route_logs", "setup_worker_logging"]

LOG_DIR_ENV = "LIMITS_RAY_LOG_DIR"
WORKER_ENV = {"VLLM_CONFIGURE_LOGGING": "0", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
FORMAT = "%(asctime)s %(levelname)s pid=%(process)d %(name)s: %(message)s"

_ray_init_kwargs: dict[str, Any] = {}


def setup_worker_logging() -> None:
    """The ``vllm`` logger: INFO and up to ``$LIMITS_RAY_LOG_DIR/vllm.log``, WARNING and up to stderr.

    Runs in every Ray worker (``worker_process_setup_hook``) and on the driver, before vLLM is
    imported; without ``LIMITS_RAY_LOG_DIR`` (or where it cannot be created) INFO is dropped.
    """
    logger = logging.getLogger("vllm")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(console)
    directory = os.environ.get(LOG_DIR_ENV)
    if directory:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(Path(directory) / "vllm.log")
        except OSError:
            return
        file.setLevel(logging.INFO)
        file.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(file)


def _ray_data_config(log_dir: Path) -> dict[str, Any]:
    """Ray Data's default logging config with the session file moved to ``log_dir`` and a WARNING console."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": FORMAT}},
        "filters": {"console_filter": {"()": "ray.data._internal.logging.HiddenRecordFilter"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "formatter": "ray", "filename": str(log_dir / "ray-data.log")},
            "console": {"class": "ray._private.log.PlainRayHandler", "formatter": "ray", "level": "WARNING",
                        "filters": ["console_filter"]},
        },
        "loggers": {"ray.data": {"level": "INFO", "handlers": ["file", "console"], "propagate": False}},
    }


def route_logs(output_dir: str | Path, verbose: bool = False) -> Path | None:
    """Send Ray Data's and vLLM's INFO output to ``<output_dir>/logs`` (see the module doc); returns that
    directory, or ``None`` with ``verbose`` (everything stays on the console)."""
    import yaml

    _ray_init_kwargs.clear()
    if verbose:
        return None
    log_dir = Path(output_dir).resolve() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "ray-data-logging.yaml"
    config_path.write_text(yaml.safe_dump(_ray_data_config(log_dir)))
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(config_path)
    os.environ[LOG_DIR_ENV] = str(log_dir)
    os.environ.update(WORKER_ENV)
    setup_worker_logging()

    import ray.data
    from ray.data._internal.logging import configure_logging
    from ray.util.debug import log_once

    configure_logging()  # again, in case ray.data was imported before the variable was set
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_fallback_to_arrow_object_ext_type = True
    log_once("ray_data_progress_manager_disabled")  # its "Progress bars disabled" warning: we print our own
    _ray_init_kwargs.update(
        logging_level=logging.WARNING,
        runtime_env={
            "worker_process_setup_hook": "limits_ray.pipeline.logs.setup_worker_logging",
            "env_vars": {LOG_DIR_ENV: str(log_dir), **WORKER_ENV},
        },
    )
    return log_dir


def ray_init_kwargs() -> dict[str, Any]:
    """Extra ``ray.init`` arguments for the routing set up by :func:`route_logs` (none without it)."""
    return dict(_ray_init_kwargs)
