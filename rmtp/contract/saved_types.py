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

**Type ids.** The ``type`` a folder records is an explicit, stable id given in the decorator,
``@rebuildable("lowrank.linear")`` / ``@model_patch("tokens.reduction")``: ``family.kind``, the
family being the plugin's name. It is *not* where the class lives, so a module can be renamed or
moved without orphaning the folders users have. rmtp up to format 2 wrote the class's import path
(``rmtp_plugins.svd_mp.lowrank.LowRankLinear``); each class lists the paths it was saved under as ``aliases``,
and loading resolves a type as an id first, then through that alias table
(:func:`type_aliases`). A class moved later keeps its id and needs nothing; a class whose id must
change adds its old id as an alias. Registries refuse a class without an id, an id that is not
``family.kind``, and a second class under an id or alias already taken (naming both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, TypeVar

from torch import nn

from rmtp.errors import CheckpointError, PluginError

T = TypeVar("T", bound=type)

#: ``family.kind`` (more dotted parts allowed): lower case, digits, ``_`` and ``-``, so an id can
#: never be mistaken for the import path (``package.module.ClassName``) an older rmtp wrote.
_ID = re.compile(r"[a-z][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)+")


def type_name(cls: type) -> str:
    """The import path of ``cls``: what rmtp up to format 2 saved as its type (now an alias)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class TypeRegistry(Generic[T]):
    """Stable id ↔ class for one kind of saved type (replacement modules, model patches).

    ``aliases`` maps names older folders used (import paths, retired ids) to the current id. A
    class and an id are one-to-one, so saving writes one id per class and loading finds one class
    per id; the lookup is by exact class, so an unregistered subclass is not taken for its parent.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, T] = {}
        self._ids: dict[type, str] = {}
        self._aliases: dict[str, str] = {}
        self._completed = False

    def add(self, cls: T, type_id: str, aliases: Iterable[str] = ()) -> None:
        """Register ``cls`` as ``type_id``; ``aliases`` are the names folders saved it under before."""
        aliases = list(aliases)
        for alias in aliases:
            if not isinstance(alias, str) or not alias:
                raise TypeError(f"{type_name(cls)}: aliases must be non-empty strings, got {alias!r}")
        taken = self._classes.get(type_id)
        if taken is not None and not _redefinition(taken, cls):
            raise PluginError(f"two {self.kind} types are registered as {type_id!r}: {type_name(taken)} and "
                              f"{type_name(cls)}; give one of them another id")
        if type_id in self._aliases:
            raise PluginError(f"{self.kind} type id {type_id!r} of {type_name(cls)} is already an alias of "
                              f"{self._aliases[type_id]!r} ({self._owner(self._aliases[type_id])})")
        for alias in aliases:
            if alias in self._classes and alias != type_id:
                raise PluginError(f"alias {alias!r} of {self.kind} type {type_id!r} ({type_name(cls)}) is the id "
                                  f"of {type_name(self._classes[alias])}")
            if self._aliases.get(alias, type_id) != type_id:
                raise PluginError(f"alias {alias!r} is claimed by two {self.kind} types: {self._aliases[alias]!r} "
                                  f"({self._owner(self._aliases[alias])}) and {type_id!r} ({type_name(cls)})")
        same_class = [old for old, known in self._classes.items() if _redefinition(known, cls) and old != type_id]
        if same_class:
            raise PluginError(f"{type_name(cls)} is registered twice, as {same_class[0]!r} and {type_id!r}; "
                              f"keep one id and list the other in aliases")
        # A redefined class replaces the old one for loading; instances of the old one still save.
        self._classes[type_id] = cls
        self._ids[cls] = type_id
        for alias in aliases:
            self._aliases[alias] = type_id

    def _complete(self) -> None:
        """Have the plugins that import their saved types lazily import them now (once per process:
        hook ``import_saved_types``), before an id is called unknown or the known ones are listed."""
        if self._completed:
            return
        self._completed = True  # first: importing those modules registers into this registry
        from rmtp.plugins import get_plugins

        get_plugins().import_saved_types()

    def _owner(self, type_id: str) -> str:
        cls = self._classes.get(type_id)
        return type_name(cls) if cls is not None else "not registered"

    def id_of(self, cls: type) -> str | None:
        """The id ``cls`` is registered under (``None``: not registered; a subclass is not its parent)."""
        return self._ids.get(cls)

    def resolve(self, name: object) -> T | None:
        """The class a saved ``type`` names: an id, or an alias of one (``None``: unknown)."""
        if not isinstance(name, str):
            return None
        cls = self._lookup(name)
        if cls is None and not self._completed:
            self._complete()
            cls = self._lookup(name)
        return cls

    def _lookup(self, name: str) -> T | None:
        cls = self._classes.get(name)
        if cls is None and name in self._aliases:
            cls = self._classes.get(self._aliases[name])
        return cls

    def ids(self) -> list[str]:
        self._complete()
        return sorted(self._classes)

    def aliases(self) -> dict[str, str]:
        """Old name → id, a copy."""
        self._complete()
        return dict(self._aliases)

    def known(self) -> str:
        return ", ".join(self.ids()) or "none registered"


