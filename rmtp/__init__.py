"""rmtp: random-matrix-theory guided pruning for timm vision models.

The library API the CLI is built on. For a model in hand (:mod:`rmtp.api`)::

    import rmtp
    report = rmtp.prune(model, "svd-mp", margin=1.0)      # StepReport: rows, stats, baseline
    rmtp.finetune(model, data, epochs=1, distill={}, teacher=dense)
    rmtp.evaluate(model, data, dense=dense, latency=True)

For recipes and saved folders::

    import rmtp
    recipe = rmtp.load_recipe("recipes/quickstart.yaml")
    result = rmtp.run_recipe(recipe)          # RunResult: model, dense_model, report, output_dir
    loaded = rmtp.load("runs/quickstart")     # LoadedModel: model, spec, arch, baseline
    spectra = rmtp.analyze_model(loaded.model, rmtp.get_plugins().architecture("vit"))

Names are imported lazily so ``import rmtp`` stays cheap and plugins can import submodules
without cycles.
"""

from __future__ import annotations

from rmtp import moved
from rmtp.lazy import lazy_exports

moved.install()  # old module paths (rmtp.pruner, rmtp.modules, ...) name the moved modules

__version__ = "0.1.0"

_EXPORTS = {
    "prune": "rmtp.api",
    "finetune": "rmtp.api",
    "evaluate": "rmtp.api",
    "build_data": "rmtp.api",
    "frozen_copy": "rmtp.api",
    "infer_architecture": "rmtp.api",
    "unpatch": "rmtp.api",
    "reconstruct": "rmtp.api",
    "load_recipe": "rmtp.run.recipe",
    "parse_recipe": "rmtp.run.recipe",
    "Recipe": "rmtp.run.recipe",
    "run_recipe": "rmtp.run.pipeline",
    "RunResult": "rmtp.run.pipeline",
    "load": "rmtp.storage.saving",
    "save": "rmtp.storage.saving",
    "LoadedModel": "rmtp.storage.saving",
    "get_plugins": "rmtp.plugins",
    "load_plugins": "rmtp.plugins",
    "hookimpl": "rmtp.contract.hookspecs",
    "Pruner": "rmtp.contract.pruner",
    "PrunerParams": "rmtp.contract.pruner",
    "PruneContext": "rmtp.contract.pruner",
    "LayerRow": "rmtp.contract.pruner",
    "Architecture": "rmtp.contract.architecture",
    "PrunableLayer": "rmtp.contract.architecture",
    "ModelSpec": "rmtp.contract.architecture",
    "rebuildable": "rmtp.contract.saved_types",
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
