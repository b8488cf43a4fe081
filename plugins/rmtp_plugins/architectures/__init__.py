"""The built-in architecture plugins: timm ``vit``, ``convnext`` and ``resnet`` models.

Each family is one module and one entry point (``rmtp_plugins.architectures.vit`` …) declaring,
on top of :class:`.timm_family.TimmFamily`, the timm names it covers, its prunable-layer rules, its
qkv split and its couplings (:class:`rmtp.contract.architecture.Coupling`: which layers share a hidden
dimension). The pruners read only that contract, so a new family is one more module here (or in
a third-party package) and no pruner changes.
"""

from __future__ import annotations

from rmtp_plugins.architectures.convnext import ConvNextArchitecture
from rmtp_plugins.architectures.resnet import ResNetArchitecture
from rmtp_plugins.architectures.timm_family import LayerRule, TimmFamily
from rmtp_plugins.architectures.vit import VitArchitecture

__all__ = ["ConvNextArchitecture", "LayerRule", "ResNetArchitecture", "TimmFamily", "VitArchitecture"]
