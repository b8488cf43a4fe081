"""How ``svd-mp`` prunes (:class:`rmtp_plugins.svd_mp.SvdMpPruner` runs :func:`prune`; this module
was ``factoring.py``): the SVD and MP fit of every selected matrix (recorded as :mod:`.plan`'s
:class:`~.plan.LayerPlan`), the ranks (per layer, or allocated globally under
``target_params``), the splits into two thin layers, and the report rows. The method itself is
described in :mod:`rmtp_plugins.svd_mp`; with calibration data the decompositions are those of the
whitened matrices (:mod:`.whitening`), from one calibration pass, or layer by layer with
``sequential`` (:func:`_apply_sequentially`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from rmtp.contract.pruner import LayerRow, PruneContext, PruneResult, weight_footprint
from rmtp.spectral.mp import fit_mp, weight_matrix
from rmtp_plugins.svd_mp.lowrank import LOW_RANK_TYPES, factor_svds, refactorize
from rmtp_plugins.svd_mp.plan import LayerPlan, Matrix, write_reconstruction
from rmtp_plugins.svd_mp.sensitivity import allocate_by_sensitivity
from rmtp_plugins.svd_mp.speed import factorized, plan_in_time, uses_time
from rmtp_plugins.svd_mp.whitening import (
    input_root,
    output_error,
    weight_order_gram,
    whitened_scores,
    whitened_svd,
)

if TYPE_CHECKING:
    from rmtp_plugins.svd_mp.params import SvdMpParams


def prune(ctx: PruneContext, params: SvdMpParams) -> PruneResult:
    whiten = ctx.calibration is not None and params.whiten is not False
    sequential = whiten and params.sequential
    roots = _dense_roots(ctx) if whiten and (not sequential or _ranks_need_data(params)) else {}
    plans = _plan(ctx, params, roots)
    for plan in plans:
        plan.fits_data = whiten
    if params.target_params is not None and params.allocation == "sensitivity":
        allocate_by_sensitivity(ctx, plans, params, _clamp)
    elif params.target_params is not None:
        (_allocate_uniformly if params.allocation == "uniform" else _allocate_globally)(plans, params)
    speed_plan = plan_in_time(ctx, plans, params, _clamp) if uses_time(params) else None
    budgets = (params.target_params, params.target_speedup, params.target_latency_ms)
    if not whiten and all(budget is None for budget in budgets):
        _say_what_the_edge_cuts(ctx, plans)
    if sequential:
        return PruneResult(_apply_sequentially(ctx, plans, params), speed_plan)
    rows = []
    with ctx.progress.task("svd-mp: replacing layers", total=len(plans)) as advance:
        for plan in plans:
            rows.append(_apply(ctx, plan, params))
            advance()
    return PruneResult(rows, speed_plan)


#: Below this share of the selected weights kept, an MP-edge cut without data is announced first.
EDGE_NOTE_BELOW = 0.5


def _say_what_the_edge_cuts(ctx: PruneContext, plans: list[LayerPlan]) -> None:
    """Before any layer is replaced, tell what the MP edge on the raw weights will keep when it is
    less than half: on a pretrained model the edge calls most of what it learnt noise (a real
    ViT-Ti went from 82.8% to 0.1% top-1 zero-shot), and a user should see that coming, with the
    way out, rather than find it in the evaluation."""
    cut = [plan for plan in plans if not plan.skipped and not plan.already_split and plan.dense_reason is None]
    full = sum(min(m.shape) for plan in cut for m in plan.matrices)
    kept = sum(m.rank for plan in cut for m in plan.matrices)
    if not full or kept / full >= EDGE_NOTE_BELOW:
        return
    ctx.progress.note(f"svd-mp: the MP edge on the raw weights (no calibration data) keeps {kept / full:.1%} of the "
                      f"singular directions of the {len(cut)} layers it cuts. On a pretrained model that is most of "
                      f"what it learnt (a real ViT-Ti: 82.8% -> 0.1% top-1 zero-shot): there give it calibration "
                      f"data (whiten) and a budget (target_params), then reconstruct or finetune")


def _ranks_need_data(params: SvdMpParams) -> bool:
    """Whether the ranks depend on the whitened spectra of every layer at once (a global params
    budget, a speed target), so the dense model's inputs are measured first; the MP edge and a
    uniform share need no data to set ranks."""
    global_params = params.target_params is not None and params.allocation in ("global", "sensitivity")
    return global_params or params.target_speedup is not None or params.target_latency_ms is not None


def _dense_roots(ctx: PruneContext) -> dict[str, torch.Tensor]:
    """S (S·Sᵀ = E[x·xᵀ], in :func:`weight_matrix`'s column order) of every selected plain layer's
    inputs, from one pass of the calibration data through the model as it came."""
    from rmtp.fidelity.layerwise import collect_input_stats

    modules = {layer.name: ctx.module(layer) for layer in ctx.layers}
    modules = {name: m for name, m in modules.items()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}
    with ctx.progress.task("svd-mp: calibration inputs (one pass)", total=None):
        stats = collect_input_stats(ctx.model, modules, ctx.calibration, ctx.device, squares=False, gram=True,
                                    precision=ctx.precision)
    return {name: input_root(weight_order_gram(modules[name], s.gram), s.count)
            for name, s in stats.items() if s.count and s.gram is not None}


def _plan(ctx: PruneContext, params: SvdMpParams, roots: dict[str, torch.Tensor]) -> list[LayerPlan]:
    plans = []
    with ctx.progress.task("svd-mp: SVD + MP fit", total=len(ctx.layers)) as advance:
        for layer in ctx.layers:
            plans.append(_plan_layer(ctx, layer.name, ctx.module(layer), params, roots.get(layer.name)))
            advance()
    return plans


def _plan_layer(ctx: PruneContext, name: str, module: nn.Module, params: SvdMpParams,
                root: torch.Tensor | None = None) -> LayerPlan:
    """The layer's matrices with their SVDs, MP fits and ranks at the edge. ``root``: S of the
    layer's inputs; then ``u, s, vh`` are the whitened decomposition while the MP fit, and so the
    edge's rank, stay on the raw weights (the edge certifies weight noise, ``docs/spectral.md``)."""
    plan = LayerPlan(name=name, module=module)
    if isinstance(module, LOW_RANK_TYPES):
        return _plan_split_layer(plan, params)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        plan.skipped = f"not a Linear/Conv2d ({type(module).__name__})"
        return plan
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        plan.skipped = f"grouped conv (groups={module.groups}) is not one matrix"
        return plan
    matrix = weight_matrix(module.weight.detach()).to("cpu", torch.float64)
    blocks = ctx.arch.qkv_split(name, module) if params.split_qkv and isinstance(module, nn.Linear) else None
    for label, rows in (blocks or {"": slice(0, matrix.shape[0])}).items():
        part = matrix[rows]
        if min(part.shape) < params.min_dim:
            plan.skipped = f"min(M,N)={min(part.shape)} < min_dim={params.min_dim}: too few singular values"
            plan.matrices = []
            return plan
        if root is None:
            u, s, vh = torch.linalg.svd(part, full_matrices=False)
            raw = s
        else:
            u, s, vh = whitened_svd(part, root)
            raw = torch.linalg.svdvals(part)
        fit = fit_mp(raw, tuple(part.shape), alpha=params.alpha, tw_confidence=params.tw_confidence)
        m = Matrix(label=label, rows=rows, u=u, s=s, vh=vh, fit=fit, s_plus=fit.s_plus, whitened=root is not None,
                    score=None if root is None else whitened_scores(s))
        m.rank = _clamp(int((raw > params.margin * fit.s_plus).sum()), m, params)
        plan.matrices.append(m)
    if root is not None:
        plan.whitening = "whitened"
    return plan


def _rewhiten(plan: LayerPlan, root: torch.Tensor) -> None:
    """Re-decompose the plan's matrices on inputs with root ``root`` (the model compressed so far),
    keeping the ranks already chosen."""
    matrix = weight_matrix(plan.module.weight.detach()).to("cpu", torch.float64)
    for m in plan.matrices:
        m.u, m.s, m.vh = whitened_svd(matrix[m.rows], root)
        m.whitened = True


def _apply_sequentially(ctx: PruneContext, plans: list[LayerPlan], params: SvdMpParams) -> list[LayerRow]:
    """Apply the plans layer by layer in forward order, each plain layer first re-whitened by its
    inputs in the model as compressed so far (:func:`rmtp.fidelity.layerwise.compress_sequentially`), so a
    layer's factors are the output-error optimum on the inputs it will really get: the errors of
    the layers before it are part of its data, not added on top. Ranks stay those already planned.
    A layer the calibration data never reaches keeps its planned decomposition.

    What it fits is the dense layer's map on those inputs (W·X̃), not the dense model's outputs
    (W·X): :class:`rmtp.fidelity.layerwise.LayerInputs` carries no cross Gram X̃ᵀX, so it cannot undo the
    earlier layers' errors, only stop fitting inputs the layer no longer gets. On the real ViT-Ti
    it scored no better than one pass (docs/spectral.md), hence not the default."""
    from rmtp.fidelity.layerwise import compress_sequentially

    by_name = {plan.name: plan for plan in plans}
    rows: dict[str, LayerRow] = {}

    def compress(name: str, module: nn.Module, inputs) -> None:
        plan = by_name[name]
        if inputs.count and inputs.gram is not None:
            _rewhiten(plan, input_root(weight_order_gram(module, inputs.gram), inputs.count))
            plan.whitening = "whitened, layer by layer"
        rows[name] = _apply(ctx, plan, params)

    fitted = [plan.name for plan in plans if _changes_weights(plan, params)]
    compress_sequentially(ctx.model, fitted, ctx.calibration, ctx.device, compress=compress, progress=ctx.progress,
                          precision=ctx.precision, description="svd-mp: whitened, layer by layer")
    for plan in plans:
        if plan.name not in rows:
            rows[plan.name] = _apply(ctx, plan, params)
    return [rows[plan.name] for plan in plans]


def _plan_split_layer(plan: LayerPlan, params: SvdMpParams) -> LayerPlan:
    """A layer an earlier round split: truncate its factor product against the recorded dense edge."""
    edges = plan.module.mp_edges
    if edges is None:
        plan.skipped = (f"already split ({type(plan.module).__name__}) with no recorded MP edge: "
                        f"not made by svd-mp, nothing to measure its rank against")
        return plan
    parts = factor_svds(plan.module)
    for index, ((rows, u, s, vh), edge) in enumerate(zip(parts, edges)):
        m = Matrix(label=f"[{index}]" if len(parts) > 1 else "", rows=rows, u=u, s=s, vh=vh, fit=None,
                    s_plus=edge)
        m.rank = _clamp(int((s > params.margin * edge).sum()), m, params)
        plan.matrices.append(m)
    return plan


def _changes_weights(plan: LayerPlan, params: SvdMpParams) -> bool:
    """Whether :func:`_apply` will write new weights for this plain layer (a split, or a rank-k
    reconstruction), i.e. whether fitting it to calibration inputs matters."""
    if plan.skipped or plan.already_split or plan.dense_reason is not None:
        return False
    return plan.split_cost() < plan.dense_cost() or _reconstructs(plan, params)


def _reconstructs(plan: LayerPlan, params: SvdMpParams) -> bool:
    """Whether a layer whose split would not pay gets its rank-k reconstruction written back:
    ``when_split_does_not_pay``, by default yes on raw weights (the seeds' denoising at the edge)
    and no when whitened. Why: measured on the real ViT-Ti at ``target_params: 0.9``, writing the
    whitened rank-k matrix into the layers that stay dense scored 47.9% top-1, keeping them 55.7%
    (docs/spectral.md); such a layer saves nothing, so its truncation is pure output error."""
    if params.when_split_does_not_pay is not None:
        return params.when_split_does_not_pay == "reconstruct"
    return not plan.fits_data


def _apply(ctx: PruneContext, plan: LayerPlan, params: SvdMpParams) -> LayerRow:
    shape, params_before, nonzeros_before = weight_footprint(plan.module)
    if plan.skipped:
        return LayerRow(plan.name, shape, shape, params_before, params_before, nonzeros_before, nonzeros_before,
                        skipped=plan.skipped, note=f"skipped: {plan.skipped}")
    rows, cols = plan.rows_cols
    macs_before = plan.current_cost()
    pays = plan.split_cost() < plan.dense_cost() and plan.dense_reason is None
    if plan.already_split:
        if [m.rank for m in plan.matrices] == list(getattr(plan.module, "ranks", [plan.module.rank])):
            new, mode = plan.module, "split, rank unchanged"
        else:
            new = refactorize(plan.module, [(m.u, m.s, m.vh, m.rank) for m in plan.matrices])
            ctx.model.set_submodule(plan.name, new)
            mode = "split, rank cut"
        pays = True
    elif pays:
        new = factorized(plan)
        ctx.model.set_submodule(plan.name, new)
        mode = "split"
    elif plan.dense_reason is not None:
        new, mode = plan.module, f"dense, unchanged ({plan.dense_reason})"
    elif _reconstructs(plan, params):
        write_reconstruction(plan.module.weight, plan.matrices)
        new, mode = plan.module, "dense, rank-k reconstruction"
    else:
        new, mode = plan.module, "dense, unchanged (split would not pay)"
    if params.coefficient_pruning > 0:
        _prune_coefficients(new, params.coefficient_pruning)
    shape_after, params_after, nonzeros_after = weight_footprint(new)
    ranks = [m.rank for m in plan.matrices]
    rank_text = "/".join(map(str, ranks)) if len(ranks) > 1 else str(ranks[0])
    edges = [m.s_plus for m in plan.matrices]
    heavy = [m.label or "W" for m in plan.matrices if m.fit is not None and not m.fit.bulk_is_mp]
    macs_after = plan.split_cost() if pays else rows * cols
    whitened = [m for m in plan.matrices if m.whitened]
    error = max((output_error(m.s, m.rank) for m in whitened), default=None)
    return LayerRow(
        plan.name, shape, shape_after, params_before, params_after, nonzeros_before, nonzeros_after,
        budget=params_after / params_before, kept_rank=sum(ranks),
        note=mode + (f"; bulk not MP-like in {', '.join(heavy)}" if heavy else "")
        + (f"; {plan.whitening}" if plan.whitening else ""),
        detail={"mode": mode.split(",")[0], "rank": f"{rank_text} of {min(rows, cols)}",
                **({"output error": f"{error:.1%}"} if error is not None and "unchanged" not in mode else {}),
                "edge s₊": edges[0] if len(edges) == 1 else "/".join(f"{e:.3g}" for e in edges),
                "MACs/pos": f"{macs_before} → {macs_after}",
                **({"split speed": f"×{plan.layer_speedup:.2f}"} if plan.layer_speedup is not None else {}),
                **({"KL alone": float(f"{plan.sensitivity:.3g}")} if plan.sensitivity is not None else {})},
    )




def _clamp(rank: int, matrix: Matrix, params: SvdMpParams) -> int:
    """``rank`` within [min_rank, max_rank_fraction·min(M,N)], and never above the directions the
    matrix has (a split layer's k: later rounds only cut, ``min_rank`` never grows it back)."""
    full = min(matrix.shape)
    ceiling = max(params.min_rank, math.floor(params.max_rank_fraction * full))
    return min(max(params.min_rank, min(rank, ceiling, full)), matrix.s.numel())


def _allocate_uniformly(plans: list[LayerPlan], params: SvdMpParams) -> None:
    """Every matrix keeps ``target_params`` of its own weights: k = ⌊t·M·N/(M+N)⌋ (a fused qkv's
    blocks each at that share, so the layer holds t·M·N), within the usual clamps. SVD-LLM's
    allocation; a baseline against which the global one is judged."""
    for plan in plans:
        if plan.skipped:
            continue
        for m in plan.matrices:
            rows, cols = m.shape
            m.rank = _clamp(math.floor(params.target_params * rows * cols / (rows + cols)), m, params)


def _allocate_globally(plans: list[LayerPlan], params: SvdMpParams) -> None:
    """Set ranks so the selected layers keep ``target_params`` of their weights, best score first
    (s/s₊; whitened, :func:`.whitening.whitened_scores`).

    Lowering the score threshold τ only ever adds directions, so the cost is monotone in τ and
    the loosest τ that fits the budget is found by bisection over the observed scores.
    """
    active = [p for p in plans if not p.skipped]
    budget = (params.target_params * sum(p.dense_cost() for p in plans)
              - sum(p.current_cost() for p in plans if p.skipped))
    scores = {id(m): m.scores() for p in active for m in p.matrices}

    def set_threshold(tau: float) -> int:
        for plan in active:
            for m in plan.matrices:
                m.rank = _clamp(int((scores[id(m)] > tau).sum()), m, params)
        return sum(p.cost() for p in active)

    candidates = torch.cat([s for s in scores.values()]).unique().sort().values.tolist() if scores else []
    lo, hi = 0, len(candidates)  # answer index in [lo, hi]; hi means "above every score" (min ranks)
    while lo < hi:
        mid = (lo + hi) // 2
        if set_threshold(candidates[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    set_threshold(candidates[lo] if lo < len(candidates) else math.inf)


def _prune_coefficients(module: nn.Module, fraction: float) -> None:
    """Zero the ``fraction`` smallest-magnitude entries over the module's Linear/Conv weights."""
    weights = [m.weight for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    n_zero = round(fraction * scores.numel())
    if n_zero == 0:
        return
    drop = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    drop[torch.sort(scores, stable=True).indices[:n_zero]] = True
    offset = 0
    with torch.no_grad():
        for w in weights:
            w.masked_fill_(drop[offset:offset + w.numel()].view_as(w), 0.0)
            offset += w.numel()
