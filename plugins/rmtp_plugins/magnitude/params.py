"""``MagnitudeParams``, the params of ``magnitude`` (:mod:`rmtp_plugins.magnitude`): plain pydantic,
no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rmtp.contract.pruner import PrunerParams


class MagnitudeParams(PrunerParams):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of the selected weights to zero")
    scope: Literal["global", "layer"] = Field("global", description="one threshold over all layers, or per layer")


__all__ = ["MagnitudeParams"]
