"""Saving and loading pruned models as self-describing folders.

A saved model is a folder::

    model.safetensors   the weights (replaced layers included)
    rmtp_model.json     how to rebuild it: timm name + kwargs, architecture, replaced layers,
                        forward-pass patches (token reduction), the dense baseline it came from, and
                        ``files``: every entry rmtp put in the folder (what ``overwrite`` may replace:
                        :mod:`rmtp.storage.overwrite`, docs/output.md)
    recipe.yaml         the resolved recipe that produced it (when it came from a recipe)
    report.json         the run's report (when it came from a recipe)

The folder is written next to its destination under a temporary name and renamed into place,
so an interrupted run never leaves a half-written model where a finished one is expected.

Next to a folder ``NAME`` only rmtp's own bookkeeping appears, never inside it (a lock file and
temporary folders: :mod:`rmtp.storage.output_folder`).

Format versions (``format_version`` in ``rmtp_model.json``):

    1   ``replaced``: ``[{path, type, config}]``, ``type`` the replacement class's import path
        (``rmtp_plugins.svd_mp.lowrank.LowRankLinear``). Still written for a model with no replaced layer and no
        patch: such a folder names no type, so every rmtp reads it.
    2   adds ``patches``: ``[{type, config}]``, forward-pass patches such as token reduction, also
        by import path. An rmtp that could not re-apply them refuses the folder ("saved by a newer
        rmtp") instead of silently loading the unpatched model.
    3   every ``type`` is a stable id registered with its class (``lowrank.linear``,
        ``tokens.reduction``; see :mod:`rmtp.contract.saved_types`), not where the class lives, so modules can
        move without orphaning folders. Written for every model with a replaced layer or a patch,
        so an rmtp from before ids says to upgrade rather than that a plugin is missing.

Reading: every version up to :data:`FORMAT_VERSION` loads. A type is looked up as an id, then in
the alias table of the names older folders used (:func:`rmtp.contract.saved_types.type_aliases`: each import
path versions 1 and 2 wrote maps to its id), whatever the version, so a folder loads as long as
the plugin of each type is installed. A version above :data:`FORMAT_VERSION` is refused with
"saved by a newer rmtp".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from torch import nn

from rmtp import __version__
from rmtp.contract.architecture import Architecture, ModelSpec
from rmtp.contract.saved_types import apply_patches, apply_replacements, describe_patches, describe_replacements
from rmtp.errors import CheckpointError, RmtpError
from rmtp.storage.output_folder import hold, make_temp_dir, move_into_place, remove_entry
from rmtp.storage.overwrite import META_FILE, RECIPE_FILE, REPORT_FILE, WEIGHTS_FILE, check_replaceable
from rmtp.storage.weights import load_state_dict_into, read_state_dict, write_safetensors_atomic

if TYPE_CHECKING:
    from rmtp.plugins import Plugins

FORMAT = "rmtp-model"
#: Newest format this rmtp reads and writes (the versions are in the module docstring): 3, types
#: named by stable id. A model that names no type (no replaced layer, no patch) is written as 1,
#: which every rmtp reads.
FORMAT_VERSION = 3
_FORMAT_VERSION_WITHOUT_TYPES = 1
# WEIGHTS_FILE, META_FILE, RECIPE_FILE, REPORT_FILE: the files of a saved folder, named in
# rmtp.storage.overwrite (torch-free, for `rmtp validate`) and imported above; step outputs are listed in
# rmtp_model.json's ``files``.


@dataclass
class LoadedModel:
    """A model read back from an rmtp folder, with what is known about where it came from."""

    model: nn.Module
    spec: ModelSpec
    arch: str
    baseline: ModelSpec | None
    meta: dict[str, Any]


def architecture_name(arch: Architecture | str) -> str:
    """The registered name of ``arch``, given as a plugin or by name (``LoadedModel.arch`` is a name,
    so ``save(loaded.model, out, spec=loaded.spec, arch=loaded.arch)`` works); a name no installed
    plugin provides is a :class:`~rmtp.errors.PluginError`, not a folder that cannot be loaded."""
    if isinstance(arch, Architecture):
        return arch.name
    from rmtp.plugins import get_plugins

    return get_plugins().architecture(arch).name


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def output_lock(out_dir: str | Path, *, overwrite: bool = True) -> AbstractContextManager[Path]:
    """Hold ``out_dir`` for this process (:func:`rmtp.storage.output_folder.hold`); a complete rmtp folder a
    killed writer left aside (``.NAME.<hex>.old``) is put back if ``out_dir`` itself is gone."""
    return hold(out_dir, overwrite=overwrite, restorable=is_saved_model)


#: Constructor kwargs :func:`infer_spec` reads back from a timm model in hand (attribute path), the
#: ones a user changes on a pretrained architecture (a new head, another input size or channels).
#: The first path a family has wins (ViT, ResNet, ConvNeXt).
_INFERABLE_KWARGS = {"num_classes": ("num_classes",), "img_size": ("patch_embed.img_size",),
                     "in_chans": ("patch_embed.proj.in_channels", "conv1.in_channels", "stem.0.in_channels")}


def _attribute(model: nn.Module, paths: Sequence[str]) -> Any:
    """The first of the dotted attribute ``paths`` ``model`` has (tuples as lists), else None."""
    for dotted in paths:
        value: Any = model
        for part in dotted.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        if value is not None:
            return list(value) if isinstance(value, tuple) else value
    return None


def _structure_mismatch(model: nn.Module, spec: ModelSpec, arch: Architecture) -> str | None:
    """Why ``spec`` (with ``model``'s replaced layers) would not rebuild ``model``'s parameters and
    buffers, name by name and shape by shape (``None``: it would). Built on the meta device."""
    import torch

    try:
        with torch.device("meta"):
            rebuilt = arch.create(spec)
            apply_replacements(rebuilt, describe_replacements(model), source="the model in hand")
    except Exception as exc:  # noqa: BLE001 - any failure to build is a mismatch, reported in one line
        return f"building it failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}

    def shape(shapes: dict[str, tuple[int, ...]], key: str) -> str:
        return str(list(shapes[key])) if key in shapes else "no such entry"

    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            return f"{key}: the model has {shape(want, key)}, the rebuilt one {shape(got, key)}"
    return None


def infer_spec(model: nn.Module, arch: Architecture) -> ModelSpec:
    """The :class:`ModelSpec` that rebuilds a timm ``model`` in hand: its timm name (and pretrained
    tag) from ``pretrained_cfg``, and the constructor kwargs a user typically changes (``num_classes``,
    ``img_size``, ``in_chans``) read back from the model where they differ from timm's defaults;
    checked by rebuilding the structure on the meta device. Anything else (a custom depth, width)
    cannot be read back: refused in one line asking for ``spec=``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not name:
        raise RmtpError(f"rmtp.save: cannot tell which timm model a {type(model).__qualname__} was built as (it "
                        f"carries no pretrained_cfg); pass spec=rmtp.ModelSpec(name=..., kwargs=...)")
    tag = cfg.get("tag")
    name = f"{name}.{tag}" if tag else name
    import torch

    with torch.device("meta"):
        default = arch.create(ModelSpec(name=name))
    kwargs = {}
    for key, path in _INFERABLE_KWARGS.items():
        value, reference = _attribute(model, path), _attribute(default, path)
        if value is not None and value != reference:
            kwargs[key] = value
    spec = ModelSpec(name=name, kwargs=kwargs)
    problem = _structure_mismatch(model, spec, arch)
    if problem:
        raise RmtpError(f"rmtp.save: this model is not {name} as timm builds it with kwargs {kwargs} ({problem}); "
                        f"pass spec=rmtp.ModelSpec(name={name!r}, kwargs={{...}}) with the kwargs it was built with")
    return spec


def save(model: nn.Module, out_dir: str | Path, *, spec: ModelSpec | None = None,
         arch: Architecture | str | None = None, baseline: ModelSpec | None = None,
         recipe: dict[str, Any] | None = None, report: dict[str, Any] | None = None, save_weights: bool = True,
         overwrite: bool = False, extras: Sequence[str] = (),
         add_extras: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (and optionally its recipe and report) to ``out_dir`` atomically.

    ``spec`` (the unpruned timm model the folder is rebuilt from) and ``arch`` (the architecture
    plugin or its name) may be left out for a timm model in hand: the architecture is inferred as
    ``rmtp.prune`` infers it, the spec by :func:`infer_spec` (checked against the model's structure).

    Holds :func:`output_lock` while it writes (a run that already holds it keeps it), so two
    processes saving to one folder never interleave: the second gets an :class:`RmtpError`.
    ``overwrite`` replaces only an rmtp output folder with nothing foreign in it and not holding
    the current directory (:mod:`rmtp.storage.overwrite`); anything else is refused and left as it was.
    ``extras``: the entries the caller adds to the folder (a run's step outputs), recorded in
    ``rmtp_model.json`` so that a later overwrite knows them as rmtp's own; ``add_extras(folder)``
    writes them into the folder before it goes into place, so they appear with the model in one
    rename.
    """
    out_dir = Path(out_dir)
    if arch is None:
        from rmtp.api import infer_architecture

        arch = infer_architecture(model)
    if spec is None:
        if isinstance(arch, str):
            from rmtp.plugins import get_plugins

            arch = get_plugins().architecture(arch)
        spec = infer_spec(model, arch)
    with output_lock(out_dir, overwrite=overwrite):
        if os.path.lexists(out_dir) and not out_dir.is_dir():
            raise RmtpError(f"output folder {out_dir} is a file, not a folder")
        check_replaceable(out_dir)
        staging = make_temp_dir(out_dir, "partial")
        try:
            _write_folder(staging, model, spec=spec, arch=arch, baseline=baseline, recipe=recipe, report=report,
                          save_weights=save_weights, extras=extras)
            if add_extras is not None:
                add_extras(staging)
            move_into_place(staging, out_dir)
        except BaseException:
            remove_entry(staging)
            raise
    return out_dir


def _write_folder(folder: Path, model: nn.Module, *, spec: ModelSpec, arch: Architecture | str,
                  baseline: ModelSpec | None, recipe: dict[str, Any] | None, report: dict[str, Any] | None,
                  save_weights: bool, extras: Sequence[str]) -> None:
    """Fill the staging ``folder``; nothing here is visible under the output name until it is whole."""
    replaced, patches = describe_replacements(model), describe_patches(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if replaced or patches else _FORMAT_VERSION_WITHOUT_TYPES,
        "rmtp_version": __version__,
        "arch": architecture_name(arch),
        "model": {**spec.to_dict(), "checkpoint": None, "pretrained": False},
        "replaced": replaced,
        "patches": patches,
        "baseline": baseline.to_dict() if baseline else None,
        "has_weights": save_weights,
        "files": [name for name, written in ((WEIGHTS_FILE, save_weights), (META_FILE, True),
                                              (RECIPE_FILE, recipe is not None), (REPORT_FILE, report is not None))
                  if written] + list(extras),
    }
    if save_weights:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        write_safetensors_atomic(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if recipe is not None:
        (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    if report is not None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def read_saved_recipe(folder: Path) -> dict[str, Any] | None:
    """The resolved recipe saved in ``folder`` (``recipe.yaml``), or None when it has none.

    Read as untrusted input (safe loader, size cap: :mod:`rmtp.storage.safe_yaml`), since a folder may come
    from anyone; anything but a mapping is one-line :class:`RmtpError`.
    """
    from rmtp.storage.safe_yaml import read_yaml_file

    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    recipe = read_yaml_file(path)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("data") or {}, dict):
        raise RmtpError(f"{path}: not a resolved recipe (no data mapping)")
    return recipe


def read_meta(path: Path) -> dict[str, Any]:
    """``rmtp_model.json`` of a saved folder, checked; whatever ``path`` is, a one-line CheckpointError.

    A checkpoint file given where a folder is expected (``rmtp.load("model.safetensors")``) would
    otherwise surface as the OS's NotADirectoryError, naming a path that never existed.
    """
    _check_is_folder(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an rmtp model folder (no {META_FILE})") from None
    except OSError as exc:
        raise CheckpointError(f"{path / META_FILE}: cannot read it: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META_FILE}: not an rmtp model description (format != {FORMAT!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path / META_FILE}: format_version must be a whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: saved by a newer rmtp (format {version} > {FORMAT_VERSION}); upgrade rmtp"
        )
    return meta


def _check_is_folder(path: Path) -> None:
    """Refuse a path that exists but is not a folder, saying it is a file (a missing one is "no
    rmtp_model.json" below)."""
    if path.is_dir() or not os.path.lexists(path):
        return
    raise CheckpointError(f"{path}: a file, not an rmtp output folder (a folder with {META_FILE})")


def _spec_from(data: dict[str, Any] | None) -> ModelSpec | None:
    if data is None:
        return None
    checkpoint = data.get("checkpoint")
    return ModelSpec(name=data["name"], arch=data.get("arch"), kwargs=dict(data.get("kwargs") or {}),
                     pretrained=bool(data.get("pretrained")), checkpoint=Path(checkpoint) if checkpoint else None)


def read_spec(path: str | Path) -> ModelSpec:
    """The timm model a saved folder was built on (name, kwargs, and its architecture plugin's name),
    read from ``rmtp_model.json`` alone: what a recipe naming the folder without ``model.name`` uses."""
    path = Path(path)
    meta = read_meta(path)
    try:
        spec = _spec_from(meta["model"])
        return ModelSpec(name=spec.name, arch=meta.get("arch") or spec.arch, kwargs=dict(spec.kwargs))
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: missing or malformed field {exc}") from None


def rebuild_structure(path: str | Path, *, plugins: Plugins) -> tuple[nn.Module, Architecture]:
    """The saved model's modules (base timm model with its replaced layers), without reading its
    weights or applying its patches: what ``rmtp validate`` checks a recipe against, built under
    ``torch.device("meta")`` so nothing is allocated."""
    path = Path(path)
    meta, spec, arch = _describe(path, plugins)
    return _structure(path, meta, spec, arch), arch


def _describe(path: Path, plugins: Plugins) -> tuple[dict[str, Any], ModelSpec, Architecture]:
    meta = read_meta(path)
    try:
        spec = _spec_from(meta["model"])
        arch = plugins.architecture(meta["arch"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: missing or malformed field {exc}") from None
    return meta, spec, arch


def _structure(path: Path, meta: dict[str, Any], spec: ModelSpec, arch: Architecture) -> nn.Module:
    model = arch.create(spec)
    apply_replacements(model, meta.get("replaced") or [], source=str(path))
    return model


def load(path: str | Path, *, plugins: Plugins | None = None) -> LoadedModel:
    """Rebuild a saved model: base timm model, replaced layers, the saved weights (strict), then
    the recorded forward-pass patches. ``plugins`` provide the architecture (default: the
    process-wide ones, :func:`rmtp.get_plugins`)."""
    if plugins is None:
        from rmtp.plugins import get_plugins

        plugins = get_plugins()
    path = Path(path)
    meta, spec, arch = _describe(path, plugins)
    if not meta.get("has_weights", True):
        raise CheckpointError(f"{path}: saved without weights (output.save_model was false)")
    model = _structure(path, meta, spec, arch)
    load_state_dict_into(model, read_state_dict(path / WEIGHTS_FILE), source=str(path / WEIGHTS_FILE))
    apply_patches(model, meta.get("patches") or [], source=str(path))
    return LoadedModel(model=model.eval(), spec=spec, arch=arch.name, baseline=_spec_from(meta.get("baseline")),
                       meta=meta)
