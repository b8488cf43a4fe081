"""timm's hub names and its hub folder layout (part of :mod:`rmtp.sources`; torch-free).

timm names a model in four ways, and rmtp takes each where a model name goes (a recipe's
``model.name``, ``timm:NAME`` on the command line):

``NAME``, ``NAME.tag``
    a registry name, optionally with a pretrained tag; ``pretrained: true`` fetches the tag's
    weights from the Hugging Face hub.
``timm/NAME.tag``
    the hub repo of that tag. When timm's registry says the tag's weights live in that very repo,
    the name is read as ``NAME.tag`` (:func:`normalise_name`), so nothing needs the network until
    weights are fetched; otherwise as ``hf-hub:timm/NAME.tag``.
``hf-hub:org/name[@revision]``
    any hub repo in timm's layout. Its ``config.json`` names the architecture (``architecture``),
    which chooses the architecture plugin (:func:`registry_name`); ``timm.create_model`` reads the
    rest (``model_args``, ``pretrained_cfg``) and, with ``pretrained: true``, the weights. Reading
    the config needs the hub, or huggingface_hub's local cache (``HF_HUB_OFFLINE=1`` reads only
    the cache).

And a folder in timm's hub layout, as ``timm.models.save_for_hf`` / ``push_to_hf_hub`` write it and
``hf download org/name --local-dir DIR`` fetches it: ``config.json`` (``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg``) beside ``model.safetensors`` or
``pytorch_model.bin`` (:func:`hub_folder`). The config decides the timm name and the
``timm.create_model`` kwargs (:attr:`HubConfig.kwargs`); the weights are read by
:func:`rmtp.storage.weights.read_state_dict`, so a pickle is only ever read with ``weights_only=True``.
An rmtp output folder (``rmtp_model.json``) is told apart by the resolver
(:func:`rmtp.sources.resolve_source`), which checks it first.

When the hub cannot be reached, every path here raises one :class:`~rmtp.errors.CheckpointError`
line saying that network access is needed and how to pass a local folder instead
(:func:`fetch_failure`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmtp.errors import CheckpointError, PluginError

if TYPE_CHECKING:
    from rmtp.contract.architecture import Architecture
    from rmtp.plugins import Plugins

HF_HUB_PREFIX = "hf-hub:"
_HUB_SCHEMES = ("hf-hub", "hf_hub")  # timm still accepts the old underscore spelling
CONFIG_FILE = "config.json"
#: Weight files of the hub layout, in the order they are preferred (timm's order too).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: ``pretrained_cfg`` keys that decide how images are prepared for the model; a hub config's values
#: that differ from timm's defaults for the architecture travel as ``pretrained_cfg_overlay``.
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
#: How to get going offline, the tail of every "network access is needed" line.
LOCAL_HINT = ("offline, download it where there is network (`hf download {repo} --local-dir DIR`, or timm's "
              "save_for_hf) and pass DIR instead: model.checkpoint: DIR in a recipe, or rmtp analyze-spectrum DIR / "
              "rmtp bench DIR")

_OFFLINE = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError", "ConnectTimeout",
            "ConnectTimeoutError", "NewConnectionError", "MaxRetryError", "ReadTimeout", "Timeout", "TimeoutError",
            "TimeoutException", "TransportError", "NetworkError", "URLError", "gaierror"}
_MISSING = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
            "RemoteEntryNotFoundError", "DisabledRepoError", "HFValidationError"}


def is_hub_name(name: str) -> bool:
    """Whether ``name`` is ``hf-hub:org/name`` (a model timm reads from a hub repo's config.json)."""
    scheme, sep, rest = name.partition(":")
    return bool(sep) and scheme.lower() in _HUB_SCHEMES and bool(rest)


def hub_repo(name: str) -> str:
    """The repo id of ``hf-hub:org/name@rev`` (``org/name``)."""
    return name.partition(":")[2].split("@")[0]


def normalise_name(name: str) -> str:
    """``timm/NAME.tag`` as timm's registry name ``NAME.tag`` when the registry fetches that tag's
    weights from exactly that repo, else as ``hf-hub:timm/NAME.tag``; any other name unchanged."""
    name = name.strip()
    if not name.startswith("timm/") or ":" in name or "/" in name[len("timm/"):]:
        return name
    import timm
    from timm.models import get_pretrained_cfg

    inner = name[len("timm/"):]
    if inner and timm.is_model(inner.split(".")[0]):
        cfg = get_pretrained_cfg(inner) if "." in inner else None
        if cfg is not None and cfg.hf_hub_id == name:
            return inner
    return HF_HUB_PREFIX + name


@dataclass(frozen=True)
class HubConfig:
    """What a timm ``config.json`` says: the registry ``architecture`` and the ``timm.create_model``
    kwargs that rebuild the saved model (``num_classes``, the ``model_args``, and the image settings
    of ``pretrained_cfg`` that differ from timm's defaults as ``pretrained_cfg_overlay``)."""

    architecture: str
    kwargs: dict[str, Any]
    source: str  # the config file, or the hf-hub: name it came from


@dataclass(frozen=True)
class HubFolder:
    """A folder in timm's hub layout: its config and the weights file to read."""

    folder: Path
    config: HubConfig
    weights: Path


def hub_folder(path: Path) -> HubFolder | None:
    """The hub-layout folder ``path`` is (or whose weights file ``path`` is), or ``None`` when there is
    no ``config.json`` there. A folder's weights are the first of :data:`WEIGHT_FILES` present."""
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return None
    config = read_config(config_path)
    if path.is_dir():
        weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder}: has timm's {CONFIG_FILE} but no weights file "
                                  f"({' or '.join(WEIGHT_FILES)})")
    else:
        weights = path
    return HubFolder(folder=folder, config=config, weights=weights)


