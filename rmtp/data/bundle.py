"""The splits of a run (:class:`DataBundle`): datasets, their loaders, and how their images were prepared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from rmtp.data.preprocessing import ImageTransforms, describe_preprocessing


@dataclass
class DataBundle:
    """The three fixed splits of a run.

    ``preprocessing`` says what the images went through (JSON-ready; :meth:`describe` in one line):
    the resolved ``input_size``, ``resize`` (the size before the crop, or ``native``),
    ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``, and which came from ``data:``
    keys (``from_recipe``) or the model's pretrained config (``from_model``); for digits the fixed
    preprocessing. ``transforms`` is the imagefolder preprocessing it was made from (None for digits).
    """

    train: Dataset
    val: Dataset
    calibration: Dataset
    num_classes: int
    batch_size: int
    num_workers: int = 0
    preprocessing: dict[str, Any] = field(default_factory=dict)
    transforms: ImageTransforms | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The preprocessing in one line, for the terminal (empty when not known)."""
        return describe_preprocessing(self.preprocessing) if self.preprocessing else ""

    def loader(self, split: Literal["train", "val", "calibration"], *, shuffle: bool = False,
               seed: int = 0, batch_size: int | None = None) -> DataLoader:
        dataset = {"train": self.train, "val": self.val, "calibration": self.calibration}[split]
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=generator, num_workers=self.num_workers)
