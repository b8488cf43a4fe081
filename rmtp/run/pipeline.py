"""Running a recipe: build the model, then apply its steps strictly in the listed order.

The path of one run: validated :class:`~rmtp.run.recipe.Recipe` → architecture plugin builds the model
→ a frozen copy of the dense model is kept (baseline and distillation teacher) → each step
(prune / finetune / reconstruct / evaluate) runs and yields a :class:`~rmtp.reports.records.StepReport` → the model,
resolved recipe and report are saved atomically.

Each step is the same call the in-memory API makes (:mod:`rmtp.run.steps`: ``prune_step``,
``finetune_step``, ``evaluate_step``), so a recipe and ``rmtp.prune(model, ...)`` cannot drift apart.

The plugins of a run are passed down, not fetched again: ``run_recipe(plugins=...)``, by default the
ones the recipe was validated against, build the model (and load a saved folder); a prune step
runs the pruner class validation resolved (:class:`~rmtp.run.recipe.ResolvedPrune`) and asks it, not
its attributes, what it needs (:meth:`~rmtp.contract.pruner.Pruner.candidate_layers`, ...).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rmtp import sources
from rmtp.contract.architecture import Architecture, ModelSpec
from rmtp.data import DataBundle, build_data
from rmtp.data.identity import data_changes, data_identity
from rmtp.errors import CheckpointError, PluginError, RecipeError, RmtpError
from rmtp.fidelity import unlabeled
from rmtp.plugins import Plugins, get_plugins
from rmtp.reports.records import ModelStats, RunReport, StepReport, environment
from rmtp.run import distributed, steps
from rmtp.run.device import resolve_device
from rmtp.run.preflight import structure_refusals
from rmtp.run.progress import NULL_PROGRESS, Progress
from rmtp.run.recipe import EvaluateStep, FinetuneStep, Recipe, ReconstructStep, ResolvedPrune, step_label
from rmtp.run.resume import (
    Checkpoint,
    Checkpointer,
    RunProgress,
    checkpoint_root,
    describe_position,
    read_checkpoint,
    recipe_changes,
)
from rmtp.run.step_output import StagedOutput
from rmtp.storage import overwrite, saving
from rmtp.training import TrainState


@dataclass
class RunResult:
    model: nn.Module
    dense_model: nn.Module
    report: RunReport
    output_dir: Path | None


@dataclass
class _Run:
    """State shared by the steps of one run."""

    recipe: Recipe
    plugins: Plugins
    arch: Architecture
    model: nn.Module
    dense: nn.Module
    data: DataBundle
    device: torch.device
    input_shape: tuple[int, ...]
    progress: Progress
    dense_top1: float | None = None
    pruned_layers: set[str] = field(default_factory=set)  # what the finetune penalties act on
    extras: StagedOutput | None = None  # prune steps' extra artefacts (None: the run saves nothing)
    checkpointer: Checkpointer | None = None  # None: the run writes no checkpoints
    dense_labelled: torch.utils.data.DataLoader | None = None  # unlabeled data: val images + dense's top class


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: Recipe, plugins: Plugins) -> tuple[nn.Module, ModelSpec, ModelSpec, Architecture]:
    """(model, its spec, the dense baseline's spec, architecture) for the recipe's ``model:``, built by
    the source it settled on (:func:`rmtp.sources.source_for_spec`)."""
    section = recipe.model
    source = sources.source_for_spec(ModelSpec(name=section.name, arch=section.arch, kwargs=dict(section.kwargs),
                                               pretrained=section.pretrained, checkpoint=section.checkpoint))
    built = source.build(plugins)
    assert built.arch is not None
    if isinstance(source, sources.SavedFolder):
        return built.model, built.spec, built.baseline or built.spec, built.arch
    # What the pruned model records: an hf-hub: name as its architecture and config kwargs, so the
    # saved folder loads without the hub; the dense baseline keeps the name it came from.
    name, kwargs = sources.resolved_name_and_kwargs(built.spec.name, built.spec.kwargs)
    return built.model, dataclasses.replace(built.spec, name=name, kwargs=kwargs), built.spec, built.arch


def run_recipe(recipe: Recipe, *, plugins: Plugins | None = None, progress: Progress = NULL_PROGRESS,
               on_step: Callable[[StepReport], None] | None = None, resume: bool = False) -> RunResult:
    """Run every step of ``recipe`` in order; save the result when the recipe has ``output``.

    ``plugins`` build the model (architectures, saved folders); by default those the recipe was
    validated against (``recipe.plugins``), else the process-wide ones. Prune steps run the pruner
    classes the recipe's validation resolved.

    Under ``torchrun`` every process runs the recipe (fine-tuning is data-parallel) and only rank 0
    reports progress, calls ``on_step`` and saves.

    With an output folder (and ``output.checkpoints``) the run checkpoints beside it
    (:mod:`rmtp.run.resume`); ``resume=True`` continues a killed run from its last checkpoint: finished
    steps are not redone (their reports are restored and passed to ``on_step`` again), a fine-tune
    continues mid-epoch, and the result is the one an uninterrupted run gives. A resume on a changed
    recipe or changed data is refused, and so is a run without ``resume`` over a checkpoint (it
    would discard it): both name the way out.
    """
    if plugins is None:
        plugins = recipe.plugins if recipe.plugins is not None else get_plugins()
    device = distributed.local_device(resolve_device(recipe.device, option="device:"))
    with distributed.process_group(device), _hold_output(recipe):
        return _run(recipe, plugins, device, progress if distributed.is_main_process() else NULL_PROGRESS,
                    on_step if distributed.is_main_process() else None, resume)


def _hold_output(recipe: Recipe) -> contextlib.AbstractContextManager:
    """The output folder's lock for the whole run (rank 0), so a second run on the same folder is
    refused before it builds anything, instead of racing this one when both save."""
    if recipe.output is None or not distributed.is_main_process():
        return contextlib.nullcontext()
    return _checked_output_lock(recipe)


@contextlib.contextmanager
def _checked_output_lock(recipe: Recipe) -> Iterator[Path]:
    """:func:`saving.output_lock`, then the overwrite check again under it, before step 0: the folder
    may have changed since validation, and a refusal now costs nothing, after the run a rescue."""
    with saving.output_lock(recipe.output.dir, overwrite=recipe.output.overwrite) as out_dir:
        overwrite.check_replaceable(out_dir, what=f"{recipe.path}: output.dir" if recipe.path else "output.dir",
                                    keep=recipe.kept_paths())
        yield out_dir


def _run(recipe: Recipe, plugins: Plugins, device: torch.device, progress: Progress,
         on_step: Callable[[StepReport], None] | None, resume: bool) -> RunResult:
    started = time.perf_counter()
    if not resume:
        _refuse_unfinished(recipe)
    checkpoint = _checkpoint_to_resume(recipe) if resume else None
    seed_everything(recipe.seed)
    try:
        model, spec, baseline, arch = build_model(recipe, plugins)
    except (PluginError, CheckpointError) as exc:  # name the recipe, as validation errors do
        raise type(exc)(f"{recipe.path}: {exc}" if recipe.path else str(exc)) from None
    refused = structure_refusals(recipe, arch, model, str(recipe.path) if recipe.path else "<recipe>")
    if refused:  # before any step: a refusal at step 3 would come after hours of steps 0-2
        raise RecipeError(refused)
    model = model.to(device).eval()
    data = build_data(recipe.data, model)
    identity = _data_identity(recipe, data, checkpoint)
    input_shape = tuple(data.val[0][0].shape)  # per sample, no batch dimension
    dense = copy.deepcopy(model).eval().requires_grad_(False)
    if checkpoint is not None:  # the pruned structure and weights as they were, not pruned again
        model = _checkpointed_model(recipe, checkpoint, plugins).to(device).eval()
        progress.note(f"resuming from {checkpoint_root(recipe.output.dir)} at {describe_position(checkpoint)}")
    run = _Run(recipe, plugins, arch, model, dense, data, device, input_shape, progress)
    if recipe.output is not None and recipe.output.checkpoints:
        run.checkpointer = Checkpointer(recipe.output.dir, spec=spec, arch=arch, baseline=baseline,
                                        recipe=recipe.to_dict(), data=identity)
    if recipe.output is not None and distributed.is_main_process():
        staging = run.checkpointer.staging if run.checkpointer is not None else None
        run.extras = StagedOutput(recipe.output.dir, spec=spec, arch=arch, baseline=baseline, recipe=recipe,
                                  staging=staging, kept=checkpoint.progress.extras if checkpoint else None)
    failed = True
    try:
        result = _run_steps(run, recipe, spec, baseline, started, on_step, checkpoint)
        failed = False
        return result
    finally:
        resumable = failed and run.checkpointer is not None and run.checkpointer.generation > 0
        try:  # the checkpoint goes first: while it can still be resumed, the extras it records stay staged
            if run.checkpointer is not None and not resumable:
                run.checkpointer.remove()  # done, or failed before its first checkpoint
        finally:
            if run.extras is not None and not resumable:
                run.extras.discard()  # a failed run with a checkpoint keeps its staged extras for --resume


def _checkpoint_to_resume(recipe: Recipe) -> Checkpoint:
    """The run's last checkpoint, refused in one line when there is none or the recipe changed."""
    if recipe.output is None:
        raise RmtpError("--resume: the recipe has no output.dir, so its runs write no checkpoint to resume from")
    try:
        checkpoint = read_checkpoint(recipe.output.dir)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}; {_start_over(recipe)}") from None
    if checkpoint is None:
        raise RmtpError(f"--resume: no checkpoint of {recipe.output.dir} to resume (none at "
                        f"{checkpoint_root(recipe.output.dir)}: the run finished, or never checkpointed); "
                        f"run without --resume to start")
    changes = recipe_changes(checkpoint.recipe, recipe.to_dict())
    if changes:
        raise RmtpError(f"--resume: the recipe changed since the checkpoint ({'; '.join(changes)}); restore it, "
                        f"or {_start_over(recipe)}")
    return checkpoint


