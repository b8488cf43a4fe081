"""No import cycle in ``rmtp/``: every module can be read, and moved, on its own.

The graph is read from the source with :mod:`ast`, not from ``sys.modules``, so function-level
(lazy) imports count too: a cycle hidden behind a function-level import still ties the two
modules together, and is what makes a move or a split of either one break the other. Imports
under ``if TYPE_CHECKING:`` are left out (they never run).

Edges: ``import rmtp.a.b`` and ``from rmtp.a import b`` (``b`` a submodule) point at
``rmtp.a.b``; ``from rmtp.a import name`` (``name`` not a submodule) points at ``rmtp.a``.
A package importing its own submodules in ``__init__`` is an edge package → child; a child is
not taken to import its parent package implicitly (Python runs the parent's ``__init__`` first,
but that is an edge only when the child names the parent).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rmtp

ROOT = Path(rmtp.__file__).resolve().parent
PACKAGE = "rmtp"


def _modules() -> dict[str, Path]:
    """Dotted name → file of every module under rmtp/ (``rmtp.x`` for ``rmtp/x/__init__.py``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The ``rmtp.*`` modules one file imports, at any depth, outside ``if TYPE_CHECKING:``."""

    def __init__(self, module: str, is_package: bool, modules: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            self._add(sub if sub in self.modules else target)

    def _add(self, name: str) -> None:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return
        while name and name not in self.modules:  # import rmtp.a.b.attr-like names: the module holding it
            name = name.rpartition(".")[0]
        if name:
            self.found.add(name)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    graph = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", names)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = visitor.found - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, …, a]``, or None (iterative depth-first search, sorted for stable output)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_graph_is_read() -> None:
    graph = import_graph()
    assert "rmtp.pipeline" in graph and "rmtp.errors" in graph["rmtp.pipeline"]
    assert "rmtp.measure.counts" in graph["rmtp.measure"]  # a package's __init__ → its submodules


def test_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_rmtp() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in rmtp/: " + " → ".join(cycle or [])
