"""Modules a ``spp``-sliced ConvNeXt or ResNet is made of, so it saves and reloads like any other.

* :class:`SlicedConv2d`, :class:`SlicedBatchNorm2d` — an ``nn.Conv2d`` / ``nn.BatchNorm2d`` with
  fewer channels. They *are* a Conv2d / BatchNorm2d, so later steps (finetune, magnitude, svd-mp)
  treat them as one.
* :class:`ConstantChannels` — a channels-first ConvNeXt MLP (``conv_mlp=True``) whose every hidden
  channel was removed: it outputs ``fc2``'s bias at every position (the channels-last MLP uses
  :class:`~.modules.ConstantBranch`).
* :class:`RemovedConv2d`, :class:`RemovedNorm`, :class:`ZeroInputConv2d` — a ResNet inner path
  whose every channel was removed. The convolution that produced the channels becomes a
  ``RemovedConv2d``: it outputs *one* zero channel at the conv's output size, so the activation,
  drop-block and anti-alias pooling after it still run (on a tiny map) and keep the spatial size;
  the BatchNorm becomes a ``RemovedNorm`` (identity); the convolution that consumed the channels
  becomes a ``ZeroInputConv2d``: what that conv computes from an all-zero input (its bias, or
  zeros) at its own output size, reading only its input's height and width. That is exactly the
  gated block with every gate of the path at 0, in train and eval mode, with no 0-width layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rmtp.contract.saved_types import rebuildable
from rmtp_plugins.spp.modules import copy_parameters, sliced_parameters


def conv_geometry(conv: nn.Module) -> dict[str, list[int]]:
    """kernel_size, stride, padding, dilation of a conv-like module, as JSON lists."""
    return {key: [int(v) for v in getattr(conv, key)] for key in ("kernel_size", "stride", "padding", "dilation")}


def _output_size(x: torch.Tensor, geometry: dict[str, list[int]]) -> tuple[int, int]:
    """Height and width a convolution with ``geometry`` gives for input ``x`` (N, C, H, W)."""
    k, s, p, d = (geometry[key] for key in ("kernel_size", "stride", "padding", "dilation"))
    return tuple((x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


@rebuildable("spp.sliced_conv2d", aliases=["rmtp_plugins._spp_conv_modules.SlicedConv2d"])
class SlicedConv2d(nn.Conv2d):
    """A Conv2d whose output and/or input channels were sliced away by ``spp`` (groups = 1)."""

    def rmtp_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, **conv_geometry(self),
                "bias": self.bias is not None, "padding_mode": self.padding_mode}

    @classmethod
    def from_channels(cls, conv: nn.Conv2d, out: torch.Tensor | None = None,
                      inputs: torch.Tensor | None = None) -> SlicedConv2d:
        """The output channels ``out`` and input channels ``inputs`` (index tensors; ``None``: all)."""
        if conv.groups != 1:
            raise ValueError(f"cannot slice a grouped convolution (groups={conv.groups})")
        weight, bias = sliced_parameters(conv, out, inputs)
        new = cls(weight.shape[1], weight.shape[0], **conv_geometry(conv), bias=bias is not None,
                  padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
        copy_parameters(new, weight, bias)
        return new


@rebuildable("spp.sliced_batchnorm2d", aliases=["rmtp_plugins._spp_conv_modules.SlicedBatchNorm2d"])
class SlicedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d keeping some of its channels (affine params and running statistics)."""

    def rmtp_config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "track_running_stats": self.track_running_stats}

    @classmethod
    def from_channels(cls, bn: nn.BatchNorm2d, keep: torch.Tensor) -> SlicedBatchNorm2d:
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(int(keep.numel()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, device=ref.device if ref is not None else None,
                  dtype=ref.dtype if ref is not None else None)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                source = getattr(bn, name)
                if source is not None:
                    getattr(new, name).copy_(source[keep])
            if bn.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        return new


@rebuildable("spp.constant_channels", aliases=["rmtp_plugins._spp_conv_modules.ConstantChannels"])
class ConstantChannels(nn.Module):
    """A channels-first MLP branch whose every hidden channel was removed: ``bias`` at every position."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.dim = dim
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.dim, *x.shape[2:])
        return out + self.bias.view(1, -1, *([1] * (x.dim() - 2))) if self.bias is not None else out

    def rmtp_config(self) -> dict[str, Any]:
        return {"dim": self.dim, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias={self.bias is not None} (every hidden channel removed by spp)"


@rebuildable("spp.removed_conv2d", aliases=["rmtp_plugins._spp_conv_modules.RemovedConv2d"])
class RemovedConv2d(nn.Module):
    """A conv whose every output channel was removed: one zero channel at the conv's output size."""

    def __init__(self, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int]):
        super().__init__()
        self.geometry = {"kernel_size": list(kernel_size), "stride": list(stride), "padding": list(padding),
                         "dilation": list(dilation)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 1, *_output_size(x, self.geometry))

    def rmtp_config(self) -> dict[str, Any]:
        return dict(self.geometry)

    def extra_repr(self) -> str:
        return f"stride={self.geometry['stride']} (every output channel removed by spp; carries the size only)"


@rebuildable("spp.removed_norm", aliases=["rmtp_plugins._spp_conv_modules.RemovedNorm"])
class RemovedNorm(nn.Identity):
    """The BatchNorm of channels that were all removed (identity on the size-carrying zero map)."""

    def rmtp_config(self) -> dict[str, Any]:
        return {}


@rebuildable("spp.zero_input_conv2d", aliases=["rmtp_plugins._spp_conv_modules.ZeroInputConv2d"])
class ZeroInputConv2d(nn.Module):
    """A conv whose every input channel was removed: its output for a zero input (bias or zeros)."""

    def __init__(self, out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                 dilation: list[int], bias: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.geometry = {"kernel_size": list(kernel_size), "stride": list(stride), "padding": list(padding),
                         "dilation": list(dilation)}
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def replacing(cls, conv: nn.Module, out: torch.Tensor | None = None) -> ZeroInputConv2d:
        """What ``conv`` (a Conv2d or a ZeroInputConv2d) becomes with no inputs, keeping outputs ``out``."""
        geometry = conv.geometry if isinstance(conv, ZeroInputConv2d) else conv_geometry(conv)
        bias = conv.bias.detach() if conv.bias is not None else None
        if out is not None and bias is not None:
            bias = bias[out]
        count = conv.out_channels if out is None else int(out.numel())
        new = cls(count, **geometry, bias=bias is not None)
        if bias is not None:
            new.to(bias)
            with torch.no_grad():
                new.bias.copy_(bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.out_channels, *_output_size(x, self.geometry))
        return out + self.bias.view(1, -1, 1, 1) if self.bias is not None else out

    def rmtp_config(self) -> dict[str, Any]:
        return {"out_channels": self.out_channels, **self.geometry, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels} (every input channel removed by spp: a constant)"
