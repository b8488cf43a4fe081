"""ZipLM's structured OBS step, transcribed: the oracle for spp's ``search: obs`` choice
(:mod:`rmtp_plugins.spp.obs`). Not part of rmtp.

Transcribed from IST-DASLab/DarwinLM ``src/fast_obc_struct.py`` at commit
d0d4f08dad46dc6d4d41feb0c51faff54c370819: ``FastOBCStruct.update`` (H), ``pruning_pre_step``
(dead columns, damping), ``_prepare`` (zero weight columns, the inverse) and ``step`` (whose comment
says it is "mostly copy pasted from ZipLM prune_struct"), both its ``size == 1`` branch (single
columns, the MLP case) and its block branch (heads). Kept as the reference runs it: float64 here
instead of float32 (so that the comparison is not about rounding), no distributed code, no
printing, and it returns the order in which groups were removed instead of weight snapshots at
requested levels. The reference has no bias: compare it with rmtp's ``remove_groups(bias=None)``.
"""

from __future__ import annotations

import torch


def reference_hessian(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``update`` over batches of ``batch_size`` rows: H = 2/n · XᵀX as a running average."""
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    num_samples = 0
    for start in range(0, x.shape[0], batch_size):
        part = x[start:start + batch_size].double()
        n = part.shape[0]
        beta = num_samples / (num_samples + n)
        alpha = 2.0 / (num_samples + n)
        h.mul_(beta).addmm_(part.T, part, alpha=alpha)
        num_samples += n
    return h


def reference_order(weight: torch.Tensor, h: torch.Tensor, size: int, remove: int,
                    rel_damp: float = 1e-2) -> list[int]:
    """The groups (of ``size`` consecutive columns) the reference removes, in its order."""
    h = h.clone()
    d_col = h.shape[0]
    # pruning_pre_step
    pruned_ids = torch.diag(h) == 0
    h[pruned_ids, pruned_ids] = 1
    damp = rel_damp * torch.diag(h).mean()
    h[range(d_col), range(d_col)] += damp
    w = weight.clone().double()
    w[:, pruned_ids] = 0
    # _prepare
    zero_cols = torch.nonzero(w.eq(0).all(dim=0))
    h[zero_cols, :] = 0
    h[:, zero_cols] = 0
    h[zero_cols, zero_cols] = 1
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    # step
    count = d_col // size
    mask = torch.zeros(count).bool()
    rangecount = torch.arange(count)
    rangecolumns = torch.arange(d_col)
    order: list[int] = []
    if size == 1:
        for _ in range(remove):
            diag = torch.diagonal(hinv)
            scores = torch.sum(w ** 2, 0) / diag
            scores[mask] = float("inf")
            j = torch.argmin(scores)
            row = hinv[j, :]
            d = diag[j]
            w -= ((w[:, j] / d).unsqueeze(1)).matmul(row.unsqueeze(0))
            mask[j] = True
            w[:, mask] = 0
            order.append(int(j))
            row /= torch.sqrt(d)
            hinv -= row.unsqueeze(1).matmul(row.unsqueeze(0))
        return order
    mask1 = torch.zeros(d_col).bool()
    for _ in range(remove):
        blocks = hinv.reshape(count, size, count, size)
        blocks = blocks[rangecount, :, rangecount, :]
        invblocks = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
        w1 = w.reshape((w.shape[0], count, size)).transpose(0, 1)
        lambd = torch.bmm(w1, invblocks)
        scores = torch.sum(lambd * w1, (1, 2))
        scores[mask] = float("inf")
        j = torch.argmin(scores)
        rows = hinv[(size * j):(size * (j + 1)), :]
        d = invblocks[j]
        w -= lambd[j].matmul(rows)
        mask[j] = True
        mask1[(size * j):(size * (j + 1))] = True
        w[:, mask1] = 0
        order.append(int(j))
        hinv -= rows.t().matmul(d.matmul(rows))
        hinv[rangecolumns[mask1], rangecolumns[mask1]] = 1
    return order
