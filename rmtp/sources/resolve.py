"""The resolver: what a string or path names as a model, told apart once, and a type per kind.

:func:`resolve_source` reads a command line's model (``rmtp analyze-spectrum``, ``rmtp bench``) or
a recipe's ``model.checkpoint``; :func:`source_for_spec` the ``model:`` section a validated recipe
settled on. The order is fixed:

1. ``timm:NAME`` or ``hf-hub:org/name`` (a string): :class:`TimmName`.
2. A folder with ``rmtp_model.json``: :class:`SavedFolder` (checked first: a folder rmtp wrote may
   also hold a ``config.json``).
3. A folder with timm's ``config.json``: :class:`HubLayout`; any other folder is :class:`NotASource`.
4. A file: :class:`WeightsFile`. Its model is, in this order, the name the caller gives, else a
   model card ``<stem>.json`` beside it (:func:`read_card`), else timm's ``config.json`` beside it
   (then it is a :class:`HubLayout` of that one file), else unknown (its tensors alone). A card
   that names another model than the given name is left out (:attr:`WeightsFile.ignored_card`);
   one naming the same model adds its kwargs (under the given ones) and its data.

Each source knows its :class:`~rmtp.contract.architecture.ModelSpec` (``spec``), builds its model for real
(:meth:`ModelSource.build`) or on the meta device (:meth:`ModelSource.build_meta`, for ``rmtp
validate``), and gives the data its origin records (:meth:`ModelSource.data`: a saved folder's
``recipe.yaml``, a card's ``data``), as :class:`SavedData`.

Errors are typed (:class:`SourceError` and its subclasses carry the path, names or config) with a
plain default message, so that each command words them in its own terms. Weights are only ever
read by :func:`rmtp.storage.weights.read_state_dict` (safetensors, or ``torch.load(weights_only=True)``);
cards, configs and saved recipes are read as untrusted JSON / YAML. Importing this module needs no
torch; building a model does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rmtp.contract.architecture import ModelSpec
from rmtp.errors import CheckpointError, RmtpError
from rmtp.sources.hub import CONFIG_FILE, HubFolder, architecture_for, hub_folder, is_hub_name, normalise_name
from rmtp.storage.overwrite import META_FILE, RECIPE_FILE

if TYPE_CHECKING:
    from torch import nn

    from rmtp.contract.architecture import Architecture
    from rmtp.data import DataSpec
    from rmtp.plugins import Plugins
    from rmtp.storage.saving import LoadedModel

TIMM_PREFIX = "timm:"


# ----------------------------------------------------------------------------------- errors


class SourceError(CheckpointError):
    """A model source that cannot be resolved. Subclasses carry what a caller needs to word it."""


class MissingName(SourceError):
    """``timm:`` with no name after it."""

    def __init__(self, text: str):
        self.text = text
        super().__init__(f"{text!r}: give a timm model name after 'timm:', e.g. timm:vit_base_patch16_224")


class SourceNotFound(SourceError):
    """A path that is neither a file nor a folder."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path}: no such file or folder")


class NotASource(SourceError):
    """A folder that is neither an rmtp output folder nor in timm's hub layout."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path}: not an rmtp output folder (no {META_FILE}) nor in timm's hub layout "
                         f"(no {CONFIG_FILE})")


class NameConflict(SourceError):
    """A model name given for a hub-layout folder whose config.json names another architecture."""

    def __init__(self, given: str, hub: HubFolder):
        self.given, self.hub = given, hub
        super().__init__(f"{hub.folder}: the model is named {given!r}, but {hub.config.source} says the weights "
                         f"are a {hub.config.architecture!r}")


class PretrainedAndWeights(SourceError):
    """``pretrained`` asked of a source that brings its own weights (a weights file, a hub folder)."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path}: pretrained fetches timm's weights and a checkpoint brings its own; give one")


# ----------------------------------------------------------------------------------- cards and data


@dataclass(frozen=True)
class SavedData:
    """The data a model's origin records: the spec (split seed included), and the file it came from."""

    spec: DataSpec
    seed: int
    source: str


