"""Data splits: digits (embedded) and imagefolder (timm eval transforms), seeded and disjoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_VIT
from PIL import Image

from rmtp.data import DataSpec, build_data, digits_tensors
from rmtp.errors import DataError


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
    from conftest import tiny_recipe, write_recipe

    import rmtp.run.pipeline
    from rmtp.run.recipe import load_recipe

    built = []

    def recording(spec, model):
        bundle = build_data(spec, model)
        built.append(_indices(bundle.val))
        return bundle

    monkeypatch.setattr(rmtp.run.pipeline, "build_data", recording)
    for name, seed, split_seed in (("a", 0, 0), ("b", 7, 0), ("c", 7, 5)):
        recipe = tiny_recipe([{"evaluate": {}}], seed=seed)
        recipe["data"]["split_seed"] = split_seed
        rmtp.run.pipeline.run_recipe(load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe)))
    assert built[0] == built[1] != built[2]


# --- bad input: refused by name before any work (issue 11) ---------------------------------------


def _tiny_model(num_classes: int = 2, in_chans: int = 3):
    """A 32 px ViT, cheap to build, for imagefolder tests."""
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                             num_heads=2, num_classes=num_classes, in_chans=in_chans)


def _imagefolder(root: Path, **spec):
    return DataSpec(name="imagefolder", root=root, **spec)


def test_imagefolder_images_get_the_models_channels_and_normalisation(tmp_path: Path) -> None:
    """RGB files for a greyscale model are converted (they used to fail deep in the forward pass),
    normalised by the average of timm's three mean/std values; greyscale files for an RGB model too."""
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(2):
            Image.new("RGB", (20, 24), (100, 100, 100)).save(tmp_path / f"class{c}" / f"{i}.png")
    model = _tiny_model(in_chans=1)
    bundle = build_data(_imagefolder(tmp_path, val_fraction=0.5), model)
    image, _ = bundle.val[0]
    assert image.shape == (1, 32, 32)
    mean, std = (sum(model.pretrained_cfg[key]) / 3 for key in ("mean", "std"))
    assert len(model.pretrained_cfg["mean"]) == 3
    torch.testing.assert_close(image, torch.full_like(image, (100 / 255 - mean) / std), atol=1e-3, rtol=0)
    assert model(image[None]).shape == (1, 2)

    grey = tmp_path / "grey"
    _write_folder(grey)
    for path in grey.rglob("*.png"):
        Image.open(path).convert("L").save(path)
    image, _ = build_data(_imagefolder(grey), _tiny_model()).val[0]
    assert image.shape == (3, 32, 32)


def test_imagefolder_refuses_a_channel_count_images_do_not_have(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    with pytest.raises(DataError, match=rf"data.root: {tmp_path}.*model.kwargs.in_chans: 4"):
        build_data(_imagefolder(tmp_path), _tiny_model(in_chans=4))


@pytest.mark.parametrize("classes", [12, 3])
def test_imagefolder_class_count_must_match_the_head(tmp_path: Path, classes: int) -> None:
    """12 folders on a 10-class head was an IndexError in the loss; 3 a silently wrong run."""
    _write_folder(tmp_path, classes=classes, per_class=1)
    with pytest.raises(DataError, match=rf"data.root: {tmp_path} has {classes} classes but the model's head "
                                        rf"has 10 outputs; set model.kwargs.num_classes: {classes}"):
        build_data(_imagefolder(tmp_path), _tiny_model(num_classes=10))


def test_digits_class_count_must_match_the_head() -> None:
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "num_classes": 5})
    with pytest.raises(DataError, match="digits has 10 classes .* set model.kwargs.num_classes: 10"):
        build_data(DataSpec(), model)


