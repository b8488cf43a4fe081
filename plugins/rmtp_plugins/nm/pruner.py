"""``n:m``: N:M structured sparsity with Marchenko–Pastur layer budgets, channel permutation and
prune–restore.

An N:M mask keeps at most n of every m consecutive input weights of each output row (2:4, 4:8,
6:12, 8:16, 12:16, any 1 ≤ n < m), the pattern sparse tensor cores execute at n/m of the dense
MACs. Layout (:mod:`.masks`): a Linear's groups run along ``in_features``; a Conv2d is the
GEMM matrix out × (R·S·C) with the input channel fastest, so a group is m consecutive input
channels at one output channel and kernel position (C must be a multiple of m). Grouped and
depthwise convs are refused (they are never prunable layers anyway).

The steps, in order (formulas in ``docs/nm.md``):

1. **Scores.** ``magnitude``: s = |w|. ``wanda``: s = |w|·‖x_k‖, with ‖x_k‖² = Σ_t x_tk² over every
   calibration position t (token, or output pixel × kernel offset) that weight column k multiplies.
   ``sparsegpt`` ranks as ``wanda`` for the budget and the permutation (its saliency w²/[H⁻¹]_kk²
   with H⁻¹ replaced by its diagonal is Wanda's score squared, up to a constant).
2. **Budget.** ``uniform``: every layer gets n:m. ``mp``: each layer l gets a signal share
   u_l = Σ max(s_i² − σ₊², 0) / Σ s_i² (energy above its fitted MP edge σ₊), z-scored across the
   layers, c_l = exp(z_scale·z_l); scores become s̃ = c_l·s / rms_l(s) and the per-layer pattern
   (n:m or one of ``patterns``, e.g. ``dense`` or ``6:8``) is chosen to minimise the removed
   Σ s̃² subject to Σ MACs_l·density_l ≤ ``target_macs``·Σ MACs_l (greedy multiple-choice knapsack,
   :mod:`.budget`). MACs_l = positions per image × out × K, positions measured on calibration data.
3. **Permutation** (``permute``). Input channels reordered so high scores land in different groups
   (:mod:`.permute`), applied to the producing layer's output rows where the architecture
   allows (ViT fc2←fc1, proj←v rows within heads; ResNet conv2←conv1, conv3←conv2; ConvNeXt
   fc2←fc1), else as a saved index (:class:`PermutedInput`, survives save/load) when
   ``permute_index``.
4. **Masks.** Top-n scores per group. With ``restore``: keep the top n − ``restore_overprune`` per
   group, then greedily restore, inside groups with room, the weight that most lowers the layer's
   calibration output error ‖(W − Ŵ)X‖²; the restored mask is used only if its error is no higher
   than the plain mask's. With ``sparsegpt`` (:mod:`.sparsegpt`): layer by layer in forward
   order (:func:`rmtp.fidelity.layerwise.compress_sequentially`), on the inputs of the model as pruned so
   far, the mask is chosen group by group with the OBS update of the weights not yet visited;
   ``refit`` then sets each row's kept weights to their least-squares optimum for that mask.

Masks are exact zeros, so a later ``finetune`` keeps them fixed (gradients masked, weights
re-masked each step) and they survive save/load. On CUDA, :func:`to_semi_structured` converts 2:4
fp16/bf16 Linear layers to ``torch.sparse`` semi-structured tensors; :func:`check_nm` verifies a
weight's pattern.
"""

from __future__ import annotations

import torch
from torch import nn

from rmtp.contract.pruner import LayerRow, PruneContext, PruneResult, weight_footprint
from rmtp.errors import RmtpError
from rmtp.fidelity.layerwise import LayerInputs, collect_input_stats, compress_sequentially
from rmtp.gemm import from_gemm, gemm_view
from rmtp_plugins.nm import speed
from rmtp_plugins.nm.budget import Option, allocate, layer_factor, mp_signal, z_scores
from rmtp_plugins.nm.masks import (
    channel_index,
    channel_rows,
    check_nm,
    layout_problem,
    nm_mask,
    pattern_name,
    reconstruction_error,
    restore_mask,
    scores_for,
)
from rmtp_plugins.nm.params import NmParams, pattern_density
from rmtp_plugins.nm.permute import PermutedInput, apply_permutation, find_absorber, plain, search_permutation
from rmtp_plugins.nm.plan import LayerPlan
from rmtp_plugins.nm.sparsegpt import least_squares_refit, output_error, sparsegpt

