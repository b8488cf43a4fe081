"""How a prune step measures speed: :class:`LatencySettings` (a prune step's ``latency:`` key, the
``latency=`` argument of :func:`rmtp.prune`). Plain pydantic, no torch, so ``rmtp validate`` stays
fast.

``cost: measured`` (the default) times candidate layers on the device the step runs on;
``cost: macs`` predicts time by multiply-accumulates instead (an ideal device where every saved MAC
is saved time, N:M included): deterministic, nothing timed, and what rmtp did before budgets in
time existed. The environment variable ``RMTP_LATENCY_COST`` sets the default for recipes that
do not say (``macs`` on a CI machine whose timings mean nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rmtp.run.precision import Precision

CostKind = Literal["measured", "macs"]
COST_ENV = "RMTP_LATENCY_COST"
CACHE_ENV = "RMTP_LATENCY_CACHE"


def default_cost() -> CostKind:
    """``RMTP_LATENCY_COST`` when it names a cost kind, else ``measured``."""
    value = os.environ.get(COST_ENV, "measured").strip().lower()
    return value if value in ("measured", "macs") else "measured"  # type: ignore[return-value]


def default_cache_dir() -> Path:
    """``RMTP_LATENCY_CACHE``, else ``$XDG_CACHE_HOME/rmtp/latency`` (``~/.cache/rmtp/latency``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rmtp" / "latency"


class LatencySettings(BaseModel):
    """Where and how replacements are timed; the cost table is cached per device, precision, batch
    and threads, so a second run on the same machine times nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cost: CostKind = Field(default_factory=default_cost,
                           description="measured: time layers on the step's device; macs: predict time by "
                                       "MACs (no timing; default from RMTP_LATENCY_COST, else measured)")
    batch: int = Field(1, ge=1, le=4096, description="batch size the model will run at (time depends on it)")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads while timing (null: torch's "
                                                                 "current setting)")
    precision: Precision = Field("fp32", description="autocast while timing: fp32, bf16, fp16 (CUDA)")
    min_gain: float = Field(0.05, ge=0.0, lt=1.0,
                            description="a replacement counts as faster only when it saves at least this share "
                                        "of the layer's dense time")
    round_to: int | None = Field(None, ge=1, le=1024,
                                 description="round kept ranks (svd-mp) up to a multiple of this (8, 16: what "
                                             "GEMM kernels like)")
    grid: int = Field(5, ge=2, le=32, description="ranks / token counts timed per layer, interpolated between")
    rounds: int = Field(7, ge=3, le=200, description="interleaved timing rounds per layer (median over rounds)")
    block_ms: float = Field(15.0, gt=0.0, le=10_000.0, description="length of one timed block of calls")
    verify_rounds: int = Field(9, ge=0, le=1000,
                               description="after the step, time the whole model against dense for this many "
                                           "rounds and report measured next to predicted (0: skip)")
    cache: Path | None = Field(None, description="cost-table folder (default: RMTP_LATENCY_CACHE or "
                                                 "~/.cache/rmtp/latency)")

    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else default_cache_dir()

    def cache_source(self) -> str:
        """What names :meth:`cache_dir`, for an error: the key, the variable, or the default."""
        if self.cache is not None:
            return "latency.cache"
        return CACHE_ENV if os.environ.get(CACHE_ENV) else "the latency cache (default; set RMTP_LATENCY_CACHE)"

    def check_cache(self) -> None:
        """Refuse a cost-table folder rmtp cannot write (a file, a read-only folder) before any timing:
        the table is saved after the first layer is timed, and a run that learned this from a
        traceback had timed for 42–59 s. Only for ``cost: measured``, the one that writes it."""
        if self.cost != "measured":
            return
        from rmtp.storage.atomic import check_writable

        check_writable(self.cache_dir(), what=self.cache_source(), is_dir=True)


def plans_in_time(params: Any) -> bool:
    """Whether a prune step with ``params`` times on the device: a speed target, or ``only_if_faster``
    on (svd-mp resolves its default through ``faster_only()``). The speed keys are the shared
    ones of :mod:`rmtp.contract.param_types`, so this reads them by name."""
    if getattr(params, "target_speedup", None) is not None or getattr(params, "target_latency_ms", None) is not None:
        return True
    faster_only = getattr(params, "faster_only", None)
    return bool(faster_only()) if callable(faster_only) else bool(getattr(params, "only_if_faster", False))
