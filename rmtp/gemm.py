"""The GEMM view of a weight: the 2-D matrix a Linear or Conv2d multiplies in channels-last kernels.

``nn.Linear`` (out × in) is its own matrix. ``nn.Conv2d`` (out × C × R × S) is
``W.permute(0, 2, 3, 1).reshape(out, R·S·C)``: the reduction dimension ordered (r, s, c) with the
input channel fastest, as implicit-GEMM / im2col kernels in NHWC lay it out (and as NVIDIA's ASP
masks convolutions). N:M masks are defined on this view, and pruners that must recognise or keep
an N:M pattern (n:m itself, spp slicing after it) read weights through it, so they agree on which
entries form a group. (The spectral view, :func:`rmtp.spectral.mp.weight_matrix`, flattens
``(C, R, S)`` instead: singular values do not depend on the column order, N:M groups do.)
"""

from __future__ import annotations

import torch
from torch import nn

from rmtp.errors import RmtpError


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """The GEMM matrix A (out × K) of a Linear or Conv2d weight (a view where the layout allows)."""
    if weight.ndim == 2:
        return weight
    if weight.ndim == 4:
        out, c, r, s = weight.shape
        return weight.permute(0, 2, 3, 1).reshape(out, r * s * c)
    raise ValueError(f"expected a 2-D (Linear) or 4-D (Conv2d) weight, got shape {tuple(weight.shape)}")


def from_gemm(matrix: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`gemm_view`: the matrix back in the weight's own shape."""
    if len(weight_shape) == 2:
        return matrix.reshape(weight_shape)
    out, c, r, s = weight_shape
    return matrix.reshape(out, r, s, c).permute(0, 3, 1, 2).contiguous()


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a Linear-like layer, also once a pruner replaced or wrapped it
    (svd-mp's low-rank split exposes ``effective_shape``; n:m's permutation wrapper its ``weight``)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    shape = getattr(layer, "effective_shape", None)
    if shape is not None:
        return int(shape[0]), int(shape[1])
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    raise RmtpError(f"cannot tell the input and output sizes of a {type(layer).__name__}")