def _start_over(recipe: Recipe) -> str:
    """The way out of a checkpoint that cannot be resumed: a plain run refuses to discard one."""
    return f"delete {checkpoint_root(recipe.output.dir)} and run without --resume to start over"


def _refuse_unfinished(recipe: Recipe) -> None:
    """A run without ``--resume`` over an unfinished run's checkpoint is refused, naming its progress
    and both ways out: it used to start over silently, and the checkpoint may hold hours of work."""
    if recipe.output is None:
        return
    root = checkpoint_root(recipe.output.dir)
    key = f"{recipe.path}: output.dir" if recipe.path else "output.dir"
    try:
        checkpoint = read_checkpoint(recipe.output.dir)
    except CheckpointError as exc:
        raise CheckpointError(f"{key}: {recipe.output.dir}: an unfinished run's checkpoint at {root} cannot be "
                              f"resumed ({exc}); delete {root} to start over") from None
    if checkpoint is not None:
        raise RmtpError(f"{key}: {recipe.output.dir}: an unfinished run's checkpoint is at {root}, stopped at "
                        f"{describe_position(checkpoint)}; pass --resume to continue it, or delete {root} to "
                        f"start over")


def _data_identity(recipe: Recipe, data: DataBundle, checkpoint: Checkpoint | None) -> dict | None:
    """The data's identity (:mod:`rmtp.data.identity`) when a checkpoint records or checks it, else
    None (its one stat per image file is skipped); a resume on changed data is refused, naming what
    changed: the shuffle would continue by position over other images."""
    if checkpoint is None and (recipe.output is None or not recipe.output.checkpoints):
        return None
    identity = data_identity(recipe.data, data)
    if checkpoint is not None and checkpoint.data is not None:  # None: written before rmtp recorded it
        changes = data_changes(checkpoint.data, identity)
        if changes:
            raise RmtpError(f"--resume: the data changed since the checkpoint ({'; '.join(changes)}); restore "
                            f"it, or {_start_over(recipe)}")
    return identity


