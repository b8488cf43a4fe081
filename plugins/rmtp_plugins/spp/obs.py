"""Structured OBS: which groups of a layer's inputs to remove, and the least-squares refit of the
layer that reads them, from calibration statistics alone. Pure tensor math, like :mod:`.path`.

After Kurtic, Frantar & Alistarh, "ZipLM: Inference-Aware Structured Pruning of Language Models"
(NeurIPS 2023), whose structured step is the Optimal Brain Surgeon (Hassibi & Stork) for whole
groups of input columns; the loop follows the authors' code as published in IST-DASLab/DarwinLM
``src/fast_obc_struct.py`` (``FastOBCStruct.step``, "mostly copy pasted from ZipLM prune_struct"),
written anew here for rmtp's GEMM layout (:mod:`rmtp.gemm`) and with the layer's bias.

**The problem.** A consumer layer (a ViT attention's ``proj``, an MLP's ``fc2``, a ResNet block's
inner conv) computes Y = X Wᵀ + b on its calibration input rows X (t × K). Removing a group (an
attention head: ``head_dim`` columns; an MLP neuron: one column; a conv channel: its r·s im2col
columns) removes those columns of X. The kept weights (and the bias) are then refitted to give the
dense outputs as well as they can: min ‖X̃ W̃ᵀ − X̃_S W̃_Sᵀ‖² over the kept columns S, with X̃ = [X, 1]
and W̃ = [W, b] (rows of W̃ are independent and share H = X̃ᵀX̃). That is a least-squares problem
with the closed form W̃_S = W̃ H_{:,S} (H_{S,S})⁻¹.

**The greedy choice** (the reference's loop, per removed group): with H⁻¹ of the columns still
alive, removing group Q costs ``tr(W̃_Q (H⁻¹_QQ)⁻¹ W̃_Qᵀ)`` of output error after the optimal update
of every other column; the cheapest group goes, the weights take that update
``W̃ ← W̃ − W̃_Q (H⁻¹_QQ)⁻¹ H⁻¹_{Q,:}``, and H⁻¹ loses Q's rows and columns
(``H⁻¹ ← H⁻¹ − H⁻¹_{:,Q} (H⁻¹_QQ)⁻¹ H⁻¹_{Q,:}``; the reference then sets the removed block's
diagonal to 1 so that its batched inverse of every block stays defined; here only the blocks of
groups still alive are inverted). The bias column is never a candidate. The final
weights are the least-squares refit of the kept columns, recomputed in one solve (the sequence of
OBS updates arrives at the same weights; one solve carries less rounding).

**Damping and dead inputs**, as the reference: H = 2·X̃ᵀX̃/t, an input that is zero on every row
gets H_jj = 1 (its weights are zeroed: it never contributed), then ``percdamp``·mean(diag H) is
added to the diagonal of the weight columns (not the bias column, which is never removed and whose
diagonal is 2). With ``percdamp = 0`` and full-rank inputs each choice and the final weights are
exactly the least-squares optimum (what ``tests/test_spp_obs.py`` checks against brute force).

**Cost**: the statistics are K × K (one Cholesky inverse, one final solve); each removal then
costs O(t·width·K) for the t removals before it, plus one small batched inverse of the alive
groups' blocks, because H⁻¹'s downdates are kept as factors instead of applied (:func:`_remove_greedily`).
Applying each downdate to the K × K matrix, as the reference does, streams it through memory once
per removal: the slow part for a ResNet's 3×3 convs (K = 9 × 512), not for ViT-Ti's fc2 (K = 768).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PERCDAMP", "StructuredFit", "remove_groups"]

#: The reference's relative damping (``rel_damp``).
PERCDAMP = 0.01


@dataclass(frozen=True)
class StructuredFit:
    """What :func:`remove_groups` decided: ``removed`` (one bool per group, in group order), the
    refitted GEMM ``weight`` (rows × K, float64, zero in removed columns) and ``bias`` (``None``
    when the layer has none), ``error`` the output error ‖X̃(W̃ − W̃')ᵀ‖² summed over the calibration
    rows (undamped), ``energy`` the dense outputs' ‖X̃W̃ᵀ‖², and ``order`` the removed groups in the
    order they were chosen."""

    removed: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    error: float
    energy: float
    order: tuple[int, ...]
    #: Each removal's OBS cost (in ``order``), in the units of ``error``: what it added to the output
    #: error under the damped statistics (their running sum approaches ``error`` as damping goes to 0).
    costs: tuple[float, ...] = ()

    @property
    def relative_error(self) -> float:
        """The output error as a share of the dense outputs' energy (0: nothing lost)."""
        return self.error / self.energy if self.energy > 0 else 0.0


def _augmented(gram: torch.Tensor, sums: torch.Tensor | None, count: int,
               with_bias: bool) -> torch.Tensor:
    """X̃ᵀX̃ for X̃ = [X, 1] (just XᵀX without a bias), float64."""
    gram = gram.double()
    if not with_bias:
        return gram.clone()
    if sums is None:
        raise ValueError("refitting a bias needs the inputs' column sums")
    k = gram.shape[0]
    h = gram.new_empty(k + 1, k + 1)
    h[:k, :k] = gram
    h[:k, k] = h[k, :k] = sums.double()
    h[k, k] = float(count)
    return h


def _prices(columns: torch.Tensor, inverses: torch.Tensor) -> torch.Tensor:
    """What removing each group costs, tr(W_Q (H⁻¹_QQ)⁻¹ W_Qᵀ): ``columns`` (rows × alive × width)
    holds each alive group's columns of W, ``inverses`` (alive × width × width) their (H⁻¹_QQ)⁻¹.
    A neuron's price is ‖w_q‖² / H⁻¹_qq, computed without batched 1 × 1 matrix products."""
    if columns.shape[-1] == 1:
        return (columns[:, :, 0] ** 2).sum(0) * inverses[:, 0, 0]
    wq = columns.permute(1, 0, 2)  # (alive, rows, width)
    return (torch.bmm(wq, inverses) * wq).sum((1, 2))


def _remove_greedily(w: torch.Tensor, hinv: torch.Tensor, index: torch.Tensor,
                     remove: int) -> list[tuple[int, float]]:
    """The reference's greedy loop (module docstring), for groups of any width (``index``: groups ×
    width GEMM columns). Updates ``w`` in place; ``hinv`` (H⁻¹ of the damped statistics) is only read.

    The reference applies each removal's rank-``width`` downdate H⁻¹ ← H⁻¹ − Rᵀ (H⁻¹_QQ)⁻¹ R
    (R = H⁻¹_{Q,:}) to the whole K × K matrix, which streams it through memory once per removed
    group: minutes on a ResNet's 3×3 convs (K = 9 × 512). Here each downdate is kept as its factor
    D = Lᵀ R ((H⁻¹_QQ)⁻¹ = L Lᵀ, so Rᵀ (H⁻¹_QQ)⁻¹ R = Dᵀ D); the alive groups' diagonal blocks, which
    price them, are kept up to date from D, and the rows the chosen group's update needs are
    rebuilt as H⁻¹_{Q,:} − Σ D_{:,Q}ᵀ D. The same numbers, without touching the K × K matrix again."""
    groups, width = index.shape
    blocks = hinv[index[:, :, None], index[:, None, :]]  # (groups, width, width): H⁻¹_QQ of every group
    downdates = hinv.new_empty(remove * width, hinv.shape[0])
    removed = torch.zeros(groups, dtype=torch.bool)
    chosen: list[tuple[int, float]] = []
    for t in range(remove):
        live = torch.nonzero(~removed).flatten()
        cols = index[live]  # (alive, width)
        inverses = 1.0 / blocks[live] if width == 1 else torch.linalg.inv(blocks[live])  # (alive, width, width)
        scores = _prices(w[:, cols], inverses)
        best = int(torch.argmin(scores))  # ties: the first group still alive
        j, group, inv = int(live[best]), cols[best], inverses[best]
        done = downdates[:t * width]
        rows = hinv[group] - done[:, group].T @ done  # rows Q of the current H⁻¹
        w -= (w[:, group] @ inv) @ rows
        w[:, group] = 0.0
        factor = torch.linalg.cholesky(inv).mT @ rows  # D: this removal's downdate is Dᵀ D
        downdates[t * width:(t + 1) * width] = factor
        at_groups = factor[:, index]  # (width, groups, width)
        blocks -= (at_groups[:, :, :, None] * at_groups[:, :, None, :]).sum(0)
        removed[j] = True
        chosen.append((j, float(scores[best])))
    return chosen


def remove_groups(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, sums: torch.Tensor | None,
                  count: int, groups: list[torch.Tensor], remove: int,
                  percdamp: float = PERCDAMP) -> StructuredFit:
    """Remove ``remove`` of ``groups`` (each a tensor of GEMM column indices of ``weight``, rows × K)
    greedily by structured OBS on the calibration statistics (``gram`` = XᵀX, ``sums`` = Σx over
    ``count`` input rows) and refit the kept columns and ``bias`` by least squares (module docstring).
    """
    if count <= 0:
        raise ValueError("structured OBS needs at least one calibration row")
    if not 0 <= remove <= len(groups):
        raise ValueError(f"cannot remove {remove} of {len(groups)} groups")
    rows, k = weight.shape
    with_bias = bias is not None
    exact = _augmented(gram, sums, count, with_bias)
    w = weight.detach().double()
    w = torch.cat([w, bias.detach().double()[:, None]], 1) if with_bias else w.clone()
    dense = w.clone()

    h = exact * (2.0 / count)
    diag = torch.diagonal(h)[:k]  # the weight columns (the bias column, if any, is k)
    dead = diag == 0
    diag[dead] = 1.0
    w[:, :k][:, dead] = 0.0
    diag += percdamp * diag.mean()

    removed = torch.zeros(len(groups), dtype=torch.bool)
    order: list[int] = []
    costs: list[float] = []
    if remove:
        widths = {int(g.numel()) for g in groups}
        if len(widths) != 1:
            raise ValueError(f"groups of one layer must have one width, got {sorted(widths)}")
        index = torch.stack(list(groups))  # (groups, width)
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        for j, cost in _remove_greedily(w, hinv, index, remove):
            removed[j] = True
            order.append(j)
            costs.append(cost * count / 2.0)  # H was scaled by 2/count

    kept_cols = torch.ones(w.shape[1], dtype=torch.bool)
    kept_cols[:k][dead] = False
    for i in order:
        kept_cols[groups[i]] = False
    refit = torch.zeros_like(w)
    s = torch.nonzero(kept_cols).flatten()
    if s.numel():
        h_ss = h[s[:, None], s[None, :]]
        refit[:, s] = torch.linalg.solve(h_ss, (dense @ h[:, s]).T).T  # W̃ H_{:,S} H_{S,S}⁻¹ (H symmetric)
    delta = dense - refit
    error = float(torch.einsum("ri,ij,rj->", delta, exact, delta))
    energy = float(torch.einsum("ri,ij,rj->", dense, exact, dense))
    return StructuredFit(removed=removed, weight=refit[:, :k], bias=refit[:, k] if with_bias else None,
                         error=max(error, 0.0), energy=energy, order=tuple(order), costs=tuple(costs))
