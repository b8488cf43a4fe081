"""Checks of a validated recipe against the structure of the model it names, without its weights.

``rmtp validate`` promises to find what would fail before anything runs. Some of that depends on
the model: kwargs timm rejects, a step's layer filter that matches none of the model's layers.
Building the model on PyTorch's ``meta`` device gives its modules and shapes at no memory cost
(ViT-B/16 in ~0.2 s, no weights are allocated or read), so validation can answer those too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from rmtp.contract.architecture import Architecture, ModelSpec
from rmtp.errors import CheckpointError, DeviceError, RecipeError, RmtpError
from rmtp.plugins import Plugins, get_plugins
from rmtp.run.device import resolve_device
from rmtp.run.layer_filter import select_layers
from rmtp.run.recipe import Recipe, ReconstructStep, ResolvedPrune, step_label


@dataclass
class Preflight:
    """What the structural check found: errors stop the run, warnings are worth a look."""

    warnings: list[str] = field(default_factory=list)


def preflight(recipe: Recipe, *, plugins: Plugins | None = None) -> Preflight:
    """Build ``recipe``'s model on the meta device and check the steps against it.

    Raises :class:`RecipeError` when timm cannot build the model from the recipe's kwargs or a
    prune step's pruner refuses its structure (:func:`structure_refusals`); returns a warning for
    every prune step whose layer filter selects no layer (the run would prune nothing there and
    say so), and each pruner's :meth:`~rmtp.contract.pruner.Pruner.device_warning` for the device
    the run would use. ``plugins`` default to those the recipe was validated against.
    """
    if plugins is None:
        plugins = recipe.plugins if recipe.plugins is not None else get_plugins()
    label = str(recipe.path) if recipe.path else "<recipe>"
    try:
        model, arch = _meta_model(recipe, plugins)
    except CheckpointError:
        return Preflight()  # a saved folder this rmtp cannot rebuild on meta: the run will say why
    except RmtpError as exc:
        raise RecipeError([f"{label}: {exc}"]) from None
    refused = structure_refusals(recipe, arch, model, label)
    if refused:
        raise RecipeError(refused)
    result = Preflight()
    device = recipe.device
    try:  # as the run will: a recipe for a GPU job, validated on a login node
        device = resolve_device(recipe.device).type  # "auto": the device it picks here
    except DeviceError:
        result.warnings.append(f"{label}: device: {recipe.device}, and this machine has no CUDA: the recipe is "
                               f"valid, but `rmtp prune` refuses it here; run it where a GPU is")
    if recipe.data.name == "imagefolder" and recipe.data.root is not None and not recipe.data.unlabeled:
        _check_classes(label, recipe.data.root, model)
    for index, step in enumerate(recipe.plan):
        if not isinstance(step, ResolvedPrune):
            continue
        note = step.pruner_cls.device_warning(device, step.params)
        if note:
            result.warnings.append(f"{label}: steps[{index}] ({step.label}) on {device}: {note}")
        if step.layers is None:
            continue
        candidates = step.pruner_cls.candidate_layers(arch, model)
        if not select_layers(candidates, step.layers):
            names = ", ".join(layer.name for layer in candidates[:4]) + (", …" if len(candidates) > 4 else "")
            result.warnings.append(f"{label}: steps[{index}].layers: selects none of the model's "
                                   f"{len(candidates)} prunable layers ({names}); this step would prune nothing")
    return result


def structure_refusals(recipe: Recipe, arch: Architecture, model: nn.Module, label: str) -> list[str]:
    """One line per step that ``model``'s structure refuses: a prune step whose pruner says so
    (:meth:`rmtp.contract.pruner.Pruner.structure_problem`), a reconstruct step on an architecture
    that declares no blocks. ``rmtp validate`` asks on the meta-device model, a run on the model it
    built, before its first step, so the refusal costs nothing."""
    from rmtp.run.steps import reconstruct_problem

    refused = []
    for index, step in enumerate(recipe.plan):
        problem = None
        if isinstance(step, ResolvedPrune):
            problem = step.pruner_cls.structure_problem(arch, model, step.params)
        elif isinstance(step, ReconstructStep):
            problem = reconstruct_problem(arch, model)
        if problem:
            name = step.label if isinstance(step, ResolvedPrune) else step_label(step)
            refused.append(f"{label}: steps[{index}] ({name}): {problem}")
    return refused


def _check_classes(label: str, root: Path, model: nn.Module) -> None:
    """Class folders vs the head the model really has: with no ``num_classes`` in the kwargs
    (timm's default 1000) recipe validation alone cannot tell."""
    from rmtp.data import DataError, class_count_problem, imagefolder_layout, model_num_classes

    try:
        _, classes = imagefolder_layout(root)
    except DataError:
        return  # recipe validation reported the layout already
    problem = class_count_problem(f"data.root: {root}", len(classes), model_num_classes(model))
    if problem is not None:
        raise RecipeError([f"{label}: {problem}"])


def _meta_model(recipe: Recipe, plugins: Plugins) -> tuple[nn.Module, Architecture]:
    """The recipe's model on the meta device, built by the source it settled on
    (:func:`rmtp.sources.source_for_spec`): no pretrained download, no checkpoint read."""
    from rmtp import sources

    section = recipe.model
    source = sources.source_for_spec(ModelSpec(name=section.name, arch=section.arch, kwargs=dict(section.kwargs),
                                               pretrained=section.pretrained, checkpoint=section.checkpoint))
    return source.build_meta(plugins)
