"""The tensor math of token reduction: scores, pruning with optional fusion, bipartite merging.

All functions work on whole batches with one static output length, per image (every image
chooses its own tokens from its own scores; nothing is averaged over the batch). Sequences are
``(B, N, C)`` with the ``npt`` prefix tokens (class, registers) first; prefix tokens are split
off before any selection (merging: left out of the matching) and put back in front unchanged, so
they are never dropped or merged, and pooling still finds the class token at index 0.

Besides the tokens, two optional per-token tensors travel with the sequence:

* ``size`` ``(B, N, 1)``: how many original patches a token stands for (``None`` while every
  token is one patch). Merged tokens are size-weighted means; proportional attention adds
  ``log(size)`` to the attention logits; average pooling is size-weighted.
* ``source`` ``(B, N, N_0)``: which original tokens a token covers (``None`` unless tracing, for
  visualisation). Rows of dropped tokens disappear; merged or fused rows are unions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rmtp_plugins.tokens.plan import ABSets


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``(B, k)`` of ``t`` ``(B, n, c)``."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def descending_order(scores: Tensor) -> Tensor:
    """Indices that sort ``scores`` ``(B, n)`` in descending order, ties to the lower index.

    A stable descending sort. ONNX has no stable Sort (torch's exporters cannot translate
    ``sort(stable=True)``), so while exporting to ONNX this is a TopK over all ``n``: ONNX
    specifies that TopK puts the lower index first among equal values, exactly the stable order,
    and onnxruntime does so. Eager and ``torch.export`` keep ``torch.sort(stable=True)``.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.topk(scores, scores.shape[-1], dim=-1, largest=True, sorted=True).indices
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _ones(x: Tensor) -> Tensor:
    return x.new_ones(x.shape[0], x.shape[1], 1)


# --------------------------------------------------------------------------------------- scores


