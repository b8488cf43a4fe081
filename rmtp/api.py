"""rmtp for a model in hand: ``rmtp.prune``, ``rmtp.finetune`` and ``rmtp.evaluate``.

A notebook does in a few lines what a recipe does::

    import rmtp, timm
    model = timm.create_model("vit_small_patch16_224", pretrained=True)
    data = rmtp.build_data({"name": "imagefolder", "root": "imagenet"}, model)
    dense = rmtp.frozen_copy(model)
    report = rmtp.prune(model, "svd-mp", margin=1.0)             # MP-edge low rank, in place
    rmtp.finetune(model, data, epochs=1, distill={}, teacher=dense)
    print(rmtp.evaluate(model, data, dense=dense, latency=True))

Each call validates its keyword arguments with the same pydantic models a recipe uses (a pruner's
``Params``, ``finetune``'s :class:`~rmtp.training.TrainConfig`, ``evaluate``'s params) and fails
with the same one-line messages; it then runs the same :mod:`rmtp.run.steps` function a recipe step
runs and returns the same :class:`~rmtp.reports.records.StepReport` (``.rows``, ``.stats``, ``.to_dict()``,
rendered by rich when printed in a console or notebook).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.utils.data import DataLoader

from rmtp.contract.architecture import Architecture
from rmtp.contract.pruner import Pruner
from rmtp.data import DataBundle, DataSpec, has_length, model_input_size
from rmtp.errors import PluginError, RecipeError, RmtpError
from rmtp.fidelity.accuracy_budget import AccuracyBudget, budget_knob
from rmtp.latency.settings import LatencySettings
from rmtp.measure.running import evaluating, same_device
from rmtp.plugins import Plugins, get_plugins
from rmtp.reports.records import StepReport
from rmtp.run import steps
from rmtp.run.layer_filter import LayerFilter
from rmtp.run.progress import NULL_PROGRESS, Progress

DataLike = DataBundle | DataSpec | Mapping[str, Any]

__all__ = ["build_data", "evaluate", "finetune", "frozen_copy", "infer_architecture", "prune", "reconstruct", "unpatch"]


def prune(model: nn.Module, pruner: str | type[Pruner], /, *, arch: str | Architecture | None = None,
          layers: str | Sequence[str] | Mapping[str, Any] | LayerFilter | None = None,
          calibration: DataLoader | None = None, dense: nn.Module | None = None,
          device: str | torch.device | None = None, seed: int = 0, input_shape: tuple[int, ...] | None = None,
          plugins: Plugins | None = None, progress: Progress = NULL_PROGRESS, precision: str = "fp32",
          latency: LatencySettings | Mapping[str, Any] | None = None,
          accuracy_budget: AccuracyBudget | Mapping[str, Any] | None = None, held_out: DataLoader | None = None,
          **params: Any) -> StepReport:
    """Apply one pruner to ``model`` in place; return its report (per-layer rows, stats before/after).

    ``pruner``: a registered name (``"svd-mp"``, ``"n:m"``, ``"tome"``, ... see ``rmtp list``) or a
    :class:`~rmtp.contract.pruner.Pruner` class. ``**params`` are its params, validated as in a recipe.
    ``arch``: the architecture plugin (name or instance); inferred from a timm model when omitted.
    ``layers``: a recipe's ``layers:`` filter (glob(s), ``{"include": [...], "exclude": [...]}``);
    ``None`` takes every non-optional prunable layer, and is what token pruners need.
    ``calibration``: train images (a DataLoader of (images, labels)) for pruners that need them
    (``spp``, ``n:m`` with Wanda scores or restore; refused clearly when missing) or use them when
    given (``svd-mp`` then fits its factors on the activation-whitened weights).
    ``dense``: the reference/teacher (spp's KD loss); a frozen copy of ``model`` taken before
    pruning when omitted and the pruner may use it.
    ``device``: where to prune (default: where ``model``'s parameters are). ``input_shape``: one
    input (C, H, W) for the MAC counts (default: the timm model's input size). ``precision``:
    autocast of the pruner's calibration passes (``fp32``, ``bf16``, ``fp16`` on CUDA).
    ``latency``: a recipe step's ``latency:`` keys (``batch``, ``threads``, ``cost``, ...) or a
    :class:`~rmtp.latency.LatencySettings`: how svd-mp/n:m's ``only_if_faster`` and the speed
    targets time replacements. Unlike a recipe, which takes ``batch`` and ``threads`` from its later
    ``evaluate: {latency: true}`` step, a call has no later step to read them from: the defaults are
    batch 1 and torch's threads, where a split that pays at batch 32 may not (pass
    ``latency={"batch": 32}`` to plan for the batch you will run). Speed targets are relative to
    ``dense``: pass the original dense model to share one budget across several calls.
    ``accuracy_budget``: a recipe step's ``accuracy_budget:`` keys (``max_drop``, ``max_kl``,
    ``holdout``, ``evaluations``) or an :class:`~rmtp.fidelity.accuracy_budget.AccuracyBudget`: the pruner's
    strength (its :meth:`~rmtp.contract.pruner.Pruner.strength_knob`; a value given for it in ``**params``
    is the strongest tried) is searched for the strongest setting that stays within the budget
    against ``dense`` on calibration images the pruner does not see; needs ``calibration``.
    With ``dense`` omitted, agreement and budgets are against the model as it came to this call.
    With ``calibration`` the report carries the result's top-1 agreement with dense
    (``report.agreement``) and warns when it is under 50%. ``held_out``: images the pruner never
    sees (e.g. ``bundle.loader('val')``) to measure that agreement on when the pruner calibrates
    (without them it is measured on calibration images it fitted, and says so; a budget holds its
    own images out).
    The model comes back in the train/eval mode it came in (pruners run it in eval mode).
    """
    plugins = plugins or get_plugins()
    pruner_cls = _pruner_class(pruner, plugins)
    label = f"rmtp.prune({pruner_cls.name!r})"
    validated = _validate(label, pruner_cls.Params, params, prefix="")
    layer_filter = _layer_filter(label, layers)
    if latency is not None and not isinstance(latency, LatencySettings):
        latency = _validate(label, LatencySettings, dict(latency), prefix="latency")
    if accuracy_budget is not None:
        if not isinstance(accuracy_budget, AccuracyBudget):
            accuracy_budget = _validate(label, AccuracyBudget, dict(accuracy_budget), prefix="accuracy_budget")
        try:  # refused now, in one line, when the pruner has nothing to search
            budget_knob(pruner_cls, validated)
        except RmtpError as exc:
            raise RecipeError([f"{label}: accuracy_budget: {exc}"]) from None
        if calibration is None:
            raise RecipeError([f"{label}: accuracy_budget: scores the pruned model against dense on calibration "
                               f"images; pass calibration= (e.g. bundle.loader('calibration'))"])
    _check_held_out(label, held_out, calibration)
    architecture = _architecture(model, arch, plugins)  # before anything runs the model: a clear refusal
    device = _device(model, device)
    shape = tuple(input_shape) if input_shape is not None else model_input_size(model)
    with evaluating(model.to(device)):
        before = steps.model_stats(model, shape, device)
        if dense is None:
            dense = frozen_copy(model)
        from rmtp.run.recipe import ResolvedPrune

        step = ResolvedPrune(pruner_cls=pruner_cls, params=validated, layers=layer_filter, precision=precision,
                             latency=latency, accuracy_budget=accuracy_budget)
        report = steps.prune_step(model, step, arch=architecture, device=device, seed=seed, input_shape=shape,
                                  dense=dense, calibration=calibration, held_out=held_out, progress=progress)
    report.baseline = before
    return report


def _check_held_out(label: str, held_out: object, calibration: DataLoader | None) -> None:
    """Refuse, before anything is pruned, a ``held_out`` that cannot be what it claims: not a
    DataLoader, one with no images, or the calibration loader itself (the pruner sees those)."""
    if held_out is None:
        return
    if not isinstance(held_out, DataLoader):
        raise RecipeError([f"{label}: held_out: give a DataLoader of images the pruner never sees (e.g. "
                           f"bundle.loader('val')), got {type(held_out).__name__}"])
    if held_out is calibration:
        raise RecipeError([f"{label}: held_out is the calibration loader, whose images the pruner calibrates on; "
                           f"give images it never sees (e.g. bundle.loader('val'))"])
    if has_length(held_out.dataset) and len(held_out.dataset) == 0:
        raise RecipeError([f"{label}: held_out has no images (an empty val split?); give some, or leave it out"])


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the forward-pass patches that change which tokens the blocks see (a token pruner's
    token reduction) from ``model``, newest first down to the first record of structure, and
    return it: its forward is then the model's own again, with the same weights.

    Why: token reducers replace a ViT's forward pass and do not stack, so a second token pruner
    on the same model is refused ("already token-reduced") until the first one's patch is removed.
    A record of structure (spp's head counts, ``changes_tokens`` false) stays: it belongs to the
    sliced layers, which the model keeps. A model with no such patch is returned unchanged.
    """
    from rmtp.contract.saved_types import patches_of, remove_patch

    while patches_of(model) and patches_of(model)[-1].changes_tokens:
        remove_patch(model)
    return model


def finetune(model: nn.Module, data: DataLike | DataLoader, /, *, teacher: nn.Module | None = None,
             device: str | torch.device | None = None, penalize: Sequence[str] = (),
             progress: Progress = NULL_PROGRESS, **config: Any) -> StepReport:
    """Fine-tune ``model`` in place on ``data`` (a :class:`~rmtp.data.DataBundle`, or a recipe's
    ``data:`` section as a mapping, built for ``model``); ``**config`` are a recipe's ``finetune:``
    keys (``epochs``, ``lr``, ``distill``, ``max_steps``, ``max_minutes``, ...). ``distill`` needs
    ``teacher`` (the dense model). Exact zeros of masked layers (n:m, magnitude) stay zero. The
    model comes back in eval mode (as from ``reconstruct``: what follows a recovery is evaluating or
    saving it); call ``model.train()`` to go on training it yourself.

    Unlabeled images (``data.unlabeled: true``, or ``data`` a DataLoader of images or of (image,
    anything) batches, read as unlabeled: its dataset, batch size and workers; the loop shuffles with
    its own seeded sampler) train by distillation alone: ``distill={"weight": 1.0}`` and ``teacher``
    are required, and the report has no top-1."""
    from rmtp.training import TrainConfig

    train_config = _validate("rmtp.finetune", TrainConfig, config, prefix="")
    device = _device(model, device)
    if isinstance(data, DataLoader):
        from rmtp.data import unlabeled_bundle

        if train_config.distill is None or train_config.distill.weight != 1.0 or teacher is None:
            raise RecipeError(["rmtp.finetune: a DataLoader is read as unlabeled images, trained by distillation "
                               "alone: pass teacher= (the dense model) and distill={'weight': 1.0}; for labelled "
                               "fine-tuning pass a data spec or bundle (rmtp.build_data) instead"])
        if not has_length(data.dataset):
            raise RecipeError(["rmtp.finetune: the DataLoader's dataset has no length (an IterableDataset); give a "
                               "map-style dataset of images (or of (image, anything) pairs)"])
        bundle = unlabeled_bundle(data.dataset, batch_size=data.batch_size or 1, num_workers=data.num_workers)
    else:
        bundle = _bundle("rmtp.finetune", data, model)
    shape = tuple((bundle.val if len(bundle.val) else bundle.train)[0][0].shape)
    return steps.finetune_step(model, bundle, train_config, device=device, input_shape=shape, teacher=teacher,
                               penalize=penalize, progress=progress)


def reconstruct(model: nn.Module, calibration: Iterable, /, *, dense: nn.Module, arch: str | Architecture | None = None,
                device: str | torch.device | None = None, seed: int = 0, progress: Progress = NULL_PROGRESS,
                plugins: Plugins | None = None, **config: Any) -> StepReport:
    """Recover a pruned ``model`` in place, block by block, from unlabeled ``calibration`` images (a
    DataLoader of (images, labels) batches, labels unused, or of images): each block trained, in
    forward order, to reproduce ``dense``'s block outputs (:mod:`rmtp.fidelity.blockwise`). ``**config``
    are a recipe's ``reconstruct:`` keys (``steps`` per block, ``max_minutes``, ``lr``,
    ``batch_size``, ``images``). Exact zeros stay zero; the model comes back in eval mode."""
    from rmtp.fidelity.blockwise import ReconstructConfig

    settings = _validate("rmtp.reconstruct", ReconstructConfig, config, prefix="")
    architecture = _architecture(model, arch, plugins or get_plugins())
    device = _device(model, device)
    model.to(device).eval()
    return steps.reconstruct_step(model, dense, calibration, settings, arch=architecture, device=device,
                                  input_shape=model_input_size(model), seed=seed, progress=progress,
                                  label="reconstruct")


def evaluate(model: nn.Module, data: DataLike | DataLoader, /, *, dense: nn.Module | None = None,
             device: str | torch.device | None = None, progress: Progress = NULL_PROGRESS,
             **settings: Any) -> StepReport:
    """Top-1, params and MACs of ``model`` on ``data``'s val split (or on a DataLoader of (images,
    labels)); ``latency=True`` (with ``dense``) also times it against the dense model in interleaved
    rounds (``latency_batch``, ``latency_rounds``, ``latency_threads``, as in a recipe).
    Unlabeled data (``data.unlabeled: true``) has no top-1: ``dense`` is required, and the report
    gives the top-1 agreement with it in a note (``stats.top1`` None; :mod:`rmtp.fidelity.unlabeled`).
    ``dense`` is never moved: where it lives on another device, a frozen copy runs on ``device``."""
    from rmtp.run.recipe import EvaluateParams

    params = _validate("rmtp.evaluate", EvaluateParams, settings, prefix="")
    device = _device(model, device)
    bundle = None if isinstance(data, DataLoader) else _bundle("rmtp.evaluate", data, model)
    if bundle is not None and not bundle.labeled:
        return _evaluate_unlabeled(model, bundle, params, dense=dense, device=device, progress=progress)
    loader = data if bundle is None else bundle.loader("val")
    shape = tuple(loader.dataset[0][0].shape)
    dense_top1 = None
    if dense is not None:
        dense = _reference_on(dense, device)
        dense_top1 = steps.top1_with_progress(dense, loader, device, progress, "evaluating dense model")
    return steps.evaluate_step(model.to(device), loader, params, device=device, input_shape=shape, dense=dense,
                               dense_top1=dense_top1, progress=progress)


def _evaluate_unlabeled(model: nn.Module, bundle: DataBundle, params: Any, *, dense: nn.Module | None,
                        device: torch.device, progress: Progress) -> StepReport:
    from rmtp.fidelity import unlabeled

    if dense is None:
        raise RecipeError(["rmtp.evaluate: the data is unlabeled (data.unlabeled: true), so there is no top-1; "
                           "pass dense= (the model before pruning) for top-1 agreement with it"])
    reference = _reference_on(dense, device)
    labelled = unlabeled.dense_labelled(bundle.loader("val"), reference, device, progress)
    return unlabeled.agreement_step(model.to(device), labelled, params, device=device,
                                    input_shape=tuple(bundle.val[0][0].shape), dense=reference, progress=progress)


def _reference_on(dense: nn.Module, device: torch.device) -> nn.Module:
    """``dense`` itself where all its weights already live on ``device`` (nothing to move or copy),
    else a frozen copy there. Moving the caller's reference model would be a side effect of
    evaluating another model: its weights left elsewhere and its buffers swapped for new tensors."""
    tensors = itertools.chain(dense.parameters(), dense.buffers())
    if all(same_device(t.device, device) for t in tensors):
        return dense
    return frozen_copy(dense).to(device)


def build_data(spec: DataSpec | Mapping[str, Any], model: nn.Module) -> DataBundle:
    """The train/val/calibration splits of a recipe's ``data:`` section (a mapping such as
    ``{"name": "imagefolder", "root": "imagenet"}``, or a :class:`~rmtp.data.DataSpec`), shaped
    for ``model``: what a recipe run would use. ``bundle.loader("calibration")`` feeds pruners."""
    return _bundle("rmtp.build_data", spec, model)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off: the dense reference and teacher."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def infer_architecture(model: nn.Module, plugins: Plugins | None = None) -> Architecture:
    """The architecture plugin for a model in hand: by the timm name it was built as
    (``model.pretrained_cfg["architecture"]``), checked against the model's structure."""
    plugins = plugins or get_plugins()
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    if not name:
        raise PluginError(f"cannot tell which architecture a {type(model).__qualname__} is (it carries no timm "
                          f"pretrained_cfg); pass arch= ({plugins.architectures.known_hint('')})")
    architecture = plugins.architecture_for(name)
    check = getattr(architecture, "check_structure", None)
    if check is not None:
        check(model, name)
    return architecture


# ------------------------------------------------------------------------------------ helpers


def _pruner_class(pruner: str | type[Pruner], plugins: Plugins) -> type[Pruner]:
    if isinstance(pruner, type) and issubclass(pruner, Pruner):
        return pruner
    if not isinstance(pruner, str):
        raise PluginError(f"rmtp.prune: pruner must be a registered name or a Pruner class, "
                          f"got {type(pruner).__name__}")
    return plugins.pruners.get(pruner)


def _architecture(model: nn.Module, arch: str | Architecture | None, plugins: Plugins) -> Architecture:
    """The architecture plugin for ``model``, its structure checked whether named or inferred, so a
    model it cannot handle gets that one line rather than an error from deep inside a MAC count."""
    if arch is None:
        return infer_architecture(model, plugins)
    architecture = arch if isinstance(arch, Architecture) else plugins.architecture(arch)
    check = getattr(architecture, "check_structure", None)
    if check is not None:
        check(model, "the model")
    return architecture


def _validate(label: str, model_cls: type[BaseModel], values: Mapping[str, Any], prefix: str) -> Any:
    from rmtp.run.recipe import format_errors

    try:
        return model_cls.model_validate(dict(values))
    except ValidationError as exc:
        raise RecipeError(format_errors(label, exc, model_cls, prefix=prefix)) from None


def _layer_filter(label: str, layers: Any) -> LayerFilter | None:
    if layers is None or isinstance(layers, LayerFilter):
        return layers
    raw = [layers] if isinstance(layers, str) else layers
    raw = dict(raw) if isinstance(raw, Mapping) else list(raw)
    layer_filter = _validate(label, LayerFilter, {"include": raw} if isinstance(raw, list) else raw, prefix="layers")
    problems = layer_filter.problems()
    if problems:
        raise RecipeError([f"{label}: layers.{p}" for p in problems])
    return layer_filter


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        from rmtp.run.device import resolve_device

        return resolve_device(device, option="device=")
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _bundle(label: str, data: DataLike, model: nn.Module) -> DataBundle:
    from rmtp.data import build_data as build_splits

    if isinstance(data, DataBundle):
        return data
    if not isinstance(data, (DataSpec, Mapping)):
        raise RecipeError([f"{label}: data must be a DataBundle (rmtp.build_data), a recipe's data: section as a "
                           f"mapping, or (evaluate only) a DataLoader; got {type(data).__name__}"])
    spec = data if isinstance(data, DataSpec) else _validate(label, DataSpec, data, prefix="data")
    return build_splits(spec, model)
