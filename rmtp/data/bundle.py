"""The splits of a run (:class:`DataBundle`) and the seeded train/val split they come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset


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


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]
