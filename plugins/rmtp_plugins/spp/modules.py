"""Modules and the patch a ``spp``-sliced ViT is made of, so it saves and reloads like any other.

Slicing heads and neurons changes layer shapes, which a timm model rebuilt from its name cannot
hold. Three small pieces describe the change for :func:`rmtp.load`:

* :class:`SlicedLinear` — an ``nn.Linear`` with its own (smaller) in/out features. It *is* a Linear,
  so every later step (finetune masks and penalties, svd-mp, n:m) treats it as one.
* :class:`ConstantBranch` — what an attention or MLP branch becomes when every head/neuron is
  removed: the branch then outputs its output projection's bias for every token, exactly what the
  gated model computes with all gates at 0, with no 0-width Linear anywhere.
* :class:`AttentionHeads` — a :class:`~rmtp.contract.saved_types.ModelPatch` that records the head counts of
  attentions whose qkv/proj were sliced, through the architecture (``num_heads`` and ``attn_dim``
  of timm's ``Attention``). The attention keeps its own class, so the token pruners still patch
  it. A patch is re-applied by :func:`rmtp.load` after the weights, which is when the smaller
  ``SlicedLinear`` layers are already in place.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rmtp.contract.architecture import Architecture
from rmtp.contract.saved_types import ModelPatch, model_patch, rebuildable
from rmtp.errors import RmtpError
from rmtp.gemm import matrix_shape  # noqa: F401 - imported from here by plugins written before it moved
from rmtp.plugins import ArchitectureRef


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
    # and ``arch``: the architecture that records head counts (rmtp.plugins.ArchitectureRef)


@model_patch("spp.attention_heads", aliases=["rmtp_plugins._spp_modules.AttentionHeads"])
class AttentionHeads(ModelPatch):
    """Record the head counts of attentions whose qkv/proj spp sliced (``spp`` head pruning).

    The architecture sets the count on each module (:meth:`~rmtp.contract.architecture.Architecture.set_head_count`:
    ``num_heads``/``attn_dim`` of timm's ``Attention`` for ``vit`` and ``deit``). ``apply`` checks
    every module (the architecture refuses sizes that do not fit) and, when one is refused, puts
    back the counts it already set where they still fit (on load the model is discarded anyway).
    The record belongs to the sliced layers, so ``rmtp.unpatch`` leaves it in place; ``remove``
    restores the previous counts only where the layers were given back their size, and otherwise
    leaves the counts the layers hold (the model keeps running).
    """

    changes_tokens = False  # it records head counts; every token still goes through every block

    def __init__(self, arch: str | Architecture = ArchitectureRef.UNNAMED, **config: Any):
        self._arch = ArchitectureRef(arch)
        self.config = _HeadsConfig(**config)
        self._previous: dict[str, int] = {}

    @property
    def arch(self) -> Architecture:
        return self._arch.get()

    def rmtp_config(self) -> dict[str, Any]:
        return self._arch.recorded_in({"heads": dict(self.config.heads)})

    def __repr__(self) -> str:
        return f"AttentionHeads({self.config.heads})"

    def apply(self, model: nn.Module) -> None:
        previous = {}
        for path in self.config.heads:
            try:
                previous[path] = _head_count(model.get_submodule(path))
            except AttributeError:
                raise RmtpError(f"spp heads patch: the model has no module {path!r}") from None
        done: list[str] = []
        try:
            for path, heads in self.config.heads.items():
                self.arch.set_head_count(model, path, heads)
                done.append(path)
        except RmtpError as exc:
            for path in done:
                self._restore(model, path, previous[path])
            raise RmtpError(f"spp heads patch: {exc}") from None
        self._previous.update(previous)

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
            self._previous.setdefault(path, _head_count(model.get_submodule(path)))
            self.arch.set_head_count(model, path, count)
        self.config = self.config.model_copy(update={"heads": merged})

    def remove(self, model: nn.Module) -> None:
        for path, heads in self._previous.items():
            if not isinstance(model.get_submodule(path), ConstantBranch):  # a later step removed it entirely
                self._restore(model, path, heads)
        self._previous = {}

    def _restore(self, model: nn.Module, path: str, heads: int) -> None:
        """Set an earlier head count back where the layers fit it (they may still be sliced)."""
        try:
            self.arch.set_head_count(model, path, heads)
        except RmtpError:
            pass  # the layers hold the sliced heads: their count stays, the model keeps running


def _head_count(attn: nn.Module) -> int:
    """The head count an attention holds now (what :meth:`AttentionHeads.remove` restores)."""
    count = getattr(attn, "num_heads", None)
    if not isinstance(count, int):
        raise RmtpError(f"spp heads patch: a {type(attn).__name__} has no head count (num_heads)")
    return count
