"""The structured groups ``spp`` gates and slices, per model family, behind one interface.

* ViT (:mod:`.heads`, :mod:`.mlp`): the heads of ``blocks.i.attn`` and the hidden
  neurons of ``blocks.i.mlp``.
* ConvNeXt (:mod:`.mlp`): the hidden channels of ``stages.i.blocks.j.mlp`` (Linear or 1×1
  conv MLP).
* ResNet (:mod:`.channels`): the output channels of ``conv1`` (basic blocks and bottlenecks)
  and ``conv2`` (bottlenecks) of ``layerI.J``.

A *unit* (:class:`~.unit.Unit`) is one set of groups with its producer (the layer whose
outputs are the groups) and consumer (the layer reading them). **Where a gate acts:** every gate
multiplies its group's channels at the consumer's input, through a forward pre-hook on the
consumer, so the weights are untouched during the search and γ = 1 is exactly the model as it
was. **Slicing** removes a group's producer rows/output channels (and BatchNorm channels) and its
consumer columns/input channels; a kept group's gate is either folded into the consumer columns it
multiplies (``fold``: the sliced model computes the searched gated function) or dropped (gate 1:
the dense weights). A unit that loses every group becomes a constant, exactly the gated model's
output with all its gates at 0 (see each family's module).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from rmtp.contract.architecture import Architecture, Coupling, PrunableLayer
from rmtp.errors import RmtpError
from rmtp.gemm import gemm_view
from rmtp_plugins.spp.channels import channel_problem, channel_unit, slice_channels
from rmtp_plugins.spp.conv_modules import ConstantChannels, RemovedConv2d
from rmtp_plugins.spp.heads import attention_problem, head_unit, slice_heads
from rmtp_plugins.spp.mlp import mlp_problem, neuron_unit, slice_neurons
from rmtp_plugins.spp.modules import ConstantBranch
from rmtp_plugins.spp.path import Shared
from rmtp_plugins.spp.unit import KIND_OF, Kind, Unit, gate_shape

__all__ = ["Kind", "Unit", "attention_problem", "extract", "find_units", "gated", "group_params", "mlp_problem",
           "shared_params", "slice_unit"]

_EMPTY = (ConstantBranch, ConstantChannels)


def find_units(model: nn.Module, couplings: Sequence[Coupling], layers: list[PrunableLayer],
               structures: Collection[str], *, arch: Architecture,
               left_out: list[tuple[Coupling, str]] | None = None) -> list[Unit]:
    """The units behind the selected layers, in forward order, with their gate offsets.

    A coupling the architecture declares (:meth:`~rmtp.contract.architecture.Architecture.couplings`) of a
    kind in ``structures`` becomes a unit when its producer or consumer is selected: a ViT block's
    heads when ``attn.qkv`` or ``attn.proj`` is, an MLP's neurons when ``mlp.fc1`` or ``mlp.fc2``
    is, a ResNet unit's channels when its producer or consumer conv is. ``arch`` (the model's
    architecture) says whether a coupling's groups can be removed (its attention, its MLP). A unit an earlier spp step
    removed entirely has no groups left and is skipped. Raises :class:`RmtpError` naming the branch
    when one cannot be handled, unless ``left_out`` is a list (``structures`` left at its default):
    then a coupling whose groups the architecture or the modules cannot lose (Swin's heads) is
    appended to it with the reason, and the others are still cut.
    """
    selected = {layer.name for layer in layers}
    wanted = [c for c in couplings if c.kind in structures and c.touches(selected)]
    consumers_that_produce = {c.producer for c in couplings}
    units: list[Unit] = []
    for coupling in wanted:
        kind = KIND_OF[coupling.kind]
        if kind == "channel":
            ends = (model.get_submodule(coupling.producer), model.get_submodule(coupling.consumer))
            if any(isinstance(end, RemovedConv2d) for end in ends):
                continue  # removed by an earlier spp step, or feeding a removed conv
            problem = arch.removal_problem(model, coupling) or channel_problem(model, coupling)
            if problem:
                _leave_out_or_refuse(left_out, coupling, kind, problem)
                continue
            units.append(channel_unit(model, coupling, last=coupling.consumer not in consumers_that_produce))
            continue
        module = model.get_submodule(coupling.name)
        if isinstance(module, _EMPTY):
            continue
        problem = (attention_problem(model, coupling, arch) if kind == "head"
                   else arch.removal_problem(model, coupling) or mlp_problem(module))
        if problem:
            _leave_out_or_refuse(left_out, coupling, kind, problem)
            continue
        units.append(head_unit(model, coupling, arch) if kind == "head" else neuron_unit(coupling.name, module))
    if not units and left_out:  # nothing this model can lose: the first reason, as with explicit structures
        coupling, problem = left_out[0]
        _refuse(KIND_OF[coupling.kind], coupling.name, problem)
    for unit in units:
        problem = nm_problem(model, unit)
        if problem:
            _refuse(unit.kind, unit.path, problem)
    offset, placed = 0, []
    for unit in units:
        placed.append(_at(unit, offset))
        offset += unit.count
    return placed


#: Group sizes an N:M-masked consumer is checked for (the patterns sparse kernels run).
_NM_GROUPS = (4, 8, 16)


def nm_pattern(weight: torch.Tensor) -> tuple[int, int] | None:
    """The N:M pattern ``weight`` carries (every group of m consecutive inputs, in the GEMM layout
    of :mod:`.masks`, holds at most n nonzeros and nearly all exactly n), or ``None``.

    Unstructured zeros give groups with varying counts and are not mistaken for a pattern."""
    matrix = gemm_view(weight.detach())
    for m in _NM_GROUPS:
        if matrix.shape[1] % m or weight.shape[1] % m or not bool((matrix == 0).any()):
            continue
        counts = (matrix != 0).reshape(matrix.shape[0], -1, m).sum(-1)
        n = int(counts.max())
        if n < m and float((counts == n).float().mean()) >= 0.99:
            return n, m
    return None


def nm_problem(model: nn.Module, unit: Unit) -> str | None:
    """Why slicing ``unit`` would break an N:M mask on its consumer (``None`` if it would not):
    removing a group drops ``width`` consecutive inputs, which keeps the m-groups aligned only when
    ``width`` is a multiple of m (whole heads of a head_dim multiple of m do; single neurons and
    channels do not)."""
    weight = getattr(model.get_submodule(unit.consumer), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        return None
    pattern = nm_pattern(weight)
    if pattern is None or unit.width % pattern[1] == 0:
        return None
    return (f"its {unit.consumer} holds a {pattern[0]}:{pattern[1]} mask (n:m), and removing single "
            f"{unit.noun} would shift its groups of {pattern[1]} inputs and break the pattern; run spp "
            f"before n:m")


def _at(unit: Unit, offset: int) -> Unit:
    return replace(unit, offset=offset)


def _leave_out_or_refuse(left_out: list[tuple[Coupling, str]] | None, coupling: Coupling, kind: str,
                         problem: str) -> None:
    if left_out is None:
        _refuse(kind, coupling.name, problem)
    left_out.append((coupling, problem))


def _refuse(kind: str, path: str, problem: str) -> None:
    raise RmtpError(f"spp cannot prune the {kind}s of {path}: it is {problem}"
                    if problem.startswith("a ") else f"spp cannot prune the {kind}s of {path}: {problem}")


def shared_params(model: nn.Module, units: list[Unit]) -> tuple[Shared, ...]:
    """The parameters two units' groups hold together: where one unit's consumer is the next one's
    producer (a ResNet bottleneck's conv2), its kernel joins each pair of their channels."""
    by_producer = {u.producer: u for u in units}
    shared = []
    for unit in units:
        partner = by_producer.get(unit.consumer)
        weight = getattr(model.get_submodule(unit.consumer), "weight", None)
        if partner is not None and isinstance(weight, torch.Tensor) and weight.dim() == 4:
            shared.append(Shared(unit.gates, partner.gates, weight[0, 0].numel()))
    return tuple(shared)


def group_params(units: list[Unit]) -> torch.Tensor:
    """Parameters held by each group, as one vector in gate order."""
    return torch.cat([torch.full((u.count,), u.group_params, dtype=torch.float64) for u in units]) \
        if units else torch.zeros(0, dtype=torch.float64)


@contextmanager
def gated(model: nn.Module, units: list[Unit], gates) -> Iterator[None]:
    """Forward pre-hooks that multiply each group's channels at its consumer's input by its entry
    of ``gates`` while inside the block."""
    handles = []

    def hook_for(unit: Unit):
        def scale(_module: nn.Module, args: tuple) -> tuple:
            return (args[0] * gate_shape(gates[unit.gates], unit, args[0]), *args[1:])
        return scale

    try:
        for unit in units:
            handles.append(model.get_submodule(unit.consumer).register_forward_pre_hook(hook_for(unit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


_SLICERS = {"head": slice_heads, "neuron": slice_neurons, "channel": slice_channels}


def slice_unit(model: nn.Module, unit: Unit, keep: torch.Tensor, gates: torch.Tensor | None) -> int:
    """Remove the groups of ``unit`` where ``keep`` is False; return how many it keeps.

    ``gates`` (the unit's gate values) are folded into the kept consumer columns; ``None`` keeps
    the weights as they are (gates reset to 1).
    """
    return _SLICERS[unit.kind](model, unit, torch.nonzero(keep).flatten(), gates)


def extract(model: nn.Module, units: list[Unit], remove: torch.Tensor,
            gates: torch.Tensor | None = None) -> list[tuple[Unit, int]]:
    """Slice out the groups where ``remove`` (gate order) is True; ``gates`` are folded into the kept
    ones (``None``: kept groups keep their weights). Returns (unit, groups kept) per unit."""
    kept = []
    for unit in units:
        keep = ~remove[unit.gates]
        kept.append((unit, slice_unit(model, unit, keep, None if gates is None else gates[unit.gates])))
    return kept
