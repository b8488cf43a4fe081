"""The structured groups ``spp`` gates and slices in a timm ViT: attention heads and MLP neurons.

A *unit* is one branch of one block with its groups: the heads of ``blocks.i.attn`` or the hidden
neurons of ``blocks.i.mlp``. All gates of a model live in one flat vector γ (unit after unit, in
forward order), so the search, the ordering and the tie breaks see one index per group.

**Where a gate acts.** A head's gate γ_h multiplies that head's output before the output projection
(the ``head_dim`` input columns of ``attn.proj`` that belong to head h); a neuron's gate multiplies
its activation before ``mlp.fc2``. Both are forward pre-hooks on the projection, so the weights are
untouched during the search and γ = 1 is exactly the model as it was.

**Slicing.** Removing head h drops its q, k and v rows of ``attn.qkv`` (3·head_dim rows, at offsets
0, D, 2D of the fused projection, D = heads·head_dim) and its columns of ``attn.proj``; removing a
neuron drops its ``fc1`` row and ``fc2`` column. A kept group's gate is either folded into the
projection columns it multiplies (``fold``: the sliced model computes the searched gated function)
or dropped (gate 1: the dense weights). A branch that loses every group becomes a
:class:`~._spp_modules.ConstantBranch` holding the projection's bias, which is exactly the gated
branch's output with all gates at 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from rmtp.architecture import PrunableLayer
from rmtp.errors import RmtpError
from rmtp.modules import apply_patch, patches_of
from rmtp_plugins._spp_modules import AttentionHeads, ConstantBranch, SlicedLinear

Kind = Literal["head", "neuron"]
_LINEARS = (nn.Linear, SlicedLinear)
_ATTN_LAYER = re.compile(r"(?P<block>.+)\.attn\.(qkv|proj)")
_MLP_LAYER = re.compile(r"(?P<block>.+)\.mlp\.(fc1|fc2)")


@dataclass(frozen=True)
class Unit:
    """The gated groups of one branch: ``count`` heads of an attention or neurons of an MLP."""

    path: str  # "blocks.0.attn" / "blocks.0.mlp"
    kind: Kind
    count: int
    width: int  # channels per group at the projection input: head_dim, or 1 for a neuron
    group_params: int  # parameters one group holds (all removed with it)
    offset: int  # index of the unit's first gate in the flat gate vector

    @property
    def gates(self) -> slice:
        return slice(self.offset, self.offset + self.count)

    @property
    def projection(self) -> str:
        """The layer whose input the gates multiply."""
        return f"{self.path}.proj" if self.kind == "head" else f"{self.path}.fc2"


def _plain_linear(module: nn.Module) -> bool:
    return type(module) in _LINEARS


def attention_problem(attn: nn.Module) -> str | None:
    """Why spp cannot gate/slice the heads of ``attn`` (``None`` if it can)."""
    if type(attn) is not Attention:
        return f"a {type(attn).__name__}, not timm's Attention"
    if not (_plain_linear(attn.qkv) and _plain_linear(attn.proj)):
        return (f"its qkv/proj are {type(attn.qkv).__name__}/{type(attn.proj).__name__}, not plain Linears "
                f"(run spp before layer-replacing pruners such as svd-mp)")
    if getattr(attn, "gate", None) is not None:
        return "it has an output gate (gated attention), which spp does not slice"
    if not isinstance(attn.norm, nn.Identity):
        return "it normalises the concatenated heads (scale_norm), which mixes heads"
    if attn.proj.in_features != attn.num_heads * attn.head_dim or attn.qkv.out_features != 3 * attn.proj.in_features:
        return "its qkv/proj sizes do not match num_heads·head_dim"
    return None


def mlp_problem(mlp: nn.Module) -> str | None:
    """Why spp cannot gate/slice the hidden neurons of ``mlp`` (``None`` if it can)."""
    if type(mlp) is not Mlp:
        return f"a {type(mlp).__name__}, not timm's Mlp (gated MLPs such as SwiGLU are not supported)"
    if not (_plain_linear(mlp.fc1) and _plain_linear(mlp.fc2)):
        return (f"its fc1/fc2 are {type(mlp.fc1).__name__}/{type(mlp.fc2).__name__}, not plain Linears "
                f"(run spp before layer-replacing pruners such as svd-mp)")
    if not isinstance(mlp.norm, nn.Identity):
        return "it normalises the hidden layer, which mixes neurons"
    return None


def find_units(model: nn.Module, layers: list[PrunableLayer], *, heads: bool, neurons: bool) -> list[Unit]:
    """The units behind the selected layers, in forward order.

    A block's heads are gated when its ``attn.qkv`` or ``attn.proj`` is selected, its neurons when
    ``mlp.fc1`` or ``mlp.fc2`` is. A branch an earlier spp step removed entirely has no groups left
    and is skipped. Raises :class:`RmtpError` naming the branch when one cannot be handled.
    """
    wanted: dict[str, Kind] = {}
    for layer in layers:
        if heads and (m := _ATTN_LAYER.fullmatch(layer.name)):
            wanted.setdefault(f"{m['block']}.attn", "head")
        elif neurons and (m := _MLP_LAYER.fullmatch(layer.name)):
            wanted.setdefault(f"{m['block']}.mlp", "neuron")
    units, offset = [], 0
    for path, module in model.named_modules():
        kind = wanted.get(path)
        if kind is None or isinstance(module, ConstantBranch):
            continue
        problem = attention_problem(module) if kind == "head" else mlp_problem(module)
        if problem:
            raise RmtpError(f"spp cannot prune the {kind}s of {path}: it is {problem}"
                            if problem.startswith("a ") else f"spp cannot prune the {kind}s of {path}: {problem}")
        if kind == "head":
            qkv, proj = module.qkv, module.proj
            width = module.head_dim
            per = 3 * width * (qkv.in_features + (qkv.bias is not None)) + width * proj.out_features
            unit = Unit(path, "head", module.num_heads, width, per, offset)
        else:
            fc1, fc2 = module.fc1, module.fc2
            per = fc1.in_features + (fc1.bias is not None) + fc2.out_features
            unit = Unit(path, "neuron", fc1.out_features, 1, per, offset)
        units.append(unit)
        offset += unit.count
    return units


def group_params(units: list[Unit]) -> torch.Tensor:
    """Parameters held by each group, as one vector in gate order."""
    return torch.cat([torch.full((u.count,), u.group_params, dtype=torch.float64) for u in units]) \
        if units else torch.zeros(0, dtype=torch.float64)


@contextmanager
def gated(model: nn.Module, units: list[Unit], gates: torch.Tensor) -> Iterator[None]:
    """Multiply every group's output by its entry of ``gates`` while inside the block."""
    handles = []

    def hook_for(unit: Unit):
        def scale(_module: nn.Module, args: tuple) -> tuple:
            g = gates[unit.gates]
            if unit.width > 1:
                g = g.repeat_interleave(unit.width)
            return (args[0] * g.to(args[0].dtype), *args[1:])
        return scale

    try:
        for unit in units:
            handles.append(model.get_submodule(unit.projection).register_forward_pre_hook(hook_for(unit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def slice_unit(model: nn.Module, unit: Unit, keep: torch.Tensor, gates: torch.Tensor | None) -> int:
    """Remove the groups of ``unit`` where ``keep`` is False; return how many it keeps.

    ``gates`` (the unit's gate values) are folded into the kept projection columns; ``None`` keeps
    the weights as they are (gates reset to 1). Head counts are recorded with the
    :class:`AttentionHeads` patch so the model saves and reloads.
    """
    kept = torch.nonzero(keep).flatten()
    branch = model.get_submodule(unit.path)
    out_layer = branch.proj if unit.kind == "head" else branch.fc2
    if kept.numel() == 0:
        constant = ConstantBranch(out_layer.out_features, bias=out_layer.bias is not None).to(out_layer.weight)
        if out_layer.bias is not None:
            with torch.no_grad():
                constant.bias.copy_(out_layer.bias)
        model.set_submodule(unit.path, constant)
        if unit.kind == "head":
            _record_heads(model, {unit.path: 0})
        return 0
    if kept.numel() == unit.count and gates is None:
        return unit.count
    in_layer = branch.qkv if unit.kind == "head" else branch.fc1
    cols = (kept[:, None] * unit.width + torch.arange(unit.width, device=kept.device)).flatten()
    if unit.kind == "head":
        dim = unit.count * unit.width
        rows = torch.cat([cols + part * dim for part in range(3)])  # q, k, v rows of the kept heads
    else:
        rows = cols
    new_in = SlicedLinear.from_rows_cols(in_layer, rows=rows)
    new_out = SlicedLinear.from_rows_cols(out_layer, cols=cols)
    if gates is not None:
        scale = gates[kept].repeat_interleave(unit.width).to(new_out.weight)
        with torch.no_grad():
            new_out.weight.mul_(scale)
    if unit.kind == "head":
        branch.qkv, branch.proj = new_in, new_out
        _record_heads(model, {unit.path: int(kept.numel())})
    else:
        branch.fc1, branch.fc2 = new_in, new_out
    return int(kept.numel())


def _record_heads(model: nn.Module, heads: dict[str, int]) -> None:
    existing = next((p for p in patches_of(model) if isinstance(p, AttentionHeads)), None)
    if existing is not None:
        existing.update(model, heads)
    elif any(count > 0 for count in heads.values()):
        apply_patch(model, AttentionHeads(heads={k: v for k, v in heads.items() if v > 0}))
