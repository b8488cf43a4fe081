"""spp in time: the least-removing level of the solution path that reaches a speed target.

The search orders the groups once; a level (``ratio``) removes the latest-entering ones. For a
candidate level the model is sliced on a copy, and every *container* of a unit (the module
holding both its producer and consumer: ``blocks.i.attn`` for heads, ``blocks.i.mlp`` for MLP
neurons, a ResNet block for its inner channels; units sharing one are sliced together) is timed
against its dense self by the step's cost model (:mod:`rmtp.latency`, cached by the sliced
widths). The level's predicted time is the model's time minus those savings, counted in the
model through the measured in-context share; the smallest ratio (in steps of 0.01) that reaches
the target is bisected for, since removing more groups never makes a branch slower. The chosen
level's sliced model is then timed against dense and the search redone with what the container
figures missed (:func:`rmtp.latency.target.reach_checked`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from rmtp.contract.pruner import PruneContext
from rmtp.latency.target import reach_checked, speed_target
from rmtp_plugins.spp.groups import extract
from rmtp_plugins.spp.params import SppParams
from rmtp_plugins.spp.path import Shared, removal_count, removal_mask
from rmtp_plugins.spp.unit import Unit

RATIOS = [i / 100 for i in range(1, 100)]


def container(unit: Unit) -> str:
    """The innermost module holding the unit's producer and consumer."""
    first, second = unit.producer.split("."), unit.consumer.split(".")
    common = []
    for a, b in zip(first, second):
        if a != b:
            break
        common.append(a)
    return ".".join(common) or unit.path


def choose_ratio(ctx: PruneContext, units: list[Unit], order: list[int], sizes: torch.Tensor,
                 shared: tuple[Shared, ...], params: SppParams) -> tuple[float | None, dict[str, Any]]:
    """The ratio to slice at and the prediction for the step's report
    (:meth:`~rmtp.latency.target.SpeedTarget.speed_plan`, its ``note`` saying why). None: slice
    nothing, since no level timed whole was faster than the model as it came."""
    target = speed_target(ctx, params.target_speedup, params.target_latency_ms)
    cost = ctx.cost_model()
    names = sorted({container(u) for u in units})
    shapes = cost.layer_inputs(ctx.model, names)
    names = [n for n in names if n in shapes]
    isolated = [cost.seconds([ctx.model.get_submodule(n)], shapes[n], what=n)[0] for n in names]
    target.calibrate(ctx, names, isolated)
    memo: dict[float, list[float]] = {}

    def sliced(ratio: float) -> torch.nn.Module:
        model = copy.deepcopy(ctx.model)
        extract(model, units, removal_mask(order, removal_count(ratio, sizes, order, params.target, shared)))
        return model

    def savings(ratio: float) -> list[float]:
        if ratio not in memo:
            cut = sliced(ratio)
            with ctx.progress.task(f"spp: timing level {ratio:g} ({cost.kind})", total=len(names)) as advance:
                memo[ratio] = []
                for name in names:
                    dense, thin = cost.seconds([ctx.model.get_submodule(name), cut.get_submodule(name)],
                                               shapes[name], what=name)
                    memo[ratio].append(dense - thin)
                    advance()
        return memo[ratio]

    index = reach_checked(ctx, target, RATIOS, savings, sliced)
    if index is None:  # no level timed whole was faster than the model as it came (the fallback note says)
        return None, target.speed_plan([], "no level of the path chosen for the speed target")
    ratio = RATIOS[index]
    saved = savings(ratio)
    note = "; ".join(filter(None, [f"ratio {ratio:g} ({params.target}) chosen for the speed target",
                                   target.correction_note(saved, "what slicing changes outside the timed containers"),
                                   target.shortfall(saved, f"spp up to ratio {RATIOS[-1]}")]))
    return ratio, target.speed_plan(saved, note)


__all__ = ["RATIOS", "choose_ratio", "container"]
