"""Imports flow one way: the import graph of ``hdlm_kernels`` and ``hdlm_reference`` has no cycle.

The graph is read from the source with ``ast``, every import statement counted wherever it stands
(module level or inside a function: a function-level import that closes a cycle is a cycle held
together by timing). ``if TYPE_CHECKING:`` blocks are left out (they never run). An edge goes to the
module a statement names: ``from pkg import name`` points at ``pkg.name`` when that is a module of
ours, else at ``pkg`` itself (its ``__init__``). The implicit import of a parent package before its
children is not an edge: Python initializes parents first by construction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"hdlm_kernels": ROOT / "hdlm_kernels", "hdlm_reference": ROOT / "reference"}
EXTENSIONS = {"hdlm_kernels._C"}  # compiled modules (setup.py): modules without Python imports of their own


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of ours: dotted name -> (file, whether it is a package's __init__)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _statements(tree: ast.AST):
    """Import statements anywhere in ``tree``, except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (s for child in node.orelse for s in _statements(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _statements(node)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | EXTENSIONS
    graph = {name: set() for name in known}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for statement in _statements(ast.parse(path.read_text(), str(path))):
            if isinstance(statement, ast.Import):
                targets = [alias.name for alias in statement.names]
            else:
                base = statement.module or ""
                if statement.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (statement.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in statement.names]
            graph[name].update(target for target in targets if target in known and target != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["hdlm_kernels.sampling.gumbel"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_hdlm_kernels_never_imports_the_reference_harness():
    graph = import_graph()
    offending = sorted(f"{name} -> {target}" for name, targets in graph.items() if name.startswith("hdlm_kernels")
                       for target in targets if target.startswith("hdlm_reference"))
    assert not offending, offending


@pytest.mark.parametrize("source, cycle", [
    ({"a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
    ({"a": ["b"], "b": ["c"], "c": []}, None),
    ({"a": ["b"], "b": ["c"], "c": ["b"]}, ["b", "c", "b"]),
])
def test_find_cycle_finds_cycles_and_only_cycles(source, cycle):
    assert find_cycle({k: set(v) for k, v in source.items()}) == cycle


def test_function_level_imports_count(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from . import two\n")
    (package / "two.py").write_text("def f():\n    from .one import g\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGES", {"pkg": package})
    assert find_cycle(import_graph()) == ["pkg.one", "pkg.two", "pkg.one"]
