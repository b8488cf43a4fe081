"""Size, compute, accuracy and speed of a model: the figures every report compares.

Pruning is judged by what it saves (parameters, nonzeros, multiply-accumulates, latency) and by
what it costs (top-1 accuracy), so all of these are measured here, the same way for the dense
and the pruned model. Nothing here prints; long loops take an optional ``progress`` callback.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts only matrix
products: ``mm``/``addmm`` (linear layers, bias ignored), ``bmm``/``baddbmm``, convolutions
(bias ignored) and the fused attention kernels. Norms, activations, softmax, residual adds and
pooling count zero. Two gaps in PyTorch's own registry are filled here, so that a model's MACs
do not depend on which kernel happened to run:

* ``F.scaled_dot_product_attention`` on CPU dispatches to
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which PyTorch does not count (its
  registry has only the CUDA flash, efficient and cuDNN kernels), so timm ViTs with fused
  attention came out with zero attention MACs. It is given the same formula PyTorch uses for
  the CUDA kernels (``sdpa_flop_count``: QKᵀ plus AV), as is the XPU/PrivateUse1
  ``_scaled_dot_product_fused_attention_overrideable`` kernel.
* ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a fused C++ fast path
  under ``no_grad``/``inference_mode`` that nothing counts (the whole layer reads zero). The
  fast path is switched off while counting, so their projections and attention are counted
  through the ordinary ops.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from rmtp.errors import DataError, DeviceError

__all__ = [
    "ATTENTION",
    "LatencyResult",
    "count_macs",
    "count_nonzeros",
    "count_params",
    "mac_breakdown",
    "measure_latency",
    "model_summary",
    "top1",
]

#: Key of :func:`mac_breakdown` that gathers the attention matmuls (QKᵀ and AV).
ATTENTION = "attention"

ProgressCallback = Callable[[int, "int | None"], None]
DeviceLike = str | torch.device

_aten = torch.ops.aten


# --------------------------------------------------------------------------- parameters


def _storage_key(p: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the memory a parameter occupies, so two Parameter objects over the same
    storage (weights tied by sharing ``.data``) count once. Falls back to object identity
    where there is no real storage (meta tensors, empty tensors, exotic subclasses)."""
    if p.device.type == "meta" or p.numel() == 0:
        return ("id", id(p))
    try:
        ptr = p.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(p))
    return ("storage", p.device, ptr, p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.dtype)


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter tensor once: ``parameters()`` already drops repeats of the same
    Parameter object (``b.weight = a.weight``); this also drops distinct Parameters that are
    views of the same memory."""
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for p in model.parameters():
        key = _storage_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def count_params(model: nn.Module) -> int:
    """Physical parameter count: tied weights (one tensor reachable from several modules)
    count once, because they cost memory once. A low-rank pair counts both of its factors."""
    return sum(p.numel() for p in _unique_parameters(model))


@torch.no_grad()
def count_nonzeros(model: nn.Module) -> int:
    """Nonzero entries over the same unique parameters as :func:`count_params`: what a mask
    pruner's sparsity actually removes (its zeroed weights are still parameters)."""
    return sum(int(torch.count_nonzero(p)) for p in _unique_parameters(model))


# --------------------------------------------------------------------------- devices


def _resolve_device(device: DeviceLike) -> torch.device:
    """Parse ``device`` and fail with one clear line when this machine cannot run it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {device!r} is not a valid torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} requested but MPS is not available on this machine")
    return dev


def _check_model_on(model: nn.Module, dev: torch.device) -> None:
    """Refuse to run a model whose weights live elsewhere: moving it would silently change the
    caller's object, and running it would fail deep inside torch with a less clear message."""
    p = next(iter(model.parameters()), None)
    if p is None or p.device.type == "meta":
        return
    same = p.device.type == dev.type and (dev.index is None or p.device.index == dev.index)
    if not same:
        raise DeviceError(f"model is on {p.device} but device={str(dev)!r} was requested; "
                          f"move it first with model.to({str(dev)!r})")


