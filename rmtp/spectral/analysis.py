"""``rmtp analyze-spectrum`` as a library call: open a model from wherever it is, analyse every layer.

:func:`open_model` accepts what the command accepts: ``timm:NAME`` (random init, or timm's
pretrained weights), a ``.safetensors``/``.pth`` state dict (the timm name and kwargs from
options or from a card ``<stem>.json`` beside it), or a saved rmtp output folder.
:func:`analyze` opens it, runs :func:`rmtp.spectral.layers.analyze_model` and returns a
:class:`SpectrumReport`, the one object the table, JSON, CSV and plots are all rendered from.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from rmtp.architecture import Architecture, ModelSpec
from rmtp.errors import CheckpointError, PluginError, RmtpError
from rmtp.progress import NULL_PROGRESS, Progress
from rmtp.spectral.layers import MIN_DIM, LayerSpectrum, analyze_model
from rmtp.spectral.mp import check_alpha, check_tw_confidence

SCHEMA = "rmtp-spectrum-report/1"
TIMM_PREFIX = "timm:"


@dataclass
class OpenedModel:
    """A model ready for analysis, with the description a report needs."""

    model: nn.Module
    arch: Architecture
    spec: ModelSpec
    kind: str  # "timm" | "checkpoint" | "folder"
    notes: list[str] = field(default_factory=list)


def card_path(checkpoint: Path) -> Path:
    """Where a checkpoint's model card lives: ``<stem>.json`` beside it (``models/digits_vit.json``)."""
    return checkpoint.with_suffix(".json")


def read_card(path: Path) -> dict[str, Any]:
    """A model card's ``timm_name`` (str) and ``kwargs`` (dict), or CheckpointError saying what is wrong."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"model card {path}: not readable JSON: {exc}") from None
    if not isinstance(card, dict) or not isinstance(card.get("timm_name"), str) or not card["timm_name"]:
        raise CheckpointError(f"model card {path}: needs a string field 'timm_name' (the timm model name)")
    kwargs = card.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"model card {path}: 'kwargs' must be an object of timm.create_model keyword arguments")
    return {"timm_name": card["timm_name"], "kwargs": kwargs, "arch": card.get("arch")}


def open_model(
    source: str,
    *,
    model_name: str | None = None,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
) -> OpenedModel:
    """Build the model ``source`` names (see the module docstring); every failure is an RmtpError."""
    from rmtp.plugins import get_plugins

    plugins = get_plugins()
    if source.startswith(TIMM_PREFIX):
        name = source[len(TIMM_PREFIX):].strip()
        if not name:
            raise PluginError(f"{source!r}: give a timm model name after 'timm:', e.g. timm:vit_base_patch16_224")
        if model_name and model_name != name:
            raise PluginError(f"{source!r} already names the model; drop --model {model_name}")
        adapter = plugins.architecture_for(name, arch)
        spec = ModelSpec(name=name, arch=adapter.name, kwargs=dict(kwargs or {}), pretrained=pretrained)
        notes = [] if pretrained else ["random init (timm's initialisation): pass --pretrained for trained weights"]
        return OpenedModel(_create(adapter, spec), adapter, spec, "timm", notes)

    path = Path(source)
    if path.is_dir():
        return _open_folder(path, model_name=model_name, arch=arch, kwargs=kwargs, pretrained=pretrained)
    return _open_checkpoint(path, plugins, model_name=model_name, arch=arch, kwargs=kwargs, pretrained=pretrained)


def _open_folder(path: Path, *, model_name: str | None, arch: str | None, kwargs: dict[str, Any] | None,
                 pretrained: bool) -> OpenedModel:
    from rmtp.plugins import get_plugins
    from rmtp.saving import load

    given = [flag for flag, value in (("--model", model_name), ("--arch", arch), ("--kwargs", kwargs),
                                      ("--pretrained", pretrained)) if value]
    if given:
        raise CheckpointError(f"{path} is an rmtp model folder, which records its own model; drop {', '.join(given)}")
    loaded = load(path)  # CheckpointError when it is not an rmtp folder or does not load
    return OpenedModel(loaded.model, get_plugins().architecture(loaded.arch), loaded.spec, "folder")


def _open_checkpoint(path: Path, plugins: Any, *, model_name: str | None, arch: str | None,
                     kwargs: dict[str, Any] | None, pretrained: bool) -> OpenedModel:
    from rmtp.checkpoint import load_state_dict_into, read_state_dict

    if pretrained:
        raise CheckpointError(f"{path}: --pretrained fetches timm's weights and a checkpoint brings its own; give one")
    state_dict = read_state_dict(path)  # first: a missing or corrupt file is the error to report
    notes: list[str] = []
    card_file = card_path(path)
    card = read_card(card_file) if card_file.is_file() and card_file != path else None
    if card is not None and model_name and model_name != card["timm_name"]:
        notes.append(f"ignored model card {card_file} (it names {card['timm_name']}, --model names {model_name})")
        card = None
    name = model_name or (card["timm_name"] if card else None)
    if not name:
        raise CheckpointError(
            f"{path}: which timm model is this checkpoint? pass --model NAME (and --kwargs if it was built with "
            f"non-default ones), or put a model card {card_file.name} with timm_name and kwargs beside it"
        )
    merged = {**(card["kwargs"] if card else {}), **(kwargs or {})}
    if card is not None:
        notes.append(f"model from card {card_file}: {name} {json.dumps(merged, sort_keys=True)}"
                     + (" (--kwargs override)" if kwargs else ""))
    adapter = plugins.architecture_for(name, arch or (card or {}).get("arch"))
    spec = ModelSpec(name=name, arch=adapter.name, kwargs=merged)
    model = _create(adapter, spec)
    load_state_dict_into(model, state_dict, source=str(path))
    return OpenedModel(model.eval(), adapter, ModelSpec(name=name, arch=adapter.name, kwargs=merged, checkpoint=path),
                       "checkpoint", notes)


def _create(adapter: Architecture, spec: ModelSpec) -> nn.Module:
    try:
        return adapter.create(spec)
    except RmtpError:
        raise
    except (ValueError, AssertionError, RuntimeError, KeyError) as exc:  # timm refusing a kwargs combination
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        raise PluginError(f"timm could not build {spec.name!r} with kwargs {json.dumps(spec.kwargs)}: {text}") from None


@dataclass
class SpectrumReport:
    """Every layer's spectrum of one model, with where it came from and the settings used."""

    source: str
    kind: str
    spec: ModelSpec
    arch: str
    settings: dict[str, Any]
    layers: list[LayerSpectrum]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def analysed(self) -> list[LayerSpectrum]:
        return [layer for layer in self.layers if layer.fit is not None]

    @property
    def skipped(self) -> list[LayerSpectrum]:
        return [layer for layer in self.layers if layer.fit is None]

    def summary(self) -> dict[str, Any]:
        analysed = self.analysed
        params = sum(layer.params for layer in analysed)
        kept = sum(layer.params_kept_by_split for layer in analysed)
        fractions = [layer.fit.rank_fraction for layer in analysed if layer.fit is not None]
        return {
            "matrices": len(self.layers),
            "analysed": len(analysed),
            "skipped": len(self.skipped),
            "params_analysed": params,
            "params_kept_by_split": kept,
            "kept_fraction": kept / params if params else None,
            "signal_rank": sum(layer.fit.rank for layer in analysed if layer.fit is not None),
            "rank_fraction_median": statistics.median(fractions) if fractions else None,
            "rank_fraction_max": max(fractions) if fractions else None,
            "not_mp": [layer.name for layer in analysed if layer.fit is not None and not layer.fit.bulk_is_mp],
        }

    def to_dict(self) -> dict[str, Any]:
        import torch

        from rmtp import __version__

        return {
            "schema": SCHEMA,
            "source": self.source,
            "kind": self.kind,
            "model": {**self.spec.to_dict(), "arch": self.arch},
            "settings": dict(self.settings),
            "summary": self.summary(),
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": list(self.notes),
            "seconds": self.seconds,
            "versions": {"rmtp": __version__, "torch": torch.__version__},
        }