def _checkpointed_model(recipe: Recipe, checkpoint: Checkpoint, plugins: Plugins) -> nn.Module:
    """The checkpoint's model as it was saved; a damaged one says how to start over."""
    try:
        return saving.load(checkpoint.model_dir, plugins=plugins).model
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}; {_start_over(recipe)}") from None


def _run_steps(run: _Run, recipe: Recipe, spec: ModelSpec, baseline: ModelSpec, started: float,
               on_step: Callable[[StepReport], None] | None, checkpoint: Checkpoint | None) -> RunResult:
    arch, dense, device = run.arch, run.dense, run.device
    done = checkpoint.progress if checkpoint is not None else RunProgress(next_step=0)
    run.pruned_layers = set(done.pruned_layers)
    if checkpoint is not None:
        run.dense_top1 = done.dense_top1
    elif run.data.labeled and any(isinstance(step, (EvaluateStep, FinetuneStep)) for step in recipe.steps):
        run.dense_top1 = _top1(run, dense, "evaluating dense model")  # unlabeled data: no top-1
    report = RunReport(recipe=str(recipe.path) if recipe.path else None, model=spec.name, arch=arch.name,
                       seed=recipe.seed, device=str(device), dense=_stats(run, dense, run.dense_top1),
                       environment=environment(),
                       preprocessing={**run.data.preprocessing, "description": run.data.describe()})
    for finished in done.reports:
        report.steps.append(StepReport.from_dict(finished))
        if on_step is not None:
            on_step(report.steps[-1])
    for index, step in enumerate(recipe.plan):
        if index < done.next_step:
            continue
        step_started = time.perf_counter()
        seed_everything(recipe.seed + index)
        if isinstance(step, ResolvedPrune):
            step_report = _prune(run, index, step)
        elif isinstance(step, FinetuneStep):
            step_report = _finetune(run, index, step, report, done.train if index == done.next_step else None)
        elif isinstance(step, ReconstructStep):
            step_report = _reconstruct(run, index, step)
        else:
            step_report = _evaluate(run, index, step)
        step_report.seconds = time.perf_counter() - step_started
        report.steps.append(step_report)
        if run.checkpointer is not None and index < len(recipe.plan) - 1:
            _checkpoint(run, report, index + 1, model_changed=not isinstance(step, EvaluateStep))
        if on_step is not None:
            on_step(step_report)

    output_dir = None
    if recipe.output is not None and distributed.is_main_process():
        report.seconds = time.perf_counter() - started
        output_dir = _save_output(run, recipe, spec, baseline, report)
    report.seconds = time.perf_counter() - started
    return RunResult(model=run.model, dense_model=dense, report=report, output_dir=output_dir)