def _input_dtype(model: nn.Module) -> torch.dtype:
    """Dtype a random input must have for the model's first layer to accept it."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then each module's own train/eval flag back, so measuring
    a model in the middle of fine-tuning does not change how it trains."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Route nn.MultiheadAttention / nn.TransformerEncoderLayer through ordinary ops, whose
    FLOPs are counted, instead of their uncounted fused kernels (same numbers out)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


# --------------------------------------------------------------------------- MACs


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
    """FLOPs of a fused attention forward: 2·B·H·Sq·Sk·(D + Dv), torch's own formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any,
                         out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of a fused attention backward, torch's own formula (for counting training steps)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _missing_attention_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the SDPA kernels PyTorch's flop registry leaves out (looked up by name, so
    an older torch without one of these ops still works)."""
    forward = ["_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_fused_attention_overrideable",
               "_scaled_dot_product_attention_math_for_mps"]
    backward = ["_scaled_dot_product_flash_attention_for_cpu_backward",
                "_scaled_dot_product_fused_attention_overrideable_backward"]
    mapping: dict[Any, Callable[..., int]] = {}
    for names, formula in ((forward, _sdpa_forward_flops), (backward, _sdpa_backward_flops)):
        for name in names:
            op = getattr(_aten, name, None)
            if op is not None:
                mapping[op] = formula
    return mapping


_CUSTOM_MAPPING = _missing_attention_formulas()

#: Ops whose FLOPs are attention, i.e. products of two activations (QKᵀ and AV), as opposed
#: to an activation times a weight. Linear layers reach FlopCounterMode as mm/addmm whatever
#: the input rank (matmul folds the leading dims), so in timm vision models the batched
#: matmuls bmm/baddbmm come only from attention written out explicitly (``fused_attn=False``,
#: or SDPA's math fallback); counting them here keeps the breakdown the same on every path.
_ATTENTION_OP_NAMES = frozenset({
    "bmm", "baddbmm",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_attention_math_for_mps",
    "_flash_attention_forward", "_efficient_attention_forward", "flex_attention",
    "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_fused_attention_overrideable_backward", "_flash_attention_backward",
    "_efficient_attention_backward", "flex_attention_backward",
})


def _op_key(op: Any) -> str:
    """Breakdown key of one counted op: ``attention`` for the attention kernels, else the op's
    name as torch prints it (``aten.addmm``, ``aten.convolution``, ...)."""
    name = getattr(op, "__name__", None) or str(op)
    short = name.rsplit(".", 1)[-1]
    return ATTENTION if short in _ATTENTION_OP_NAMES else str(op)


def _batch_of_one(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be the per-sample shape with positive sides, e.g. "
                         f"(3, 224, 224); got {input_shape!r}")
    return (1, *shape)


def mac_breakdown(model: nn.Module, input_shape: tuple[int, ...], *,
                  device: DeviceLike = "cpu") -> dict[str, int]:
    """Multiply-accumulates of one forward pass on a batch of one, per kind of op.

    ``input_shape`` is the per-sample shape without the batch dimension (what
    :func:`rmtp.data.model_input_size` returns). Keys are torch op names (``aten.addmm`` for
    linear layers with bias, ``aten.mm`` without, ``aten.convolution``) plus
    :data:`ATTENTION` for QKᵀ and AV, however they were computed, so reports can show
    attention apart from the weight layers whose size pruning changes. MACs are FLOPs / 2
    (FlopCounterMode counts 2 FLOPs per multiply-add and ignores biases). Sorted largest first.
    """
    dev = _resolve_device(device)
    _check_model_on(model, dev)
    x = torch.randn(_batch_of_one(input_shape), device=dev, dtype=_input_dtype(model))
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_MAPPING)
    with _evaluating(model), _mha_fastpath_disabled(), torch.inference_mode(), counter:
        model(x)
    flops: dict[str, int] = defaultdict(int)
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        flops[_op_key(op)] += int(n)
    return {k: v // 2 for k, v in sorted(flops.items(), key=lambda kv: -kv[1]) if v}


def count_macs(model: nn.Module, input_shape: tuple[int, ...], *, device: DeviceLike = "cpu") -> int:
    """Multiply-accumulates of one forward pass on a batch of one (see :func:`mac_breakdown`
    for what is counted). The model must already be on ``device``."""
    return sum(mac_breakdown(model, input_shape, device=device).values())


def model_summary(model: nn.Module, input_shape: tuple[int, ...], *,
                  device: DeviceLike = "cpu") -> dict[str, int]:
    """The size and compute figures a report puts side by side for dense and pruned models:
    ``params``, ``nonzeros``, ``macs`` (batch of one) and the ``attention_macs`` part of them,
    which weight pruning does not touch and token pruning does."""
    breakdown = mac_breakdown(model, input_shape, device=device)
    return {
        "params": count_params(model),
        "nonzeros": count_nonzeros(model),
        "macs": sum(breakdown.values()),
        "attention_macs": breakdown.get(ATTENTION, 0),
    }


# --------------------------------------------------------------------------- accuracy


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
         progress: ProgressCallback | None = None, limit: int | None = None) -> float:
    """Top-1 accuracy in percent over a loader of ``(images, labels)`` batches.

    Runs in eval mode under ``inference_mode`` (restoring the model's modes afterwards).
    ``limit`` caps the number of images (the last batch is cut), for quick checks.
    ``progress(done_batches, total_batches)`` is called after every batch so the caller can
    drive a progress bar; ``total_batches`` is None for loaders without a length.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    dev = _resolve_device(device)
    _check_model_on(model, dev)
    total_batches = _total_batches(loader, limit)
    correct = seen = done = 0
    with _evaluating(model), torch.inference_mode():
        for images, labels in loader:
            if limit is not None:
                images, labels = images[: limit - seen], labels[: limit - seen]
            images = images.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True)
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


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyResult:
    """Wall time of one forward pass of a batch, from ``torch.utils.benchmark``."""

    #: Median seconds per forward pass of the whole batch.
    median_s: float
    #: Interquartile range of the per-pass times, in seconds (spread of the measurements).
    iqr_s: float
    batch_size: int
    #: Images per second at the median: ``batch_size / median_s``.
    throughput: float
    #: Number of timed blocks (each block runs the forward pass many times).
    measurements: int
    #: CPU threads torch used while timing.
    threads: int
    device: str


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, device: DeviceLike = "cpu",
                    batch_size: int = 1, min_run_time: float = 0.5,
                    threads: int | None = None) -> LatencyResult:
    """Time the forward pass with ``torch.utils.benchmark.Timer.blocked_autorange``.

    ``input_shape`` is per sample (no batch dimension); the random batch is made before
    timing so only the forward pass is measured, under ``inference_mode`` in eval mode.
    torch.utils.benchmark synchronizes CUDA around each timed block. ``threads`` defaults to
    torch's current thread count (the Timer's own default of 1 would understate CPU speed).
    The model must already be on ``device``.
    """
    import logging

    # torch.utils.benchmark imports cpp_extension, which warns about a missing CUDA toolkit on
    # CPU-only machines: noise in a report, not a problem.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dev = _resolve_device(device)
    _check_model_on(model, dev)
    n_threads = threads if threads is not None else torch.get_num_threads()
    x = torch.randn((batch_size, *_batch_of_one(input_shape)[1:]), device=dev, dtype=_input_dtype(model))
    with _evaluating(model):
        with torch.inference_mode():  # warm-up: first calls pay for allocation and kernel selection
            for _ in range(2):
                model(x)
        timer = benchmark.Timer(
            stmt="with torch.inference_mode():\n    model(x)",
            globals={"model": model, "x": x, "torch": torch},
            num_threads=n_threads,
        )
        m = timer.blocked_autorange(min_run_time=min_run_time)
    return LatencyResult(median_s=m.median, iqr_s=m.iqr, batch_size=batch_size,
                         throughput=batch_size / m.median, measurements=len(m.times),
                         threads=n_threads, device=str(dev))
