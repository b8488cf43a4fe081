"""``spp``: Solution Path Pruning — one search, a whole family of structured sparsity levels.

(Ding et al., "Adaptive Pruning of Pretrained Transformer via Differential Inclusions", ICLR 2025.)

1. **Gates** (:mod:`.groups`): one gate per structured group of the selected blocks,
   multiplying the group's channels where the next layer reads them; the weights stay frozen. The
   groups are the architecture's couplings (:meth:`rmtp.contract.architecture.Architecture.couplings`):
   timm ViT: attention heads and MLP hidden neurons; timm ConvNeXt: MLP hidden channels; timm
   ResNet: the output channels of ``conv1`` (basic blocks) and of ``conv1`` and ``conv2``
   (bottlenecks).
2. **Search** (:mod:`.path`): split LBI on the gates, driven by the task loss (cross-entropy on
   the calibration images, or KD from the dense model). Groups enter the sparse path variable Γ
   one by one; each group's entry step is its rank.
3. **Extraction**: for every requested ``ratio`` the latest-entering groups are sliced out for
   real (smaller qkv/proj/fc1/fc2, fewer heads, smaller convs and BatchNorms), so params and MACs
   drop. ``target: params`` measures the ratio in parameters of the gated branches, ``groups`` in
   number of groups. Several ratios in one step are each saved as ``<output>/spp-<ratio>/``
   (through ``ctx.output``); the step continues with ``keep`` (default: the first ratio).

``search: obs`` replaces steps 1-2 with no training (:mod:`.oneshot`): each unit, in forward order,
cut by structured OBS on its consumer's calibration inputs and the consumer refitted by least
squares (:mod:`.obs`); no path file is written.

Refused before the search, naming the branch: ViT variants whose attention or MLP mixes the groups
(gated attention, scale_norm, SwiGLU, hidden-layer norms), ConvNeXt-V2 (its GRN normalises the
hidden channels by their mean, so they cannot be sliced exactly), ResNeXt's grouped ``conv2``,
non-BatchNorm ResNets and BlurPool anti-aliasing (docs/spp.md has the list and the reasons).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rmtp.contract.architecture import Architecture, Coupling
from rmtp.contract.pruner import LayerRow, PruneContext, PruneResult, weight_footprint
from rmtp.errors import RmtpError
from rmtp.training import kd_loss
from rmtp_plugins.spp.groups import Unit, extract, find_units, gated, group_params, shared_params
from rmtp_plugins.spp.obs import StructuredFit
from rmtp_plugins.spp.params import SppParams
from rmtp_plugins.spp.path import (
    Shared,
    SolutionPath,
    removal_count,
    removal_mask,
    removed_params,
    split_lbi,
)
from rmtp_plugins.spp.unit import weight_shape

__all__ = ["PATH_FILE", "extract", "path_report", "prune", "search", "unit_footprint", "variant_name"]

PATH_FILE = "spp_path.json"


def variant_name(ratio: float) -> str:
    return f"spp-{ratio:.2f}" if round(ratio, 2) == ratio else f"spp-{ratio:g}"


def _batches(loader: DataLoader, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded shuffled passes over the calibration images, ``batch_size`` at a time."""
    generator = torch.Generator().manual_seed(seed)
    ordered = DataLoader(loader.dataset, batch_size=batch_size, shuffle=True, generator=generator,
                         num_workers=loader.num_workers)
    for _ in itertools.count():
        yield from ordered


def search(ctx: PruneContext, units: list[Unit], params: SppParams) -> SolutionPath:
    """The split-LBI path of ``units``' gates on ``ctx.model`` (weights frozen, eval mode)."""
    if ctx.calibration is None:
        raise RmtpError("spp needs calibration data for its search, and none was given")
    if params.loss == "kd" and ctx.dense_model is None:
        raise RmtpError("spp: loss: kd needs the dense model, and there is none")
    model = ctx.model
    batches = _batches(ctx.calibration, params.batch_size, ctx.seed)
    n_gates = sum(u.count for u in units)
    gate_device = next(model.parameters()).device
    holder = {"gates": torch.ones(n_gates, device=gate_device)}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss(gates: torch.Tensor) -> torch.Tensor:
        images, labels = next(batches)
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        holder["gates"] = gates
        with ctx.autocast():  # the step's precision; the loss in fp32
            logits = model(images).float()
        if params.loss == "ce":
            if bool((labels < 0).any()):  # rmtp.data.UNLABELED: cross-entropy would index with -1
                raise RmtpError("spp: loss: ce is cross-entropy on labels, and the calibration images are "
                                "unlabeled; use loss: kd (distil from the dense model) or search: obs")
            return torch.nn.functional.cross_entropy(logits, labels)
        with torch.no_grad(), ctx.autocast():
            teacher = ctx.dense_model(images).float()
        return kd_loss(logits, teacher, 1.0)

    was_training = model.training
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        with ctx.progress.task(f"spp: solution path ({n_gates} groups)", total=params.steps) as advance, \
                gated(model, units, _GateView(holder)):
            return split_lbi(loss, torch.ones(n_gates, device=gate_device), params.settings(),
                             on_step=lambda step, value, entered: advance(loss=f"{value:.3f}", entered=entered))
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


