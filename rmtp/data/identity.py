"""What a run's data *is*, cheaply: enough for ``--resume`` to tell that the images changed.

A resumed fine-tune continues its shuffle by position: with images deleted or added, the same
positions are other images, and the run would "complete" on data it never started with. So a
checkpoint records the data's identity (:func:`data_identity`) and a resume compares it
(:func:`data_changes`), naming what changed (``train: 1438 → 719 images``).

Per split (train, val, as the run uses them): the image count, and for image folders a SHA-256 of
the sorted (path relative to ``data.root``, size in bytes) list. That is one ``stat`` per file
and no image opened: seconds for ImageNet's 1.3M files on a local disk. The digits are built in
and fixed, so their name and split sizes are their identity.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from rmtp.data.bundle import DataBundle
from rmtp.data.imagefolder import ImageFiles
from rmtp.data.spec import DataSpec
from rmtp.errors import DataError

#: The splits whose identity is recorded (calibration is drawn from train by the recipe's seeds).
SPLITS = ("train", "val")


def data_identity(spec: DataSpec, bundle: DataBundle) -> dict[str, Any]:
    """``{"dataset": name, "splits": {split: {"images": n, "files": digest}}}`` (JSON-ready;
    ``files`` only for image folders)."""
    return {"dataset": spec.name,
            "splits": {split: _split_identity(getattr(bundle, split), spec.root) for split in SPLITS}}


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two :func:`data_identity` results, one phrase per split
    (``train: 1438 → 719 images``); empty when the data is the same."""
    changes = []
    if saved.get("dataset") != current.get("dataset"):
        changes.append(f"dataset: {saved.get('dataset')} → {current.get('dataset')}")
    old_splits, new_splits = _splits(saved), _splits(current)
    for split in sorted(set(old_splits) | set(new_splits)):
        old, new = old_splits.get(split, {}), new_splits.get(split, {})
        if old.get("images") != new.get("images"):
            changes.append(f"{split}: {old.get('images', 'no')} → {new.get('images', 'no')} images")
        elif old.get("files") != new.get("files"):
            changes.append(f"{split}: {new.get('images')} images as before, but files renamed, replaced or resized")
    return changes


def _splits(identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    splits = identity.get("splits")
    if not isinstance(splits, dict):
        return {}
    return {str(name): value for name, value in splits.items() if isinstance(value, dict)}


def _split_identity(dataset: Dataset, root: Path | None) -> dict[str, Any]:
    files = _image_paths(dataset)
    if files is None:
        return {"images": len(dataset)}
    return {"images": len(files), "files": _files_digest(files, root)}


def _image_paths(dataset: Dataset) -> list[str] | None:
    """The files of a split's images, through Subsets; None for data not read from files."""
    if isinstance(dataset, Subset):
        inner = _image_paths(dataset.dataset)
        return None if inner is None else [inner[int(index)] for index in dataset.indices]
    if isinstance(dataset, ImageFiles):
        return [path for path, _ in dataset.samples]
    return None


def _files_digest(paths: list[str], root: Path | None) -> str:
    """SHA-256 of the sorted ``relative path NUL size`` lines: order-free, and the same wherever
    the data root is mounted (a moved root is a recipe change, named as such)."""
    prefix = os.path.join(str(root), "") if root is not None else ""
    lines = sorted(f"{_relative(path, prefix)}\0{_size(path)}" for path in paths)
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _relative(path: str, prefix: str) -> str:
    """``path`` below the data root (the image paths are listed from it: a prefix cut, not
    ``os.path.relpath``'s normalisation, which costs seconds on a million files)."""
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:  # deleted since the folder was listed, unreadable
        raise DataError(f"data.root: cannot read {path}: {exc.strerror or exc}") from None
