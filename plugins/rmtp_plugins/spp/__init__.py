"""The ``spp`` pruner plugin (entry point ``spp``): Solution Path Pruning, one gate search and a
whole family of structured sparsity levels sliced from it (``docs/spp.md``).

Modules, one job each:

* :mod:`.pruner`: ``SppPruner`` and its params, the search driver, extraction of each level and
  the saved path.
* :mod:`.path`: split linearized Bregman iteration on the gates and reading levels off the path.
* :mod:`.groups`: the units behind a step's layers (from the architecture's couplings), gating
  them and dispatching the slicing to :mod:`.heads` (attention heads), :mod:`.mlp` (MLP hidden
  neurons) and :mod:`.channels` (ResNet inner channels); :mod:`.unit` holds the unit.
* :mod:`.modules`, :mod:`.conv_modules`: the sliced and removed modules a saved model is rebuilt
  from (stable type ids ``spp.*``).
"""

from __future__ import annotations

from collections.abc import Callable

from rmtp.hookspecs import hookimpl
from rmtp_plugins.spp.pruner import (
    PATH_FILE,
    AttentionHeads,
    ConstantBranch,
    ConstantChannels,
    RemovedConv2d,
    RemovedNorm,
    SlicedBatchNorm2d,
    SlicedConv2d,
    SlicedLinear,
    SppParams,
    SppPruner,
    ZeroInputConv2d,
    extract,
    search,
)

__all__ = ["PATH_FILE", "AttentionHeads", "ConstantBranch", "ConstantChannels", "RemovedConv2d", "RemovedNorm",
           "SlicedBatchNorm2d", "SlicedConv2d", "SlicedLinear", "SppParams", "SppPruner", "ZeroInputConv2d",
           "extract", "search"]


@hookimpl
def register_pruners(register: Callable[[type], None]) -> None:
    register(SppPruner)