def _redefinition(old: type, new: type) -> bool:
    """The same class defined again (its module re-imported: ``importlib.reload``, a notebook cell),
    which replaces the old definition instead of being a clash."""
    return old is new or type_name(old) == type_name(new)


def _checked_id(decorator: str, type_id: object) -> str:
    """``type_id`` if it is a well-formed id; a clear TypeError for ``@decorator`` without one."""
    if isinstance(type_id, type):
        raise TypeError(f"@{decorator} needs a stable type id, e.g. @{decorator}(\"my_plugin.my_layer\") above "
                        f"class {type_id.__qualname__} ({type_name(type_id)}): the id is what saved folders "
                        f"record, so that moving the class does not orphan them")
    if not isinstance(type_id, str) or not _ID.fullmatch(type_id):
        raise TypeError(f"@{decorator}: type id {type_id!r} is not of the form family.kind (lower case, digits, "
                        f"'_' or '-'; the family is the plugin's name), e.g. \"my_plugin.my_layer\"")
    return type_id


_MODULES: TypeRegistry[type[nn.Module]] = TypeRegistry("module")


def rebuildable(type_id: str, *, aliases: Iterable[str] = ()) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a replacement module type for saving and loading as ``type_id``.

    ``@rebuildable("my_plugin.my_layer")``; ``aliases`` lists every name saved folders may hold for
    this class from before (an older id, or the import path rmtp up to format 2 wrote).
    """
    type_id = _checked_id("rebuildable", type_id)
    aliases = tuple(aliases)

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if not callable(getattr(cls, "rmtp_config", None)):
            raise TypeError(f"{type_name(cls)} must define rmtp_config() to be rebuildable")
        _MODULES.add(cls, type_id, aliases)
        return cls

    return register


def module_type_id(cls: type) -> str | None:
    """The id replacement module class ``cls`` is saved under (``None``: not ``@rebuildable``)."""
    return _MODULES.id_of(cls)


def is_replacement(module: nn.Module) -> bool:
    """A module a pruner put in place of a layer (``@rebuildable`` classes define ``rmtp_config``)."""
    return callable(getattr(type(module), "rmtp_config", None))


def describe_replacements(model: nn.Module) -> list[dict[str, Any]]:
    """``[{path, type, config}]`` for every registered replacement module (outermost only)."""
    entries: list[dict[str, Any]] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        type_id = _MODULES.id_of(type(module))
        if type_id is None:
            continue
        if any(path.startswith(prefix + ".") for prefix in taken):
            continue  # rebuilt by its parent
        entries.append({"path": path, "type": type_id, "config": module.rmtp_config()})
        taken.append(path)
    return entries


def apply_replacements(model: nn.Module, entries: list[dict[str, Any]], *, source: str) -> None:
    """Put empty replacement modules at the recorded paths (weights are loaded afterwards)."""
    for entry in entries:
        cls = _MODULES.resolve(entry.get("type", ""))
        if cls is None:
            raise CheckpointError(
                f"{source}: layer {entry.get('path')!r} needs module type {entry.get('type')!r}, which no "
                f"loaded plugin provides (known: {_MODULES.known()}); install the plugin that pruned this model"
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


class ModelPatch:
    """Base class of a reversible, saveable change to a model's forward pass.

    Subclasses are registered with :func:`model_patch`, are built from their JSON config
    (``cls(**config)``, which must validate it: on load the config comes from a file), and implement
    :meth:`apply` (raise :class:`~rmtp.errors.RmtpError` for a model the patch cannot handle, leaving
    it untouched) and :meth:`remove` (restore the model exactly as it was before :meth:`apply`).
    A patch must not add parameters or buffers: the state dict of a patched model is that of the
    unpatched one, so weights load the same way with or without it.
    """

    #: Whether the patched model's blocks see other tokens than the unpatched model's (token merging
    #: or dropping): block-wise reconstruction against the dense model is then refused. Unknown
    #: patches are assumed to; a patch that only records structure (spp's head counts) says not.
    changes_tokens: bool = True

    def rmtp_config(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild this patch."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        raise NotImplementedError


_PATCHES: TypeRegistry[type[ModelPatch]] = TypeRegistry("patch")


def model_patch(type_id: str, *, aliases: Iterable[str] = ()) -> Callable[[type[ModelPatch]], type[ModelPatch]]:
    """Class decorator: register a :class:`ModelPatch` subclass as ``type_id``, so saved models can
    re-apply it. ``@model_patch("my_plugin.my_patch")``; ``aliases`` as for :func:`rebuildable`."""
    type_id = _checked_id("model_patch", type_id)
    aliases = tuple(aliases)

    def register(cls: type[ModelPatch]) -> type[ModelPatch]:
        if not (isinstance(cls, type) and issubclass(cls, ModelPatch)):
            raise TypeError(f"{type_name(cls)} must subclass rmtp.contract.saved_types.ModelPatch to be a model patch")
        _PATCHES.add(cls, type_id, aliases)
        return cls

    return register


def patch_type_id(cls: type) -> str | None:
    """The id patch class ``cls`` is saved under (``None``: not ``@model_patch``)."""
    return _PATCHES.id_of(cls)


def type_aliases() -> dict[str, dict[str, str]]:
    """The alias tables loading uses: ``{"module": {old name: id}, "patch": {old name: id}}``."""
    return {"module": _MODULES.aliases(), "patch": _PATCHES.aliases()}


def resolve_type(kind: Literal["module", "patch"], name: str) -> type | None:
    """The class a saved ``type`` of ``kind`` names, by id or by alias (``None``: unknown)."""
    return {"module": _MODULES, "patch": _PATCHES}[kind].resolve(name)


def registered_types() -> dict[str, dict[str, type]]:
    """Every registered type: ``{"module": {id: class}, "patch": {id: class}}``."""
    return {"module": {i: _MODULES.resolve(i) for i in _MODULES.ids()},
            "patch": {i: _PATCHES.resolve(i) for i in _PATCHES.ids()}}


def patches_of(model: nn.Module) -> list[ModelPatch]:
    """The patches applied to ``model`` (via :func:`apply_patch`), oldest first."""
    return list(model.__dict__.get(PATCHES_ATTR, ()))


def apply_patch(model: nn.Module, patch: ModelPatch) -> ModelPatch:
    """Apply ``patch`` to ``model`` and record it there, so saving writes it and loading re-applies it."""
    if _PATCHES.id_of(type(patch)) is None:
        raise TypeError(f"{type_name(type(patch))} is not registered with @rmtp.contract.saved_types.model_patch")
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
    return [{"type": _PATCHES.id_of(type(p)), "config": p.rmtp_config()} for p in patches_of(model)]


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
        cls = _PATCHES.resolve(kind)
        if cls is None:
            raise CheckpointError(
                f"{source}: the model needs patch type {kind!r}, which no loaded plugin provides "
                f"(known: {_PATCHES.known()}); install the plugin that pruned this model"
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
