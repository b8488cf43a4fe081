"""Data splits: digits (embedded) and imagefolder (timm eval transforms), seeded and disjoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from rmtp.data import DataSpec, build_data, digits_tensors
from rmtp.errors import DataError

from conftest import TINY_VIT


@pytest.fixture(scope="module")
def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT)


def _indices(subset) -> list[int]:
    return list(subset.indices)


def test_digits_split_is_seeded_disjoint_and_complete(tiny_vit) -> None:
    a = build_data(DataSpec(val_fraction=0.25, calibration_size=100, split_seed=3), tiny_vit)
    b = build_data(DataSpec(val_fraction=0.25, calibration_size=100, split_seed=3), tiny_vit)
    c = build_data(DataSpec(val_fraction=0.25, calibration_size=100, split_seed=4), tiny_vit)
    assert _indices(a.train) == _indices(b.train) and _indices(a.val) == _indices(b.val)
    assert _indices(a.val) != _indices(c.val)
    assert set(_indices(a.train)).isdisjoint(_indices(a.val))
    assert len(a.train) + len(a.val) == 1797 and len(a.val) == round(1797 * 0.25)
    assert len(a.calibration) == 100
    train_items = {i for i in range(len(a.train))}
    assert set(a.calibration.indices) <= train_items  # calibration images come from the train split
    image, label = a.val[0]
    assert image.shape == (1, 16, 16) and 0 <= int(label) <= 9  # sized for the model


def test_digits_are_the_real_images_upsampled() -> None:
    from sklearn.datasets import load_digits

    images, labels = digits_tensors(8, 3)
    original = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    assert images.shape == (1797, 3, 8, 8)
    torch.testing.assert_close(images[:, 0] * 0.5 + 0.5, original)  # same size: only normalised
    assert torch.equal(images[:, 0], images[:, 2])
    assert labels.bincount().tolist() == np.bincount(load_digits().target).tolist()


def _write_folder(root: Path, classes: int = 2, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


def test_imagefolder_with_train_and_val(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "val", per_class=2)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                              num_heads=2, num_classes=2)
    bundle = build_data(DataSpec(name="imagefolder", root=tmp_path, calibration_size=4), model)
    assert (len(bundle.train), len(bundle.val), len(bundle.calibration), bundle.num_classes) == (6, 4, 4, 2)
    image, _ = bundle.val[0]
    assert image.shape == (3, 32, 32)  # timm's eval transform for the model's input size


def test_imagefolder_single_folder_is_split(tmp_path: Path) -> None:
    _write_folder(tmp_path, classes=3, per_class=4)
    model = timm.create_model("resnet18", num_classes=3)
    bundle = build_data(DataSpec(name="imagefolder", root=tmp_path, val_fraction=0.25), model)
    assert len(bundle.train) == 9 and len(bundle.val) == 3


def test_imagefolder_problems_are_data_errors(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(DataError, match="is not a folder"):
        build_data(DataSpec(name="imagefolder", root=tmp_path / "missing"), model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        build_data(DataSpec(name="imagefolder", root=tmp_path / "empty"), model)


def test_the_run_seed_does_not_move_the_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint trained on split 0 must be evaluated on the same held-out images whatever seed a
    recipe fine-tunes with; only data.split_seed changes the split."""
    import rmtp.pipeline
    from rmtp.recipe import load_recipe

    from conftest import tiny_recipe, write_recipe

    built = []

    def recording(spec, model):
        bundle = build_data(spec, model)
        built.append(_indices(bundle.val))
        return bundle

    monkeypatch.setattr(rmtp.pipeline, "build_data", recording)
    for name, seed, split_seed in (("a", 0, 0), ("b", 7, 0), ("c", 7, 5)):
        recipe = tiny_recipe([{"evaluate": {}}], seed=seed)
        recipe["data"]["split_seed"] = split_seed
        rmtp.pipeline.run_recipe(load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe)))
    assert built[0] == built[1] != built[2]
