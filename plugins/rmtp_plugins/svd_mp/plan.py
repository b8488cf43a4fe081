"""What svd-mp decides for one layer (:class:`LayerPlan`) and each matrix it factors
(:class:`Matrix`): the records :mod:`.pruner` fills (decompositions, ranks) and :mod:`.speed`
reads and amends (ranks for a speed target, layers kept dense). Both import them from here, so
neither names the other's types."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rmtp.spectral.mp import MPFit, weight_matrix
from rmtp_plugins.svd_mp.lowrank import LOW_RANK_TYPES


@dataclass
class Matrix:
    """One matrix to factor: a whole layer, or one block (q, k or v) of a fused projection."""

    label: str
    rows: slice
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    fit: MPFit | None
    s_plus: float
    rank: int = 0
    #: Whether ``u, s, vh`` are the whitened decomposition (:func:`.whitening.whitened_svd`).
    whitened: bool = False
    #: The budgets' score per direction (descending), when not s/s₊ (whitened: :func:`.whitening.whitened_scores`).
    score: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.vh.shape[1])

    def scores(self) -> torch.Tensor:
        """What ``target_params`` and the speed targets rank this matrix's directions by: s/s₊ on
        the raw weights, the whitened score with calibration data."""
        return self.score if self.score is not None else self.s / self.s_plus


@dataclass
class LayerPlan:
    """What svd-mp will do to one layer."""

    name: str
    module: nn.Module
    matrices: list[Matrix] = field(default_factory=list)
    skipped: str | None = None
    #: Why a split that would save weights stays dense (not faster on the target), or None.
    dense_reason: str | None = None
    #: The split's predicted speed-up over the dense layer, where it was timed.
    layer_speedup: float | None = None
    #: How the factors were fitted to calibration data ("" without data): for the report.
    whitening: str = ""
    #: Whether this step whitens (calibration data given): set before any layer is fitted.
    fits_data: bool = False
    #: ``allocation: sensitivity``: KL(model ‖ model with this layer alone at its chosen ranks) on
    #: the screening images (:mod:`.sensitivity`); None when not measured or kept dense.
    sensitivity: float | None = None

    @property
    def already_split(self) -> bool:
        return isinstance(self.module, LOW_RANK_TYPES)

    @property
    def rows_cols(self) -> tuple[int, int]:
        """(M, N) of the layer's effective matrix (a split layer's original dense shape)."""
        if self.already_split:
            rows, *cols = self.module.effective_shape
            return rows, math.prod(cols)
        weight = weight_matrix(self.module.weight)
        return weight.shape[0], weight.shape[1]

    def current_cost(self) -> int:
        """Weight entries the layer holds now (biases excluded; a split qkv's blocks each count
        only their own second factor)."""
        return sum(p.numel() for name, p in self.module.named_parameters() if not name.endswith("bias"))

    def split_cost(self) -> int:
        _, cols = self.rows_cols
        return sum(m.rank * (cols + m.shape[0]) for m in self.matrices)

    def dense_cost(self) -> int:
        """Weight entries of the layer's dense matrix; a skipped layer that has none (a conv another
        pruner removed) counts what it holds."""
        if not self.already_split and not isinstance(getattr(self.module, "weight", None), torch.Tensor):
            return self.current_cost()
        rows, cols = self.rows_cols
        return rows * cols

    def cost(self) -> int:
        """Weight entries this layer holds after pruning (a split that does not pay stays dense)."""
        return min(self.split_cost(), self.dense_cost())


def write_reconstruction(weight: torch.Tensor, matrices: list[Matrix]) -> None:
    """Write each matrix's rank-k reconstruction U_k·S_k·V_kᵀ into ``weight``'s rows, in place.

    Built on a copy of the (out, in·kh·kw) matrix and written back with ``copy_`` into the
    parameter itself: ``weight_matrix`` is a view only of a contiguous weight, and a channels_last
    conv's reshape is a copy, so assigning into it used to drop the reconstruction silently while
    the report said it was written. ``copy_`` goes by logical index, whatever the strides.
    """
    with torch.no_grad():
        matrix = weight_matrix(weight).clone()
        for m in matrices:
            approx = (m.u[:, :m.rank] * m.s[:m.rank]) @ m.vh[:m.rank]
            matrix[m.rows] = approx.to(device=matrix.device, dtype=matrix.dtype)
        weight.copy_(matrix.reshape(weight.shape))


__all__ = ["LayerPlan", "Matrix", "write_reconstruction"]
