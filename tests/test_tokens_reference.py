"""Token reduction against references: the merge/prune math on small inputs against Python loops;
whole patched forward passes against a reference forward built from timm's own modules (attention
with an additive ``attn_mask`` for proportional attention) plus per-image loops for the reduction,
on LayerScale, qk-norm, register-token, avg-pool, scale-norm, gated and explicit-attention ViTs;
and ``tome`` against facebookresearch/ToMe's own timm patch, transcribed in ``_tome_reference``."""

from __future__ import annotations

import copy

import _tome_reference as tome_ref
import pytest
import timm
import torch
from conftest import TINY_VIT
from torch import Tensor

from rmtp.contract.saved_types import apply_patch
from rmtp_plugins.tokens.merge import ABSets, merge_tokens, prefix_attention, prune_tokens, received_attention
from rmtp_plugins.tokens.patch import TokenPlan, TokenReduction, trace_sources
from rmtp_plugins.tokens.schedule import merged_count, pruned_count, tome_r_list
from rmtp_plugins.tokens.tome import TomeParams, TomePruner

ATOL = 1e-5


# --------------------------------------------------------------------------- brute-force references


def brute_merge(x: Tensor, keys: Tensor, size: Tensor, r: int, npt: int, sets: ABSets = "sequence"
                ) -> tuple[Tensor, Tensor]:
    """ToMe on one image ``x`` (N, C), by loops. ``sequence``: A = the patches at even positions of
    the whole sequence, B = those at odd ones (prefix tokens take part in neither); ``patches``: A =
    even, B = odd among the patches. Each A token's best B by cosine similarity; the r strongest
    edges (ties: lower A index) merge as size-weighted means. Output: prefix, unmerged A (ascending;
    without prefix tokens under ``sequence``, by descending edge as ToMe leaves them), then every B
    with what merged into it."""
    patches = list(range(npt, x.shape[0]))
    if sets == "sequence":
        a_tokens, b_tokens = [t for t in patches if t % 2 == 0], [t for t in patches if t % 2 == 1]
    else:
        a_tokens, b_tokens = patches[0::2], patches[1::2]
    k = keys.double()
    edges = []
    for a in a_tokens:
        sims = [float(k[a] @ k[b] / (k[a].norm() * k[b].norm())) for b in b_tokens]
        best = max(range(len(b_tokens)), key=lambda j: (sims[j], -j))
        edges.append((sims[best], best))
    by_edge = sorted(range(len(a_tokens)), key=lambda i: (-edges[i][0], i))
    merged, unmerged = by_edge[:r], by_edge[r:]
    if npt or sets == "patches":
        unmerged = sorted(unmerged)
    groups = {j: [b] for j, b in enumerate(b_tokens)}
    for i in merged:
        groups[edges[i][1]].append(a_tokens[i])
    rows = list(range(npt)) + [a_tokens[i] for i in unmerged]
    out = [x[t] for t in rows]
    sizes = [size[t] for t in rows]
    for j in range(len(b_tokens)):
        members = groups[j]
        total = sum(size[t] for t in members)
        out.append(sum(size[t] * x[t] for t in members) / total)
        sizes.append(total)
    return torch.stack(out), torch.stack(sizes)


def brute_prune(x: Tensor, scores: Tensor, size: Tensor, n_keep: int, npt: int, fuse: bool
                ) -> tuple[Tensor, Tensor]:
    """Keep the n_keep best-scored patches of one image (ties: lower index), in order; with fuse,
    the best n_keep − 1 plus the score-weighted mean of the rest."""
    n = x.shape[0] - npt
    order = sorted(range(n), key=lambda j: (-float(scores[j]), j))
    n_top = n_keep - 1 if fuse else n_keep
    kept = sorted(order[:n_top])
    rows = list(range(npt)) + [npt + j for j in kept]
    out, sizes = [x[t] for t in rows], [size[t] for t in rows]
    if fuse and n_top < n:
        dropped = order[n_top:]
        w = [float(scores[j]) for j in dropped]
        out.append(sum(wi * x[npt + j] for wi, j in zip(w, dropped)) / sum(w))
        sizes.append(sum(size[npt + j] for j in dropped))
    return torch.stack(out), torch.stack(sizes)


