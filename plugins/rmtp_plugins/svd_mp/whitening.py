"""svd-mp on calibration data: truncation-aware whitening, so that what a split cuts is the layer's
output error on real inputs rather than its weight error.

For a layer y = W·x (W: M×N) and calibration inputs with second moment C = E[x·xᵀ] (the rows a
Linear multiplies; a Conv2d's im2col columns), the output error of a replacement Ŵ is

    E‖(W − Ŵ)·x‖² = ‖(W − Ŵ)·S‖_F²   for any S with S·Sᵀ = C,

so the best rank-k Ŵ is the truncation of W·S, mapped back: with W·S = U·Σ·Vᵀ,
Ŵ = U_k·Σ_k·V_kᵀ·S⁻¹ = U_k·U_kᵀ·W, and the error left is Σ_{i>k} σ_i². The factors written are
the existing low-rank modules' B = U_k·Σ_k^{1/2} and A = Σ_k^{1/2}·V_kᵀ·S⁻¹ = Σ_k^{-1/2}·U_kᵀ·W.

This is SVD-LLM's truncation-aware data whitening (Wang et al. 2024; AIoT-MLSys-Lab/SVD-LLM,
``SVDLLM.py``: ``profle_svdllm`` accumulates Σ xᵀx per layer and takes S = chol(C), ``whitening``
writes ``U_k·√Σ_k`` and ``√Σ_k·V_kᵀ·S⁻¹``). ASVD (Yuan et al. 2023; hahnyuan/ASVD4LLM,
``modules/svd_linear.py``: ``SVDLinear.from_linear(act_aware=True)``) is its diagonal
forerunner, S = diag(mean |x|)^α: it scales input channels but ignores their correlations, so its
truncation is not the output-error optimum. Two differences from SVD-LLM's code, on purpose:

* S is the eigen square root Q·Λ₊^{1/2} of C (negative rounding eigenvalues clamped to 0), not its
  Cholesky factor: W·S has the same singular values and left vectors for every S with S·Sᵀ = C, and
  A is formed as Σ_k^{-1/2}·U_kᵀ·W, so S is never inverted. SVD-LLM adds (−λ_min + 10⁻⁶)·I to C when
  Cholesky fails (and 10⁻⁶·I to S when it cannot invert it), which moves the optimum by that
  damping; here a rank-deficient C (fewer calibration rows than inputs, a dead input channel)
  needs none and the factors still give exactly the optimum on the calibration rows, U_k·U_kᵀ·W
  (outside their span the layer keeps W's own action, projected).
* SVD-LLM's "update" variant (``whitening_local_update`` / ``local_update``) refits the second
  factor by least squares on the layer's outputs, B = argmin ‖Y − B·A·X‖. Given the same inputs
  that refit is a no-op here: with C the Gram of those inputs, W·C·Aᵀ·(A·C·Aᵀ)⁻¹ = U_k·Σ_k^{1/2} = B
  (``tests/test_svd_mp_whitened.py`` checks it). It helped SVD-LLM because its whitening Gram came
  from the dense model and its update from the compressed one; here the layer-by-layer fit
  (``sequential``, :func:`rmtp.fidelity.layerwise.compress_sequentially`) whitens with the compressed
  model's own Gram, which is already the joint optimum for those inputs (on the real ViT-Ti it
  scored no better than one pass: docs/spectral.md).
"""

from __future__ import annotations

import torch
from torch import nn

#: Smallest whitened singular value a direction is divided by, relative to the largest: a direction
#: of the calibration data's null space has σ = 0, and any positive scale gives the same product
#: (10⁻⁸ keeps such a direction's two factors within float32's comfortable range).
_FLOOR = 1e-8


def weight_order_gram(module: nn.Module, gram: torch.Tensor) -> torch.Tensor:
    """``gram`` (from :class:`rmtp.fidelity.layerwise.LayerInputs`, in the GEMM order of :mod:`rmtp.gemm`)
    reordered to the columns of :func:`rmtp.spectral.mp.weight_matrix`, which svd-mp factors.

    A Linear's order is the same; a Conv2d's GEMM columns are (r, s, c) with the channel fastest,
    its spectral matrix flattens (c, r, s): the same numbers, permuted.
    """
    if not isinstance(module, nn.Conv2d):
        return gram
    positions = module.kernel_size[0] * module.kernel_size[1]
    order = torch.arange(positions * module.in_channels).reshape(positions, module.in_channels).T.reshape(-1)
    return gram[order][:, order]


