"""SparseGPT for N:M masks: the mask chosen column block by column block, with the optimal
(OBS) correction of the weights not yet visited. Pure tensor math, like :mod:`.masks`.

After Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023); the procedure follows the reference code, IST-DASLab/sparsegpt ``sparsegpt.py``,
``SparseGPT.add_batch`` (H) and ``SparseGPT.fasterprune`` (the sweep), written anew here for rmtp's
GEMM layout (:mod:`rmtp.gemm`: a conv's K ordered (r, s, c), where N:M groups lie).

**The problem.** For one layer with GEMM matrix A (rows × K) and calibration inputs X (the layer's
input rows, t × K), find Â with an N:M pattern minimising the output error ‖(A − Â)Xᵀ‖²_F. Rows
are independent and share H = 2·XᵀX/t (the Hessian of the error of any row).

**The sweep.** Columns are visited left to right. When column j is pruned (set to 0) or fixed, the
optimal correction of the columns after it (OBS: Hassibi & Stork) is ``Δ_{j:} = −(a_j − q_j) /
U_jj · U_{j, j:}`` with U the upper Cholesky factor of H⁻¹ (U's row j is the inverse Hessian of the
columns j.. still free, scaled, so no inverse is recomputed as columns are fixed). At every column
j with j % m == 0 the mask of the group j..j+m is chosen on the weights as updated so far: the
m − n weights with the smallest saliency a²/U_jj² are pruned (the reference's
``w**2 / diag(Hinv1)**2``; rmtp's n counts the weights kept, the reference's ``prunen`` those
pruned). Corrections are applied lazily: inside a block of ``blocksize`` columns (rounded down to
a multiple of m, so no group straddles two blocks) one rank-1 update per column, and to the
columns after the block once, as one matrix product.

**Damping and dead inputs**, as the reference: an input that is zero on every calibration row
(H_jj = 0) gets H_jj = 1 and its weights are set to zero (they never contributed to any output);
then percdamp · mean(diag H) is added to the diagonal, which keeps H invertible when X is rank
deficient (fewer rows than K, or correlated features).

**Cost** per layer: the Cholesky factorisations (K³), the sweep (rows·K² in total), all in float64
(activations statistics are float64 already; a ViT-Ti layer takes milliseconds). The mask and the
update are deterministic: ties in the saliency go to the lower index, as in :func:`.masks.nm_mask`.

With the damping set to zero and full-rank inputs, the correction of the columns after the last
pruned one is exactly the least-squares optimum of those columns given the ones before (what
``tests/test_sparsegpt.py`` checks); in general SparseGPT is greedy (columns are fixed once
visited), so its error lies between the least-squares refit of its own mask and the error of the
same mask with no update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rmtp.errors import RmtpError
from rmtp_plugins.nm.masks import nm_mask

#: The reference's default lazy-update block (columns) and damping (share of the mean Hessian diagonal).
BLOCKSIZE = 128
PERCDAMP = 0.01


@dataclass(frozen=True)
class SparseGPTResult:
    """The pruned and corrected GEMM matrix (float64, exact zeros where ``keep`` is False) and its mask."""

    matrix: torch.Tensor
    keep: torch.Tensor


def damped_hessian(gram: torch.Tensor, count: int,
                   percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, dead): H = 2·gram/count in float64, the inputs that were zero on every calibration row
    (``dead``) given a unit diagonal, then the whole diagonal raised by ``percdamp``·mean(diag H),
    as the reference's ``fasterprune`` does."""
    if count <= 0:
        raise ValueError("the Hessian needs at least one calibration row")
    h = gram.detach().double() * (2.0 / count)  # a new tensor: the caller's gram is not touched
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    return h, dead


