"""Measuring ``rmtp bench``'s figures: settings, placement, kernels, top-1, and the timed batches.

Every option is checked before any model is loaded. Each model's size and MACs are counted where
it was built, then it is placed (device, dtype, memory format, kernels, optionally
``torch.compile``) and given its input batch before anything is timed. Per batch size: a first
call (the compile time with ``--compile``), then :func:`rmtp.measure.interleaved_timing`, then
peak memory; an allocator running out becomes one line naming the batch and the model.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtp import measure
from rmtp.bench.defaults import DEFAULT_BATCHES, DEFAULT_ROUNDS, MIN_ROUNDS
from rmtp.bench.environment import busy_note, device_name, host_environment, loadavg
from rmtp.bench.loading import Candidate, load_candidates
from rmtp.bench.schema import BatchResult, BatchRun, BenchError, BenchModel, BenchReport, BenchSettings, EvalData
from rmtp.data import DataSpec, build_data, data_input_size, model_input_size
from rmtp.data.spec import PREPROCESSING_KEYS
from rmtp.errors import short_repr
from rmtp.run.device import resolve_device
from rmtp.run.oom import allocation_detail, is_out_of_memory
from rmtp.run.progress import NULL_PROGRESS, Progress

__all__ = ["DEFAULT_BATCHES", "DEFAULT_ROUNDS", "DTYPES", "KERNEL_HOOK", "MIN_ROUNDS", "benchmark",
           "benchmark_models", "parse_batches"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Name of the optional per-module hook through which a model says (and may switch) its kernels.
KERNEL_HOOK = "rmtp_kernel"
#: Share of exact zeros above which a model on dense kernels gets a note saying they save nothing.
ZEROS_NOTE_SHARE = 0.05
#: Peak-RSS measurements per model and batch on the CPU (the median is reported).
RSS_REPEATS = 3

_FP16_ON_CPU = (
    "dtype fp16 is refused on cpu: most CPUs have no fp16 arithmetic and PyTorch emulates it "
    "(the reference ViT ran ~20x slower than in fp32 here), so the figures would describe no real "
    "deployment; use fp32 or bf16 on cpu, or fp16 on cuda"
)


def parse_batches(text: str) -> list[int]:
    """``"1,32,256"`` → ``[1, 32, 256]`` (sorted, duplicates dropped); a clear error otherwise."""
    allowed = "give positive integers separated by commas, e.g. --batch 1,32,256"
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise BenchError(f"--batch {text!r}: empty; {allowed}")
    sizes = []
    for part in parts:
        try:
            size = int(part)
        except ValueError:
            raise BenchError(f"--batch {text!r}: {part!r} is not an integer; {allowed}") from None
        if size < 1:
            raise BenchError(f"--batch {text!r}: batch sizes must be at least 1, got {size}; {allowed}")
        sizes.append(size)
    return sorted(set(sizes))


def benchmark_models(sources: Sequence[str], *, device: str = "cpu", batches: Sequence[int] = DEFAULT_BATCHES,
                     dtype: str = "fp32", compile: bool = False, channels_last: bool = False,
                     rounds: int = DEFAULT_ROUNDS, threads: int | None = None, evaluate: bool = False,
                     eval_data: EvalData | None = None, model_name: str | None = None,
                     model_kwargs: dict[str, Any] | None = None, warmup_s: float = 0.3, block_s: float = 0.1,
                     progress: Progress = NULL_PROGRESS) -> BenchReport:
    """Load the models ``sources`` name (see :func:`load_candidates`) and :func:`benchmark` them.

    Settings are checked before any model is loaded. With ``evaluate``, top-1 is measured on
    ``eval_data``, or when it is None on the val data the first source that names one records
    (a folder's recipe.yaml, a checkpoint card's ``data``); a model whose own data names other
    preprocessing keeps it, one whose data names other val images is refused.
    """
    _check_settings(device, batches, dtype, rounds, threads, warmup_s, block_s)
    candidates = load_candidates(sources, model_name=model_name, model_kwargs=model_kwargs)
    if evaluate and eval_data is None:
        eval_data = next((c.eval_data for c in candidates if c.eval_data is not None), None)
        if eval_data is None:
            raise BenchError("--eval: none of the models names its val data; give an rmtp output folder "
                             "(its recipe.yaml has the data section) or a checkpoint with a card naming its data")
    return benchmark(candidates, device=device, batches=batches, dtype=dtype, compile=compile,
                     channels_last=channels_last, rounds=rounds, threads=threads,
                     eval_data=eval_data if evaluate else None, warmup_s=warmup_s, block_s=block_s,
                     progress=progress)


def benchmark(candidates: Sequence[Candidate], *, device: str = "cpu", batches: Sequence[int] = DEFAULT_BATCHES,
              dtype: str = "fp32", compile: bool = False, channels_last: bool = False,
              rounds: int = DEFAULT_ROUNDS, threads: int | None = None, eval_data: EvalData | None = None,
              warmup_s: float = 0.3, block_s: float = 0.1, progress: Progress = NULL_PROGRESS) -> BenchReport:
    """Measure ``candidates`` side by side; the first one is the baseline of every ratio.

    The models are moved to ``device``/``dtype`` (and channels-last) in place. ``threads`` fixes
    torch's intra-op threads for the duration (default: the current setting), restored after.
    """
    dev, torch_dtype, batch_list = _check_settings(device, batches, dtype, rounds, threads, warmup_s, block_s)
    if not candidates:
        raise BenchError("give at least one model to benchmark")
    started = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_before = loadavg()
    with measure.torch_threads(threads) as n_threads, _cuda_flags(dev) as cuda_flags, \
            _compile_limits(compile, len(candidates) * len(batch_list)):
        models = [_static_figures(i, c) for i, c in enumerate(candidates)]
        runners = []
        for c, m in zip(candidates, models):
            runners.append(_place(c, m, dev, torch_dtype, channels_last, compile))
        _add_ratios(models)
        with torch.inference_mode():
            if eval_data is not None:
                _evaluate(candidates, models, eval_data, dev, torch_dtype, channels_last, progress)
            runs = [_time_batch(b, candidates, models, runners, dev, torch_dtype, channels_last, compile, rounds,
                                warmup_s, block_s, progress) for b in batch_list]
    settings = BenchSettings(
        device=str(dev), device_name=device_name(dev), dtype=dtype, compile=compile, channels_last=channels_last,
        batches=batch_list, rounds=rounds, warmup_s=warmup_s, block_s=block_s, threads=n_threads,
        interop_threads=torch.get_num_interop_threads(),
        timer="cuda events after synchronize" if dev.type == "cuda" else "time.perf_counter",
        memory_method=measure.MEMORY_METHODS[dev.type],
        rss_method=measure.MEMORY_METHODS["rss"] if dev.type == "cpu" and measure.peak_rss_supported() else None,
        eval=eval_data, **cuda_flags)
    report = BenchReport(settings=settings, environment=host_environment(load_before), models=models, batches=runs,
                         seconds=time.perf_counter() - started, created=created)
    report.notes.extend(_report_notes(report))
    return report


def _check_settings(device: str, batches: Sequence[int], dtype: str, rounds: int, threads: int | None,
                    warmup_s: float, block_s: float) -> tuple[torch.device, torch.dtype, list[int]]:
    """Every option checked before any model is loaded; one clear line per problem."""
    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BenchError(f"device {str(device)!r}: allowed: cpu, cuda, cuda:N")
    dev = resolve_device(dev, option="--device")
    if dtype not in DTYPES:
        raise BenchError(f"dtype {dtype!r}: allowed: {', '.join(DTYPES)}")
    if dtype == "fp16" and dev.type == "cpu":
        raise BenchError(_FP16_ON_CPU)
    if dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BenchError(f"dtype bf16: {torch.cuda.get_device_name(dev)} does not support bfloat16; use fp16 or fp32")
    batches = list(batches)
    valid = bool(batches) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batches)
    if not valid:
        raise BenchError(f"batches {list(batches)!r}: give positive integer batch sizes, e.g. [1, 32, 256]")
    if not isinstance(rounds, int) or rounds < MIN_ROUNDS:
        raise BenchError(f"rounds must be at least {MIN_ROUNDS} (a median and quartiles need them), got {rounds}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BenchError(f"threads must be at least 1, got {threads}")
    if block_s <= 0 or warmup_s < 0:
        raise BenchError(f"block_s must be positive and warmup_s not negative, got {block_s}, {warmup_s}")
    return dev, DTYPES[dtype], sorted(set(batches))


@contextmanager
def _cuda_flags(dev: torch.device) -> Iterator[dict[str, Any]]:
    """On CUDA: cuDNN autotuning on (the warm-up absorbs it, as in any deployment); TF32 as set."""
    if dev.type != "cuda":
        yield {}
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield {"cudnn_benchmark": True, "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    finally:
        torch.backends.cudnn.benchmark = before


@contextmanager
def _compile_limits(enabled: bool, graphs: int) -> Iterator[None]:
    """Room for one static-shape graph per model and batch size: past dynamo's recompile limit
    (8) it would fall back to eager silently and the timings would be eager ones."""
    if not enabled:
        yield
        return
    # Inductor's import warns about a missing CUDA toolkit on CPU-only machines: noise here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: max(getattr(config, name), graphs + 8)}):
        yield


def _compiled_frames() -> int | None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["frames"]["total"])


def _static_figures(index: int, c: Candidate) -> BenchModel:
    """Params, nonzeros and MACs where the model was built (fp32, before any dtype change)."""
    c.model.eval()
    first = next(iter(c.model.parameters()), None)
    where = first.device if first is not None else torch.device("cpu")
    if c.input_shape is not None:
        shape = tuple(c.input_shape)
    elif c.eval_data is not None:  # the images its recipe or card trained and evaluates it on
        shape = data_input_size(c.eval_data.spec, c.model)
    else:
        shape = tuple(model_input_size(c.model))
    try:
        summary = measure.model_summary(c.model, shape, device=where)
    except RuntimeError as exc:
        raise BenchError(f"{c.label}: forward pass on a {_shape(shape)} input failed: {_one_line(exc)}") from None
    return BenchModel(index=index, label=c.label, source=c.source, kind=c.kind, timm_name=c.timm_name, arch=c.arch,
                      input_shape=shape, params=summary["params"], nonzeros=summary["nonzeros"],
                      macs=summary["macs"], attention_macs=summary["attention_macs"], weights_bytes=0, kernel="dense",
                      notes=list(c.notes))


def _place(c: Candidate, m: BenchModel, dev: torch.device, dtype: torch.dtype, channels_last: bool,
           compile: bool) -> Callable[[torch.Tensor], Any]:
    """Move the model to device and dtype, let its modules pick kernels, then compile if asked."""
    model = c.model.to(device=dev, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    m.weights_bytes = measure.model_bytes(model)
    m.kernel = _kernels(model, dev, dtype)
    zeros = 1 - m.nonzeros / m.params if m.params else 0.0
    if m.kernel == "dense" and zeros > ZEROS_NOTE_SHARE:
        m.notes.append(f"{zeros:.0%} of the parameters are exact zeros run by dense kernels: "
                       f"they save no time or memory here")
    if not compile:
        return model
    return torch.compile(model, dynamic=False)


def _kernels(model: nn.Module, dev: torch.device, dtype: torch.dtype) -> str:
    """The extension point for special kernels (N:M semi-structured on CUDA, …).

    A module may define ``rmtp_kernel``: a string, or a method ``rmtp_kernel(device, dtype)``
    called once here, after the model is on its device and in its dtype and before compiling.
    The method may switch the module to a special kernel (e.g. ``to_sparse_semi_structured`` on
    CUDA when the shapes allow) and returns a label such as ``"2:4 semi-structured"``, or None
    when it runs densely. A module without one is offered to the kernel providers plugins
    register (``register_kernels``; the ``n:m`` plugin's recognises 2:4 Linear layers), first
    label wins. The labels found form the model's ``kernel`` column; none: ``dense``.
    """
    from rmtp.plugins import get_plugins

    providers = get_plugins().kernels
    labels: list[str] = []
    for module in list(model.modules()):
        hook = getattr(module, KERNEL_HOOK, None)
        if hook is None:
            label = next((found for found in (p(module, device=dev, dtype=dtype) for p in providers) if found), None)
        else:
            label = hook(device=dev, dtype=dtype) if callable(hook) else hook
        if label and str(label) not in labels:
            labels.append(str(label))
    return ", ".join(labels) if labels else "dense"


def _add_ratios(models: list[BenchModel]) -> None:
    base = models[0]
    for m in models:
        m.ratios = {key: _ratio(getattr(m, key), getattr(base, key))
                    for key in ("params", "nonzeros", "macs", "attention_macs", "weights_bytes")}


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


class _CastLoader:
    """A val loader whose images arrive in the benchmarked dtype and memory format."""

    def __init__(self, loader: Any, dtype: torch.dtype, channels_last: bool):
        self.loader, self.dtype, self.channels_last = loader, dtype, channels_last
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.dtype)
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels


def _evaluate(candidates: Sequence[Candidate], models: list[BenchModel], eval_data: EvalData, dev: torch.device,
              dtype: torch.dtype, channels_last: bool, progress: Progress) -> None:
    """Top-1 of every model on the same seeded val split, in the benchmarked dtype, uncompiled.

    The val images are ``eval_data``'s; each model sees them through its own preprocessing
    (:func:`_eval_spec`), so a model trained at another size than the first is not scored on
    images it was never meant to see.
    """
    specs = [_eval_spec(c, eval_data) for c in candidates]  # all refusals before any model is evaluated
    for c, m, spec in zip(candidates, models, specs):
        if spec != eval_data.spec and c.eval_data is not None:
            m.notes.append(f"top-1 on the val images of {eval_data.source}, preprocessed as {c.eval_data.source} "
                           f"says ({_preprocessing_text(spec)})")
        data = build_data(spec, c.model)
        loader = data.loader("val")
        with progress.task(f"evaluating {c.label}", total=len(loader)) as advance:
            m.top1 = measure.top1(c.model, _CastLoader(loader, dtype, channels_last), device=dev,
                                  progress=lambda done, total: advance())
        m.eval_images = len(data.val)
    base = models[0].top1
    for m in models:
        m.top1_delta = None if m.top1 is None or base is None else m.top1 - base


#: DataSpec fields that pick the val images: models whose own data differ in one cannot share a val set.
_VAL_SET_KEYS = ("name", "root", "val_fraction", "split_seed")
#: DataSpec fields that only say how an image reaches a model: each model keeps its own.
_OWN_PREPROCESSING_KEYS = ("img_size", *PREPROCESSING_KEYS)


def _eval_spec(c: Candidate, shared: EvalData) -> DataSpec:
    """The val images ``shared`` names, preprocessed the way ``c``'s own data (recipe, card) says.

    A card's ``img_size: null`` means "the model's own input size", so applying the first model's
    data section to every model would feed, say, a ResNet trained on 32 px digits 224 px ones and
    report a silently wrong top-1. A model naming no data of its own takes ``shared`` whole. Models
    whose data pick other val images (another dataset, root, split) are refused: their top-1
    figures would not be comparable.
    """
    own = c.eval_data
    if own is None or own.spec == shared.spec:
        return shared.spec
    differ = [key for key in _VAL_SET_KEYS if _val_set_value(own.spec, key) != _val_set_value(shared.spec, key)]
    if differ:
        detail = "; ".join(f"{key} {short_repr(_shown(own.spec, key), 60)} vs "
                           f"{short_repr(_shown(shared.spec, key), 60)}" for key in differ)
        raise BenchError(f"--eval: {c.label} names other val data ({own.source}) than {shared.source}: {detail}; "
                         f"top-1 needs one val set: bench these models separately, or without --eval")
    return shared.spec.model_copy(update={key: getattr(own.spec, key) for key in _OWN_PREPROCESSING_KEYS})


def _val_set_value(spec: DataSpec, key: str) -> Any:
    """A field compared as the images it selects (a root by its resolved path)."""
    value = getattr(spec, key)
    return Path(value).expanduser().resolve() if key == "root" and value is not None else value


def _shown(spec: DataSpec, key: str) -> Any:
    """A field as an error line shows it (a root as its text, not ``PosixPath(...)``)."""
    value = getattr(spec, key)
    return str(value) if isinstance(value, Path) else value


def _preprocessing_text(spec: DataSpec) -> str:
    """The preprocessing fields a spec sets, e.g. ``img_size 32``; the model's own input size if none."""
    shown = [f"{key} {getattr(spec, key)}" for key in _OWN_PREPROCESSING_KEYS if getattr(spec, key) is not None]
    return ", ".join(shown) if shown else "the model's own input size"


def _time_batch(batch: int, candidates: Sequence[Candidate], models: list[BenchModel], runners: list[Callable],
                dev: torch.device, dtype: torch.dtype, channels_last: bool, compile: bool, rounds: int,
                warmup_s: float, block_s: float, progress: Progress) -> BatchRun:
    with _fits_in_memory(batch, None, dev):
        return _time_batch_fitting(batch, candidates, models, runners, dev, dtype, channels_last, compile, rounds,
                                   warmup_s, block_s, progress)


@contextmanager
def _fits_in_memory(batch: int, what: str | None, dev: torch.device) -> Iterator[None]:
    """Turn an allocator's out-of-memory error into one line naming the batch and the model."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise _out_of_memory(batch, what, dev, exc) from None


def _out_of_memory(batch: int, what: str | None, dev: torch.device, exc: BaseException) -> BenchError:
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # give back what the failed batch cached, for the caller's next try
    detail = allocation_detail(exc)
    return BenchError(f"--batch {batch}{f' with {what}' if what else ''} does not fit in {dev.type.upper()} memory"
                      f"{f' ({detail})' if detail else ''}; try a smaller --batch")


def _time_batch_fitting(batch: int, candidates: Sequence[Candidate], models: list[BenchModel],
                        runners: list[Callable], dev: torch.device, dtype: torch.dtype, channels_last: bool,
                        compile: bool, rounds: int, warmup_s: float, block_s: float, progress: Progress) -> BatchRun:
    inputs: dict[tuple[int, ...], torch.Tensor] = {}
    fns = []
    for m, runner in zip(models, runners):
        if m.input_shape not in inputs:  # made once, outside any timed region; shared by equal shapes
            generator = torch.Generator().manual_seed(batch)
            x = torch.randn((batch, *m.input_shape), generator=generator).to(device=dev, dtype=dtype)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            inputs[m.input_shape] = x
        fns.append(partial(runner, inputs[m.input_shape]))
    first_calls = []
    with progress.task(f"batch {batch}: first calls" + (" (compiling)" if compile else ""), total=len(fns)) as advance:
        for fn, m in zip(fns, models):
            first_calls.append(_first_call(fn, m, batch, dev, dtype, compile))
            advance()
    frames_before = _compiled_frames() if compile else None
    with progress.task(f"batch {batch}: warm-up, {rounds} interleaved rounds", total=rounds) as advance:
        timings = measure.interleaved_timing(fns, device=dev, rounds=rounds, warmup_s=warmup_s, block_s=block_s,
                                             on_round=lambda r: advance())
    recompiles = None
    if compile and frames_before is not None:
        recompiles = (_compiled_frames() or 0) - frames_before
    memory = [measure.peak_memory_delta(fn, dev) for fn in fns]
    rss: list[int | None] = [None] * len(fns)
    if dev.type == "cpu":
        rss = [_median_or_none([measure.peak_rss_delta(fn) for _ in range(RSS_REPEATS)]) for fn in fns]
    base_s = timings[0].seconds
    results = []
    for i, (m, t) in enumerate(zip(models, timings)):
        latency_ratio = [s / b for s, b in zip(t.seconds, base_s)]
        results.append(BatchResult(
            model=i, label=m.label,
            latency_ms=measure.Spread.of([s * 1e3 for s in t.seconds]),
            throughput=measure.Spread.of([batch / s for s in t.seconds]),
            latency_ratio=measure.Spread.of(latency_ratio),
            throughput_ratio=measure.Spread.of([1 / r for r in latency_ratio]),
            peak_mem_bytes=memory[i], peak_mem_ratio=_ratio(memory[i], memory[0]), peak_rss_bytes=rss[i],
            first_call_s=first_calls[i], iters=t.iters, warmup_calls=t.warmup_calls,
            samples_ms=[s * 1e3 for s in t.seconds]))
    return BatchRun(batch=batch, results=results, recompiles=recompiles)


def _first_call(fn: Callable[[], Any], m: BenchModel, batch: int, dev: torch.device, dtype: torch.dtype,
                compile: bool) -> float:
    """Seconds of the first call at this batch size (compilation included); a failure is one line."""
    started = time.perf_counter()
    try:
        fn()
        measure.synchronize(dev)
    except Exception as exc:  # any failure of the model's forward is the user's to see, in one line
        if is_out_of_memory(exc):
            raise _out_of_memory(batch, f"model {m.label!r}", dev, exc) from None
        what = "torch.compile of" if compile else "forward pass of"
        raise BenchError(f"{m.label}: {what} a batch of {batch} × {_shape(m.input_shape)} "
                         f"{_dtype_name(dtype)} on {dev} failed: {_one_line(exc)}") from exc
    return time.perf_counter() - started


def _median_or_none(values: list[int | None]) -> int | None:
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def _report_notes(report: BenchReport) -> list[str]:
    notes = []
    if len(report.models) == 1:
        notes.append("one model: nothing to compare it with (ratios are 1)")
    for run in report.batches:
        if run.recompiles:
            notes.append(f"batch {run.batch}: torch.compile built {run.recompiles} more graph(s) after the first "
                         f"calls, so some timed calls may have included compilation")
    env, threads = report.environment, report.settings.threads
    busy = busy_note([env.get("loadavg_1min_start"), env.get("loadavg_1min_end")], env.get("cpu_cores") or 0)
    if busy:
        advice = f"; {threads} threads on a busy machine wait for descheduled threads: try --threads 1" \
            if report.settings.device == "cpu" and threads > 1 else ""
        notes.append(f"{busy}; trust a speed-up only outside the noise floor of a same-model run "
                     f"(rmtp bench X X){advice}")
    if report.settings.device == "cpu" and report.settings.rss_method is None:
        notes.append("peak RSS is not measured on this platform (needs Linux /proc/self/clear_refs and glibc)")
    return notes


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
