"""The token patch itself: zero reduction is the dense model, the cheap CLS row is the explicit
attention's, gradients flow in training mode, unpatching restores the model exactly, token counts
are static (torch.compile traces the whole forward once), and models it cannot handle are refused."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import TINY_VIT
from test_tokens_reference import CONFIGS, PLANS, make_vit
from torch import nn

from rmtp.contract.saved_types import apply_patch, patches_of, remove_patch
from rmtp.errors import PluginError
from rmtp_plugins.tokens.patch import LayerSpec, TokenPlan, TokenReduction, _attention
from rmtp_plugins.tokens.schedule import token_counts

ZERO = {
    "token-cls": dict(method="cls", keep=[1.0, 1.0]),
    "token-cls-fuse": dict(method="cls", keep=[1.0, 1.0], fuse=True),
    "token-mean": dict(method="mean", keep=[1.0, 1.0]),
    "tome": dict(method="tome", r=[0, 0], prop_attn=True),
}


@pytest.mark.parametrize("plan", list(ZERO))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_zero_reduction_equals_dense(config: str, plan: str) -> None:
    model = make_vit(config)
    raw = ZERO[plan]
    if not model.has_class_token and raw["method"] == "cls":
        raw = {**raw, "score_from": "prefix"}  # scored by the register tokens
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        dense = model(images)
        apply_patch(model, TokenReduction(**raw))
        torch.testing.assert_close(model(images), dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", ["plain", "qk-norm", "registers"])
@pytest.mark.parametrize("score_from", ["cls", "prefix"])
def test_cheap_cls_row_equals_explicit_attention(config: str, score_from: str) -> None:
    """Next to fused SDPA only softmax(q_cls·Kᵀ·scale) is computed; it must be the explicit matrix's row."""
    model = make_vit(config)
    attn = model.blocks[0].attn
    npt = model.num_prefix_tokens
    rows = 1 if score_from == "cls" else npt
    spec = LayerSpec(index=0, method="cls", num_prefix=npt, keep=0.5, score_rows=rows)
    h = model.blocks[0].norm1(model._pos_embed(model.patch_embed(torch.randn(3, 1, 16, 16))))
    with torch.no_grad():
        assert attn.fused_attn
        out_fused, cheap = _attention(attn, h, None, "cls", spec)
        attn.fused_attn = False
        out_explicit, explicit = _attention(attn, h, None, "cls", spec)
        B, N, _ = h.shape
        q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        full = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # (B, H, N, N)
    torch.testing.assert_close(cheap, full[:, :, :rows, npt:].mean((1, 2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(cheap, explicit, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_fused, out_explicit, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_fused, model.blocks[0].attn(h), atol=1e-5, rtol=0)


@pytest.mark.parametrize("plan", list(PLANS))
def test_gradients_flow_in_training_mode(plan: str) -> None:
    model = make_vit("layerscale", drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1)
    apply_patch(model, TokenReduction(**PLANS[plan]))
    model.train()
    images = torch.randn(4, 1, 16, 16, requires_grad=True)
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_unpatch_restores_the_model_exactly() -> None:
    model = make_vit("registers")
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(images)
    types = [type(m) for m in model.modules()]
    attrs = [sorted(vars(m)) for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    for plan in PLANS.values():
        patch = apply_patch(model, TokenReduction(**plan))
        assert patches_of(model) == [patch]
        assert list(model.state_dict()) == list(state), "the patch adds or renames no parameter or buffer"
        with torch.no_grad():
            assert not torch.equal(model(images), before)
        remove_patch(model)
        assert [type(m) for m in model.modules()] == types
        assert [sorted(vars(m)) for m in model.modules()] == attrs
        with torch.no_grad():
            assert torch.equal(model(images), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("plan", ["token-cls-fuse", "token-mean", "tome", "token-cls-prefix-original"])
def test_token_counts_are_static_and_compile_traces_once(plan: str) -> None:
    import torch._dynamo

    model = make_vit("registers")
    raw = TokenPlan(**PLANS[plan])
    apply_patch(model, TokenReduction(**raw.model_dump()))
    seen: list[tuple[int, int]] = []
    hooks = [block.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape[1], out[0].shape[1])))
             for block in model.blocks]
    npt = model.num_prefix_tokens
    expected = [(npt + a, npt + b) for a, b in token_counts(16, keep=raw.keep, r=raw.r, relative_to=raw.relative_to)]
    with torch.no_grad():
        for batch in (1, 5, 2):
            seen.clear()
            model(torch.randn(batch, 1, 16, 16) * batch)
            assert seen == expected
    for hook in hooks:
        hook.remove()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            images = torch.randn(3, 1, 16, 16)
            out = compiled(images)
    torch.testing.assert_close(out, model(images).detach(), atol=1e-6, rtol=0)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- refusals


def _tiny(**kwargs) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **kwargs}).eval()


def _extra_child(model: nn.Module) -> nn.Module:
    model.blocks[1].attn.rope = nn.Identity()
    return model


