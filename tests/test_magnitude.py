"""The magnitude baseline against a brute-force reference."""

from __future__ import annotations

import timm
import torch
from conftest import TINY_VIT

from rmtp.contract.pruner import PruneContext
from rmtp.plugins import get_plugins
from rmtp.run.layer_filter import select_layers
from rmtp_plugins.magnitude import MagnitudeParams, MagnitudePruner


def _context(model):
    arch = get_plugins().architecture("vit")
    layers = select_layers(arch.prunable_layers(model), None)
    return PruneContext(model=model, arch=arch, layers=layers, device=torch.device("cpu"), seed=0)


def test_global_magnitude_matches_brute_force_threshold() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    ctx = _context(model)
    weights = [ctx.module(layer).weight.detach().clone() for layer in ctx.layers]
    everything = torch.cat([w.abs().flatten() for w in weights])
    n_zero = round(0.6 * everything.numel())
    threshold = everything.sort().values[n_zero - 1]  # the largest magnitude that must go (no ties in random init)

    rows = MagnitudePruner().prune(ctx, MagnitudeParams(sparsity=0.6, scope="global")).rows

    for layer, before, row in zip(ctx.layers, weights, rows):
        after = ctx.module(layer).weight
        torch.testing.assert_close(after, torch.where(before.abs() > threshold, before, torch.zeros_like(before)),
                                   rtol=0, atol=0)
        assert row.nonzeros_before - row.nonzeros_after == int((before.abs() <= threshold).sum())
    total_zeroed = sum(r.nonzeros_before - r.nonzeros_after for r in rows)
    assert total_zeroed == n_zero
    assert len({round(r.sparsity, 2) for r in rows}) > 1  # a global threshold prunes layers unevenly


def test_layer_scope_prunes_each_layer_equally() -> None:
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    ctx = _context(model)
    rows = MagnitudePruner().prune(ctx, MagnitudeParams(sparsity=0.25, scope="layer")).rows
    for row in rows:
        weight = ctx.module(row.layer).weight
        assert row.nonzeros_before - row.nonzeros_after == round(0.25 * weight.numel())
        assert row.kept_fraction == 1 - round(0.25 * weight.numel()) / weight.numel()
    assert all(r.params_after == r.params_before for r in rows)  # masks keep shapes


def test_ties_are_broken_deterministically() -> None:
    weights = [torch.ones(4, 4), torch.ones(4, 4)]
    from rmtp_plugins.magnitude.pruner import _keep_masks

    first, second = _keep_masks(weights, 0.5), _keep_masks(weights, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert sum(int(m.sum()) for m in first) == 16
