"""How ``magnitude`` prunes (:class:`rmtp_plugins.magnitude.MagnitudePruner` runs :func:`prune`):
the masks of the smallest weights, over all selected layers or per layer, and the report rows."""

from __future__ import annotations

import torch

from rmtp.contract.pruner import LayerRow, PruneContext, PruneResult, weight_footprint
from rmtp_plugins.magnitude.params import MagnitudeParams


def prune(ctx: PruneContext, params: MagnitudeParams) -> PruneResult:
    if not ctx.layers:  # a filter that matched nothing: nothing to prune (the step report says so)
        return PruneResult()
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
    return PruneResult(rows)


def _keep_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Boolean masks keeping the ``(1 - sparsity)`` largest-magnitude entries over all ``weights``."""
    scores = torch.cat([w.detach().abs().flatten().float() for w in weights])
    n_keep = scores.numel() - round(sparsity * scores.numel())
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.sort(scores, descending=True, stable=True).indices[:n_keep]] = True
    masks, offset = [], 0
    for weight in weights:
        masks.append(keep[offset:offset + weight.numel()].view_as(weight))
        offset += weight.numel()
    return masks


__all__ = ["prune"]
