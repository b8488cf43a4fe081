"""Top-1 accuracy: what pruning costs, measured the same way for the dense and the pruned model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from rmtp.data.bundle import batch_images
from rmtp.errors import DataError
from rmtp.measure.running import check_model_on, evaluating
from rmtp.run.device import DeviceLike, resolve_device
from rmtp.run.precision import autocast, check_precision

__all__ = ["ProgressCallback", "agreement", "top1"]

ProgressCallback = Callable[[int, "int | None"], None]
#: Why :func:`top1` refuses unlabeled images.
UNLABELED_TOP1 = ("top-1 needs labels, and the data is unlabeled (data.unlabeled: true); measure top-1 agreement "
                  "with the dense model instead (an evaluate step does; so does rmtp.evaluate(model, data, "
                  "dense=dense) with data a spec or bundle whose unlabeled is true)")


def _total_batches(loader: DataLoader, limit: int | None) -> int | None:
    """How many batches :func:`top1` will see, for the progress bar (None when unknowable)."""
    try:
        total = len(loader)
    except TypeError:
        return None
    batch_size = getattr(loader, "batch_size", None)
    if limit is not None and batch_size:
        total = min(total, math.ceil(limit / batch_size))
    return total


def top1(model: nn.Module, loader: DataLoader, *, device: DeviceLike,
         progress: ProgressCallback | None = None, limit: int | None = None, precision: str = "fp32") -> float:
    """Top-1 accuracy in percent over a loader of ``(images, labels)`` batches.

    Runs in eval mode under ``inference_mode`` (restoring the model's modes afterwards).
    ``limit`` caps the number of images (the last batch is cut), for quick checks.
    ``progress(done_batches, total_batches)`` is called after every batch so the caller can
    drive a progress bar; ``total_batches`` is None for loaders without a length.
    ``precision`` (``fp32``, ``bf16``, ``fp16`` on CUDA) runs the forward passes under autocast
    (:mod:`rmtp.run.precision`), as a fine-tune in that precision trains.

    Unlabeled images (a negative label: ``data.unlabeled``) are refused: there is no top-1 to give,
    and counting them as wrong would report a fake 0% (:func:`agreement` compares with a reference).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    dev = resolve_device(device)
    check_precision(precision, dev, option="precision")
    check_model_on(model, dev)
    total_batches = _total_batches(loader, limit)
    correct = seen = done = 0
    with evaluating(model), torch.inference_mode():
        for images, labels in loader:
            if limit is not None:
                images, labels = images[: limit - seen], labels[: limit - seen]
            images = images.to(dev, non_blocking=True)
            if bool((labels < 0).any()):
                raise DataError(UNLABELED_TOP1)
            labels = labels.to(dev, non_blocking=True)
            with autocast(precision, dev):
                logits = model(images)
            correct += int((logits.argmax(dim=-1) == labels).sum())
            seen += int(labels.shape[0])
            done += 1
            if progress is not None:
                progress(done, total_batches)
            if limit is not None and seen >= limit:
                break
    if seen == 0:
        raise DataError("top1: the loader yielded no images to evaluate")
    return 100.0 * correct / seen


def agreement(model: nn.Module, reference: nn.Module, loader: DataLoader, *, device: DeviceLike,
              progress: ProgressCallback | None = None, precision: str = "fp32") -> float:
    """Top-1 agreement in percent: the share of ``loader``'s images (labels, if any, unused) on which
    ``model``'s top class is ``reference``'s (the dense model's). What a pruned model is judged by on
    unlabeled data; 100 for the reference itself. Both run in eval mode (modes restored)."""
    dev = resolve_device(device)
    check_precision(precision, dev, option="precision")
    check_model_on(model, dev)
    total_batches = _total_batches(loader, None)
    agree = seen = done = 0
    with evaluating(model), evaluating(reference), torch.inference_mode():
        for batch in loader:
            images = batch_images(batch).to(dev, non_blocking=True)
            with autocast(precision, dev):
                agree += int((model(images).argmax(dim=-1) == reference(images).argmax(dim=-1)).sum())
            seen += int(images.shape[0])
            done += 1
            if progress is not None:
                progress(done, total_batches)
    if seen == 0:
        raise DataError("agreement: the loader yielded no images to compare on")
    return 100.0 * agree / seen
