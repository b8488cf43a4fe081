"""The ``n:m`` pruner plugin (entry point ``nm``): N:M structured sparsity with Marchenko–Pastur
layer budgets, channel permutation and prune–restore (``docs/nm.md``).

Modules, one job each:

* :mod:`.pruner`: ``NmPruner`` and its params, the steps in order (scores, budget, permutation,
  masks) and the report rows.
* :mod:`.masks`: N:M mask arithmetic (layout, masks, the validity check, Wanda scores, restore).
* :mod:`.budget`: the MP signal per layer and the multiple-choice knapsack over patterns.
* :mod:`.permute`: the channel-permutation search and applying it (to the producer the
  architecture's couplings name, or as a saved :class:`PermutedInput` index).
* :mod:`.export`: 2:4 semi-structured sparse tensors for CUDA kernels (``rmtp bench``).

This package is the plugin: it registers the pruner and the semi-structured kernel hook.
"""

from __future__ import annotations

from rmtp.hookspecs import hookimpl
from rmtp_plugins.nm.pruner import (
    NMCheck,
    NmParams,
    NmPruner,
    PermutedInput,
    SemiStructuredReport,
    check_nm,
    collect_input_stats,
    semi_structured_kernel,
    semi_structured_problem,
    to_semi_structured,
)

__all__ = ["NMCheck", "NmParams", "NmPruner", "PermutedInput", "SemiStructuredReport", "check_nm",
           "collect_input_stats", "semi_structured_kernel", "semi_structured_problem", "to_semi_structured"]


@hookimpl
def register_pruners(register) -> None:  # noqa: ANN001 - pluggy passes the registry's callback
    register(NmPruner)


@hookimpl
def register_kernels(register) -> None:  # noqa: ANN001 - pluggy passes the registry's callback
    register(semi_structured_kernel)  # rmtp bench runs 2:4 Linear layers on sparse kernels on CUDA
