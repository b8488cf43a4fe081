"""The families added through one architecture module each, with no pruner edited: ``deit``
(distilled DeiT, two prefix tokens and two heads), ``swin`` (window attention) and ``eva`` (rotary
attention, q/v biases outside qkv, gated MLPs). Every pruner that makes sense works; the others
are refused with the family's reason.

Tiny timm models (32 px DeiT and Eva, 56 px Swin with two one-block stages) keep each test under a second.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.saved_types import describe_patches
from rmtp.errors import PluginError, RmtpError
from rmtp.plugins import get_plugins
from rmtp_plugins.spp.groups import extract, find_units

DEIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
SWIN_KWARGS = {"img_size": 56, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 7,
               "num_classes": 10}


def _deit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", **DEIT_KWARGS).eval()


def _swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **SWIN_KWARGS).eval()


def _calibration(size: int, n: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size, generator=generator),
                                    torch.zeros(n, dtype=torch.long)),
                      batch_size=4)


def _round_trip(model: nn.Module, folder: Path, images: torch.Tensor, spec: ModelSpec | None = None) -> nn.Module:
    """``model`` saved (architecture inferred, spec given: tiny kwargs cannot be read back; by default
    the tiny DeiT's for 32 px images, else the tiny Swin's) and reloaded; outputs equal bit for bit."""
    with torch.no_grad():
        expected = model(images)
    deit = images.shape[-1] == 32
    spec = spec or ModelSpec(name="deit_tiny_distilled_patch16_224" if deit else "swin_tiny_patch4_window7_224",
                             kwargs=DEIT_KWARGS if deit else SWIN_KWARGS)
    loaded = rmtp.load(rmtp.save(model, folder, spec=spec)).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, atol=0, rtol=0)
    return loaded


# ------------------------------------------------------------------------------------------ deit


def test_deit_distilled_is_inferred_as_the_deit_family() -> None:
    assert rmtp.infer_architecture(_deit()).name == "deit"
    assert rmtp.infer_architecture(timm.create_model("deit_tiny_patch16_224", **DEIT_KWARGS)).name == "vit"


@pytest.mark.parametrize("pruner, params", [("tome", {"r": 2}), ("token-cls", {"r_max": 0.5}),
                                            ("token-mean", {"r_max": 0.5})])
def test_token_pruners_keep_both_prefix_tokens_of_distilled_deit(pruner: str, params: dict, tmp_path: Path) -> None:
    model = _deit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(images)
    report = rmtp.prune(model, pruner, **params)
    assert report.rows[0].detail["tokens_in"] == 2 + 16  # class + distillation token, 4×4 patches
    assert report.rows[-1].detail["tokens_out"] < report.rows[0].detail["tokens_in"]
    with torch.no_grad():
        reduced = model(images)
    assert reduced.shape == dense.shape and not torch.allclose(reduced, dense)
    assert describe_patches(model)[0]["config"]["arch"] == "deit"
    loaded = _round_trip(model, tmp_path / "m", images)
    rmtp.unpatch(loaded)
    assert type(loaded) is timm.models.deit.VisionTransformerDistilled
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), dense, atol=1e-6, rtol=0)


def test_spp_removes_heads_and_neurons_of_distilled_deit(tmp_path: Path) -> None:
    model = _deit()
    arch = get_plugins().architecture("deit")
    units = find_units(model, arch.couplings(model), arch.prunable_layers(model), ("heads", "neurons"), arch=arch)
    assert [u.kind for u in units] == ["head", "neuron", "head", "neuron"]
    remove = torch.zeros(sum(u.count for u in units), dtype=torch.bool)
    remove[units[0].offset] = True  # one of block 0's two heads
    remove[units[1].offset:units[1].offset + 5] = True  # five of its MLP neurons
    extract(model, units, remove)
    assert model.blocks[0].attn.num_heads == 1 and model.blocks[0].mlp.fc1.out_features == 128 - 5
    assert describe_patches(model) == [{"type": "spp.attention_heads",
                                        "config": {"heads": {"blocks.0.attn": 1}, "arch": "deit"}}]
    loaded = _round_trip(model, tmp_path / "m", torch.randn(2, 3, 32, 32))
    assert loaded.blocks[0].attn.num_heads == 1


@pytest.mark.parametrize("pruner, params", [("magnitude", {"sparsity": 0.5}), ("svd-mp", {"target_params": 0.8}),
                                            ("n:m", {"n": 2, "m": 4, "only_if_faster": False})])
def test_weight_pruners_run_on_distilled_deit(pruner: str, params: dict, tmp_path: Path) -> None:
    model = _deit()
    rmtp.prune(model, pruner, calibration=_calibration(32), **params)
    _round_trip(model, tmp_path / "m", torch.randn(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------ swin


def test_swin_lists_its_window_attention_and_mlp_layers() -> None:
    model = _swin()
    arch = rmtp.infer_architecture(model)
    assert arch.name == "swin"
    layers = {layer.name: (layer.role, layer.optional) for layer in arch.prunable_layers(model)}
    block = "layers.{}.blocks.0"
    expected = {"patch_embed.proj": ("patch_embed", True), "layers.1.downsample.reduction": ("downsample", True),
                "head.fc": ("head", True)}
    for stage in (0, 1):
        expected |= {f"{block.format(stage)}.{name}": (name.split(".")[-1], False)
                     for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert layers == expected
    assert arch.blocks(model) == ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert [(c.kind, c.group) for c in arch.couplings(model)] == [("heads", 16), ("neurons", 1), ("heads", 16),
                                                                 ("neurons", 1)]


@pytest.mark.parametrize("pruner, params", [("magnitude", {"sparsity": 0.5}), ("svd-mp", {"target_params": 0.8}),
                                            ("n:m", {"n": 2, "m": 4, "only_if_faster": False})])
def test_weight_pruners_run_on_swin(pruner: str, params: dict, tmp_path: Path) -> None:
    model = _swin()
    report = rmtp.prune(model, pruner, calibration=_calibration(56), **params)
    assert {row.layer for row in report.rows} >= {"layers.0.blocks.0.attn.qkv", "layers.1.blocks.0.mlp.fc2"}
    _round_trip(model, tmp_path / "m", torch.randn(2, 3, 56, 56))


def test_spp_cuts_swin_mlp_neurons_and_refuses_its_heads_with_the_reason(tmp_path: Path) -> None:
    model = _swin()
    calibration = _calibration(56)
    report = rmtp.prune(model, "spp", calibration=calibration, search="obs", ratio=0.25, structures=["neurons"])
    assert model.layers[0].blocks[0].mlp.fc1.out_features == 48 and report.rows
    _round_trip(model, tmp_path / "m", torch.randn(2, 3, 56, 56))
    untouched = _swin()
    before = copy.deepcopy(untouched.state_dict())
    with pytest.raises(RmtpError, match="relative-position bias per head"):
        rmtp.prune(untouched, "spp", calibration=calibration, search="obs", ratio=0.25, structures=["heads"])
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items()), "a refusal changes nothing"


@pytest.mark.parametrize("family, reason", [("swin", "Swin attends within fixed windows"),
                                            ("eva", "Eva blocks take rotary position embeddings")])
@pytest.mark.parametrize("pruner", ["tome", "token-cls", "token-mean"])
def test_token_pruners_refuse_swin_and_eva_with_the_reason(family: str, reason: str, pruner: str) -> None:
    model = _swin() if family == "swin" else _eva()
    with pytest.raises(RmtpError, match=f"{pruner} cannot reduce the tokens of this {family} model: {reason}"):
        rmtp.prune(model, pruner)
    assert not describe_patches(model)


def test_unpatch_takes_off_the_token_patch_and_keeps_the_head_record() -> None:
    """spp's head record belongs to the sliced layers: ``rmtp.unpatch`` removes tome above it and
    leaves it, so the model runs as the head-pruned one (removing it would break the reshape)."""
    model = _deit()
    arch = get_plugins().architecture("deit")
    units = find_units(model, arch.couplings(model), arch.prunable_layers(model), ("heads",), arch=arch)
    remove = torch.zeros(sum(u.count for u in units), dtype=torch.bool)
    remove[units[1].offset] = True
    extract(model, units, remove)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        heads_only = model(images)
    rmtp.prune(model, "tome", r=2)
    rmtp.unpatch(model)
    assert [entry["type"] for entry in describe_patches(model)] == ["spp.attention_heads"]
    assert model.blocks[1].attn.num_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(model(images), heads_only, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- eva

#: Tiny Eva models: EVA-02 (fused qkv with q/v biases outside it, GluMlp), DINOv3 (fused qkv, no bias
#: outside, plain Mlp, 4 register tokens) and EVA-02 CLIP (q/k/v_proj, SwiGLU with a norm inside).
EVA_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
EVA02, DINOV3, EVA02_CLIP = "eva02_tiny_patch14_224", "vit_small_patch16_dinov3", "eva02_base_patch16_clip_224"


def _eva(name: str = EVA02, *, built_by_rmtp: bool = True) -> nn.Module:
    """The tiny ``name``, built as a recipe builds it (``EvaArchitecture.create``) or by timm alone."""
    torch.manual_seed(0)
    if built_by_rmtp:
        return get_plugins().architecture("eva").create(ModelSpec(name=name, kwargs=EVA_KWARGS))
    return timm.create_model(name, **EVA_KWARGS).eval()


def _eva_round_trip(model: nn.Module, name: str, folder: Path) -> nn.Module:
    return _round_trip(model, folder, torch.randn(2, 3, 32, 32), ModelSpec(name=name, kwargs=EVA_KWARGS))


@pytest.mark.parametrize("name", [EVA02, DINOV3, EVA02_CLIP, "vit_pe_core_tiny_patch16_384",
                                  "vit_small_patch16_rope_224"])
def test_eva_family_covers_timm_eva_models_and_leaves_vit_and_typos_alone(name: str) -> None:
    plugins = get_plugins()
    assert plugins.architecture_for(name).name == "eva"
    assert plugins.architecture_for("vit_small_patch16_224").name == "vit"
    # a name timm does not know is vit's alone (whose create answers with timm's similar names), not
    # "several plugins cover it"
    assert plugins.architecture_for("vit_small_patch16_dinov4").name == "vit"


def test_eva_lists_fused_or_separate_projections_and_gated_mlp_layers() -> None:
    arch = get_plugins().architecture("eva")
    for name, block_layers in [(EVA02, ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
                               (EVA02_CLIP, ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
                                             "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2"])]:
        model = _eva(name)
        layers = [layer.name for layer in arch.prunable_layers(model) if not layer.optional]
        assert layers == [f"blocks.{i}.{layer}" for i in range(2) for layer in block_layers]
        assert [layer.name for layer in arch.prunable_layers(model) if layer.optional] == ["patch_embed.proj", "head"]
    assert arch.qkv_split("blocks.0.attn.qkv", _eva(EVA02).blocks[0].attn.qkv) == {
        "q": slice(0, 32), "k": slice(32, 64), "v": slice(64, 96)}


def test_eva_qkv_with_outside_biases_is_routed_through_its_module_or_left_out() -> None:
    """EVA-02 adds its q/v biases in ``F.linear(x, qkv.weight, bias)``, which would bypass a replaced
    qkv: rmtp's build switches to timm's ``qkv(x) + bias`` (same outputs, same state dict); a model
    taken as timm built it keeps qkv out of the prunable layers until routed."""
    from rmtp_plugins.architectures.timm_family import route_qkv_through_module

    arch = get_plugins().architecture("eva")
    raw = _eva(built_by_rmtp=False)
    assert "blocks.0.attn.qkv" not in {layer.name for layer in arch.prunable_layers(raw)}
    routed = copy.deepcopy(raw)
    assert route_qkv_through_module(routed) == ["blocks.0.attn", "blocks.1.attn"]
    assert "blocks.0.attn.qkv" in {layer.name for layer in arch.prunable_layers(routed)}
    assert routed.state_dict().keys() == raw.state_dict().keys()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(routed(images), raw(images), atol=1e-6, rtol=0)
    assert route_qkv_through_module(_eva()) == [], "rmtp's build routes them already"


def test_an_eva_block_whose_attention_has_no_projection_to_prune_is_not_the_family() -> None:
    model = _eva()
    attention = nn.Module()
    attention.proj = nn.Linear(32, 32)  # the layout's children are there, but no qkv nor q/k/v_proj
    model.blocks[0].attn = attention
    with pytest.raises(PluginError, match="block blocks.0: its attention has neither a fused qkv nor q_proj"):
        rmtp.infer_architecture(model)


def test_svd_mp_replaces_eva02_qkv_and_the_forward_runs_through_the_replacement(tmp_path: Path) -> None:
    model = _eva()
    report = rmtp.prune(model, "svd-mp", calibration=_calibration(32), target_params=0.7, whiten=True)
    assert "blocks.0.attn.qkv" in {row.layer for row in report.rows}
    qkv = model.blocks[0].attn.qkv
    assert not isinstance(qkv, nn.Linear), "svd-mp split it"
    calls = []
    handle = qkv.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert calls == [1]
    _eva_round_trip(model, EVA02, tmp_path / "m")


@pytest.mark.parametrize("name", [EVA02, DINOV3, EVA02_CLIP])
@pytest.mark.parametrize("pruner, params", [("magnitude", {"sparsity": 0.5}),
                                            ("n:m", {"n": 2, "m": 4, "budget": "uniform", "score": "sparsegpt",
                                                     "only_if_faster": False})])
def test_mask_pruners_run_on_eva_models(name: str, pruner: str, params: dict, tmp_path: Path) -> None:
    model = _eva(name)
    report = rmtp.prune(model, pruner, calibration=_calibration(32), **params)
    assert {row.layer for row in report.rows} >= {"blocks.0.attn.proj", "blocks.1.mlp.fc2"}
    zeros = float((model.blocks[1].attn.proj.weight == 0).float().mean())
    assert zeros == 0.5 if pruner == "n:m" else zeros > 0.25  # magnitude's 50% is global
    _eva_round_trip(model, name, tmp_path / "m")


def test_spp_cuts_plain_mlp_neurons_of_eva_and_refuses_what_it_cannot_cut(tmp_path: Path) -> None:
    model = _eva(DINOV3)
    calibration = _calibration(32)
    rmtp.prune(model, "spp", calibration=calibration, search="obs", ratio=0.25, structures=["neurons"])
    assert model.blocks[0].mlp.fc1.out_features == 96
    _eva_round_trip(model, DINOV3, tmp_path / "m")
    with pytest.raises(RmtpError, match="eva architecture declares no couplings"):  # gated MLPs only
        rmtp.prune(_eva(EVA02), "spp", calibration=calibration, search="obs", ratio=0.25, structures=["neurons"])
    with pytest.raises(RmtpError, match="heads"):
        rmtp.prune(_eva(DINOV3), "spp", calibration=calibration, search="obs", ratio=0.25, structures=["heads"])


# ----------------------------------------------------------------------- swinv2 and beit (q/v bias)

#: Tiny models of the two families whose q/v biases sit outside ``qkv`` besides Eva: Swin V2 (64 px,
#: two one-block stages, windows of 8) and BEiT v2 (32 px, 8 px patches, two blocks).
QKV_BIAS_FAMILIES = {
    "swinv2": ("swinv2_tiny_window8_256", {"img_size": 64, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
                                           "window_size": 8, "num_classes": 10}, "layers.1.blocks.0", 64),
    "beit": ("beitv2_base_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32,
                                         "num_heads": 2, "num_classes": 10}, "blocks.1", 32),
}


def _qkv_bias_model(family: str, *, built_by_rmtp: bool = True) -> nn.Module:
    """The family's tiny model, built as a recipe builds it or by timm alone. timm initialises Swin V2's
    post-norm weights and both families' q/v biases to zero (a Swin V2 block is then the identity, and
    the biases moot): they are set to ones and to random values here, so that blocks and biases count."""
    name, kwargs, _, _ = QKV_BIAS_FAMILIES[family]
    torch.manual_seed(0)
    if built_by_rmtp:
        model = get_plugins().architecture(family).create(ModelSpec(name=name, kwargs=kwargs))
    else:
        model = timm.create_model(name, **kwargs).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "q_bias"):
                for bias in (module.q_bias, module.v_bias):
                    bias.copy_(torch.randn(bias.shape, generator=generator))
        if family == "swinv2":
            for stage in model.layers:
                for block in stage.blocks:
                    block.norm1.weight.fill_(1.0)
                    block.norm2.weight.fill_(1.0)
    return model


def _images(family: str) -> torch.Tensor:
    size = QKV_BIAS_FAMILIES[family][3]
    return torch.randn(2, 3, size, size)


def _qkv_bias_round_trip(model: nn.Module, family: str, folder: Path) -> nn.Module:
    name, kwargs, _, _ = QKV_BIAS_FAMILIES[family]
    return _round_trip(model, folder, _images(family), ModelSpec(name=name, kwargs=kwargs))


def test_swinv2_and_beit_families_cover_their_timm_modules_only() -> None:
    plugins = get_plugins()
    for name in ("swinv2_tiny_window8_256", "swinv2_base_window12to24_192to384.ms_in22k_ft_in1k"):
        assert plugins.architecture_for(name).name == "swinv2"
    for name in ("beit_base_patch16_224.in22k_ft_in22k_in1k", "beitv2_large_patch16_224"):
        assert plugins.architecture_for(name).name == "beit"
    assert plugins.architecture_for("swin_tiny_patch4_window7_224").name == "swin"
    for other in ("swinv2_cr_tiny_224", "beit3_base_patch16_224"):  # other modules, other layouts
        with pytest.raises(PluginError, match="no architecture plugin covers"):
            plugins.architecture_for(other)
    for family in QKV_BIAS_FAMILIES:
        assert rmtp.infer_architecture(_qkv_bias_model(family, built_by_rmtp=False)).name == family


@pytest.mark.parametrize("family", list(QKV_BIAS_FAMILIES))
def test_the_qkv_bias_is_routed_through_qkv_and_only_mlp_neurons_are_declared(family: str) -> None:
    """Both add q/v biases in ``F.linear(x, qkv.weight, bias)`` as EVA-02 does: rmtp's build routes
    them through ``qkv`` (same outputs and state dict); a model as timm built it keeps ``qkv`` out of
    the layers. Swin V2's position-bias MLP is never listed; heads are not declared."""
    arch = get_plugins().architecture(family)
    model = _qkv_bias_model(family)
    blocks = arch.blocks(model)
    block_layers = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert [layer.name for layer in arch.prunable_layers(model) if not layer.optional] == [
        f"{block}.{layer}" for block in blocks for layer in block_layers]
    optional = {"swinv2": ["patch_embed.proj", "layers.1.downsample.reduction", "head.fc"],
                "beit": ["patch_embed.proj", "head"]}[family]
    assert [layer.name for layer in arch.prunable_layers(model) if layer.optional] == optional
    raw = _qkv_bias_model(family, built_by_rmtp=False)
    assert f"{blocks[0]}.attn.qkv" not in {layer.name for layer in arch.prunable_layers(raw)}
    assert raw.state_dict().keys() == model.state_dict().keys()
    images = _images(family)
    with torch.no_grad():
        torch.testing.assert_close(model(images), raw(images), atol=1e-6, rtol=0)
    assert [(c.name, c.kind) for c in arch.couplings(model)] == [(f"{block}.mlp", "neurons") for block in blocks]
    qkv = model.get_submodule(f"{blocks[-1]}.attn.qkv")
    dim = qkv.out_features // 3
    assert arch.qkv_split(f"{blocks[-1]}.attn.qkv", qkv) == {
        "q": slice(0, dim), "k": slice(dim, 2 * dim), "v": slice(2 * dim, 3 * dim)}