def brute_received(probs: Tensor, npt: int) -> Tensor:
    """Mean over heads and over the other patches i ≠ j of attention i → j, by loops."""
    B, H, N, _ = probs.shape
    n = N - npt
    out = torch.zeros(B, n, dtype=torch.float64)
    for b in range(B):
        for j in range(n):
            total = sum(float(probs[b, h, npt + i, npt + j]) for h in range(H) for i in range(n) if i != j)
            out[b, j] = total / (H * (n - 1))
    return out


# --------------------------------------------------------------------------- the math on small inputs


@pytest.mark.parametrize("sets", ["sequence", "patches"])
@pytest.mark.parametrize("n_patches, r, npt", [(9, 3, 1), (10, 5, 3), (8, 0, 1), (7, 1, 0), (9, 4, 0), (10, 5, 2),
                                               (11, 5, 4), (6, 3, 1)])
def test_merge_matches_brute_force(n_patches: int, r: int, npt: int, sets: ABSets) -> None:
    torch.manual_seed(n_patches * 10 + r)
    B, C, d = 3, 5, 4
    N = npt + n_patches
    x, keys = torch.randn(B, N, C), torch.randn(B, N, d)
    size = torch.randint(1, 5, (B, N, 1)).float()
    size[:, :npt] = 1
    out, new_size, _ = merge_tokens(x, keys, r, npt, size=size, sets=sets)
    assert out.shape == (B, N - r, C)
    torch.testing.assert_close(out[:, :npt], x[:, :npt], atol=0, rtol=0)  # prefix tokens: untouched, in front
    for b in range(B):
        ref_x, ref_size = brute_merge(x[b], keys[b], size[b], r, npt, sets)
        torch.testing.assert_close(out[b], ref_x.float(), atol=ATOL, rtol=0)
        torch.testing.assert_close(new_size[b], ref_size.float(), atol=0, rtol=0)


def test_merge_breaks_ties_by_position() -> None:
    keys = torch.tensor([[[1.0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]]])  # A0,A1 tie, A2 orthogonal
    x = torch.arange(6.0).reshape(1, 6, 1)
    out, size, _ = merge_tokens(x, keys, 1, 0)
    ref, ref_size = brute_merge(x[0], keys[0], torch.ones(6, 1), 1, 0)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(size[0], ref_size)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("n_keep", [1, 4, 9])
def test_prune_matches_brute_force(fuse: bool, n_keep: int) -> None:
    torch.manual_seed(n_keep)
    B, npt, n, C = 3, 2, 9, 4
    x, scores = torch.randn(B, npt + n, C), torch.rand(B, n)
    size = torch.randint(1, 4, (B, npt + n, 1)).float()
    out, new_size, _ = prune_tokens(x, scores, n_keep, npt, fuse=fuse, size=size)
    for b in range(B):
        ref_x, ref_size = brute_prune(x[b], scores[b], size[b], n_keep, npt, fuse)
        torch.testing.assert_close(out[b], ref_x.float(), atol=ATOL, rtol=0)
        torch.testing.assert_close(new_size[b], ref_size.float(), atol=0, rtol=0)


def test_keeping_everything_is_the_identity() -> None:
    x = torch.randn(2, 7, 3)
    torch.testing.assert_close(prune_tokens(x, torch.rand(2, 6), 6, 1)[0], x, atol=0, rtol=0)
    torch.testing.assert_close(merge_tokens(x, torch.randn(2, 7, 4), 0, 1)[0][:, :1], x[:, :1], atol=0, rtol=0)


def test_received_attention_and_prefix_rows_match_loops() -> None:
    torch.manual_seed(0)
    probs = torch.randn(2, 3, 6, 6).softmax(-1)
    torch.testing.assert_close(received_attention(probs, 2).double(), brute_received(probs, 2), atol=1e-7, rtol=0)
    q, k = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    full = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(prefix_attention(q, k, 0.5, 1), full[:, :, 0].mean(1), atol=1e-7, rtol=0)
    torch.testing.assert_close(prefix_attention(q, k, 0.5, 2), full[:, :, :2].mean((1, 2)), atol=1e-7, rtol=0)


