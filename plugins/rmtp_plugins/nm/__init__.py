"""The ``n:m`` pruner plugin (entry point ``nm``): N:M structured sparsity with Marchenko–Pastur
layer budgets, channel permutation and prune–restore (``docs/nm.md``).

Modules, one job each:

* :mod:`.params`: ``NmParams`` and the pattern names (no torch: ``rmtp list`` and ``rmtp validate``
  load only this package and it).
* :mod:`.pruner`: the steps in order (scores, budget, permutation, masks) and the report rows;
  :class:`NmPruner` imports it when it runs.
* :mod:`.plan`: ``LayerPlan``, what n:m decides for one layer, which :mod:`.pruner` and
  :mod:`.speed` share.
* :mod:`.speed`: the patterns' times on the target, ``only_if_faster`` and the speed budget.
* :mod:`.masks`: N:M mask arithmetic (layout, masks, the validity check, Wanda scores, restore).
* :mod:`.sparsegpt`: SparseGPT's column sweep (masks with the OBS update of the kept weights).
* :mod:`.budget`: the MP signal per layer and the multiple-choice knapsack over patterns.
* :mod:`.permute`: the channel-permutation search and applying it (to the producer the
  architecture's couplings name, or as a saved :class:`PermutedInput` index).
* :mod:`.export`: 2:4 semi-structured sparse tensors for CUDA kernels (``rmtp bench``).

This package is the plugin: it declares the pruner and registers it and the semi-structured
kernel hook. The other public names are imported from their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rmtp.contract.hookspecs import hookimpl
from rmtp.contract.pruner import PruneContext, Pruner, PruneResult, PrunerParams
from rmtp.fidelity.accuracy_budget import StrengthKnob
from rmtp.lazy import lazy_exports
from rmtp_plugins.nm.params import NmParams, pattern_density

if TYPE_CHECKING:
    import torch
    from torch import nn

_LAZY = {
    "NMCheck": "rmtp_plugins.nm.masks",
    "check_nm": "rmtp_plugins.nm.masks",
    "PermutedInput": "rmtp_plugins.nm.permute",
    "collect_input_stats": "rmtp.fidelity.layerwise",
    "SemiStructuredReport": "rmtp_plugins.nm.export",
    "semi_structured_problem": "rmtp_plugins.nm.export",
    "to_semi_structured": "rmtp_plugins.nm.export",
}

__all__ = sorted(["NmParams", "NmPruner", "semi_structured_kernel", *_LAZY])


class NmPruner(Pruner):
    name = "n:m"
    description = ("N:M structured sparsity (2:4, 4:8, …) with Marchenko–Pastur layer budgets, channel "
                   "permutation and prune–restore.")
    kind = "mask"
    Params = NmParams
    #: Wanda scores, prune–restore and the MAC count read calibration data; plain magnitude scores
    #: read one batch only (to count each layer's positions per image for the MAC budget).
    needs_calibration = True

    @classmethod
    def strength_knob(cls, params: PrunerParams, model: nn.Module | None = None) -> StrengthKnob | None:
        """An accuracy budget searches ``target_macs`` of ``budget: mp`` (1.0: every layer dense, weak,
        down to the sparsest allowed pattern's density or the value given: which layers get which
        pattern, least MP-weighted damage first), or the speed target when one is given.
        ``budget: uniform`` puts n:m on every layer: nothing to search."""
        knob = super().strength_knob(params, model)
        if knob is not None:
            return knob
        if params.budget == "uniform":
            raise ValueError("budget: uniform puts n:m on every layer, so there is no strength to search; "
                             "use budget: mp, whose target_macs (which layers get the pattern) the budget chooses")
        sparsest = min(pattern_density(pattern) for pattern in params.options())
        return StrengthKnob("target_macs", weak=1.0, strong=sparsest, resolution=0.01)

    def prune(self, ctx: PruneContext, params: NmParams) -> PruneResult:
        from rmtp_plugins.nm.pruner import prune  # the scores, budget, permutations and masks (torch)

        return prune(ctx, params)


def semi_structured_kernel(module: nn.Module, *, device: torch.device, dtype: torch.dtype) -> str | None:
    """The ``rmtp bench`` kernel provider: 2:4 Linear layers on CUDA's semi-structured sparse
    kernels (:func:`rmtp_plugins.nm.export.semi_structured_kernel`, imported on the first call)."""
    from rmtp_plugins.nm.export import semi_structured_kernel as provider

    return provider(module, device=device, dtype=dtype)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


@hookimpl
def register_pruners(register) -> None:
    register(NmPruner)


@hookimpl
def register_kernels(register) -> None:
    register(semi_structured_kernel)  # rmtp bench runs 2:4 Linear layers on sparse kernels on CUDA


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.nm.permute  # noqa: F401 - registers PermutedInput (nm.permuted_input)
