"""The plugin manager and the registries of pruners and architectures.

Plugins are found through entry points of group ``rmtp`` (built-ins included, so they get no
special path). ``RMTP_DISABLE_PLUGINS=name1,name2`` blocks entry points by name before they are
imported. Registries are strict: a class without a name, or a second class under a name already
taken, is an error naming both; an unknown name is answered with the known ones, closest first.

A :class:`Plugins` is passed down explicitly where it matters: ``load_recipe(plugins=...)`` records
the plugins a recipe was validated against, and ``run_recipe`` and ``rmtp.load`` take ``plugins=``
(by default the recipe's, else the process-wide ones of :func:`get_plugins`). :func:`use_plugins`
swaps the process-wide ones for a while, for code that takes no ``plugins=``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from rmtp.contract import hookspecs
from rmtp.contract.architecture import Architecture
from rmtp.contract.pruner import Pruner
from rmtp.errors import PluginError, short_repr

ENTRY_POINT_GROUP = "rmtp"
DISABLE_ENV = "RMTP_DISABLE_PLUGINS"

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → class map for one kind of plugin (pruner or architecture)."""

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._classes: dict[str, type[T]] = {}

    def add(self, cls: type[T]) -> None:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"{where} was registered as a {self.kind} but is not a subclass of {self.base.__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.kind} class {where} has no `name` class attribute")
        if not getattr(cls, "description", ""):
            raise PluginError(f"{self.kind} {name!r} ({where}) has no one-line `description`")
        if name in self._classes:
            other = self._classes[name]
            raise PluginError(
                f"two {self.kind}s are registered as {name!r}: {other.__module__}.{other.__qualname__} "
                f"and {where}; block one with {DISABLE_ENV}=<entry point name>"
            )
        self._classes[name] = cls

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise PluginError(f"unknown {self.kind} {name!r}; {self.known_hint(name)}") from None

    def known_hint(self, name: str) -> str:
        """'known: a, b, c' with the closest matches to ``name`` first."""
        close = difflib.get_close_matches(name, self._classes, n=max(1, len(self._classes)), cutoff=0.4)
        rest = sorted(n for n in self._classes if n not in close)
        known = close + rest
        return f"known: {', '.join(known)}" if known else f"no {self.kind}s are registered"

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._classes))

    def items(self) -> list[tuple[str, type[T]]]:
        return sorted(self._classes.items())


@dataclass
class Plugins:
    """The loaded plugins of one process."""

    manager: pluggy.PluginManager
    pruners: Registry[Pruner] = field(default_factory=lambda: Registry("pruner", Pruner))
    architectures: Registry[Architecture] = field(default_factory=lambda: Registry("architecture", Architecture))
    #: ``rmtp bench`` kernel providers, in registration order (see ``hookspecs.register_kernels``).
    kernels: list[Callable[..., str | None]] = field(default_factory=list)
    _saved_types_imported: bool = field(default=False, repr=False, compare=False)

    def import_saved_types(self) -> None:
        """Have every plugin import the modules defining its saved types (hook ``import_saved_types``),
        once: :mod:`rmtp.contract.saved_types` asks before it answers that a saved type id is unknown."""
        if not self._saved_types_imported:
            self._saved_types_imported = True
            self.manager.hook.import_saved_types()

    def architecture(self, name: str) -> Architecture:
        return self.architectures.get(name)()

    def architecture_for(self, model_name: str, arch: str | None = None) -> Architecture:
        """The adapter named ``arch``, or the one whose timm name patterns match ``model_name``."""
        if arch is not None:
            return self.architecture(arch)
        matching = [cls for _, cls in self.architectures.items() if cls().matches(model_name)]
        if len(matching) == 1:
            return matching[0]()
        if not matching:
            import timm

            from rmtp.contract.architecture import timm_name_hint

            if not timm.is_model(model_name.split(".")[0]):  # a typo, not a missing plugin
                raise PluginError(f"timm has no model {short_repr(model_name, 80)}{timm_name_hint(model_name)}")
            raise PluginError(
                f"no architecture plugin covers timm model {model_name!r}; name one (model.arch in a recipe, "
                f"--arch on the command line) if its layers are laid out like a known family's "
                f"({self.architectures.known_hint('')})"
            )
        names = ", ".join(cls.name for cls in matching)
        raise PluginError(f"several architecture plugins cover {model_name!r} ({names}); name one (model.arch in a "
                          f"recipe, --arch on the command line)")


class ArchitectureRef:
    """The architecture a saved patch record names: an instance (as a pruner hands it over) or a
    registered name (as a record read from a folder gives it), looked up on first use.

    Why: a forward-pass patch that asks its family something when it is applied (token blocks,
    head counts) is re-applied by :func:`rmtp.load` with nothing but its record, so the record
    names the family. ``vit`` is left out of records (:meth:`recorded_in`): every record written
    before families were named was a vit's, and reads back as one.
    """

    #: The family a record without ``arch`` belongs to.
    UNNAMED = "vit"

    def __init__(self, arch: str | Architecture = UNNAMED):
        if isinstance(arch, Architecture):
            self.name, self._instance = arch.name, arch
        elif isinstance(arch, str):
            self.name, self._instance = arch, None
        else:
            raise PluginError(f"arch must be an architecture or its registered name, got {type(arch).__name__}")

    def get(self) -> Architecture:
        """The architecture instance."""
        if self._instance is None:
            self._instance = get_plugins().architecture(self.name)
        return self._instance

    def recorded_in(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with ``arch`` added, unless the family is the one a record without it means."""
        return config if self.name == self.UNNAMED else {**config, "arch": self.name}


def disabled_from_env() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def load_plugins(disabled: Iterable[str] | None = None) -> Plugins:
    """Build a plugin manager, load the ``rmtp`` entry points not blocked, and fill the registries."""
    manager = pluggy.PluginManager("rmtp")
    manager.add_hookspecs(hookspecs)
    for name in disabled_from_env() if disabled is None else set(disabled):
        manager.set_blocked(name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if manager.is_blocked(entry_point.name) or manager.get_plugin(entry_point.name) is not None:
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:  # a broken third-party plugin must not look like an rmtp bug
            raise PluginError(
                f"plugin {entry_point.name!r} ({entry_point.value}) failed to load: {exc.__class__.__name__}: {exc}; "
                f"block it with {DISABLE_ENV}={entry_point.name}"
            ) from exc
        manager.register(plugin, name=entry_point.name)
    try:
        manager.check_pending()  # a misspelt hook name would otherwise be ignored silently
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"an rmtp plugin implements an unknown hook: {exc}") from exc
    plugins = Plugins(manager=manager)
    manager.hook.register_pruners(register=plugins.pruners.add)
    manager.hook.register_architectures(register=plugins.architectures.add)
    manager.hook.register_kernels(register=plugins.kernels.append)
    return plugins


_loaded: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugins, loaded on first use (never at import time)."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins()
    return _loaded


@contextlib.contextmanager
def use_plugins(plugins: Plugins) -> Iterator[Plugins]:
    """Make ``plugins`` the process-wide ones (:func:`get_plugins`) inside the ``with`` block, then
    restore what was there (tests, a private registry for code that takes no ``plugins=``)."""
    global _loaded
    previous, _loaded = _loaded, plugins
    try:
        yield plugins
    finally:
        _loaded = previous


def reset_plugins() -> None:
    """Forget the loaded plugins so the next :func:`get_plugins` reloads them (tests, notebooks)."""
    global _loaded
    _loaded = None
