"""``eva``: timm's Eva family (``timm.models.eva``): EVA-02, DINOv3, Perception Encoder
(``vit_pe_*``), the RoPE ViTs (``vit_*_rope_*``) and the other models timm builds from ``Eva``.

Blocks ``blocks.{i}`` hold an attention with rotary position embeddings (``EvaAttention`` or
``AttentionRope``), either a fused ``attn.qkv`` (rows: all of q, then k, then v) or separate
``attn.q_proj`` / ``attn.k_proj`` / ``attn.v_proj``, and the output ``attn.proj``; and an MLP that
is timm's ``Mlp`` (``mlp.fc1`` / ``mlp.fc2``), a ``GluMlp`` (``mlp.fc1`` writes both halves of the
gated unit) or a ``SwiGLU`` (``mlp.fc1_g``, ``mlp.fc1_x``, ``mlp.fc2``). The classifier ``head`` and
the patch embedding ``patch_embed.proj`` are optional, as in ``vit``; an attention-pool head
(``attn_pool``) is not listed.

**The q/v bias.** Where an ``EvaAttention`` has a qkv bias (EVA-02, ``*_dinov3_qkvb``), it keeps
the q and v biases outside ``qkv`` and calls ``F.linear(x, qkv.weight, bias)``: a pruner that
replaced ``qkv`` by another module (svd-mp's two thin layers) would be bypassed. timm's own
alternative path, ``qkv_bias_separate``, computes the same thing as ``qkv(x) + bias``, through the
module. :meth:`EvaArchitecture.create` (every model rmtp builds or reloads) switches each such
attention to it (:func:`route_qkv_through_module`; outputs agree to float rounding, and the state
dict is unchanged). A model handed to ``rmtp.prune`` as it is keeps its ``qkv`` out of the prunable
layers until :func:`route_qkv_through_module` is called on it, so nothing is pruned that the
forward would not use.

What the family refuses, and why:

* removing attention heads (spp ``structures: [heads]``): no head couplings are declared (rotary
  embeddings per head dimension, grouped-query attention with separate projections). spp and n:m's
  permutations work on the neurons of timm's ``Mlp``; gated MLPs (``GluMlp``, ``SwiGLU``) are not
  cut (their hidden units come in pairs).
* token pruners: the blocks take rotary embeddings computed for the whole patch grid each forward,
  which dropping or merging tokens would leave at the wrong positions.
* block-wise reconstruction: a block takes those embeddings as a second input, where
  ``reconstruct`` fits blocks of one tensor in, one out. Distillation (``finetune`` with
  ``distill``) recovers these models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.contract.architecture import TokenBlocks
from rmtp.contract.hookspecs import hookimpl
from rmtp.errors import PluginError
from rmtp_plugins.architectures.timm_family import (
    LayerRule,
    QkvBiasOutside,
    fused_qkv_split,
)

if TYPE_CHECKING:
    from torch import nn

_QKV = LayerRule(r"blocks\.\d+\.attn\.qkv", "qkv")


class EvaArchitecture(QkvBiasOutside):
    name = "eva"
    description = ("timm Eva family (EVA-02, DINOv3, Perception Encoder, RoPE ViTs): qkv or q/k/v_proj, proj, "
                   "fc1(/fc1_g, fc1_x), fc2 per block; per-layer pruners, spp on plain MLP neurons.")
    model_patterns = ("eva*", "vit_*")
    timm_modules = ("eva",)
    block_pattern = r"blocks\.\d+"
    block_children = ("attn", "attn.proj", "mlp", "mlp.fc2")
    layer_rules = (
        LayerRule(r"patch_embed\.proj", "patch_embed", optional=True),
        _QKV,
        LayerRule(r"blocks\.\d+\.attn\.q_proj", "q"),
        LayerRule(r"blocks\.\d+\.attn\.k_proj", "k"),
        LayerRule(r"blocks\.\d+\.attn\.v_proj", "v"),
        LayerRule(r"blocks\.\d+\.attn\.proj", "proj"),
        LayerRule(r"blocks\.\d+\.mlp\.fc1", "fc1"),
        LayerRule(r"blocks\.\d+\.mlp\.fc1_g", "fc1_g"),
        LayerRule(r"blocks\.\d+\.mlp\.fc1_x", "fc1_x"),
        LayerRule(r"blocks\.\d+\.mlp\.fc2", "fc2"),
        LayerRule(r"head", "head", optional=True),
    )

    def matches(self, model_name: str) -> bool:
        """:class:`TimmFamily`'s test; a ``vit_*`` name timm does not know is left to ``vit``, which
        answers a typo with timm's similar names (both globs would otherwise claim it)."""
        import timm

        if not timm.is_model(model_name.split(".")[0]) and not model_name.startswith("eva"):
            return False
        return super().matches(model_name)

    def block_problem(self, block: nn.Module) -> str | None:
        attn = block.get_submodule("attn")
        if getattr(attn, "qkv", None) is None and getattr(attn, "q_proj", None) is None:
            return "its attention has neither a fused qkv nor q_proj/k_proj/v_proj"
        return None

    def qkv_split(self, layer_name: str, module: nn.Module) -> dict[str, slice] | None:
        """q, k and v as thirds of a fused ``attn.qkv``'s output rows, the order Eva's attentions unbind
        them in (a fused qkv has as many key/value heads as query heads: timm refuses grouped queries there)."""
        return fused_qkv_split(_QKV, layer_name, module)

    def blocks(self, model: nn.Module) -> list[str]:
        """None: an Eva block takes the rotary embeddings as a second input (``blk(x, rope=...)``), and
        block-wise reconstruction replays a block on its first input alone, which would fit it
        without its positions (module docstring)."""
        return []

    def token_blocks(self, model: nn.Module) -> TokenBlocks:
        raise PluginError("Eva blocks take rotary position embeddings computed for the whole patch grid, which "
                          "dropping or merging tokens would leave at the wrong positions")


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(EvaArchitecture)
