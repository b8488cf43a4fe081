"""``convnext``: timm ConvNeXt models (V1 and V2, ``conv_mlp`` variants included).

Every block ``stages.{i}.blocks.{j}`` is a depthwise 7×7 ``conv_dw`` followed by the MLP
``mlp.fc1`` / ``mlp.fc2`` (``nn.Linear``, or 1×1 convolutions when ``conv_mlp=True``); stages
after the first open with a strided ``downsample.1`` convolution. The depthwise ``conv_dw`` is
never listed: its weight is one tiny filter per channel, not a matrix to prune. The stem
convolution(s) and the classifier ``head.fc`` are optional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rmtp.contract.architecture import Coupling
from rmtp.contract.hookspecs import hookimpl
from rmtp_plugins.architectures.timm_family import LayerRule, TimmFamily, mlp_coupling, timm_mlp_problem

if TYPE_CHECKING:
    from torch import nn


class ConvNextArchitecture(TimmFamily):
    name = "convnext"
    description = "timm ConvNeXt family (V1, V2): mlp fc1/fc2 per block and stage downsamples, never conv_dw."
    model_patterns = ("convnext*",)
    timm_modules = ("convnext",)
    block_pattern = r"stages\.\d+\.blocks\.\d+"
    block_children = ("conv_dw", "mlp.fc1", "mlp.fc2")
    layer_rules = (
        LayerRule(r"stem\.\d+", "stem", optional=True),
        LayerRule(r"stages\.\d+\.downsample\.\d+", "downsample"),
        LayerRule(r"stages\.\d+\.blocks\.\d+\.mlp\.fc1", "fc1"),
        LayerRule(r"stages\.\d+\.blocks\.\d+\.mlp\.fc2", "fc2"),
        LayerRule(r"head\.fc|head\.pre_logits\.fc", "head", optional=True),
    )

    def couplings(self, model: nn.Module) -> list[Coupling]:
        """Per block: the MLP's hidden channels (``mlp.fc1`` → act, GRN in V2 → ``mlp.fc2``)."""
        found = (mlp_coupling(model, f"{block_name}.mlp") for block_name, _ in self._blocks(model))
        return [c for c in found if c is not None]

    def removal_problem(self, model: nn.Module, coupling: Coupling) -> str | None:
        """Hidden channels of timm's ``Mlp`` can be removed; ConvNeXt-V2's GRN MLP mixes them."""
        return timm_mlp_problem(model.get_submodule(coupling.name))


@hookimpl
def register_architectures(register: Callable[[type], None]) -> None:
    register(ConvNextArchitecture)
