"""``spp`` with ``search: obs``: structured cuts chosen on calibration data and repaired in closed
form, with no training, so a sliced model holds its accuracy before any fine-tune.

The LBI search (:mod:`.path`) orders groups by when the task loss lets their gates enter; on a
pretrained model the cut it implies still removes what the next layer was reading, and nothing
repairs it until a fine-tune. Here each unit is cut where its consumer can best do without it,
and the consumer is refitted to the dense outputs (:mod:`.obs`: ZipLM's structured OBS and the
least-squares refit of the kept columns and the bias).

**Layer by layer** (:func:`rmtp.fidelity.layerwise.compress_sequentially`): units are cut in forward order,
each on the inputs of the model as cut so far, so a later consumer is fitted to inputs that
already carry the earlier cuts and corrects for them instead of the errors compounding. Cost: one
forward pass over the calibration images per unit, each stopped at that unit's consumer (about
units/2 full passes: 12 for ViT-Ti's 24 units).

**How much per unit**: the same share of every unit, as one removal order over every group of the
step (each unit's i-th removal at (i + ½)/count of the way), whose last ``n`` entries
(:func:`~.path.removal_count` of ``ratio`` with the step's ``target``) set how many groups each unit
loses; the OBS choice in the layer-by-layer pass then decides *which*. A cross-layer allocation by
OBS price did worse on the real ViT-Ti (25% of the MLP neurons, 744 held-out images: uniform 74.7%
top-1; priced by the consumer's output error relative to its output energy 60.9%, to its centered
output energy 60.1%, to the centered energy of the block's residual output 72.0%): a layer's own
output error does not say what the rest of the network makes of it. Measuring that instead (each
MLP cut alone at 12.5/25/50/75% of its neurons, refitted, the KL of the logits on 64 calibration
images; removals spent greedily where they cost least KL per parameter, costs taken as additive)
gave 74.73% again, the same as uniform: the uniform share stays, with no knob.
The order is also what a speed target times (:func:`.speed.choose_ratio`: timing depends on the
widths left, not on which groups).
"""

from __future__ import annotations

import torch
from torch import nn

from rmtp.contract.pruner import PruneContext
from rmtp.errors import RmtpError
from rmtp.fidelity.layerwise import LayerInputs, compress_sequentially
from rmtp.gemm import from_gemm, gemm_view
from rmtp_plugins.spp.groups import slice_unit
from rmtp_plugins.spp.obs import StructuredFit, remove_groups
from rmtp_plugins.spp.params import SppParams
from rmtp_plugins.spp.path import Shared, removal_count, removal_mask
from rmtp_plugins.spp.unit import Unit

__all__ = ["cut_level", "group_columns", "uniform_order"]


def uniform_order(units: list[Unit]) -> list[int]:
    """Every gate, most important first, so that the last ``n`` take the same share of each unit
    (ties between units in forward order)."""
    slots = []
    for position, unit in enumerate(units):
        for i in range(unit.count):
            slots.append(((i + 0.5) / unit.count, position, unit.offset + i))
    removal = [gate for *_, gate in sorted(slots)]
    return removal[::-1]


def group_columns(unit: Unit, consumer: nn.Module) -> list[torch.Tensor]:
    """Each group's columns in the consumer's GEMM matrix (:mod:`rmtp.gemm`): ``width`` consecutive
    input features of a Linear; for a Conv2d, the group's input channels at every kernel offset
    (K ordered (r, s, c), the channel fastest)."""
    width = unit.width
    if isinstance(consumer, nn.Linear):
        return [torch.arange(g * width, (g + 1) * width) for g in range(unit.count)]
    if isinstance(consumer, nn.Conv2d) and consumer.groups == 1:
        channels = consumer.in_channels
        offsets = consumer.kernel_size[0] * consumer.kernel_size[1]
        base = torch.arange(offsets)[:, None] * channels
        return [(base + torch.arange(g * width, (g + 1) * width)[None, :]).flatten() for g in range(unit.count)]
    raise RmtpError(f"spp search: obs cannot refit {type(consumer).__name__} {unit.consumer}: it refits plain "
                    f"Linears and ungrouped convolutions")


