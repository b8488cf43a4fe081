"""Timing: one method for every speed figure rmtp reports.

:func:`interleaved_timing` (warm-up, then rounds whose order rotates, so a shared machine's drift
hits every callable alike) is what ``rmtp bench``, the recipe's ``evaluate: latency``
(:func:`paired_speedup`) and the benchmark scripts all time through; :class:`Spread` summarises
the per-round figures. The method and its limits are described in ``docs/bench.md``.

The primitives take plain callables (``lambda: model(x)``), so they know nothing about where a
model came from; the caller enters ``torch.inference_mode`` and makes the inputs beforehand.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rmtp.measure.running import batch_of_one, evaluating, input_dtype
from rmtp.run.device import DeviceLike, resolve_device

__all__ = [
    "NOISY_RATIO_IQR",
    "InterleavedTiming",
    "PairedSpeedup",
    "Spread",
    "interleaved_timing",
    "paired_speedup",
    "synchronize",
    "time_calls",
    "torch_threads",
]


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
        settings = (f"batch {self.batch}, {self.threads} thread{'s' * (self.threads != 1)}, "
                    f"{self.rounds} interleaved rounds")
        times = (f"latency {self.pruned_ms.median:.2f} ms [{self.pruned_ms.q1:.2f}–{self.pruned_ms.q3:.2f}] vs dense "
                 f"{self.dense_ms.median:.2f} ms [{self.dense_ms.q1:.2f}–{self.dense_ms.q3:.2f}]")
        if self.verdict == "noisy":
            return (f"{times}; no speed-up figure: the per-round ratios spread ×{r.q1:.2f}–×{r.q3:.2f} (IQR), too wide "
                    f"to mean anything on this machine ({settings}; {self._noise_advice()})")
        if self.verdict == "same":
            return (f"{times}; not measurably faster or slower: ratios ×{r.q1:.2f}–×{r.q3:.2f} (IQR) contain ×1 "
                    f"({settings})")
        return f"{times}; ×{r.median:.2f} [{r.q1:.2f}–{r.q3:.2f}] speed-up, median of per-round ratios ({settings})"

    def _noise_advice(self) -> str:
        """What may steady a noisy timing: fewer threads only where it ran on several (advice to set
        what is already set would send a user in circles), else a quieter machine or more rounds."""
        if self.threads > 1:
            return "try `latency_threads: 1` or `rmtp bench`"
        return "time it on an idle machine, or with more `latency_rounds` or `rmtp bench --rounds`"

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


def models_timed_together(models: Sequence[nn.Module], input_shape: tuple[int, ...], *, batch: int,
                          device: DeviceLike = "cpu", rounds: int = 15, threads: int | None = None,
                          on_round: Callable[[int], None] | None = None) -> tuple[list[list[float]], int]:
    """Per-round seconds per call of each of ``models`` on one random batch (of the first model's
    dtype), all in the same rounds (:func:`interleaved_timing`), in eval mode and with ``threads``
    fixed for the duration (default: current); and the thread count in force."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    dev = resolve_device(device)
    with torch_threads(threads) as n_threads, ExitStack() as modes, torch.inference_mode():
        for model in models:
            modes.enter_context(evaluating(model))
        x = torch.randn((batch, *batch_of_one(input_shape)[1:]), device=dev, dtype=input_dtype(models[0]))
        timings = interleaved_timing([lambda m=m: m(x) for m in models], device=dev, rounds=rounds,
                                     on_round=on_round)
    return [timing.seconds for timing in timings], n_threads


def paired_speedup(dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...], *, batch: int,
                   device: DeviceLike = "cpu", rounds: int = 15, threads: int | None = None,
                   on_round: Callable[[int], None] | None = None) -> PairedSpeedup:
    """Time ``dense`` and ``pruned`` on one random batch the way ``rmtp bench`` does (warm-up,
    rotated rounds, paired ratios), with ``threads`` fixed for the duration (default: current)."""
    (dense_s, pruned_s), n_threads = models_timed_together([dense, pruned], input_shape, batch=batch, device=device,
                                                           rounds=rounds, threads=threads, on_round=on_round)
    return PairedSpeedup(dense_ms=Spread.of([s * 1e3 for s in dense_s]),
                         pruned_ms=Spread.of([s * 1e3 for s in pruned_s]),
                         ratio=Spread.of([d / p for d, p in zip(dense_s, pruned_s)]), batch=batch,
                         threads=n_threads, rounds=rounds)
