"""Saving and loading pruned models as self-describing folders.

A saved model is a folder::

    model.safetensors   the weights (replaced layers included)
    rmtp_model.json     how to rebuild it: timm name + kwargs, architecture, replaced layers,
                        forward-pass patches (token reduction), and the dense baseline it came from
    recipe.yaml         the resolved recipe that produced it (when it came from a recipe)
    report.json         the run's report (when it came from a recipe)

The folder is written next to its destination under a temporary name and renamed into place,
so an interrupted run never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from rmtp import __version__
from rmtp.architecture import Architecture, ModelSpec
from rmtp.checkpoint import load_state_dict_into, read_state_dict, write_safetensors_atomic
from rmtp.errors import CheckpointError, RmtpError
from rmtp.modules import apply_patches, apply_replacements, describe_patches, describe_replacements

FORMAT = "rmtp-model"
#: Newest format this rmtp reads and writes. Version 2 adds ``patches`` (forward-pass patches such
#: as token reduction). A model without patches is still written as version 1, which every rmtp
#: reads; one with patches is version 2, which an rmtp that could not re-apply them refuses with
#: "saved by a newer rmtp" instead of silently loading the unpatched model.
FORMAT_VERSION = 2
_FORMAT_VERSION_WITHOUT_PATCHES = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "rmtp_model.json"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"


@dataclass
class LoadedModel:
    """A model read back from an rmtp folder, with what is known about where it came from."""

    model: nn.Module
    spec: ModelSpec
    arch: str
    baseline: ModelSpec | None
    meta: dict[str, Any]


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def save(model: nn.Module, out_dir: str | Path, *, spec: ModelSpec, arch: Architecture,
         baseline: ModelSpec | None = None, recipe: dict[str, Any] | None = None,
         report: dict[str, Any] | None = None, save_weights: bool = True,
         overwrite: bool = False) -> Path:
    """Write ``model`` (and optionally its recipe and report) to ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise RmtpError(f"output folder {out_dir} already exists (pass overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        patches = describe_patches(model)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if patches else _FORMAT_VERSION_WITHOUT_PATCHES,
            "rmtp_version": __version__,
            "arch": arch.name,
            "model": {**spec.to_dict(), "checkpoint": None, "pretrained": False},
            "replaced": describe_replacements(model),
            "patches": patches,
            "baseline": baseline.to_dict() if baseline else None,
            "has_weights": save_weights,
        }
        if save_weights:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            write_safetensors_atomic(state, staging / WEIGHTS_FILE, metadata={"format": FORMAT})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if recipe is not None:
            (staging / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        if report is not None:
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing folder is swapped out, then removed."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, retired)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(retired, out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an rmtp model folder (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META_FILE}: not an rmtp model description (format != {FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: saved by a newer rmtp (format {meta['format_version']} > {FORMAT_VERSION}); upgrade rmtp"
        )
    return meta


def _spec_from(data: dict[str, Any] | None) -> ModelSpec | None:
    if data is None:
        return None
    checkpoint = data.get("checkpoint")
    return ModelSpec(name=data["name"], arch=data.get("arch"), kwargs=dict(data.get("kwargs") or {}),
                     pretrained=bool(data.get("pretrained")), checkpoint=Path(checkpoint) if checkpoint else None)


def load(path: str | Path) -> LoadedModel:
    """Rebuild a saved model: base timm model, replaced layers, the saved weights (strict), then
    the recorded forward-pass patches."""
    from rmtp.plugins import get_plugins

    path = Path(path)
    meta = read_meta(path)
    try:
        spec = _spec_from(meta["model"])
        arch = get_plugins().architecture(meta["arch"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: missing or malformed field {exc}") from None
    if not meta.get("has_weights", True):
        raise CheckpointError(f"{path}: saved without weights (output.save_model was false)")
    model = arch.create(spec)
    apply_replacements(model, meta.get("replaced") or [], source=str(path))
    load_state_dict_into(model, read_state_dict(path / WEIGHTS_FILE), source=str(path / WEIGHTS_FILE))
    apply_patches(model, meta.get("patches") or [], source=str(path))
    return LoadedModel(model=model.eval(), spec=spec, arch=arch.name, baseline=_spec_from(meta.get("baseline")),
                       meta=meta)
