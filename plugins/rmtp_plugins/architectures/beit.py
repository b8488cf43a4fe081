"""``beit``: timm BEiT and BEiT v2 models (``beit_*``, ``beitv2_*`` from ``timm.models.beit``).

Blocks ``blocks.{i}`` like a ViT's: a fused ``attn.qkv`` (rows: all of q, then k, then v) and
``attn.proj``, timm's ``Mlp`` (``mlp.fc1`` / ``mlp.fc2``), layer scales ``gamma_1``/``gamma_2``; the
patch embedding ``patch_embed.proj`` and the classifier ``head`` are optional. Each attention adds a
learned relative-position bias over the fixed patch grid, one table column per head (or one table
shared by all blocks).

**The q/v bias** sits outside ``qkv`` (``q_bias``, ``v_bias``, added in
``F.linear(x, qkv.weight, bias)``), as in EVA-02 and Swin V2:
:class:`~rmtp_plugins.architectures.timm_family.QkvBiasOutside` routes every model rmtp builds or
reloads through timm's ``qkv_bias_separate`` path, so svd-mp's split ``qkv`` is really called.

What the family refuses, and why:

* attention heads (spp ``structures: [heads]``, n:m permutations within heads): not declared. Each
  head has its own relative-position bias, and its q/k/v biases live outside ``qkv``, where slicing
  or permuting ``qkv``'s rows would leave them behind. MLP neurons are cut and permuted like a ViT's.
* token pruners: the relative-position bias is laid out for the whole patch grid, which dropping or
  merging tokens would leave at the wrong positions.

BEiT-3 (``beit3_*``, another timm module) is not matched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.contract.architecture import TokenBlocks
from rmtp.contract.hookspecs import hookimpl
from rmtp.errors import PluginError
from rmtp_plugins.architectures.timm_family import QkvBiasOutside
from rmtp_plugins.architectures.vit import VitArchitecture

if TYPE_CHECKING:
    from torch import nn


class BeitArchitecture(QkvBiasOutside):
    name = "beit"
    description = ("timm BEiT, BEiT v2: qkv, proj, fc1, fc2 per block (q/v biases routed through qkv); "
                   "spp on MLP neurons.")
    model_patterns = ("beit_*", "beitv2_*")
    timm_modules = ("beit",)
    # the ViT's block layout and layer names (its ``head_dist`` rule matches nothing in a BEiT)
    block_pattern = VitArchitecture.block_pattern
    block_children = VitArchitecture.block_children
    layer_rules = VitArchitecture.layer_rules

    # q, k and v as thirds of ``attn.qkv``'s output rows: BEiT's attention unbinds them as timm's ViT does
    qkv_split = VitArchitecture.qkv_split

    def token_blocks(self, model: nn.Module) -> TokenBlocks:
        raise PluginError("BEiT adds a learned relative-position bias laid out for the whole patch grid, which "
                          "dropping or merging tokens would leave at the wrong positions")


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(BeitArchitecture)
