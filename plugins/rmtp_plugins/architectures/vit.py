"""``vit``: timm VisionTransformer models (ViT, DeiT, DeiT III, FlexiViT, hybrid and rel-pos ViTs).

Every block ``blocks.{i}`` holds a fused ``attn.qkv`` projection (rows: all of q, then k, then v),
the attention output ``attn.proj`` and the MLP ``mlp.fc1`` / ``mlp.fc2``. The classifier ``head``
(and DeiT's distillation ``head_dist``) and the patch embedding ``patch_embed.proj`` are optional.

Eva and BEiT models (``timm.models.eva`` / ``beit``, which also own many ``vit_*`` names such as
``vit_base_patch16_dinov3``) are not matched although most name their layers the same: their
attention is a different class (rotary embeddings, ...), and where it has a qkv bias it keeps q/v
biases outside ``qkv`` and calls ``F.linear(x, qkv.weight, bias)``, so a pruner that replaced
``qkv`` would silently be bypassed. Forcing ``arch: vit`` on such a model is refused for that case.
Eva models are the ``eva`` family's (architectures/eva.py, which routes those biases through ``qkv``).
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
    timm_attention_problem,
    timm_mlp_problem,
)

if TYPE_CHECKING:
    from torch import nn

_QKV = LayerRule(r"blocks\.\d+\.attn\.qkv", "qkv")


class VitArchitecture(TimmFamily):
    name = "vit"
    description = "timm VisionTransformer family (ViT, DeiT, DeiT III, FlexiViT): qkv, proj, fc1, fc2 per block."
    model_patterns = ("vit_*", "deit_*", "deit3_*", "flexivit_*")
    timm_modules = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "deit")
    # Same timm module, other block types: ParallelScalingBlock (in_proj/out_proj) and
    # ParallelThingsBlock (blocks.{i}.attns.{j}.attn.qkv).
    # Distilled DeiT (two prefix tokens, two heads) is the ``deit`` family's (architectures/deit.py).
    unsupported_patterns = ("vit_*_xp_*", "vit_pwee_*", "vit_dpwee_*", "vit_*_18x2_*", "deit_*_distilled_*")
    block_pattern = r"blocks\.\d+"
    block_children = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    layer_rules = (
        LayerRule(r"patch_embed\.proj", "patch_embed", optional=True),
        _QKV,
        LayerRule(r"blocks\.\d+\.attn\.proj", "proj"),
        LayerRule(r"blocks\.\d+\.mlp\.fc1", "fc1"),
        LayerRule(r"blocks\.\d+\.mlp\.fc2", "fc2"),
        LayerRule(r"head|head_dist", "head", optional=True),
    )

    def block_problem(self, block: nn.Module) -> str | None:
        attn = block.get_submodule("attn")
        if getattr(attn, "q_bias", None) is not None or getattr(attn, "v_bias", None) is not None:
            return "its attention adds q/v biases outside attn.qkv (Eva/BEiT style), which layer pruning cannot follow"
        return None

    def qkv_split(self, layer_name: str, module: nn.Module) -> dict[str, slice] | None:
        """q, k and v as thirds of ``attn.qkv``'s output rows, the order timm's attention unbinds them in."""
        return fused_qkv_split(_QKV, layer_name, module)

    def couplings(self, model: nn.Module) -> list[Coupling]:
        """Per block: the attention heads (v rows of ``attn.qkv`` → ``attn.proj``, head_dim channels a
        head) and the MLP's hidden neurons (``mlp.fc1`` → ``mlp.fc2``)."""
        return attention_and_mlp_couplings(self, model)

    def removal_problem(self, model: nn.Module, coupling: Coupling) -> str | None:
        """Heads of timm's ``Attention`` (no output gate, no norm over the heads) and neurons of
        timm's ``Mlp`` can be removed."""
        module = model.get_submodule(coupling.name)
        if coupling.kind == "heads":
            return timm_attention_problem(module)
        if coupling.kind == "neurons":
            return timm_mlp_problem(module)
        return None

    def set_head_count(self, model: nn.Module, attention: str, count: int) -> None:
        """timm's ``Attention`` reshapes by ``num_heads`` and ``attn_dim`` (= heads·head_dim)."""
        from timm.layers import Attention

        from rmtp.gemm import matrix_shape

        attn = model.get_submodule(attention)
        if not isinstance(attn, Attention):
            raise PluginError(f"{attention} is a {type(attn).__name__}, not timm's Attention")
        width = count * attn.head_dim
        qkv_out, proj_in = matrix_shape(attn.qkv)[0], matrix_shape(attn.proj)[1]
        if count < 1 or qkv_out != 3 * width or proj_in != width:
            raise PluginError(f"{attention} cannot hold {count} heads of {attn.head_dim} (qkv has {qkv_out} "
                              f"outputs, proj {proj_in} inputs)")
        attn.num_heads, attn.attn_dim = count, width

    def token_blocks(self, model: nn.Module) -> TokenBlocks:
        """timm's plain ``VisionTransformer`` of pre-norm ``Block``s with timm's ``Attention``."""
        from timm.models.vision_transformer import VisionTransformer

        if type(model) is not VisionTransformer:
            raise PluginError(f"it is a {type(model).__module__}.{type(model).__qualname__}, not timm's "
                              f"VisionTransformer (other families, such as Eva, relative-position or hybrid-attention "
                              f"ViTs, compute their forward pass or positions differently)")
        return vit_token_blocks(model)


def vit_token_blocks(model: nn.Module) -> TokenBlocks:
    """The :class:`TokenBlocks` of a timm ``VisionTransformer`` (or subclass) whose blocks are timm's
    plain pre-norm ``Block`` with timm's ``Attention``; :class:`PluginError` naming the first block
    that is not (parallel or post-norm blocks, rotary or differential attention)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for index, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise PluginError(f"blocks.{index} is a {type(block).__qualname__}, not timm's plain Block (parallel, "
                              f"post-norm and other block types are not supported)")
        if type(block.attn) is not Attention:
            raise PluginError(f"blocks.{index}.attn is a {type(block.attn).__qualname__}, not timm's Attention "
                              f"(rotary, differential and other attention types are not supported)")
    return TokenBlocks(num_prefix_tokens=model.num_prefix_tokens, has_class_token=bool(model.has_class_token),
                       pool_takes_mask=_pool_takes_mask(getattr(model, "attn_pool", None)),
                       num_patches=model.patch_embed.num_patches, depth=len(model.blocks))


def _pool_takes_mask(pool: nn.Module | None) -> bool:
    """timm's ``AttentionPoolLatent`` (``global_pool: map``) adds its ``attn_mask`` to the logits of its
    learned query over the tokens; one with its own position embedding adds that per token position,
    which reducing tokens would misalign. ``AttentionPoolPrr`` (``prr``) takes no mask."""
    from timm.layers import AttentionPoolLatent

    return type(pool) is AttentionPoolLatent and getattr(pool, "pos_embed", None) is None


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(VitArchitecture)
