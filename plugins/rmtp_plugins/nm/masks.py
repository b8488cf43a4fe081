"""N:M mask arithmetic for the ``n:m`` pruner: layout, masks, the validity check, Wanda scores and
prune–restore. Pure tensor math: no modules are changed here (``docs/nm.md`` has the formulas).

**Layout.** A weight is pruned as the 2-D matrix a sparse GEMM multiplies, ``A`` (rows × K), with
groups of ``m`` consecutive entries along K in every row:

* ``nn.Linear`` (out × in): ``A = W``; K = in_features; group g of row o is ``W[o, g·m:(g+1)·m]``.
* ``nn.Conv2d`` (out × C × R × S): ``A = W.permute(0, 2, 3, 1).reshape(out, R·S·C)``, i.e. K ordered
  (r, s, c) with the input channel fastest, as implicit-GEMM / im2col kernels in channels-last
  (NHWC) lay out the reduction dimension (and as NVIDIA's ASP masks convolutions). A group is m
  consecutive input channels at one output channel and one kernel position; C must be a multiple
  of m, so no group straddles two kernel positions. Grouped/depthwise convs are not one GEMM and
  are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rmtp.gemm import gemm_view
from rmtp_plugins.nm.params import parse_pattern, pattern_name  # noqa: F401 - their first home

# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def layout_problem(weight_shape: tuple[int, ...], m: int, *, groups: int = 1) -> str | None:
    """Why a weight of this shape cannot take N:M groups of ``m`` (``None`` when it can)."""
    if groups != 1:
        return f"grouped conv (groups={groups}): not one GEMM"
    if len(weight_shape) == 2:
        if weight_shape[1] % m:
            return f"in_features={weight_shape[1]} is not a multiple of m={m}"
        return None
    if len(weight_shape) == 4:
        if weight_shape[1] % m:
            return f"in_channels={weight_shape[1]} is not a multiple of m={m}"
        return None
    return f"weight of {len(weight_shape)} dims is neither Linear nor Conv2d"


def channel_index(perm: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """K-index map of an input-channel permutation: position k of the permuted GEMM matrix holds
    column ``index[k]`` of the original (for a conv, the channel permutation inside every (r, s))."""
    if len(weight_shape) == 2:
        return perm
    _, c, r, s = weight_shape
    return (torch.arange(r * s, device=perm.device)[:, None] * c + perm[None, :]).reshape(-1)


def channel_rows(matrix: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """A GEMM-layout tensor (out × K) as (out·R·S) × C: one row per (output, kernel position), one
    column per input channel, so that input-channel permutations act on columns only."""
    if len(weight_shape) == 2:
        return matrix
    _, c, _, _ = weight_shape
    return matrix.reshape(-1, c)


# --------------------------------------------------------------------------------------------
# Masks and the validity check
# --------------------------------------------------------------------------------------------


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask of a GEMM-layout score matrix: the ``n`` highest scores of every group of
    ``m`` consecutive entries of a row. Ties go to the lower index (a stable sort), so masks are
    reproducible; ``n = 0`` keeps nothing."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"K={k} is not a multiple of m={m}")
    grouped = scores.reshape(rows, k // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    if n > 0:
        order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices[..., :n]
        keep.scatter_(-1, order, True)
    return keep.reshape(rows, k)


@dataclass(frozen=True)
class NMCheck:
    """Result of :func:`check_nm`: every group of ``m`` holds at most ``n`` nonzeros when ``ok``."""

    n: int
    m: int
    groups: int
    bad_groups: int
    max_nonzeros: int
    nonzeros: int

    @property
    def ok(self) -> bool:
        return self.bad_groups == 0

    def __bool__(self) -> bool:
        return self.ok


def check_nm(weight: torch.Tensor, n: int, m: int) -> NMCheck:
    """Count the groups of ``m`` (layout of the module docstring) holding more than ``n`` nonzeros.

    ``weight`` is a Linear (2-D) or Conv2d (4-D) weight. ``bool(check_nm(w, 2, 4))`` is the test
    "w is a valid 2:4 weight". Raises ValueError when K is not a multiple of ``m``.
    """
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"need 0 <= n <= m and m >= 1, got n={n}, m={m}")
    problem = layout_problem(tuple(weight.shape), m)
    if problem:
        raise ValueError(problem)
    counts = (gemm_view(weight.detach()) != 0).reshape(weight.shape[0], -1, m).sum(-1)
    return NMCheck(n=n, m=m, groups=counts.numel(), bad_groups=int((counts > n).sum()),
                   max_nonzeros=int(counts.max()) if counts.numel() else 0, nonzeros=int(counts.sum()))


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def scores_for(matrix: torch.Tensor, input_sq: torch.Tensor | None) -> torch.Tensor:
    """Per-weight importance in GEMM layout: ``|A|`` (magnitude) or ``|A| · ‖x_k‖`` (Wanda), where
    ``input_sq[k] = Σ_t x_tk²`` over every calibration position t the weight column k multiplies."""
    scores = matrix.detach().abs().float()
    if input_sq is None:
        return scores
    return scores * input_sq.float().clamp(min=0).sqrt()[None, :]


# --------------------------------------------------------------------------------------------
# Prune–restore
# --------------------------------------------------------------------------------------------


def reconstruction_error(matrix: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> float:
    """``Σ_o δ_oᵀ G δ_o`` with ``δ = A ⊙ (1 − keep)``: ‖(A − Â)X‖²_F over the calibration inputs X
    (``G = X Xᵀ``), the squared output error the mask causes."""
    delta = matrix.double() * (~keep)
    return float(((delta @ gram.double()) * delta).sum())


def restore_mask(matrix: torch.Tensor, scores: torch.Tensor, gram: torch.Tensor, n: int, m: int,
                 overprune: int) -> torch.Tensor:
    """Prune–restore: keep the top ``n − overprune`` scores per group, then restore, one weight per
    row at a time, the weight whose return lowers the row's output error ``δᵀGδ`` most, only into
    groups still holding fewer than ``n`` (so the result is N:M by construction) and only while it
    helps (gain > 0). Restoring weight j of row o changes the error by

        −gain = −(2·a_oj·(Gδ_o)_j − a_oj²·G_jj),

    after which ``Gδ_o −= a_oj·G[:, j]``. Rows are independent and updated together.
    """
    rows, k = matrix.shape
    a = matrix.double()
    g = gram.double()
    keep = nm_mask(scores, max(0, n - overprune), m)
    g_delta = (a * (~keep)) @ g  # row o: (G δ_o)ᵀ, δ = A ⊙ (1 − keep); G is symmetric
    diag = torch.diagonal(g)
    group_of = torch.arange(k, device=matrix.device) // m
    row_index = torch.arange(rows, device=matrix.device)
    for _ in range(min(n, overprune) * (k // m)):
        counts = keep.reshape(rows, k // m, m).sum(-1)  # kept per group
        room = (counts < n)[:, group_of]
        gain = 2.0 * a * g_delta - a * a * diag[None, :]
        gain = gain.masked_fill(keep | ~room, -torch.inf)
        best_gain, best = gain.max(dim=1)
        take = best_gain > 0  # a row with nothing left to gain is done: its δ no longer changes
        if not bool(take.any()):
            break
        r = row_index[take]
        j = best[take]
        keep[r, j] = True
        w = a[r, j]
        g_delta[r] -= w[:, None] * g[j]
    return keep
