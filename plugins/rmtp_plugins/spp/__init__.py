"""The ``spp`` pruner plugin (entry point ``spp``): Solution Path Pruning, one gate search and a
whole family of structured sparsity levels sliced from it (``docs/spp.md``).

Modules, one job each:

* :mod:`.params`: ``SppParams`` (no torch: ``rmtp list`` and ``rmtp validate`` load only this
  package and it).
* :mod:`.pruner`: the search driver, extraction of each level and the saved path;
  :class:`SppPruner` imports it when it runs.
* :mod:`.path`: split linearized Bregman iteration on the gates and reading levels off the path.
* :mod:`.oneshot`, :mod:`.obs`: ``search: obs``, the cut without training (structured OBS on the
  consumer's calibration inputs, layer by layer, and its least-squares refit).
* :mod:`.groups`: the units behind a step's layers (from the architecture's couplings), gating
  them and slicing a level out of them (``extract``, which :mod:`.pruner` and :mod:`.speed` both
  use), dispatched to :mod:`.heads` (attention heads), :mod:`.mlp` (MLP hidden neurons) and
  :mod:`.channels` (ResNet inner channels); :mod:`.unit` holds the unit.
* :mod:`.speed`: the level that reaches a speed target.
* :mod:`.modules`, :mod:`.conv_modules`: the sliced and removed modules a saved model is rebuilt
  from (stable type ids ``spp.*``).

This package is the plugin: it declares the pruner and registers it; the other public names are
imported from their modules on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.contract.hookspecs import hookimpl
from rmtp.contract.pruner import PruneContext, Pruner, PruneResult, PrunerParams
from rmtp.fidelity.accuracy_budget import StrengthKnob
from rmtp.lazy import lazy_exports
from rmtp_plugins.spp.params import SppParams

if TYPE_CHECKING:
    from torch import nn

    from rmtp.contract.architecture import Architecture

_LAZY = {
    **dict.fromkeys(("PATH_FILE", "search"), "rmtp_plugins.spp.pruner"),
    "extract": "rmtp_plugins.spp.groups",
    **dict.fromkeys(("AttentionHeads", "ConstantBranch", "SlicedLinear"), "rmtp_plugins.spp.modules"),
    **dict.fromkeys(("ConstantChannels", "RemovedConv2d", "RemovedNorm", "SlicedBatchNorm2d", "SlicedConv2d",
                     "ZeroInputConv2d"), "rmtp_plugins.spp.conv_modules"),
}

__all__ = sorted(["SppParams", "SppPruner", *_LAZY])


class SppPruner(Pruner):
    name = "spp"
    description = ("Solution Path Pruning: split-LBI gate search orders heads, MLP neurons or conv channels "
                   "once; slices any sparsity level (or several) from that path. search: obs cuts without "
                   "training, each consumer refitted by least squares (pretrained models).")
    kind = "weight"
    Params = SppParams
    needs_calibration = True

    @classmethod
    def strength_knob(cls, params: PrunerParams, model=None) -> StrengthKnob | None:
        """An accuracy budget searches ``ratio`` (0.02 removed, weak, up to the ratio given), or the
        speed target when one is given; ``ratios`` slices several levels, not one to choose."""
        knob = super().strength_knob(params, model)
        if knob is not None:
            return knob
        if params.ratios is not None:
            raise ValueError("ratios slices several levels, and an accuracy budget chooses one: give ratio (the "
                             "strongest it may try)")
        return StrengthKnob("ratio", weak=0.02, strong=params.ratio if params.ratio is not None else 0.5,
                            resolution=0.01)

    @classmethod
    def structure_problem(cls, arch: Architecture, model: nn.Module, params: SppParams) -> str | None:
        """Nothing to gate: the architecture declares no couplings of the ``structures`` asked for."""
        from rmtp_plugins.spp.pruner import coupling_problem

        return coupling_problem(arch, arch.couplings(model), params.structures)

    def prune(self, ctx: PruneContext, params: SppParams) -> PruneResult:
        from rmtp_plugins.spp.pruner import prune  # the gate search and the slicing (torch)

        return prune(ctx, params)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


@hookimpl
def register_pruners(register: Callable[[type], None]) -> None:
    register(SppPruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.spp.conv_modules
    import rmtp_plugins.spp.modules  # noqa: F401 - spp.sliced_linear, spp.constant_branch, spp.attention_heads
