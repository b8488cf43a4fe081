"""The per-layer cost model: how long a layer (or a candidate replacement of it) takes per call on
the target, at the batch, input shape, precision and threads the model will run at.

:class:`MeasuredCost` times the candidates of one layer interleaved with the dense layer
(:func:`rmtp.measure.interleaved_timing`: rotated rounds, medians, so drift hits all alike) and
caches each result in a :class:`~rmtp.latency.table.CostTable`. :class:`MacsCost` predicts
time by multiply-accumulates instead, for machines whose timings mean nothing and for
deterministic tests. Pruners use both through :class:`CostModel`:

* :meth:`CostModel.layer_inputs`: the input shape of every named layer, from one forward pass
  of a random batch (so a layer behind a token pruner sees its reduced token count);
* :meth:`CostModel.seconds`: per-call time of several modules fed the same input;
* :meth:`CostModel.model_seconds`: whole models, timed against each other;
* :func:`rank_grid` and :func:`interpolate`: ranks (or token counts) are timed on a grid and
  read in between, since timing every rank of every layer would take longer than the pruning.

A whole model's time after replacing layers is predicted as its time now minus the layers'
savings (:func:`predicted_seconds`); ``benchmarks/latency_budgets.py`` measures how close that is.
"""

from __future__ import annotations

import bisect
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from rmtp.latency.settings import LatencySettings
from rmtp.latency.table import CostTable, LatencyError, device_name, module_key, table_path
from rmtp.measure.running import evaluating
from rmtp.measure.timing import interleaved_timing, torch_threads
from rmtp.run.precision import autocast, check_precision
from rmtp.run.progress import NULL_PROGRESS, Progress

__all__ = ["CostModel", "MacsCost", "MeasuredCost", "cost_model", "interpolate", "predicted_seconds",
           "rank_grid", "round_up", "same_structure"]

MEASURABLE_DEVICES = ("cpu", "cuda")