__all__ = ["collect_input_stats", "prune"]  # collect_input_stats: its first home, now rmtp.fidelity.layerwise

# --------------------------------------------------------------------------------------------
# The pruner's steps (NmPruner.prune runs prune)
# --------------------------------------------------------------------------------------------


def prune(ctx: PruneContext, params: NmParams) -> PruneResult:
    plans = [_plan(ctx, layer.name, params) for layer in ctx.layers]
    active = [p for p in plans if p.skipped is None]
    before = {p.name: weight_footprint(ctx.module(p.name)) for p in plans}
    notes = _calibrate(ctx, active, params)
    target, times = speed.start(ctx, active, params) if speed.uses_time(params) else (None, {})
    if params.budget == "uniform":
        for plan in active:
            plan.pattern = params.main()
    else:
        _budget(ctx, active, params, target, times)
    speed_plan = None
    if target is not None:
        speed.keep_dense_if_slower(ctx, active, times)
        if target.predicts:
            saved = speed.savings(active, times)
            speed_plan = target.speed_plan(saved, target.shortfall(saved, "n:m on these layers"))
    nm_plans = [p for p in active if p.pattern is not None]
    if params.permute:
        with ctx.progress.task("n:m: channel permutations", total=len(nm_plans)) as advance:
            for plan in nm_plans:
                _permute(ctx, plan, params)
                advance()
    if params.score == "sparsegpt":
        _sparsegpt_masks(ctx, nm_plans, params)
    else:
        with ctx.progress.task("n:m: masks", total=len(nm_plans)) as advance:
            for plan in nm_plans:
                _mask(ctx, plan, params)
                advance()
    return PruneResult([_row(ctx, plan, before[plan.name], params, notes) for plan in plans], speed_plan)


# ---------------------------------------------------------------- planning


def _plan(ctx: PruneContext, name: str, params: NmParams) -> LayerPlan:
    module = plain(ctx.module(name))
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return LayerPlan(name, (), skipped=f"not a Linear/Conv2d ({type(module).__name__})")
    shape = tuple(module.weight.shape)
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    plan = LayerPlan(name, shape)
    problems = []
    for pattern in params.options():
        problem = None if pattern is None else layout_problem(shape, pattern[1], groups=groups)
        if problem is None:
            plan.options.append(pattern)
        else:
            problems.append(problem)
    if not any(p is not None for p in plan.options):
        plan.skipped = problems[0] if problems else "no N:M pattern applies"
    return plan


def _calibrate(ctx: PruneContext, plans: list[LayerPlan], params: NmParams) -> str:
    """Input statistics of every active layer; returns a note for the rows ('' if none)."""
    wanda, restore = params.score != "magnitude", params.restore  # sparsegpt: wanda ranks for budget, permutation
    if ctx.calibration is None:
        if wanda or restore:
            needs = f"score: {params.score}" if wanda else "restore"
            raise RmtpError(f"n:m: {needs} needs calibration data, and none was given")
        for plan in plans:
            plan.stats = LayerInputs()
            plan.macs = plan.shape[0] * plan.k
        return "MACs counted as weights (no calibration data)"
    modules = {p.name: plain(ctx.module(p.name)) for p in plans}
    with ctx.progress.task("n:m: calibration statistics"):
        stats = collect_input_stats(ctx.model, modules, ctx.calibration, ctx.device, precision=ctx.precision,
                                    squares=wanda,
                                    gram=restore, max_batches=None if (wanda or restore) else 1)
    for plan in plans:
        plan.stats = stats[plan.name]
        plan.macs = plan.stats.positions * plan.shape[0] * plan.k
    return ""