def _checkpoint(run: _Run, report: RunReport, next_step: int, *, train: TrainState | None = None,
                model_changed: bool = True) -> None:
    run.checkpointer.write(run.model, RunProgress(
        next_step=next_step, reports=[step.to_dict() for step in report.steps], pruned_layers=sorted(run.pruned_layers),
        dense_top1=run.dense_top1, extras=list(run.extras.names) if run.extras is not None else [], train=train),
        model_changed=model_changed)


def _save_output(run: _Run, recipe: Recipe, spec: ModelSpec, baseline: ModelSpec, report: RunReport) -> Path:
    """Save the model, recipe, report and step outputs to ``output.dir``.

    If that fails after the whole run (full disk, folder gone read-only), the result is saved to a
    fresh temporary folder instead and the error says where: losing hours of pruning and
    fine-tuning to one failed write is worse than an unexpected location.
    """
    import tempfile

    from rmtp.errors import RmtpError

    def save_to(folder: Path, overwrite: bool) -> Path:
        report.output_dir = str(folder)
        return saving.save(run.model, folder, spec=spec, arch=run.arch, baseline=baseline, recipe=recipe.to_dict(),
                           report=report.to_dict(), save_weights=recipe.output.save_model, overwrite=overwrite,
                           extras=run.extras.names, add_extras=run.extras.place_into)

    try:
        return save_to(recipe.output.dir, recipe.output.overwrite)
    except (OSError, RmtpError) as exc:
        failure = _reason(exc)
        try:
            rescued = save_to(Path(tempfile.mkdtemp(prefix="rmtp-rescued-")) / recipe.output.dir.name, False)
        except (OSError, RmtpError) as again:
            raise RmtpError(f"output.dir: {recipe.output.dir}: could not save the result ({failure}), nor rescue "
                            f"it to a temporary folder ({_reason(again)})") from exc
        raise RmtpError(f"output.dir: {recipe.output.dir}: could not save the result ({failure}); it was saved "
                        f"to {rescued} instead") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def _stats(run: _Run, model: nn.Module, top1: float | None = None) -> ModelStats:
    return steps.model_stats(model, run.input_shape, run.device, top1)