def cut_level(ctx: PruneContext, model: nn.Module, units: list[Unit], order: list[int], sizes: torch.Tensor,
              shared: tuple[Shared, ...], ratio: float, params: SppParams) -> dict[str, StructuredFit]:
    """Cut ``model`` (in place) at ``ratio``: each unit loses its share of the :func:`uniform_order`
    removals, chosen by structured OBS on its consumer's inputs in the model as cut so far, and the
    consumer is refitted. Returns each cut unit's fit, by unit path."""
    if ctx.calibration is None:
        raise RmtpError("spp search: obs needs calibration data, and none was given")
    remove = removal_mask(order, removal_count(ratio, sizes, order, params.target, shared))
    counts = {u.consumer: (u, int(remove[u.gates].sum())) for u in units}
    consumers = [name for name, (_, n) in counts.items() if n > 0]
    fits: dict[str, StructuredFit] = {}

    def cut(name: str, consumer: nn.Module, inputs: LayerInputs) -> None:
        unit, n = counts[name]
        if inputs.count == 0 or inputs.gram is None:
            raise RmtpError(f"spp search: obs: the calibration images never reach {name}, so its "
                            f"{unit.noun} cannot be chosen")
        matrix = gemm_view(consumer.weight.detach())
        try:
            fit = remove_groups(matrix, consumer.bias, inputs.gram, inputs.sums, inputs.count,
                                group_columns(unit, consumer), n, params.percdamp)
        except torch.linalg.LinAlgError:
            raise RmtpError(f"spp search: obs: the calibration inputs of {name} are rank-deficient and percdamp "
                            f"{params.percdamp:g} does not make them invertible; raise percdamp (default 0.01) or "
                            f"give more calibration images") from None
        kept = slice_unit(model, unit, ~fit.removed, None)
        _write_refit(model, unit, fit, kept_cols=_kept_columns(unit, consumer, fit.removed), kept=kept)
        fits[unit.path] = fit

    compress_sequentially(model, consumers, ctx.calibration, ctx.device, compress=cut, progress=ctx.progress,
                          precision=ctx.precision, description=f"spp (obs): cutting level {ratio:g}")
    return fits


def _kept_columns(unit: Unit, consumer: nn.Module, removed: torch.Tensor) -> torch.Tensor:
    """The consumer's GEMM columns that survive slicing, in the order the sliced layer keeps them."""
    groups = group_columns(unit, consumer)
    keep = torch.zeros(gemm_view(consumer.weight).shape[1], dtype=torch.bool)
    for g, cols in enumerate(groups):
        if not removed[g]:
            keep[cols] = True
    return torch.nonzero(keep).flatten()


def _write_refit(model: nn.Module, unit: Unit, fit: StructuredFit, *, kept_cols: torch.Tensor, kept: int) -> None:
    """Put the refitted weights into the sliced consumer (or the refitted bias into the constant that
    replaced a branch that lost every group)."""
    if kept == 0:  # the constant that replaced the branch: the consumer for a conv unit, else the branch
        holder = model.get_submodule(unit.consumer if unit.kind == "channel" else unit.path)
        bias = getattr(holder, "bias", None)
        if fit.bias is not None and isinstance(bias, torch.Tensor) and bias.shape == fit.bias.shape:
            bias.copy_(fit.bias.to(bias))
        return
    consumer = model.get_submodule(unit.consumer)
    matrix = fit.weight[:, kept_cols]
    consumer.weight.copy_(from_gemm(matrix, tuple(consumer.weight.shape)).to(consumer.weight))
    if fit.bias is not None:
        consumer.bias.copy_(fit.bias.to(consumer.bias))
