"""Where a fine-tune is, exactly enough to continue it after a kill as if it had never stopped.

A :class:`TrainState` holds what the weights do not: the optimizer's moments, the GradScaler, the
optimizer-step count (the lr schedule), the epoch and how many of its batches are done, the
shuffle generator's state at the start of that epoch, the partial epoch loss, the history, the
keep-zeros masks and every random number generator (torch CPU and CUDA, Python, NumPy, the
augmentation generator). It is made of tensors, numbers, strings, lists and dicts only, so it
round-trips through ``torch.save`` / ``torch.load(weights_only=True)``: a checkpoint is as
untrusted as any other file rmtp reads.

:class:`ResumableShuffle` is the sampler that makes "the same batches" true: it draws exactly the
permutation ``DataLoader(shuffle=True, generator=g)`` draws (so runs are bit-identical with and
without it), and can start an epoch after its first ``skip`` samples without loading them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler


class SkippingSampler(Sampler[int]):
    """A sampler with the first ``skip`` indices of its next epoch left out (``skip`` then resets),
    so a resumed epoch starts where its checkpoint stopped without loading the samples before it.
    ``set_epoch`` passes through to a DistributedSampler."""

    def __init__(self, inner: Sampler[int]) -> None:
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        indices = iter(self.inner)
        for _ in range(skip):
            next(indices)
        yield from indices

    def __len__(self) -> int:
        return len(self.inner) - self.skip


class ResumableShuffle(SkippingSampler):
    """``RandomSampler(data, generator=generator)`` that can skip: the permutation comes from the
    same generator calls as a shuffling DataLoader's, so runs are bit-identical with and without it."""

    def __init__(self, data: Sized, generator: torch.Generator) -> None:
        super().__init__(RandomSampler(data, generator=generator))


def rng_states() -> dict[str, Any]:
    """Every process-wide random generator's state, in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [state for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@dataclass
class TrainState:
    """A fine-tune between two optimizer steps. ``epoch`` is the epoch in progress (1-based) and
    ``batches_done`` how many of its batches were trained on; at an epoch's end the state points at
    the next epoch with ``batches_done = 0``."""

    seed: int
    epoch: int
    batches_done: int
    step: int
    shuffle: torch.Tensor  # the train shuffle generator's state when ``epoch`` began
    augment: torch.Tensor  # the shift-augmentation generator's state now
    loss_sum: float
    seen: int
    history: list[dict[str, Any]]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    masks: list[torch.Tensor]
    mask_layers: list[str] = field(default_factory=list)  # the keep_zeros names the masks belong to
    rng: dict[str, Any] = field(default_factory=rng_states)
    #: Wall seconds the fine-tune had run when the state was taken: a ``max_minutes`` budget spent,
    #: so a resumed run gets only what is left (checkpoints written before it existed: 0).
    seconds: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        """The fields as a plain dict (shallow: the optimizer state is not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TrainState:
        return cls(**payload)
