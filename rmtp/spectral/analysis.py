"""``rmtp analyze-spectrum`` as a library call: open a model from wherever it is, analyse every layer.

:func:`open_model` accepts what the command accepts: ``timm:NAME`` (random init, or timm's
pretrained weights; ``NAME`` may be ``NAME.tag``, ``timm/NAME.tag`` or ``hf-hub:org/name``, which
also stands alone), a ``.safetensors``/``.pth``/``.bin`` state dict (the timm name and kwargs from
options, from a card ``<stem>.json`` beside it, or from timm's ``config.json`` beside it), a
folder in timm's hub layout (``config.json`` + ``model.safetensors``: :mod:`rmtp.sources`), or a
saved rmtp output folder. A state dict with none of these is still analysed, by key
(:func:`rmtp.spectral.layers.analyze_state_dict`).
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

import torch
from torch import nn

from rmtp import sources
from rmtp.architecture import Architecture, ModelSpec
from rmtp.errors import CheckpointError, PluginError, RmtpError
from rmtp.progress import NULL_PROGRESS, Progress
from rmtp.spectral.layers import MIN_DIM, LayerSpectrum, analyze_model, analyze_state_dict
from rmtp.spectral.mp import check_alpha, check_tw_confidence

SCHEMA = "rmtp-spectrum-report/1"
TIMM_PREFIX = "timm:"


@dataclass
class OpenedModel:
    """A model ready for analysis, with the description a report needs; or, for a state dict no
    model is known for (``kind`` ``"state-dict"``), only its tensors (``model``, ``arch``, ``spec`` None)."""

    model: nn.Module | None
    arch: Architecture | None
    spec: ModelSpec | None
    kind: str  # "timm" | "checkpoint" | "folder" | "state-dict"
    notes: list[str] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)


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
    if source.startswith(TIMM_PREFIX) or sources.is_hub_name(source):
        name = (source[len(TIMM_PREFIX):] if source.startswith(TIMM_PREFIX) else source).strip()
        if not name:
            raise PluginError(f"{source!r}: give a timm model name after 'timm:', e.g. timm:vit_base_patch16_224")
        if model_name and model_name != name:
            raise PluginError(f"{source!r} already names the model; drop --model {model_name}")
        name = sources.normalise_name(name)
        adapter = sources.architecture_for(plugins, name, arch)  # an hf-hub: name: its config.json's architecture
        spec = ModelSpec(name=name, arch=adapter.name, kwargs=dict(kwargs or {}), pretrained=pretrained)
        notes = [] if pretrained else ["random init (timm's initialisation): pass --pretrained for trained weights"]
        return OpenedModel(_create(adapter, spec), adapter, spec, "timm", notes)

    path = Path(source)
    if path.is_dir():
        from rmtp.saving import is_saved_model

        hub = None if is_saved_model(path) else sources.hub_folder(path)
        if hub is not None:
            return _open_hub(hub, plugins, model_name=model_name, arch=arch, kwargs=kwargs, pretrained=pretrained)
        return _open_folder(path, model_name=model_name, arch=arch, kwargs=kwargs, pretrained=pretrained)
    return _open_checkpoint(path, plugins, model_name=model_name, arch=arch, kwargs=kwargs, pretrained=pretrained)


def _open_folder(path: Path, *, model_name: str | None, arch: str | None, kwargs: dict[str, Any] | None,
                 pretrained: bool) -> OpenedModel:
    from rmtp.plugins import get_plugins
    from rmtp.saving import META_FILE, is_saved_model, load

    if not is_saved_model(path):
        raise CheckpointError(f"{path}: not an rmtp model folder (no {META_FILE}) nor in timm's hub layout "
                              f"(no {sources.CONFIG_FILE})")
    given = [flag for flag, value in (("--model", model_name), ("--arch", arch), ("--kwargs", kwargs),
                                      ("--pretrained", pretrained)) if value]
    if given:
        raise CheckpointError(f"{path} is an rmtp model folder, which records its own model; drop {', '.join(given)}")
    loaded = load(path)  # CheckpointError when it is not an rmtp folder or does not load
    return OpenedModel(loaded.model, get_plugins().architecture(loaded.arch), loaded.spec, "folder")


def _open_checkpoint(path: Path, plugins: Any, *, model_name: str | None, arch: str | None,
                     kwargs: dict[str, Any] | None, pretrained: bool) -> OpenedModel:
    from rmtp.checkpoint import read_state_dict

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
        hub = sources.hub_folder(path)  # timm's config.json beside the weights
        if hub is not None:
            return _open_hub(hub, plugins, model_name=None, arch=arch, kwargs=kwargs, pretrained=False,
                             state_dict=state_dict)
        if arch or kwargs:
            raise CheckpointError(
                f"{path}: which timm model is this checkpoint? pass --model NAME (and --kwargs if it was built with "
                f"non-default ones), or put a model card {card_file.name} with timm_name and kwargs beside it"
            )
        notes.append(f"no architecture known (no --model, no model card {card_file.name}, no timm "
                     f"{sources.CONFIG_FILE} beside it): layers are named by their state-dict keys; pass --model NAME "
                     f"for the architecture's layers")
        return OpenedModel(None, None, None, "state-dict", notes, state_dict=state_dict)
    merged = {**(card["kwargs"] if card else {}), **(kwargs or {})}
    if card is not None:
        notes.append(f"model from card {card_file}: {name} {json.dumps(merged, sort_keys=True)}"
                     + (" (--kwargs override)" if kwargs else ""))
    adapter = plugins.architecture_for(name, arch or (card or {}).get("arch"))
    return _load(adapter, ModelSpec(name=name, arch=adapter.name, kwargs=merged, checkpoint=path), state_dict, notes)


def _open_hub(hub: sources.HubFolder, plugins: Any, *, model_name: str | None, arch: str | None,
              kwargs: dict[str, Any] | None, pretrained: bool,
              state_dict: dict[str, torch.Tensor] | None = None) -> OpenedModel:
    """A folder in timm's hub layout, or its weights file: the config.json names the model and its kwargs."""
    from rmtp.checkpoint import read_state_dict

    if pretrained:
        raise CheckpointError(f"{hub.folder}: --pretrained fetches timm's weights and a checkpoint brings its own; "
                              f"give one")
    name = hub.config.architecture
    if model_name and sources.normalise_name(model_name).split(".")[0] != name.split(".")[0]:
        raise CheckpointError(f"{hub.folder}: --model {model_name}, but {hub.config.source} says the weights are a "
                              f"{name!r}; drop --model")
    merged = {**hub.config.kwargs, **(kwargs or {})}
    notes = [f"model from {hub.config.source}: {name} {json.dumps(merged, sort_keys=True)}"
             + (" (--kwargs override)" if kwargs else "")]
    adapter = sources.architecture_for(plugins, name, arch)
    if state_dict is None:
        state_dict = read_state_dict(hub.weights)
    return _load(adapter, ModelSpec(name=name, arch=adapter.name, kwargs=merged, checkpoint=hub.weights), state_dict,
                 notes)


