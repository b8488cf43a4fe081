"""Attention heads for ``spp``: which attentions qualify, their units, and slicing them.

The architecture declares the heads (a ``"heads"`` :class:`~rmtp.contract.architecture.Coupling`: the fused
qkv projection, the output projection, head_dim channels a head), says whether its attention can
lose heads (:meth:`~rmtp.contract.architecture.Architecture.removal_problem`) and records the new count
(:meth:`~rmtp.contract.architecture.Architecture.set_head_count`); this module names no timm class.

A head's gate γ_h multiplies that head's output before the output projection (the ``head_dim``
input columns of the output projection that belong to head h). Removing head h drops its q, k
and v rows of the fused qkv (3·head_dim rows, at offsets 0, D, 2D, D = heads·head_dim) and its
columns of the output projection; new head counts are recorded with the :class:`AttentionHeads`
patch so the model saves and reloads. An attention that loses every head becomes a
:class:`~.modules.ConstantBranch` holding the output projection's bias.
"""

from __future__ import annotations

import torch
from torch import nn

from rmtp.contract.architecture import Architecture, Coupling
from rmtp.contract.saved_types import apply_patch, patches_of
from rmtp_plugins.spp.modules import AttentionHeads, ConstantBranch, SlicedLinear
from rmtp_plugins.spp.unit import Unit

_LINEARS = (nn.Linear, SlicedLinear)


def plain_linear(module: nn.Module) -> bool:
    return type(module) in _LINEARS


def attention_problem(model: nn.Module, coupling: Coupling, arch: Architecture) -> str | None:
    """Why spp cannot gate/slice the heads ``coupling`` declares (``None`` if it can): the
    architecture's reason first, then what slicing needs of the two projections."""
    problem = arch.removal_problem(model, coupling)
    if problem:
        return problem
    qkv, proj = model.get_submodule(coupling.producer), model.get_submodule(coupling.consumer)
    if not (plain_linear(qkv) and plain_linear(proj)):
        return (f"its qkv/proj are {type(qkv).__name__}/{type(proj).__name__}, not plain Linears "
                f"(run spp before layer-replacing pruners such as svd-mp)")
    heads = (coupling.rows.stop - coupling.rows.start) // coupling.group if coupling.rows is not None else 0
    if heads < 1 or proj.in_features != heads * coupling.group or qkv.out_features != 3 * proj.in_features:
        return "its qkv/proj sizes do not match heads·head_dim"
    return None


def head_unit(model: nn.Module, coupling: Coupling, arch: Architecture) -> Unit:
    qkv, proj = model.get_submodule(coupling.producer), model.get_submodule(coupling.consumer)
    width = coupling.group
    per = 3 * width * (qkv.in_features + (qkv.bias is not None)) + width * proj.out_features
    return Unit(coupling.name, "head", proj.in_features // width, width, per, 0, producer=coupling.producer,
                consumer=coupling.consumer, arch=arch)


def slice_heads(model: nn.Module, unit: Unit, kept: torch.Tensor, gates: torch.Tensor | None) -> int:
    qkv, proj = model.get_submodule(unit.producer), model.get_submodule(unit.consumer)
    if kept.numel() == 0:
        model.set_submodule(unit.path, ConstantBranch.replacing(proj))
        _record_heads(model, unit, 0)
        return 0
    if kept.numel() == unit.count and gates is None:
        return unit.count
    cols = (kept[:, None] * unit.width + torch.arange(unit.width, device=kept.device)).flatten()
    dim = unit.count * unit.width
    rows = torch.cat([cols + part * dim for part in range(3)])  # q, k, v rows of the kept heads
    new_qkv = SlicedLinear.from_rows_cols(qkv, rows=rows)
    new_proj = SlicedLinear.from_rows_cols(proj, cols=cols)
    if gates is not None:
        with torch.no_grad():
            new_proj.weight.mul_(gates[kept].repeat_interleave(unit.width).to(new_proj.weight))
    model.set_submodule(unit.producer, new_qkv)
    model.set_submodule(unit.consumer, new_proj)
    _record_heads(model, unit, int(kept.numel()))
    return int(kept.numel())


def _record_heads(model: nn.Module, unit: Unit, count: int) -> None:
    existing = next((p for p in patches_of(model) if isinstance(p, AttentionHeads)), None)
    if existing is not None:
        existing.update(model, {unit.path: count})
    elif count > 0:
        apply_patch(model, AttentionHeads(unit.arch, heads={unit.path: count}))

