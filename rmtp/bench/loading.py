"""The models ``rmtp bench`` compares, built from what the command line names.

A source is an rmtp output folder (loaded as saved; alone, its recorded dense baseline is rebuilt
and put first), a folder in timm's hub layout (``config.json`` + ``model.safetensors``, see
:mod:`rmtp.sources`), a checkpoint file described by ``--model``/``--kwargs``, by a card
``<stem>.json`` next to it or by timm's ``config.json`` beside it, or ``timm:NAME`` (random init;
``NAME`` may be ``hf-hub:org/name``, whose config.json timm reads from the hub or its local cache).
Each becomes a :class:`Candidate`, with the val data its origin names (a folder's recipe, a card's
``data``) for ``--eval``. Which of these a text is, and the card and data reading, are
:func:`rmtp.sources.resolve_source`'s; this module words the errors and builds any timm model,
whether or not an architecture plugin covers it (the architecture is only reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from rmtp import sources as model_sources
from rmtp.bench.schema import BenchError, EvalData
from rmtp.contract.architecture import ModelSpec, timm_name_hint
from rmtp.errors import RmtpError

__all__ = ["TIMM_PREFIX", "Candidate", "load_candidates"]

TIMM_PREFIX = "timm:"


@dataclass
class Candidate:
    """One model to benchmark, already built (on the CPU in fp32 unless the caller chose otherwise).

    :func:`~rmtp.bench.benchmark` moves ``model`` to the device and dtype in place and sets eval mode.
    """

    label: str
    model: nn.Module
    #: What was given on the command line, or where the model came from.
    source: str = ""
    #: ``folder`` (rmtp output), ``baseline`` (a folder's dense model), ``checkpoint``, ``timm``, ``module``.
    kind: str = "module"
    timm_name: str | None = None
    arch: str | None = None
    #: Per-sample input shape (C, H, W); default: the images of its eval data (a folder's recipe, a
    #: card), else what the model says (timm config, patch embed).
    input_shape: tuple[int, ...] | None = None
    #: The val data this model's origin names (a folder's recipe, a checkpoint card), if any.
    eval_data: EvalData | None = None
    #: An rmtp folder's record of the dense model it was pruned from.
    baseline: ModelSpec | None = None
    #: Remarks carried into the report (e.g. a baseline rebuilt with fresh random weights).
    notes: list[str] = field(default_factory=list)


def load_candidates(sources: Sequence[str], *, model_name: str | None = None,
                    model_kwargs: dict[str, Any] | None = None) -> list[Candidate]:
    """Build the models ``sources`` name, in order; one rmtp folder alone gets its dense baseline first.

    A source is an rmtp output folder, a folder in timm's hub layout, a checkpoint file
    (``.safetensors``/``.pth``/``.pt``/``.bin``) described by ``model_name`` + ``model_kwargs``, by a
    card ``<stem>.json`` next to it (keys ``timm_name``, ``kwargs``, optionally ``data``) or by timm's
    ``config.json`` beside it, or ``timm:NAME`` / ``hf-hub:org/name`` (random init, ``model_kwargs``
    passed to ``timm.create_model``).
    """
    if not sources:
        raise BenchError("give at least one model: an rmtp output folder, a checkpoint file or timm:NAME")
    kwargs = dict(model_kwargs or {})
    candidates: list[Candidate] = []
    for text in sources:
        candidates.append(_load_source(str(text), model_name, kwargs))
    if len(candidates) == 1 and candidates[0].kind == "folder":
        candidates.insert(0, _folder_baseline(candidates[0]))
    _unique_labels(candidates)
    return candidates


def _load_source(text: str, model_name: str | None, kwargs: dict[str, Any]) -> Candidate:
    """The candidate ``text`` names; where it comes from is :func:`rmtp.sources.resolve_source`'s to say."""
    from rmtp.storage.saving import META_FILE

    try:
        source = model_sources.resolve_source(text, model_name, kwargs=kwargs)
    except model_sources.MissingName:
        raise BenchError(f"model {text!r}: give a timm model name after 'timm:', e.g. timm:resnet18") from None
    except model_sources.SourceNotFound:
        raise BenchError(f"model {text!r}: no such file or folder; give an rmtp output folder, a checkpoint file "
                         f"or timm:NAME") from None
    except model_sources.NotASource:
        raise BenchError(f"model {text!r}: a folder but not an rmtp output folder (no {META_FILE}) nor in timm's hub "
                         f"layout (no {model_sources.CONFIG_FILE}); give an rmtp output folder, a hub-layout folder, "
                         f"a checkpoint file or timm:NAME") from None
    except model_sources.NameConflict as exc:
        raise BenchError(f"model {text!r}: --model {model_name}, but {exc.hub.config.source} says it is a "
                         f"{exc.hub.config.architecture!r}; drop --model") from None
    except RmtpError as exc:  # a model card or config.json that cannot be read, a hub folder without weights
        raise BenchError(f"model {text!r}: {exc}") from None

    if isinstance(source, model_sources.SavedFolder):
        built = source.build()
        return Candidate(label=text, model=built.model, source=text, kind="folder", timm_name=built.spec.name,
                         arch=built.arch.name if built.arch else None, eval_data=_eval_data(source),
                         baseline=built.baseline)
    spec = source.spec
    if spec is None:  # a bare weights file, with no card nor config.json beside it
        raise BenchError(f"checkpoint {text}: which timm model is it? pass --model NAME (and --kwargs JSON), "
                         f"or put a card {model_sources.card_path(Path(text)).name} with timm_name and kwargs next to "
                         f"it (or timm's {model_sources.CONFIG_FILE})")
    if isinstance(source, model_sources.TimmName):
        where = f"model {text!r}"
    else:
        where = f"checkpoint {spec.checkpoint if isinstance(source, model_sources.HubLayout) else text}"
    built = source.build(create=lambda named: _build_timm(named.name, named.kwargs, named.checkpoint, where=where))
    if isinstance(source, model_sources.TimmName):
        return Candidate(label=text, model=built.model, source=text, kind="timm", timm_name=spec.name,
                         arch=_arch_of(spec.name))
    notes = []
    if isinstance(source, model_sources.HubLayout):
        assert source.hub is not None
        notes.append(f"model from {source.hub.config.source}: {spec.name}")
    elif isinstance(source, model_sources.WeightsFile) and source.ignored_card is not None:
        ignored = source.ignored_card
        notes.append(f"ignored model card {ignored.path} (it names {ignored.timm_name}, --model names {model_name})")
    return Candidate(label=text, model=built.model, source=text, kind="checkpoint", timm_name=spec.name,
                     arch=_arch_of(spec.name), eval_data=_eval_data(source), notes=notes)


