"""rmtp: random-matrix-theory guided pruning for timm vision models.

The library API the CLI is built on::

    import rmtp
    recipe = rmtp.load_recipe("recipes/quickstart.yaml")
    result = rmtp.run_recipe(recipe)          # RunResult: model, dense_model, report, output_dir
    loaded = rmtp.load("runs/quickstart")     # LoadedModel: model, spec, arch, baseline
    spectra = rmtp.analyze_model(loaded.model, rmtp.get_plugins().architecture("vit"))

Names are imported lazily so ``import rmtp`` stays cheap and plugins can import submodules
without cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "rmtp.recipe",
    "parse_recipe": "rmtp.recipe",
    "Recipe": "rmtp.recipe",
    "run_recipe": "rmtp.pipeline",
    "RunResult": "rmtp.pipeline",
    "load": "rmtp.saving",
    "save": "rmtp.saving",
    "LoadedModel": "rmtp.saving",
    "get_plugins": "rmtp.plugins",
    "load_plugins": "rmtp.plugins",
    "hookimpl": "rmtp.hookspecs",
    "Pruner": "rmtp.pruner",
    "PrunerParams": "rmtp.pruner",
    "PruneContext": "rmtp.pruner",
    "LayerRow": "rmtp.pruner",
    "Architecture": "rmtp.architecture",
    "PrunableLayer": "rmtp.architecture",
    "ModelSpec": "rmtp.architecture",
    "rebuildable": "rmtp.modules",
    "analyze_model": "rmtp.spectral",
    "fit_mp": "rmtp.spectral",
    "RmtpError": "rmtp.errors",
    "RecipeError": "rmtp.errors",
    "PluginError": "rmtp.errors",
    "CheckpointError": "rmtp.errors",
    "DataError": "rmtp.errors",
    "DeviceError": "rmtp.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rmtp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