def _scores(ctx: PruneContext, plan: LayerPlan, params: NmParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(GEMM matrix, scores) of a layer as it is now."""
    matrix = gemm_view(plain(ctx.module(plan.name)).weight.detach())
    sq = plan.stats.sq_norms if params.score != "magnitude" else None  # sparsegpt ranks as Wanda before its masks
    return matrix, scores_for(matrix, sq.to(matrix.device) if sq is not None else None)


def _budget(ctx: PruneContext, plans: list[LayerPlan], params: NmParams, target: speed.SpeedTarget | None = None,
            times: dict[str, speed.LayerTimes] | None = None) -> None:
    """Patterns per layer: least MP-weighted damage within ``target_macs`` of the MACs or, with a
    speed target, within the time budget (each option costing its predicted time)."""
    if params.z_scale > 0:
        with ctx.progress.task("n:m: MP fits", total=len(plans)) as advance:
            for plan in plans:
                module = plain(ctx.module(plan.name))
                blocks = ctx.arch.qkv_split(plan.name, module) if isinstance(module, nn.Linear) else None
                signal = mp_signal(gemm_view(module.weight), blocks, alpha=params.alpha,
                                   tw_confidence=params.tw_confidence, min_dim=params.min_dim)
                plan.signal, plan.edge = signal.share, signal.edge
                advance()
    for plan, z in zip(plans, z_scores([p.signal for p in plans])):
        plan.z = z
    choices = []
    for plan in plans:
        _, scores = _scores(ctx, plan, params)
        energy = scores.double().pow(2)
        mean = float(energy.mean())
        factor = layer_factor(plan.z, params.z_scale) ** 2 / mean if mean > 0 else 0.0
        options = []
        for pattern in plan.options:
            removed = 0.0 if pattern is None else float(energy[~nm_mask(scores, *pattern)].sum())
            options.append(Option(pattern, plan.macs * pattern_density(pattern), factor * removed))
        choices.append(options)
    if target is not None and target.goal is not None:
        timed = [i for i, p in enumerate(plans) if p.name in times]
        for i in timed:  # untimed layers (not reached by a batch) stay dense
            choices[i] = [Option(o.pattern, times[plans[i].name].time(o.pattern), o.damage) for o in choices[i]]
        for plan in (p for i, p in enumerate(plans) if i not in set(timed)):
            plan.pattern = None
        picked = allocate([choices[i] for i in timed], speed.time_budget(target, plans, times))
        for i, option in zip(timed, picked):
            plans[i].pattern = option.pattern
        return
    total = sum(p.macs for p in plans)
    for plan, option in zip(plans, allocate(choices, params.target_macs * total)):
        plan.pattern = option.pattern


# ---------------------------------------------------------------- permutation and masks


def _permute(ctx: PruneContext, plan: LayerPlan, params: NmParams) -> None:
    n, m = plan.pattern
    absorber = find_absorber(ctx.model, plan.name, ctx.arch.couplings(ctx.model))
    if absorber is None and not params.permute_index:
        plan.perm = "none (no producer)"
        return
    _, scores = _scores(ctx, plan, params)
    energy = channel_rows(scores.double().pow(2), plan.shape)
    perm = search_permutation(energy, n, m, blocks=absorber.blocks if absorber else None)
    if torch.equal(perm, torch.arange(perm.numel())):
        plan.perm = "identity"
        return
    kind = apply_permutation(ctx.model, plan.name, perm, absorber, allow_index=params.permute_index)
    plan.perm = f"{kind}: {absorber.what}" if kind == "real" else "index"
    index = channel_index(perm, plan.shape)
    stats = plan.stats
    if stats.sq_norms is not None:
        stats.sq_norms = stats.sq_norms[index.to(stats.sq_norms.device)]
    if stats.gram is not None:
        index = index.to(stats.gram.device)
        stats.gram = stats.gram[index][:, index]


def _mask(ctx: PruneContext, plan: LayerPlan, params: NmParams) -> None:
    n, m = plan.pattern
    weight = plain(ctx.module(plan.name)).weight
    matrix, scores = _scores(ctx, plan, params)
    keep = nm_mask(scores, n, m)
    if params.restore:
        gram = plan.stats.gram.to(matrix.device)
        restored = restore_mask(matrix, scores, gram, n, m, params.restore_overprune)
        plain_err = reconstruction_error(matrix, keep, gram)
        restored_err = reconstruction_error(matrix, restored, gram)
        if restored_err <= plain_err:
            keep = restored
            change = (restored_err / plain_err - 1) if plain_err > 0 else 0.0
            plan.restore = f"{change:+.1%} err"
        else:
            plan.restore = "kept plain (restore no better)"
    with torch.no_grad():
        weight.copy_(from_gemm(matrix * keep.to(matrix.dtype), plan.shape))


def _sparsegpt_masks(ctx: PruneContext, plans: list[LayerPlan], params: NmParams) -> None:
    """SparseGPT masks and weight updates, layer by layer in forward order, each layer's Hessian
    taken from its inputs in the model as pruned so far (the reference's sequential driver,
    ``opt.py::opt_sequential``, does this block by block; here it is per layer). Patterns come from
    the budget and permutations are already applied, so the inputs are the permuted ones."""
    by_layer = {_inner_name(ctx, plan.name): plan for plan in plans}

    def compress(name: str, module: nn.Module, inputs: LayerInputs) -> None:
        _sparsegpt_layer(by_layer[name], module, inputs, params)

    compress_sequentially(ctx.model, list(by_layer), ctx.calibration, ctx.device, compress=compress,
                          progress=ctx.progress, precision=ctx.precision, description="n:m: sparsegpt masks")


def _inner_name(ctx: PruneContext, name: str) -> str:
    """The name of the Linear/Conv2d itself: inside a :class:`PermutedInput`, its ``.layer``, which
    receives the permuted input the mask is chosen for."""
    return f"{name}.layer" if isinstance(ctx.module(name), PermutedInput) else name


def _sparsegpt_layer(plan: LayerPlan, module: nn.Module, inputs: LayerInputs, params: NmParams) -> None:
    """Prune one layer with SparseGPT on ``inputs``; a layer no calibration batch reaches gets the
    magnitude mask and no update (nothing to fit it to), as Wanda's scores fall back to magnitude."""
    n, m = plan.pattern
    matrix = gemm_view(module.weight.detach())
    if inputs.count == 0 or inputs.gram is None:
        pruned = matrix * nm_mask(scores_for(matrix, None), n, m).to(matrix.dtype)
        plan.sparsegpt_err = "not reached: magnitude mask"
    else:
        gram = inputs.gram.to(matrix.device)
        result = sparsegpt(matrix, gram, inputs.count, n, m, blocksize=params.blocksize, percdamp=params.percdamp)
        pruned = result.matrix
        plan.sparsegpt_err = f"{output_error(matrix, pruned, gram):.2%} err"
        if params.refit:
            pruned = least_squares_refit(matrix, result.keep, gram, inputs.count, percdamp=params.percdamp)
            plan.sparsegpt_err += f", refit {output_error(matrix, pruned, gram):.2%}"
    module.weight.copy_(from_gemm(pruned.to(module.weight.dtype), plan.shape))


# ---------------------------------------------------------------- report


def _row(ctx: PruneContext, plan: LayerPlan, before: tuple, params: NmParams, notes: str) -> LayerRow:
    shape, params_before, nonzeros_before = before
    module = ctx.module(plan.name)
    _, params_after, nonzeros_after = weight_footprint(module)
    if plan.skipped is not None:
        return LayerRow(plan.name, shape, shape, params_before, params_after, nonzeros_before, nonzeros_after,
                        skipped=plan.skipped, note=f"skipped: {plan.skipped}")
    detail: dict = {"pattern": pattern_name(plan.pattern)}
    if params.budget == "mp":
        detail["signal u"] = plan.signal
        detail["z"] = round(plan.z, 3)
    detail["MACs"] = round(plan.macs)
    detail["sparse MACs"] = round(plan.macs * pattern_density(plan.pattern))
    if params.permute:
        detail["perm"] = plan.perm
    if params.restore:
        detail["restore"] = plan.restore
    if params.score == "sparsegpt":
        detail["sparsegpt"] = plan.sparsegpt_err
    if plan.layer_speedup is not None:
        detail["speed"] = f"×{plan.layer_speedup:.2f}"
    density = pattern_density(plan.pattern)
    weight = plain(module).weight
    kept = float((weight != 0).float().mean())
    note = notes
    if plan.pattern is None:
        reason = plan.dense_reason or ("kept dense by the speed budget" if params.target_speedup or
                                       params.target_latency_ms else "kept dense by the MP budget")
        return LayerRow(plan.name, shape, shape, params_before, params_after, nonzeros_before, nonzeros_after,
                        budget=1.0, kept_fraction=kept, skipped=reason, note="; ".join(filter(None, [reason, note])),
                        detail=detail)
    check = check_nm(weight, *plan.pattern)
    if not check.ok:  # cannot happen: masks are N:M by construction
        raise AssertionError(f"n:m: {plan.name} violates {pattern_name(plan.pattern)} in {check.bad_groups} groups")
    return LayerRow(plan.name, shape, shape, params_before, params_after, nonzeros_before, nonzeros_after,
                    budget=density, kept_fraction=kept, note=note, detail=detail)

