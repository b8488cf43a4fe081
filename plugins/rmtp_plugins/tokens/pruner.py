"""How the token pruners prune (:class:`rmtp_plugins.tokens.TokenPruner` runs :func:`prune`): the
schedule (chosen for a speed target by :mod:`.speed`, else from the params), the patch
(:mod:`.patch`) applied to the model, and one report row per block with its tokens in and out and
its MACs before and after."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rmtp.contract.architecture import Architecture, TokenBlocks
from rmtp.contract.pruner import LayerRow, PruneContext, PruneResult, weight_footprint
from rmtp.errors import PluginError
from rmtp_plugins.tokens.params import TokenParams
from rmtp_plugins.tokens.plan import TokenPlan
from rmtp_plugins.tokens.schedule import token_counts

#: ``plan(params, depth)``: the patch config of a pruner's params for a model of ``depth`` blocks.
Planner = Callable[[TokenParams, int], TokenPlan]


def prune(ctx: PruneContext, params: TokenParams, *, name: str, plan: Planner,
          strengths: Callable[[PruneContext], list[object]]) -> PruneResult:
    """Patch ``ctx.model`` with the token pruner ``name``'s ``plan`` of ``params`` (for a speed
    target, of the gentlest of ``strengths(ctx)`` that reaches it); one row per block."""
    from rmtp.contract.saved_types import apply_patch
    from rmtp.data import model_input_size
    from rmtp_plugins.tokens.patch import ALREADY_REDUCED, TokenReduction, token_reduction

    model = ctx.model
    _refuse_layer_filter(ctx)
    if token_reduction(model) is not None:
        raise PluginError(f"{name} cannot reduce the tokens of this model: {ALREADY_REDUCED}")
    layout = token_layout(name, ctx.arch, model)
    blocks = model.blocks
    speed_plan = None
    if params.speed_target_set():
        chosen, speed_plan = _reach_speed(ctx, blocks, params, plan, strengths(ctx))
        if chosen is None:  # every schedule timed whole was slower than the model as it came: leave it
            return PruneResult([], speed_plan)
        params = chosen
    config = plan(params, len(blocks))
    patch = TokenReduction(ctx.arch, **config.model_dump())
    input_shape = model_input_size(model)
    macs_before = block_macs(model, input_shape, ctx.device)
    apply_patch(model, patch)
    macs_after = block_macs(model, input_shape, ctx.device)
    npt = layout.num_prefix_tokens
    counts = token_counts(layout.num_patches, keep=config.keep, r=config.r,
                          relative_to=config.relative_to, min_tokens=config.min_tokens)
    rows = []
    for index, (block, (n_in, n_out)) in enumerate(zip(blocks, counts)):
        shape, n_params, nonzeros = weight_footprint(block)
        detail = {"tokens_in": npt + n_in, "tokens_out": npt + n_out}
        if config.r is not None:
            detail["r"] = n_in - n_out
        detail["macs_before"] = macs_before[index]
        detail["macs_after"] = macs_after[index]
        rows.append(LayerRow(layer=f"blocks.{index}", shape_before=shape, shape_after=shape,
                             params_before=n_params, params_after=n_params, nonzeros_before=nonzeros,
                             nonzeros_after=nonzeros,
                             budget=config.keep[index] if config.keep is not None else None,
                             kept_fraction=(npt + n_out) / (npt + n_in), detail=detail))
    if params.visualize and rows:
        rows[0].note = _visualize(ctx, name, params.visualize)
    return PruneResult(rows, speed_plan)


def _reach_speed(ctx: PruneContext, blocks: nn.Sequential, params: TokenParams, plan: Planner,
                 strengths: list[object]) -> tuple[TokenParams | None, dict[str, Any]]:
    """The params of the gentlest schedule that reaches the speed target, and the prediction."""
    from rmtp_plugins.tokens.speed import reach

    key = params.strength_key
    return reach(ctx, blocks, params, strengths, lambda value: params.model_copy(update={key: value}),
                 lambda candidate: plan(candidate, len(blocks)), key)


def _visualize(ctx: PruneContext, name: str, images: int) -> str:
    """Write the token map of the first ``images`` val images; returns the note for the report."""
    if ctx.output is None or ctx.preview_images is None:
        return "visualize: the run has no output folder, so no token map was written"
    from rmtp_plugins.tokens.visualize import save_token_map

    batch = ctx.preview_images(images)
    path = ctx.output.write_file(ctx.output.free_name(f"token_map-{name}.png"),
                                 lambda staged: save_token_map(ctx.model, batch, staged))
    return f"token map of {batch.shape[0]} val images: {path.name}"


def token_layout(name: str, arch: Architecture, model: nn.Module) -> TokenBlocks:
    """``arch``'s :class:`TokenBlocks` of ``model``; its refusal as the token pruner ``name``'s, naming the family."""
    try:
        return arch.token_blocks(model)
    except PluginError as exc:
        raise PluginError(f"{name} cannot reduce the tokens of this {arch.name} model: {exc}") from None


def _refuse_layer_filter(ctx: PruneContext) -> None:
    """Token pruners act on whole blocks: a step's ``layers:`` filter would be silently meaningless."""
    default = [layer.name for layer in ctx.arch.prunable_layers(ctx.model) if not layer.optional]
    if [layer.name for layer in ctx.layers] != default:
        raise PluginError("token pruners act on whole blocks, so a step's `layers:` filter does not apply; "
                          "choose the blocks with start_layer / keep (token-cls, token-mean) or r_list (tome)")


def block_macs(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> list[int]:
    """MACs of each ``blocks.{i}`` for one image of ``input_shape``, attention included (as
    :mod:`rmtp.measure` counts them: FlopCounterMode, CPU fused attention added)."""
    from rmtp.measure.counts import counted_forward

    counter = counted_forward(model, torch.randn(1, *input_shape, device=device,
                                                 dtype=next(model.parameters()).dtype))
    macs = [0] * len(model.blocks)
    for key, ops in counter.get_flop_counts().items():
        found = re.search(r"(?:^|\.)blocks\.(\d+)$", key)
        if found and int(found.group(1)) < len(macs):
            macs[int(found.group(1))] = sum(int(v) for v in ops.values()) // 2
    return macs


__all__ = ["Planner", "block_macs", "prune"]
