"""``resnet``: timm ResNet models (ResNet, ResNet-D, Wide ResNet, ResNeXt, SE/ECA-ResNet, ResNet-RS).

Every block ``layer{i}.{j}`` has ``conv1`` and ``conv2`` (basic blocks) or ``conv1``, ``conv2``
and ``conv3`` (bottlenecks); the first block of a stage may have a projection shortcut whose
convolution is ``downsample.0`` (``downsample.1`` after the average pool of ``*d`` models). The
stem ``conv1`` (``conv1.{k}`` for deep stems) and the classifier ``fc`` are optional.
ResNeXt's grouped ``conv2`` is never listed: its weight is ``groups`` separate matrices.
``resnetv2_*`` and the ByobNet-built ``resnet*ts`` / ``*_clip`` models use other names and are
not covered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.contract.architecture import Coupling
from rmtp.contract.hookspecs import hookimpl
from rmtp_plugins.architectures.timm_family import LayerRule, TimmFamily, children_present

if TYPE_CHECKING:
    from torch import nn


class ResNetArchitecture(TimmFamily):
    name = "resnet"
    description = "timm ResNet family (ResNet, -D, Wide, ResNeXt, SE/ECA, RS): block convs and shortcut projections."
    model_patterns = ("resnet*", "wide_resnet*", "resnext*", "seresnet*", "seresnext*", "ecaresnet*")
    timm_modules = ("resnet",)
    block_pattern = r"layer\d+\.\d+"
    block_children = ("conv1", "conv2")
    layer_rules = (
        LayerRule(r"conv1(\.\d+)?", "stem", optional=True),
        LayerRule(r"layer\d+\.\d+\.conv1", "conv1"),
        LayerRule(r"layer\d+\.\d+\.conv2", "conv2"),
        LayerRule(r"layer\d+\.\d+\.conv3", "conv3"),
        LayerRule(r"layer\d+\.\d+\.downsample\.\d+", "downsample"),
        LayerRule(r"fc", "head", optional=True),
    )

    def couplings(self, model: nn.Module) -> list[Coupling]:
        """Per residual block, the inner channels: a ``BasicBlock``'s ``conv1`` outputs (→ bn1,
        DropBlock, act1, anti-alias pool → ``conv2``); a ``Bottleneck``'s ``conv1`` outputs (→ bn1,
        act1 → ``conv2``) and ``conv2`` outputs (→ bn2, DropBlock, act2, anti-alias pool → ``conv3``),
        in the order timm's ``forward`` applies them. The shortcut and the block's output channels
        are shared by the whole stage's residual stream and are not declared."""
        from timm.models.resnet import BasicBlock, Bottleneck

        found: list[Coupling] = []
        for block_name, block in self._blocks(model):
            if type(block) is BasicBlock:
                chains = [(1, 2, ("bn1", "drop_block", "act1", "aa"))]
            elif type(block) is Bottleneck:
                chains = [(1, 2, ("bn1", "act1")), (2, 3, ("bn2", "drop_block", "act2", "aa"))]
            else:
                continue
            for producer, consumer, between in chains:
                conv = f"{block_name}.conv{producer}"
                found.append(Coupling("channels", conv, conv, f"{block_name}.conv{consumer}",
                                      between=children_present(block, block_name, between),
                                      norms=children_present(block, block_name, (f"bn{producer}",))))
        return found


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(ResNetArchitecture)
