"""Low-rank layers: a Linear or Conv2d split into two thinner ones, W ≈ B·A.

A rank-k factorisation of an M×N weight stores k·(M+N) numbers instead of M·N and costs k·(M+N)
multiply-accumulates per output position instead of M·N, so it pays exactly when
k·(M+N) < M·N. :func:`factorize` builds the factors from a truncated SVD with the singular
values split evenly (B = U·√S, A = √S·Vᵀ), which keeps the two factors on the same scale for
fine-tuning and for coefficient pruning.

Each module may carry the Marchenko–Pastur edge s₊ of the dense matrix it came from (``edges``,
one per block), saved with it: a split layer holds a rank-k matrix with no noise bulk left to fit,
so a later svd-mp round (prune → finetune → prune) truncates against the edge measured on the
dense weights. :func:`factor_svds` gives the exact SVD of a split layer's product in
O((M+N)·k²) and :func:`refactorize` builds the thinner replacement.

The modules are :func:`~rmtp.contract.saved_types.rebuildable` (ids ``lowrank.*``; the aliases are the import paths
folders of format 1–2 name them by), so a saved model reloads with them in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rmtp.contract.saved_types import rebuildable


@rebuildable("lowrank.linear", aliases=["rmtp.lowrank.LowRankLinear"])
class LowRankLinear(nn.Module):
    """``Linear(N → M)`` as ``first: Linear(N → k, no bias)`` then ``second: Linear(k → M, bias)``."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True,
                 edges: list[float] | None = None):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)
        self.mp_edges = _edges(edges, 1)

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def effective_shape(self) -> tuple[int, int]:
        return (self.second.out_features, self.first.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def rmtp_config(self) -> dict[str, Any]:
        return _with_edges({"in_features": self.first.in_features, "rank": self.rank,
                            "out_features": self.second.out_features, "bias": self.second.bias is not None},
                           self.mp_edges)

    def extra_repr(self) -> str:
        return f"{self.first.in_features} → {self.rank} → {self.second.out_features}"


@rebuildable("lowrank.conv2d", aliases=["rmtp.lowrank.LowRankConv2d"])
class LowRankConv2d(nn.Module):
    """``Conv2d(C_in → C_out, k_h×k_w)`` as a k-channel conv with the original kernel, then a 1×1 conv."""

    def __init__(self, in_channels: int, rank: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True, padding_mode: str = "zeros",
                 edges: list[float] | None = None):
        super().__init__()
        padding = padding if isinstance(padding, str) else tuple(padding)
        self.first = nn.Conv2d(in_channels, rank, tuple(kernel_size), stride=tuple(stride), padding=padding,
                               dilation=tuple(dilation), bias=False, padding_mode=padding_mode)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias)
        self.mp_edges = _edges(edges, 1)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    @property
    def effective_shape(self) -> tuple[int, ...]:
        return (self.second.out_channels, self.first.in_channels, *self.first.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def rmtp_config(self) -> dict[str, Any]:
        first = self.first
        return _with_edges({
            "in_channels": first.in_channels, "rank": self.rank, "out_channels": self.second.out_channels,
            "kernel_size": list(first.kernel_size), "stride": list(first.stride),
            "padding": first.padding if isinstance(first.padding, str) else list(first.padding),
            "dilation": list(first.dilation), "bias": self.second.bias is not None,
            "padding_mode": first.padding_mode}, self.mp_edges)


def factorize(module: nn.Linear | nn.Conv2d, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
              rank: int, edge: float | None = None) -> LowRankLinear | LowRankConv2d:
    """The low-rank replacement of ``module`` keeping the top ``rank`` singular triplets.

    ``u, s, vh`` are the SVD of the layer's 2-D weight (``out × in·k_h·k_w`` for a conv); ``edge``
    is its MP edge s₊, kept with the new module for a later round.
    """
    edges = None if edge is None else [edge]
    root = s[:rank].sqrt()
    second_w = (u[:, :rank] * root).to(module.weight.dtype)           # M × k
    first_w = (root[:, None] * vh[:rank]).to(module.weight.dtype)     # k × N
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        low = LowRankLinear(module.in_features, rank, module.out_features, bias=bias, edges=edges)
        low.first.weight.data.copy_(first_w)
        low.second.weight.data.copy_(second_w)
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"cannot factorize a grouped conv (groups={module.groups})")
        low = LowRankConv2d(module.in_channels, rank, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, bias=bias, padding_mode=module.padding_mode,
                            edges=edges)
        low.first.weight.data.copy_(first_w.reshape(rank, *module.weight.shape[1:]))
        low.second.weight.data.copy_(second_w.reshape(module.out_channels, rank, 1, 1))
    else:
        raise TypeError(f"cannot factorize {type(module).__name__}: only nn.Linear and nn.Conv2d")
    if bias:
        low.second.bias.data.copy_(module.bias.detach())
    return low.to(module.weight.device)


