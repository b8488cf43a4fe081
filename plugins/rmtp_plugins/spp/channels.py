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

Which convs form a unit, and what lies between them, is the ``resnet`` architecture's
:class:`~rmtp.contract.architecture.Coupling` list (``kind="channels"``); this module only checks and
slices. Refused, naming the block: a grouped ``conv2`` (ResNeXt: its channels belong to ``groups``
separate filter banks, so slicing one channel would unbalance the groups); norms other than
BatchNorm2d (GroupNorm mixes channels); modules in between that hold state (PReLU's parameters,
``BlurPool2d``'s per-channel filter); convs already replaced by another pruner.
"""

from __future__ import annotations

import torch
from torch import nn

from rmtp.contract.architecture import Coupling
from rmtp_plugins.spp.conv_modules import (
    RemovedConv2d,
    RemovedNorm,
    SlicedBatchNorm2d,
    SlicedConv2d,
    ZeroInputConv2d,
    conv_geometry,
)
from rmtp_plugins.spp.unit import Unit

_CONVS = (nn.Conv2d, SlicedConv2d)
_NORMS = (nn.BatchNorm2d, SlicedBatchNorm2d)
#: Modules that act on every channel alike (pooling is spatial, per channel). Any other module
#: between the two convs passes only when it holds no parameter or buffer (timm's DropBlock2d does not).
_CHANNEL_AGNOSTIC = (nn.Identity, nn.AvgPool2d, nn.MaxPool2d, nn.Dropout)


def channel_problem(model: nn.Module, coupling: Coupling) -> str | None:
    """Why spp cannot gate/slice the channels ``coupling`` (a conv → norm → … → conv chain of a
    residual block, as the architecture declares it) joins, or ``None`` if it can."""
    producer, consumer = model.get_submodule(coupling.producer), model.get_submodule(coupling.consumer)
    for path, conv in ((coupling.producer, producer), (coupling.consumer, consumer)):
        if getattr(conv, "groups", 1) != 1:
            return (f"its {_leaf(path)} is grouped (groups={conv.groups}, ResNeXt): a channel belongs to one of "
                    f"{conv.groups} filter banks, and slicing channels one by one would unbalance them")
    if type(producer) not in (*_CONVS, ZeroInputConv2d) or type(consumer) not in _CONVS:
        return (f"its {_leaf(coupling.producer)}/{_leaf(coupling.consumer)} are {type(producer).__name__}/"
                f"{type(consumer).__name__}, not plain Conv2d (run spp before layer-replacing pruners such as svd-mp)")
    if isinstance(producer, nn.Conv2d) and (producer.padding_mode != "zeros" or isinstance(producer.padding, str)):
        return f"its {_leaf(coupling.producer)} pads with {producer.padding!r}/{producer.padding_mode}, not zeros"
    if not coupling.norms:
        return f"no BatchNorm follows its {_leaf(coupling.producer)}"
    for path in coupling.between:
        module = model.get_submodule(path)
        if path in coupling.norms:
            if type(module) not in _NORMS:
                return f"its {_leaf(path)} is a {type(module).__name__}, not BatchNorm2d (a norm that mixes channels)"
        elif type(module) not in _CHANNEL_AGNOSTIC and (any(True for _ in module.parameters())
                                                        or any(True for _ in module.buffers())):
            return (f"its {_leaf(path)} ({type(module).__name__}) holds parameters or buffers (per-channel "
                    f"state), so it does not act on every channel alike")
    return None


def channel_unit(model: nn.Module, coupling: Coupling, *, last: bool) -> Unit:
    """The unit of ``coupling``'s channels. ``last``: its consumer produces no other unit, so this
    unit's report row also counts the consumer (a bottleneck's conv2 is the producer of its second
    unit, so the first unit's row stops at bn1)."""
    producer, consumer = model.get_submodule(coupling.producer), model.get_submodule(coupling.consumer)
    norms = [model.get_submodule(n) for n in coupling.norms]
    if isinstance(producer, ZeroInputConv2d):
        count, per_producer = producer.out_channels, int(producer.bias is not None)
    else:
        count = producer.out_channels
        per_producer = producer.weight[0].numel() + (producer.bias is not None)
    per = (per_producer + sum(2 for norm in norms if norm.affine)
           + consumer.out_channels * consumer.weight[0, 0].numel())
    members = (coupling.producer, *coupling.norms) + ((coupling.consumer,) if last else ())
    return Unit(coupling.name, "channel", count, 1, per, 0, producer=coupling.producer, consumer=coupling.consumer,
                channel_dim=1, members=members, norms=coupling.norms)


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def slice_channels(model: nn.Module, unit: Unit, kept: torch.Tensor, gates: torch.Tensor | None) -> int:
    producer, consumer = model.get_submodule(unit.producer), model.get_submodule(unit.consumer)
    if kept.numel() == 0:
        geometry = producer.geometry if isinstance(producer, ZeroInputConv2d) else conv_geometry(producer)
        _put(model, unit.producer, RemovedConv2d(**geometry))
        for norm_path in unit.norms:
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
    for norm_path in unit.norms:
        _put(model, norm_path, SlicedBatchNorm2d.from_channels(model.get_submodule(norm_path), kept))
    _put(model, unit.consumer, new_consumer)
    return int(kept.numel())


def _put(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at ``path`` by ``new``, in the train/eval mode of the one it replaces
    (a BatchNorm left in train mode would normalise with batch statistics)."""
    new.train(model.get_submodule(path).training)
    model.set_submodule(path, new)
