"""The layers of limits_ray and the rules between them (README, "Architecture"), checked from the source.

Every import counts, also one inside a function: the graph is read from the AST of every module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "limits_ray"

LAYERS = {
    "core": set(),
    "config": {"core"},
    "storage": {"core"},
    "outputs": {"core", "storage"},
    "pipeline": {"core", "storage", "config"},
    "runs": {"core", "storage", "config", "pipeline", "outputs"},
    "cli": {"core", "storage", "config", "pipeline", "outputs", "runs", "tiny_models"},
    "tiny_models": set(),
    "reward_functions": set(),
    "__init__": {"core", "storage", "config", "pipeline", "outputs", "runs"},
}
"""Layer -> the layers its modules may import (besides their own)."""

HEAVY = ("ray", "vllm", "torch", "transformers", "yaml", "matplotlib", "datasets")
FORBIDDEN = {
    "core": set(HEAVY),
    "config": set(HEAVY) - {"yaml"},
    "storage": set(HEAVY),
    "outputs": set(HEAVY) - {"matplotlib"},
}
"""Layer -> third-party packages its modules may not import, even inside a function."""


def _modules() -> dict[str, Path]:
    return {".".join(("limits_ray", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import statement, absolute and relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(("limits_ray", *path.relative_to(PACKAGE).parent.parts))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from limits_ray.x import y`` counts y when it is a module)."""
    modules = _modules()
    edges: dict[str, set[str]] = {module: set() for module in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(path):
            if not target.startswith("limits_ray"):
                continue
            candidates = [f"{target}.{name}" for name in names if f"{target}.{name}" in modules] or [target]
            for candidate in candidates:
                while candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate != module:
                    edges[module].add(candidate)
    return edges


def test_each_module_imports_only_the_layers_below_it():
    wrong = []
    for module, targets in _graph().items():
        layer = _layer(module)
        assert layer in LAYERS, f"{module}: a module outside the known layers {sorted(LAYERS)}: add its layer to README and here"
        for target in targets:
            if _layer(target) != layer and target != "limits_ray" and _layer(target) not in LAYERS[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({_layer(target)})")
    assert not wrong, "imports against the layer rule (README, Architecture):\n" + "\n".join(sorted(wrong))


def test_no_module_imports_the_package_root():
    """``limits_ray/__init__.py`` is the public API for users; modules import what they use from its home."""
    wrong = [module for module, targets in _graph().items() if "limits_ray" in targets and module != "limits_ray"]
    assert not wrong, wrong


def test_lower_layers_import_no_heavy_packages():
    wrong = []
    for module, path in _modules().items():
        for target, _, line in _imports(path):
            if target.split(".")[0] in FORBIDDEN.get(_layer(module), ()):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        for target, names, line in _imports(path):
            if target.startswith("limits_ray") and target != module:
                wrong += [f"{module}:{line} imports {target}.{name}" for name in names if name.startswith("_")]
    assert not wrong, "\n".join(wrong)


def test_tests_bench_and_jobs_import_no_private_names():
    root = PACKAGE.parent
    wrong = []
    for folder in ("tests", "bench", "jobs"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("limits_ray"):
                    wrong += [f"{path.relative_to(root)}:{node.lineno} {node.module}.{alias.name}"
                              for alias in node.names if alias.name.startswith("_")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", ["limits_ray.core", "limits_ray.storage", "limits_ray.outputs"])
def test_importing_a_lower_layer_loads_no_heavy_package(package):
    """In a fresh interpreter: every module of the package imported, then ``sys.modules`` read."""
    modules = sorted(module for module in _modules() if module.startswith(package))
    code = ("import json, sys\n" + "".join(f"import {module}\n" for module in modules)
            + f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    allowed = {"matplotlib"} if package == "limits_ray.outputs" else set()
    assert set(loaded) <= allowed, f"importing {package} loads {loaded}"


def test_the_public_api_points_at_each_names_home():
    """``limits_ray.__init__`` names each public name's defining module (no re-export chains)."""
    import importlib

    import limits_ray

    modules = _modules()
    for name, home in limits_ray._HOMES.items():  # noqa: SLF001 - the table under test
        assert home in modules, f"{name}: {home} is not a module of the package"
        value = getattr(importlib.import_module(home), name)
        defined = getattr(value, "__module__", home)
        assert defined == home, f"{name} is defined in {defined}, not {home}"


def test_jobs_use_the_public_api():
    """``jobs/*.py`` (what users run and ``ray job submit`` sends) import ``limits_ray`` or its CLI only."""
    root = PACKAGE.parent
    wrong = []
    for path in (root / "jobs").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("limits_ray"):
                if node.module not in ("limits_ray", "limits_ray.cli"):
                    wrong.append(f"{path.name}:{node.lineno} from {node.module}")
    assert not wrong, wrong