def read_config(path: Path) -> HubConfig:
    """A local timm ``config.json``, parsed as timm's ``load_model_config_from_path`` does (the
    current layout with ``pretrained_cfg``, or the older single dict)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("architecture"), str) or not raw["architecture"]:
        raise CheckpointError(f"{path}: not a timm model config (needs a string 'architecture', the timm model "
                              f"name, as timm's save_for_hf writes it)")
    if "pretrained_cfg" in raw:
        pretrained_cfg, model_args = raw.get("pretrained_cfg") or {}, raw.get("model_args") or {}
    else:  # the older layout: one dict that is the pretrained_cfg
        pretrained_cfg, model_args = {k: v for k, v in raw.items() if k not in ("architecture", "num_features")}, {}
    for key, value in (("pretrained_cfg", pretrained_cfg), ("model_args", model_args)):
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: '{key}' must be an object, got {type(value).__name__}")
    if "num_classes" in raw:
        pretrained_cfg = {**pretrained_cfg, "num_classes": raw["num_classes"]}
    if "num_classes" in pretrained_cfg and not _is_int(pretrained_cfg["num_classes"]):
        raise CheckpointError(f"{path}: 'num_classes' must be a whole number, got {pretrained_cfg['num_classes']!r}")
    return _config(raw["architecture"], pretrained_cfg, model_args, str(path))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _config(architecture: str, pretrained_cfg: dict[str, Any], model_args: dict[str, Any], source: str) -> HubConfig:
    """timm's precedence: the saved ``model_args`` over the config's ``num_classes``."""
    kwargs: dict[str, Any] = {}
    if pretrained_cfg.get("num_classes") is not None:
        kwargs["num_classes"] = pretrained_cfg["num_classes"]
    kwargs.update(model_args)
    overlay = _data_overlay(architecture, pretrained_cfg)
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    return HubConfig(architecture=architecture, kwargs=kwargs, source=source)


def _data_overlay(architecture: str, pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """The image settings of ``pretrained_cfg`` (input size, normalisation, crop) that differ from
    what timm's registry gives ``architecture``: the data pipeline reads them from the built model."""
    from timm.models import get_pretrained_cfg

    try:
        default = get_pretrained_cfg(architecture)
    except Exception:  # noqa: BLE001 - an architecture this timm does not know: the caller says so
        default = None
    defaults = default.to_dict() if default is not None else {}

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    return {key: plain(pretrained_cfg[key]) for key in DATA_KEYS
            if pretrained_cfg.get(key) is not None and plain(pretrained_cfg[key]) != plain(defaults.get(key))}


