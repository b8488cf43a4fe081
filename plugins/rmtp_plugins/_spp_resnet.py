"""ResNet inner channels for ``spp``: the output channels of the convs inside a timm residual block.

A ``BasicBlock`` (conv1 → bn1 → act1 → aa → conv2 → bn2) has one unit, the output channels of
``conv1``; a ``Bottleneck`` (conv1 → bn1 → act1 → conv2 → bn2 → act2 → aa → conv3 → bn3) has two,
the output channels of ``conv1`` and of ``conv2``. A unit's *producer* is the conv whose output
channels are the groups, its *consumer* the conv that reads them. The gate of channel c multiplies
the consumer's input channel c (a forward pre-hook, after the BatchNorm, the activation and any
anti-alias pooling): with BatchNorm's shift an eval-mode channel is not zero before the activation,
so only a gate on what the consumer reads makes "gate 0" the same function as "channel removed".

Removing channel c slices output channel c of the producer, channel c of its BatchNorm (affine
params and running statistics) and input channel c of the consumer. A unit that loses every
channel turns the producer into a :class:`RemovedConv2d`, the BatchNorm into a
:class:`RemovedNorm` and the consumer into a :class:`ZeroInputConv2d` (its output for a zero
input): the block's residual branch then continues from that constant exactly as the gated block
does (the BatchNorm after the consumer, SE, drop-path and the final activation are untouched).

Refused, naming the block: blocks that are not timm's ``BasicBlock``/``Bottleneck``; a grouped
``conv2`` (ResNeXt: its channels belong to ``groups`` separate filter banks, so slicing one channel
would unbalance the groups); norms other than BatchNorm2d (GroupNorm mixes channels);
activations with parameters (PReLU); anti-alias layers other than average/max pooling
(``BlurPool2d`` holds a per-channel filter); convs already replaced by another pruner.
"""

from __future__ import annotations

import re

import torch
from timm.layers import DropBlock2d
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from rmtp_plugins._spp_conv_modules import (
    RemovedConv2d,
    RemovedNorm,
    SlicedBatchNorm2d,
    SlicedConv2d,
    ZeroInputConv2d,
    conv_geometry,
)
from rmtp_plugins._spp_unit import Unit

CONV_LAYER = re.compile(r"(?P<block>.+)\.conv(?P<index>[123])")
_CONVS = (nn.Conv2d, SlicedConv2d)
_NORMS = (nn.BatchNorm2d, SlicedBatchNorm2d)
_POOLS = (nn.Identity, nn.AvgPool2d, nn.MaxPool2d)


def chains(block: nn.Module) -> list[tuple[int, int, tuple[str, ...]]]:
    """(producer index, consumer index, modules between them) for each unit of ``block``."""
    if type(block) is BasicBlock:
        return [(1, 2, ("bn1", "drop_block", "act1", "aa"))]
    return [(1, 2, ("bn1", "act1")), (2, 3, ("bn2", "drop_block", "act2", "aa"))]


def wanted_units(block: nn.Module, selected: set[int]) -> list[int]:
    """Which producers (1, 2) of ``block`` to gate, given the selected conv indices of the block.

    A unit is gated when its producer or its consumer conv is among the step's selected layers.
    """
    if type(block) not in (BasicBlock, Bottleneck):
        return [1] if selected else []
    return [p for p, c, _ in chains(block) if {p, c} & selected]