#: The params :func:`search` never reads (they act on the slicing of the path, not on the path).
_SLICING_PARAMS = frozenset({"ratio", "ratios", "keep", "target", "target_speedup", "target_latency_ms", "fold_gates"})


def _step_search(ctx: PruneContext, units: list[Unit], params: SppParams) -> SolutionPath:
    """:func:`search`, once per step: an accuracy budget's candidates (and the step's final prune,
    on the same model and calibration images, seeded alike) differ only in the level they slice,
    so the path the first one searched is the path every other would search again."""
    return ctx.step_cached("spp.path", (unit.path for unit in units), params, varies=_SLICING_PARAMS,
                           compute=lambda: search(ctx, units, params))


class _GateView:
    """Indexable view of the gates the current step evaluates (the hooks read it at forward time)."""

    def __init__(self, holder: dict[str, torch.Tensor]):
        self.holder = holder

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.holder["gates"][index]


def coupling_problem(arch: Architecture, couplings: list[Coupling], structures: tuple[str, ...]) -> str | None:
    """Why spp has nothing to gate among ``arch``'s ``couplings`` for ``structures`` (``None`` if it has)."""
    offered = sorted({c.kind for c in couplings}, key=("heads", "neurons", "channels").index)
    if not offered:
        return (f"spp: the {arch.name} architecture declares no couplings (attention heads, MLP neurons or conv "
                f"channels shared by two layers), so spp has nothing to gate; vit, convnext and resnet declare "
                f"them (Architecture.couplings)")
    if not set(structures) & set(offered):
        return (f"spp: structures {list(structures)} select nothing in a {arch.name} model, which has "
                f"{', '.join(offered)}")
    return None


def prune(ctx: PruneContext, params: SppParams) -> PruneResult:
    couplings = ctx.arch.couplings(ctx.model)
    problem = coupling_problem(ctx.arch, couplings, params.structures)
    if problem:
        raise RmtpError(problem)
    # structures left at the default: what this family cannot lose (Swin's heads) is left out, saying why
    left_out: list[tuple[Coupling, str]] | None = None if "structures" in params.model_fields_set else []
    units = find_units(ctx.model, couplings, ctx.layers, params.structures, arch=ctx.arch, left_out=left_out)
    if not units:
        return PruneResult()
    sizes = group_params(units)
    shared = shared_params(ctx.model, units)
    if params.search == "obs":
        from rmtp_plugins.spp.oneshot import uniform_order

        path, order = None, uniform_order(units)
    else:
        path = _step_search(ctx, units, params)
        order = path.order()
    speed_plan = None
    if params.speed_target_set():
        from rmtp_plugins.spp.speed import choose_ratio

        ratio, speed_plan = choose_ratio(ctx, units, order, sizes, shared, params)
        if ratio is None:  # slicing made the model slower at every level timed: leave it (the notes say)
            return PruneResult([], speed_plan)
        params = params.model_copy(update={"ratio": ratio})
    folded = path.gamma if path is not None and params.fold_gates else None
    before = {u.path: unit_footprint(ctx.model, u) for u in units}
    levels = {r: removal_count(r, sizes, order, params.target, shared) for r in params.levels()}
    results: dict[float, dict[str, Any]] = {}
    kept_level = params.kept_level()
    for ratio in [r for r in params.levels() if r != kept_level] + [kept_level]:
        target = ctx.model if ratio == kept_level else copy.deepcopy(ctx.model)
        remove = removal_mask(order, levels[ratio])
        if path is None:
            from rmtp_plugins.spp.oneshot import cut_level

            fits = cut_level(ctx, target, units, order, sizes, shared, ratio, params)
            rows = [_obs_row(target, unit, before[unit.path], fits.get(unit.path), params) for unit in units]
        else:
            kept = extract(target, units, remove, folded)
            rows = [_row(target, unit, count, before[unit.path], path, params) for unit, count in kept]
        results[ratio] = _summary(ratio, remove, sizes, shared, rows)
        if ctx.output is not None:
            ctx.output.save_model(ctx.output.free_name(variant_name(ratio)), target, {
                "pruner": "spp", "ratio": ratio, "kept_by_later_steps": ratio == kept_level,
                "params": params.model_dump(mode="json"), **results[ratio],
                "rows": [row.to_dict() for row in rows]})
        if ratio == kept_level:
            final_rows = rows
    if ctx.output is not None and path is not None:
        ctx.output.write_json(ctx.output.free_name(PATH_FILE),
                              path_report(units, path, order, sizes, params, results))
    return PruneResult(final_rows + [_left_out_row(ctx.model, c, problem) for c, problem in left_out or []],
                       speed_plan)


