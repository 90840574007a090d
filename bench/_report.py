"""What every benchmark script shares: its preamble, the machine's description and its section of docs/benchmarks.md.

Import it first: it puts the repository on ``sys.path`` (so ``limits_ray`` imports from this checkout),
and :func:`pin_threads` must run before numpy is imported where a benchmark measures one core.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "benchmarks.md"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def pin_threads(variables: tuple[str, ...] = THREAD_VARIABLES) -> None:
    """One thread for every BLAS and OpenMP pool (call before numpy, or anything importing it, loads)."""
    for variable in variables:
        os.environ[variable] = "1"


def utc_now() -> str:
    """``YYYY-MM-DD HH:MM`` in UTC, for a section's date line."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, ``a / b / c``."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
HEADER = "# Benchmarks\n\nOne section per benchmark script; each script rewrites only its own section.\n"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_description() -> str:
    """``<model>, <n> logical (<m> usable)``."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {os.cpu_count()} logical ({usable} usable)"


def update_docs(title: str, section: str, path: Path = DOCS) -> None:
    """Replace the section headed ``title`` in ``path`` by ``section`` (or append it); others stay."""
    text = path.read_text() if path.exists() else HEADER
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == title), None)
    if start is None:
        new_text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"## (?!#)", lines[i])), len(lines))
        before, after = "".join(lines[:start]), "".join(lines[end:])
        new_text = before + section.rstrip("\n") + "\n" + ("\n" + after if after else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_text.rstrip("\n") + "\n")


def publish(title: str, section: str, print_only: bool) -> None:
    """Print ``section`` (``print_only``: a ``--no-write`` run) or put it in docs/benchmarks.md under ``title``."""
    if print_only:
        print(section)
    else:
        update_docs(title, section)
        print(f"updated {DOCS}")
