"""Pydantic field types for the MP-fit options that pruner params share.

A recipe with a bad option must fail at ``rmtp validate``, before any model is built, with the
same message :func:`rmtp.spectral.mp.fit_mp` would give mid-run; these types run that check at
validation time.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import AfterValidator

from rmtp.spectral.mp import check_tw_confidence


def _tw_confidence(value: float | None) -> float | None:
    return None if value is None else check_tw_confidence(value)


TwConfidence = Annotated[Optional[float], AfterValidator(_tw_confidence)]
"""None (the asymptotic edge) or a confidence in [F_TW1(0) ≈ 0.832, 1) for the Tracy–Widom margin."""
