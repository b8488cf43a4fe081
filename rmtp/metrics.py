"""Size, compute, accuracy and speed of a model: the figures every report compares.

Pruning is judged by what it saves (parameters, nonzeros, multiply-accumulates, latency) and by
what it costs (top-1 accuracy), so all of these are measured here, the same way for the dense
and the pruned model. Nothing here prints; long loops take an optional ``progress`` callback.

The benchmarking primitives at the end (:func:`interleaved_timing`, :func:`time_calls`,
:func:`peak_memory_delta`, :func:`peak_rss_delta`, :class:`Spread`) are what ``rmtp bench`` measures with; their
method and its limits are described in ``docs/bench.md``. :func:`interleaved_timing` is the one timing
method: ``rmtp bench``, the recipe's ``evaluate: latency`` (:func:`paired_speedup`) and the benchmark
scripts all time through it. :func:`measure_latency` (``torch.utils.benchmark``, one model alone) is
kept as public API; nothing in rmtp calls it any more. Devices are resolved by
:func:`rmtp.device.resolve_device`.

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

import gc
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from rmtp.device import DeviceLike, resolve_device
from rmtp.errors import DataError, DeviceError

__all__ = [
    "ATTENTION",
    "MEMORY_METHODS",
    "InterleavedTiming",
    "LatencyResult",
    "Spread",
    "count_macs",
    "count_nonzeros",
    "count_params",
    "interleaved_timing",
    "mac_breakdown",
    "measure_latency",
    "model_bytes",
    "model_summary",
    "peak_memory_delta",
    "peak_rss_delta",
    "peak_rss_supported",
    "synchronize",
    "time_calls",
    "top1",
]

#: Key of :func:`mac_breakdown` that gathers the attention matmuls (QKᵀ and AV).
ATTENTION = "attention"

ProgressCallback = Callable[[int, "int | None"], None]

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
    dev = resolve_device(device)
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
    dev = resolve_device(device)
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
    dev = resolve_device(device)
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


# --------------------------------------------------------------------------- benchmarking
#
# The primitives `rmtp bench` is built on, kept here so that any report times and measures models
# the same way. They take plain callables (``lambda: model(x)``), so they know nothing about where
# a model came from; the caller enters ``torch.inference_mode`` and makes the inputs beforehand.


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements: quartiles (inclusive method) and extremes."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("Spread.of needs at least one value")
        if len(values) == 1:
            v = values[0]
            return cls(v, v, v, v, v, 1)
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(median=median, q1=q1, q3=q3, min=min(values), max=max(values), n=len(values))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max,
                "n": self.n}


def model_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy: unique parameters (tied once, as :func:`count_params`) plus
    buffers, at their current dtype. Zeros of a mask pruner still occupy their bytes."""
    seen = {_storage_key(p) for p in _unique_parameters(model)}
    total = sum(p.numel() * p.element_size() for p in _unique_parameters(model))
    for b in model.buffers():
        key = _storage_key(b)
        if key not in seen:
            seen.add(key)
            total += b.numel() * b.element_size()
    return total


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on the CPU, where calls are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, averaged over one block of ``iters`` back-to-back calls.

    CPU: ``time.perf_counter`` around the block. CUDA: the device is synchronized first (nothing
    earlier can leak into the block), then CUDA events are recorded on the current stream around
    the block and read after the end event completes: GPU time from the first kernel's start to
    the last one's end, launch gaps included (a launch-bound model is slow, and shows it).
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record(stream)
        for _ in range(iters):
            fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - started) / iters


@dataclass
class InterleavedTiming:
    """Per-call seconds of one callable, one value per round (see :func:`interleaved_timing`)."""

    seconds: list[float]
    #: Calls per timed block, calibrated during warm-up so a block lasts about ``block_s``.
    iters: int
    warmup_calls: int


