"""The shape of the package: no import cycle, light imports, small modules and functions.

The import graph is read from the source (every ``import`` of a probekit module, at the top of a
module or inside a function; imports under ``if TYPE_CHECKING:`` are left out, they never run).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "probekit"

MAX_TRAINING_MODULE_LINES = 400
MAX_FUNCTION_LINES = 120


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``probekit.cli`` lives in ``cli/``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    found["probekit.cli"] = ROOT / "cli" / "__init__.py"
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> dict[str, set[str]]:
    """Module -> the probekit modules it imports (at import time or inside functions)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in mods}

    class Imports(ast.NodeVisitor):
        def __init__(self, name: str) -> None:
            self.name = name

        def add(self, target: str) -> None:
            found = resolve(target)
            if found is not None and found != self.name:
                graph[self.name].add(found)

        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):  # never runs: only its else branch counts
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name.startswith("probekit"):
                    self.add(alias.name)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            module = node.module or ""
            if not module.startswith("probekit"):
                return
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
            for sub in subs:
                self.add(sub)
            if len(subs) < len(node.names):
                self.add(module)

    for name, path in mods.items():
        Imports(name).visit(ast.parse(path.read_text(encoding="utf-8")))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert graph["probekit.probe"], "the graph reader found no imports at all"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


@pytest.mark.parametrize("code", ["import probekit", "from probekit.poolers import MaskedMean"])
def test_importing_probekit_leaves_training_out(code: str) -> None:
    """The training package, Accelerate, scikit-learn and matplotlib load on first use only."""
    loaded = _imported_after(code)
    assert "probekit" in loaded
    heavy = {"probekit.training", "accelerate", "sklearn", "matplotlib"}
    assert not heavy & loaded, heavy & loaded


def test_probekit_train_is_there_on_first_use() -> None:
    loaded = _imported_after("import probekit\nassert callable(probekit.train)")
    assert "probekit.training" in loaded


def test_training_modules_and_functions_are_small() -> None:
    """No module of the training package over 400 lines; no function in probekit over 120."""
    long_modules = {
        str(path.relative_to(ROOT)): n
        for path in (PACKAGE / "training").glob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_TRAINING_MODULE_LINES
    }
    assert long_modules == {}
    long_functions = {}
    for path in [*PACKAGE.rglob("*.py"), ROOT / "cli" / "__init__.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert long_functions == {}


def test_the_loop_takes_at_most_six_parameters() -> None:
    from probekit.training.loop import fit

    assert len(inspect.signature(fit).parameters) <= 6