@dataclass(frozen=True)
class Card:
    """A model card ``<stem>.json`` beside a weights file (``models/digits_vit.json``).

    ``timm_name`` (required) and ``kwargs`` build the model; ``arch`` (optional) names the
    architecture plugin; ``data`` (optional) is the data section it was trained on, its split seed
    ``data.split_seed`` or else the card's ``seed``. Other keys (training history, versions) are kept
    out of it.
    """

    path: Path
    timm_name: str
    kwargs: dict[str, Any]
    arch: str | None = None
    data: dict[str, Any] | None = None
    seed: Any = 0

    def saved_data(self) -> SavedData | None:
        """The card's ``data`` as a :class:`SavedData` (keys a DataSpec lacks dropped, ``root``
        relative to the card's folder), or None without one."""
        if self.data is None:
            return None
        from rmtp.data import DataSpec

        fields = {k: v for k, v in self.data.items() if k in DataSpec.model_fields}
        if fields.get("root"):
            fields["root"] = str((self.path.parent / str(fields["root"])).resolve())
        return _saved_data(fields, self.data.get("split_seed", self.seed), str(self.path))


def card_path(checkpoint: Path) -> Path:
    """Where a checkpoint's model card lives: ``<stem>.json`` beside it."""
    return Path(checkpoint).with_suffix(".json")


