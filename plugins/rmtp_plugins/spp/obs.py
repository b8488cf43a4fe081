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

**Cost**: the statistics are K × K; each removal is O(K²) plus one small batched inverse per group
(K = 768 for ViT-Ti's fc2: milliseconds per neuron on a CPU, all in float64).
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
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        widths = {int(g.numel()) for g in groups}
        for _ in range(remove):
            scores = torch.full((len(groups),), float("inf"), dtype=torch.float64)
            inverses: dict[int, torch.Tensor] = {}
            alive = [i for i in range(len(groups)) if not removed[i]]
            for width in widths:
                same = [i for i in alive if groups[i].numel() == width]
                if not same:
                    continue
                cols = torch.stack([groups[i] for i in same])  # (n, width)
                blocks = hinv[cols[:, :, None], cols[:, None, :]]  # (n, width, width)
                inv = torch.linalg.inv(blocks)
                wq = w[:, cols].permute(1, 0, 2)  # (n, rows, width)
                scores[same] = (torch.bmm(wq, inv) * wq).sum((1, 2))
                inverses.update(zip(same, inv))
            j = int(torch.argmin(scores))  # ties: the first group
            cols = groups[j]
            inv = inverses[j]
            update_rows = hinv[cols, :]
            w -= (w[:, cols] @ inv) @ update_rows
            w[:, cols] = 0.0
            hinv -= update_rows.T @ inv @ update_rows
            removed[j] = True
            order.append(j)
            costs.append(float(scores[j]) * count / 2.0)  # H was scaled by 2/count

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
