"""Lazy exports for a package's public face: each name is imported on first use.

Why: ``import rmtp`` (and the entry modules of the built-in plugins) must stay cheap, so that
``rmtp --help``, ``rmtp list`` and recipe validation answer without importing torch. A package
lists ``name → module`` and installs the two module hooks this returns::

    __getattr__, __dir__ = lazy_exports(__name__, {"train": "rmtp.training.loop", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module ``package``: unknown names resolve through
    ``exports`` (name → the module defining it), and ``dir()`` lists them too (tab completion)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__

