"""Speed as a budget: a per-layer cost model measured on the target (:mod:`.cost`), cached in a JSON
table per device/precision/batch/threads (:mod:`.table`), configured by a prune step's
``latency:`` key (:class:`LatencySettings`, :mod:`.settings`).

svd-mp and n:m use it to leave a layer dense when its replacement is not faster
(``only_if_faster``), and svd-mp, n:m, spp and the token pruners to reach a ``target_speedup`` or
``target_latency_ms`` measured against the recipe's dense model (``docs/latency.md``). The settings
load no torch; the cost model does, on first use.
"""

from __future__ import annotations

from rmtp.latency.settings import COST_ENV, LatencySettings  # noqa: F401 - public: in __all__ (a sorted() ruff cannot read)
from rmtp.lazy import lazy_exports

_LAZY = {
    **dict.fromkeys(("CostModel", "MacsCost", "MeasuredCost", "cost_model", "interpolate", "monotone",
                     "predicted_seconds", "rank_grid", "round_up"), "rmtp.latency.cost"),
    **dict.fromkeys(("CostTable", "LatencyError", "module_key"), "rmtp.latency.table"),
    **dict.fromkeys(("CORRECTIONS", "SpeedTarget", "first_reaching", "reach_checked", "speed_target"),
                    "rmtp.latency.target"),
}

__all__ = sorted(["COST_ENV", "LatencySettings", *_LAZY])

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
