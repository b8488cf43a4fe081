"""Pydantic field types that pruner params share, importable without torch.

A recipe with a bad option must fail at ``rmtp validate``, before any model is built, with the
same message the pruner would give mid-run; these types run that check at validation time. They
live outside :mod:`rmtp.spectral` (whose modules compute with torch) so that a plugin's params,
and so ``rmtp list`` and ``rmtp validate``, load no torch: the check is imported only when a
value is given.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field


def _tw_confidence(value: float | None) -> float | None:
    if value is None:
        return None
    from rmtp.spectral.mp import check_tw_confidence

    return check_tw_confidence(value)


TwConfidence = Annotated[float | None, AfterValidator(_tw_confidence)]
"""None (the asymptotic edge) or a confidence in [F_TW1(0) ≈ 0.832, 1) for the Tracy–Widom margin
(:func:`rmtp.spectral.mp.check_tw_confidence`)."""


def target_speedup_field(chooses: str) -> Any:
    """``target_speedup``: the measured whole-model speed-up over the recipe's dense model a step
    reaches by choosing ``chooses`` (``docs/latency.md``)."""
    return Field(None, gt=1.0, le=100.0, description=f"choose {chooses} so the model runs this many times faster "
                                                     f"than the recipe's dense model, measured (the step's latency:)")


def target_latency_ms_field() -> Any:
    """``target_latency_ms``: as ``target_speedup``, as a time per batch of ``latency.batch``."""
    return Field(None, gt=0.0, description="as target_speedup, as a time per batch of latency.batch")


def one_speed_target(params: Any) -> list[str]:
    """The speed-target keys ``params`` sets, refusing both at once (for a params validator)."""
    given = [k for k in ("target_speedup", "target_latency_ms") if getattr(params, k) is not None]
    if len(given) > 1:
        raise ValueError("give target_speedup or target_latency_ms, not both")
    return given
