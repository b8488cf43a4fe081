"""The committed reference checkpoint loads through the vit plugin and scores what its card records."""

from __future__ import annotations

import json

import pytest

from rmtp.architecture import ModelSpec
from rmtp.data import DataSpec, build_data
from rmtp.metrics import top1
from rmtp.plugins import get_plugins

from conftest import REPO

CARD = REPO / "models" / "digits_vit.json"


def test_reference_model_reaches_recorded_accuracy() -> None:
    card = json.loads(CARD.read_text())
    spec = ModelSpec(name=card["timm_name"], kwargs=card["kwargs"], checkpoint=REPO / "models" / "digits_vit.safetensors")
    model = get_plugins().architecture_for(spec.name).create(spec)
    bundle = build_data(DataSpec(name="digits", split_seed=card["data"]["split_seed"]), model)
    accuracy = top1(model, bundle.loader("val", batch_size=128), device="cpu")
    assert accuracy == pytest.approx(card["final_val_top1_percent"], abs=1e-9)
    assert accuracy >= 97.0
