"""Side-by-side speed, memory, size and accuracy of models: the library behind ``rmtp bench``.

The numbers decide whether a pruned model is worth deploying, so they are measured the way a
performance engineer would (``docs/bench.md`` has the method, its limits and the JSON schema):

* every model is loaded, placed (device, dtype, memory format, optionally ``torch.compile``) and
  given its input batch before anything is timed; all timing runs under ``torch.inference_mode``
  with a fixed, reported number of threads;
* per batch size: a first call (compile time with ``--compile``), a warm-up, then interleaved
  rounds (A B, B A, A B …) so a shared machine's drift hits every model alike; each figure is the
  median over rounds with its quartiles, and each ratio is the median of per-round ratios against
  the first model (paired, so drift slower than one round cancels);
* CUDA is timed with events after a synchronize; peak memory is the peak of live tensor bytes
  during one call (CUDA's max-allocated delta; on the CPU from the profiler's allocation events),
  and on the CPU also the process's peak-RSS delta (see :mod:`rmtp.measure`).

The first model is the baseline; one rmtp output folder alone is compared with the dense model it
records. Results are plain dataclasses; :meth:`BenchReport.to_dict` is the versioned JSON
(``"schema": "rmtp-bench/1"``) and :func:`render_bench` / :func:`write_plots` draw the tables and plots.

    from rmtp.bench import benchmark_models
    report = benchmark_models(["runs/quickstart"], batches=[1, 32])
    report.batches[1].results[1].throughput_ratio.median   # speed-up of the pruned model at batch 32

- :mod:`rmtp.bench.loading`: the models a command line names → :class:`Candidate` (folders,
  checkpoints and their cards, ``timm:NAME``, a folder's dense baseline);
- :mod:`rmtp.bench.measuring`: :func:`benchmark_models`, :func:`benchmark` (settings, placement,
  kernels, top-1, the timed batches, out-of-memory as one line);
- :mod:`rmtp.bench.schema`: the result dataclasses and their JSON, and :class:`BenchError`;
- :mod:`rmtp.bench.environment`: the host recorded with the figures (CPU/GPU, cores, load);
- :mod:`rmtp.bench.report`: rich tables and PNG plots of a :class:`BenchReport`;
- :mod:`rmtp.bench.defaults`: the default batch sizes and timing rounds.
"""

from __future__ import annotations

from rmtp.lazy import lazy_exports

#: Public name → the module defining it, imported on first use (PEP 562): ``rmtp bench --help``
#: and :mod:`rmtp.bench.defaults` load no torch.
_EXPORTS = {
    **dict.fromkeys(("DEFAULT_BATCHES", "DEFAULT_ROUNDS", "MIN_ROUNDS"), "rmtp.bench.defaults"),
    **dict.fromkeys(("TIMM_PREFIX", "Candidate", "load_candidates"), "rmtp.bench.loading"),
    **dict.fromkeys(("DTYPES", "KERNEL_HOOK", "benchmark", "benchmark_models", "parse_batches"),
                    "rmtp.bench.measuring"),
    **dict.fromkeys(("check_plotting", "pareto_front", "render_bench", "write_plots"), "rmtp.bench.report"),
    **dict.fromkeys(("SCHEMA", "BatchResult", "BatchRun", "BenchError", "BenchModel", "BenchReport",
                     "BenchSettings", "EvalData"), "rmtp.bench.schema"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