def test_imagefolder_train_and_val_must_have_the_same_classes(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", classes=3, per_class=1)
    _write_folder(tmp_path / "val", classes=2, per_class=1)
    with pytest.raises(DataError, match=rf"{tmp_path / 'train'} and {tmp_path / 'val'} .*only in train/: class2"):
        build_data(_imagefolder(tmp_path), _tiny_model())


def test_imagefolder_with_train_but_no_val_is_refused(tmp_path: Path) -> None:
    """It used to be read as one folder whose single class is called "train"."""
    _write_folder(tmp_path / "train")
    with pytest.raises(DataError, match=rf"has train/ but no val/.*set data.root to {tmp_path / 'train'}"):
        build_data(_imagefolder(tmp_path), _tiny_model())


def test_a_corrupt_image_is_named(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    bad = tmp_path / "class1" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    bundle = build_data(_imagefolder(tmp_path, val_fraction=0.5), _tiny_model())
    dataset = bundle.val.dataset
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(DataError, match=rf"^data.root: cannot read image {bad}: "):
        dataset[index]


def test_a_corrupt_image_in_a_worker_arrives_as_one_line(tmp_path: Path) -> None:
    """torch re-raises a worker's exception as ``type(message with the worker's traceback)``: the
    error must still be the one line naming the file."""
    _write_folder(tmp_path)
    bad = tmp_path / "class0" / "bad.png"
    bad.write_bytes(b"")
    bundle = build_data(_imagefolder(tmp_path, val_fraction=0.5, num_workers=2, batch_size=1), _tiny_model())
    with pytest.raises(DataError) as caught:
        for _ in bundle.loader("train"):
            pass
        for _ in bundle.loader("val"):
            pass
    message = str(caught.value)
    assert message.startswith(f"data.root: cannot read image {bad}: ") and "\n" not in message


def test_imagefolder_layout_problems_are_named(tmp_path: Path) -> None:
    model = _tiny_model()
    empty_class = tmp_path / "empty_class"
    _write_folder(empty_class)
    (empty_class / "class2").mkdir()
    (empty_class / "class2" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"{empty_class}: no images in class folder\(s\) class2"):
        build_data(_imagefolder(empty_class), _tiny_model(num_classes=3))

    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    with pytest.raises(DataError, match="holds images but no class subfolders"):
        build_data(_imagefolder(loose), model)



def test_imagefolder_ignores_hidden_folders_and_non_image_files(tmp_path: Path) -> None:
    """A .ipynb_checkpoints folder used to become an (empty) class, shifting every label; a ._*.png
    resource fork, a corrupt image mid-run."""
    _write_folder(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "class0" / "README.txt").write_text("about these images")
    (tmp_path / "class0" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "class0" / "._0.png").write_bytes(b"\0\5\26\7")  # a macOS resource fork, not a PNG
    bundle = build_data(_imagefolder(tmp_path, val_fraction=0.5), _tiny_model())
    assert bundle.num_classes == 2 and len(bundle.train) + len(bundle.val) == 6


def test_imagefolder_too_small_to_split(tmp_path: Path) -> None:
    _write_folder(tmp_path, classes=2, per_class=1)
    with pytest.raises(DataError, match="has only 2 image\\(s\\): too few to split"):
        build_data(_imagefolder(tmp_path, val_fraction=0.9), _tiny_model())


def test_digits_img_size_the_model_cannot_take(tiny_vit) -> None:
    """A ViT takes only its own size: 8 px digits on a 16 px ViT was an AssertionError mid-run."""
    with pytest.raises(DataError, match=r"data.img_size: the model cannot take 8x8 digits .*\(16x16\)"):
        build_data(DataSpec(img_size=8), tiny_vit)
    assert tiny_vit.training  # the trial forward leaves the model's mode alone
    build_data(DataSpec(img_size=16), tiny_vit)


def test_validate_catches_imagefolder_problems(tmp_path: Path) -> None:
    from conftest import tiny_recipe

    from rmtp.errors import RecipeError
    from rmtp.run.recipe import parse_recipe

    _write_folder(tmp_path / "images", classes=3, per_class=1)
    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["data"] = {"name": "imagefolder", "root": str(tmp_path / "images")}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe)
    expected = (f"<recipe>: data.root: {tmp_path / 'images'} has 3 classes but the model's head has 10 outputs; "
                "set model.kwargs.num_classes: 3, or use data with 10 classes")
    assert caught.value.problems == [expected]
    recipe["model"]["kwargs"] = {**recipe["model"]["kwargs"], "num_classes": 3, "in_chans": 4}
    with pytest.raises(RecipeError, match="model.kwargs.in_chans: 4"):
        parse_recipe(recipe)
    recipe["model"]["kwargs"]["in_chans"] = 1
    assert parse_recipe(recipe).data.root == tmp_path / "images"


def test_validate_names_class_folders_without_images(tmp_path: Path) -> None:
    """Empty class folders passed validation and failed only when the run read the data."""
    from conftest import tiny_recipe

    from rmtp.errors import RecipeError
    from rmtp.run.recipe import parse_recipe

    root = tmp_path / "images"
    _write_folder(root, classes=2, per_class=1)
    for name in ("c", "d", "e", "f", "g", "h", "nested"):
        (root / name).mkdir()
    (root / "c" / "notes.txt").write_text("not an image")
    (root / "nested" / "deeper").mkdir()  # an image below a class folder is that class's, as in torchvision
    shutil.copy(root / "class0" / "0.png", root / "nested" / "deeper" / "0.png")
    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["data"] = {"name": "imagefolder", "root": str(root)}
    recipe["model"]["kwargs"] = {**recipe["model"]["kwargs"], "num_classes": 9}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe)
    assert caught.value.problems == [f"<recipe>: data.root: {root}: no images in class folder(s) c, d, e, f, g "
                                     f"and 1 more (looked for .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)"]
    recipe["model"]["kwargs"]["num_classes"] = 10  # the count would be wrong too: said once the folders hold images
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe)
    assert len(caught.value.problems) == 1 and "no images in class folder(s)" in caught.value.problems[0]
