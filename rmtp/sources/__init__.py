"""Where a model comes from, decided once: :func:`resolve_source` and one source type per kind.

What a command line, a recipe or ``rmtp.*`` names as a model is one of four kinds, each a type in
:mod:`rmtp.sources.resolve` that knows its model (built for real or on the meta device), its
:class:`~rmtp.contract.architecture.ModelSpec` and, where it has one, the data it was trained on:

:class:`TimmName`
    ``timm:NAME``, ``NAME.tag``, ``timm/NAME.tag`` or ``hf-hub:org/name`` (:mod:`rmtp.sources.hub`),
    random init or timm's pretrained weights.
:class:`SavedFolder`
    an rmtp output folder (``rmtp_model.json``), rebuilt by :func:`rmtp.storage.saving.load`; its data is
    its saved ``recipe.yaml``'s.
:class:`HubLayout`
    a folder in timm's hub layout (``config.json`` beside ``model.safetensors`` or
    ``pytorch_model.bin``), or that weights file: the config names the model and its kwargs.
:class:`WeightsFile`
    a bare state dict (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
    ``torch.load(weights_only=True)``), named by the caller or by a model card ``<stem>.json``
    beside it (:func:`read_card`), whose ``data`` is its data; with neither, only its tensors.

``rmtp prune``/``validate`` (through the recipe), ``analyze-spectrum``, ``bench``, ``export`` and
``token-map`` all resolve through here; each words the errors in its own terms (the typed
:class:`SourceError` subclasses carry what they need).

This package's face is torch-free: the hub helpers load eagerly, the resolver on first use.
"""

from __future__ import annotations

from rmtp.lazy import lazy_exports
from rmtp.sources.hub import (
    CONFIG_FILE,
    DATA_KEYS,
    HF_HUB_PREFIX,
    LOCAL_HINT,
    WEIGHT_FILES,
    HubConfig,
    HubFolder,
    architecture_for,
    fetch_failure,
    hub_config,
    hub_folder,
    hub_repo,
    is_hub_name,
    normalise_name,
    pretrained_repo,
    read_config,
    registry_name,
    resolved_name_and_kwargs,
    unknown_architecture,
)

#: The resolver's names, loaded on first use (:mod:`rmtp.sources.resolve`).
_RESOLVER = ("TIMM_PREFIX", "Built", "Card", "HubLayout", "MissingName", "ModelSource", "NameConflict", "NotASource",
             "PretrainedAndWeights", "SavedData", "SavedFolder", "SourceError", "SourceNotFound", "TimmName",
             "WeightsFile", "card_path", "is_saved_folder", "read_card", "resolve_source", "saved_data",
             "source_for_spec")

__all__ = [
    "CONFIG_FILE", "DATA_KEYS", "HF_HUB_PREFIX", "LOCAL_HINT", "WEIGHT_FILES", "HubConfig", "HubFolder",
    "architecture_for", "fetch_failure", "hub_config", "hub_folder", "hub_repo", "is_hub_name", "normalise_name",
    "pretrained_repo", "read_config", "registry_name", "resolved_name_and_kwargs", "unknown_architecture", *_RESOLVER,
]

__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_RESOLVER, "rmtp.sources.resolve"))
