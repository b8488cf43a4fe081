"""svd-mp's ``allocation: sensitivity``: each layer's ranks from how far truncating that layer alone
moves the model's predictions, measured as ASVD does (Yuan et al. 2023), allocated to minimise
their sum within ``target_params``.

A global score threshold (``allocation: global``) compares directions across layers by their share
of their own layer's output energy, which says nothing of what a layer's output error does to the
predictions: on the real ViT-Ti it kept 46-55% top-1 at 90% of the params. ASVD measures that
instead (hahnyuan/ASVD4LLM, ``sensitivity.py``, ``calib_sensitivity_ppl``: each Linear alone at
param ratios 0.1 … 0.9 of its weights, the model's perplexity on calibration data). Here the
measure is KL(model ‖ model with the layer's whitened rank-k reconstruction) of the predicted class
distributions on ``sensitivity_images`` calibration images, as the accuracy budget and int8's
screening measure.

The allocation differs from ASVD's on purpose. ASVD (``binary_search.py``,
``binary_search_truncation_rank``) sorts all (layer, ratio, score) triples and binary-searches a
cut of that list, each layer taking the smallest ratio on the gentle side: a threshold on each
layer's damage, which sends a layer to its smallest share as soon as that share's damage is under
the threshold, however little the budget needed it. Treating the measured KLs as additive, the
best allocation is instead the multiple-choice knapsack min Σ KL_l(share_l) s.t. Σ cost_l ≤ budget,
solved here by Lagrangian relaxation (Everett 1963): for a price λ each layer takes the share
minimising KL + λ·cost, and λ is the smallest price whose choices fit the budget. Everett's theorem
makes each such choice optimal for the cost it reaches (no allocation as cheap has a lower sum;
tests/test_svd_mp_sensitivity.py checks it by enumeration). On the real ViT-Ti at 90% of the block
weights, from the same measurements: ASVD's threshold 68.7% top-1, this 72.7% (benchmarks/README.md).
The layer's factors are still the whitened optimum at the ranks chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rmtp.contract.pruner import PruneContext
from rmtp.errors import RmtpError
from rmtp.fidelity.agreement import DenseReference
from rmtp.fidelity.blockwise import calibration_images
from rmtp_plugins.svd_mp.params import SvdMpParams
from rmtp_plugins.svd_mp.plan import LayerPlan, Matrix, write_reconstruction

#: The shares of a layer's dense weights each layer is measured at (ASVD's ``param_ratio_candidates``).
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Option:
    """One layer at one share of its weights: the ranks of its matrices, what it holds, its KL alone."""

    ratio: float
    ranks: tuple[int, ...]
    cost: int
    kl: float


Clamp = Callable[[int, Matrix, SvdMpParams], int]


def allocate_by_sensitivity(ctx: PruneContext, plans: list[LayerPlan], params: SvdMpParams, clamp: Clamp) -> None:
    """Set every plan's ranks so the selected layers keep at most ``target_params`` of their dense
    weights, by Lagrangian relaxation (see the module): the sum of measured KLs is the least of any
    allocation holding no more weights than the one chosen, which may leave part of the budget
    unspent where the price steps over several layers at once. Layers already split keep their
    ranks (a later round re-cuts them with ``allocation: global``); a layer whose every share costs
    more than it saves at the price found stays dense (full ranks, so it is not split). When even
    every layer at its smallest share (0.1) holds more than the budget, that is what is applied,
    and a note says so."""
    active = [plan for plan in plans if not plan.skipped]
    candidates = [plan for plan in active if not plan.already_split and plan.matrices]
    split = [plan for plan in active if plan.already_split]
    for plan in split:
        for m in plan.matrices:
            m.rank = m.s.numel()
    if split:
        ctx.progress.note(f"svd-mp: allocation: sensitivity keeps the {len(split)} layers an earlier step split at "
                          f"their ranks; to cut those again use allocation: global")
    budget = (params.target_params * sum(plan.dense_cost() for plan in plans)
              - sum(plan.current_cost() for plan in plans if plan.skipped)
              - sum(plan.cost() for plan in active if plan.already_split))
    table = ctx.step_cached("svd-mp.sensitivity", (plan.name for plan in candidates), params,
                            varies={"target_params"}, compute=lambda: measure(ctx, candidates, params, clamp))
    choices = {plan.name: [None, *table[plan.name]] for plan in candidates}  # None: the layer stays dense
    dense = {plan.name: plan.dense_cost() for plan in candidates}
    scale = max(sum(dense.values()), 1)  # costs as shares of the candidates' weights, so λ is O(KL)

    def cost_of(name: str, option: Option | None) -> int:
        return dense[name] if option is None else option.cost

    def picks(price: float) -> dict[str, Option | None]:
        return {name: min(options, key=lambda o: ((0.0 if o is None else o.kl) + price * cost_of(name, o) / scale,
                                                  cost_of(name, o)))
                for name, options in choices.items()}

    def total(chosen: dict[str, Option | None]) -> int:
        return sum(cost_of(name, option) for name, option in chosen.items())

    low, high = 0.0, 1.0
    while total(picks(high)) > budget and high < 1e12:
        high *= 2
    for _ in range(100):  # bisection on the price: total cost is non-increasing in it
        middle = (low + high) / 2
        if total(picks(middle)) <= budget:
            high = middle
        else:
            low = middle
    chosen = picks(high)
    if candidates and total(chosen) > budget:
        dense_total = max(sum(plan.dense_cost() for plan in plans), 1)
        fixed = params.target_params * dense_total - budget  # what the skipped and split layers hold
        held = (total(chosen) + fixed) / dense_total
        ctx.progress.note(f"svd-mp: target_params {params.target_params:g} is below what allocation: sensitivity "
                          f"can reach (every layer at {RATIOS[0]:g} of its weights holds {held:.1%} of the selected "
                          f"weights); applied that. For a deeper cut use allocation: global")
    for plan in candidates:
        option = chosen[plan.name]
        for m, rank in zip(plan.matrices, option.ranks if option else [min(m.shape) for m in plan.matrices]):
            m.rank = min(rank, m.s.numel())
        plan.sensitivity = option.kl if option else None


def measure(ctx: PruneContext, plans: list[LayerPlan], params: SvdMpParams, clamp: Clamp) -> dict[str, list[Option]]:
    """Per layer, one :class:`Option` per share in :data:`RATIOS` that saves weights: the layer's
    whitened rank-k reconstruction written into its weight, the KL from the model as it came on the
    first ``sensitivity_images`` calibration images, the weight restored."""
    if ctx.calibration is None:
        raise RmtpError("svd-mp: allocation: sensitivity measures each layer on calibration images, and none "
                        "were given; pass them (rmtp.prune(..., calibration=)), or use allocation: global")
    images = calibration_images(ctx.calibration, params.sensitivity_images, who="svd-mp")
    reference = DenseReference(ctx.model, images, device=ctx.device, precision=ctx.precision)
    table: dict[str, list[Option]] = {}
    with ctx.progress.task("svd-mp: layer sensitivity", total=len(plans) * len(RATIOS)) as advance:
        for plan in plans:
            weight = plan.module.weight
            saved = weight.detach().clone()
            table[plan.name] = []
            try:
                for ratio in RATIOS:
                    for m in plan.matrices:
                        rows, cols = m.shape
                        m.rank = clamp(math.floor(ratio * rows * cols / (rows + cols)), m, params)
                    if plan.split_cost() < plan.dense_cost():
                        write_reconstruction(weight, plan.matrices)
                        _, kl = reference.score(ctx.model)
                        table[plan.name].append(Option(ratio, tuple(m.rank for m in plan.matrices),
                                                       plan.split_cost(), kl))
                        with torch.no_grad():
                            weight.copy_(saved)
                    advance()
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
    return table


__all__ = ["RATIOS", "Option", "allocate_by_sensitivity", "measure"]