def check_settings(*, alpha: float, tw_confidence: float | None, min_dim: int) -> None:
    """Refuse bad settings before any model is built (RmtpError: one line at the CLI)."""
    try:
        check_alpha(alpha)
        if tw_confidence is not None:
            check_tw_confidence(tw_confidence)
    except ValueError as exc:
        raise RmtpError(str(exc)) from None
    if min_dim < 1:
        raise RmtpError(f"min_dim must be at least 1, got {min_dim}")


def analyze(
    source: str,
    *,
    model_name: str | None = None,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    split_qkv: bool = True,
    min_dim: int = MIN_DIM,
    alpha: float = 0.25,
    tw_confidence: float | None = None,
    progress: Progress = NULL_PROGRESS,
    threads: int | None = None,
) -> SpectrumReport:
    """Open ``source`` (:func:`open_model`) and fit the MP law to each of its layers."""
    check_settings(alpha=alpha, tw_confidence=tw_confidence, min_dim=min_dim)
    opened = open_model(source, model_name=model_name, arch=arch, kwargs=kwargs, pretrained=pretrained)
    start = time.perf_counter()
    layers = analyze_model(opened.model, opened.arch, split_qkv=split_qkv, min_dim=min_dim, alpha=alpha,
                           tw_confidence=tw_confidence, progress=progress, threads=threads)
    seconds = time.perf_counter() - start
    settings = {"alpha": alpha, "tw_confidence": tw_confidence, "min_dim": min_dim, "split_qkv": split_qkv}
    return SpectrumReport(source=source, kind=opened.kind, spec=opened.spec, arch=opened.arch.name,
                          settings=settings, layers=layers, seconds=seconds, notes=opened.notes)