def _load(adapter: Architecture, spec: ModelSpec, state_dict: dict[str, torch.Tensor],
          notes: list[str]) -> OpenedModel:
    """``spec``'s model built by ``adapter`` with ``state_dict`` loaded strictly (from ``spec.checkpoint``)."""
    from rmtp.checkpoint import load_state_dict_into

    model = _create(adapter, ModelSpec(name=spec.name, arch=spec.arch, kwargs=dict(spec.kwargs)))
    load_state_dict_into(model, state_dict, source=str(spec.checkpoint))
    return OpenedModel(model.eval(), adapter, spec, "checkpoint", notes)


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
    spec: ModelSpec | None  # None for a state dict analysed by key (kind "state-dict")
    arch: str | None
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
            "model": {**self.spec.to_dict(), "arch": self.arch} if self.spec is not None else
                     {"name": None, "arch": None, "kwargs": {}, "pretrained": False, "checkpoint": self.source},
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
    options: dict[str, Any] = {"split_qkv": split_qkv, "min_dim": min_dim, "alpha": alpha,
                               "tw_confidence": tw_confidence, "progress": progress, "threads": threads}
    if opened.model is None or opened.arch is None:
        assert opened.state_dict is not None
        layers = analyze_state_dict(opened.state_dict, **options)
    else:
        layers = analyze_model(opened.model, opened.arch, **options)
    seconds = time.perf_counter() - start
    settings = {"alpha": alpha, "tw_confidence": tw_confidence, "min_dim": min_dim, "split_qkv": split_qkv}
    return SpectrumReport(source=source, kind=opened.kind, spec=opened.spec,
                          arch=opened.arch.name if opened.arch is not None else None,
                          settings=settings, layers=layers, seconds=seconds, notes=opened.notes)
