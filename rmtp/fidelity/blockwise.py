"""Block-wise reconstruction: recovery after pruning that needs no labels and minutes, not epochs.

A pruned model's blocks (the architecture's: ViT ``blocks.i``, ConvNeXt ``stages.s.blocks.b``,
ResNet ``layerN.b``) are trained one at a time, in forward order, to reproduce the dense model's
block outputs on calibration images: block *i*'s inputs are what the already-reconstructed
pruned model feeds it, its targets what the dense block gives on the dense model's own inputs.
So each block also absorbs what the blocks before it still get wrong, and errors do not compound
(the input/target choice of block-wise post-training reconstruction, e.g. BRECQ, Li et al. 2021).

Why: a user with a pretrained checkpoint, a few hundred unlabeled images and no time for a full
fine-tune still gets most of the accuracy a pruner cost back. The loss is the mean squared error
of the block's output, so no labels and no teacher logits are needed; a block's exact zeros
(n:m, magnitude masks) stay zero, and a block whose error would rise on the calibration images
keeps its weights as they were.

Cost: two partial forward passes per block to capture its inputs and targets (a pass stops at the
block), then ``steps`` optimizer steps on that block alone, so a ViT-Ti on 256 images takes
minutes on a CPU. Activations of one block are held at a time (images × tokens × width floats,
twice: 39 MB for ViT-Ti at 256 images, 155 MB for ViT-B).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rmtp.data.bundle import batch_images
from rmtp.errors import RmtpError
from rmtp.run.progress import NULL_PROGRESS, Progress
from rmtp.training.config import ReconstructConfig
from rmtp.training.pieces import masked_layers, zero_masks

__all__ = ["BlockFit", "ReconstructConfig", "calibration_images", "capture", "reconstruct_blocks",
           "relative_error"]


@dataclass
class BlockFit:
    """What reconstruction did to one block: its relative output error on the calibration images
    (‖f(x) − y‖² / ‖y‖²) before and after, the steps taken and whether the new weights were kept."""

    block: str
    error_before: float
    error_after: float
    steps: int
    seconds: float
    kept: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def reconstruct_blocks(model: nn.Module, dense: nn.Module, blocks: Iterable[str], images: torch.Tensor, *,
                       config: ReconstructConfig, device: torch.device, seed: int = 0,
                       progress: Progress = NULL_PROGRESS) -> list[BlockFit]:
    """Reconstruct each named block of ``model`` in place, in the order given (forward order),
    against the same block of ``dense`` on ``images`` (calibration images, N × C × H × W)."""
    blocks = list(blocks)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    fits = []
    for position, name in enumerate(blocks):
        budget = _block_budget(config, started, position, len(blocks))
        fits.append(_reconstruct_block(model, dense, name, images, config=config, device=device,
                                       generator=generator, deadline=budget, progress=progress))
    model.eval()
    return fits


def _block_budget(config: ReconstructConfig, started: float, position: int, count: int) -> float | None:
    """The clock time by which block ``position`` must stop: the step's remaining minutes shared
    equally by the blocks still to come (a fast block leaves its time to the next)."""
    if config.max_minutes is None:
        return None
    left = config.max_minutes * 60 - (time.perf_counter() - started)
    return time.perf_counter() + max(left, 0.0) / (count - position)


def _reconstruct_block(model: nn.Module, dense: nn.Module, name: str, images: torch.Tensor, *,
                       config: ReconstructConfig, device: torch.device, generator: torch.Generator,
                       deadline: float | None, progress: Progress) -> BlockFit:
    started = time.perf_counter()
    block = model.get_submodule(name)
    inputs = capture(model, name, images, device, config.batch_size, what="input")
    targets = capture(dense, name, images, device, config.batch_size, what="output")
    before = relative_error(block, inputs, targets, config.batch_size)
    saved = {key: value.detach().clone() for key, value in block.state_dict().items()}
    steps = _train(block, inputs, targets, config=config, generator=generator, deadline=deadline,
                   progress=progress, label=name)
    after = relative_error(block, inputs, targets, config.batch_size)
    kept = after <= before
    if not kept:  # the calibration error rose (a too-large lr): keep the block as it came
        block.load_state_dict(saved)
    return BlockFit(block=name, error_before=before, error_after=after if kept else before, steps=steps,
                    seconds=time.perf_counter() - started, kept=kept)


class _Captured(Exception):
    """Raised by a capture hook to stop the forward pass once the block's tensor is taken."""