@rebuildable("lowrank.block_linear", aliases=["rmtp.lowrank.BlockLowRankLinear"])
class BlockLowRankLinear(nn.Module):
    """A fused projection (e.g. timm's qkv) whose output blocks each have their own rank.

    ``first`` stacks every block's right factor (N → Σkᵢ, one matmul); ``seconds[i]`` maps block
    i's kᵢ channels to its Mᵢ outputs; the outputs are concatenated. q, k and v have different
    spectra, so one rank for the fused 3D×D matrix would either keep noise in one block or cut
    signal in another.
    """

    def __init__(self, in_features: int, ranks: list[int], out_features: list[int], bias: bool = True,
                 edges: list[float] | None = None):
        super().__init__()
        if len(ranks) != len(out_features) or not ranks:
            raise ValueError("ranks and out_features must be non-empty lists of the same length")
        self.ranks = [int(k) for k in ranks]
        self.mp_edges = _edges(edges, len(ranks))
        self.first = nn.Linear(in_features, sum(self.ranks), bias=False)
        self.seconds = nn.ModuleList(nn.Linear(k, m, bias=bias) for k, m in zip(self.ranks, out_features))

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    @property
    def effective_shape(self) -> tuple[int, int]:
        return (sum(s.out_features for s in self.seconds), self.first.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flatten to 2-D first: the column blocks of a 2-D activation are strided views that
        # addmm takes as they are, where 3-D ones would be copied or sent through batched matmul.
        flat = self.first(x.reshape(-1, x.shape[-1]))
        blocks = flat.split(self.ranks, dim=-1)
        out = torch.cat([second(h) for second, h in zip(self.seconds, blocks)], dim=-1)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def rmtp_config(self) -> dict[str, Any]:
        return _with_edges({"in_features": self.first.in_features, "ranks": list(self.ranks),
                            "out_features": [s.out_features for s in self.seconds],
                            "bias": self.seconds[0].bias is not None}, self.mp_edges)

    def extra_repr(self) -> str:
        return f"{self.first.in_features} → {'+'.join(map(str, self.ranks))} → " \
               f"{'+'.join(str(s.out_features) for s in self.seconds)}"


def factorize_blocks(module: nn.Linear, blocks: list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, int]],
                     edges: list[float] | None = None) -> BlockLowRankLinear:
    """A :class:`BlockLowRankLinear` from per-block SVDs ``(rows, u, s, vh, rank)`` of ``module.weight``."""
    ranks = [rank for *_, rank in blocks]
    outs = [rows.stop - rows.start for rows, *_ in blocks]
    bias = module.bias is not None
    low = BlockLowRankLinear(module.in_features, ranks, outs, bias=bias, edges=edges).to(module.weight.device)
    firsts = []
    for (rows, u, s, vh, rank), second in zip(blocks, low.seconds):
        root = s[:rank].sqrt()
        firsts.append(root[:, None] * vh[:rank])
        second.weight.data.copy_((u[:, :rank] * root).to(module.weight.dtype))
        if bias:
            second.bias.data.copy_(module.bias.detach()[rows])
    low.first.weight.data.copy_(torch.cat(firsts).to(module.weight.dtype))
    return low


LOW_RANK_TYPES = (LowRankLinear, LowRankConv2d, BlockLowRankLinear)
LowRankModule = LowRankLinear | LowRankConv2d | BlockLowRankLinear


def _edges(edges: list[float] | None, count: int) -> list[float] | None:
    if edges is None:
        return None
    edges = [float(e) for e in edges]
    if len(edges) != count:
        raise ValueError(f"edges: expected {count} value(s), one per block, got {len(edges)}")
    return edges


def _with_edges(config: dict[str, Any], edges: list[float] | None) -> dict[str, Any]:
    """The config, with ``edges`` only when known (configs of models saved without them stay as they were)."""
    return config if edges is None else {**config, "edges": list(edges)}


def product_svd(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``(u, s, vh)`` of ``second @ first`` (M×k times k×N) without forming it.

    With second = Q_b·R_b and firstᵀ = Q_a·R_a, the product is Q_b·(R_b·R_aᵀ)·Q_aᵀ, so the SVD of
    the k×k core gives the product's: O((M+N)·k²) instead of O(M·N·min(M,N)).
    """
    q_second, r_second = torch.linalg.qr(second)
    q_first, r_first = torch.linalg.qr(first.T)
    u_core, s, vh_core = torch.linalg.svd(r_second @ r_first.T)
    return q_second @ u_core, s, vh_core @ q_first.T


def factor_svds(module: LowRankModule) -> list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(rows, u, s, vh)`` per block of a split layer's effective matrix, in float64 on the CPU."""
    def matrix(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64)

    if isinstance(module, BlockLowRankLinear):
        parts, start = [], 0
        for first, second in zip(matrix(module.first.weight).split(module.ranks), module.seconds):
            rows = slice(start, start + second.out_features)
            parts.append((rows, *product_svd(first, matrix(second.weight))))
            start = rows.stop
        return parts
    out = module.effective_shape[0]
    return [(slice(0, out), *product_svd(matrix(module.first.weight), matrix(module.second.weight)))]


def refactorize(module: LowRankModule, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]
                ) -> LowRankModule:
    """A thinner module of the same type keeping the top ``rank`` triplets ``(u, s, vh, rank)`` per block.

    ``parts`` come from :func:`factor_svds`; biases and the recorded edges carry over.
    """
    ranks = [rank for *_, rank in parts]
    config = module.rmtp_config()
    if isinstance(module, BlockLowRankLinear):
        config["ranks"] = ranks
    else:
        config["rank"] = ranks[0]
    reference = module.first.weight
    new = type(module)(**config).to(device=reference.device, dtype=reference.dtype)
    firsts, seconds = [], []
    for u, s, vh, rank in parts:
        root = s[:rank].sqrt()
        firsts.append(root[:, None] * vh[:rank])
        seconds.append(u[:, :rank] * root)
    with torch.no_grad():
        new.first.weight.copy_(torch.cat(firsts).reshape(new.first.weight.shape))
        old_seconds = module.seconds if isinstance(module, BlockLowRankLinear) else [module.second]
        new_seconds = new.seconds if isinstance(new, BlockLowRankLinear) else [new.second]
        for weight, old, fresh in zip(seconds, old_seconds, new_seconds):
            fresh.weight.copy_(weight.reshape(fresh.weight.shape))
            if old.bias is not None:
                fresh.bias.copy_(old.bias)
    return new