@pytest.mark.parametrize("family", list(QKV_BIAS_FAMILIES))
def test_svd_mp_splits_qkv_and_the_forward_runs_through_the_split(family: str, tmp_path: Path) -> None:
    model = _qkv_bias_model(family)
    last = QKV_BIAS_FAMILIES[family][2]
    report = rmtp.prune(model, "svd-mp", calibration=_calibration(QKV_BIAS_FAMILIES[family][3]), target_params=0.7,
                        whiten=True, allocation="uniform")
    assert f"{last}.attn.qkv" in {row.layer for row in report.rows}
    qkv = model.get_submodule(f"{last}.attn.qkv")
    assert not isinstance(qkv, nn.Linear), "svd-mp split it"
    calls = []
    handle = qkv.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(_images(family))
    handle.remove()
    assert calls == [1]
    _qkv_bias_round_trip(model, family, tmp_path / "m")


@pytest.mark.parametrize("family", list(QKV_BIAS_FAMILIES))
@pytest.mark.parametrize("pruner, params", [("magnitude", {"sparsity": 0.5}),
                                            ("n:m", {"n": 2, "m": 4, "budget": "uniform", "score": "sparsegpt",
                                                     "only_if_faster": False}),
                                            ("spp", {"search": "obs", "ratio": 0.25, "structures": ["neurons"]})])
