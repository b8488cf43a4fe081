"""``swin``: timm Swin Transformer (v1) models (``swin_*`` from ``timm.models.swin_transformer``).

Stages ``layers.{i}`` of blocks ``layers.{i}.blocks.{j}``, each a window attention with a fused
``attn.qkv`` (rows: all of q, then k, then v) and ``attn.proj``, and an MLP ``mlp.fc1`` /
``mlp.fc2``; between stages a patch merging ``layers.{i}.downsample.reduction`` (4C → 2C, optional,
as are the patch embedding and the classifier ``head.fc``).

What the family refuses, and why:

* removing attention heads (spp ``structures: [heads]``): each head adds its own learned
  relative-position bias (a column of ``relative_position_bias_table``), which slicing qkv and proj
  alone would leave at the old head count. MLP neurons are cut like a ViT's.
* token pruners: attention runs inside fixed windows of a token grid, shifted every other block,
  and stages merge 2×2 patches: dropping or merging tokens breaks the grid every block relies on.

Swin V2 (``swinv2_*``, cosine attention with a continuous position bias, q/v biases outside
``qkv``) is another timm module: the ``swinv2`` family (``swinv2.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.contract.architecture import Coupling, TokenBlocks
from rmtp.contract.hookspecs import hookimpl
from rmtp.errors import PluginError
from rmtp_plugins.architectures.timm_family import (
    LayerRule,
    TimmFamily,
    attention_and_mlp_couplings,
    fused_qkv_split,
    timm_mlp_problem,
)

if TYPE_CHECKING:
    from torch import nn

_QKV = LayerRule(r"layers\.\d+\.blocks\.\d+\.attn\.qkv", "qkv")


class SwinArchitecture(TimmFamily):
    name = "swin"
    description = "timm Swin Transformer (v1): window attention qkv, proj, fc1, fc2 per block; patch merging optional."
    model_patterns = ("swin_*",)
    timm_modules = ("swin_transformer",)
    block_pattern = r"layers\.\d+\.blocks\.\d+"
    block_children = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    layer_rules = (
        LayerRule(r"patch_embed\.proj", "patch_embed", optional=True),
        _QKV,
        LayerRule(r"layers\.\d+\.blocks\.\d+\.attn\.proj", "proj"),
        LayerRule(r"layers\.\d+\.blocks\.\d+\.mlp\.fc1", "fc1"),
        LayerRule(r"layers\.\d+\.blocks\.\d+\.mlp\.fc2", "fc2"),
        LayerRule(r"layers\.\d+\.downsample\.reduction", "downsample", optional=True),
        LayerRule(r"head\.fc", "head", optional=True),
    )

    def qkv_split(self, layer_name: str, module: nn.Module) -> dict[str, slice] | None:
        """q, k and v as thirds of ``attn.qkv``'s output rows, the order the window attention unbinds them in."""
        return fused_qkv_split(_QKV, layer_name, module)

    def couplings(self, model: nn.Module) -> list[Coupling]:
        """Per block: the window attention's heads (v rows of ``attn.qkv`` → ``attn.proj``; n:m may
        permute channels within a head, which leaves every head's bias in place) and the MLP's
        hidden neurons."""
        return attention_and_mlp_couplings(self, model)

    def removal_problem(self, model: nn.Module, coupling: Coupling) -> str | None:
        """Neurons of timm's ``Mlp`` can be removed; heads cannot (the module docstring says why)."""
        if coupling.kind == "heads":
            return ("Swin's window attention adds a learned relative-position bias per head "
                    "(relative_position_bias_table), which removing heads from qkv and proj would not follow")
        return timm_mlp_problem(model.get_submodule(coupling.name))

    def token_blocks(self, model: nn.Module) -> TokenBlocks:
        raise PluginError("Swin attends within fixed windows of a token grid (shifted every other block) and merges "
                          "2×2 patches between stages, so dropping or merging tokens would break the grid")


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(SwinArchitecture)
