"""``token-cls``: prune patch tokens by the attention the class token pays them (the seed's method).

Score of patch j at block l = attention from the class token (or, with ``score_from: prefix``, the
mean over all prefix tokens) to j, averaged over heads, from this very forward pass. With fused
attention only that row is computed, ``softmax(q_cls·Kᵀ·scale)`` (1/N of QKᵀ), next to SDPA.
Each image keeps its own top-k; k follows ``keep(l) = 1 − r_max·((l+1)/L)^α`` or a per-block list.
"""

from __future__ import annotations

from rmtp.contract.hookspecs import hookimpl
from rmtp_plugins.tokens import TokenClsPruner
from rmtp_plugins.tokens.params import TokenClsParams

__all__ = ["TokenClsParams", "TokenClsPruner"]  # their first home; declared in rmtp_plugins.tokens now


@hookimpl
def register_pruners(register) -> None:
    register(TokenClsPruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.tokens.patch  # noqa: F401 - registers the token patch (tokens.reduction)
