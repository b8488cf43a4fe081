"""The token patch's plan (:class:`TokenPlan`, the JSON config of a saved ``tokens.reduction``
patch) and the names it uses: plain pydantic, no torch, so that the token pruners' declarations,
and so ``rmtp list`` and ``rmtp validate``, load none."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmtp_plugins.tokens.schedule import RelativeTo

Method = Literal["cls", "mean", "tome"]
#: Which tokens alternate into ToMe's sets A and B. ``sequence``: every token, prefix tokens included
#: (which stay protected), as facebookresearch/ToMe's ``bipartite_soft_matching`` does; ``patches``:
#: the patch tokens only, the prefix split off first (rmtp's tome before it matched ToMe; kept so that
#: folders saved then still reproduce their outputs).
ABSets = Literal["sequence", "patches"]


class TokenPlan(BaseModel):
    """The JSON config of a :class:`TokenReduction` patch: everything the forward pass needs.

    Saved in ``rmtp_model.json`` and validated again when a saved model is loaded (untrusted).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    keep: list[Annotated[float, Field(gt=0.0, le=1.0)]] | None = Field(
        None, description="cls/mean: keep ratio of each block (1.0: no pruning)")
    r: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="tome: tokens merged by each block")
    relative_to: RelativeTo = Field("current", description="keep ratios apply to the current or the original count")
    min_tokens: int = Field(1, ge=1, description="cls/mean: never keep fewer patch tokens than this")
    fuse: bool = Field(False, description="cls/mean: fuse pruned tokens into one (EViT)")
    score_from: Literal["cls", "prefix"] = Field(
        "cls", description="cls: score rows from the class token or all prefix tokens")
    prop_attn: bool = Field(False, description="add log(size) to attention logits (proportional attention)")
    ab_sets: ABSets | None = Field(
        None, description="tome: which tokens alternate into sets A and B: 'sequence' (all, prefix tokens "
                          "included and protected, as ToMe; the default) or 'patches' (patch tokens only, as "
                          "tome records saved before this field existed)")

    @model_validator(mode="before")
    @classmethod
    def _tome_matches_like_tome(cls, data: Any) -> Any:
        """A tome plan that does not say which sets it alternates gets ToMe's (``sequence``)."""
        if isinstance(data, dict) and data.get("method") == "tome" and data.get("ab_sets") is None:
            return {**data, "ab_sets": "sequence"}
        return data

    @model_validator(mode="after")
    def _one_schedule(self) -> TokenPlan:
        if self.method == "tome":
            if self.r is None or self.keep is not None:
                raise ValueError("method 'tome' needs r (per-block merge counts) and no keep")
            if self.fuse:
                raise ValueError("fuse applies to pruning (cls/mean), not to tome")
        elif self.keep is None or self.r is not None:
            raise ValueError(f"method {self.method!r} needs keep (per-block keep ratios) and no r")
        elif self.ab_sets is not None:
            raise ValueError("ab_sets applies to tome (merging), not to pruning")
        return self

    @property
    def depth(self) -> int:
        return len(self.keep if self.keep is not None else self.r)
