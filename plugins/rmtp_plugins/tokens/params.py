"""The params of the three token pruners (:mod:`rmtp_plugins.tokens`): what every one accepts
(:class:`TokenParams`: ``visualize`` and the speed targets), the attention-scored pruners' schedule
(:class:`PruneScheduleParams`, ``token-cls`` and ``token-mean``) and tome's. Plain pydantic, no
torch, so that ``rmtp list`` and ``rmtp validate`` load none."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from rmtp.contract.param_types import one_speed_target, target_latency_ms_field, target_speedup_field
from rmtp.contract.pruner import PrunerParams
from rmtp.errors import PluginError
from rmtp_plugins.tokens.schedule import keep_ratios

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


class TokenClsParams(PruneScheduleParams):
    score_from: Literal["cls", "prefix"] = Field(
        "cls", description="score by the class token's attention row, or by the mean over all prefix tokens "
                           "(class + register tokens)")


class TokenMeanParams(PruneScheduleParams):
    pass


class TomeParams(TokenParams):
    r: int = Field(8, ge=0, le=100_000, description="tokens merged per block")
    ramp: float = Field(0.0, ge=-1.0, le=1.0, description="ToMe's inflection: r grows over the blocks (> 0) "
                                                          "or shrinks (< 0) linearly, same total")
    r_list: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="explicit tokens merged per "
                                                                               "block, replacing r/ramp")
    prop_attn: bool = Field(True, description="proportional attention: add log(token size) to the logits")

    strength_key: ClassVar[str] = "r"
    explicit_key: ClassVar[str] = "r_list"

    @model_validator(mode="after")
    def _list_or_ramp(self) -> TomeParams:
        if self.r_list is not None and self.model_fields_set & {"r", "ramp"}:
            raise ValueError("give either r_list (one count per block) or r/ramp, not both")
        return self


__all__ = ["KeepRatio", "PruneScheduleParams", "TokenClsParams", "TokenMeanParams", "TokenParams", "TomeParams"]