def _eval_data(source: model_sources.ModelSource) -> EvalData | None:
    """The val data the source's origin records (a folder's recipe.yaml, a card's ``data``)."""
    try:
        data = source.data()
    except RmtpError as exc:
        raise BenchError(str(exc)) from None
    return None if data is None else EvalData(spec=data.spec, seed=data.seed, source=data.source)


def _folder_baseline(pruned: Candidate) -> Candidate:
    """The dense model an rmtp folder records, rebuilt by its architecture plugin."""
    from rmtp.plugins import get_plugins

    folder, baseline = pruned.source, pruned.baseline
    if baseline is None or pruned.arch is None:
        raise BenchError(f"{folder} records no dense baseline; name the baseline first: rmtp bench BASELINE {folder}")
    try:
        model = get_plugins().architecture(baseline.arch or pruned.arch).create(baseline)
    except RmtpError as exc:
        raise BenchError(f"{folder}: cannot rebuild its dense baseline ({exc}); name a baseline first: "
                         f"rmtp bench BASELINE {folder}") from None
    origin = str(baseline.checkpoint) if baseline.checkpoint else (
        "timm pretrained" if baseline.pretrained else "random init")
    notes = []
    if baseline.checkpoint is None and not baseline.pretrained:
        notes.append("the run started from random weights, so its dense model was rebuilt with new random weights: "
                     "size and speed are comparable, top-1 is not the run's")
    return Candidate(label=f"{folder} (dense)", model=model,
                     source=f"dense baseline of {folder}: {baseline.name} ({origin})", kind="baseline",
                     timm_name=baseline.name, arch=pruned.arch, eval_data=pruned.eval_data, notes=notes)


def _build_timm(name: str, kwargs: dict[str, Any], checkpoint: Path | None, *, where: str) -> nn.Module:
    import timm

    from rmtp.storage.weights import load_state_dict_into, read_state_dict

    hub = model_sources.is_hub_name(name)  # timm reads the architecture from the repo's config.json
    if not hub and not timm.is_model(name.split(".")[0]):
        raise BenchError(f"{where}: timm has no model {name!r}{timm_name_hint(name)}")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        failure = model_sources.fetch_failure(f"{where}: could not read {name!r}", model_sources.hub_repo(name),
                                              exc) if hub else None
        if failure is not None:
            raise BenchError(str(failure)) from None
        if isinstance(exc, (TypeError, ValueError, AssertionError)):
            raise BenchError(f"{where}: timm rejected the kwargs {kwargs} for {name!r}: {exc}") from None
        raise
    if checkpoint is not None:
        load_state_dict_into(model, read_state_dict(checkpoint), source=str(checkpoint))
    return model.eval()


def _arch_of(name: str) -> str | None:
    from rmtp.plugins import get_plugins

    try:
        return model_sources.architecture_for(get_plugins(), name).name
    except RmtpError:
        return None  # bench does not need an architecture plugin; it is only reported


def _unique_labels(candidates: list[Candidate]) -> None:
    seen: dict[str, int] = {}
    for c in candidates:
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label} #{seen[c.label]}"
