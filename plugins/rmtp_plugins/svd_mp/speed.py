"""svd-mp in time: which splits are faster on the target, and the ranks that reach a speed target.

Each layer whose split would save weights is timed on a grid of ranks (every block of a fused qkv
at the same share t of its break-even rank k* = M·N/(M+N), so Σk·(M+N) = t·M·N), interleaved with
the dense layer, through the step's cost model (:mod:`rmtp.latency`); a rank in between is read
by linear interpolation in the total rank. Then:

* ``only_if_faster``: a split whose predicted time is not below the dense layer's by
  ``latency.min_gain`` (measured costs; any saving for ``cost: macs``) stays dense, unchanged; with
  measured costs the split model is then timed whole against dense, and if it is not faster than
  the model as it came every layer stays dense (:func:`_check_whole`);
* ``target_speedup`` / ``target_latency_ms``: every singular direction is scored by s/s₊ (as
  ``target_params`` does), and the loosest score threshold whose ranks make the model fast enough
  is found by bisection: raising the threshold only cuts ranks, so the figures' predicted time
  falls monotonically (timings are made monotone in rank first), and the directions kept are the ones
  standing highest above their layer's noise edge. The chosen ranks' split model is then timed
  against dense and the search redone with what the layer figures missed
  (:func:`rmtp.latency.target.reach_checked`); a choice that measures no faster than the model
  as it came is not kept.

Layers an earlier round already split are cut as before and not timed: cutting a rank never
makes a split slower, and their savings are left out of the prediction (conservative).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rmtp.contract.pruner import PruneContext
from rmtp.latency.cost import interpolate, monotone, round_up
from rmtp.latency.target import SpeedTarget, reach_checked, speed_target
from rmtp_plugins.svd_mp.lowrank import factorize, factorize_blocks
from rmtp_plugins.svd_mp.plan import LayerPlan, Matrix

if TYPE_CHECKING:
    from rmtp_plugins.svd_mp.params import SvdMpParams


@dataclass
class LayerSpeed:
    """One layer's dense time and its split's time on the grid of total ranks."""

    dense: float
    ranks: list[int] = field(default_factory=list)
    split: list[float] = field(default_factory=list)

    def split_time(self, total_rank: int) -> float:
        return interpolate(self.ranks, self.split, total_rank)


def uses_time(params: SvdMpParams) -> bool:
    return params.target_speedup is not None or params.target_latency_ms is not None or bool(params.faster_only())


def plan_in_time(ctx: PruneContext, plans: list[LayerPlan], params: SvdMpParams,
                 clamp) -> dict[str, Any] | None:
    """Time the candidate splits, then set ranks for the speed target (if any) and mark the
    layers that stay dense (``plan.dense_reason``); returns the prediction for the step's report
    (:meth:`~rmtp.latency.target.SpeedTarget.speed_plan`), None when the step predicts none."""
    target = speed_target(ctx, params.target_speedup, params.target_latency_ms)
    candidates = [p for p in plans if not p.skipped and not p.already_split]
    speeds = _time_grids(ctx, candidates)
    timed = [p for p in candidates if p.name in speeds]
    if target.predicts:
        target.calibrate(ctx, [p.name for p in timed], [speeds[p.name].dense for p in timed])
    round_to = ctx.cost_model().settings.round_to
    min_gain = 0.0 if target.cost.kind == "macs" else ctx.cost_model().settings.min_gain

    def split_now(plan: LayerPlan) -> float | None:
        """The plan's predicted split time at its current ranks, None when it would stay dense."""
        speed = speeds.get(plan.name)
        if speed is None or plan.dense_reason is not None:
            return None
        split = speed.split_time(sum(m.rank for m in plan.matrices))
        return split if plan.split_cost() < plan.dense_cost() and split < speed.dense * (1 - min_gain) else None

    def savings() -> list[float]:
        return [speeds[p.name].dense - split for p in candidates if (split := split_now(p)) is not None]

    def split_copy() -> torch.nn.Module:
        """A copy of the model with the splits :func:`savings` counts, at the current ranks."""
        model = copy.deepcopy(ctx.model)
        for plan in candidates:
            if split_now(plan) is not None:
                model.set_submodule(plan.name, factorized(plan))
        return model

    if target.goal is not None:
        if not _reach(ctx, target, candidates, params, clamp, round_to, savings, split_copy):
            _keep_dense(candidates, split_now)
    else:
        if round_to:
            for plan in candidates:
                for m in plan.matrices:
                    m.rank = round_up(m.rank, round_to, min(m.shape))
        if target.cost.kind == "measured" and savings():
            _check_whole(ctx, target, candidates, savings, split_copy, split_now)
    saved = savings()
    for plan in candidates:
        speed = speeds.get(plan.name)
        if speed is None or plan.split_cost() >= plan.dense_cost():
            continue
        split = speed.split_time(sum(m.rank for m in plan.matrices))
        ratio = speed.dense / split if split > 0 else math.inf
        if target.cost.kind != "macs":  # under MACs the MACs/pos column already says it
            plan.layer_speedup = ratio
        if not split < speed.dense * (1 - min_gain):
            plan.dense_reason = (f"split not faster: ×{ratio:.2f} of dense speed predicted ({target.cost.kind}"
                                 f"{'' if min_gain == 0 else f', needs ×{1 / (1 - min_gain):.2f}'})")
    if not target.predicts:
        return None
    return target.speed_plan(saved, "; ".join(filter(None, [
        target.correction_note(saved, "the split layers' effect on their neighbours' time"),
        target.shortfall(saved, "svd-mp on these layers")])))


