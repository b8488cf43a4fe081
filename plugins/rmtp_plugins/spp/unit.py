"""The unit of ``spp``: one set of gated groups (the heads of an attention, the hidden neurons of
an MLP, the inner channels of a ResNet block) and where its gates act.

All gates of a model live in one flat vector γ (unit after unit, in forward order), so the search,
the ordering and the tie breaks see one index per group; ``offset`` places a unit in that vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from rmtp.contract.architecture import Architecture

Kind = Literal["head", "neuron", "channel"]
#: What a kind of group is called in reports, in the ``structures`` param and in
#: :class:`rmtp.contract.architecture.Coupling` kinds.
NOUNS: dict[str, str] = {"head": "heads", "neuron": "neurons", "channel": "channels"}
#: The unit kind of each coupling kind.
KIND_OF: dict[str, Kind] = {noun: kind for kind, noun in NOUNS.items()}


@dataclass(frozen=True)
class Unit:
    """The gated groups of one branch: ``count`` heads, MLP neurons or inner conv channels."""

    path: str  # the row a report shows: "blocks.0.attn", "stages.0.blocks.0.mlp", "layer1.0.conv1"
    kind: Kind
    count: int
    width: int  # channels per group at the consumer's input: head_dim, or 1
    group_params: int  # parameters one group holds (all removed with it)
    offset: int  # index of the unit's first gate in the flat gate vector
    producer: str = ""  # the layer whose outputs (rows, output channels) are the groups
    consumer: str = ""  # the layer whose input the gates multiply
    channel_dim: int = -1  # the consumer input's channel dimension (-1 channels-last, 1 NCHW)
    members: tuple[str, ...] = ()  # modules whose params the unit's report row counts (default: path)
    norms: tuple[str, ...] = ()  # norms after the producer whose channels are the groups (sliced with it)
    arch: Architecture | None = field(default=None, compare=False, repr=False)  # heads: who records the count

    @property
    def gates(self) -> slice:
        return slice(self.offset, self.offset + self.count)

    @property
    def projection(self) -> str:
        """The layer whose input the gates multiply (alias of ``consumer``)."""
        return self.consumer

    @property
    def noun(self) -> str:
        return NOUNS[self.kind]

    def report_modules(self) -> tuple[str, ...]:
        return self.members or (self.path,)


def gate_shape(gates: torch.Tensor, unit: Unit, x: torch.Tensor) -> torch.Tensor:
    """``gates`` (one per group) expanded to multiply the consumer input ``x`` channel-wise."""
    if unit.width > 1:
        gates = gates.repeat_interleave(unit.width)
    shape = [1] * x.dim()
    shape[unit.channel_dim] = -1
    return gates.to(x.dtype).view(shape)


def weight_shape(model: nn.Module, path: str) -> tuple[int, ...]:
    """Shape of the weight of the layer at ``path`` (``(0,)`` when it has none or is gone)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return (0,)
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else (0,)
