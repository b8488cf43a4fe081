"""ViT attention heads for ``spp``: which attentions qualify, their units, and slicing them.

A head's gate γ_h multiplies that head's output before the output projection (the ``head_dim``
input columns of ``attn.proj`` that belong to head h). Removing head h drops its q, k and v rows
of ``attn.qkv`` (3·head_dim rows, at offsets 0, D, 2D of the fused projection, D = heads·head_dim)
and its columns of ``attn.proj``; new head counts are recorded with the :class:`AttentionHeads`
patch so the model saves and reloads. An attention that loses every head becomes a
:class:`~.modules.ConstantBranch` holding ``proj``'s bias.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from rmtp.modules import apply_patch, patches_of
from rmtp_plugins.spp.modules import AttentionHeads, ConstantBranch, SlicedLinear
from rmtp_plugins.spp.unit import Unit

_LINEARS = (nn.Linear, SlicedLinear)


def plain_linear(module: nn.Module) -> bool:
    return type(module) in _LINEARS


def attention_problem(attn: nn.Module) -> str | None:
    """Why spp cannot gate/slice the heads of ``attn`` (``None`` if it can)."""
    if type(attn) is not Attention:
        return f"a {type(attn).__name__}, not timm's Attention"
    if not (plain_linear(attn.qkv) and plain_linear(attn.proj)):
        return (f"its qkv/proj are {type(attn.qkv).__name__}/{type(attn.proj).__name__}, not plain Linears "
                f"(run spp before layer-replacing pruners such as svd-mp)")
    if getattr(attn, "gate", None) is not None:
        return "it has an output gate (gated attention), which spp does not slice"
    if not isinstance(attn.norm, nn.Identity):
        return "it normalises the concatenated heads (scale_norm), which mixes heads"
    if attn.proj.in_features != attn.num_heads * attn.head_dim or attn.qkv.out_features != 3 * attn.proj.in_features:
        return "its qkv/proj sizes do not match num_heads·head_dim"
    return None


def head_unit(path: str, attn: nn.Module) -> Unit:
    qkv, proj = attn.qkv, attn.proj
    width = attn.head_dim
    per = 3 * width * (qkv.in_features + (qkv.bias is not None)) + width * proj.out_features
    return Unit(path, "head", attn.num_heads, width, per, 0, producer=f"{path}.qkv", consumer=f"{path}.proj")


def slice_heads(model: nn.Module, unit: Unit, kept: torch.Tensor, gates: torch.Tensor | None) -> int:
    attn = model.get_submodule(unit.path)
    if kept.numel() == 0:
        model.set_submodule(unit.path, ConstantBranch.replacing(attn.proj))
        _record_heads(model, {unit.path: 0})
        return 0
    if kept.numel() == unit.count and gates is None:
        return unit.count
    cols = (kept[:, None] * unit.width + torch.arange(unit.width, device=kept.device)).flatten()
    dim = unit.count * unit.width
    rows = torch.cat([cols + part * dim for part in range(3)])  # q, k, v rows of the kept heads
    new_qkv = SlicedLinear.from_rows_cols(attn.qkv, rows=rows)
    new_proj = SlicedLinear.from_rows_cols(attn.proj, cols=cols)
    if gates is not None:
        with torch.no_grad():
            new_proj.weight.mul_(gates[kept].repeat_interleave(unit.width).to(new_proj.weight))
    attn.qkv, attn.proj = new_qkv, new_proj
    _record_heads(model, {unit.path: int(kept.numel())})
    return int(kept.numel())


def _record_heads(model: nn.Module, heads: dict[str, int]) -> None:
    existing = next((p for p in patches_of(model) if isinstance(p, AttentionHeads)), None)
    if existing is not None:
        existing.update(model, heads)
    elif any(count > 0 for count in heads.values()):
        apply_patch(model, AttentionHeads(heads={k: v for k, v in heads.items() if v > 0}))
