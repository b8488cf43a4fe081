"""The seeded train/val split: fixed by ``data.split_seed`` alone, so every step and rerun sees the same images."""

from __future__ import annotations

import torch


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of ``n`` items, ``val_fraction`` of them (at least one) held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]