def test_pruners_run_and_reload_bit_for_bit(family: str, pruner: str, params: dict, tmp_path: Path) -> None:
    model = _qkv_bias_model(family)
    last = QKV_BIAS_FAMILIES[family][2]
    hidden = model.get_submodule(f"{last}.mlp.fc1").out_features
    rmtp.prune(model, pruner, calibration=_calibration(QKV_BIAS_FAMILIES[family][3]), **params)
    if pruner == "spp":
        assert model.get_submodule(f"{last}.mlp.fc1").out_features == hidden * 3 // 4
    else:
        assert float((model.get_submodule(f"{last}.attn.qkv").weight == 0).float().mean()) >= 0.25
    _qkv_bias_round_trip(model, family, tmp_path / "m")


@pytest.mark.parametrize(("family", "reason"), [("swinv2", "Swin attends within fixed windows"),
                                                ("beit", "BEiT adds a learned relative-position bias")])
def test_heads_and_token_pruners_are_refused_and_blocks_reconstruct(family: str, reason: str) -> None:
    calibration = _calibration(QKV_BIAS_FAMILIES[family][3])
    with pytest.raises(RmtpError, match="heads"):
        rmtp.prune(_qkv_bias_model(family), "spp", calibration=calibration, search="obs", ratio=0.25,
                   structures=["heads"])
    with pytest.raises(RmtpError, match=reason):
        rmtp.prune(_qkv_bias_model(family), "tome", r=2)
    dense, model = _qkv_bias_model(family), _qkv_bias_model(family)
    rmtp.prune(model, "magnitude", sparsity=0.5)
    report = rmtp.reconstruct(model, calibration, dense=dense, steps=2)
    assert [fit["block"] for fit in report.history] == get_plugins().architecture(family).blocks(model)
    assert all(fit["error_before"] > 0 for fit in report.history), "the pruned blocks differ from dense"
    assert all(fit["error_after"] < fit["error_before"] or not fit["kept"] for fit in report.history)


