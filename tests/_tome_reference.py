"""facebookresearch/ToMe's timm patch, transcribed: the oracle for rmtp's ``tome`` (tests) and its
side-by-side row in ``benchmarks/token_speed.py``. Not part of rmtp.

Transcribed from https://github.com/facebookresearch/ToMe at commit
af95e4b1befa172dadccd8c81e223b10090f9579 (2023-03-30; the files below last changed in 049a705,
2022-12-07):

* ``tome/merge.py``: ``bipartite_soft_matching`` (its ``merge``; ``unmerge`` is not used by the
  timm patch), ``merge_wavg``, ``merge_source``;
* ``tome/patch/timm.py``: ``ToMeBlock``, ``ToMeAttention``, ``make_tome_class``, ``apply_patch``
  (ToMe subclasses the model's own class, so timm's distilled DeiT keeps its two heads);
* ``tome/utils.py``: ``parse_r``;
* ``tome/patch/mae.py``: the proportional (size-weighted) global average pool, used here for
  ``global_pool='avg'`` models (ToMe's timm patch leaves timm's unweighted pool).

The operations and their order are ToMe's. Adaptations to today's timm, each a no-op on a model
without the feature (identity modules): ``q_norm`` / ``k_norm`` after the qkv split (where timm
applies them) and LayerScale ``ls1`` / ``ls2`` around attention and MLP (ToMe's 2022 source predates
both in timm's ``Attention`` / ``Block``); the prefix slice of the average pool is
``num_prefix_tokens`` instead of MAE's fixed ``1:``. ``distill_token`` can be forced, so that a
timm ViT with one register token ([CLS, reg, patches], DeiT's distilled layout) runs ToMe's own
distillation-token branch. Other timm features (scale-norm, gates, fused attention) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

REPO = "facebookresearch/ToMe"
COMMIT = "af95e4b1befa172dadccd8c81e223b10090f9579"


# ----------------------------------------------------------------------------- tome/utils.py


def parse_r(num_layers: int, r: list[int] | tuple[int, float] | int) -> list[int]:
    """ToMe's constant r, (r, inflection) schedule or explicit list → one r per layer."""
    inflect = 0.0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


# ----------------------------------------------------------------------------- tome/merge.py


def do_nothing(x: Tensor, mode: str | None = None) -> Tensor:
    return x


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False,
                            distill_token: bool = False) -> Callable[..., Tensor]:
    """ToMe's balanced matching: A = even, B = odd positions of *all* tokens; the class token (A[0])
    is never a source, the distillation token (B[0]) never a destination. Returns ``merge``."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return do_nothing

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # unmerged tokens
        src_idx = edge_idx[..., :r, :]  # merged tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # keeps the class token at the start

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable[..., Tensor], x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average: merge ``x·size`` and ``size`` by sum, divide."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Callable[..., Tensor], x: Tensor, source: Tensor | None = None) -> Tensor:
    """Adjacency between the initial tokens and the merged groups (for visualisation)."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


# ----------------------------------------------------------------------------- tome/patch/timm.py


class ToMeBlock(Block):
    """ToMe between attention and MLP; sizes (and sources) travel in the shared ``_tome_info``."""

    _tome_info: dict[str, Any]

    def forward(self, x: Tensor) -> Tensor:
        info = self._tome_info
        attn_size = info["size"] if info["prop_attn"] else None
        x_attn, metric = self.attn(self.norm1(x), attn_size)
        x = x + self.drop_path1(self.ls1(x_attn))  # ls1: timm LayerScale (identity without init_values)

        r = info["r"].pop(0)
        if r > 0:
            merge = bipartite_soft_matching(metric, r, info["class_token"], info["distill_token"])
            if info["trace_source"]:
                info["source"] = merge_source(merge, x, info["source"])
            x, info["size"] = merge_wavg(merge, x, info["size"])

        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToMeAttention(Attention):
    """Explicit attention with proportional attention; also returns the keys averaged over heads."""

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = self.q_norm(q), self.k_norm(k)  # timm qk-norm (identity without qk_norm)

        attn = (q @ k.transpose(-2, -1)) * self.scale
        if size is not None:  # proportional attention
            attn = attn + size.log()[:, None, None, :, 0]
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)

        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x, k.mean(1)


def make_tome_class(transformer_class: type[VisionTransformer]) -> type[VisionTransformer]:
    """ToMe's ``make_tome_class``: the model's own class with r, sizes and sources reset per forward;
    plus avg pooling proportional to size (tome/patch/mae.py)."""

    class ToMeVisionTransformer(transformer_class):
        r: Any
        _tome_info: dict[str, Any]

        def forward(self, *args: Any, **kwargs: Any) -> Tensor:
            self._tome_info["r"] = parse_r(len(self.blocks), self.r)
            self._tome_info["size"] = None
            self._tome_info["source"] = None
            return super().forward(*args, **kwargs)

        def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
            size = self._tome_info["size"]
            if self.global_pool != "avg" or size is None:
                return super().forward_head(x, pre_logits)
            npt = self.num_prefix_tokens  # MAE: x[:, 1:] (one class token)
            x = (x * size)[:, npt:, :].sum(dim=1) / self.patch_embed.num_patches
            x = self.head_drop(self.fc_norm(x))
            return x if pre_logits else self.head(x)

    return ToMeVisionTransformer


def apply_patch(model: VisionTransformer, r: Any, *, trace_source: bool = False, prop_attn: bool = True,
                distill_token: bool | None = None) -> VisionTransformer:
    """ToMe's ``apply_patch`` (then ``model.r = r``). ``distill_token=None``: ToMe's own rule
    (``model.dist_token`` exists); True makes the token after the class token the protected
    distillation token, as for DeiT."""
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise TypeError(f"the reference patches timm's plain or distilled ViT, not {type(model).__qualname__}")
    for block in model.blocks:
        attn = block.attn
        if type(block) is not Block or type(attn) is not Attention:
            raise TypeError("the reference knows timm's plain Block and Attention only")
        if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise TypeError("the reference has no scale-norm or gated attention (ToMe's source predates both)")
    if model.global_pool not in ("token", "avg"):
        raise TypeError(f"the reference pools 'token' or 'avg', not {model.global_pool!r}")
    if distill_token is None:
        distill_token = getattr(model, "dist_token", None) is not None
    model.__class__ = make_tome_class(model.__class__)
    model.r = r
    model._tome_info = {"r": model.r, "size": None, "source": None, "trace_source": trace_source,
                        "prop_attn": prop_attn, "class_token": model.cls_token is not None,
                        "distill_token": distill_token}
    for module in model.modules():
        if isinstance(module, Block):
            module.__class__ = ToMeBlock
            module._tome_info = model._tome_info
        elif isinstance(module, Attention):
            module.__class__ = ToMeAttention
    return model