def inverse_hessian_factor(gram: torch.Tensor, count: int,
                           percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of H⁻¹ for the :func:`damped_hessian` H. Raises
    RmtpError when H is still not positive definite (only possible with ``percdamp`` = 0 and
    rank-deficient inputs)."""
    h, dead = damped_hessian(gram, count, percdamp)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise RmtpError(f"sparsegpt: the input Hessian is not positive definite (percdamp={percdamp}); "
                        "raise percdamp or give more calibration images")
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info):
        raise RmtpError(f"sparsegpt: the inverse Hessian is numerically singular (percdamp={percdamp}); "
                        "raise percdamp")
    return upper, dead


def sparsegpt(matrix: torch.Tensor, gram: torch.Tensor, count: int, n: int, m: int, *, blocksize: int = BLOCKSIZE,
              percdamp: float = PERCDAMP, keep: torch.Tensor | None = None) -> SparseGPTResult:
    """N:M-prune the GEMM matrix ``matrix`` (rows × K) with SparseGPT's column sweep (module
    docstring), on the calibration inputs' ``gram`` = Σ_t x_t x_tᵀ (K × K) over ``count`` rows.

    With ``keep`` (a boolean mask, True = kept) the mask is not chosen but taken as given, and only
    the OBS correction runs (the reference's path for a precomputed mask). K must be a multiple
    of ``m``. The input is not modified."""
    rows, k = matrix.shape
    if k % m:
        raise ValueError(f"K={k} is not a multiple of m={m}")
    if tuple(gram.shape) != (k, k):
        raise ValueError(f"gram of shape {tuple(gram.shape)} does not match K={k}")
    upper, dead = inverse_hessian_factor(gram.to(matrix.device), count, percdamp)
    w = matrix.detach().double().clone()
    w[:, dead] = 0.0
    pruned = torch.zeros(rows, k, dtype=torch.bool, device=w.device) if keep is None else ~keep.to(w.device)
    step = max(m, blocksize // m * m)
    for start in range(0, k, step):
        stop = min(start + step, k)
        errors = _sweep_block(w[:, start:stop], upper[start:stop, start:stop], pruned[:, start:stop],
                              n, m, choose=keep is None)
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return SparseGPTResult(w, ~pruned)


def _sweep_block(block: torch.Tensor, upper: torch.Tensor, pruned: torch.Tensor, n: int, m: int, *,
                 choose: bool) -> torch.Tensor:
    """One block of the sweep, in place on ``block`` (rows × B, a view of the full matrix) and, when
    ``choose``, on ``pruned``: the mask of each group chosen on its arrival, the pruned weights
    zeroed and each column's error pushed onto the block's later columns. Returns the scaled
    errors (rows × B) whose product with U's off-block rows corrects the columns after the block."""
    errors = torch.zeros_like(block)
    diag = torch.diagonal(upper)
    for i in range(block.shape[1]):
        if choose and i % m == 0:
            saliency = block[:, i:i + m].pow(2) / diag[i:i + m].pow(2)
            pruned[:, i:i + m] = ~nm_mask(saliency, n, m)
        column = block[:, i]
        kept = column.masked_fill(pruned[:, i], 0.0)
        error = (column - kept) / diag[i]
        block[:, i + 1:] -= error[:, None] * upper[i, i + 1:][None, :]
        block[:, i] = kept  # exact zeros where pruned (the update would leave rounding residue)
        errors[:, i] = error
    return errors


def least_squares_refit(matrix: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, count: int, *,
                        percdamp: float = PERCDAMP, max_elements: int = 1 << 25) -> torch.Tensor:
    """The kept weights refitted, row by row, to the dense row's outputs: for row o with kept
    columns S, ŵ_S = argmin (a_o − ŵ)ᵀ H (a_o − ŵ) over ŵ zero outside S, i.e. H_SS ŵ_S = (H a_o)_S,
    with H the :func:`damped_hessian` (the damping makes it a ridge fit). This is the least-squares
    optimum for the mask, which SparseGPT's greedy sweep only approaches: a column it has visited
    cannot compensate for groups pruned after it.

    Every row must keep the same number of weights (an exact N:M mask does). Rows are solved in
    batches of at most ``max_elements`` entries of H_SS; cost rows·|S|³/3 (Cholesky), float64."""
    a = matrix.detach().double()
    rows, k = a.shape
    kept = keep.to(a.device).sum(1)
    if bool((kept != kept[0]).any()):
        raise ValueError("least_squares_refit needs the same number of kept weights in every row")
    size = int(kept[0])
    h, dead = damped_hessian(gram.to(a.device), count, percdamp)
    out = torch.zeros_like(a)
    if size == 0:
        return out
    index = keep.to(a.device).nonzero()[:, 1].reshape(rows, size)  # kept columns of each row, ascending
    target = a.clone()
    target[:, dead] = 0.0  # a dead input's weight never mattered: fit the row without it
    rhs = (target @ h).gather(1, index)  # (H a_o)_S
    chunk = max(1, max_elements // (size * size))
    for start in range(0, rows, chunk):
        part = index[start:start + chunk]
        system = h[part[:, :, None], part[:, None, :]]  # H_SS per row
        factor, info = torch.linalg.cholesky_ex(system)
        if bool((info != 0).any()):
            raise RmtpError(f"sparsegpt refit: a kept-weight Hessian is not positive definite (percdamp={percdamp}); "
                            "raise percdamp")
        solution = torch.cholesky_solve(rhs[start:start + chunk, :, None], factor)[:, :, 0]
        out[start:start + chunk].scatter_(1, part, solution)
    return out


def output_error(matrix: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(A − Â)Xᵀ‖²_F / ‖AXᵀ‖²_F from the Gram matrix: the relative output error on the calibration
    inputs (0.0 for a layer whose outputs are all zero)."""
    a = matrix.detach().double()
    g = gram.detach().double().to(a.device)
    delta = a - pruned.detach().double().to(a.device)
    total = float(((a @ g) * a).sum())
    return float(((delta @ g) * delta).sum()) / total if total > 0 else 0.0
