"""No import cycle in ``rmtp/`` nor in the built-in plugins (``plugins/rmtp_plugins/``): every
module can be read, and moved, on its own.

The graph is read from the source with :mod:`ast`, not from ``sys.modules``, so function-level
(lazy) imports count too: a cycle hidden behind a function-level import still ties the two
modules together, and is what makes a move or a split of either one break the other. Imports
under ``if TYPE_CHECKING:`` are left out (they never run), except in the plugins' check that counts
them too: a pruner's modules share their types through a module both import (``plan.py``), never by
one naming the other's under ``TYPE_CHECKING`` (the ``speed.py`` → pruner ``_Plan`` imports were
such cycles).

One graph holds both packages, so a cycle through both (``rmtp`` → ``rmtp_plugins`` → ``rmtp``)
is found too.

Edges: ``import rmtp.a.b`` and ``from rmtp.a import b`` (``b`` a submodule) point at
``rmtp.a.b``; ``from rmtp.a import name`` (``name`` not a submodule) points at ``rmtp.a`` (the
same for ``rmtp_plugins``).
A package importing its own submodules in ``__init__`` is an edge package → child; a child is
not taken to import its parent package implicitly (Python runs the parent's ``__init__`` first,
but that is an edge only when the child names the parent).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rmtp
import rmtp_plugins

#: The packages whose modules make the graph: package name → its folder.
ROOTS = {"rmtp": Path(rmtp.__file__).resolve().parent,
         "rmtp_plugins": Path(rmtp_plugins.__file__).resolve().parent}


def _modules() -> dict[str, Path]:
    """Dotted name → file of every module under rmtp/ and plugins/rmtp_plugins/ (``rmtp.x`` for
    ``rmtp/x/__init__.py``)."""
    found = {}
    for root in ROOTS.values():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The ``rmtp.*`` and ``rmtp_plugins.*`` modules one file imports, at any depth, outside
    ``if TYPE_CHECKING:`` unless ``type_checking``."""

    def __init__(self, module: str, is_package: bool, modules: set[str], type_checking: bool = False):
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.type_checking = type_checking
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test) and not self.type_checking:
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
        if not any(name == package or name.startswith(package + ".") for package in ROOTS):
            return
        while name and name not in self.modules:  # import rmtp.a.b.attr-like names: the module holding it
            name = name.rpartition(".")[0]
        if name:
            self.found.add(name)


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    """Module → the modules it imports (``type_checking``: those under ``if TYPE_CHECKING:`` too)."""
    modules = _modules()
    names = set(modules)
    graph = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", names, type_checking)
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


def only(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """The part of ``graph`` among ``package``'s own modules."""
    inside = {name for name in graph if name == package or name.startswith(package + ".")}
    return {name: graph[name] & inside for name in inside}


def test_graph_is_read() -> None:
    graph = import_graph()
    assert "rmtp.run.pipeline" in graph and "rmtp.errors" in graph["rmtp.run.pipeline"]
    assert "rmtp.measure.counts" in graph["rmtp.measure"]  # a package's __init__ → its submodules
    # the plugins are read too, with their edges into rmtp and among themselves
    assert {"rmtp.contract.pruner", "rmtp_plugins.nm.params"} <= graph["rmtp_plugins.nm"]
    assert "rmtp_plugins.nm.speed" in graph["rmtp_plugins.nm.pruner"]
    assert "rmtp_plugins.svd_mp.params" not in import_graph()["rmtp_plugins.svd_mp.speed"]  # TYPE_CHECKING only
    assert "rmtp_plugins.svd_mp.params" in import_graph(type_checking=True)["rmtp_plugins.svd_mp.speed"]


def test_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_rmtp() -> None:
    cycle = find_cycle(only(import_graph(), "rmtp"))
    assert cycle is None, "import cycle in rmtp/: " + " → ".join(cycle or [])


def test_no_import_cycle_in_the_plugins() -> None:
    """Within ``plugins/rmtp_plugins/``, ``TYPE_CHECKING`` imports counted: a pruner's speed module
    and its pruner share their plan types through ``plan.py``, not by naming each other."""
    cycle = find_cycle(only(import_graph(type_checking=True), "rmtp_plugins"))
    assert cycle is None, "import cycle in plugins/rmtp_plugins/: " + " → ".join(cycle or [])


def test_no_import_cycle_through_rmtp_and_the_plugins() -> None:
    """rmtp may name a built-in plugin (a default, a lazy import); a plugin imports rmtp; never both ways."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_every_built_in_pruner_has_the_one_layout() -> None:
    """Each built-in pruner is declared in its family package's ``__init__``, beside ``params.py``
    and ``pruner.py``; only the package (its ``prune``) imports ``pruner.py``, so the imports run
    one way: ``__init__`` → ``pruner`` → ``speed`` → ``plan`` → ``params`` (docs/pruner-contract.md,
    "One layout for every built-in pruner")."""
    from rmtp.plugins import load_plugins

    graph = import_graph(type_checking=True)
    packages = {cls.__module__ for _, cls in load_plugins(disabled=()).pruners.items()
                if cls.__module__.startswith("rmtp_plugins.")}
    assert packages == {f"rmtp_plugins.{family}" for family in ("int8", "magnitude", "nm", "spp", "svd_mp", "tokens")}
    for package in sorted(packages):
        assert ROOTS["rmtp_plugins"].joinpath(*package.split(".")[1:], "__init__.py").is_file(), package
        assert {f"{package}.params", f"{package}.pruner"} <= set(graph), f"{package}: no params.py or pruner.py"
        importers = sorted(name for name, imports in graph.items() if f"{package}.pruner" in imports)
        assert importers == [package], f"{package}.pruner is imported by {importers}, not by its package alone"



def _timm_imports(path: Path) -> list[str]:
    """The timm modules ``path`` imports, at any depth (TYPE_CHECKING included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found += [n for n in names if n == "timm" or n.startswith("timm.")]
    return found


def test_no_pruner_names_a_timm_class() -> None:
    """Pruners ask the architecture (couplings, removal_problem, set_head_count, token_blocks):
    only architecture modules import timm, so a new family is one architecture module."""
    plugins = ROOTS["rmtp_plugins"]
    offenders = {str(path.relative_to(plugins)): names for path in sorted(plugins.rglob("*.py"))
                 if path.parent.name != "architectures" and (names := _timm_imports(path))}
    assert not offenders, f"pruner modules importing timm: {offenders}"
    assert _timm_imports(plugins / "architectures" / "vit.py"), "the check reads imports inside functions too"