def test_sources_partition_the_patches() -> None:
    """Every original patch is covered by exactly one token after merging; pruned ones by none."""
    torch.manual_seed(1)
    x, N = torch.randn(2, 11, 3), 11
    source = torch.eye(N).expand(2, -1, -1)
    out, size, src = merge_tokens(x, torch.randn(2, N, 4), 4, 1, source=source)
    torch.testing.assert_close(src.sum(1), torch.ones(2, N))
    torch.testing.assert_close(src.sum(-1, keepdim=True), size)
    out, size, src = prune_tokens(out, torch.rand(2, 6), 3, 1, fuse=False, size=size, source=src)
    assert float(src.sum()) == pytest.approx(float(size.sum())), "a kept token covers as many patches as its size"


# --------------------------------------------------------------------------- whole forward passes

CONFIGS = {
    "plain": {},
    "layerscale": {"init_values": 0.5},
    "qk-norm": {"qk_norm": True},
    "registers": {"reg_tokens": 2},
    "registers-avg-no-cls": {"reg_tokens": 2, "class_token": False, "global_pool": "avg"},
    "avg-pool": {"global_pool": "avg", "fc_norm": False},
    "scale-norm": {"scale_attn_norm": True},
    "gated": {},
    "unfused": {},
}

PLANS = {
    "token-cls": dict(method="cls", keep=[0.75, 0.5]),
    "token-cls-fuse": dict(method="cls", keep=[0.75, 0.5], fuse=True),
    "token-cls-prefix-original": dict(method="cls", keep=[0.8, 0.6], score_from="prefix", relative_to="original"),
    "token-mean": dict(method="mean", keep=[0.75, 0.5]),
    "token-mean-fuse": dict(method="mean", keep=[0.5, 0.75], fuse=True),
    "tome": dict(method="tome", r=[3, 4], prop_attn=True),
    "tome-plain-attention": dict(method="tome", r=[5, 2], prop_attn=False),
    "tome-patches-sets": dict(method="tome", r=[3, 4], prop_attn=True, ab_sets="patches"),  # records before ab_sets
}


def make_vit(config: str, **extra) -> torch.nn.Module:
    """A tiny ViT with peaked attention (large pos/cls embeddings and qkv weights), so that token
    scores are well separated and every check is about arithmetic, not near-ties."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **CONFIGS[config], **extra}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("pos_embed", "cls_token", "reg_token"):
                p.normal_(0, 1.0)
            elif name.endswith("attn.qkv.weight"):
                p.normal_(0, 0.4)
    for block in model.blocks:
        if config == "unfused":
            block.attn.fused_attn = False
        if config == "gated":  # timm's Attention(gated=True): a sigmoid gate on the attention output
            block.attn.gate = torch.nn.Linear(block.attn.qkv.in_features, block.attn.attn_dim)
    return model


def explicit_attention(attn, h: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """The full attention matrix (B, H, N, N) and keys of timm's Attention on ``h``."""
    B, N, _ = h.shape
    q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1), k


