"""The models ``rmtp bench`` compares, built from what the command line names.

A source is an rmtp output folder (loaded as saved; alone, its recorded dense baseline is rebuilt
and put first), a folder in timm's hub layout (``config.json`` + ``model.safetensors``, see
:mod:`rmtp.sources`), a checkpoint file described by ``--model``/``--kwargs``, by a card
``<stem>.json`` next to it or by timm's ``config.json`` beside it, or ``timm:NAME`` (random init;
``NAME`` may be ``hf-hub:org/name``, whose config.json timm reads from the hub or its local cache).
Each becomes a :class:`Candidate`, with the val data its origin names (a folder's recipe, a card's
``data``) for ``--eval``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from rmtp import sources as model_sources
from rmtp.architecture import ModelSpec, timm_name_hint
from rmtp.bench.schema import BenchError, EvalData
from rmtp.data import DataSpec, saved_split_seed
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
    from rmtp import saving

    if text.startswith(TIMM_PREFIX) or model_sources.is_hub_name(text):
        name = text[len(TIMM_PREFIX):].strip() if text.startswith(TIMM_PREFIX) else text
        if not name:
            raise BenchError(f"model {text!r}: give a timm model name after 'timm:', e.g. timm:resnet18")
        name = model_sources.normalise_name(name)
        model = _build_timm(name, kwargs, None, where=f"model {text!r}")
        return Candidate(label=text, model=model, source=text, kind="timm", timm_name=name, arch=_arch_of(name))
    path = Path(text)
    if path.is_dir():
        if not saving.is_saved_model(path):
            hub = _hub_folder(path, text)
            if hub is None:
                raise BenchError(f"model {text!r}: a folder but not an rmtp output folder (no {saving.META_FILE}) "
                                 f"nor in timm's hub layout (no {model_sources.CONFIG_FILE}); give an rmtp output folder, "
                                 f"a hub-layout folder, a checkpoint file or timm:NAME")
            return _load_hub(hub, text, model_name, kwargs)
        loaded = saving.load(path)
        return Candidate(label=text, model=loaded.model, source=text, kind="folder", timm_name=loaded.spec.name,
                         arch=loaded.arch, eval_data=_folder_eval_data(path), baseline=loaded.baseline)
    if path.is_file():
        return _load_checkpoint(path, text, model_name, kwargs)
    raise BenchError(f"model {text!r}: no such file or folder; give an rmtp output folder, a checkpoint file "
                     f"or timm:NAME")


def _load_checkpoint(path: Path, text: str, model_name: str | None, kwargs: dict[str, Any]) -> Candidate:
    card_path = path.with_suffix(".json")
    card: dict[str, Any] = {}
    if model_name is None:
        if not card_path.is_file():
            hub = _hub_folder(path, text)
            if hub is not None:
                return _load_hub(hub, text, None, kwargs)
            raise BenchError(f"checkpoint {text}: which timm model is it? pass --model NAME (and --kwargs JSON), "
                             f"or put a card {card_path.name} with timm_name and kwargs next to it (or timm's "
                             f"{model_sources.CONFIG_FILE})")
        card = _read_card(card_path)
        name = card["timm_name"]
        model_kwargs = {**card.get("kwargs", {}), **kwargs}
    else:
        name, model_kwargs = model_name, kwargs
    model = _build_timm(name, model_kwargs, path, where=f"checkpoint {text}")
    return Candidate(label=text, model=model, source=text, kind="checkpoint", timm_name=name, arch=_arch_of(name),
                     eval_data=_card_eval_data(card, card_path) if card else None)


def _hub_folder(path: Path, text: str) -> model_sources.HubFolder | None:
    try:
        return model_sources.hub_folder(path)
    except RmtpError as exc:
        raise BenchError(f"model {text!r}: {exc}") from None


def _load_hub(hub: model_sources.HubFolder, text: str, model_name: str | None, kwargs: dict[str, Any]) -> Candidate:
    """A folder in timm's hub layout (or its weights file): its config.json names the model and its kwargs."""
    name = hub.config.architecture
    if model_name is not None and model_sources.normalise_name(model_name).split(".")[0] != name.split(".")[0]:
        raise BenchError(f"model {text!r}: --model {model_name}, but {hub.config.source} says it is a {name!r}; "
                         f"drop --model")
    model = _build_timm(name, {**hub.config.kwargs, **kwargs}, hub.weights, where=f"checkpoint {hub.weights}")
    return Candidate(label=text, model=model, source=text, kind="checkpoint", timm_name=name, arch=_arch_of(name),
                     notes=[f"model from {hub.config.source}: {name}"])


def _read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"model card {path}: not readable JSON: {exc}") from None
    if not isinstance(card, dict) or not isinstance(card.get("timm_name"), str):
        raise BenchError(f"model card {path}: needs a string 'timm_name' (and a 'kwargs' object)")
    if not isinstance(card.get("kwargs", {}), dict):
        raise BenchError(f"model card {path}: 'kwargs' must be an object")
    return card


def _card_eval_data(card: dict[str, Any], path: Path) -> EvalData | None:
    data = card.get("data")
    if not isinstance(data, dict):
        return None
    fields = {k: v for k, v in data.items() if k in DataSpec.model_fields}
    if fields.get("root"):
        fields["root"] = (path.parent / fields["root"]).resolve()
    seed = data.get("split_seed", card.get("seed", 0))
    return _eval_data(fields, seed, str(path))


def _folder_eval_data(folder: Path) -> EvalData | None:
    from rmtp.saving import RECIPE_FILE, read_saved_recipe

    try:
        recipe = read_saved_recipe(folder)
    except RmtpError as exc:
        raise BenchError(str(exc)) from None
    if recipe is None:
        return None
    return _eval_data(recipe.get("data") or {}, saved_split_seed(recipe), str(folder / RECIPE_FILE))


def _eval_data(fields: dict[str, Any], seed: Any, source: str) -> EvalData:
    from pydantic import ValidationError

    if not isinstance(seed, int) or seed < 0:
        raise BenchError(f"{source}: split seed must be a non-negative integer, got {seed!r}")
    try:
        spec = DataSpec.model_validate({**fields, "split_seed": seed})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BenchError(f"{source}: data.{where}: {first['msg']}") from None
    return EvalData(spec=spec, seed=seed, source=source)


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

    from rmtp.checkpoint import load_state_dict_into, read_state_dict

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
