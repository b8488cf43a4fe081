"""Modules and the patch a ``spp``-sliced ViT is made of, so it saves and reloads like any other.

Slicing heads and neurons changes layer shapes, which a timm model rebuilt from its name cannot
hold. Three small pieces describe the change for :func:`rmtp.load`:

* :class:`SlicedLinear` — an ``nn.Linear`` with its own (smaller) in/out features. It *is* a Linear,
  so every later step (finetune masks and penalties, svd-mp, n:m) treats it as one.
* :class:`ConstantBranch` — what an attention or MLP branch becomes when every head/neuron is
  removed: the branch then outputs its output projection's bias for every token, exactly what the
  gated model computes with all gates at 0, with no 0-width Linear anywhere.
* :class:`AttentionHeads` — a :class:`~rmtp.modules.ModelPatch` that sets ``num_heads`` (and
  ``attn_dim``) of timm ``Attention`` modules whose qkv/proj were sliced. The Attention object stays
  timm's own class, so the token pruners (which accept only timm's ``Attention``) still patch it.
  A patch is re-applied by :func:`rmtp.load` after the weights, which is when the smaller
  ``SlicedLinear`` layers are already in place.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.models.vision_transformer import Attention
from torch import nn

from rmtp.errors import RmtpError
from rmtp.modules import ModelPatch, model_patch, rebuildable


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a Linear-like layer, also once a later pruner replaced or wrapped it
    (svd-mp's low-rank split exposes ``effective_shape``; n:m's permutation wrapper its ``weight``)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    shape = getattr(layer, "effective_shape", None)
    if shape is not None:
        return int(shape[0]), int(shape[1])
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    raise RmtpError(f"cannot tell the input and output sizes of a {type(layer).__name__}")


def sliced_parameters(layer: nn.Linear | nn.Conv2d, out: torch.Tensor | None, inputs: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of ``layer`` keeping output rows ``out`` and input columns ``inputs`` (``None``: all)."""
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    if out is not None:
        weight = weight[out]
        bias = bias[out] if bias is not None else None
    if inputs is not None:
        weight = weight[:, inputs]
    return weight, bias


def copy_parameters(layer: nn.Linear | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)


@rebuildable("spp.sliced_linear", aliases=["rmtp_plugins._spp_modules.SlicedLinear"])
class SlicedLinear(nn.Linear):
    """A Linear whose rows (outputs) or columns (inputs) were sliced away by ``spp``."""

    def rmtp_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_rows_cols(cls, linear: nn.Linear, rows: torch.Tensor | None = None,
                       cols: torch.Tensor | None = None) -> SlicedLinear:
        """The rows ``rows`` and columns ``cols`` (index tensors; ``None``: all) of ``linear``."""
        weight, bias = sliced_parameters(linear, rows, cols)
        new = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        copy_parameters(new, weight, bias)
        return new


@rebuildable("spp.constant_branch", aliases=["rmtp_plugins._spp_modules.ConstantBranch"])
class ConstantBranch(nn.Module):
    """A residual branch whose every head/neuron was removed: each token gets ``bias`` (or zeros).

    Accepts and ignores the extra arguments timm's Block passes to its attention (``attn_mask``,
    ``is_causal``): with no heads left there is nothing to mask.
    """

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.dim = dim
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def replacing(cls, out_layer: nn.Linear) -> ConstantBranch:
        """The branch ending in ``out_layer`` with every group removed: ``out_layer``'s bias."""
        constant = cls(out_layer.out_features, bias=out_layer.bias is not None).to(out_layer.weight)
        if out_layer.bias is not None:
            with torch.no_grad():
                constant.bias.copy_(out_layer.bias)
        return constant

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.dim)
        return out + self.bias if self.bias is not None else out

    def rmtp_config(self) -> dict[str, Any]:
        return {"dim": self.dim, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias={self.bias is not None} (every head/neuron removed by spp)"


class _HeadsConfig(BaseModel):
    """The JSON config of :class:`AttentionHeads` (validated again on load: a saved folder is untrusted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: dict[str, int] = Field(description="attention module path → its number of heads after slicing")


@model_patch("spp.attention_heads", aliases=["rmtp_plugins._spp_modules.AttentionHeads"])
class AttentionHeads(ModelPatch):
    """Set ``num_heads``/``attn_dim`` of sliced timm ``Attention`` modules (``spp`` head pruning).

    ``apply`` checks that each module's qkv and proj already have the sliced sizes (3·n·head_dim
    outputs, n·head_dim inputs) and refuses otherwise, leaving the model untouched; ``remove``
    restores the previous head counts (the layers stay sliced: removing the patch alone does not
    give back the dense model).
    """

    changes_tokens = False  # it records head counts; every token still goes through every block

    def __init__(self, **config: Any):
        self.config = _HeadsConfig(**config)
        self._previous: dict[str, tuple[int, int]] = {}

    def rmtp_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def __repr__(self) -> str:
        return f"AttentionHeads({self.config.heads})"

    def apply(self, model: nn.Module) -> None:
        modules = {}
        for path, heads in self.config.heads.items():
            try:
                attn = model.get_submodule(path)
            except AttributeError:
                raise RmtpError(f"spp heads patch: the model has no module {path!r}") from None
            if not isinstance(attn, Attention):
                raise RmtpError(f"spp heads patch: {path} is a {type(attn).__name__}, not timm's Attention")
            width = heads * attn.head_dim
            qkv_out, proj_in = matrix_shape(attn.qkv)[0], matrix_shape(attn.proj)[1]
            if heads < 1 or qkv_out != 3 * width or proj_in != width:
                raise RmtpError(f"spp heads patch: {path} cannot hold {heads} heads of {attn.head_dim} "
                                f"(qkv has {qkv_out} outputs, proj {proj_in} inputs)")
            modules[path] = attn
        for path, attn in modules.items():
            self._previous[path] = (attn.num_heads, attn.attn_dim)
            attn.num_heads = self.config.heads[path]
            attn.attn_dim = attn.num_heads * attn.head_dim

    def update(self, model: nn.Module, heads: dict[str, int]) -> None:
        """Record new head counts on a patch already applied to ``model`` (a second ``spp`` step).

        Merging keeps one patch whose config matches the saved layer sizes, so :func:`rmtp.load`
        re-applies it in one go; a count of 0 drops the path (its attention became a
        :class:`ConstantBranch`).
        """
        merged = {**self.config.heads, **heads}
        for path, count in heads.items():
            if count == 0:
                merged.pop(path)
                continue
            attn = model.get_submodule(path)
            self._previous.setdefault(path, (attn.num_heads, attn.attn_dim))
            attn.num_heads, attn.attn_dim = count, count * attn.head_dim
        self.config = _HeadsConfig(heads=merged)

    def remove(self, model: nn.Module) -> None:
        for path, (heads, dim) in self._previous.items():
            attn = model.get_submodule(path)
            if isinstance(attn, Attention):  # not a branch a later step removed entirely
                attn.num_heads, attn.attn_dim = heads, dim
        self._previous = {}
