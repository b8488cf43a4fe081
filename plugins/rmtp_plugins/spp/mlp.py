"""MLP hidden neurons for ``spp``: a timm ``Mlp`` of a ViT block or a ConvNeXt block.

The MLP is ``fc1 → act → fc2`` with ``fc1``/``fc2`` plain Linears (ViT, ConvNeXt's default
channels-last MLP) or 1×1 convolutions (ConvNeXt with ``conv_mlp=True``, channels first). A
neuron's gate multiplies its activation before ``fc2`` (a forward pre-hook); removing it drops its
``fc1`` row / output channel and its ``fc2`` column / input channel. An MLP that loses every neuron
becomes a constant branch holding ``fc2``'s bias (:class:`~.modules.ConstantBranch`
channels-last, :class:`~.conv_modules.ConstantChannels` channels-first); a ConvNeXt block
then still applies its layer scale ``gamma`` and drop-path to it, exactly as to the gated MLP.

Refused: MLPs the architecture says mix their hidden units (timm families: anything but timm's
``Mlp``, as SwiGLU/GLU mix two halves of the hidden layer and ConvNeXt-V2's
``GlobalResponseNormMlp`` divides every hidden channel by the mean over all channels;
:meth:`~rmtp.contract.architecture.Architecture.removal_problem`), and here, MLPs whose fc1/fc2
are not plain Linears or 1×1 convolutions or that normalise the hidden layer.
"""

from __future__ import annotations

import torch
from torch import nn

from rmtp_plugins.spp.conv_modules import ConstantChannels, SlicedConv2d
from rmtp_plugins.spp.heads import plain_linear
from rmtp_plugins.spp.modules import ConstantBranch, SlicedLinear
from rmtp_plugins.spp.unit import Unit

_CONVS = (nn.Conv2d, SlicedConv2d)


def _pointwise_conv(module: nn.Module) -> bool:
    return (type(module) in _CONVS and module.groups == 1 and tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) == (1, 1) and tuple(module.padding) == (0, 0))


def mlp_problem(mlp: nn.Module) -> str | None:
    """Why spp cannot gate/slice the hidden neurons of ``mlp`` (``None`` if it can)."""
    linear = plain_linear(mlp.fc1) and plain_linear(mlp.fc2)
    if not (linear or (_pointwise_conv(mlp.fc1) and _pointwise_conv(mlp.fc2))):
        return (f"its fc1/fc2 are {type(mlp.fc1).__name__}/{type(mlp.fc2).__name__}, not plain Linears or "
                f"1×1 convolutions (run spp before layer-replacing pruners such as svd-mp)")
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return "it normalises the hidden layer, which mixes neurons"
    return None


def neuron_unit(path: str, mlp: nn.Module) -> Unit:
    fc1, fc2 = mlp.fc1, mlp.fc2
    conv = isinstance(fc1, nn.Conv2d)
    fan_in = fc1.in_channels if conv else fc1.in_features
    fan_out = fc2.out_channels if conv else fc2.out_features
    count = fc1.out_channels if conv else fc1.out_features
    per = fan_in + (fc1.bias is not None) + fan_out
    return Unit(path, "neuron", count, 1, per, 0, producer=f"{path}.fc1", consumer=f"{path}.fc2",
                channel_dim=1 if conv else -1)


def slice_neurons(model: nn.Module, unit: Unit, kept: torch.Tensor, gates: torch.Tensor | None) -> int:
    mlp = model.get_submodule(unit.path)
    conv = isinstance(mlp.fc1, nn.Conv2d)
    if kept.numel() == 0:
        model.set_submodule(unit.path, _constant_conv(mlp.fc2) if conv else ConstantBranch.replacing(mlp.fc2))
        return 0
    if kept.numel() == unit.count and gates is None:
        return unit.count
    if conv:
        new_fc1 = SlicedConv2d.from_channels(mlp.fc1, out=kept)
        new_fc2 = SlicedConv2d.from_channels(mlp.fc2, inputs=kept)
    else:
        new_fc1 = SlicedLinear.from_rows_cols(mlp.fc1, rows=kept)
        new_fc2 = SlicedLinear.from_rows_cols(mlp.fc2, cols=kept)
    if gates is not None:
        scale = gates[kept].to(new_fc2.weight)
        with torch.no_grad():
            new_fc2.weight.mul_(scale.view(1, -1, *([1] * (new_fc2.weight.dim() - 2))))
    mlp.fc1, mlp.fc2 = new_fc1, new_fc2
    return int(kept.numel())


def _constant_conv(fc2: nn.Conv2d) -> ConstantChannels:
    constant = ConstantChannels(fc2.out_channels, bias=fc2.bias is not None).to(fc2.weight)
    if fc2.bias is not None:
        with torch.no_grad():
            constant.bias.copy_(fc2.bias)
    return constant