def test_structure_problems_answer_what_the_prune_would_raise() -> None:
    """Pruner.structure_problem, asked before a recipe's first step, in the words of the refusal."""
    plugins = get_plugins()
    eva, swin = plugins.architecture("eva"), plugins.architecture("swin")
    tome, spp = plugins.pruners.get("tome"), plugins.pruners.get("spp")
    assert tome.structure_problem(eva, _eva(), tome.Params(r=2)).startswith(
        "tome cannot reduce the tokens of this eva model: Eva blocks take rotary position embeddings")
    assert tome.structure_problem(swin, _swin(), tome.Params(r=2)).startswith(
        "tome cannot reduce the tokens of this swin model: Swin attends within fixed windows")
    assert "declares no couplings" in spp.structure_problem(eva, _eva(EVA02), spp.Params(search="obs", ratio=0.25))
    neurons = spp.Params(search="obs", ratio=0.25, structures=["neurons"])
    assert spp.structure_problem(eva, _eva(DINOV3), neurons) is None
    assert tome.structure_problem(plugins.architecture("deit"), _deit(), tome.Params(r=2)) is None


@pytest.mark.parametrize("command", ["validate", "prune"])
def test_a_recipe_reconstructing_eva_is_refused_before_its_first_step(tmp_path: Path, command: str) -> None:
    from conftest import write_recipe
    from typer.testing import CliRunner

    from rmtp.cli import build_app

    recipe = {"model": {"name": DINOV3, "kwargs": {**EVA_KWARGS, "in_chans": 1}},
              "data": {"name": "digits", "batch_size": 64, "calibration_size": 32},
              "steps": [{"prune": "magnitude", "params": {"sparsity": 0.5}}, {"reconstruct": {"steps": 2}}],
              "output": {"dir": str(tmp_path / "out")}}
    result = CliRunner().invoke(build_app(), [command, str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "steps[1] (reconstruct): reconstruct: architecture 'eva' declares no blocks" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()


def test_reconstruct_refuses_eva_whose_blocks_take_rotary_embeddings() -> None:
    """Block-wise reconstruction replays a block on its first input alone; an Eva block would run
    without its positions, so the family declares no blocks (and distillation is suggested)."""
    with pytest.raises(RmtpError, match="architecture 'eva' declares no blocks to reconstruct one by one .* "
                                        "distillation"):
        rmtp.reconstruct(_eva(), _calibration(32), dense=_eva())
