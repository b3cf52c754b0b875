"""The house rule: the runtime (``workbench``) never imports the lab (``simulations``).

Importing every runtime module loads none of the lab's dependencies (SimPy,
pandas, matplotlib, scikit-learn, Jupyter) and no ``simulations`` module; no
module of either package imports, at module level, a module that imports it
back; and the runtime installs and runs from a fresh virtualenv without the
``lab`` extra, where the lab's commands explain how to get them.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

LAB_ONLY = ("simpy", "pandas", "matplotlib", "sklearn", "jupyter", "jupyterlab",
            "jupyter_client", "jupyter_core", "papermill", "pyarrow", "simulations",
            "numpy", "joblib", "scipy", "dask", "distributed")  # fmt: skip
#: The analytics extra: imported inside functions, only where a model is loaded and scored.
EXTRA_USERS = {"workbench.analytics.model": {"numpy", "joblib"}}


def _modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports (``from a.b import c`` gives ``a.b.c`` when that is a
    module, else ``a.b``); ``if TYPE_CHECKING:`` blocks are not imports."""
    tree = ast.parse(path.read_text())
    known = set(_modules("workbench")) | set(_modules("simulations"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if top_level_only and isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
            ):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.add(full if full in known else child.module)
            visit(child)

    visit(tree)
    return found


def test_the_runtime_source_never_imports_the_lab() -> None:
    offenders = {
        module: sorted(
            i
            for i in _imports(path, module, top_level_only=False)
            if i.split(".")[0] in LAB_ONLY and i.split(".")[0] not in EXTRA_USERS.get(module, ())
        )
        for module, path in zip(_modules("workbench"), _paths("workbench"), strict=True)
    }
    offenders = {m: found for m, found in offenders.items() if found}
    assert len(_modules("workbench")) > 40  # the walk found the package
    assert offenders == {}


def _paths(package: str) -> list[Path]:
    return [p for p in sorted((ROOT / package).rglob("*.py")) if p.stem != "__main__"]


def test_importing_every_runtime_module_loads_no_lab_dependency() -> None:
    modules = _modules("workbench")
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    loaded = json.loads(out.stdout)
    assert "workbench.http.app" in loaded and "workbench.ops.serve" in loaded
    assert [m for m in loaded if m.split(".")[0] in LAB_ONLY] == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", ["workbench", "simulations"])
def test_no_import_cycles_between_modules(package: str) -> None:
    known = set(_modules(package))
    graph = {
        module: {i for i in _imports(path, module, top_level_only=True) if i in known} - {module}
        for module, path in zip(_modules(package), _paths(package), strict=True)
    }
    assert sum(len(v) for v in graph.values()) > 20  # the graph has edges to check
    assert _cycle(graph) is None


def _pins(lock: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a uv lock file."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith((" ", "#")):
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_runtime_lock_pins_the_versions_the_tests_run() -> None:
    """Validate what you ship: ``pip install`` from the runtime's lock must get the
    redis-py, uvicorn, msgspec... that the suite ran (``make venv`` installs
    ``requirements.lock``); the live reader and the HTTP edge lean on their
    internals. The runtime's lock is compiled with ``-c requirements.lock``."""
    runtime = _pins(ROOT / "requirements-runtime.lock")
    tested = _pins(ROOT / "requirements.lock")
    assert len(runtime) > 20 and {"redis", "uvicorn", "msgspec"} <= set(runtime)
    differ = {name: (v, tested.get(name)) for name, v in runtime.items() if tested.get(name) != v}
    assert not differ, (
        f"runtime lock vs tested lock: {differ}; regenerate with: uv pip compile "
        "pyproject.toml --python-version 3.11 -c requirements.lock -o requirements-runtime.lock"
    )


def test_the_runtime_installs_and_runs_without_the_lab(tmp_path: Path) -> None:
    """A fresh venv with the runtime's lock only (``requirements-runtime.lock``)."""
    uv = Path(sys.executable).with_name("uv")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    steps = [
        [str(uv), "venv", "-q", "--python", sys.executable, str(venv)],
        [str(uv), "pip", "sync", "-q", "--python", str(venv / "bin/python"),
         str(ROOT / "requirements-runtime.lock")],
        [str(uv), "pip", "install", "-q", "--python", str(venv / "bin/python"), "--no-deps",
         str(ROOT)],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(step, check=True, env=env, cwd=tmp_path, timeout=600, capture_output=True)
    workbench = str(venv / "bin/workbench")
    for command in (["serve", "--help"], ["worker", "--help"], ["relay", "--help"]):
        done = subprocess.run([workbench, *command], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0 and "Usage: workbench" in done.stdout, done.stderr
    scorer = subprocess.run(
        [workbench, "worker", "analytics", "--model", str(tmp_path)], cwd=tmp_path,
        env={**env, "REDIS_URL": "redis://127.0.0.1:1"}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert scorer.returncode == 2 and "escrow-workbench[analytics]" in scorer.stderr, scorer.stderr
    lab = subprocess.run([workbench, "simulate", "baseline"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert lab.returncode == 2
    assert "pip install 'escrow-workbench[lab]'" in lab.stderr and "Traceback" not in lab.stderr
    dashboard = (
        "from importlib.resources import files; "
        "assert (files('workbench.http') / 'static' / 'dashboard.html').is_file()"
    )
    subprocess.run([str(venv / "bin/python"), "-c", dashboard], cwd=tmp_path, check=True)
    pandas = subprocess.run([str(venv / "bin/python"), "-c", "import pandas"], capture_output=True)
    assert pandas.returncode != 0  # the lab's dependencies really are absent
