"""The package's shape: no import cycle (function-level imports included), small modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import darkmatter

SRC = Path(darkmatter.__file__).parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_RUNNER_LINES = 200


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """darkmatter modules ``name`` imports anywhere in the file: in functions and for type checking too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
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


def test_the_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert "darkmatter.runner" in graph["darkmatter.cli"]  # the graph sees function-level imports
    assert _cycles(graph) == []


def test_every_module_imports_first_without_a_circular_import() -> None:
    """Import each module into a fresh ``darkmatter`` namespace: a cycle through a package ``__init__``
    (which the explicit-import graph does not show) fails whichever module is imported first."""
    import importlib
    import sys

    saved = {k: v for k, v in sys.modules.items() if k == "darkmatter" or k.startswith("darkmatter.")}
    failures = []
    try:
        for name in sorted(n for n in _modules() if not n.endswith("__main__")):
            for k in [k for k in sys.modules if k == "darkmatter" or k.startswith("darkmatter.")]:
                del sys.modules[k]
            try:
                importlib.import_module(name)
            except ImportError as exc:
                failures.append(f"{name}: {exc}")
    finally:
        for k in [k for k in sys.modules if k == "darkmatter" or k.startswith("darkmatter.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert not failures, failures


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_study_imports_neither_the_runner_nor_the_report() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("darkmatter.study"):
            imported = _imported(name, path, modules)
            assert not {m for m in imported if m.startswith(("darkmatter.runner", "darkmatter.report"))}


def test_modules_and_functions_are_small() -> None:
    too_long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    runner = (SRC / "runner.py").read_text(encoding="utf-8")
    if len(runner.splitlines()) > MAX_RUNNER_LINES:
        too_long.append(f"the runner: {len(runner.splitlines())} lines")
    assert not too_long, too_long
