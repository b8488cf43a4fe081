"""Pydantic field types that pruner params share, importable without torch.

A recipe with a bad option must fail at ``rmtp validate``, before any model is built, with the
same message the pruner would give mid-run; these types run that check at validation time. They
live outside :mod:`rmtp.spectral` (whose modules compute with torch) so that a plugin's params,
and so ``rmtp list`` and ``rmtp validate``, load no torch: the check is imported only when a
value is given.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import AfterValidator


def _tw_confidence(value: float | None) -> float | None:
    if value is None:
        return None
    from rmtp.spectral.mp import check_tw_confidence

    return check_tw_confidence(value)


TwConfidence = Annotated[Optional[float], AfterValidator(_tw_confidence)]
"""None (the asymptotic edge) or a confidence in [F_TW1(0) ≈ 0.832, 1) for the Tracy–Widom margin
(:func:`rmtp.spectral.mp.check_tw_confidence`)."""