#: A layer's row when its split was left out because the split model, timed whole, was not faster.
WHOLE_NOT_FASTER = "the split model, timed whole, was not faster: see the step's notes"


def _keep_dense(plans: list[LayerPlan], split_now) -> None:
    """Every layer that would split stays dense, unchanged (the whole split model was not faster)."""
    for plan in [p for p in plans if split_now(p) is not None]:
        plan.dense_reason = WHOLE_NOT_FASTER


def _check_whole(ctx: PruneContext, target: SpeedTarget, plans: list[LayerPlan], savings, split_copy,
                 split_now) -> None:
    """``only_if_faster`` on the whole model (measured cost, no target): each split is faster
    alone, but together in the model they can be slower (a default run measured ×0.69 where the
    figures said ×1.15), so the split model is timed against dense and, unless it is faster than
    the model as it came, every layer stays dense and the report says so."""
    if target.keep_measured({0: target.correct(ctx, savings(), split_copy())}, 0) is None:
        _keep_dense(plans, split_now)


def _reach(ctx: PruneContext, target: SpeedTarget, plans: list[LayerPlan], params: SvdMpParams, clamp,
           round_to: int | None, savings, split_copy) -> bool:
    """Loosest s/s₊ threshold whose ranks reach ``target`` (the fastest measured if none does), the
    choice checked on the whole split model (:func:`rmtp.latency.target.reach_checked`). False when
    no split model timed was faster than the model as it came: then no layer should split."""
    scores = {id(m): m.scores() for p in plans for m in p.matrices}

    def set_threshold(tau: float) -> None:
        for plan in plans:
            for m in plan.matrices:
                rank = clamp(int((scores[id(m)] > tau).sum()), m, params)
                m.rank = round_up(rank, round_to, min(m.shape)) if round_to else rank

    def savings_at(tau: float) -> list[float]:
        set_threshold(tau)
        return savings()

    def built_at(tau: float) -> torch.nn.Module:
        set_threshold(tau)
        return split_copy()

    candidates = torch.cat(list(scores.values())).unique().sort().values.tolist() if scores else []
    if not candidates:
        return True
    index = reach_checked(ctx, target, candidates, savings_at, built_at)
    set_threshold(candidates[index if index is not None else 0])
    return index is not None


def factorized(plan: LayerPlan) -> torch.nn.Module:
    """The plan's layer split at its current ranks (what ``pruner._apply`` puts in the model)."""
    if len(plan.matrices) == 1:
        m = plan.matrices[0]
        return factorize(plan.module, m.u, m.s, m.vh, m.rank, edge=m.s_plus)
    return factorize_blocks(plan.module, [(m.rows, m.u, m.s, m.vh, m.rank) for m in plan.matrices],
                            edges=[m.s_plus for m in plan.matrices])


def _time_grids(ctx: PruneContext, plans: list[LayerPlan]) -> dict[str, LayerSpeed]:
    cost = ctx.cost_model()
    settings = cost.settings
    inputs = cost.layer_inputs(ctx.model, [p.name for p in plans])
    speeds: dict[str, LayerSpeed] = {}
    with ctx.progress.task(f"svd-mp: timing splits ({cost.kind})", total=len(plans)) as advance:
        for plan in plans:
            shape = inputs.get(plan.name)
            if shape is None and isinstance(plan.module, torch.nn.Linear):  # not reached by a random batch
                shape = (settings.batch, plan.module.in_features)
            if shape is not None and plan.split_cost() < plan.dense_cost():
                speeds[plan.name] = _grid(cost, plan, shape, settings.grid, settings.round_to)
            advance()
    return speeds


def _grid(cost, plan: LayerPlan, input_shape: tuple[int, ...], points: int,
          round_to: int | None) -> LayerSpeed:
    _, cols = plan.rows_cols
    caps = [max(1, math.floor(m.shape[0] * cols / (m.shape[0] + cols))) for m in plan.matrices]
    grid: dict[int, list[int]] = {}
    for share in sorted({1 / 16, *((i + 1) / points for i in range(points))}):
        ranks = [min(max(1, round_up(round(share * cap), round_to, cap)), m.s.numel())
                 for cap, m in zip(caps, plan.matrices)]
        grid.setdefault(sum(ranks), ranks)
    modules = [_split(plan, ranks) for ranks in grid.values()]
    times = cost.seconds([plan.module, *modules], input_shape, what=plan.name)
    return LayerSpeed(dense=times[0], ranks=list(grid), split=monotone(times[1:]))


def _split(plan: LayerPlan, ranks: list[int]) -> torch.nn.Module:
    matrices: list[Matrix] = plan.matrices
    if len(matrices) == 1:
        m = matrices[0]
        return factorize(plan.module, m.u, m.s, m.vh, ranks[0])
    return factorize_blocks(plan.module, [(m.rows, m.u, m.s, m.vh, k) for m, k in zip(matrices, ranks)])
