"""Module paths from before the core was grouped into packages (issue 22), and the import hook
that keeps them working.

Why: third-party plugins and user code import rmtp's modules by path (``from rmtp.pruner import
Pruner``, ``import rmtp.modules``). When a module moves, its old path must keep naming the *same
module object*, private names, monkeypatching and ``isinstance`` checks included, not a copy of
its public names. :data:`MOVED` is the table; :class:`MovedModules`, installed on ``sys.meta_path``
by ``import rmtp``, answers an import of an old path with the new module. Saved folders do not
depend on module paths at all (they record stable type ids, :mod:`rmtp.contract.saved_types`).

Never remove an entry: it is a released import path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

#: Old module path → where the module lives now.
MOVED: dict[str, str] = {
    "rmtp.pruner": "rmtp.contract.pruner",
    "rmtp.architecture": "rmtp.contract.architecture",
    "rmtp.hookspecs": "rmtp.contract.hookspecs",
    "rmtp.modules": "rmtp.contract.saved_types",
    "rmtp.param_types": "rmtp.contract.param_types",
    "rmtp.recipe": "rmtp.run.recipe",
    "rmtp.layers": "rmtp.run.layer_filter",
    "rmtp.pipeline": "rmtp.run.pipeline",
    "rmtp.steps": "rmtp.run.steps",
    "rmtp.step_output": "rmtp.run.step_output",
    "rmtp.preflight": "rmtp.run.preflight",
    "rmtp.resume": "rmtp.run.resume",
    "rmtp.oom": "rmtp.run.oom",
    "rmtp.precision": "rmtp.run.precision",
    "rmtp.device": "rmtp.run.device",
    "rmtp.distributed": "rmtp.run.distributed",
    "rmtp.progress": "rmtp.run.progress",
    "rmtp.accuracy_budget": "rmtp.fidelity.accuracy_budget",
    "rmtp.agreement": "rmtp.fidelity.agreement",
    "rmtp.blockwise": "rmtp.fidelity.blockwise",
    "rmtp.layerwise": "rmtp.fidelity.layerwise",
    "rmtp.unlabeled": "rmtp.fidelity.unlabeled",
    "rmtp.saving": "rmtp.storage.saving",
    "rmtp.checkpoint": "rmtp.storage.weights",
    "rmtp.output_folder": "rmtp.storage.output_folder",
    "rmtp.overwrite": "rmtp.storage.overwrite",
    "rmtp.atomic": "rmtp.storage.atomic",
    "rmtp.safe_yaml": "rmtp.storage.safe_yaml",
    "rmtp.report": "rmtp.reports.records",
    "rmtp.render": "rmtp.reports.render",
    "rmtp.lowrank": "rmtp_plugins.svd_mp.lowrank",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a moved module's old path and loads it as the module at its new path."""

    def __init__(self, moved: dict[str, str]):
        self.moved = moved

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return importlib.import_module(self.moved[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once per process."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules(MOVED))