def reference_forward(model: torch.nn.Module, images: Tensor, plan: TokenPlan) -> Tensor:
    """The token-reduced forward, independently: timm's modules + brute-force reductions."""
    npt = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B = x.shape[0]
    size = torch.ones(B, x.shape[1], 1)
    n0 = x.shape[1] - npt
    rows = 1 if plan.score_from == "cls" else npt
    for index, block in enumerate(model.blocks):
        h = block.norm1(x)
        bias = size.log()[:, None, None, :, 0] if plan.prop_attn else None
        x = x + block.ls1(block.attn(h, attn_mask=bias))
        n = x.shape[1] - npt
        if plan.method == "tome":
            n_out = merged_count(n, plan.r[index])
        else:
            n_out = pruned_count(n, n0, plan.keep[index], plan.relative_to, plan.min_tokens)
        if n_out < n:
            probs, keys = explicit_attention(block.attn, h, bias)
            outs, sizes = [], []
            for b in range(B):
                if plan.method == "tome":
                    xb, sb = brute_merge(x[b], keys[b].mean(0), size[b], n - n_out, npt, plan.ab_sets)
                else:
                    scores = (probs[b, :, :rows, npt:].mean((0, 1)) if plan.method == "cls"
                              else brute_received(probs[b:b + 1], npt)[0])
                    xb, sb = brute_prune(x[b], scores, size[b], n_out, npt, plan.fuse)
                outs.append(xb.float())
                sizes.append(sb.float())
            x, size = torch.stack(outs), torch.stack(sizes)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "token":
        pooled = x[:, 0]
    else:
        xs, ws = (x, size) if model.pool_include_prefix else (x[:, npt:], size[:, npt:])
        pooled = (xs * ws).sum(1) / ws.sum(1)
    return model.head(model.fc_norm(pooled))


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_forward_matches_reference(config: str, plan_name: str) -> None:
    model = make_vit(config)
    raw = PLANS[plan_name]
    if raw.get("method") == "cls" and raw.get("score_from", "cls") == "cls" and not model.has_class_token:
        raw = {**raw, "score_from": "prefix"}
    plan = TokenPlan(**raw)
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = reference_forward(model, images, plan)
        apply_patch(model, TokenReduction(**plan.model_dump()))
        got = model(images)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_avg_pool_is_size_weighted_after_merging() -> None:
    """The pooled features of a merged avg-pool ViT are the size-weighted mean of its final tokens."""
    model = make_vit("avg-pool")
    apply_patch(model, TokenReduction(method="tome", r=[4, 4], prop_attn=True))
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens, state = model.forward_tokens(images)
        pooled = model.forward_head(tokens, pre_logits=True, size=state.size)
    weights = state.size[:, 1:]
    assert float(weights.sum(1).min()) == 16 and float(weights.max()) > 1, "sizes add up to the 16 patches"
    torch.testing.assert_close(pooled, (tokens[:, 1:] * weights).sum(1) / 16, atol=ATOL, rtol=0)
    assert not torch.allclose(pooled, tokens[:, 1:].mean(1), atol=1e-3), "an unweighted mean would differ"
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.forward_head(tokens, size=state.size), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- against facebookresearch/ToMe
# The reference is ToMe's own code, transcribed in _tome_reference.py from
# github.com/facebookresearch/ToMe at commit af95e4b1befa172dadccd8c81e223b10090f9579:
# tome/merge.py (bipartite_soft_matching, merge_wavg, merge_source), tome/patch/timm.py (ToMeBlock,
# ToMeAttention, apply_patch), tome/utils.py (parse_r), tome/patch/mae.py (size-weighted avg pool).

#: Tiny timm ViTs (32 px, 4 px patches: 64 patch tokens) for the comparison with ToMe's own code.
#: ``distill_token``: run ToMe's distillation-token branch on [CLS, register, patches], the layout of
#: DeiT's distilled model, where rmtp's generalisation to two prefix tokens must coincide with it.
TOME_VITS: dict[str, dict] = {
    "vit": dict(depth=3, embed_dim=64, num_heads=4),
    "vit-depth4-dim48": dict(depth=4, embed_dim=48, num_heads=3),
    "vit-qk-norm": dict(depth=3, embed_dim=64, num_heads=4, qk_norm=True),
    "deit": dict(name="deit_tiny_patch16_224", depth=4, embed_dim=64, num_heads=2),
    "deit3-layerscale": dict(depth=3, embed_dim=64, num_heads=4, no_embed_class=True, init_values=0.5),
    "mae-avg-pool": dict(depth=3, embed_dim=64, num_heads=4, global_pool="avg"),
    "no-class-token-avg": dict(depth=3, embed_dim=64, num_heads=4, class_token=False, global_pool="avg"),
    "cls-register-as-distill": dict(depth=4, embed_dim=64, num_heads=4, reg_tokens=1, distill_token=True),
    # timm's own distilled DeiT (the deit architecture): ToMe's rule finds its dist_token
    "deit-distilled": dict(name="deit_tiny_distilled_patch16_224", depth=3, embed_dim=64, num_heads=4),
}
#: ToMe's r forms: a constant (13: 64 → 51 → 38 → 25; 40 hits the ⌊n/2⌋ cap at every block), and
#: (r, inflection) schedules, decreasing and increasing.
TOME_RS: dict[str, tuple[int, float]] = {"r=4": (4, 0.0), "r=13": (13, 0.0), "r=40": (40, 0.0),
                                         "r=8-decreasing": (8, -1.0), "r=6-inflect-0.5": (6, 0.5)}
REL_TOL = 1e-5


