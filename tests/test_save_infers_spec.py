"""``rmtp.save(model, folder)`` for a timm model in hand: spec and architecture inferred (issue 22)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.errors import RmtpError


def test_a_timm_model_with_a_new_head_size_and_channels_saves_and_reloads_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, in_chans=1).eval()
    images = torch.randn(2, 1, 32, 32)
    folder = rmtp.save(model, tmp_path / "m")
    loaded = rmtp.load(folder)
    assert loaded.arch == "vit"
    assert loaded.spec.kwargs == {"num_classes": 10, "img_size": [32, 32], "in_chans": 1}
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_a_pruned_timm_model_saves_without_internals(tmp_path: Path) -> None:
    """spp slices layers and patches head counts: the replaced layers travel, the spec is the dense one."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, in_chans=1).eval()
    data = TensorDataset(torch.randn(32, 1, 32, 32), torch.zeros(32, dtype=torch.long))
    rmtp.prune(model, "spp", dense=rmtp.frozen_copy(model), calibration=DataLoader(data, batch_size=16),
               search="obs", ratio=0.5)
    loaded = rmtp.load(rmtp.save(model, tmp_path / "pruned"))
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_resnet_classes_and_channels_are_read_back(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", num_classes=7, in_chans=1).eval()
    assert rmtp.load(rmtp.save(model, tmp_path / "r")).spec.kwargs == {"num_classes": 7, "in_chans": 1}


def test_a_model_whose_build_cannot_be_read_back_asks_for_spec(tmp_path: Path) -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2)
    with pytest.raises(RmtpError, match=r"blocks\.10\..*no such entry.*pass spec=rmtp\.ModelSpec"):
        rmtp.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_model_that_is_not_timm_asks_for_spec_and_arch(tmp_path: Path) -> None:
    with pytest.raises(RmtpError, match="pass arch="):
        rmtp.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "m")
