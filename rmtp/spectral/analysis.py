"""``rmtp analyze-spectrum`` as a library call: open a model from wherever it is, analyse every layer.

:func:`open_model` accepts what the command accepts: ``timm:NAME`` (random init, or timm's
pretrained weights; ``NAME`` may be ``NAME.tag``, ``timm/NAME.tag`` or ``hf-hub:org/name``, which
also stands alone), a ``.safetensors``/``.pth``/``.bin`` state dict (the timm name and kwargs from
options, from a card ``<stem>.json`` beside it, or from timm's ``config.json`` beside it), a
folder in timm's hub layout (``config.json`` + ``model.safetensors``: :mod:`rmtp.sources`), or a
saved rmtp output folder. A state dict with none of these is still analysed, by key
(:func:`rmtp.spectral.layers.analyze_state_dict`). Which of these ``source`` is, and what a card or
config says, is :func:`rmtp.sources.resolve_source`'s; this module words its errors in the
command's terms (``--model``, ``--pretrained``).
:func:`analyze` opens it, runs :func:`rmtp.spectral.layers.analyze_model` and returns a
:class:`SpectrumReport`, the one object the table, JSON, CSV and plots are all rendered from.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtp import sources
from rmtp.contract.architecture import Architecture, ModelSpec
from rmtp.errors import CheckpointError, PluginError, RmtpError
from rmtp.run.progress import NULL_PROGRESS, Progress
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
    """Where a checkpoint's model card lives: ``<stem>.json`` beside it (:func:`rmtp.sources.card_path`)."""
    return sources.card_path(checkpoint)


def open_model(
    source: str,
    *,
    model_name: str | None = None,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
) -> OpenedModel:
    """Build the model ``source`` names (see the module docstring; where it comes from is
    :func:`rmtp.sources.resolve_source`'s to say); every failure is an RmtpError."""
    from rmtp.plugins import get_plugins
    from rmtp.storage.saving import META_FILE

    plugins = get_plugins()
    try:
        resolved = sources.resolve_source(source, model_name, kwargs=kwargs, arch=arch, pretrained=pretrained)
    except sources.MissingName:
        raise PluginError(f"{source!r}: give a timm model name after 'timm:', e.g. timm:vit_base_patch16_224") from None
    except sources.SourceNotFound as exc:
        raise CheckpointError(f"checkpoint {exc.path}: does not exist; give a weights file (.safetensors, .pth, .pt, "
                              f".bin), an rmtp output folder, a folder in timm's hub layout or timm:NAME") from None
    except sources.NotASource as exc:
        raise CheckpointError(f"{exc.path}: not an rmtp model folder (no {META_FILE}) nor in timm's hub layout "
                              f"(no {sources.CONFIG_FILE})") from None
    except sources.PretrainedAndWeights as exc:
        raise CheckpointError(f"{exc.path}: --pretrained fetches timm's weights and a checkpoint brings its own; "
                              f"give one") from None
    except sources.NameConflict as exc:
        raise CheckpointError(f"{exc.hub.folder}: --model {model_name}, but {exc.hub.config.source} says the weights "
                              f"are a {exc.hub.config.architecture!r}; drop --model") from None

    if isinstance(resolved, sources.TimmName):
        if model_name and model_name != resolved.given_name:
            raise PluginError(f"{source!r} already names the model; drop --model {model_name}")
        notes = [] if pretrained else ["random init (timm's initialisation): pass --pretrained for trained weights"]
        return _open(resolved, plugins, "timm", notes)
    if isinstance(resolved, sources.SavedFolder):
        given = [flag for flag, value in (("--model", model_name), ("--arch", arch), ("--kwargs", kwargs),
                                          ("--pretrained", pretrained)) if value]
        if given:
            raise CheckpointError(f"{resolved.path} is an rmtp model folder, which records its own model; drop "
                                  f"{', '.join(given)}")
        built = resolved.build(plugins)
        return OpenedModel(built.model, built.arch, built.spec, "folder")
    spec = resolved.spec
    if isinstance(resolved, sources.HubLayout):
        assert spec is not None and resolved.hub is not None
        notes = [f"model from {resolved.hub.config.source}: {spec.name} {json.dumps(spec.kwargs, sort_keys=True)}"
                 + (" (--kwargs override)" if kwargs else "")]
        return _open(resolved, plugins, "checkpoint", notes)
    assert isinstance(resolved, sources.WeightsFile)
    path, notes = resolved.path, []
    if spec is None:
        state_dict = resolved.state_dict()  # first: a missing or corrupt file is the error to report
        card_file = card_path(path)
        if arch or kwargs:
            raise CheckpointError(
                f"{path}: which timm model is this checkpoint? pass --model NAME (and --kwargs if it was built with "
                f"non-default ones), or put a model card {card_file.name} with timm_name and kwargs beside it"
            )
        notes.append(f"no architecture known (no --model, no model card {card_file.name}, no timm "
                     f"{sources.CONFIG_FILE} beside it): layers are named by their state-dict keys; pass --model NAME "
                     f"for the architecture's layers")
        return OpenedModel(None, None, None, "state-dict", notes, state_dict=state_dict)
    if resolved.ignored_card is not None:
        ignored = resolved.ignored_card
        notes.append(f"ignored model card {ignored.path} (it names {ignored.timm_name}, --model names {model_name})")
    if resolved.card is not None:
        notes.append(f"model from card {resolved.card.path}: {spec.name} {json.dumps(spec.kwargs, sort_keys=True)}"
                     + (" (--kwargs override)" if kwargs else ""))
    return _open(resolved, plugins, "checkpoint", notes)


def _open(source: sources.ModelSource, plugins: Any, kind: str, notes: list[str]) -> OpenedModel:
    """``source``'s model built by its architecture plugin (a checkpoint's weights loaded strictly);
    its spec names the plugin."""
    adapter = source.architecture(plugins)
    spec = dataclasses.replace(source.spec, arch=adapter.name)
    built = source.build(plugins, create=lambda named: _create(adapter, named))
    return OpenedModel(built.model, adapter, spec, kind, notes)


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