def make_tome_vit(name: str) -> torch.nn.Module:
    """A tiny ViT of ``TOME_VITS`` with peaked attention (see :func:`make_vit`) and, with LayerScale,
    gammas far from 1, so every part of the block matters."""
    config = {k: v for k, v in TOME_VITS[name].items() if k != "distill_token"}
    torch.manual_seed(0)
    model = timm.create_model(config.pop("name", "vit_tiny_patch16_224"), img_size=32, patch_size=4,
                              num_classes=10, **config).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name in ("pos_embed", "cls_token", "reg_token", "dist_token"):
                p.normal_(0, 1.0)
            elif param_name.endswith("attn.qkv.weight"):
                p.normal_(0, 0.3)
            elif param_name.endswith(".gamma"):
                p.uniform_(0.2, 1.0)
    return model


def rmtp_tome(model: torch.nn.Module, r: tuple[int, float], prop_attn: bool) -> torch.nn.Module:
    """``model`` patched the way the ``tome`` pruner patches it (its params → plan → patch)."""
    params = TomeParams(r=r[0], ramp=r[1], prop_attn=prop_attn)
    plan = TomePruner().plan(params, len(model.blocks))
    arch = "deit" if "distilled" in type(model).__name__.lower() else "vit"
    apply_patch(model, TokenReduction(arch, **plan.model_dump()))
    return model


def reference_tome(model: torch.nn.Module, name: str, r: tuple[int, float], prop_attn: bool,
                   trace_source: bool = False) -> torch.nn.Module:
    """``model`` patched by the ToMe transcription, r given in ToMe's own form."""
    return tome_ref.apply_patch(model, r[0] if r[1] == 0 else r, prop_attn=prop_attn, trace_source=trace_source,
                                distill_token=TOME_VITS[name].get("distill_token"))


def relative_error(got: Tensor, expected: Tensor) -> float:
    """max |got − expected| / max |expected|."""
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("prop_attn", [True, False], ids=["prop-attn", "plain-attn"])
@pytest.mark.parametrize("r", list(TOME_RS))
@pytest.mark.parametrize("name", list(TOME_VITS))
def test_tome_logits_match_facebookresearch_tome(name: str, r: str, prop_attn: bool) -> None:
    """rmtp's tome gives ToMe's logits: same A/B sets (class token in A, protected), same merges,
    same order, proportional attention and size-weighted pooling."""
    model = make_tome_vit(name)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        dense = model(images)
        expected = reference_tome(copy.deepcopy(model), name, TOME_RS[r], prop_attn)(images)
        got = rmtp_tome(model, TOME_RS[r], prop_attn)(images)
    assert relative_error(expected, dense) > 1e-3, "the reference merged nothing: the check would be empty"
    assert relative_error(got, expected) <= REL_TOL


@pytest.mark.parametrize("name", ["vit", "deit", "no-class-token-avg", "cls-register-as-distill", "deit-distilled"])
def test_tome_sources_and_sizes_match_facebookresearch_tome(name: str) -> None:
    """Token for token in the same order: the traced sources (what ``rmtp token-map`` draws) and sizes
    are ToMe's ``merge_source`` / ``merge_wavg`` ones, exactly."""
    model = make_tome_vit(name)
    images = torch.randn(3, 3, 32, 32)
    reference = reference_tome(copy.deepcopy(model), name, TOME_RS["r=13"], True, trace_source=True)
    rmtp_tome(model, TOME_RS["r=13"], True)
    with torch.no_grad(), trace_sources(model) as trace:
        reference(images)
        model(images)
    info = reference._tome_info
    torch.testing.assert_close(trace.sources[-1], info["source"], atol=0, rtol=0)
    torch.testing.assert_close(trace.sizes[-1], info["size"], atol=0, rtol=0)


def test_records_from_before_ab_sets_keep_the_patch_only_sets() -> None:
    """The sets rmtp used before it matched ToMe (prefix stripped, then A/B) are no longer ToMe's;
    they stay reachable for saved records only (``ab_sets: patches``)."""
    model = make_tome_vit("vit")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference_tome(copy.deepcopy(model), "vit", TOME_RS["r=13"], True)(images)
        r = tome_r_list(len(model.blocks), 13)
        apply_patch(model, TokenReduction(method="tome", r=r, prop_attn=True, ab_sets="patches"))
        assert relative_error(model(images), expected) > 1e-3
