"""What the three token pruners share: schedule params, the patch step and the per-block rows."""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from rmtp.accuracy_budget import StrengthKnob
from rmtp.errors import PluginError
from rmtp.param_types import one_speed_target, target_latency_ms_field, target_speedup_field
from rmtp.pruner import LayerRow, PruneContext, Pruner, PrunerParams, weight_footprint
from rmtp_plugins.tokens.plan import Method, TokenPlan
from rmtp_plugins.tokens.schedule import keep_ratios, token_counts

if TYPE_CHECKING:  # the patch and the MAC counts are imported where a pruner runs: the
    import torch  # declarations load no torch (`rmtp list`, `rmtp validate`)
    from torch import nn

KeepRatio = Annotated[float, Field(gt=0.0, le=1.0)]


class TokenParams(PrunerParams):
    """What every token pruner accepts."""

    visualize: int = Field(0, ge=0, le=64, description="write token_map-<pruner>.png to the output folder: "
                                                       "which patches were kept or merged, for this many val images")
    target_speedup: float | None = target_speedup_field("the schedule's strength (r_max, or tome's r)")
    target_latency_ms: float | None = target_latency_ms_field()

    #: The schedule key a speed target chooses, and the explicit per-block key that excludes one.
    strength_key: ClassVar[str] = ""
    explicit_key: ClassVar[str] = ""

    @model_validator(mode="after")
    def _one_speed_budget(self) -> TokenParams:
        speed = one_speed_target(self)
        if speed and self.strength_key and {self.strength_key, self.explicit_key} & self.model_fields_set:
            raise ValueError(f"{speed[0]} chooses {self.strength_key}; drop "
                             f"{' / '.join(sorted({self.strength_key, self.explicit_key} & self.model_fields_set))}")
        return self

    def speed_target_set(self) -> bool:
        return self.target_speedup is not None or self.target_latency_ms is not None


class PruneScheduleParams(TokenParams):
    """Params of the attention-scored pruners: the seed's schedule, or an explicit per-block list."""

    strength_key: ClassVar[str] = "r_max"
    explicit_key: ClassVar[str] = "keep"

    r_max: float = Field(0.6, ge=0.0, lt=1.0,
                         description="largest share pruned: keep(l) = 1 − r_max·((l+1)/L)^α (below 1: the last "
                                     "block keeps a share; min_tokens is the floor)")
    alpha: float = Field(2.0, gt=0.0, le=100.0, description="sharpness of the schedule (larger: pruning later)")
    start_layer: int = Field(0, ge=0, description="blocks before this one (0-based) keep every token")
    keep: list[KeepRatio] | None = Field(None, description="explicit keep ratio per block, replacing "
                                                           "r_max/alpha/start_layer")
    relative_to: Literal["current", "original"] = Field(
        "current", description="ratios apply to the tokens entering each block (compounding, as the seed) "
                               "or to the tokens entering the first block")
    fuse: bool = Field(False, description="fuse the pruned tokens into one token weighted by their scores (EViT)")
    min_tokens: int = Field(1, ge=1, le=1_000_000, description="never keep fewer patch tokens than this")

    @model_validator(mode="after")
    def _list_or_curve(self) -> PruneScheduleParams:
        if self.keep is not None and self.model_fields_set & {"r_max", "alpha", "start_layer"}:
            raise ValueError("give either keep (one ratio per block) or r_max/alpha/start_layer, not both")
        return self

    def keep_list(self, depth: int) -> list[float]:
        if self.keep is None:
            return keep_ratios(depth, self.r_max, self.alpha, self.start_layer)
        if len(self.keep) != depth:
            raise PluginError(f"keep lists {len(self.keep)} ratios but the model has {depth} blocks")
        return list(self.keep)


