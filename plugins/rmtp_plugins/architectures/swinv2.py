"""``swinv2``: timm Swin Transformer V2 models (``swinv2_*`` from ``timm.models.swin_transformer_v2``).

The layout of ``swin``: stages ``layers.{i}`` of blocks ``layers.{i}.blocks.{j}``, each a window
attention with a fused ``attn.qkv`` (rows: all of q, then k, then v) and ``attn.proj``, and timm's
``Mlp`` (``mlp.fc1`` / ``mlp.fc2``); a stage after the first starts with a patch merging
``layers.{i}.downsample.reduction`` (optional, as are the patch embedding and ``head.fc``). The
attention is cosine attention with a per-head learned ``logit_scale`` and a continuous position
bias: a small MLP (``attn.cpb_mlp``, never listed as prunable) maps relative coordinates to one bias
per head.

**The q/v bias** sits outside ``qkv``, as in EVA-02 (``q_bias``, ``v_bias``, added in
``F.linear(x, qkv.weight, bias)``): :class:`~rmtp_plugins.architectures.timm_family.QkvBiasOutside`
routes every model rmtp builds or reloads through timm's ``qkv_bias_separate`` path, so svd-mp's
split ``qkv`` is really called.

What the family refuses, and why:

* attention heads (spp ``structures: [heads]``, n:m permutations within heads): not declared. Each
  head has its own logit scale and its own output of the position-bias MLP, and its q/k/v biases
  live outside ``qkv``, where slicing or permuting ``qkv``'s rows would leave them behind. MLP
  neurons are cut and permuted like a ViT's.
* token pruners: attention runs inside fixed windows of a token grid, shifted every other block,
  and stages merge 2×2 patches, as in ``swin``.

``swinv2_cr_*`` (another timm module, another layout) is not matched.
"""

from __future__ import annotations

from collections.abc import Callable

from rmtp.contract.hookspecs import hookimpl
from rmtp_plugins.architectures.swin import SwinArchitecture
from rmtp_plugins.architectures.timm_family import QkvBiasOutside


class SwinV2Architecture(QkvBiasOutside, SwinArchitecture):
    """Swin's layer names, blocks and token refusal, with :class:`QkvBiasOutside`'s routing and MLP-only couplings."""

    name = "swinv2"
    description = ("timm Swin Transformer V2: window attention qkv, proj, fc1, fc2 per block (q/v biases routed "
                   "through qkv); patch merging optional; spp on MLP neurons.")
    model_patterns = ("swinv2_*",)
    timm_modules = ("swin_transformer_v2",)


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(SwinV2Architecture)
