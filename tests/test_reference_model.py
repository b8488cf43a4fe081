"""The committed reference checkpoints load through their architecture plugins and score what their cards record."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from rmtp.contract.architecture import ModelSpec
from rmtp.data import DataSpec, build_data
from rmtp.measure import top1
from rmtp.plugins import get_plugins

CARD = REPO / "models" / "digits_vit.json"
RESNET_CARD = REPO / "models" / "digits_resnet.json"


def test_reference_model_reaches_recorded_accuracy() -> None:
    card = json.loads(CARD.read_text())
    spec = ModelSpec(name=card["timm_name"], kwargs=card["kwargs"],
                     checkpoint=REPO / "models" / "digits_vit.safetensors")
    model = get_plugins().architecture_for(spec.name).create(spec)
    bundle = build_data(DataSpec(name="digits", split_seed=card["data"]["split_seed"]), model)
    accuracy = top1(model, bundle.loader("val", batch_size=128), device="cpu")
    assert accuracy == pytest.approx(card["final_val_top1_percent"], abs=1e-9)
    assert accuracy >= 97.0


def test_reference_resnet_reaches_recorded_accuracy() -> None:
    """The conv reference: a bottleneck ResNet, built by the resnet plugin from its card alone."""
    card = json.loads(RESNET_CARD.read_text())
    spec = ModelSpec(name=card["timm_name"], kwargs=card["kwargs"],
                     checkpoint=REPO / "models" / "digits_resnet.safetensors")
    architecture = get_plugins().architecture_for(spec.name)
    assert architecture.name == "resnet"
    model = architecture.create(spec)
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    # A timm ResNet's pretrained_cfg says 224 px: the card's data section carries the real 32 px.
    data = DataSpec(name="digits", img_size=card["data"]["img_size"], split_seed=card["data"]["split_seed"])
    assert data.img_size == 32 and data.split_seed == 0
    bundle = build_data(data, model)
    assert len(bundle.val) == card["data"]["val_images"]
    accuracy = top1(model, bundle.loader("val", batch_size=128), device="cpu")
    assert accuracy == pytest.approx(card["final_val_top1_percent"], abs=1e-9)
    assert accuracy >= 97.0
    # Every block conv and shortcut is big enough for an MP fit at the default min_dim (32).
    convs = {layer.name: model.get_submodule(layer.name) for layer in architecture.prunable_layers(model)
             if layer.role in ("conv1", "conv2", "conv3", "downsample")}
    assert len(convs) == 4 * 2 * 3 + 4
    for name, conv in convs.items():
        k = conv.kernel_size[0] * conv.kernel_size[1]
        assert min(conv.out_channels, conv.in_channels * k) >= 32, name
