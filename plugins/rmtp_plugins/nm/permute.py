"""Input-channel permutations for N:M masks: the search, and applying it without changing the function.

**Why.** An N:M mask keeps n of every m *consecutive* input weights of a row. If the important
inputs of a layer sit next to each other, they compete for the same n slots; reordering the input
channels spreads them over different groups, so the mask keeps more of what matters.

**Search** (:func:`search_permutation`, after Pool & Yu, "Channel Permutations for N:M Sparsity",
NeurIPS 2021). Objective: the retained energy ``Σ_rows Σ_groups top-n(E[row, group])`` of an energy
matrix E (rows × C; the squared scores, one column per input channel). Start from the better of the
identity and a "striped" order (channels sorted by column energy, dealt round-robin to the groups
so each group gets one of the strongest); then greedy swaps: for every pair of groups the best
exchange of one channel each is kept in a table, the best swap overall is applied while it gains,
and only the two touched groups' table entries are recomputed. ``blocks`` restricts swaps to
channels of the same block (attention heads, see below). At most ``max_swaps`` swaps.

**Applying it** (:func:`apply_permutation`): the consumer's weight columns become ``W[:, π]`` and its
input must become ``x[π]``:

* *real* — where the input is produced by one layer through channel-wise modules only, that
  producer's output rows are permuted (``P[π]``, ``b[π]``) together with the per-channel parameters
  and buffers in between; no run-time cost. Where that holds is the architecture's
  :class:`~rmtp.contract.architecture.Coupling` list: MLP ``fc2`` ← ``fc1`` (ViT, ConvNeXt: act, dropout,
  norm/GRN in between); attention ``proj`` ← the v rows of ``qkv`` (``group`` = head_dim:
  permutations stay inside each head, which keeps every head's attention intact); ResNet
  ``conv2`` ← ``conv1`` and ``conv3`` ← ``conv2`` (BatchNorm, activation, DropBlock in between).
* *index* — otherwise (qkv, fc1, a block's first conv: their input is the residual stream) the
  layer is wrapped in :class:`PermutedInput`, which gathers ``x[..., π]`` before the layer and holds
  π as a buffer, so the permutation is in the state dict and survives save/load (the wrapper is
  ``@rebuildable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rmtp.contract.architecture import Coupling
from rmtp.contract.saved_types import rebuildable

#: Modules that act on every channel alike and hold no per-channel state: safe between producer and consumer.
_ELEMENTWISE = {"Identity", "Dropout", "DropBlock2d", "DropPath", "GELU", "GELUTanh", "QuickGELU", "ReLU", "ReLU6",
                "SiLU", "Swish", "Tanh", "Sigmoid", "Hardswish", "HardSwish", "Mish", "LeakyReLU", "ELU"}
#: Channel-wise modules whose 1-D per-channel parameters/buffers are permuted along.
_PER_CHANNEL = {"BatchNorm2d", "BatchNormAct2d", "LayerNorm", "LayerNorm2d", "GlobalResponseNorm"}


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


def retained_energy(energy: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """``Σ top-n`` over every group of ``m`` consecutive columns of ``energy[:, perm]``."""
    grouped = energy[:, perm].reshape(energy.shape[0], -1, m)
    return float(grouped.topk(n, dim=-1).values.sum())


def _striped(energy: torch.Tensor, m: int, blocks: torch.Tensor | None) -> torch.Tensor:
    """Channels by decreasing column energy, dealt round-robin to the groups (within each block)."""
    c = energy.shape[1]
    strength = energy.sum(0)
    if blocks is None:
        order = torch.sort(strength, descending=True, stable=True).indices
        groups = c // m
        # rank k goes to group k mod G, slot k div G
        position = (torch.arange(c) % groups) * m + torch.arange(c) // groups
        perm = torch.empty(c, dtype=torch.long)
        perm[position] = order
        return perm
    perm = torch.arange(c)
    for b in blocks.unique():
        members = (blocks == b).nonzero().flatten()  # contiguous positions of this block
        size = members.numel()
        order = members[torch.sort(strength[members], descending=True, stable=True).indices]
        if size % m:
            perm[members] = order
            continue
        groups = size // m
        position = (torch.arange(size) % groups) * m + torch.arange(size) // groups
        perm[members[position]] = order
    return perm


def _leave_one_out(groups: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every group (…, R, m) and every slot i: ``T`` = sum of the n−1 largest values left when
    slot i is taken out, and ``v`` = the n-th largest value left. Inserting a value x into slot i then
    retains ``T + max(x, v)``: the top n of the new group always contain the n−1 largest left."""
    s, order = torch.sort(groups, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(groups.shape[-1], device=groups.device).expand_as(order))
    top_n = s[..., :n].sum(-1, keepdim=True)
    top_n1 = s[..., :n - 1].sum(-1, keepdim=True)
    inside = rank <= n - 1
    t = torch.where(inside, top_n - groups, top_n1)
    v = torch.where(inside, s[..., n:n + 1], s[..., n - 1:n])
    return t, v