def hub_config(name: str) -> HubConfig:
    """The config of ``hf-hub:org/name``, read by timm's own loader (``load_model_config_from_hf``:
    the hub, or huggingface_hub's local cache); one-line CheckpointError when it cannot be read."""
    from timm.models._hub import load_model_config_from_hf

    try:
        pretrained_cfg, architecture, model_args = load_model_config_from_hf(name.partition(":")[2])
    except Exception as exc:  # noqa: BLE001 - sorted into offline / missing / not a timm repo below
        failure = fetch_failure(f"model.name: could not read {name!r}'s {CONFIG_FILE}", hub_repo(name), exc)
        if failure is not None:
            raise failure from None
        raise CheckpointError(f"model.name: {name!r}: the hub repo's {CONFIG_FILE} is not a timm model config "
                              f"({_one_line(exc)})") from None
    if not isinstance(architecture, str) or not architecture:
        raise CheckpointError(f"model.name: {name!r}: the hub repo's {CONFIG_FILE} names no architecture")
    return _config(architecture, dict(pretrained_cfg or {}), dict(model_args or {}), name)


def registry_name(name: str) -> str:
    """The timm registry name that ``name`` builds (tag kept): an ``hf-hub:`` name's config.json
    ``architecture`` (:func:`hub_config`), a ``timm/NAME.tag`` as ``NAME.tag``, else ``name``."""
    name = normalise_name(name)
    return hub_config(name).architecture if is_hub_name(name) else name


def architecture_for(plugins: Plugins, name: str, arch: str | None = None) -> Architecture:
    """The architecture plugin for the timm model ``name`` (any of the names above), or ``arch``."""
    if arch is not None:
        return plugins.architecture(arch)
    return plugins.architecture_for(registry_name(name))


def resolved_name_and_kwargs(name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(registry name, kwargs)`` that rebuild what ``timm.create_model(name, **kwargs)`` builds,
    without the hub: an ``hf-hub:`` name becomes its architecture and its config's kwargs under
    ``kwargs`` (what an rmtp folder records, so it loads offline); other names are returned as given."""
    name = normalise_name(name)
    if not is_hub_name(name):
        return name, dict(kwargs)
    config = hub_config(name)
    return config.architecture, {**config.kwargs, **kwargs}


def fetch_failure(what: str, repo: str | None, exc: BaseException) -> CheckpointError | None:
    """``exc`` as one line when it is a failure to reach or read the Hugging Face hub, else ``None``.

    Offline (no connection, offline mode, not in the local cache): network access is needed, and
    how to pass a local folder instead. No such repo or file (or a private or gated one): says so.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}
    hint = LOCAL_HINT.format(repo=repo or "REPO")
    if names & _OFFLINE:
        where = f"the Hugging Face hub (repo {repo})" if repo else "the Hugging Face hub"
        return CheckpointError(f"{what}: this needs network access to {where}, which could not be reached, and it "
                               f"is not in the local cache ({type(exc).__name__}); {hint}")
    if names & _MISSING:
        return CheckpointError(f"{what}: the Hugging Face hub has no such repo or file{f' ({repo})' if repo else ''}, "
                               f"or it is private or gated (log in with `hf auth login`): {_one_line(exc)}")
    return None


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def pretrained_repo(name: str) -> str | None:
    """The hub repo timm fetches ``name``'s pretrained weights from, when it knows one."""
    if is_hub_name(name):
        return hub_repo(name)
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name or tag: no repo to name
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def unknown_architecture(name: str, architecture: str, where: str = "model.name") -> PluginError:
    """A hub name or folder whose config names an ``architecture`` this timm does not have."""
    return PluginError(f"{where}: {name!r} is a {architecture!r} (its {CONFIG_FILE}'s architecture), which this "
                       f"timm does not have; upgrade timm")