def capture(model: nn.Module, block: str, images: torch.Tensor, device: torch.device, batch_size: int, *,
            what: str) -> torch.Tensor:
    """The ``input`` (first positional argument) or ``output`` of ``model``'s submodule ``block``
    for every image, on ``device``; each forward pass stops at the block. A block called with
    anything more than its input (a second tensor, a keyword that is not None) is refused: the fit
    replays it on that input alone."""
    module = model.get_submodule(block)
    taken: list[torch.Tensor] = []

    def take(tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise RmtpError(f"reconstruct: block {block} takes or returns {type(tensor).__name__}, not one tensor; "
                            f"its architecture's blocks cannot be reconstructed one by one")
        taken.append(tensor.detach())
        raise _Captured

    def take_input(args: tuple, kwargs: dict) -> None:
        extra = [f"argument {i + 1}" for i, a in enumerate(args[1:]) if a is not None]
        extra += [k for k, v in kwargs.items() if v is not None]
        if extra:  # rotary embeddings, masks: a replay on the first input alone would drop them
            raise RmtpError(f"reconstruct: block {block} is called with more than its input ({', '.join(extra)}), "
                            f"which fitting it on its input alone would leave out; its architecture's blocks "
                            f"cannot be reconstructed one by one")
        take(args[0] if args else None)

    if what == "input":
        handle = module.register_forward_pre_hook(lambda _m, args, kwargs: take_input(args, kwargs), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: take(out))
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                try:
                    model(batch.to(device))
                except _Captured:
                    continue
                raise RmtpError(f"reconstruct: the forward pass never reached {block}")
    finally:
        handle.remove()
    return torch.cat(taken)


def relative_error(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """‖block(inputs) − targets‖² / ‖targets‖² over all rows."""
    error = norm = 0.0
    with torch.no_grad():
        for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
            error += float((block(x) - y).pow(2).sum())
            norm += float(y.pow(2).sum())
    return error / norm if norm > 0 else error


def _train(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, config: ReconstructConfig,
           generator: torch.Generator, deadline: float | None, progress: Progress, label: str) -> int:
    """Adam on the block's parameters, mean squared error of its output; exact zeros kept zero.
    Returns the steps taken (fewer than ``config.steps`` when ``deadline`` came first)."""
    params = [p for p in block.parameters() if p.is_floating_point()]  # int8 weights are stored, not trained
    flags = [p.requires_grad for p in params]
    masks = zero_masks(block, masked_layers(block))  # a pruner's exact zeros: no step revives them
    optimizer = torch.optim.Adam(params, lr=config.lr)
    taken = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with progress.task(f"reconstructing {label}", total=config.steps) as advance, torch.enable_grad():
            for step, rows in enumerate(_batches(len(inputs), config, generator)):
                if deadline is not None and time.perf_counter() > deadline:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
                loss = (block(inputs[rows]) - targets[rows]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for weight, mask in masks:
                        weight.mul_(mask)
                taken += 1
                advance(loss=f"{loss.item():.3g}")
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        optimizer.zero_grad(set_to_none=True)
    return taken


def _batches(count: int, config: ReconstructConfig, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``config.steps`` index batches, reshuffled each pass over the images (seeded)."""
    size = min(config.batch_size, count)
    order = torch.randperm(count, generator=generator)
    position = 0
    for _ in range(config.steps):
        if position + size > count:
            order, position = torch.randperm(count, generator=generator), 0
        yield order[position:position + size]
        position += size


def calibration_images(loader: Iterable, limit: int | None, *, who: str | None = "reconstruct") -> torch.Tensor:
    """The images of a calibration loader of (images, labels) batches, at most ``limit`` of them
    (``who`` starts the error when there are none)."""
    chunks, count = [], 0
    for batch in loader:
        images = batch_images(batch)
        chunks.append(images)
        count += len(images)
        if limit is not None and count >= limit:
            break
    if not chunks:
        raise RmtpError(f"{who + ': ' if who else ''}the calibration data is empty")
    images = torch.cat(chunks)
    return images[:limit] if limit is not None else images
