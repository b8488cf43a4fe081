"""The hooks an rmtp plugin can implement.

Each hook receives a ``register`` callback so one plugin can add several things. A plugin is any
module (or object) with functions decorated ``@rmtp.hookimpl``, exposed through an entry point of
group ``rmtp`` in its package metadata::

    [project.entry-points.rmtp]
    my_pruner = "my_package.rmtp_plugin"

Built-in pruners and architectures are registered exactly this way (see ``pyproject.toml``).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("rmtp")
hookimpl = pluggy.HookimplMarker("rmtp")


@hookspec
def register_pruners(register: Callable[[type], None]) -> None:
    """Register pruner classes (subclasses of :class:`rmtp.pruner.Pruner`): ``register(MyPruner)``."""


@hookspec
def register_architectures(register: Callable[[type], None]) -> None:
    """Register architecture classes (subclasses of :class:`rmtp.architecture.Architecture`)."""


@hookspec
def register_commands(app) -> None:  # noqa: ANN001 - a typer.Typer; kept untyped so plugins need not import typer
    """Add CLI commands to rmtp's ``typer.Typer`` app: ``app.command()(fn)`` or ``app.add_typer(...)``."""
