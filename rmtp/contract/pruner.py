"""The pruner contract: what every pruner plugin receives and what it must return.

One contract serves three kinds of pruners:

* **weight** pruners replace layers (e.g. a Linear by two thin Linears for a low-rank split);
* **mask** pruners zero weights in place (unstructured magnitude, N:M);
* **token** pruners change the forward pass of attention blocks.

Each gets a :class:`PruneContext` (the model, its architecture adapter, the layers the recipe
step selected, calibration data when :meth:`Pruner.calibration_use` asks for it, the frozen dense
model) and its params, already validated against its ``Params`` pydantic model. It mutates
``ctx.model`` (nothing else in the context is its to change) and returns a :class:`PruneResult`:
one :class:`LayerRow` per layer (or block) it touched, and what it predicted when it planned in
time; a plain list of rows (the result before there was more to say) is still accepted. A pruner
never prints: the pipeline renders the rows.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from rmtp.contract.architecture import Architecture, PrunableLayer
from rmtp.run.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:  # torch is imported where a pruner runs, so `rmtp list` and `validate` need none
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from rmtp.fidelity.accuracy_budget import StrengthKnob
    from rmtp.latency.cost import CostModel
    from rmtp.latency.settings import LatencySettings

PrunerKind = Literal["weight", "mask", "token"]
T = TypeVar("T")
#: How a pruner uses calibration data (:meth:`Pruner.calibration_use`).
CalibrationUse = Literal["required", "optional", "unused"]


class PrunerParams(BaseModel):
    """Base of every pruner's params: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LayerRow:
    """What a pruner did to one layer (or one block, for token pruners)."""

    layer: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params_before: int
    params_after: int
    nonzeros_before: int
    nonzeros_after: int
    #: The share of the layer the pruner's budget allowed to keep (fraction of params, rank or tokens).
    budget: float | None = None
    kept_rank: int | None = None
    kept_fraction: float | None = None
    note: str = ""
    #: Why the pruner left this layer alone (too small, unsupported type...), or None if it acted.
    skipped: str | None = None
    #: Pruner-specific figures (edge, tokens in/out, ...), rendered as extra columns.
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of the layer's original weights that are now zero or gone."""
        return 1.0 - self.nonzeros_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sparsity"] = self.sparsity
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRow:
        """Inverse of :meth:`to_dict` (a checkpoint's reports are read back with it)."""
        fields = {k: v for k, v in data.items() if k != "sparsity"}
        fields["shape_before"], fields["shape_after"] = tuple(fields["shape_before"]), tuple(fields["shape_after"])
        return cls(**fields)


@dataclass
class PruneResult:
    """What :meth:`Pruner.prune` returns: the rows, and what a pruner that planned in time predicted.

    Nothing goes back through the :class:`PruneContext`: the step reads the result. A pruner with
    nothing but rows may return them as a plain ``list[LayerRow]`` (:meth:`of` reads both).
    """

    rows: list[LayerRow] = field(default_factory=list)
    #: A pruner that planned in time (a speed target, ``only_if_faster`` with measured costs): its
    #: predicted whole-model speed-up and how it got there
    #: (:meth:`rmtp.latency.target.SpeedTarget.speed_plan`), which the step then measures against
    #: the clock and reports; ``None``: it made no prediction.
    speed_plan: dict[str, Any] | None = None

    @classmethod
    def of(cls, returned: PruneResult | list[LayerRow] | tuple[LayerRow, ...],
           pruner: str = "the pruner") -> PruneResult:
        """``returned`` as a result: a result as it is, a list (or tuple) of rows as one without a
        speed plan; anything else is a :class:`~rmtp.errors.PluginError` naming ``pruner``."""
        if isinstance(returned, PruneResult):
            return returned
        if isinstance(returned, (list, tuple)) and all(isinstance(row, LayerRow) for row in returned):
            return cls(rows=list(returned))
        from rmtp.errors import PluginError

        raise PluginError(f"{pruner}.prune returned {type(returned).__name__}; a pruner returns a PruneResult or a "
                          f"list of LayerRow (docs/pruner-contract.md)")


