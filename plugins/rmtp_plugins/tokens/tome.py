"""``tome``: Token Merging (Bolya et al., ICLR 2023) by bipartite soft matching.

Exactly facebookresearch/ToMe's timm patch for a ViT with a class token (tested against a
transcription of its code, ``tests/_tome_reference.py``): at each block, between attention and
MLP, *all* tokens alternate into sets A (even positions, so the class token is A's first) and B;
each A patch token's edge goes to its most similar B patch token (cosine similarity of the keys
averaged over heads, from this forward pass); the ``r`` strongest edges are merged as size-weighted
means, and the sequence becomes [prefix, unmerged A, B]. Proportional attention adds ``log(size)``
to the attention logits (an additive SDPA mask in the query's dtype) so a merged token counts as
the patches it stands for; average pooling is size-weighted. Class and register tokens never merge
(with one register token this is ToMe's handling of DeiT's distillation token). ``visualize: N``
(every token pruner) writes ``token_map-tome.png`` to the output folder, and ``rmtp token-map
RUN_DIR`` draws the same for a saved run: which patches merged, for a few val images.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from rmtp.accuracy_budget import StrengthKnob
from rmtp.errors import PluginError
from rmtp.hookspecs import hookimpl
from rmtp_plugins.tokens.base import TokenParams, TokenPruner
from rmtp_plugins.tokens.plan import TokenPlan
from rmtp_plugins.tokens.schedule import tome_r_list


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


class TomePruner(TokenPruner):
    name = "tome"
    description = "ViT token merging (ToMe): bipartite soft matching, proportional attention, r per block."
    method = "tome"
    Params = TomeParams

    @classmethod
    def schedule_knob(cls, model) -> StrengthKnob:  # noqa: ANN001 - nn.Module or None
        """``r`` from 0 (weak) to half the model's patches (100 before a model exists)."""
        patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        return StrengthKnob("r", weak=0, strong=patches // 2 if patches else 100, integer=True)

    def speed_strengths(self, ctx) -> list[object]:  # noqa: ANN001 - PruneContext
        return list(range(ctx.model.patch_embed.num_patches // 2 + 1))  # r: at most half the patches

    def plan(self, params: TomeParams, depth: int) -> TokenPlan:
        if params.r_list is None:
            r = tome_r_list(depth, params.r, params.ramp)
        elif len(params.r_list) != depth:
            raise PluginError(f"r_list lists {len(params.r_list)} counts but the model has {depth} blocks")
        else:
            r = list(params.r_list)
        return TokenPlan(method="tome", r=r, prop_attn=params.prop_attn)


@hookimpl
def register_pruners(register) -> None:  # noqa: ANN001 - pluggy passes the registry's callback
    register(TomePruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.tokens.patch  # noqa: F401 - registers the token patch (tokens.reduction)
