"""How far a pruned model is from the dense model on calibration images: top-1 agreement and KL.

A prune step with calibration data reports the share of images on which the pruned model's top-1
class is the dense model's (``agreement``) and the mean KL(dense ‖ pruned) of their softmax
outputs; an accuracy budget (:mod:`rmtp.fidelity.accuracy_budget`) scores its candidates the same way. The
dense model's outputs are computed once (:class:`DenseReference`) and each candidate is scored
against them. :func:`split_calibration` holds images out of a calibration loader, seeded, so the
pruner never calibrates on the images its result is scored on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from rmtp.data.bundle import batch_images, has_length
from rmtp.data.spec import UNLABELED
from rmtp.errors import RmtpError
from rmtp.measure.running import evaluating
from rmtp.run.precision import autocast

#: Calibration images a step without a budget scores its result on (the first ones, in loader order).
DEFAULT_IMAGES = 256


@dataclass
class Split:
    """A calibration loader cut in two: ``fit`` for the pruner, ``held_out`` images to score on."""

    fit: DataLoader
    held_out: torch.Tensor
    indices: list[int]  # positions of the held-out images in the calibration dataset


def split_calibration(loader: DataLoader, share: float, seed: int, *, minimum: int) -> Split:
    """Hold ``share`` of ``loader``'s images out (at least ``minimum``; a seeded permutation of the
    dataset), the rest as a loader with the same batch size and order for the pruner."""
    dataset = _sized_dataset(loader)
    total = len(dataset)
    count = max(minimum, round(total * share))
    if total - count < 1:
        raise RmtpError(f"accuracy_budget: the calibration data has {total} images; holding {count} out to score on "
                        f"leaves none for the pruner: give more calibration images (data.calibration_size), at "
                        f"least {minimum + 1}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    held, fit = sorted(order[:count]), sorted(order[count:])
    fit_loader = DataLoader(Subset(dataset, fit), batch_size=loader.batch_size or 1, shuffle=False,
                            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                            pin_memory=loader.pin_memory)
    return Split(fit=fit_loader, held_out=images_of(Subset(dataset, held), batch=loader.batch_size or 64),
                 indices=held)


def _sized_dataset(loader: DataLoader) -> Dataset:
    """The loader's map-style dataset when the loader reads all of it (a plain sequential or shuffled
    sampler), else its batches gathered into one (an iterable loader, or a sampler that picks a
    subset: the calibration images are what the loader yields, not the whole dataset)."""
    dataset = getattr(loader, "dataset", None)
    whole = isinstance(getattr(loader, "sampler", None), (SequentialSampler, RandomSampler)) and \
        type(getattr(loader, "batch_sampler", None)) is BatchSampler
    if whole and has_length(dataset):
        return dataset
    images, labels = [], []
    for batch in loader:
        labelled = isinstance(batch, (tuple, list)) and len(batch) > 1
        x, y = (batch[0], batch[1]) if labelled else (batch_images(batch), None)
        images.append(x)
        labels.append(y if y is not None else torch.full((len(x),), UNLABELED, dtype=torch.long))
    if not images:
        raise RmtpError("accuracy_budget: the calibration data is empty")
    return TensorDataset(torch.cat(images), torch.cat(labels))


def images_of(data: Iterable | Dataset, limit: int | None = None, batch: int = 64) -> torch.Tensor:
    """The images of a loader of (images, labels) batches (or of a dataset of (image, label)), at most
    ``limit``, as one CPU tensor."""
    from rmtp.fidelity.blockwise import calibration_images

    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch, shuffle=False)
    return calibration_images(data, limit, who=None).cpu()


class DenseReference:
    """The dense model's log-probabilities on ``images``, computed once, to score models against."""

    def __init__(self, dense: nn.Module, images: torch.Tensor, *, device: torch.device, batch: int = 64,
                 precision: str = "fp32"):
        self.images, self.device, self.batch, self.precision = images, device, max(1, batch), precision
        self.log_probs = self._log_probs(dense)
        self.classes = self.log_probs.argmax(dim=1)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def _log_probs(self, model: nn.Module) -> torch.Tensor:
        out = []
        with evaluating(model):  # each module's own train/eval flag back after
            for start in range(0, len(self.images), self.batch):
                x = self.images[start:start + self.batch].to(self.device)
                with autocast(self.precision, self.device):
                    logits = model(x)
                out.append(torch.log_softmax(logits.float(), dim=1).cpu())
        return torch.cat(out)

    def score(self, model: nn.Module) -> tuple[float, float]:
        """(top-1 agreement with dense as a share, mean KL(dense ‖ model) per image in nats)."""
        log_q = self._log_probs(model)
        agreement = (log_q.argmax(dim=1) == self.classes).float().mean().item()
        p = self.log_probs.exp()
        kl = (p * (self.log_probs - log_q)).sum(dim=1).clamp_min(0).mean().item()
        return agreement, kl