def _pair_gains(values: torch.Tensor, t: torch.Tensor, v: torch.Tensor, retained: torch.Tensor,
                chans: torch.Tensor, pairs: torch.Tensor, block_of: torch.Tensor | None,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best swap gain and its flat index (i·m + j) for each pair of groups ``(g1, g2)``: channel i of
    g1 exchanged with channel j of g2. ``values``/``t``/``v`` are (G, R, m), ``retained`` (G,),
    ``chans`` (G, m) the channels in each group."""
    gains, where = [], []
    for start in range(0, pairs.shape[0], chunk):
        p = pairs[start:start + chunk]
        x, y = p[:, 0], p[:, 1]
        a, b = values[x], values[y]  # (P, R, m)
        new = (t[x].sum(1)[:, :, None] + t[y].sum(1)[:, None, :]
               + torch.maximum(b[:, :, None, :], v[x][:, :, :, None]).sum(1)
               + torch.maximum(a[:, :, :, None], v[y][:, :, None, :]).sum(1))  # (P, i, j)
        gain = new - (retained[x] + retained[y])[:, None, None]
        if block_of is not None:
            same = block_of[chans[x]][:, :, None] == block_of[chans[y]][:, None, :]
            gain = gain.masked_fill(~same, -torch.inf)
        best, idx = gain.reshape(gain.shape[0], -1).max(dim=1)
        gains.append(best)
        where.append(idx)
    return torch.cat(gains), torch.cat(where)


def search_permutation(energy: torch.Tensor, n: int, m: int, *, blocks: int | None = None,
                       max_swaps: int | None = None) -> torch.Tensor:
    """A permutation π of the C columns of ``energy`` (rows × C, non-negative) that raises the
    N:M retained energy of ``energy[:, π]``; never lower than the identity's.

    ``blocks``: channels may only move within consecutive blocks of this size (heads). At most
    ``max_swaps`` swaps (default C). Returns a LongTensor on the CPU.
    """
    energy = energy.detach().float().cpu()
    energy = energy / energy.max().clamp(min=1e-30)  # scale-free float32 arithmetic
    rows, c = energy.shape
    if c % m:
        raise ValueError(f"{c} channels are not a multiple of m={m}")
    groups = c // m
    block_of = None if blocks is None else torch.arange(c) // blocks
    identity = torch.arange(c)
    if groups < 2:
        return identity
    striped = _striped(energy, m, block_of)
    perm = striped if retained_energy(energy, striped, n, m) > retained_energy(energy, identity, n, m) else identity
    max_swaps = c if max_swaps is None else max_swaps
    chans = perm.reshape(groups, m).clone()
    values = energy[:, chans].permute(1, 0, 2).contiguous()  # (G, R, m)
    t, v = _leave_one_out(values, n)
    retained = values.topk(n, dim=-1).values.sum((-1, -2))
    g1, g2 = torch.triu_indices(groups, groups, offset=1)
    pairs = torch.stack([g1, g2], dim=1)
    chunk = max(1, 2_000_000 // max(1, rows * m * m))
    table = torch.full((groups, groups), -torch.inf)
    choice = torch.zeros((groups, groups), dtype=torch.long)
    gains, idx = _pair_gains(values, t, v, retained, chans, pairs, block_of, chunk)
    table[pairs[:, 0], pairs[:, 1]] = gains
    choice[pairs[:, 0], pairs[:, 1]] = idx
    tolerance = 1e-6 * float(retained.sum())  # float32 rounding of a pair's retained energy stays below
    for _ in range(max_swaps):
        best = int(table.argmax())
        x, y = divmod(best, groups)
        if not float(table[x, y]) > tolerance:
            break
        i, j = divmod(int(choice[x, y]), m)
        chans[x, i], chans[y, j] = int(chans[y, j]), int(chans[x, i])
        touched = torch.tensor([x, y])
        values[touched] = energy[:, chans[touched]].permute(1, 0, 2)
        t[touched], v[touched] = _leave_one_out(values[touched], n)
        retained[touched] = values[touched].topk(n, dim=-1).values.sum((-1, -2))
        redo = pairs[torch.isin(pairs[:, 0], touched) | torch.isin(pairs[:, 1], touched)]
        gains, idx = _pair_gains(values, t, v, retained, chans, redo, block_of, chunk)
        table[redo[:, 0], redo[:, 1]] = gains
        choice[redo[:, 0], redo[:, 1]] = idx
    return chans.reshape(-1)


# --------------------------------------------------------------------------------------------
# The saved-index wrapper
# --------------------------------------------------------------------------------------------


def _layer_config(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, nn.Linear):
        return {"type": "linear", "in_features": layer.in_features, "out_features": layer.out_features,
                "bias": layer.bias is not None}
    if isinstance(layer, nn.Conv2d):
        padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
        return {"type": "conv2d", "in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "padding": padding,
                "dilation": list(layer.dilation), "groups": layer.groups, "bias": layer.bias is not None,
                "padding_mode": layer.padding_mode}
    raise TypeError(f"PermutedInput wraps nn.Linear or nn.Conv2d, not {type(layer).__name__}")


def _build_layer(config: dict[str, Any]) -> nn.Module:
    """An empty Linear/Conv2d from a :func:`_layer_config` dict (which comes from a saved file)."""
    if not isinstance(config, dict):
        raise TypeError("PermutedInput: 'layer' must be an object")
    kind = config.get("type")
    args = {k: v for k, v in config.items() if k != "type"}
    if kind == "linear" and set(args) == {"in_features", "out_features", "bias"}:
        return nn.Linear(int(args["in_features"]), int(args["out_features"]), bias=bool(args["bias"]))
    conv_keys = {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                 "padding_mode"}
    if kind == "conv2d" and set(args) == conv_keys:
        padding = args["padding"] if isinstance(args["padding"], str) else tuple(int(p) for p in args["padding"])
        return nn.Conv2d(int(args["in_channels"]), int(args["out_channels"]),
                         tuple(int(k) for k in args["kernel_size"]), stride=tuple(int(s) for s in args["stride"]),
                         padding=padding, dilation=tuple(int(d) for d in args["dilation"]),
                         groups=int(args["groups"]), bias=bool(args["bias"]), padding_mode=str(args["padding_mode"]))
    raise ValueError(f"PermutedInput: unsupported layer config {config!r}")


@rebuildable("nm.permuted_input", aliases=["rmtp_plugins._nm_permute.PermutedInput"])
class PermutedInput(nn.Module):
    """``layer(x[..., π])`` (Linear) or ``layer(x[:, π])`` (Conv2d): a layer whose input channels were
    permuted for its N:M mask. π is the persistent buffer ``input_perm``, so it is saved with the
    weights; the wrapped layer is ``.layer`` (its weight holds the mask as exact zeros)."""

    def __init__(self, layer: dict[str, Any]):
        super().__init__()
        self.layer = _build_layer(layer)
        channels = self.layer.in_features if isinstance(self.layer, nn.Linear) else self.layer.in_channels
        self.register_buffer("input_perm", torch.arange(channels))

    @classmethod
    def wrap(cls, layer: nn.Module, perm: torch.Tensor) -> PermutedInput:
        """Wrap an existing layer (its parameters are reused) with permutation ``perm``."""
        wrapper = cls(_layer_config(layer))
        wrapper.layer = layer
        wrapper.input_perm = perm.to(device=layer.weight.device, dtype=torch.long).clone()
        return wrapper

    def rmtp_config(self) -> dict[str, Any]:
        return {"layer": _layer_config(self.layer)}

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = -1 if isinstance(self.layer, nn.Linear) else 1
        return self.layer(x.index_select(dim, self.input_perm))


def plain(module: nn.Module) -> nn.Module:
    """The Linear/Conv2d inside a :class:`PermutedInput` (or the module itself)."""
    return module.layer if isinstance(module, PermutedInput) else module


# --------------------------------------------------------------------------------------------
# Real permutations: who produces a layer's input
# --------------------------------------------------------------------------------------------


@dataclass
class Absorber:
    """A producer that can take a consumer's input permutation on its output rows."""

    producer: str
    rows: slice | None = None  # the producer's output rows feeding the consumer (None: all)
    channelwise: list[nn.Module] = field(default_factory=list)
    blocks: int | None = None  # permutation must stay within blocks of this many channels
    what: str = ""


def _between_ok(modules: list[nn.Module], channels: int) -> list[nn.Module] | None:
    """The per-channel modules among ``modules`` if every one is channel-wise (else ``None``)."""
    per_channel = []
    for module in modules:
        name = type(module).__name__
        if name in _ELEMENTWISE and not list(module.parameters()) and not [
                b for b in module.buffers() if b.numel() > 1]:
            continue
        if name in _PER_CHANNEL and all(t.ndim == 0 or (t.ndim == 1 and t.numel() == channels)
                                        for t in [*module.parameters(), *module.buffers()]):
            per_channel.append(module)
            continue
        return None
    return per_channel


def _width(layer: nn.Module, *, inputs: bool) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features if inputs else layer.out_features
    return layer.in_channels if inputs else layer.out_channels


def find_absorber(model: nn.Module, name: str, couplings: Sequence[Coupling]) -> Absorber | None:
    """The layer whose output rows can absorb ``name``'s input permutation, or ``None``.

    Only the producer of a coupling the architecture declares for ``name`` (see
    :meth:`rmtp.contract.architecture.Architecture.couplings`) can, and only when it is a plain Linear or
    dense conv whose rows match ``name``'s inputs one for one and every module in between acts
    channel-wise (its per-channel parameters are permuted along).
    """
    coupling = next((c for c in couplings if c.consumer == name), None)
    if coupling is None:
        return None
    consumer = plain(model.get_submodule(name))
    producer = plain(model.get_submodule(coupling.producer))
    if not isinstance(producer, (nn.Linear, nn.Conv2d)) or isinstance(producer, nn.Conv2d) and producer.groups != 1:
        return None
    channels, out = _width(consumer, inputs=True), _width(producer, inputs=False)
    rows = coupling.rows
    if rows is None and out != channels or rows is not None and (len(range(out)[rows]) != channels):
        return None
    per_channel = _between_ok([model.get_submodule(p) for p in coupling.between], channels)
    if per_channel is None:
        return None
    if coupling.kind == "heads":
        what = "v rows (within heads)"
    else:
        what = " + ".join([f"{_leaf(coupling.producer)} rows", *(_leaf(n) for n in coupling.norms)])
    return Absorber(coupling.producer, rows=rows, channelwise=per_channel,
                    blocks=coupling.group if coupling.group > 1 else None, what=what)


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------------------------
# Applying a permutation
# --------------------------------------------------------------------------------------------


def _permute_rows(tensor: torch.Tensor, perm: torch.Tensor, rows: slice | None) -> None:
    with torch.no_grad():
        if rows is None:
            tensor.copy_(tensor[perm.to(tensor.device)])
        else:
            part = tensor[rows]
            part.copy_(part[perm.to(tensor.device)])


def apply_permutation(model: nn.Module, name: str, perm: torch.Tensor, absorber: Absorber | None, *,
                      allow_index: bool = True) -> str | None:
    """Permute the input channels of layer ``name`` by ``perm`` (new channel p is old ``perm[p]``)
    without changing the model's function. Returns ``"real"``, ``"index"`` or ``None`` (not applied:
    no absorber and ``allow_index`` false)."""
    module = model.get_submodule(name)
    layer = plain(module)
    if absorber is None and not allow_index:
        return None
    perm = perm.to(layer.weight.device)
    with torch.no_grad():
        layer.weight.copy_(layer.weight[:, perm])
    if absorber is not None:
        producer = plain(model.get_submodule(absorber.producer))
        _permute_rows(producer.weight, perm, absorber.rows)
        if producer.bias is not None:
            _permute_rows(producer.bias, perm, absorber.rows)
        for between in absorber.channelwise:
            for tensor in [*between.parameters(recurse=False), *between.buffers(recurse=False)]:
                if tensor.ndim == 1:
                    _permute_rows(tensor, perm, None)
        return "real"
    if isinstance(module, PermutedInput):  # compose: new input is old_input[old_perm][perm]
        module.input_perm = module.input_perm[perm]
    else:
        model.set_submodule(name, PermutedInput.wrap(layer, perm))
    return "index"