def input_root(gram: torch.Tensor, count: int) -> torch.Tensor:
    """S (N×N) with S·Sᵀ = C = gram / count, the inputs' second moment: the eigen square root, its
    negative rounding eigenvalues clamped to zero, so a singular C needs no damping. On the CPU in
    float64, where svd-mp decomposes the weights (a Gram gathered on a GPU comes over).

    Inputs that are zero on every calibration row (a dead channel; a conv's padded im2col columns
    when the feature map is as small as its padding) have zero rows and columns in C and zero rows
    in S: they are left out of the decomposition. Few calibration rows and many such inputs made
    LAPACK's divide-and-conquer ``eigh`` fail to converge, or return NaN, on a ResNet's last 3×3
    convs (4608 inputs); where it still does, the singular value decomposition of the same
    symmetric matrix gives its eigenpairs."""
    second_moment = gram.to("cpu", torch.float64) / max(count, 1)
    second_moment = (second_moment + second_moment.T) / 2
    live = torch.nonzero(second_moment.diagonal() > 0).flatten()
    root = second_moment.new_zeros(second_moment.shape)
    if live.numel():
        values, vectors = _eigenpairs(second_moment[live][:, live])
        root[live, :live.numel()] = vectors * values.clamp_min(0.0).sqrt()
    return root


def _eigenpairs(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the symmetric positive semi-definite ``matrix``: ``eigh``, or
    the SVD (for such a matrix U·diag(s)·Uᵀ is an eigendecomposition) where ``eigh`` fails."""
    try:
        values, vectors = torch.linalg.eigh(matrix)
        if bool(torch.isfinite(values).all()) and bool(torch.isfinite(vectors).all()):
            return values, vectors
    except torch.linalg.LinAlgError:
        pass
    vectors, values, _ = torch.linalg.svd(matrix)
    return values, vectors


def whitened_svd(matrix: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, s, vh)`` such that keeping the top k triplets, u_k·diag(s_k)·vh_k, is the rank-k matrix
    closest to ``matrix`` in output error on the inputs whose second moment is root·rootᵀ.

    ``u``, ``s``: the left singular vectors and singular values of W·S (s_i² is the mean squared
    output the i-th direction carries, per output row seen); ``vh = diag(s)⁻¹·uᵀ·W``, so that
    u_k·diag(s_k)·vh_k = U_k·U_kᵀ·W exactly. ``s`` is floored at 10⁻⁸ of its largest value (a
    direction the data never excites), which leaves every product unchanged. Float64 in and out.
    """
    weight = matrix.to(torch.float64)
    u, s, _ = torch.linalg.svd(weight @ root.to(torch.float64), full_matrices=False)
    top = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
    safe = s.clamp_min(top * _FLOOR)
    vh = (u.T @ weight) / safe[:, None]
    return u, safe, vh


def output_error(s: torch.Tensor, rank: int) -> float:
    """Relative calibration output error of keeping the top ``rank`` whitened directions:
    √(Σ_{i>k} σ_i² / Σ σ_i²), 0 when the layer's output is zero on the data."""
    energy = s.to(torch.float64).pow(2)
    total = float(energy.sum())
    return (float(energy[rank:].sum()) / total) ** 0.5 if total > 0 else 0.0


def whitened_scores(s: torch.Tensor) -> torch.Tensor:
    """The budgets' score of each whitened direction: its share of the layer's calibration output
    energy, σ_i² / Σ σ_j² (descending, as ``s`` is). Why a share: raw σ² are in each layer's own
    output units (a qkv block and an MLP's fc2 differ by orders of magnitude), a share is the
    relative output error the direction would add, comparable across layers."""
    energy = s.to(torch.float64).pow(2)
    total = energy.sum()
    return energy / total if float(total) > 0 else energy
