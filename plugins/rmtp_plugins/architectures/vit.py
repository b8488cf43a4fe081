"""``vit``: timm VisionTransformer models (ViT, DeiT, DeiT III, FlexiViT, hybrid and rel-pos ViTs).

Every block ``blocks.{i}`` holds a fused ``attn.qkv`` projection (rows: all of q, then k, then v),
the attention output ``attn.proj`` and the MLP ``mlp.fc1`` / ``mlp.fc2``. The classifier ``head``
(and DeiT's distillation ``head_dist``) and the patch embedding ``patch_embed.proj`` are optional.

Eva and BEiT models (``timm.models.eva`` / ``beit``, which also own many ``vit_*`` names such as
``vit_base_patch16_dinov3``) are not matched although most name their layers the same: their
attention is a different class (rotary embeddings, ...), and where it has a qkv bias it keeps q/v
biases outside ``qkv`` and calls ``F.linear(x, qkv.weight, bias)``, so a pruner that replaced
``qkv`` would silently be bypassed. Forcing ``arch: vit`` on such a model is refused for that case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.architecture import Coupling
from rmtp.hookspecs import hookimpl
from rmtp_plugins.architectures.timm_family import LayerRule, TimmFamily, children_present, mlp_coupling

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
    unsupported_patterns = ("vit_*_xp_*", "vit_pwee_*", "vit_dpwee_*", "vit_*_18x2_*")
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
        from torch import nn

        if not _QKV.matches(layer_name) or not isinstance(module, nn.Linear) or module.out_features % 3:
            return None
        dim = module.out_features // 3
        return {"q": slice(0, dim), "k": slice(dim, 2 * dim), "v": slice(2 * dim, 3 * dim)}

    def couplings(self, model: nn.Module) -> list[Coupling]:
        """Per block: the attention heads (v rows of ``attn.qkv`` → ``attn.proj``, head_dim channels a
        head) and the MLP's hidden neurons (``mlp.fc1`` → ``mlp.fc2``)."""
        found: list[Coupling] = []
        for block_name, _ in self._blocks(model):
            heads = _head_coupling(model, f"{block_name}.attn")
            neurons = mlp_coupling(model, f"{block_name}.mlp")
            found += [c for c in (heads, neurons) if c is not None]
        return found


def _head_coupling(model: nn.Module, attn_name: str) -> Coupling | None:
    """The heads of the attention at ``attn_name``: ``num_heads`` groups of ``head_dim`` channels,
    the v rows of the fused ``qkv`` feeding ``proj``; ``None`` when the sizes do not say so (an
    earlier pruner replaced the branch, or this is not a fused-qkv attention)."""
    try:
        attn = model.get_submodule(attn_name)
        qkv, proj = attn.get_submodule("qkv"), attn.get_submodule("proj")
    except AttributeError:
        return None
    heads, head_dim = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    qkv_weight, proj_weight = getattr(qkv, "weight", None), getattr(proj, "weight", None)
    if not (isinstance(heads, int) and isinstance(head_dim, int)) or qkv_weight is None or proj_weight is None:
        return None
    dim = heads * head_dim
    if qkv_weight.ndim != 2 or qkv_weight.shape[0] != 3 * dim or proj_weight.shape[1] != dim:
        return None
    return Coupling("heads", attn_name, f"{attn_name}.qkv", f"{attn_name}.proj",
                    between=children_present(attn, attn_name, ("norm", "gate")), rows=slice(2 * dim, 3 * dim),
                    group=head_dim)


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(VitArchitecture)
