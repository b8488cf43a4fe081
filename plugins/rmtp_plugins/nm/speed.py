"""n:m in time: an N:M layer is only faster where the device has a kernel for it.

For every active layer and allowed pattern the step's cost model (:mod:`rmtp.latency`) gives the
layer's time:

* ``cost: measured``: the layer masked to the pattern is converted the way ``rmtp bench`` does
  (:func:`rmtp_plugins.nm.export.semi_structured_kernel`: 2:4, fp16/bf16, CUDA compute ≥ 8.0) and
  timed interleaved with the dense layer; where no kernel takes it (any CPU, other patterns, fp32)
  the masked layer runs as the dense GEMM it is, so its time *is* the dense time and nothing is
  timed;
* ``cost: macs``: the ideal sparse kernel, dense MACs × n/m.

``only_if_faster`` turns a layer whose pattern is not faster by ``latency.min_gain`` back to
dense; ``target_speedup`` / ``target_latency_ms`` replace ``target_macs`` in the knapsack by time:
each option costs its predicted time, and the budget is the layers' dense time less the savings
the target needs (counted in the model through the measured in-context share).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from rmtp.contract.pruner import PruneContext
from rmtp.gemm import from_gemm, gemm_view
from rmtp.latency.target import SpeedTarget, speed_target
from rmtp_plugins.nm.masks import nm_mask
from rmtp_plugins.nm.params import Pattern, pattern_density, pattern_name
from rmtp_plugins.nm.permute import plain
from rmtp_plugins.nm.plan import LayerPlan

if TYPE_CHECKING:
    from rmtp_plugins.nm.params import NmParams


@dataclass
class LayerTimes:
    """A layer's dense time and each pattern's, with the kernel that runs it (None: dense GEMM)."""

    dense: float
    patterns: dict[Pattern, float] = field(default_factory=dict)
    kernels: dict[Pattern, str | None] = field(default_factory=dict)

    def time(self, pattern: Pattern) -> float:
        return self.dense if pattern is None else self.patterns[pattern]


def uses_time(params: NmParams) -> bool:
    return params.only_if_faster or params.target_speedup is not None or params.target_latency_ms is not None


def layer_times(ctx: PruneContext, plans: list[LayerPlan]) -> dict[str, LayerTimes]:
    cost = ctx.cost_model()
    inputs = cost.layer_inputs(ctx.model, [p.name for p in plans])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cost.settings.precision, torch.float32)
    out: dict[str, LayerTimes] = {}
    with ctx.progress.task(f"n:m: timing patterns ({cost.kind})", total=len(plans)) as advance:
        for plan in plans:
            module = plain(ctx.module(plan.name))
            shape = inputs.get(plan.name)
            if shape is None and isinstance(module, nn.Linear):
                shape = (cost.settings.batch, module.in_features)
            if shape is not None:
                out[plan.name] = _times(cost, ctx, module, shape, [p for p in plan.options if p is not None], dtype)
            advance()
    return out


def _times(cost, ctx: PruneContext, module: nn.Module, shape: tuple[int, ...], patterns: list[tuple[int, int]],
           dtype: torch.dtype) -> LayerTimes:
    dense = cost.seconds([module], shape, what=type(module).__name__)[0]
    times = LayerTimes(dense=dense)
    for pattern in patterns:
        if cost.kind == "macs":
            times.patterns[pattern], times.kernels[pattern] = dense * pattern_density(pattern), "ideal (MACs × n/m)"
            continue
        from rmtp_plugins.nm.export import semi_structured_kernel

        candidate = copy.deepcopy(module).to(dtype)
        with torch.no_grad():
            matrix = gemm_view(candidate.weight.detach())
            candidate.weight.copy_(from_gemm(matrix * nm_mask(matrix.abs(), *pattern).to(matrix.dtype),
                                             tuple(candidate.weight.shape)))
        kernel = semi_structured_kernel(candidate, device=ctx.device, dtype=dtype)
        times.kernels[pattern] = kernel
        if kernel is None:  # the masked layer is the dense GEMM
            times.patterns[pattern] = dense
        else:
            # Timed against the dense layer in the kernel's dtype, counted as a share of the dense time.
            pair = cost.seconds([copy.deepcopy(module).to(dtype), candidate], shape, what=kernel)
            times.patterns[pattern] = dense * pair[1] / max(pair[0], 1e-12)
    return times


def start(ctx: PruneContext, plans: list[LayerPlan], params: NmParams) -> tuple[SpeedTarget, dict[str, LayerTimes]]:
    """Time the patterns; with a speed target, also the dense and current model (calibration)."""
    target = speed_target(ctx, params.target_speedup, params.target_latency_ms)
    times = layer_times(ctx, plans)
    if target.predicts:
        timed = [p.name for p in plans if p.name in times]
        target.calibrate(ctx, timed, [times[n].dense for n in timed])
    return target, times


def time_budget(target: SpeedTarget, plans: list[LayerPlan], times: dict[str, LayerTimes]) -> float:
    """Σ of the layers' predicted times the knapsack may spend to reach the target."""
    dense = sum(times[p.name].dense for p in plans if p.name in times)
    return dense - max(target.needed, 0.0) / target.scale


def keep_dense_if_slower(ctx: PruneContext, plans: list[LayerPlan], times: dict[str, LayerTimes]) -> None:
    """``only_if_faster``: a layer whose pattern does not save ``min_gain`` of its time stays dense."""
    cost = ctx.cost_model()
    min_gain = 0.0 if cost.kind == "macs" else cost.settings.min_gain
    for plan in plans:
        layer = times.get(plan.name)
        if plan.pattern is None or layer is None:
            continue
        t = layer.time(plan.pattern)
        ratio = layer.dense / t if t > 0 else float("inf")
        if cost.kind != "macs":  # under MACs the sparse MACs column already says it
            plan.layer_speedup = ratio
        if not t < layer.dense * (1 - min_gain):
            kernel = layer.kernels.get(plan.pattern)
            why = (f"no {pattern_name(plan.pattern)} kernel for it on {ctx.device.type} (runs as the dense GEMM)"
                   if kernel is None else f"{kernel} not faster: ×{ratio:.2f}")
            plan.dense_reason = f"kept dense: {why}"
            plan.pattern = None


def savings(plans: list[LayerPlan], times: dict[str, LayerTimes]) -> list[float]:
    return [times[p.name].dense - times[p.name].time(p.pattern) for p in plans if p.name in times]
