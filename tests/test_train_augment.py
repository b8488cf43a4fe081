"""timm's training transform for ``finetune: augment: timm`` (``DataBundle.train_with``,
``TrainAugment``) and the loader settings fine-tuning passes (issue 14)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from test_preprocessing import _folder, _images, _meta_model, write_digits

from rmtp.data import DataSpec, TrainAugment, build_data
from rmtp.errors import DataError


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


AUGMENTS = [
    TrainAugment(),
    TrainAugment(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", hflip=0.0),
    TrainAugment(auto_augment="augmix-m5-w4-d2", vflip=0.5, interpolation="random", scale=(0.5, 1.0)),
    TrainAugment(color_jitter=(0.4, 0.4, 0.4, 0.1), re_prob=1.0, re_count=2, ratio=(0.5, 2.0)),
]


@pytest.mark.parametrize("augment", AUGMENTS, ids=["defaults", "randaugment", "augmix", "jitter-erase"])
def test_train_with_is_timms_training_transform(digits_folder: Path, augment: TrainAugment) -> None:
    model = _meta_model("test_efficientnet")
    bundle = build_data(_folder(digits_folder, interpolation="bilinear"), model)
    train = bundle.train_with(augment)
    config = timm.data.resolve_data_config({"interpolation": "bilinear"}, model=model)
    theirs = timm.data.create_transform(
        config["input_size"], is_training=True, auto_augment=augment.auto_augment, re_prob=augment.re_prob,
        re_mode=augment.re_mode, re_count=augment.re_count, hflip=augment.hflip, vflip=augment.vflip,
        color_jitter=augment.color_jitter, scale=augment.scale, ratio=augment.ratio,
        interpolation=augment.interpolation or "bilinear", mean=config["mean"], std=config["std"])
    assert repr(train.transform) == repr(theirs)
    assert train.samples == bundle.train.samples and train.targets == bundle.train.targets
    assert bundle.train.transform is bundle.val.transform  # the bundle's own splits keep the eval transform
    for image in _images(digits_folder, count=3):
        outputs = []
        for transform in (train.transform, theirs):
            random.seed(1)
            np.random.seed(1)
            torch.manual_seed(1)
            outputs.append(transform(image))
        assert torch.equal(*outputs)
    image, label = train[0]
    assert image.shape == (3, 160, 160) and label == bundle.train[0][1]


def test_train_with_keeps_a_split_folders_subset(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (20 + i, 24)).save(tmp_path / label / f"{i}.png")
    bundle = build_data(_folder(tmp_path, resize="native", val_fraction=0.3),
                        timm.create_model("test_resnet", num_classes=2))
    train = bundle.train_with(TrainAugment(hflip=1.0))
    assert train.indices == bundle.train.indices
    assert train.dataset.native_size is None and bundle.train.dataset.native_size == (24, 20)
    assert train[0][0].shape == (3, 24, 20)  # random resized crop to the native size: any image size passes


def test_digits_refuse_timm_augmentation() -> None:
    from conftest import TINY_VIT

    bundle = build_data(DataSpec(), timm.create_model("vit_tiny_patch16_224", **TINY_VIT))
    with pytest.raises(DataError, match=r"timm's training augmentation needs data: imagefolder .*digits are tensors "
                                        r"and keep their own augmentation \(random ±2 px shifts"):
        bundle.train_with(TrainAugment())


@pytest.mark.parametrize(("keys", "message"), [
    ({"auto_augment": "rand-x9"}, "timm cannot read the auto_augment policy (Unknown RandAugment config section)"),
    ({"auto_augment": "autoaug"}, "timm cannot read the auto_augment policy (Unknown AA policy autoaug)"),
    ({"scale": (0.5, 0.1)}, "scale is a [low, high] range with 0 < low <= high <= 1"),
    ({"color_jitter": [0.4, 0.4]}, "color_jitter takes one factor"),
    ({"re_prob": 1.5}, "Input should be less than or equal to 1"),
    ({"interpolation": "cubic"},
     "Input should be 'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos' or 'random'"),
])
def test_train_augment_validates(keys: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        TrainAugment(**keys)
    assert caught.value.errors()[0]["msg"].startswith(message)


def test_loader_settings(digits_folder: Path) -> None:
    from conftest import TINY_VIT

    bundle = build_data(DataSpec(num_workers=0), timm.create_model("vit_tiny_patch16_224", **TINY_VIT))
    default = bundle.loader("val")
    assert (default.num_workers, default.pin_memory, default.persistent_workers) == (0, False, False)
    assert default.batch_size == 64
    tuned = bundle.loader("train", num_workers=1, pin_memory=True, persistent_workers=True, batch_size=8)
    assert (tuned.num_workers, tuned.pin_memory, tuned.persistent_workers, tuned.batch_size) == (1, True, True, 8)
    with pytest.raises(DataError, match=r"^persistent_workers: true keeps DataLoader workers alive .* num_workers "
                                        r"is 0 \(no workers\); set num_workers > 0"):
        bundle.loader("train", persistent_workers=True)
    images = build_data(_folder(digits_folder), _meta_model("test_vit"))
    augmented = images.loader("train", augment=TrainAugment())
    assert repr(augmented.dataset.transform) == repr(images.train_with(TrainAugment()).transform)
    with pytest.raises(DataError, match="augment is for the train split"):
        images.loader("val", augment=TrainAugment())
