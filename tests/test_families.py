"""The families added through one architecture module each, with no pruner edited: ``deit``
(distilled DeiT, two prefix tokens and two heads) and ``swin`` (window attention). Every pruner
that makes sense works; the others are refused with the family's reason.

Tiny timm models (32 px DeiT, 56 px Swin with two one-block stages) keep each test under a second.
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
from rmtp.errors import RmtpError
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


def _round_trip(model: nn.Module, folder: Path, images: torch.Tensor) -> nn.Module:
    """``model`` saved (architecture inferred, spec given: tiny kwargs cannot be read back) and
    reloaded; outputs equal bit for bit."""
    with torch.no_grad():
        expected = model(images)
    deit = images.shape[-1] == 32
    spec = ModelSpec(name="deit_tiny_distilled_patch16_224" if deit else "swin_tiny_patch4_window7_224",
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


@pytest.mark.parametrize("pruner", ["tome", "token-cls", "token-mean"])
def test_token_pruners_refuse_swin_with_the_reason(pruner: str) -> None:
    model = _swin()
    with pytest.raises(RmtpError, match=f"{pruner} cannot reduce the tokens of this swin model: Swin attends "
                                        f"within fixed windows"):
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
