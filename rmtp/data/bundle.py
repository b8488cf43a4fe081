"""The splits of a run (:class:`DataBundle`): datasets, their loaders, and how their images were prepared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from rmtp.data.augment import TrainAugment, train_transform
from rmtp.data.imagefolder import with_transform
from rmtp.data.preprocessing import ImageTransforms, describe_preprocessing
from rmtp.data.spec import UNLABELED
from rmtp.errors import DataError


def batch_images(batch: object) -> torch.Tensor:
    """The images of one loader batch: ``(images, labels, ...)`` or the images alone (an unlabeled
    loader). Every calibration pass reads batches through this, so they accept the same loaders."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch  # type: ignore[index,return-value]


def has_length(dataset: object) -> bool:
    """Whether ``dataset`` is map-style with a length (not an ``IterableDataset``): its images can be
    counted, indexed and split without reading it through."""
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__")

@dataclass
class DataBundle:
    """The three fixed splits of a run.

    ``preprocessing`` says what the images went through (JSON-ready; :meth:`describe` in one line):
    the resolved ``input_size``, ``resize`` (the size before the crop, or ``native``),
    ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``, and which came from ``data:``
    keys (``from_recipe``) or the model's pretrained config (``from_model``); for digits the fixed
    preprocessing. ``transforms`` is the imagefolder preprocessing it was made from (None for digits).

    ``labeled`` is False for unlabeled images (``data.unlabeled: true``, :func:`unlabeled_bundle`):
    every label is :data:`~rmtp.data.spec.UNLABELED`, and only label-free work runs on them
    (distillation alone, reconstruction, calibration; agreement with the dense model, not top-1).
    """

    train: Dataset
    val: Dataset
    calibration: Dataset
    num_classes: int
    batch_size: int
    num_workers: int = 0
    preprocessing: dict[str, Any] = field(default_factory=dict)
    transforms: ImageTransforms | None = field(default=None, repr=False)
    labeled: bool = True

    def describe(self) -> str:
        """The preprocessing in one line, for the terminal (empty when not known)."""
        return describe_preprocessing(self.preprocessing) if self.preprocessing else ""

    def train_with(self, augment: TrainAugment) -> Dataset:
        """The train split (same images, labels and order) through timm's training transform:
        ``timm.data.create_transform(input_size, is_training=True, ...)`` with ``augment``'s values,
        this run's input size and mean/std (:func:`rmtp.data.augment.train_transform`).

        imagefolder only: the digits are tensors, not PIL images; they keep their ±2 px shift
        augmentation (``finetune: augment: true``). The calibration and val splits keep the eval transform.
        """
        if self.transforms is None:
            raise DataError("timm's training augmentation needs data: imagefolder (PIL images); the digits are "
                            "tensors and keep their own augmentation (random ±2 px shifts, finetune augment: true)")
        return with_transform(self.train, train_transform(augment, self.transforms))

    def loader(self, split: Literal["train", "val", "calibration"], *, shuffle: bool = False,
               seed: int = 0, batch_size: int | None = None, num_workers: int | None = None,
               pin_memory: bool = False, persistent_workers: bool = False,
               augment: TrainAugment | None = None) -> DataLoader:
        """A DataLoader over ``split``: seeded shuffling, ``batch_size`` and ``num_workers``
        defaulting to the data's; ``pin_memory``/``persistent_workers`` as torch's (the latter needs
        workers); ``augment``: the train split through timm's training transform (:meth:`train_with`)."""
        workers = self.num_workers if num_workers is None else num_workers
        if persistent_workers and workers == 0:
            raise DataError("persistent_workers: true keeps DataLoader workers alive between epochs, but "
                            "num_workers is 0 (no workers); set num_workers > 0 or drop persistent_workers")
        if augment is not None and split != "train":
            raise DataError(f"augment is for the train split; the {split} split keeps the eval transform")
        dataset = {"train": self.train, "val": self.val, "calibration": self.calibration}[split]
        if augment is not None:
            dataset = self.train_with(augment)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=generator, num_workers=workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers)


class UnlabeledImages(Dataset):
    """The images of any dataset, each as ``(image, UNLABELED)``: items that are an image alone or a
    tuple/list whose first element is the image (a label there is dropped)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(image, torch.Tensor):
            raise DataError(f"unlabeled data: item {index} is {type(image).__name__}, not an image tensor; give a "
                            f"dataset of image tensors (C, H, W) or of (image, anything) pairs")
        return image, UNLABELED


def unlabeled_bundle(train: Dataset, *, val: Dataset | None = None, batch_size: int = 64,
                     num_workers: int = 0, num_classes: int = 0) -> DataBundle:
    """A :class:`DataBundle` of unlabeled images (``labeled`` False) from datasets of images or of
    (image, label) pairs, labels dropped: what ``rmtp.finetune(model, loader, ...)`` trains a
    distillation on. ``val`` (default: none) is where agreement with the teacher is measured after
    each epoch; the calibration split is the train split."""
    images = UnlabeledImages(train)
    if len(images) == 0:
        raise DataError("unlabeled data: the dataset is empty")
    held_out = UnlabeledImages(val) if val is not None else Subset(images, [])
    return DataBundle(train=images, val=held_out, calibration=images, num_classes=num_classes,
                      batch_size=batch_size, num_workers=num_workers, labeled=False)
