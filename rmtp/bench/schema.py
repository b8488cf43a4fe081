"""What ``rmtp bench`` produces: the result dataclasses and their versioned JSON.

:meth:`BenchReport.to_dict` is the JSON ``--json`` writes (``"schema": "rmtp-bench/1"``, described
field by field in ``docs/bench.md``); the terminal tables and the plots (:mod:`rmtp.bench.report`)
read the same objects. :class:`BenchError` is what every part of the benchmark raises for a
benchmark that cannot run as asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rmtp.data import DataSpec
from rmtp.errors import RmtpError
from rmtp.measure import Spread

__all__ = ["SCHEMA", "BatchResult", "BatchRun", "BenchError", "BenchModel", "BenchReport", "BenchSettings",
           "EvalData"]

#: Identifies the JSON layout of :meth:`BenchReport.to_dict`; bumped on any incompatible change.
SCHEMA = "rmtp-bench/1"


class BenchError(RmtpError):
    """A benchmark cannot run as asked (bad option, unknown model source, a model that fails)."""


@dataclass(frozen=True)
class EvalData:
    """The val split ``--eval`` measures top-1 on: a recipe's ``data:`` section and its seed."""

    spec: DataSpec
    seed: int = 0
    #: Where it was read from (a recipe.yaml, a checkpoint card), for the report.
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seed": self.seed, "data": self.spec.model_dump(mode="json")}


@dataclass
class BenchSettings:
    """How the figures were measured (all of it goes into the JSON)."""

    device: str
    device_name: str
    dtype: str
    compile: bool
    channels_last: bool
    batches: list[int]
    rounds: int
    warmup_s: float
    block_s: float
    threads: int
    interop_threads: int
    timer: str
    memory_method: str | None
    rss_method: str | None = None
    eval: EvalData | None = None
    cudnn_benchmark: bool | None = None
    matmul_tf32: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "device_name": self.device_name, "dtype": self.dtype, "compile": self.compile,
            "channels_last": self.channels_last, "batches": list(self.batches), "rounds": self.rounds,
            "order": "interleaved, rotated each round", "warmup_s": self.warmup_s, "block_s": self.block_s,
            "threads": self.threads, "interop_threads": self.interop_threads, "timer": self.timer,
            "memory_method": self.memory_method, "rss_method": self.rss_method,
            "eval": self.eval.to_dict() if self.eval else None,
            "cudnn_benchmark": self.cudnn_benchmark, "matmul_tf32": self.matmul_tf32,
        }


@dataclass
class BenchModel:
    """Batch-independent figures of one model, with ratios to the baseline (the first model)."""

    index: int
    label: str
    source: str
    kind: str
    timm_name: str | None
    arch: str | None
    input_shape: tuple[int, ...]
    params: int
    nonzeros: int
    #: Multiply-accumulates of one image (batch of one), attention included.
    macs: int
    attention_macs: int
    #: Bytes of parameters and buffers in the benchmarked dtype.
    weights_bytes: int
    #: Which kernels run the model: ``dense`` unless a module's ``rmtp_kernel`` hook says otherwise.
    kernel: str
    top1: float | None = None
    eval_images: int | None = None
    notes: list[str] = field(default_factory=list)
    #: params, nonzeros, macs, attention_macs, weights_bytes: this model / the baseline.
    ratios: dict[str, float | None] = field(default_factory=dict)
    #: Top-1 minus the baseline's, in points (None without ``--eval``).
    top1_delta: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "label": self.label, "source": self.source, "kind": self.kind,
            "timm_name": self.timm_name, "arch": self.arch, "input_shape": list(self.input_shape),
            "params": self.params, "nonzeros": self.nonzeros, "macs": self.macs,
            "attention_macs": self.attention_macs, "weights_bytes": self.weights_bytes, "kernel": self.kernel,
            "top1": self.top1, "eval_images": self.eval_images, "top1_delta": self.top1_delta,
            "ratios": dict(self.ratios), "notes": list(self.notes),
        }


@dataclass
class BatchResult:
    """Timed figures of one model at one batch size."""

    model: int
    label: str
    #: Per-call latency of the whole batch, over rounds (milliseconds).
    latency_ms: Spread
    #: Images per second, over rounds (batch / per-round latency).
    throughput: Spread
    #: Per-round latency / the baseline's latency in the same round (paired).
    latency_ratio: Spread
    #: Per-round throughput / the baseline's: the speed-up (> 1 is faster).
    throughput_ratio: Spread
    #: Bytes of tensors alive at the peak of one call, above those alive before it (activations,
    #: workspace, output; weights and input excluded). Same meaning on CPU and CUDA.
    peak_mem_bytes: int | None
    peak_mem_ratio: float | None
    #: CPU only: the process's resident-set peak during one call above its level before (what the
    #: OS saw; allocator slack and non-PyTorch buffers included). None on CUDA or where unsupported.
    peak_rss_bytes: int | None
    #: Duration of the very first call at this batch size: with --compile, the compile time.
    first_call_s: float
    #: Calls per timed block and warm-up calls made.
    iters: int
    warmup_calls: int
    samples_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "label": self.label, "latency_ms": self.latency_ms.to_dict(),
            "throughput": self.throughput.to_dict(), "latency_ratio": self.latency_ratio.to_dict(),
            "throughput_ratio": self.throughput_ratio.to_dict(), "peak_mem_bytes": self.peak_mem_bytes,
            "peak_mem_ratio": self.peak_mem_ratio, "peak_rss_bytes": self.peak_rss_bytes,
            "first_call_s": self.first_call_s, "iters": self.iters,
            "warmup_calls": self.warmup_calls, "samples_ms": list(self.samples_ms),
        }


@dataclass
class BatchRun:
    batch: int
    results: list[BatchResult]
    #: Graphs torch.compile built after the first calls (warm-up and timing): 0 means no recompiles.
    recompiles: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "recompiles": self.recompiles, "results": [r.to_dict() for r in self.results]}


@dataclass
class BenchReport:
    settings: BenchSettings
    environment: dict[str, Any]
    models: list[BenchModel]
    batches: list[BatchRun]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    created: str = ""

    @property
    def baseline(self) -> BenchModel:
        return self.models[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": self.created,
            "seconds": self.seconds,
            "environment": dict(self.environment),
            "settings": self.settings.to_dict(),
            "baseline": 0,
            "models": [m.to_dict() for m in self.models],
            "batches": [b.to_dict() for b in self.batches],
            "notes": list(self.notes),
        }
