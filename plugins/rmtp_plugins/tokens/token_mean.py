"""``token-mean``: prune patch tokens by the mean attention they receive from the other patches.

Score of patch j = mean over heads and over patch queries i ≠ j of attention(i → j); prefix
queries (class, registers) are left out. This needs the explicit attention matrix, which is
computed only at blocks that prune; every other block keeps fused SDPA. Same schedule and
options as ``token-cls``.
"""

from __future__ import annotations

from rmtp.hookspecs import hookimpl
from rmtp_plugins.tokens.base import PruneScheduleParams, TokenPruner
from rmtp_plugins.tokens.plan import TokenPlan


class TokenMeanParams(PruneScheduleParams):
    pass


class TokenMeanPruner(TokenPruner):
    name = "token-mean"
    description = "ViT token pruning by the mean attention each patch receives from the others (seed 001)."
    method = "mean"
    Params = TokenMeanParams

    def plan(self, params: TokenMeanParams, depth: int) -> TokenPlan:
        return TokenPlan(method="mean", keep=params.keep_list(depth), relative_to=params.relative_to,
                         min_tokens=params.min_tokens, fuse=params.fuse)


@hookimpl
def register_pruners(register) -> None:  # noqa: ANN001 - pluggy passes the registry's callback
    register(TokenMeanPruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.tokens.patch  # noqa: F401 - registers the token patch (tokens.reduction)
