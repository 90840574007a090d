"""README's commands, parsed from README.md and run as written, in README's order, on a fresh copy.

The copy holds the repository's tracked files and this checkout's ``.venv`` (so ``./scripts/setup``
is the no-op it is after a first install); ``.venv/bin`` leads PATH, as after ``source .venv/bin/activate``.
Only ``./scripts/test`` is not run: it is the command running this test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOT_RUN = {"./scripts/test": "the command running this test"}
COMMAND_TIMEOUT_S = 900


def readme_commands(markdown: str) -> list[str]:
    """The command lines of the ```bash blocks, in order: continuations joined, comments dropped."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def readme_python(markdown: str) -> list[str]:
    """The ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_readme_python_uses_only_the_public_api():
    """README's Python imports only from ``limits_ray`` itself (its ``__init__`` names the public API)."""
    import ast

    import limits_ray

    blocks = readme_python(README.read_text())
    assert blocks, "README shows the Python API"
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("limits_ray"):
                assert node.module == "limits_ray", f"README imports from {node.module}: use the public API"
                assert all(alias.name in limits_ray.__all__ for alias in node.names)
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("limits_ray.") for alias in node.names)


def test_every_public_name_resolves():
    import limits_ray

    for name in limits_ray.__all__:
        assert getattr(limits_ray, name) is not None, name
    with pytest.raises(AttributeError):
        limits_ray.not_a_name  # noqa: B018


def test_readme_commands_are_parsed_whole():
    commands = readme_commands(README.read_text())
    assert commands[:2] == ["./scripts/demo", "./scripts/test"]
    assert not [c for c in commands if "[" in c or "<" in c], "README's bash blocks must hold literal commands"
    assert any(c.startswith("limits-ray reduce") and "--eval" in c for c in commands)  # a joined continuation


def _fresh_copy(destination: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((REPO / name).read_bytes())
            target.chmod((REPO / name).stat().st_mode)
    (destination / ".venv").symlink_to(Path(sys.prefix))
    return destination


def _run(command: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, start_new_session=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README's `{command}` exited with {done.returncode}:\n{output[-6000:]}"
    assert "Traceback" not in output, f"README's `{command}` printed a traceback:\n{output[-6000:]}"
    return output


def test_every_readme_command_runs_as_written_in_order(tmp_path):
    if Path(sys.prefix).name != ".venv" or Path(sys.prefix).parent != REPO:
        pytest.skip("needs the project's own ./.venv (scripts/setup), as README's commands use it")
    stamp = Path(sys.prefix) / ".limits-ray-installed"
    if not stamp.is_file() or stamp.read_text().strip() != hashlib.sha1((REPO / "pyproject.toml").read_bytes()).hexdigest():
        pytest.fail("./.venv is older than pyproject.toml: run ./scripts/setup first (the copy's scripts/setup "
                    "would reinstall into this .venv from a temporary directory)")
    clone = _fresh_copy(tmp_path / "clone")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "LIMITS_RAY"))}
    env["PATH"] = f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    outputs = {}
    for command in readme_commands(README.read_text()):
        if command not in NOT_RUN:
            outputs[command] = _run(command, clone, env)
    for block in readme_python(README.read_text()):
        outputs[block] = _run(f"python -c {shlex.quote(block)}", clone, env)
    tiny = clone / "runs" / "tiny"
    for name in ("frontier.parquet", "frontier_mean.parquet", "bon.parquet", "convergence.parquet",
                 "report.json", "report.md", "frontier.png", "convergence.png", "ess.png"):
        assert (tiny / name).exists(), f"README says the demo and `limits-ray report` write runs/tiny/{name}"
    assert pq.read_table(tiny / "frontier.parquet").num_rows > 0
    assert any("gain" in out for command, out in outputs.items() if command.startswith("limits-ray query"))
