"""Datasets for pruning, calibration, fine-tuning and evaluation.

``digits`` is scikit-learn's embedded ``load_digits`` (1,797 real 8×8 handwritten digits, no
download), upsampled to the model's input size: the default for the quickstart and the tests.
``imagefolder`` is torchvision's ``ImageFolder`` with timm's eval transform for the model.
Splits are fixed by the seed, so every step of a run, and every rerun, sees the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from rmtp.errors import DataError

#: Normalisation of the digits images (pixel values scaled to [0, 1] first).
DIGITS_MEAN = 0.5
DIGITS_STD = 0.5


class DataSpec(BaseModel):
    """The ``data:`` section of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["digits", "imagefolder"] = "digits"
    root: Path | None = Field(None, description="imagefolder: a folder with train/ and val/ subfolders, or one folder to split")
    img_size: int | None = Field(None, ge=8, le=1024, description="digits: side to upsample to (default: the model's input size)")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share held out for validation when the data has no val/ folder")
    calibration_size: int = Field(256, ge=1, description="images from the train split that pruners needing calibration see")
    batch_size: int = Field(64, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    eval_limit: int | None = Field(None, ge=1, description="evaluate on at most this many val images (quick checks)")
    split_seed: int = Field(0, ge=0, description="seed of the train/val split and the calibration subset; "
                                                  "independent of the recipe's seed, so changing the run's "
                                                  "seed never moves images between train and val")


@dataclass
class DataBundle:
    """The three fixed splits of a run."""

    train: Dataset
    val: Dataset
    calibration: Dataset
    num_classes: int
    batch_size: int
    num_workers: int = 0

    def loader(self, split: Literal["train", "val", "calibration"], *, shuffle: bool = False,
               seed: int = 0, batch_size: int | None = None) -> DataLoader:
        dataset = {"train": self.train, "val": self.val, "calibration": self.calibration}[split]
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=generator, num_workers=self.num_workers)


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model expects, from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)  # timm ViTs built with img_size=...
    in_chans = _first_conv_in_channels(model)
    if img_size is not None:
        return in_chans, int(img_size[0]), int(img_size[1])
    if size is not None:
        return in_chans, int(size[1]), int(size[2])
    return in_chans, 224, 224


def _first_conv_in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def digits_tensors(img_size: int, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as a normalised float tensor (N, in_chans, img_size, img_size) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear",
                                             align_corners=False)
    images = ((images - DIGITS_MEAN) / DIGITS_STD).repeat(1, in_chans, 1, 1)
    return images, torch.tensor(digits.target, dtype=torch.long)


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


def data_input_size(spec: DataSpec, model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images ``spec`` gives ``model``: the digits at ``img_size``
    when set (a ResNet or ConvNeXt accepts any size, and its timm config says 224), else what the
    model expects (:func:`model_input_size`, which imagefolder transforms follow too)."""
    in_chans, height, width = model_input_size(model)
    if spec.name == "digits" and spec.img_size is not None:
        return in_chans, spec.img_size, spec.img_size
    return in_chans, height, width


def saved_split_seed(recipe: dict) -> object:
    """The split seed of a saved, resolved recipe (a dict as read from ``recipe.yaml``).

    ``data.split_seed`` when present; recipes saved before it existed split by the run's ``seed``.
    Returned unvalidated (callers report a bad value in their own words).
    """
    data = recipe.get("data") or {}
    if isinstance(data, dict) and "split_seed" in data:
        return data["split_seed"]
    return recipe.get("seed", 0)


def build_data(spec: DataSpec, model: nn.Module) -> DataBundle:
    """Build the train/val/calibration splits ``spec`` describes, shaped for ``model``.

    The splits depend on ``spec.split_seed`` only, never on a run's seed: a checkpoint trained on
    one split (the reference model: split seed 0) must be evaluated on images it has not seen,
    whatever seed a recipe fine-tunes with.
    """
    seed = spec.split_seed
    in_chans, height, _ = model_input_size(model)
    if spec.name == "digits":
        images, labels = digits_tensors(spec.img_size or height, in_chans)
        full: Dataset = TensorDataset(images, labels)
        train_idx, val_idx = _split_indices(len(labels), spec.val_fraction, seed)
        train, val, num_classes = Subset(full, train_idx), Subset(full, val_idx), 10
    else:
        train, val, num_classes = _imagefolder_splits(spec, model, seed)
    if spec.eval_limit is not None and len(val) > spec.eval_limit:
        val = Subset(val, list(range(spec.eval_limit)))
    n_cal = min(spec.calibration_size, len(train))
    cal_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:n_cal]
    calibration = Subset(train, cal_idx.tolist())
    return DataBundle(train=train, val=val, calibration=calibration, num_classes=num_classes,
                      batch_size=spec.batch_size, num_workers=spec.num_workers)


def _imagefolder_splits(spec: DataSpec, model: nn.Module, seed: int) -> tuple[Dataset, Dataset, int]:
    import timm.data
    from torchvision.datasets import ImageFolder

    root = spec.root
    if root is None or not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder (imagefolder needs class subfolders)")
    # The model's own input size wins over its pretrained config (a ViT built with img_size=384
    # keeps a 224 pretrained_cfg).
    config = timm.data.resolve_data_config({"input_size": model_input_size(model)}, model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = ImageFolder(str(root / "train"), transform=transform)
            val = ImageFolder(str(root / "val"), transform=transform)
            if train.classes != val.classes:
                raise DataError(f"data.root: {root}/train and {root}/val have different class folders")
            return train, val, len(train.classes)
        full = ImageFolder(str(root), transform=transform)
    except FileNotFoundError as exc:
        raise DataError(f"data.root: {root} is empty or has no class subfolders with images ({exc})") from exc
    train_idx, val_idx = _split_indices(len(full), spec.val_fraction, seed)
    return Subset(full, train_idx), Subset(full, val_idx), len(full.classes)
