"""``token-cls``: prune patch tokens by the attention the class token pays them (the seed's method).

Score of patch j at block l = attention from the class token (or, with ``score_from: prefix``, the
mean over all prefix tokens) to j, averaged over heads, from this very forward pass. With fused
attention only that row is computed, ``softmax(q_cls·Kᵀ·scale)`` (1/N of QKᵀ), next to SDPA.
Each image keeps its own top-k; k follows ``keep(l) = 1 − r_max·((l+1)/L)^α`` or a per-block list.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rmtp.hookspecs import hookimpl
from rmtp_plugins.tokens.base import PruneScheduleParams, TokenPruner
from rmtp_plugins.tokens.plan import TokenPlan


class TokenClsParams(PruneScheduleParams):
    score_from: Literal["cls", "prefix"] = Field(
        "cls", description="score by the class token's attention row, or by the mean over all prefix tokens "
                           "(class + register tokens)")


class TokenClsPruner(TokenPruner):
    name = "token-cls"
    description = "ViT token pruning by class-token attention, keep(l) = 1 − r_max·((l+1)/L)^α (seed 001)."
    method = "cls"
    Params = TokenClsParams

    def plan(self, params: TokenClsParams, depth: int) -> TokenPlan:
        return TokenPlan(method="cls", keep=params.keep_list(depth), relative_to=params.relative_to,
                         min_tokens=params.min_tokens, fuse=params.fuse, score_from=params.score_from)


@hookimpl
def register_pruners(register) -> None:  # noqa: ANN001 - pluggy passes the registry's callback
    register(TokenClsPruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.tokens.patch  # noqa: F401 - registers the token patch (tokens.reduction)
