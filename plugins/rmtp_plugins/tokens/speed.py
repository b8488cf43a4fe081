"""Token pruners in time: the schedule strength that reaches a speed target.

A block's cost is its attention branch at the tokens it receives plus its MLP branch at the
tokens it keeps (``TokenBlock`` reduces between the two). Both branches of every block are timed
on a grid of token counts by the step's cost model (:mod:`rmtp.latency`; blocks of one shape share
the cached entries) and interpolated, so a schedule's time is arithmetic on its per-block counts
(:func:`rmtp_plugins.tokens.schedule.token_counts`, the same the forward pass uses). The search
moves one knob, the schedule's strength (``r_max`` for token-cls/token-mean with ``alpha`` and
``start_layer`` as given; ``r`` for tome with its ``ramp``), and takes the gentlest schedule
whose predicted time reaches the target: least tokens lost, the schedule's own shape kept.

The block figures leave out what a patched block adds (scoring, top-k, gather), so the chosen
schedule's model is then timed against dense and the search redone with the difference
(:func:`rmtp.latency.target.reach_checked`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from rmtp.contract.architecture import Architecture
from rmtp.contract.pruner import PruneContext, PrunerParams
from rmtp.latency.cost import interpolate, monotone, rank_grid
from rmtp.latency.target import reach_checked, speed_target
from rmtp_plugins.tokens.plan import TokenPlan
from rmtp_plugins.tokens.schedule import token_counts


@dataclass
class BlockCurves:
    """Per-block attention and MLP times on a grid of patch counts."""

    counts: list[int]
    attention: list[list[float]]
    mlp: list[list[float]]

    def seconds(self, index: int, n_in: int, n_out: int) -> float:
        return interpolate(self.counts, self.attention[index], n_in) + interpolate(self.counts, self.mlp[index], n_out)


def block_curves(ctx: PruneContext, blocks: nn.Sequential, n0: int, min_tokens: int) -> BlockCurves:
    cost = ctx.cost_model()
    names = [f"blocks.{i}.{part}" for i in range(len(blocks)) for part in ("attn", "mlp")]
    shapes = cost.layer_inputs(ctx.model, names)
    counts = rank_grid(max(1, min(min_tokens, n0)), n0, cost.settings.grid + 1, None)
    attention: list[list[float]] = [[] for _ in blocks]
    mlp: list[list[float]] = [[] for _ in blocks]
    with ctx.progress.task(f"tokens: timing blocks ({cost.kind})", total=len(counts) * len(blocks)) as advance:
        for n in counts:
            for i, block in enumerate(blocks):
                batch, tokens, width = shapes[f"blocks.{i}.attn"]
                npt = tokens - n0
                attn_s, mlp_s = cost.seconds([block.attn, block.mlp], (batch, npt + n, width), what=f"block {i}")
                attention[i].append(attn_s)
                mlp[i].append(mlp_s)
                advance()
    return BlockCurves(counts, [monotone(a) for a in attention], [monotone(m) for m in mlp])


def patched_copy(model: nn.Module, plan: TokenPlan, arch: Architecture) -> nn.Module:
    """A copy of ``model`` reducing tokens by ``plan`` (``arch``: its architecture), to be timed
    (``model`` is left as it is)."""
    from rmtp.contract.saved_types import apply_patch
    from rmtp_plugins.tokens.patch import TokenReduction

    candidate = copy.deepcopy(model)
    apply_patch(candidate, TokenReduction(arch, **plan.model_dump()))
    return candidate


def reach(ctx: PruneContext, blocks: nn.Sequential, params: PrunerParams, strengths: Sequence[object],
          with_strength: Callable[[object], PrunerParams], plan_of: Callable[[PrunerParams], TokenPlan],
          knob: str) -> tuple[PrunerParams | None, dict[str, Any]]:
    """The params at the gentlest of ``strengths`` (ascending) whose schedule reaches the target
    (the fastest measured if none does), and the prediction for the step's report
    (:meth:`~rmtp.latency.target.SpeedTarget.speed_plan`). None: patch nothing, since no schedule
    timed whole was faster than the model as it came."""
    target = speed_target(ctx, params.target_speedup, params.target_latency_ms)
    n0 = ctx.model.patch_embed.num_patches
    min_tokens = getattr(params, "min_tokens", 1)
    curves = block_curves(ctx, blocks, n0, min_tokens)
    names = [f"blocks.{i}.{part}" for i in range(len(blocks)) for part in ("attn", "mlp")]
    isolated = []
    for i in range(len(blocks)):
        isolated += [curves.attention[i][-1], curves.mlp[i][-1]]
    target.calibrate(ctx, names, isolated)

    def savings(candidate: PrunerParams) -> list[float]:
        plan = plan_of(candidate)
        counts = token_counts(n0, keep=plan.keep, r=plan.r, relative_to=plan.relative_to, min_tokens=plan.min_tokens)
        return [curves.seconds(i, n0, n0) - curves.seconds(i, n_in, n_out) for i, (n_in, n_out) in enumerate(counts)]

    index = reach_checked(ctx, target, [with_strength(s) for s in strengths], savings,
                          lambda candidate: patched_copy(ctx.model, plan_of(candidate), ctx.arch))
    if index is None:  # the fallback note says why
        return None, target.speed_plan([], f"no {knob} chosen for the speed target")
    chosen = with_strength(strengths[index])
    saved = savings(chosen)
    short = target.shortfall(saved, f"{knob} up to {strengths[-1]}")
    corrected = target.correction_note(saved, "scoring, top-k and gather")
    return chosen, target.speed_plan(saved, "; ".join(filter(None, [
        f"{knob} = {strengths[index]} chosen for the speed target", corrected, short])))


__all__ = ["BlockCurves", "block_curves", "patched_copy", "reach"]