class TokenPruner(Pruner):
    """Base of ``token-cls``, ``token-mean`` and ``tome``: build a :class:`TokenPlan`, patch, report."""

    kind = "token"
    method: ClassVar[Method]

    @abstractmethod
    def plan(self, params: PrunerParams, depth: int) -> TokenPlan:
        """The patch config for a model of ``depth`` blocks."""

    def prune(self, ctx: PruneContext, params: PrunerParams) -> list[LayerRow]:
        from torch import nn

        from rmtp.data import model_input_size
        from rmtp.modules import apply_patch
        from rmtp_plugins.tokens.patch import TokenReduction

        model = ctx.model
        _refuse_layer_filter(ctx)
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise PluginError(f"{self.name} patches timm VisionTransformer models (their blocks); "
                              f"{type(model).__qualname__} has no `blocks` sequence")
        if params.speed_target_set():
            chosen = self._reach_speed(ctx, blocks, params)
            if chosen is None:  # every schedule timed whole was slower than the model as it came: leave it
                return []
            params = chosen
        plan = self.plan(params, len(blocks))
        patch = TokenReduction(**plan.model_dump())
        input_shape = model_input_size(model)
        macs_before = block_macs(model, input_shape, ctx.device)
        apply_patch(model, patch)
        macs_after = block_macs(model, input_shape, ctx.device)
        npt = model.num_prefix_tokens
        counts = token_counts(model.patch_embed.num_patches, keep=plan.keep, r=plan.r,
                              relative_to=plan.relative_to, min_tokens=plan.min_tokens)
        rows = []
        for index, (block, (n_in, n_out)) in enumerate(zip(blocks, counts)):
            shape, n_params, nonzeros = weight_footprint(block)
            detail = {"tokens_in": npt + n_in, "tokens_out": npt + n_out}
            if plan.r is not None:
                detail["r"] = n_in - n_out
            detail["macs_before"] = macs_before[index]
            detail["macs_after"] = macs_after[index]
            rows.append(LayerRow(layer=f"blocks.{index}", shape_before=shape, shape_after=shape,
                                 params_before=n_params, params_after=n_params, nonzeros_before=nonzeros,
                                 nonzeros_after=nonzeros,
                                 budget=plan.keep[index] if plan.keep is not None else None,
                                 kept_fraction=(npt + n_out) / (npt + n_in), detail=detail))
        if params.visualize and rows:
            rows[0].note = self._visualize(ctx, params.visualize)
        return rows

    @classmethod
    def strength_knob(cls, params: PrunerParams, model: nn.Module | None = None) -> StrengthKnob | None:
        """An accuracy budget searches the schedule's strength (``r_max``; tome's ``r``), the shape
        (``alpha``, ``start_layer``, ``ramp``) as given, or the speed target when one is given; an
        explicit per-block list (``keep``, ``r_list``) has no strength to search."""
        knob = super().strength_knob(params, model)
        if knob is not None:
            return knob
        if getattr(params, params.explicit_key, None) is not None:
            raise ValueError(f"{params.explicit_key} sets every block by hand, so there is no strength to search; "
                             f"give {params.strength_key} instead (the strongest the budget may try)")
        return cls.schedule_knob(model)

    @classmethod
    def schedule_knob(cls, model: nn.Module | None) -> StrengthKnob:
        """The schedule's strength from none (weak) to its strong end (``r_max`` 0.9)."""
        return StrengthKnob("r_max", weak=0.0, strong=0.9, resolution=0.01)

    def speed_strengths(self, ctx: PruneContext) -> list[object]:
        """The values of the schedule's strength a speed target searches, gentlest first."""
        return [i / 200 for i in range(200)]  # r_max in steps of 0.005, below 1 (keep(L−1) = 1 − r_max > 0)

    def _reach_speed(self, ctx: PruneContext, blocks: nn.Sequential, params: TokenParams) -> TokenParams | None:
        from rmtp_plugins.tokens.speed import reach

        key = params.strength_key
        chosen, _ = reach(ctx, blocks, params, self.speed_strengths(ctx),
                          lambda value: params.model_copy(update={key: value}),
                          lambda candidate: self.plan(candidate, len(blocks)), key)
        return chosen

    def _visualize(self, ctx: PruneContext, images: int) -> str:
        """Write the token map of the first ``images`` val images; returns the note for the report."""
        if ctx.output is None or ctx.preview_images is None:
            return "visualize: the run has no output folder, so no token map was written"
        from rmtp_plugins.tokens.visualize import save_token_map

        batch = ctx.preview_images(images)
        path = ctx.output.write_file(ctx.output.free_name(f"token_map-{self.name}.png"),
                                     lambda staged: save_token_map(ctx.model, batch, staged))
        return f"token map of {batch.shape[0]} val images: {path.name}"


def _refuse_layer_filter(ctx: PruneContext) -> None:
    """Token pruners act on whole blocks: a step's ``layers:`` filter would be silently meaningless."""
    default = [layer.name for layer in ctx.arch.prunable_layers(ctx.model) if not layer.optional]
    if [layer.name for layer in ctx.layers] != default:
        raise PluginError("token pruners act on whole blocks, so a step's `layers:` filter does not apply; "
                          "choose the blocks with start_layer / keep (token-cls, token-mean) or r_list (tome)")


def block_macs(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> list[int]:
    """MACs of each ``blocks.{i}`` for one image of ``input_shape``, attention included (as
    :mod:`rmtp.measure` counts them: FlopCounterMode, CPU fused attention added)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rmtp.measure import FLOP_FORMULAS

    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    x = torch.randn(1, *input_shape, device=device, dtype=next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), counter:
            model(x)
    finally:
        model.train(was_training)
    macs = [0] * len(model.blocks)
    for key, ops in counter.get_flop_counts().items():
        found = re.search(r"(?:^|\.)blocks\.(\d+)$", key)
        if found and int(found.group(1)) < len(macs):
            macs[int(found.group(1))] = sum(int(v) for v in ops.values()) // 2
    return macs
