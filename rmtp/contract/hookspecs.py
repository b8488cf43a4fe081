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
    """Register pruner classes (subclasses of :class:`rmtp.contract.pruner.Pruner`): ``register(MyPruner)``."""


@hookspec
def register_architectures(register: Callable[[type], None]) -> None:
    """Register architecture classes (subclasses of :class:`rmtp.contract.architecture.Architecture`)."""


@hookspec
def register_kernels(register: Callable[[Callable[..., str | None]], None]) -> None:
    """Register kernel providers for ``rmtp bench``: ``register(fn)``.

    ``fn(module, *, device, dtype) -> str | None`` is offered every module of a benchmarked model
    (after it is on its device and dtype, before compiling) that has no ``rmtp_kernel`` of its own.
    It may switch the module to a special kernel in place (e.g. 2:4 semi-structured on CUDA) and
    returns a label for the table, or ``None`` to leave it dense. It must not raise for a module,
    device or dtype it does not handle. A saved n:m model is plain Linear layers with zeros, so the
    provider, not the module, has to recognise it.
    """


@hookspec
def import_saved_types() -> None:
    """Import the modules that define this plugin's saved types (``@rmtp.rebuildable`` replacement
    modules, ``@rmtp.contract.saved_types.model_patch`` patches), so that a saved model using them can be loaded.

    Only for a plugin whose entry-point module does not import them itself (to keep ``rmtp list``,
    ``rmtp validate`` and ``--help`` free of torch): rmtp calls it, once, the first time it meets a
    type id it does not know, or lists the known ones. It must only import modules.
    """


@hookspec
def register_commands(app) -> None:
    """Add CLI commands to rmtp's ``typer.Typer`` app: ``app.command()(fn)`` or ``app.add_typer(...)``."""
