"""``magnitude``: unstructured magnitude pruning, the baseline every RMT pruner is compared with.

Zeroes the weights of smallest absolute value, either over all selected layers at once
(``scope: global``, one threshold: layers with many small weights lose more) or layer by layer
(``scope: layer``, every layer loses the same fraction). Exactly ``round(sparsity · n)`` weights are
zeroed; ties are broken by position (a stable sort), so runs are reproducible.
Only ``weight`` tensors are pruned; biases and norms stay. Zeroed weights stay zero through a later
``finetune`` step.

This package is the plugin (entry point ``magnitude``), laid out as every built-in pruner
(``docs/pruner-contract.md``): the pruner's declaration here, :mod:`.params` (no torch) and
:mod:`.pruner` (the masks), which ``prune`` imports when it runs.
"""

from __future__ import annotations

from rmtp.contract.hookspecs import hookimpl
from rmtp.contract.pruner import PruneContext, Pruner, PruneResult, PrunerParams
from rmtp.fidelity.accuracy_budget import StrengthKnob
from rmtp_plugins.magnitude.params import MagnitudeParams

__all__ = ["MagnitudeParams", "MagnitudePruner"]


class MagnitudePruner(Pruner):
    name = "magnitude"
    description = "Unstructured magnitude pruning (global or per-layer): the baseline for comparisons."
    kind = "mask"
    Params = MagnitudeParams

    @classmethod
    def strength_knob(cls, params: PrunerParams, model=None) -> StrengthKnob | None:
        """An accuracy budget searches ``sparsity`` (0, weak, up to 0.95 or the value given)."""
        return super().strength_knob(params, model) or StrengthKnob("sparsity", weak=0.0, strong=0.95,
                                                                    resolution=0.01)

    def prune(self, ctx: PruneContext, params: MagnitudeParams) -> PruneResult:
        from rmtp_plugins.magnitude.pruner import prune  # the masks (torch), imported when it runs

        return prune(ctx, params)


@hookimpl
def register_pruners(register) -> None:
    register(MagnitudePruner)