def read_card(path: Path) -> Card:
    """The model card at ``path`` (read as untrusted JSON), or one-line CheckpointError saying what is wrong."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"model card {path}: not readable JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("timm_name"), str) or not raw["timm_name"].strip():
        raise CheckpointError(f"model card {path}: needs a string field 'timm_name' (the timm model name)")
    kwargs = raw.get("kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"model card {path}: 'kwargs' must be an object of timm.create_model keyword arguments")
    arch = raw.get("arch")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise CheckpointError(f"model card {path}: 'arch' must be the name of an architecture plugin")
    data = raw.get("data")
    return Card(path=Path(path), timm_name=raw["timm_name"].strip(), kwargs=dict(kwargs), arch=arch,
                data=dict(data) if isinstance(data, dict) else None, seed=raw.get("seed", 0))


def saved_data(folder: Path) -> SavedData | None:
    """The data of an rmtp output folder's saved ``recipe.yaml`` (read as untrusted YAML; the split
    seed as :func:`rmtp.data.saved_split_seed` finds it), or None when it has no recipe."""
    from rmtp.data import saved_split_seed
    from rmtp.storage.saving import read_saved_recipe

    folder = Path(folder)
    recipe = read_saved_recipe(folder)
    if recipe is None:
        return None
    return _saved_data(dict(recipe.get("data") or {}), saved_split_seed(recipe), str(folder / RECIPE_FILE))


def _saved_data(fields: dict[str, Any], seed: Any, source: str) -> SavedData:
    from pydantic import ValidationError

    from rmtp.data import DataSpec

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise RmtpError(f"{source}: data.split_seed must be a non-negative integer, got {seed!r}")
    try:
        spec = DataSpec.model_validate({**fields, "split_seed": seed})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RmtpError(f"{source}: data{'.' + where if where else ''}: not a valid data section: "
                        f"{first['msg']}") from None
    return SavedData(spec=spec, seed=seed, source=source)


# ----------------------------------------------------------------------------------- the sources


@dataclass
class Built:
    """A source's model, as built: ``spec`` what it records, ``baseline`` the dense model it came from
    (a saved folder's record, None when it has none; else ``spec``), ``arch`` its architecture
    plugin (None when built by a caller's own ``create``)."""

    model: nn.Module
    spec: ModelSpec
    baseline: ModelSpec | None
    arch: Architecture | None


def _plugins(plugins: Plugins | None) -> Plugins:
    if plugins is not None:
        return plugins
    from rmtp.plugins import get_plugins

    return get_plugins()


class ModelSource:
    """Where a model comes from. ``kind``: ``timm``, ``saved``, ``hub`` or ``weights``."""

    kind: ClassVar[str]
    #: What named it (the command line's text, the recipe's path).
    text: str

    @property
    def spec(self) -> ModelSpec | None:
        """The model as a ModelSpec (name, arch, kwargs, pretrained, checkpoint); None when unknown."""
        raise NotImplementedError

    def architecture(self, plugins: Plugins | None = None) -> Architecture:
        """The architecture plugin that builds it (PluginError when none does)."""
        raise NotImplementedError

    def build(self, plugins: Plugins | None = None, *,
              create: Callable[[ModelSpec], nn.Module] | None = None) -> Built:
        """The model with its weights, in eval mode. ``create`` builds a spec instead of its
        architecture plugin (``rmtp bench`` builds any timm model, a plugin or not); a saved folder
        is always rebuilt by :func:`rmtp.storage.saving.load`."""
        raise NotImplementedError

    def build_meta(self, plugins: Plugins | None = None) -> tuple[nn.Module, Architecture]:
        """The model's structure on the meta device (no weights read, none allocated), and its plugin."""
        raise NotImplementedError

    def data(self) -> SavedData | None:
        """The data its origin records (a saved folder's recipe, a card's ``data``), or None."""
        return None


@dataclass
class _SpecSource(ModelSource):
    """A source whose model a :class:`ModelSpec` describes: built by its architecture plugin."""

    text: str
    model_spec: ModelSpec | None

    @property
    def spec(self) -> ModelSpec | None:
        return self.model_spec

    def _named(self) -> ModelSpec:
        if self.model_spec is None:
            raise CheckpointError(f"{self.text}: which timm model is this checkpoint? name it, or put a model card "
                                  f"{card_path(Path(self.text)).name} with timm_name and kwargs beside it")
        return self.model_spec

    def architecture(self, plugins: Plugins | None = None) -> Architecture:
        spec = self._named()
        return architecture_for(_plugins(plugins), spec.name, spec.arch)

    def build(self, plugins: Plugins | None = None, *,
              create: Callable[[ModelSpec], nn.Module] | None = None) -> Built:
        spec = self._named()
        if create is not None:
            return Built(model=create(spec).eval(), spec=spec, baseline=spec, arch=None)
        arch = self.architecture(plugins)
        return Built(model=arch.create(spec).eval(), spec=spec, baseline=spec, arch=arch)

    def build_meta(self, plugins: Plugins | None = None) -> tuple[nn.Module, Architecture]:
        import torch

        spec = self._named()
        with torch.device("meta"):  # no pretrained download, no checkpoint read: structure only
            arch = self.architecture(plugins)  # an hf-hub: name: its config.json's architecture
            return arch.create(ModelSpec(name=spec.name, arch=spec.arch, kwargs=dict(spec.kwargs))), arch


@dataclass
class TimmName(_SpecSource):
    """A timm model by name (``NAME``, ``NAME.tag``, ``timm/NAME.tag``, ``hf-hub:org/name``), random
    init or timm's pretrained weights. ``given_name``: the name as written (before normalising)."""

    kind: ClassVar[str] = "timm"
    given_name: str = ""

    @property
    def name(self) -> str:
        return self._named().name


@dataclass
class HubLayout(_SpecSource):
    """A folder in timm's hub layout, or its weights file: its config.json names the model and kwargs
    (kwargs given by the caller override the config's)."""

    kind: ClassVar[str] = "hub"
    hub: HubFolder | None = None


@dataclass
class WeightsFile(_SpecSource):
    """A bare state dict: named by the caller or by its model card, else unknown (``spec`` None)."""

    kind: ClassVar[str] = "weights"
    path: Path = Path()
    card: Card | None = None
    #: A card beside it that names another model than the one given, and so was not used.
    ignored_card: Card | None = None

    def data(self) -> SavedData | None:
        return self.card.saved_data() if self.card is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Its tensors (safetensors, or a pickle with ``weights_only=True``)."""
        from rmtp.storage.weights import read_state_dict

        return read_state_dict(self.path)


@dataclass
class SavedFolder(ModelSource):
    """An rmtp output folder: rebuilt exactly as saved (replaced layers, weights, patches)."""

    kind: ClassVar[str] = "saved"
    text: str
    path: Path

    @property
    def spec(self) -> ModelSpec:
        """The timm model it was built on (read from ``rmtp_model.json`` alone)."""
        from rmtp.storage.saving import read_spec

        return read_spec(self.path)

    def architecture(self, plugins: Plugins | None = None) -> Architecture:
        from rmtp.storage.saving import read_meta

        arch = read_meta(self.path).get("arch")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path / META_FILE}: missing or malformed field 'arch'")
        return _plugins(plugins).architecture(arch)

    def load(self, plugins: Plugins | None = None) -> LoadedModel:
        from rmtp.storage.saving import load

        return load(self.path, plugins=plugins)

    def build(self, plugins: Plugins | None = None, *,
              create: Callable[[ModelSpec], nn.Module] | None = None) -> Built:
        plugins = _plugins(plugins)
        loaded = self.load(plugins)
        return Built(model=loaded.model, spec=loaded.spec, baseline=loaded.baseline,
                     arch=plugins.architecture(loaded.arch))

    def build_meta(self, plugins: Plugins | None = None) -> tuple[nn.Module, Architecture]:
        import torch

        from rmtp.storage.saving import rebuild_structure

        with torch.device("meta"):
            try:
                return rebuild_structure(self.path, plugins=_plugins(plugins))
            except RmtpError:
                raise
            except Exception as exc:  # noqa: BLE001 - a replacement class that cannot live on meta
                raise CheckpointError(str(exc)) from None

    def data(self) -> SavedData | None:
        return saved_data(self.path)


# ----------------------------------------------------------------------------------- resolving


def is_saved_folder(path: Path) -> bool:
    """Whether ``path`` is an rmtp output folder (the same test as :func:`rmtp.storage.saving.is_saved_model`)."""
    return path.is_dir() and (path / META_FILE).is_file()


def resolve_source(text: str | os.PathLike[str], model_name: str | None = None, *,
                   kwargs: dict[str, Any] | None = None, arch: str | None = None,
                   pretrained: bool = False) -> ModelSource:
    """The source ``text`` names (the order is the module's): a string ``timm:NAME`` / ``hf-hub:…``,
    else a path. ``model_name``, ``kwargs``, ``arch`` describe a weights file (and may confirm a hub
    folder's architecture; kwargs override its config's); ``kwargs``, ``arch``, ``pretrained`` go to a
    timm name. A saved folder records its own model and takes none of them (callers that refuse
    them say so). Raises a :class:`SourceError` (or a card's / config's CheckpointError)."""
    kwargs = dict(kwargs or {})
    if isinstance(text, str) and (text.startswith(TIMM_PREFIX) or is_hub_name(text)):
        name = (text[len(TIMM_PREFIX):] if text.startswith(TIMM_PREFIX) else text).strip()
        if not name:
            raise MissingName(text)
        return TimmName(text=text, given_name=name,
                        model_spec=ModelSpec(name=normalise_name(name), arch=arch, kwargs=kwargs,
                                             pretrained=pretrained))
    path = Path(text)
    label = os.fspath(text)
    if path.is_dir():
        if is_saved_folder(path):
            return SavedFolder(text=label, path=path)
        hub = hub_folder(path)
        if hub is None:
            raise NotASource(path)
        return _hub_layout(label, hub, model_name, kwargs, arch, pretrained)
    if not path.is_file():
        raise SourceNotFound(path)
    if pretrained:
        raise PretrainedAndWeights(path)
    card_file = card_path(path)
    card = read_card(card_file) if card_file.is_file() and card_file != path else None
    ignored = None
    if card is not None and model_name and model_name != card.timm_name:
        card, ignored = None, card
    name = model_name or (card.timm_name if card is not None else None)
    if not name:
        hub = hub_folder(path)  # timm's config.json beside the weights
        if hub is not None:
            return _hub_layout(label, hub, None, kwargs, arch, pretrained)
        return WeightsFile(text=label, model_spec=None, path=path)
    spec = ModelSpec(name=name, arch=arch or (card.arch if card is not None else None),
                     kwargs={**(card.kwargs if card is not None else {}), **kwargs}, checkpoint=path)
    return WeightsFile(text=label, model_spec=spec, path=path, card=card, ignored_card=ignored)


def _hub_layout(label: str, hub: HubFolder, model_name: str | None, kwargs: dict[str, Any], arch: str | None,
                pretrained: bool) -> HubLayout:
    if pretrained:
        raise PretrainedAndWeights(hub.folder)
    name = hub.config.architecture
    if model_name and normalise_name(model_name).split(".")[0] != name.split(".")[0]:
        raise NameConflict(model_name, hub)
    spec = ModelSpec(name=name, arch=arch, kwargs={**hub.config.kwargs, **kwargs}, checkpoint=hub.weights)
    return HubLayout(text=label, model_spec=spec, hub=hub)


def source_for_spec(spec: ModelSpec) -> ModelSource:
    """The source a settled ``model:`` section (a validated recipe's) is: its checkpoint an rmtp
    output folder, else the weights file it names (under the spec's name and kwargs as given, no
    card read), else the timm name."""
    checkpoint = spec.checkpoint
    if checkpoint is not None and is_saved_folder(Path(checkpoint)):
        return SavedFolder(text=str(checkpoint), path=Path(checkpoint))
    if checkpoint is not None:
        return WeightsFile(text=str(checkpoint), model_spec=spec, path=Path(checkpoint))
    return TimmName(text=spec.name, model_spec=spec, given_name=spec.name)


__all__ = ["TIMM_PREFIX", "Built", "Card", "HubLayout", "MissingName", "ModelSource", "NameConflict", "NotASource",
           "PretrainedAndWeights", "SavedData", "SavedFolder", "SourceError", "SourceNotFound", "TimmName",
           "WeightsFile", "card_path", "is_saved_folder", "read_card", "resolve_source", "saved_data",
           "source_for_spec"]