def _top1(run: _Run, model: nn.Module, description: str) -> float:
    return steps.top1_with_progress(model, run.data.loader("val"), run.device, run.progress, description)


def _prune(run: _Run, index: int, step: ResolvedPrune) -> StepReport:
    pruner_cls = step.pruner_cls
    extras_before = len(run.extras.names) if run.extras is not None else 0
    if run.extras is not None:
        run.extras.step = index
    # The calibration split goes to a pruner that requires it; a step with an accuracy budget loads it
    # to score on even when the pruner takes none (svd-mp without whiten: true keeps its data-free result).
    required = pruner_cls.calibration_use(step.params) == "required"
    budgeted = step.accuracy_budget is not None
    report = steps.prune_step(
        run.model, step, arch=run.arch, device=run.device, seed=run.recipe.seed + index,
        input_shape=run.input_shape, dense=run.dense,
        calibration=run.data.loader("calibration") if required else None,
        scoring=run.data.loader("calibration") if budgeted and not required else None,
        # agreement with dense on images the pruner never saw (the val split; a budget holds its own out)
        held_out=run.data.loader("val") if required and not budgeted and len(run.data.val) else None,
        progress=run.progress, output=run.extras, preview_images=lambda n: _first_images(run.data.val, n, run.device),
        index=index)
    if pruner_cls.prunes_weights():  # what later finetune penalties act on
        run.pruned_layers.update(row.layer for row in report.rows if row.skipped is None)
    if run.extras is not None and len(run.extras.names) > extras_before:
        report.notes.append(f"also saved in the output folder: {', '.join(run.extras.names[extras_before:])}")
    return report


def _first_images(dataset: torch.utils.data.Dataset, n: int, device: torch.device) -> torch.Tensor:
    count = min(n, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)]).to(device)


def _finetune(run: _Run, index: int, step: FinetuneStep, report: RunReport,
              resume: TrainState | None) -> StepReport:
    config = step.finetune
    if config.seed is None:
        config = config.model_copy(update={"seed": run.recipe.seed + index})
    on_checkpoint = None
    if run.checkpointer is not None:
        def on_checkpoint(state: TrainState) -> None:
            _checkpoint(run, report, index, train=state)
    return steps.finetune_step(run.model, run.data, config, device=run.device, input_shape=run.input_shape,
                               teacher=run.dense, penalize=sorted(run.pruned_layers), progress=run.progress,
                               index=index, label=step_label(step), resume=resume, on_checkpoint=on_checkpoint)


def _reconstruct(run: _Run, index: int, step: ReconstructStep) -> StepReport:
    """Block-wise reconstruction on the calibration split; a killed run redoes the step from its
    start on ``--resume`` (from the checkpoint after the step before)."""
    return steps.reconstruct_step(run.model, run.dense, run.data.loader("calibration"), step.reconstruct,
                                  arch=run.arch, device=run.device, input_shape=run.input_shape,
                                  seed=run.recipe.seed + index, progress=run.progress, index=index,
                                  label=step_label(step))


def _evaluate(run: _Run, index: int, step: EvaluateStep) -> StepReport:
    if not run.data.labeled:  # no top-1: agreement with the dense model (rmtp.fidelity.unlabeled)
        if run.dense_labelled is None:
            run.dense_labelled = unlabeled.dense_labelled(run.data.loader("val"), run.dense, run.device, run.progress)
        return unlabeled.agreement_step(run.model, run.dense_labelled, step.evaluate, device=run.device,
                                        input_shape=run.input_shape, dense=run.dense, progress=run.progress,
                                        index=index, label=step_label(step))
    return steps.evaluate_step(run.model, run.data.loader("val"), step.evaluate, device=run.device,
                               input_shape=run.input_shape, dense=run.dense, dense_top1=run.dense_top1,
                               progress=run.progress, index=index, label=step_label(step))
