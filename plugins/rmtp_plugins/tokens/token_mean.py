"""``token-mean``: prune patch tokens by the mean attention they receive from the other patches.

Score of patch j = mean over heads and over patch queries i ≠ j of attention(i → j); prefix
queries (class, registers) are left out. This needs the explicit attention matrix, which is
computed only at blocks that prune; every other block keeps fused SDPA. Same schedule and
options as ``token-cls``.
"""

from __future__ import annotations

from rmtp.contract.hookspecs import hookimpl
from rmtp_plugins.tokens import TokenMeanPruner
from rmtp_plugins.tokens.params import TokenMeanParams

__all__ = ["TokenMeanParams", "TokenMeanPruner"]  # their first home; declared in rmtp_plugins.tokens now


@hookimpl
def register_pruners(register) -> None:
    register(TokenMeanPruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.tokens.patch  # noqa: F401 - registers the token patch (tokens.reduction)
