"""How every measurement runs a model, so that counts, top-1 and timings see it the same way.

The model must already be on the requested device (it is never moved behind the caller's back),
runs in eval mode with every module's own train/eval flag restored afterwards, and is fed random
inputs of its first floating-point parameter's dtype, shaped as one batch of per-sample shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rmtp.errors import DeviceError

__all__ = ["batch_of_one", "check_model_on", "evaluating", "input_dtype", "same_device"]


def same_device(actual: torch.device, requested: torch.device) -> bool:
    """Whether a tensor on ``actual`` is where ``requested`` asks: a request with no index (``cuda``)
    accepts any index, as ``tensor.to("cuda")`` would leave a tensor already on ``cuda:1`` alone."""
    return actual.type == requested.type and (requested.index is None or actual.index == requested.index)


def check_model_on(model: nn.Module, dev: torch.device) -> None:
    """Refuse to run a model whose weights live elsewhere: moving it would silently change the
    caller's object, and running it would fail deep inside torch with a less clear message."""
    p = next(iter(model.parameters()), None)
    if p is None or p.device.type == "meta":
        return
    if not same_device(p.device, dev):
        raise DeviceError(f"model is on {p.device} but device={str(dev)!r} was requested; "
                          f"move it first with model.to({str(dev)!r})")


def input_dtype(model: nn.Module) -> torch.dtype:
    """Dtype a random input must have for the model's first layer to accept it."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then each module's own train/eval flag back, so measuring
    a model in the middle of fine-tuning does not change how it trains. Flags are kept by module
    name, so a module put in during the block (a pruner's split layer) takes its parent's flag."""
    flags = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield model
    finally:
        for name, m in model.named_modules():  # parents before children
            m.training = flags.setdefault(name, flags.get(name.rpartition(".")[0], model.training))


def batch_of_one(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(1, *input_shape)``, after checking that ``input_shape`` is a per-sample shape (no batch dimension)."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be the per-sample shape with positive sides, e.g. "
                         f"(3, 224, 224); got {input_shape!r}")
    return (1, *shape)
