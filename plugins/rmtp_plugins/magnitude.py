"""``magnitude``: unstructured magnitude pruning, the baseline every RMT pruner is compared with.

Zeroes the weights of smallest absolute value, either over all selected layers at once
(``scope: global``, one threshold: layers with many small weights lose more) or layer by layer
(``scope: layer``, every layer loses the same fraction). Exactly ``round(sparsity · n)`` weights are
zeroed; ties are broken by position (a stable sort), so runs are reproducible.
Only ``weight`` tensors are pruned; biases and norms stay. Zeroed weights stay zero through a later
``finetune`` step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rmtp.accuracy_budget import StrengthKnob
from rmtp.hookspecs import hookimpl
from rmtp.pruner import LayerRow, PruneContext, Pruner, PrunerParams, weight_footprint

if TYPE_CHECKING:  # imported where the pruner runs: `rmtp list` and `rmtp validate` load no torch
    import torch


class MagnitudeParams(PrunerParams):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of the selected weights to zero")
    scope: Literal["global", "layer"] = Field("global", description="one threshold over all layers, or per layer")


class MagnitudePruner(Pruner):
    name = "magnitude"
    description = "Unstructured magnitude pruning (global or per-layer): the baseline for comparisons."
    kind = "mask"
    Params = MagnitudeParams

    @classmethod
    def strength_knob(cls, params: PrunerParams, model=None) -> StrengthKnob | None:  # noqa: ANN001 - nn.Module
        """An accuracy budget searches ``sparsity`` (0, weak, up to 0.95 or the value given)."""
        return super().strength_knob(params, model) or StrengthKnob("sparsity", weak=0.0, strong=0.95,
                                                                    resolution=0.01)

    def prune(self, ctx: PruneContext, params: MagnitudeParams) -> list[LayerRow]:
        if not ctx.layers:  # a filter that matched nothing: nothing to prune (the step report says so)
            return []
        import torch

        modules = [ctx.module(layer) for layer in ctx.layers]
        before = [weight_footprint(module) for module in modules]
        weights = [module.weight for module in modules]
        with torch.no_grad():
            if params.scope == "global":
                masks = _keep_masks(weights, params.sparsity)
            else:
                masks = [_keep_masks([w], params.sparsity)[0] for w in weights]
            for weight, mask in zip(weights, masks):
                weight.mul_(mask)
        rows = []
        for layer, module, (shape, n_params, nonzeros), mask in zip(ctx.layers, modules, before, masks):
            _, params_after, nonzeros_after = weight_footprint(module)
            kept = float(mask.float().mean())
            rows.append(LayerRow(layer=layer.name, shape_before=shape, shape_after=shape, params_before=n_params,
                                 params_after=params_after, nonzeros_before=nonzeros, nonzeros_after=nonzeros_after,
                                 budget=kept, kept_fraction=kept))
        return rows


def _keep_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Boolean masks keeping the ``(1 - sparsity)`` largest-magnitude entries over all ``weights``."""
    import torch

    scores = torch.cat([w.detach().abs().flatten().float() for w in weights])
    n_keep = scores.numel() - round(sparsity * scores.numel())
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.sort(scores, descending=True, stable=True).indices[:n_keep]] = True
    masks, offset = [], 0
    for weight in weights:
        masks.append(keep[offset:offset + weight.numel()].view_as(weight))
        offset += weight.numel()
    return masks


@hookimpl
def register_pruners(register) -> None:  # noqa: ANN001 - pluggy passes the registry's callback
    register(MagnitudePruner)