def interleaved_timing(fns: Sequence[Callable[[], object]], *, device: DeviceLike = "cpu", rounds: int = 15,
                       warmup_s: float = 0.3, block_s: float = 0.1, min_warmup_calls: int = 3,
                       on_round: Callable[[int], None] | None = None) -> list[InterleavedTiming]:
    """Time several callables against each other so that drift of a shared machine cancels.

    1. Warm-up, each callable in turn: at least ``min_warmup_calls`` calls and at least
       ``warmup_s`` seconds (allocator, caches, kernel selection, autotuning settle), timing
       each call to calibrate ``iters``, the number of calls in a block of about ``block_s``.
    2. ``rounds`` rounds; each round times one block of every callable, so the figures of one
       round share the machine's state. The order rotates every round (A B, B A, A B … for two),
       so no callable always runs first or always follows the same neighbour.

    Each round gives one per-call time per callable (block time / iters); report their median
    and spread, and compare two callables by the per-round ratio (paired), which cancels drift
    slower than a round. Python's garbage collector is off during the rounds, as in ``timeit``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if block_s <= 0 or warmup_s < 0:
        raise ValueError(f"block_s must be positive and warmup_s not negative, got {block_s}, {warmup_s}")
    dev = resolve_device(device)
    iters: list[int] = []
    warmup_calls: list[int] = []
    for fn in fns:
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < min_warmup_calls or time.perf_counter() - started < warmup_s:
            times.append(time_calls(fn, 1, dev))
            if len(times) >= 10_000:
                break
        per_call = max(statistics.median(times), 1e-9)
        iters.append(max(1, math.ceil(block_s / per_call)))
        warmup_calls.append(len(times))
    seconds: list[list[float]] = [[] for _ in fns]
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            n = len(fns)
            for i in [(r + k) % n for k in range(n)]:
                seconds[i].append(time_calls(fns[i], iters[i], dev))
            if on_round is not None:
                on_round(r + 1)
    finally:
        if collecting:
            gc.enable()
    return [InterleavedTiming(seconds=s, iters=k, warmup_calls=w) for s, k, w in zip(seconds, iters, warmup_calls)]


# --------------------------------------------------------------------------- peak memory

#: How the peak-memory figures are measured (recorded in reports): tensor peak per device type,
#: and the CPU process's resident-set peak.
MEMORY_METHODS = {
    "cuda": "tensor peak: torch.cuda.max_memory_allocated during one call (peak stats reset first) minus "
            "memory_allocated before it",
    "cpu": "tensor peak: the largest sum of live CPU tensor bytes during one call, from the allocation "
           "events of torch.profiler (profile_memory=True), above what was allocated before it",
    "rss": "peak RSS during one call minus RSS before it: Linux VmHWM reset through /proc/self/clear_refs, "
           "after gc.collect() and glibc malloc_trim(0); 4 KiB pages",
}


def peak_memory_delta(fn: Callable[[], object], device: DeviceLike = "cpu") -> int | None:
    """Bytes of tensors alive at the peak of one call of ``fn``, above those alive before it.

    The same figure on both devices: what the call itself needs (activations, workspace, the
    output), weights and input excluded, independent of allocator caching and history.

    * CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated``
      before the call (the caching allocator's reserve is not counted).
    * CPU: PyTorch keeps no CPU allocator statistics, so the call runs once under
      ``torch.profiler`` with ``profile_memory=True``, which reports every allocation and free of
      PyTorch's CPU allocator (kernels' internal buffers, worker threads and compiled code
      included); the peak of their running sum is the figure. Memory that libraries allocate
      behind PyTorch's back (BLAS packing buffers, oneDNN's own caches) is not seen: see
      :func:`peak_rss_delta` for what the operating system saw. None if the profiler fails.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - before)
    if dev.type != "cpu":
        return None
    return _profiled_cpu_peak(fn)


def _profiled_cpu_peak(fn: Callable[[], object]) -> int | None:
    import os

    # Kineto prints start/stop lines on stderr at its default log level; 6 silences them (an
    # explicit setting of the user's wins). Read when the profiler first starts in the process.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, RuntimeError):  # a torch without these profiler internals
        return None
    cpu = getattr(torch.autograd, "DeviceType", None)
    if cpu is not None:
        events = [e for e in events if e.device_type() == cpu.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep recorded order
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"/proc/self/status has no {field_name}")


def _reset_peak_rss() -> None:
    """Set this process's VmHWM back to its current RSS (Linux ≥ 4.0: ``echo 5 > clear_refs``)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


_malloc_trim: Callable[[int], int] | None | bool = False  # False: not looked up yet


def _trim_malloc() -> bool:
    """Give free heap memory back to the OS (glibc ``malloc_trim(0)``, all arenas), so that the
    next call must fault its pages in again and shows in RSS; False where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is False:
        _malloc_trim = None
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
            if trim is not None:
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
                _malloc_trim = trim
        except OSError:
            _malloc_trim = None
    if _malloc_trim is None:
        return False
    _malloc_trim(0)  # type: ignore[operator]
    return True


_rss_supported: bool | None = None


def peak_rss_supported() -> bool:
    """Whether :func:`peak_rss_delta` can measure here (Linux with a resettable VmHWM and glibc's
    malloc_trim); elsewhere it returns None rather than a wrong number."""
    global _rss_supported
    if _rss_supported is None:
        try:
            _proc_status_bytes("VmHWM")
            _reset_peak_rss()
            _rss_supported = _trim_malloc()
        except OSError:
            _rss_supported = False
    return _rss_supported