def block_problem(block: nn.Module, producer_index: int) -> str | None:
    """Why spp cannot gate/slice the unit of ``block`` produced by ``conv{producer_index}``."""
    if type(block) not in (BasicBlock, Bottleneck):
        return f"a {type(block).__name__}, not timm's ResNet BasicBlock or Bottleneck"
    producer_index, consumer_index, between = next(c for c in chains(block) if c[0] == producer_index)
    producer = getattr(block, f"conv{producer_index}")
    consumer = getattr(block, f"conv{consumer_index}")
    for conv in (producer, consumer):
        if getattr(conv, "groups", 1) != 1:
            return (f"its conv2 is grouped (groups={conv.groups}, ResNeXt): a channel belongs to one of "
                    f"{conv.groups} filter banks, and slicing channels one by one would unbalance them")
    if type(producer) not in (*_CONVS, ZeroInputConv2d) or type(consumer) not in _CONVS:
        return (f"its conv{producer_index}/conv{consumer_index} are {type(producer).__name__}/"
                f"{type(consumer).__name__}, not plain Conv2d (run spp before layer-replacing pruners such as svd-mp)")
    if isinstance(producer, nn.Conv2d) and (producer.padding_mode != "zeros" or isinstance(producer.padding, str)):
        return f"its conv{producer_index} pads with {producer.padding!r}/{producer.padding_mode}, not zeros"
    for name in between:
        module = getattr(block, name)
        if name.startswith("bn") and type(module) not in _NORMS:
            return f"its {name} is a {type(module).__name__}, not BatchNorm2d (a norm that mixes channels)"
        if name.startswith("act") and (any(True for _ in module.parameters()) or any(True for _ in module.buffers())):
            return f"its {name} ({type(module).__name__}) has parameters, so it is not a plain elementwise activation"
        if name == "aa" and type(module) not in _POOLS:
            return (f"its anti-alias layer is a {type(module).__name__} (per-channel state); only average or max "
                    f"pooling is channel-agnostic")
        if name == "drop_block" and type(module) not in (nn.Identity, DropBlock2d):
            return f"its drop_block is a {type(module).__name__}"
    return None


def channel_unit(block_path: str, block: nn.Module, producer_index: int) -> Unit:
    p, c, _ = next(ch for ch in chains(block) if ch[0] == producer_index)
    producer, norm, consumer = (getattr(block, n) for n in (f"conv{p}", f"bn{p}", f"conv{c}"))
    if isinstance(producer, ZeroInputConv2d):
        count, per_producer = producer.out_channels, int(producer.bias is not None)
    else:
        count = producer.out_channels
        per_producer = producer.weight[0].numel() + (producer.bias is not None)
    per = per_producer + (2 if norm.affine else 0) + consumer.out_channels * consumer.weight[0, 0].numel()
    # the row covers the layers no other unit of the block reports: a bottleneck's conv2 is the
    # producer of its second unit, so the first unit's row stops at bn1
    last = type(block) is BasicBlock or c == 3
    members = (f"conv{p}", f"bn{p}") + ((f"conv{c}",) if last else ())
    return Unit(f"{block_path}.conv{p}", "channel", count, 1, per, 0, producer=f"{block_path}.conv{p}",
                consumer=f"{block_path}.conv{c}", channel_dim=1, members=tuple(f"{block_path}.{m}" for m in members))


def slice_channels(model: nn.Module, unit: Unit, kept: torch.Tensor, gates: torch.Tensor | None) -> int:
    block_path, index = CONV_LAYER.fullmatch(unit.producer).group("block", "index")
    norm_path = f"{block_path}.bn{index}"
    producer, norm, consumer = (model.get_submodule(p) for p in (unit.producer, norm_path, unit.consumer))
    if kept.numel() == 0:
        geometry = producer.geometry if isinstance(producer, ZeroInputConv2d) else conv_geometry(producer)
        _put(model, unit.producer, RemovedConv2d(**geometry))
        _put(model, norm_path, RemovedNorm())
        _put(model, unit.consumer, ZeroInputConv2d.replacing(consumer))
        return 0
    if kept.numel() == unit.count and gates is None:
        return unit.count
    if isinstance(producer, ZeroInputConv2d):
        new_producer = ZeroInputConv2d.replacing(producer, out=kept)
    else:
        new_producer = SlicedConv2d.from_channels(producer, out=kept)
    new_consumer = SlicedConv2d.from_channels(consumer, inputs=kept)
    if gates is not None:
        with torch.no_grad():
            new_consumer.weight.mul_(gates[kept].to(new_consumer.weight).view(1, -1, 1, 1))
    _put(model, unit.producer, new_producer)
    _put(model, norm_path, SlicedBatchNorm2d.from_channels(norm, kept))
    _put(model, unit.consumer, new_consumer)
    return int(kept.numel())


def _put(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at ``path`` by ``new``, in the train/eval mode of the one it replaces
    (a BatchNorm left in train mode would normalise with batch statistics)."""
    new.train(model.get_submodule(path).training)
    model.set_submodule(path, new)
