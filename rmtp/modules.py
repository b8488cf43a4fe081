"""Replacement layers that describe themselves, so a saved pruned model can be rebuilt.

A pruner that swaps a layer for a module of its own (a low-rank pair, a patched attention block)
decorates that class with :func:`rebuildable` and gives it ``rmtp_config()``: the JSON-able
keyword arguments that rebuild an empty module of the same shape. Saving records
``(path, type, config)`` for every such module; :func:`rmtp.load` rebuilds the base model, puts
empty replacements at those paths and then loads the weights, without knowing which pruner made
them. Only registered classes can be rebuilt: a saved folder is untrusted input and must not be
able to name an arbitrary class.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rmtp.errors import CheckpointError

_REGISTRY: dict[str, type[nn.Module]] = {}


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def rebuildable(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: register a replacement module type for saving and loading."""
    if not callable(getattr(cls, "rmtp_config", None)):
        raise TypeError(f"{type_name(cls)} must define rmtp_config() to be rebuildable")
    _REGISTRY[type_name(cls)] = cls
    return cls


def describe_replacements(model: nn.Module) -> list[dict[str, Any]]:
    """``[{path, type, config}]`` for every registered replacement module (outermost only)."""
    entries: list[dict[str, Any]] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if type_name(type(module)) not in _REGISTRY:
            continue
        if any(path.startswith(prefix + ".") for prefix in taken):
            continue  # rebuilt by its parent
        entries.append({"path": path, "type": type_name(type(module)), "config": module.rmtp_config()})
        taken.append(path)
    return entries


def apply_replacements(model: nn.Module, entries: list[dict[str, Any]], *, source: str) -> None:
    """Put empty replacement modules at the recorded paths (weights are loaded afterwards)."""
    for entry in entries:
        cls = _REGISTRY.get(entry.get("type", ""))
        if cls is None:
            known = ", ".join(sorted(_REGISTRY)) or "none registered"
            raise CheckpointError(
                f"{source}: layer {entry.get('path')!r} needs module type {entry.get('type')!r}, which no "
                f"loaded plugin provides (known: {known}); install the plugin that pruned this model"
            )
        if not entry.get("path"):
            raise CheckpointError(f"{source}: a replacement entry has no layer path")
        try:
            model.set_submodule(entry["path"], cls(**entry["config"]))
        except (TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{source}: cannot rebuild layer {entry.get('path')!r}: {exc}") from exc
