"""Memory: what a model's weights occupy and what one call needs at its peak.

:func:`peak_memory_delta` is the peak of live tensor bytes during one call (the same figure on
CUDA and CPU); :func:`peak_rss_delta` what the operating system saw a CPU call take. How each is
measured is in :data:`MEMORY_METHODS` (recorded in reports) and ``docs/bench.md``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn

from rmtp.measure.counts import storage_key, unique_parameters
from rmtp.run.device import DeviceLike, resolve_device

__all__ = ["MEMORY_METHODS", "model_bytes", "peak_memory_delta", "peak_rss_delta", "peak_rss_supported"]

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


def model_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy: unique parameters (tied once, as :func:`~rmtp.measure.count_params`) plus
    buffers, at their current dtype. Zeros of a mask pruner still occupy their bytes."""
    seen = {storage_key(p) for p in unique_parameters(model)}
    total = sum(p.numel() * p.element_size() for p in unique_parameters(model))
    for b in model.buffers():
        key = storage_key(b)
        if key not in seen:
            seen.add(key)
            total += b.numel() * b.element_size()
    return total


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
