"""Size, compute, accuracy, speed and memory of a model: the figures every report compares.

Pruning is judged by what it saves (parameters, nonzeros, multiply-accumulates, latency, memory)
and by what it costs (top-1 accuracy), so all of these are measured here, the same way for the
dense and the pruned model. Nothing here prints; long loops take an optional ``progress`` callback.

- :mod:`rmtp.measure.counts`: ``count_params``, ``count_nonzeros``, ``mac_breakdown``,
  ``count_macs``, ``model_summary`` (what is counted as a MAC, and the kernels PyTorch misses);
- :mod:`rmtp.measure.accuracy`: ``top1``, ``agreement`` (with the dense model, on unlabeled data);
- :mod:`rmtp.measure.timing`: ``interleaved_timing``, the one timing method (``rmtp bench``, the
  recipe's ``evaluate: latency`` through ``paired_speedup``, several models at once through
  ``models_timed_together``, and the benchmark scripts), with
  ``time_calls``, ``Spread``, ``torch_threads``, ``synchronize``;
- :mod:`rmtp.measure.memory`: ``model_bytes``, ``peak_memory_delta``, ``peak_rss_delta``;
- :mod:`rmtp.measure.running`: how every measurement runs a model (on its own device, in eval
  mode with modes restored, on a random batch of its dtype).

Devices are resolved by :func:`rmtp.run.device.resolve_device`. The benchmarking method and its
limits are described in ``docs/bench.md``.
"""

from __future__ import annotations

from rmtp.measure.accuracy import ProgressCallback, agreement, top1
from rmtp.measure.counts import (
    ATTENTION,
    FLOP_FORMULAS,
    count_macs,
    count_nonzeros,
    count_params,
    mac_breakdown,
    model_summary,
)
from rmtp.measure.memory import MEMORY_METHODS, model_bytes, peak_memory_delta, peak_rss_delta, peak_rss_supported
from rmtp.measure.timing import (
    NOISY_RATIO_IQR,
    InterleavedTiming,
    PairedSpeedup,
    Spread,
    interleaved_timing,
    models_timed_together,
    paired_speedup,
    synchronize,
    time_calls,
    torch_threads,
)

__all__ = [
    "ATTENTION",
    "FLOP_FORMULAS",
    "MEMORY_METHODS",
    "NOISY_RATIO_IQR",
    "InterleavedTiming",
    "PairedSpeedup",
    "ProgressCallback",
    "Spread",
    "agreement",
    "count_macs",
    "count_nonzeros",
    "count_params",
    "interleaved_timing",
    "mac_breakdown",
    "model_bytes",
    "model_summary",
    "models_timed_together",
    "paired_speedup",
    "peak_memory_delta",
    "peak_rss_delta",
    "peak_rss_supported",
    "synchronize",
    "time_calls",
    "top1",
    "torch_threads",
]
