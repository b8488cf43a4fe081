"""``deit``: timm's distilled DeiT models (``deit_*_distilled_*``, ``VisionTransformerDistilled``).

A distilled DeiT is a ViT with a second prefix token, the distillation token, read by a second
classifier ``head_dist``; at inference the two heads' logits are averaged. Its blocks and layer
names are the ViT's, so everything but the model's own class is :mod:`.vit`'s declaration: the
token pruners keep both prefix tokens (``token-cls`` scores patches by the class token's
attention), and both heads are optional layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.contract.architecture import TokenBlocks
from rmtp.contract.hookspecs import hookimpl
from rmtp.errors import PluginError
from rmtp_plugins.architectures.vit import VitArchitecture, vit_token_blocks

if TYPE_CHECKING:
    from torch import nn


class DeitDistilledArchitecture(VitArchitecture):
    name = "deit"
    description = ("timm distilled DeiT (class + distillation token, two heads): qkv, proj, fc1, fc2 per block; "
                   "head and head_dist optional.")
    model_patterns = ("deit_*_distilled_*",)
    timm_modules = ("deit",)
    unsupported_patterns = ()

    def token_blocks(self, model: nn.Module) -> TokenBlocks:
        """timm's ``VisionTransformerDistilled``: two prefix tokens, the class token first."""
        from timm.models.deit import VisionTransformerDistilled

        if type(model) is not VisionTransformerDistilled:
            raise PluginError(f"it is a {type(model).__module__}.{type(model).__qualname__}, not timm's "
                              f"VisionTransformerDistilled (plain ViTs are the vit architecture's)")
        return vit_token_blocks(model)


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(DeitDistilledArchitecture)