def _summary(ratio: float, remove: torch.Tensor, sizes: torch.Tensor, shared: tuple[Shared, ...],
             rows: list[LayerRow]) -> dict[str, Any]:
    before = sum(r.params_before for r in rows)
    after = sum(r.params_after for r in rows)
    return {"groups_removed": int(remove.sum()), "groups": int(remove.numel()),
            "group_share_removed": float(remove.float().mean()) if remove.numel() else 0.0,
            "params_removed": before - after, "params_of_gated_branches": before,
            "param_share_removed": (before - after) / before if before else 0.0,
            "group_params_removed": int(removed_params(remove, sizes, shared))}


def _row(model: nn.Module, unit: Unit, kept: int, before: tuple, path: SolutionPath,
         params: SppParams) -> LayerRow:
    shape_before, params_before, nonzeros_before = before
    shape_after, params_after, nonzeros_after = unit_footprint(model, unit)
    entries = path.entry[unit.gates]
    entered = int(torch.isfinite(entries).sum())
    noun = unit.noun
    gone = " (branch removed)" if unit.kind != "channel" else " (inner path removed: the branch is constant)"
    note = f"{noun} {unit.count} → {kept}" + (gone if kept == 0 else "")
    first_entry = float(entries.min()) if entered else math.inf
    return LayerRow(
        unit.path, tuple(shape_before), tuple(shape_after), params_before, params_after,
        nonzeros_before, nonzeros_after, budget=params_after / params_before if params_before else None,
        kept_fraction=kept / unit.count, note=note,
        detail={noun: f"{unit.count} → {kept}", "entered": f"{entered}/{unit.count}",
                "first entry": "never" if math.isinf(first_entry) else int(first_entry),
                "target": f"{params.target} {params.kept_level():g}"})


def _obs_row(model: nn.Module, unit: Unit, before: tuple, fit: StructuredFit | None, params: SppParams) -> LayerRow:
    """A unit's row after search: obs: groups kept and the consumer's output error after the refit,
    as a share of its dense outputs on the calibration inputs."""
    shape_before, params_before, nonzeros_before = before
    shape_after, params_after, nonzeros_after = unit_footprint(model, unit)
    kept = unit.count - (int(fit.removed.sum()) if fit is not None else 0)
    noun = unit.noun
    gone = " (branch removed)" if unit.kind != "channel" else " (inner path removed: the branch is constant)"
    error = f"{fit.relative_error:.2%}" if fit is not None else "0 (uncut)"
    return LayerRow(
        unit.path, tuple(shape_before), tuple(shape_after), params_before, params_after,
        nonzeros_before, nonzeros_after, budget=params_after / params_before if params_before else None,
        kept_fraction=kept / unit.count, note=f"{noun} {unit.count} → {kept}" + (gone if kept == 0 else ""),
        detail={noun: f"{unit.count} → {kept}", "output error": error,
                "target": f"{params.target} {params.kept_level():g}"})


def _left_out_row(model: nn.Module, coupling: Coupling, problem: str) -> LayerRow:
    """The row of a coupling the default ``structures`` left out: its two layers, unchanged, and why."""
    shape, params, nonzeros = modules_footprint(model, (coupling.producer, coupling.consumer), coupling.producer)
    reason = f"it is {problem}" if problem.startswith("a ") else problem
    return LayerRow(coupling.name, shape, shape, params, params, nonzeros, nonzeros,
                    skipped=f"{coupling.kind} not cut: {reason}")


def unit_footprint(model: nn.Module, unit: Unit) -> tuple[tuple[int, ...], int, int]:
    """(producer weight shape, params, nonzeros) of the modules a unit's report row covers."""
    return modules_footprint(model, unit.report_modules(), unit.producer)


def modules_footprint(model: nn.Module, names: tuple[str, ...], producer: str) -> tuple[tuple[int, ...], int, int]:
    """(``producer``'s weight shape, params, nonzeros) of the modules ``names``, summed."""
    params = nonzeros = 0
    for name in names:
        _, n, nz = weight_footprint(model.get_submodule(name))
        params, nonzeros = params + n, nonzeros + nz
    return weight_shape(model, producer), params, nonzeros


def path_report(units: list[Unit], path: SolutionPath, order: list[int], sizes: torch.Tensor, params: SppParams,
                results: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """The solution path as JSON: every group's entry step, Z, γ and rank, and what each ratio removed."""
    rank = {j: i for i, j in enumerate(order)}
    groups = []
    for unit in units:
        for i in range(unit.count):
            j = unit.offset + i
            entry = float(path.entry[j])
            groups.append({"unit": unit.path, "kind": unit.kind, "index": i, "rank": rank[j],
                           "entry_step": None if math.isinf(entry) else int(entry),
                           "z": float(path.z[j]), "gamma": float(path.gamma[j]), "params": int(sizes[j])})
    return {"pruner": "spp", "params": params.model_dump(mode="json"), "steps": params.steps,
            "entered": path.entered, "groups": groups, "losses": path.losses,
            "levels": {f"{r:g}": results[r] for r in sorted(results)}}

