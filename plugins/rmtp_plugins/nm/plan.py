"""What n:m decides for one selected layer (:class:`LayerPlan`): the record :mod:`.pruner` fills
step by step and :mod:`.speed` reads and amends (timed patterns, layers kept dense). Both import
it from here, so neither names the other's types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rmtp_plugins.nm.params import Pattern

if TYPE_CHECKING:
    from rmtp.fidelity.layerwise import LayerInputs


@dataclass
class LayerPlan:
    """What n:m does to one selected layer."""

    name: str
    shape: tuple[int, ...]
    options: list[Pattern] = field(default_factory=list)
    skipped: str | None = None
    stats: LayerInputs | None = None
    macs: float = 0.0
    signal: float | None = None
    edge: float | None = None
    z: float = 0.0
    pattern: Pattern = None
    perm: str = "–"
    restore: str = "–"
    #: sparsegpt: the layer's relative output error on its calibration inputs after the update.
    sparsegpt_err: str = "–"
    #: Why a layer the budget gave a pattern stays dense (not faster on the target), or None.
    dense_reason: str | None = None
    #: The pattern's predicted speed-up over the dense layer, where it was timed.
    layer_speedup: float | None = None

    @property
    def k(self) -> int:
        return self.shape[1] * (self.shape[2] * self.shape[3] if len(self.shape) == 4 else 1)


__all__ = ["LayerPlan"]