class CostModel(ABC):
    """Per-call cost of modules and models at one batch size on one device (see the module doc)."""

    #: ``"measured"`` or ``"macs"``: what :meth:`seconds` returns (seconds, or MACs standing for them).
    kind: str

    def __init__(self, settings: LatencySettings, device: torch.device, input_shape: tuple[int, ...],
                 progress: Progress = NULL_PROGRESS):
        self.settings = settings
        self.device = device
        self.input_shape = tuple(input_shape)
        self.progress = progress

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return (self.settings.batch, *self.input_shape)

    def describe(self) -> str:
        """How the figures were obtained, for a report line."""
        s = self.settings
        threads = f", {s.threads} thread{'s' * (s.threads != 1)}" if s.threads else ""
        return f"{self.kind} on {self.device.type}, batch {s.batch}{threads}, {s.precision}"

    def layer_inputs(self, model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Input shape of each named submodule in one forward pass of a random batch (layers the
        pass never reaches are left out)."""
        return {name: shapes[0] for name, shapes in self.layer_shapes(model, names).items()}

    def layer_shapes(self, model: nn.Module,
                     names: Sequence[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """(input shape, output shape) of each named submodule in one forward pass of a random batch."""
        shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        hooks = []
        for name in names:
            def hook(module: nn.Module, args: tuple, output: object, name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                    shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))
            hooks.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            x = torch.randn(self.batch_shape, device=self.device, dtype=_dtype(model))
            with evaluating(model), torch.inference_mode():
                model(x)
        except (RuntimeError, TypeError, ValueError):
            pass  # a model that does not take this input: the layers reached so far (callers fall back)
        finally:
            for handle in hooks:
                handle.remove()
        return shapes

    def in_context(self, dense: nn.Module, model: nn.Module, names: Sequence[str]) -> tuple[float, float, float]:
        """(dense model, ``model``, the named layers inside ``model``): per-call times, one session.

        A layer timed alone has its weights and input hot in cache; inside the model it competes
        with every other layer for it, so its real share of the model's time (and what replacing
        it saves) differs. That share is measured directly, interleaved with the two models: a
        copy of ``model`` whose named layers return a ready-made output at no cost. Timing all
        three together keeps them comparable on a machine whose speed drifts (a cost table's
        entries may be hours old; only their ratios are used). For ``cost: macs``, MACs.

        A ``model`` that is the dense one in all that sets its time (:func:`same_structure`: a
        first step's copy) is timed once and is ×1.00 of it: two timings of one computation
        differ only by noise, which a busy machine made ×0.62.
        """
        import copy

        shapes = self.layer_shapes(model, names) if names and self.kind == "measured" else {}
        stubbed = None
        if shapes:
            stubbed = copy.deepcopy(model)
            for name, (_, out_shape) in shapes.items():
                stubbed.set_submodule(name, _Ready(out_shape, self.device, _dtype(model)))
        same = dense is model or same_structure(dense, model)
        models = [model] if same else [dense, model]
        times = self.model_seconds(models + ([stubbed] if stubbed is not None else []))
        dense_s, now_s = (times[0], times[0]) if same else (times[0], times[1])
        without = times[-1] if stubbed is not None else now_s
        if self.kind == "macs":  # MACs add up: the layers' share is their own count
            return dense_s, now_s, sum(self.seconds([model.get_submodule(n)], shape)[0]
                                       for n, (shape, _) in self.layer_shapes(model, names).items())
        return dense_s, now_s, max(now_s - without, 0.0)

    @abstractmethod
    def seconds(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...], what: str = "") -> list[float]:
        """Per-call cost of each module on one input of ``input_shape`` (batch included); time the
        dense layer first and its candidates after it."""

    def model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        """Per-call cost of each whole model on a batch of ``settings.batch`` inputs."""
        try:
            return self._model_seconds(models)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise LatencyError(f"latency: the model does not run on a batch of shape {list(self.batch_shape)} "
                               f"({str(exc).splitlines()[0][:160]}); give the model's input shape "
                               f"(input_shape=) or set latency.batch") from None

    @abstractmethod
    def _model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        """:meth:`model_seconds` itself."""


class MeasuredCost(CostModel):
    """Times on the device, interleaved, cached (see the module doc)."""

    kind = "measured"

    def __init__(self, settings: LatencySettings, device: torch.device, input_shape: tuple[int, ...],
                 progress: Progress = NULL_PROGRESS):
        super().__init__(settings, device, input_shape, progress)
        threads = settings.threads or torch.get_num_threads()
        self.threads = threads
        header = {"device": device_name(device), "torch": torch.__version__, "precision": settings.precision,
                  "batch": settings.batch, "threads": threads}
        self.table = CostTable.open(table_path(settings.cache_dir(), header["device"], settings.precision,
                                               settings.batch, threads), header)
        self.timed = 0  # modules timed in this process (the rest came from the table)

    def seconds(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...], what: str = "") -> list[float]:
        keys = [module_key(m, input_shape) for m in modules]
        cached = [self.table.seconds(k) for k in keys]
        if all(c is not None for c in cached):
            return [float(c) for c in cached]
        times = self._time(modules, input_shape)
        for key, module, value in zip(keys, modules, times):
            self.table.record(key, value, what or type(module).__name__)
        self.table.save()
        self.timed += len(modules)
        return times

    def _time(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[float]:
        x = torch.randn(input_shape, device=self.device, dtype=_dtype(modules[0]))
        return self._interleaved([lambda m=m: m(x) for m in modules], list(modules))

    def _model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        x = torch.randn(self.batch_shape, device=self.device, dtype=_dtype(models[0]))
        return self._interleaved([lambda m=m: m(x) for m in models], list(models),
                                 rounds=max(2 * self.settings.rounds, 15))

    def _interleaved(self, calls: list, modules: list[nn.Module], rounds: int | None = None) -> list[float]:
        s = self.settings
        with torch_threads(self.threads), _all_evaluating(modules), torch.inference_mode(), \
                autocast(s.precision, self.device):
            timings = interleaved_timing(calls, device=self.device, rounds=rounds or s.rounds,
                                         warmup_s=min(0.3, 3 * s.block_ms / 1e3), block_s=s.block_ms / 1e3)
        return [statistics.median(t.seconds) for t in timings]


class MacsCost(CostModel):
    """Multiply-accumulates standing for time: every saved MAC is saved time (an ideal device)."""

    kind = "macs"

    def seconds(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...], what: str = "") -> list[float]:
        return [float(_macs(m, input_shape, self.device)) for m in modules]

    def _model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        return [float(_macs(m, self.batch_shape, self.device)) for m in models]


def cost_model(settings: LatencySettings, device: torch.device, input_shape: tuple[int, ...],
               progress: Progress = NULL_PROGRESS) -> CostModel:
    """The cost model ``settings`` ask for on ``device``; a device rmtp cannot time on is refused
    in one line (``cost: macs`` needs no device)."""
    if settings.cost == "macs":
        return MacsCost(settings, device, input_shape, progress)
    if device.type not in MEASURABLE_DEVICES:
        raise LatencyError(f"latency: cannot time layers on device {device.type!r}; rmtp.latency measures on "
                           f"{' or '.join(MEASURABLE_DEVICES)} (or set latency.cost: macs)")
    check_precision(settings.precision, device, option="latency.precision")
    return MeasuredCost(settings, device, input_shape, progress)


def predicted_seconds(now: float, savings: Sequence[float]) -> float:
    """A model's time after its layers are replaced: its time now minus the layers' savings (a
    saving below zero, a replacement that is slower, counts as it is)."""
    return max(now - sum(savings), 1e-12)


# --------------------------------------------------------------------------- grids


def round_up(value: int, multiple: int | None, ceiling: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (None: unchanged), never above ``ceiling``."""
    if not multiple or value <= 0:
        return min(value, ceiling)
    return min(int(math.ceil(value / multiple) * multiple), ceiling)


def rank_grid(low: int, high: int, points: int, round_to: int | None = None) -> list[int]:
    """``points`` distinct integers from ``low`` to ``high`` (both included), evenly spaced, each
    rounded up to ``round_to`` when given (and capped at ``high``; ``low`` too, so every value is a
    multiple of ``round_to`` or ``high``)."""
    if high < low:
        raise ValueError(f"rank_grid: high {high} below low {low}")
    values = {round_up(low, round_to, high), high}
    for i in range(points):
        value = round(low + (high - low) * i / max(points - 1, 1))
        values.add(round_up(value, round_to, high))
    return sorted(v for v in values if low <= v <= high)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through the points (``xs`` ascending), extended linearly past
    either end from its last segment."""
    if not xs or len(xs) != len(ys):
        raise ValueError("interpolate needs matching, non-empty xs and ys")
    if len(xs) == 1:
        return float(ys[0])
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0)) if x1 != x0 else float(y0)


def monotone(values: Sequence[float]) -> list[float]:
    """Running maximum: a bigger rank or more tokens never costs less (timing noise aside)."""
    out, best = [], -math.inf
    for v in values:
        best = max(best, v)
        out.append(best)
    return out


# --------------------------------------------------------------------------- helpers


class _Ready(nn.Module):
    """Stands in for a layer at no cost: returns a tensor of the layer's output shape, made once."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("out", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.out


def same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` run the same computation, weight values aside: the same modules
    (type, repr, plain attributes such as timm's ``fused_attn``, forward overrides and hooks), the
    same parameters and buffers (shape, dtype, layout, device) and the same rmtp patches. What
    only a weight's values change (a mask's zeros) runs as the same dense kernels."""
    return _structure(a) == _structure(b)


def _structure(model: nn.Module) -> tuple:
    modules = [(name, type(m), m.extra_repr(), "forward" in vars(m), len(m._forward_hooks),
                len(m._forward_pre_hooks),
                sorted((k, v) for k, v in vars(m).items()
                       if k != "training" and not k.startswith("_") and isinstance(v, (bool, int, float, str))))
               for name, m in model.named_modules()]
    tensors = [(name, type(t.data), tuple(t.shape), t.dtype, t.layout, t.device)
               for name, t in [*model.named_parameters(), *model.named_buffers()]]
    return modules, tensors, _patches(model)


def _patches(model: nn.Module) -> list[tuple[type, str]]:
    """rmtp's forward-pass patches on ``model`` (what :func:`rmtp.contract.saved_types.patches_of` returns), found
    by what they are, objects with ``rmtp_config`` in a list attribute: importing rmtp.contract.saved_types here
    would close an import cycle (rmtp.plugins → rmtp.contract.pruner → here → rmtp.contract.saved_types →
    rmtp.plugins)."""
    return [(type(patch), repr(patch.rmtp_config())) for value in vars(model).values() if isinstance(value, list)
            for patch in value if callable(getattr(patch, "rmtp_config", None))]


def _dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


@contextmanager
def _all_evaluating(modules: Sequence[nn.Module]) -> Iterator[None]:
    """:func:`rmtp.measure.running.evaluating` for several modules at once."""
    with ExitStack() as stack:
        for module in modules:
            stack.enter_context(evaluating(module))
        yield


def _macs(module: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int:
    from rmtp.measure.counts import counted_forward

    return counted_forward(module, torch.randn(input_shape, device=device, dtype=_dtype(module))).get_total_flops() // 2
