"""Replacement layers that describe themselves, so a saved pruned model can be rebuilt.

A pruner that swaps a layer for a module of its own (a low-rank pair, a patched attention block)
decorates that class with :func:`rebuildable` and gives it ``rmtp_config()``: the JSON-able
keyword arguments that rebuild an empty module of the same shape. Saving records
``(path, type, config)`` for every such module; :func:`rmtp.load` rebuilds the base model, puts
empty replacements at those paths and then loads the weights, without knowing which pruner made
them. Only registered classes can be rebuilt: a saved folder is untrusted input and must not be
able to name an arbitrary class.

A change to *how* a model computes rather than to its layers (token reduction in a ViT's forward
pass) is a :class:`ModelPatch` instead: registered with :func:`model_patch`, applied and recorded
on the model with :func:`apply_patch`, undone exactly with :func:`remove_patch`, saved as
``{type, config}`` and re-applied by :func:`rmtp.load` after the weights are loaded.
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


def is_replacement(module: nn.Module) -> bool:
    """A module a pruner put in place of a layer (``@rebuildable`` classes define ``rmtp_config``)."""
    return callable(getattr(type(module), "rmtp_config", None))


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


# --------------------------------------------------------------------------------------------
# Model patches: reversible changes to a model's forward pass, saved with it
# --------------------------------------------------------------------------------------------
#
# Some pruners change *how* a model computes rather than its weights (token reduction swaps the
# forward pass of a ViT and its blocks). Such a change is a :class:`ModelPatch`: an object with a
# JSON config, ``apply(model)`` and ``remove(model)``. :func:`apply_patch` applies it and records it
# on the model (attribute :data:`PATCHES_ATTR`), saving writes ``{type, config}`` for each recorded
# patch, and :func:`rmtp.load` re-applies them after the weights are loaded. As with replacement
# modules, only registered patch classes can be re-applied: a saved folder is untrusted input.

#: Attribute of the root module listing the patches applied to it, oldest first.
PATCHES_ATTR = "rmtp_patches"

_PATCH_REGISTRY: dict[str, type[ModelPatch]] = {}


class ModelPatch:
    """Base class of a reversible, saveable change to a model's forward pass.

    Subclasses are registered with :func:`model_patch`, are built from their JSON config
    (``cls(**config)``, which must validate it: on load the config comes from a file), and implement
    :meth:`apply` (raise :class:`~rmtp.errors.RmtpError` for a model the patch cannot handle, leaving
    it untouched) and :meth:`remove` (restore the model exactly as it was before :meth:`apply`).
    A patch must not add parameters or buffers: the state dict of a patched model is that of the
    unpatched one, so weights load the same way with or without it.
    """

    def rmtp_config(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild this patch."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        raise NotImplementedError


def model_patch(cls: type[ModelPatch]) -> type[ModelPatch]:
    """Class decorator: register a :class:`ModelPatch` subclass so saved models can re-apply it."""
    if not (isinstance(cls, type) and issubclass(cls, ModelPatch)):
        raise TypeError(f"{type_name(cls)} must subclass rmtp.modules.ModelPatch to be a model patch")
    _PATCH_REGISTRY[type_name(cls)] = cls
    return cls


def patches_of(model: nn.Module) -> list[ModelPatch]:
    """The patches applied to ``model`` (via :func:`apply_patch`), oldest first."""
    return list(model.__dict__.get(PATCHES_ATTR, ()))


def apply_patch(model: nn.Module, patch: ModelPatch) -> ModelPatch:
    """Apply ``patch`` to ``model`` and record it there, so saving writes it and loading re-applies it."""
    if type_name(type(patch)) not in _PATCH_REGISTRY:
        raise TypeError(f"{type_name(type(patch))} is not registered with @rmtp.modules.model_patch")
    patch.apply(model)
    model.__dict__[PATCHES_ATTR] = [*patches_of(model), patch]
    return patch


def remove_patch(model: nn.Module, patch: ModelPatch | None = None) -> None:
    """Undo ``patch`` (default: the most recent one), restoring the model as it was before it.

    Patches come off newest first, so each ``remove`` sees the model exactly as its ``apply`` left it.
    """
    applied = patches_of(model)
    if not applied:
        raise ValueError("the model has no rmtp patches to remove")
    if patch is not None and patch is not applied[-1]:
        where = "is not applied to this model" if not any(p is patch for p in applied) else \
            "is not the most recent patch; remove the newer ones first"
        raise ValueError(f"{type_name(type(patch))} {where}")
    applied.pop().remove(model)
    if applied:
        model.__dict__[PATCHES_ATTR] = applied
    else:
        model.__dict__.pop(PATCHES_ATTR, None)


def describe_patches(model: nn.Module) -> list[dict[str, Any]]:
    """``[{type, config}]`` for every patch applied to ``model``, oldest first (JSON-able)."""
    return [{"type": type_name(type(p)), "config": p.rmtp_config()} for p in patches_of(model)]


def apply_patches(model: nn.Module, entries: list[dict[str, Any]], *, source: str) -> None:
    """Re-apply saved patches (after the weights are loaded). Unknown types and bad configs are
    :class:`CheckpointError`, naming ``source``."""
    from rmtp.errors import RmtpError

    if not isinstance(entries, list):
        raise CheckpointError(f"{source}: 'patches' must be a list, got {type(entries).__name__}")
    for entry in entries:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{source}: a patch entry must be an object, got {type(entry).__name__}")
        kind = entry.get("type", "")
        cls = _PATCH_REGISTRY.get(kind) if isinstance(kind, str) else None
        if cls is None:
            known = ", ".join(sorted(_PATCH_REGISTRY)) or "none registered"
            raise CheckpointError(
                f"{source}: the model needs patch type {kind!r}, which no loaded plugin provides "
                f"(known: {known}); install the plugin that pruned this model"
            )
        config = entry.get("config", {})
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: patch {kind!r}: config must be an object")
        try:
            apply_patch(model, cls(**config))
        except (TypeError, ValueError, RmtpError) as exc:
            raise CheckpointError(f"{source}: cannot re-apply patch {kind!r}: {_one_line(exc)}") from exc


def _one_line(exc: Exception) -> str:
    """An exception as one line (pydantic's multi-line validation errors as ``field: message; ...``)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in errors())
        except (TypeError, KeyError):
            pass
    return " ".join(str(exc).split())