def prefix_attention(q: Tensor, k: Tensor, scale: float, rows: int, bias: Tensor | None = None) -> Tensor:
    """Attention from the first ``rows`` queries to every key, averaged over heads and those rows.

    ``q``, ``k``: ``(B, H, N, d)``. Computes only ``softmax(q[:rows]·Kᵀ·scale + bias)``, ``rows/N``
    of the full QKᵀ, so it can run next to a fused attention kernel that never materialises the
    attention matrix. Returns ``(B, N)`` (prefix keys included).
    """
    logits = (q[:, :, :rows] * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def received_attention(probs: Tensor, npt: int) -> Tensor:
    """Mean attention each patch receives from the *other* patches (prefix queries and keys, and
    each patch's attention to itself, excluded), averaged over heads and queries.

    ``probs``: explicit attention ``(B, H, N, N)``. Returns ``(B, N − npt)``.
    """
    patches = probs[:, :, npt:, npt:].mean(dim=1)  # (B, n, n): query i → key j
    n = patches.shape[-1]
    received = patches.sum(dim=1) - patches.diagonal(dim1=1, dim2=2)
    return received / max(n - 1, 1)


# -------------------------------------------------------------------------------------- pruning


def _with_prefix(index: Tensor, npt: int) -> Tensor:
    """Patch indices ``(B, k)`` → sequence positions ``(B, npt + k)`` with the prefix positions first."""
    prefix = torch.arange(npt, device=index.device).expand(index.shape[0], npt)
    return torch.cat([prefix, index + npt], dim=1)


def prune_tokens(x: Tensor, scores: Tensor, n_keep: int, npt: int, *, fuse: bool = False,
                 size: Tensor | None = None, source: Tensor | None = None
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Keep the ``n_keep`` patch tokens of highest ``scores`` ``(B, n)``, per image.

    Kept tokens stay in their original order. With ``fuse`` (EViT), the top ``n_keep − 1`` are
    kept and the rest are fused into one token appended last: their mean weighted by their scores
    (EViT sums ``Σ aᵢxᵢ`` unnormalised; normalising keeps the fused token on the scale of the
    others, which a model that never trained with fusion needs). The fused token's size is the
    sum of the sizes it absorbed, so average pooling and later merges weigh it correctly.
    Returns ``(x, size, source)`` with ``N = npt + n_keep`` tokens.
    """
    n = x.shape[1] - npt
    n_top = n_keep - 1 if fuse else n_keep
    order = descending_order(scores)
    keep_pos = _with_prefix(order[:, :n_top].sort(dim=-1).values, npt)
    if not (fuse and n_top < n):
        return (_gather(x, keep_pos), _gather(size, keep_pos) if size is not None else None,
                _gather(source, keep_pos) if source is not None else None)
    drop_idx = order[:, n_top:]
    drop_pos = drop_idx + npt
    weights = scores.gather(1, drop_idx).unsqueeze(-1).to(x.dtype)  # (B, n - n_top, 1)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    fused = (_gather(x, drop_pos) * weights).sum(dim=1, keepdim=True)
    out = torch.cat([_gather(x, keep_pos), fused], dim=1)
    size = _ones(x) if size is None else size
    new_size = torch.cat([_gather(size, keep_pos), _gather(size, drop_pos).sum(dim=1, keepdim=True)], dim=1)
    new_source = None
    if source is not None:
        new_source = torch.cat([_gather(source, keep_pos), _gather(source, drop_pos).amax(dim=1, keepdim=True)],
                               dim=1)
    return out, new_size, new_source


# -------------------------------------------------------------------------------------- merging


def ab_starts(npt: int, sets: ABSets = "sequence") -> tuple[int, int]:
    """Sequence positions of the first *patch* token in set A and in set B.

    A and B take every other position from there. With ``sequence``, A is the even positions and B
    the odd ones of the whole sequence, so with a class token A = {CLS, p1, p3, …} and B = {p0, p2,
    …}, exactly ToMe's split; prefix tokens that fall in A are never sources and those in B never
    destinations, so they are simply left out of the matching.
    """
    if sets == "patches":
        return npt, npt + 1
    return npt + npt % 2, npt + 1 - npt % 2


def bipartite_matching(metric: Tensor, r: int, a_start: int, b_start: int, *, ordered: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching on ``metric`` ``(B, N, d)``, between the patch tokens of set A
    (positions ``a_start, a_start + 2, …``) and of set B (``b_start, b_start + 2, …``).

    Each A token's edge goes to its most similar B token (cosine similarity); the ``r`` A tokens
    with the strongest edges merge into their B partners. Edges are sorted stably, so ties go to the
    lower position (ToMe's ``argsort`` leaves them unspecified). Returns ``(unmerged A indices
    (B, |A|−r), merged A indices (B, r), their B destinations (B, r))``, indices into A's and B's
    patch tokens. Unmerged A tokens are in ascending order when ``ordered``; otherwise in order of
    descending edge, which is what ToMe leaves when there is no class token (it sorts only to keep
    the class token first). The matching is discrete, so it runs without autograd, as in ToMe.
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, a_start::2] @ metric[:, b_start::2].transpose(-1, -2)
        best, partner = similarity.max(dim=-1)
        order = descending_order(best)
        src_idx = order[:, :r]
        unmerged_idx = order[:, r:]
        if ordered:
            unmerged_idx = unmerged_idx.sort(dim=-1).values
        dst_idx = partner.gather(1, src_idx)
    return unmerged_idx, src_idx, dst_idx


def merge_tokens(x: Tensor, metric: Tensor, r: int, npt: int, *, size: Tensor | None = None,
                 source: Tensor | None = None, sets: ABSets = "sequence") -> tuple[Tensor, Tensor, Tensor | None]:
    """Merge ``r`` patch tokens into others by bipartite soft matching on ``metric`` ``(B, N, d)``.

    The sets are :func:`ab_starts`'s; prefix tokens are never sources, destinations or moved.
    Output order, ToMe's ``cat([unm, dst])``: prefix tokens (in their order), the A patch tokens
    left alone (ascending, or as :func:`bipartite_matching` leaves them without prefix tokens),
    then every B patch token, each the size-weighted mean ``Σ sᵢxᵢ / Σ sᵢ`` of itself and the A
    tokens merged into it (ToMe's ``merge_wavg``); sizes add up. Computed as one gather of the kept
    rows, one per-row rescale and a scatter-add of the ``r`` merged rows, so the full sequence is
    copied twice, not once per step. ``r`` must not exceed the A patch tokens (the schedule caps it
    at ⌊n/2⌋, which never does). Returns ``(x, size, source)`` with ``N − r`` tokens.
    """
    B, N, C = x.shape
    a_start, b_start = ab_starts(npt, sets)
    kept_a = len(range(a_start, N, 2)) - r
    unmerged_idx, src_idx, dst_idx = bipartite_matching(metric, r, a_start, b_start,
                                                        ordered=npt > 0 or sets == "patches")
    b_pos = torch.arange(b_start, N, 2, device=x.device).expand(B, -1)
    keep_pos = torch.cat([a_start + 2 * unmerged_idx, b_pos], dim=1)  # (B, N - r - npt)
    if npt:  # no empty prefix block: with one, the ONNX graph's shapes broke (onnxruntime: Incompatible dimensions)
        keep_pos = torch.cat([torch.arange(npt, device=x.device).expand(B, -1), keep_pos], dim=1)
    src_pos = a_start + 2 * src_idx
    dst_out = (npt + kept_a + dst_idx).unsqueeze(-1)  # where each merged A token lands, (B, r, 1)
    size = _ones(x) if size is None else size
    kept_size = _gather(size, keep_pos)
    src_size = _gather(size, src_pos)
    new_size = kept_size.scatter_add(1, dst_out, src_size)
    out = _gather(x, keep_pos) * (kept_size / new_size)
    out.scatter_add_(1, dst_out.expand(-1, -1, C), _gather(x, src_pos) * (src_size / new_size.gather(1, dst_out)))
    new_source = None
    if source is not None:
        new_source = _gather(source, keep_pos).scatter_reduce_(
            1, dst_out.expand(-1, -1, source.shape[-1]), _gather(source, src_pos), reduce="amax")
    return out, new_size, new_source