def peak_rss_delta(fn: Callable[[], object]) -> int | None:
    """Bytes by which this process's resident set peaked during one call of ``fn``, above its
    level before it: the CPU memory the operating system saw the call take.

    ``getrusage``'s ``ru_maxrss`` is a lifetime maximum that cannot be reset, so it cannot tell
    one call's peak, and ``tracemalloc`` sees no tensor memory at all. Instead: collect garbage
    and ``malloc_trim(0)`` so freed heap pages go back to the OS (without this, a call reuses the
    pages its previous run left mapped and reads about zero), reset the kernel's peak-RSS mark
    (VmHWM, Linux ≥ 4.0), call, read the mark.

    Limits: 4 KiB page granularity; it counts allocator slack and memory PyTorch does not track
    (BLAS, oneDNN) but not what kernels kept resident from earlier calls (caches, thread scratch);
    other threads of the process allocating meanwhile are counted; and it depends on the
    allocator's history: glibc raises its mmap threshold after large frees, so the same call can
    read higher after a run at a larger batch. Use it next to :func:`peak_memory_delta`, not
    instead of it. None where it cannot be measured (see :func:`peak_rss_supported`).
    """
    if not peak_rss_supported():
        return None
    gc.collect()
    _trim_malloc()
    _reset_peak_rss()
    before = _proc_status_bytes("VmHWM")
    fn()
    return max(0, _proc_status_bytes("VmHWM") - before)


# --------------------------------------------------------------------------- paired speed-up

#: A speed-up whose per-round ratios spread wider than this (IQR / median) is not reported as a
#: figure: on a shared machine such a ratio mostly measures the neighbours.
NOISY_RATIO_IQR = 0.2


@dataclass(frozen=True)
class PairedSpeedup:
    """Dense vs pruned, timed by :func:`interleaved_timing`: per-call ms and the per-round ratio."""

    dense_ms: Spread
    pruned_ms: Spread
    #: dense time / pruned time, one value per round (paired), so drift between rounds cancels.
    ratio: Spread
    batch: int
    threads: int
    rounds: int

    @property
    def verdict(self) -> str:
        """``"faster"``, ``"slower"``, ``"same"`` (the ratios' IQR contains 1) or ``"noisy"``."""
        if self.ratio.iqr > NOISY_RATIO_IQR * self.ratio.median:
            return "noisy"
        if self.ratio.q1 <= 1.0 <= self.ratio.q3:
            return "same"
        return "faster" if self.ratio.median > 1.0 else "slower"

    def describe(self) -> str:
        """One line for a report: the figure where it means something, and why not where it does not."""
        r = self.ratio
        settings = f"batch {self.batch}, {self.threads} thread{'s' * (self.threads != 1)}, {self.rounds} interleaved rounds"
        times = (f"latency {self.pruned_ms.median:.2f} ms [{self.pruned_ms.q1:.2f}–{self.pruned_ms.q3:.2f}] vs dense "
                 f"{self.dense_ms.median:.2f} ms [{self.dense_ms.q1:.2f}–{self.dense_ms.q3:.2f}]")
        if self.verdict == "noisy":
            return (f"{times}; no speed-up figure: the per-round ratios spread ×{r.q1:.2f}–×{r.q3:.2f} (IQR), too wide "
                    f"to mean anything on this machine ({settings}; try `latency_threads: 1` or `rmtp bench`)")
        if self.verdict == "same":
            return f"{times}; not measurably faster or slower: ratios ×{r.q1:.2f}–×{r.q3:.2f} (IQR) contain ×1 ({settings})"
        return f"{times}; ×{r.median:.2f} [{r.q1:.2f}–{r.q3:.2f}] speed-up, median of per-round ratios ({settings})"

    def to_dict(self) -> dict[str, Any]:
        return {"dense_ms": self.dense_ms.to_dict(), "pruned_ms": self.pruned_ms.to_dict(),
                "ratio": self.ratio.to_dict(), "batch": self.batch, "threads": self.threads, "rounds": self.rounds,
                "verdict": self.verdict}


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Fix torch's intra-op threads at ``threads`` (None: leave the current count) for the block,
    yielding the count in force, and restore the previous count after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def paired_speedup(dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...], *, batch: int,
                   device: DeviceLike = "cpu", rounds: int = 15, threads: int | None = None,
                   on_round: Callable[[int], None] | None = None) -> PairedSpeedup:
    """Time ``dense`` and ``pruned`` on one random batch the way ``rmtp bench`` does (warm-up,
    rotated rounds, paired ratios), with ``threads`` fixed for the duration (default: current)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    dev = resolve_device(device)
    with torch_threads(threads) as n_threads, _evaluating(dense), _evaluating(pruned), torch.inference_mode():
        x = torch.randn((batch, *_batch_of_one(input_shape)[1:]), device=dev, dtype=_input_dtype(dense))
        timings = interleaved_timing([lambda: dense(x), lambda: pruned(x)], device=dev, rounds=rounds,
                                     on_round=on_round)
    dense_s, pruned_s = timings[0].seconds, timings[1].seconds
    return PairedSpeedup(dense_ms=Spread.of([s * 1e3 for s in dense_s]), pruned_ms=Spread.of([s * 1e3 for s in pruned_s]),
                         ratio=Spread.of([d / p for d, p in zip(dense_s, pruned_s)]), batch=batch,
                         threads=n_threads, rounds=rounds)
