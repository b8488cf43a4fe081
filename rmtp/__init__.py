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

from rmtp.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