class StepOutput(Protocol):
    """Where a prune step may save extra artefacts next to the run's own output.

    Given to a pruner as ``ctx.output`` only when the recipe has an ``output`` (and only on the
    main process). Entries are staged while the run goes on and moved into the output folder,
    each under its ``name``, once the run's final model is saved there: an interrupted run
    leaves none of them behind. Names are plain folder/file names, unique within a run.
    """

    def free_name(self, name: str) -> str:
        """``name`` if no earlier step used it, else ``step<k>-<name>`` (k: this step's index), so a
        pruner used twice in one recipe keeps both steps' artefacts."""

    def save_model(self, name: str, model: nn.Module, report: dict[str, Any]) -> Path:
        """Save ``model`` as a loadable rmtp folder ``<output>/<name>/`` (with ``report`` as report.json)."""

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``data`` as ``<output>/<name>`` (JSON)."""

    def write_file(self, name: str, write: Callable[[Path], Any]) -> Path:
        """Have ``write(path)`` create ``<output>/<name>`` (a figure, a table); ``path`` is the staged location."""


@dataclass
class PruneContext:
    """Everything a pruner may use. Pruners mutate ``model``; nothing else is theirs to change
    (what they have to say goes in their :class:`PruneResult`). ``cost`` is the context's own cache,
    filled by :meth:`cost_model` on first use."""

    model: nn.Module
    arch: Architecture
    layers: list[PrunableLayer]
    device: torch.device
    seed: int
    dense_model: nn.Module | None = None
    calibration: DataLoader | None = None
    progress: Progress = NULL_PROGRESS
    #: Extra artefacts of the step (model variants, JSON, figures); ``None`` when the run saves nothing.
    output: StepOutput | None = None
    #: ``preview_images(n)``: the first ``n`` val images as one batch, for figures in the output
    #: (e.g. token maps) only. Never choose anything from them: that would tune the model to the
    #: images its accuracy is reported on.
    preview_images: Callable[[int], torch.Tensor] | None = None
    #: The step's ``precision`` (``fp32``, ``bf16``, ``fp16`` on CUDA): calibration passes that run
    #: the model (spp's search, n:m's activation statistics) run under :meth:`autocast`.
    precision: str = "fp32"
    #: One model input (C, H, W): the shape layers are timed at (``latency``).
    input_shape: tuple[int, ...] | None = None
    #: How replacements are timed (the step's ``latency:``); ``None``: the defaults.
    latency: LatencySettings | None = None
    #: The step's latency cost model: built from ``latency`` on first use by :meth:`cost_model`, or
    #: given (a table of known costs, a user's own :class:`~rmtp.latency.cost.CostModel`).
    cost: CostModel | None = field(default=None, repr=False)
    #: Shared by every prune of one step: an accuracy budget's candidates and the step's final prune
    #: get the same dict, on the same incoming model, calibration images and seed. A pruner keeps here
    #: work its strength knob does not change (spp's solution path), keyed by whatever else may differ
    #: between the step's prunes (its other params), so a budget does not redo it per candidate
    #: (:meth:`step_cached` builds that key). Nothing in it outlives the step.
    step_cache: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def step_cached(self, name: str, layers: Iterable[str], params: PrunerParams, *, varies: Iterable[str],
                    compute: Callable[[], T]) -> T:
        """``compute()`` once per step (:attr:`step_cache`): the first prune of the step computes it,
        every later one (a budget's other candidates, the final prune) gets the same object. The
        key is ``name``, the ``layers`` it covers and every param but those in ``varies`` (the
        params the step's prunes differ in and ``compute`` does not read)."""
        import json

        rest = json.dumps(params.model_dump(mode="json", exclude=set(varies)), sort_keys=True)
        key = (name, tuple(layers), rest)
        if key not in self.step_cache:
            self.step_cache[key] = compute()
        return self.step_cache[key]

    def cost_model(self) -> CostModel:
        """The step's latency cost model (built on first use, then shared by the step)."""
        if self.cost is None:
            from rmtp.data import model_input_size
            from rmtp.latency.cost import cost_model
            from rmtp.latency.settings import LatencySettings

            shape = self.input_shape or model_input_size(self.model)
            self.cost = cost_model(self.latency or LatencySettings(), self.device, shape, self.progress)
        return self.cost

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for the step's precision on ``device`` (a no-op for fp32)."""
        from rmtp.run.precision import autocast

        return autocast(self.precision, self.device)

    def module(self, layer: PrunableLayer | str) -> nn.Module:
        return self.model.get_submodule(layer if isinstance(layer, str) else layer.name)


class Pruner(ABC):
    """Base class of pruner plugins.

    Besides :meth:`prune`, a pruner answers the questions the pipeline (and ``rmtp validate``)
    asks it instead of branching on its attributes: :meth:`candidate_layers`,
    :meth:`calibration_needed` (refined per step by :meth:`calibration_use`),
    :meth:`prunes_weights` and, for an accuracy budget, :meth:`strength_knob`. Their defaults follow
    the class attributes ``revisits_replaced_layers``, ``needs_calibration`` and ``kind`` (and a
    ``target_speedup`` param), so a pruner usually sets those; one that needs more overrides the
    classmethod.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[PrunerKind]
    Params: ClassVar[type[PrunerParams]]
    needs_calibration: ClassVar[bool] = False
    #: Also offered the layers a pruner already replaced (under their original names), e.g. so a
    #: second svd-mp round can cut the rank of a split layer further.
    revisits_replaced_layers: ClassVar[bool] = False
    #: False for a pruner whose replacement layers pass no gradient (int8's kernel): a recipe that
    #: trains after such a step (finetune, distill, reconstruct), or runs a weight or mask pruner after it
    #: (which would find no plain layers left to cut), is refused when it is validated.
    passes_gradients: ClassVar[bool] = True

    @abstractmethod
    def prune(self, ctx: PruneContext, params: PrunerParams) -> PruneResult | list[LayerRow]:
        """Prune ``ctx.model`` in place (or by replacing submodules); return one row per layer, in a
        :class:`PruneResult` with the speed plan when the pruner planned in time (a plain list of
        rows is accepted too)."""

    @classmethod
    def candidate_layers(cls, arch: Architecture, model: nn.Module) -> list[PrunableLayer]:
        """The layers a step's ``layers:`` filter chooses from: ``arch``'s prunable layers of
        ``model``, and those an earlier step replaced too when ``revisits_replaced_layers`` is set."""
        if cls.revisits_replaced_layers:
            return arch.prunable_layers(model, include_replaced=True)
        return arch.prunable_layers(model)

    @classmethod
    def calibration_needed(cls) -> bool:
        """Whether :meth:`prune` needs ``ctx.calibration`` (default: ``needs_calibration``)."""
        return bool(cls.needs_calibration)

    @classmethod
    def calibration_use(cls, params: PrunerParams | None = None) -> CalibrationUse:
        """How a step with these ``params`` uses calibration data: ``"required"`` (refused without
        it; a recipe step loads its data's calibration split), ``"optional"`` (used when the caller
        passes it, ``rmtp.prune(..., calibration=)``; a recipe step does not load it, so recipes
        keep their data-free behaviour) or ``"unused"`` (never given). Default: ``"required"`` when
        :meth:`calibration_needed`, else ``"unused"``.

        Why params: a pruner may work with or without data (svd-mp whitens when it has some), and
        whether a step asks for it can depend on a param (svd-mp's ``whiten``)."""
        return "required" if cls.calibration_needed() else "unused"

    @classmethod
    def strength_knob(cls, params: PrunerParams, model: nn.Module | None = None) -> StrengthKnob | None:
        """The param that sets how hard this step prunes, for an accuracy budget to search
        (:class:`rmtp.fidelity.accuracy_budget.StrengthKnob`: the param, its weak and strong ends), or None
        when these params have none (a step with an accuracy budget is then refused in one line).
        Raise ``ValueError("why")`` when the params rule a search out (an explicit per-layer list):
        the refusal says why.

        ``model`` is the model the step will prune, to bound a knob by its size (tome's ``r`` by
        its patch count); None when a recipe is validated, before any model exists.

        Default: a step with ``target_speedup`` searches the speed target itself (from ×1.05 up to
        the value given), so a budget finds the fastest model within it; else None. A pruner with
        a strength param overrides this, keeping the default first::

            return super().strength_knob(params, model) or StrengthKnob("sparsity", weak=0.0, strong=0.95)
        """
        from rmtp.fidelity.accuracy_budget import speed_knob

        return speed_knob(params)

    @classmethod
    def structure_problem(cls, arch: Architecture, model: nn.Module, params: PrunerParams) -> str | None:
        """Why this pruner, with ``params``, cannot run on a model of ``model``'s structure, or ``None``
        when it can (or cannot tell before it runs).

        Asked of every prune step of a recipe before its first step runs, on the dense model (built
        on the meta device, with no weights, by ``rmtp validate``), so that a step the architecture
        refuses (token pruners on windowed or rotary attention, spp with nothing to gate) is
        refused before hours of the steps ahead of it. Answer from the structure alone: the model
        an earlier step leaves has the same architecture. Default: ``None``."""
        return None

    @classmethod
    def device_warning(cls, device: str, params: PrunerParams) -> str | None:
        """What a user running this step on ``device`` (the recipe's ``device:``, ``"cpu"`` or
        ``"cuda"``) should know before it runs, in one clause, or ``None``: not a refusal (the step
        works there) but a result that differs from what the step is for. ``rmtp validate`` prints
        it as a warning. Default: ``None``."""
        return None

    @classmethod
    def prunes_weights(cls) -> bool:
        """Whether the layers in this pruner's rows had weights pruned, so that a later ``finetune``
        step's penalties act on them (default: every kind but ``token``, whose rows name whole
        blocks whose weights are untouched)."""
        return cls.kind != "token"


def weight_footprint(module: nn.Module) -> tuple[tuple[int, ...], int, int]:
    """(weight shape, params, nonzeros) of a layer, counting every parameter it owns.

    For a replaced layer (e.g. a low-rank pair) the shape is that of its effective weight when
    the module exposes ``effective_shape``, so before/after shapes read the same way.
    """
    import torch

    params = list(module.parameters())
    n_params = sum(p.numel() for p in params)
    nonzeros = sum(int(torch.count_nonzero(p)) for p in params)
    shape = getattr(module, "effective_shape", None)
    if shape is None:
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if weight is not None else ()
    return tuple(shape), n_params, nonzeros