@pytest.mark.parametrize("build, plan, message", [
    (lambda: timm.create_model("deit_tiny_distilled_patch16_224", **TINY_VIT), PLANS["tome"],
     "not timm's VisionTransformer"),
    (lambda: nn.Sequential(nn.Linear(2, 2)), PLANS["tome"], "not timm's VisionTransformer"),
    (lambda: _tiny(global_pool="prr"), PLANS["tome"], "attention pool that does not take the tokens' sizes"),
    (lambda: _tiny(global_pool=""), PLANS["tome"], "returns the token sequence"),
    (lambda: _tiny(attn_layer="diff"), PLANS["tome"], "not timm's Attention"),
    (lambda: _tiny(block_fn=timm.models.vision_transformer.ResPostBlock), PLANS["tome"], "not timm's plain Block"),
    (lambda: _extra_child(_tiny()), PLANS["tome"], "children the patch does not know: rope"),
    (lambda: _tiny(class_token=False, global_pool="avg"), PLANS["token-cls"], "no class token"),
    (lambda: _tiny(class_token=False, global_pool="avg"), PLANS["token-cls-prefix-original"], "has none"),
    (lambda: _tiny(depth=3), PLANS["tome"], "2 per-block entries but the model has 3 blocks"),
])
def test_models_the_patch_cannot_handle_are_refused(build, plan: dict, message: str) -> None:
    model = build()
    before = [type(m) for m in model.modules()]
    with pytest.raises(PluginError, match=message):
        apply_patch(model, TokenReduction(**plan))
    assert [type(m) for m in model.modules()] == before and not patches_of(model), "a refusal changes nothing"


def test_double_patch_and_masks_are_refused() -> None:
    model = _tiny()
    apply_patch(model, TokenReduction(**PLANS["tome"]))
    with pytest.raises(PluginError, match="already token-reduced"):
        apply_patch(model, TokenReduction(**PLANS["token-cls"]))
    with pytest.raises(ValueError, match="no attn_mask"):
        model(torch.randn(1, 1, 16, 16), attn_mask=torch.zeros(17, 17))


def test_patched_blocks_called_the_timm_way_run_dense() -> None:
    """Outside the patched model forward (forward_intermediates, a block on its own) blocks are timm's."""
    model = make_vit("plain")
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        dense = model.blocks[0](x)
        apply_patch(model, TokenReduction(**PLANS["tome"]))
        torch.testing.assert_close(model.blocks[0](x), dense, atol=0, rtol=0)


def test_gradient_checkpointing_and_dynamic_image_size_are_kept() -> None:
    model = make_vit("plain")
    apply_patch(model, TokenReduction(**PLANS["tome"]))
    images = torch.randn(2, 1, 16, 16)
    model.train()
    model(images).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-5, rtol=1e-4)
    dynamic = make_vit("plain", dynamic_img_size=True)
    apply_patch(dynamic, TokenReduction(method="cls", keep=[0.5, 0.5]))
    seen = []
    dynamic.blocks[1].register_forward_hook(lambda mod, args, out: seen.append(out[0].shape[1]))
    with torch.no_grad():
        dynamic(torch.randn(2, 1, 16, 16)), dynamic(torch.randn(2, 1, 24, 24))
    assert seen == [1 + 4, 1 + 9], "counts follow the input size: 16 → 8 → 4 and 36 → 18 → 9 patches"


# ------------------------------------------------------------------ timm's attention pool ('map')


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("plan", ["tome", "token-mean"])
def test_an_attention_pooled_vit_runs_dense_at_zero_reduction_and_reduces_otherwise(class_token: bool,
                                                                                   plan: str) -> None:
    """SigLIP's head: ``global_pool="map"`` attends from a learned query to the tokens left."""
    torch.manual_seed(0)
    model = _tiny(global_pool="map", class_token=class_token)
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        dense = model(images)
        zero = copy.deepcopy(model)
        apply_patch(zero, TokenReduction(**ZERO[plan]))
        torch.testing.assert_close(zero(images), dense, atol=1e-5, rtol=0)
        apply_patch(model, TokenReduction(**PLANS[plan]))
        reduced = model(images)
    assert reduced.shape == dense.shape and not torch.allclose(reduced, dense)


def test_the_attention_pool_weighs_a_merged_token_as_its_copies() -> None:
    """Proportional attention in the pool (ToMe's softmax(QKᵀ/√d + log s)): a token of size s gives
    what s identical tokens give the dense pool, whatever the pool's heads and MLP do after."""
    torch.manual_seed(0)
    model = _tiny(global_pool="map", class_token=False)
    apply_patch(model, TokenReduction(**PLANS["tome"]))
    tokens = torch.randn(2, 5, 32)
    copies = torch.tensor([1, 3, 1, 2, 1])  # token 1 stands for 3 patches, token 3 for 2
    expanded = tokens.repeat_interleave(copies, dim=1)  # (2, 8, 32): each token repeated
    size = copies.float().expand(2, -1).unsqueeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(model.pool(tokens, size=size), model.attn_pool(expanded), atol=1e-5, rtol=0)
        assert not torch.allclose(model.pool(tokens, size=size), model.attn_pool(tokens), atol=1e-4)
