"""One prune, finetune, reconstruct or evaluate step on a model in hand: what a recipe step and the
library calls :func:`rmtp.prune`, :func:`rmtp.finetune`, :func:`rmtp.reconstruct` and
:func:`rmtp.evaluate` both run.

The recipe pipeline (:mod:`rmtp.run.pipeline`) and the in-memory API (:mod:`rmtp.api`) differ only in
where their inputs come from (a validated recipe; a user's model, loaders and keyword arguments).
The work itself, and the :class:`~rmtp.reports.records.StepReport` it yields, is here once, so the two
paths cannot drift apart.
"""

from __future__ import annotations

import copy
import functools
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rmtp import measure
from rmtp.contract.architecture import Architecture, has_submodule
from rmtp.contract.pruner import LayerRow, PruneContext, Pruner, PruneResult, PrunerParams, StepOutput
from rmtp.errors import RmtpError
from rmtp.reports.records import ModelStats, StepReport
from rmtp.run.layer_filter import select_layers
from rmtp.run.precision import check_precision
from rmtp.run.progress import NULL_PROGRESS, Progress
from rmtp.training.pieces import masked_layers

if TYPE_CHECKING:
    from rmtp.data import DataBundle
    from rmtp.fidelity.accuracy_budget import AccuracyBudget, SearchResult, StrengthKnob
    from rmtp.fidelity.agreement import DenseReference
    from rmtp.fidelity.blockwise import ReconstructConfig
    from rmtp.latency.cost import CostModel
    from rmtp.latency.settings import LatencySettings
    from rmtp.run.recipe import EvaluateParams, ResolvedPrune
    from rmtp.training import TrainConfig, TrainState


def model_stats(model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                top1: float | None = None) -> ModelStats:
    """Params, nonzeros and MACs (attention included) of ``model`` for one input of ``input_shape``."""
    summary = measure.model_summary(model, input_shape, device=device)
    return ModelStats(params=summary["params"], nonzeros=summary["nonzeros"], macs=summary["macs"],
                      attention_macs=summary["attention_macs"], top1=top1)


def timed(step: Callable[..., StepReport]) -> Callable[..., StepReport]:
    """A step function whose report carries its own wall time, so that a call through the API
    (``rmtp.prune``, ``rmtp.finetune``, ...) says how long it took as a recipe run does (the
    pipeline measures again around the whole step, stats included)."""

    @functools.wraps(step)
    def run(*args: object, **kwargs: object) -> StepReport:
        started = time.perf_counter()
        report = step(*args, **kwargs)
        report.seconds = time.perf_counter() - started
        return report

    return run


@timed
def prune_step(model: nn.Module, step: ResolvedPrune, *, arch: Architecture, device: torch.device, seed: int,
               input_shape: tuple[int, ...], dense: nn.Module | None = None, calibration: DataLoader | None = None,
               scoring: DataLoader | None = None, held_out: DataLoader | None = None,
               progress: Progress = NULL_PROGRESS, output: StepOutput | None = None,
               preview_images: Callable[[int], torch.Tensor] | None = None, index: int = 0) -> StepReport:
    """Apply one pruner to ``model`` (in place) and report what it did.

    ``step`` is the one settings object a recipe and ``rmtp.prune`` both build
    (:class:`rmtp.run.recipe.ResolvedPrune`: the pruner class, its validated params, the layer filter,
    the name, precision, latency and accuracy budget); the other arguments are the run's (model,
    architecture, device, seed, data, progress, output).

    ``layers`` filters the pruner's candidate layers (``None``: every non-optional one). A pruner
    whose :meth:`~rmtp.contract.pruner.Pruner.calibration_use` is ``"required"`` and gets no ``calibration``
    is refused before it starts, naming what to pass; one that says ``"optional"`` gets it when
    given (svd-mp then whitens), one that says ``"unused"`` never sees it. ``latency`` says how replacements are timed
    (svd-mp/n:m ``only_if_faster``, speed targets); a pruner that planned in time has its predicted
    speed-up measured against ``dense`` after it ran, and both go in the report.

    ``accuracy_budget`` (:mod:`rmtp.fidelity.accuracy_budget`): the pruner's strength knob is searched for
    the strongest setting whose result stays within the budget against ``dense``, each candidate
    pruned from a copy of ``model`` and scored on calibration images the pruner does not see (a
    seeded ``holdout`` share of ``calibration`` when the pruner takes it, else all of ``calibration``
    or ``scoring``: images given only to score on); the chosen setting is then applied to ``model``.

    With ``dense`` and calibration images, the report carries the result's top-1 agreement with
    dense and mean KL (``report.agreement``), and a warning when it agrees on fewer than half. They
    are measured on images the pruner did not see: a budget's held-out share, else ``held_out``
    (images never handed to the pruner, such as a recipe's val split) when the pruner calibrated,
    else the calibration images themselves (held out when the pruner takes none; labelled "not held
    out" when it calibrated on them and no ``held_out`` was given).
    """
    pruner_cls, params, layers, name = step.pruner_cls, step.params, step.layers, step.label
    precision, latency, accuracy_budget = step.precision, step.latency, step.accuracy_budget
    use = pruner_cls.calibration_use(params)
    if use == "required" and calibration is None:
        raise RmtpError(f"{pruner_cls.name} needs calibration data (a DataLoader of (images, labels) from the "
                        f"train split, e.g. calibration=bundle.loader('calibration')), and none was given")
    check_precision(precision, device, option="precision")
    _check_latency_cache(params, latency)
    selected = select_layers(pruner_cls.candidate_layers(arch, model), layers)
    pruner_data = None if use == "unused" else calibration

    step_cache: dict[Hashable, Any] = {}  # one per step: a budget's candidates and the final prune share it

    def context(target: nn.Module, data: DataLoader | None, **extra: object) -> PruneContext:
        return PruneContext(model=target, arch=arch, layers=selected, device=device, seed=seed, dense_model=dense,
                            calibration=data, progress=progress, precision=precision, input_shape=tuple(input_shape),
                            latency=latency, step_cache=step_cache, **extra)

    budget = None
    if accuracy_budget is not None:
        budget = _budget_search(model, pruner_cls, params, accuracy_budget, context, name=name, dense=dense,
                                pruner_data=pruner_data, scoring=calibration if scoring is None else scoring,
                                device=device, seed=seed, precision=precision, progress=progress)
        params, pruner_data = budget.params, budget.fit
        torch.manual_seed(seed)  # as each candidate ran: the chosen one again
    ctx = context(model, pruner_data, output=output, preview_images=preview_images,
                  cost=budget.cost if budget is not None else None)
    load_before = _loadavg()
    result = PruneResult.of(pruner_cls().prune(ctx, params), pruner_cls.name)
    rows = result.rows
    model.eval()
    notes = [] if selected or rows else ["the step's layer filter selected no layers; nothing was pruned"]
    notes.extend(filter(None, [skipped_note(rows)]))
    warnings: list[str] = []
    if budget is not None:
        notes.extend(budget.notes)
        warnings.extend(budget.warnings)
    speed = _check_speed(ctx, result.speed_plan, notes) if result.speed_plan is not None else None
    notes.extend(filter(None, [busy_timing_note(ctx.cost, ctx.device, load_before)]))
    agreement = _agreement(model, pruner_cls, params, name=name, dense=dense, budget=budget, calibration=calibration,
                           pruner_data=pruner_data, held_out=held_out, device=device, precision=precision,
                           warnings=warnings)
    return StepReport(index=index, kind="prune", name=name, rows=rows,
                      stats=model_stats(model, input_shape, device), seconds=0.0, notes=notes, speed=speed,
                      agreement=agreement, warnings=warnings)


@dataclass
class _Budget:
    """What an accuracy budget's search decided: the params to apply, the pruner's calibration
    images (the held-out ones removed), the reference to score the result on and the record."""

    params: PrunerParams
    budget: AccuracyBudget
    fit: DataLoader | None
    reference: DenseReference
    where: str
    record: dict
    cost: object = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _budget_search(model: nn.Module, pruner_cls: type[Pruner], params: PrunerParams, budget: AccuracyBudget,
                   context: Callable[..., PruneContext], *, name: str, dense: nn.Module | None,
                   pruner_data: DataLoader | None, scoring: DataLoader | None, device: torch.device, seed: int,
                   precision: str, progress: Progress) -> _Budget:
    """Search the pruner's strength knob under ``budget`` (:func:`rmtp.fidelity.accuracy_budget.search`),
    each candidate pruned from a deep copy of ``model`` (no artefacts saved) with the calibration
    images not held out, scored against ``dense`` on the held-out ones."""
    from rmtp.fidelity.accuracy_budget import MIN_HELD_OUT, budget_knob, describe_search, search, speed_note
    from rmtp.fidelity.agreement import DenseReference, images_of, split_calibration

    knob = budget_knob(pruner_cls, params, model)
    if dense is None:
        raise RmtpError("accuracy_budget: scores candidates against the dense model, and none was given (pass dense=)")
    if pruner_data is None and scoring is None:
        raise RmtpError(f"accuracy_budget: {name} is scored against the dense model on calibration images, and none "
                        f"were given (pass calibration=, e.g. bundle.loader('calibration'))")
    batch = (pruner_data if pruner_data is not None else scoring).batch_size or 64
    if pruner_data is not None:  # the pruner calibrates: hold images out of what it sees
        split = split_calibration(pruner_data, budget.holdout, seed, minimum=MIN_HELD_OUT)
        fit, images = split.fit, split.held_out
        where = (f"{len(images)} held-out calibration images (seed {seed}; {name} calibrated on the other "
                 f"{len(split.fit.dataset)})")
    else:
        fit, images = None, images_of(scoring)
        if len(images) < MIN_HELD_OUT:
            raise RmtpError(f"accuracy_budget: {len(images)} calibration images to score on; give at least "
                            f"{MIN_HELD_OUT} (data.calibration_size)")
        where = f"{len(images)} calibration images ({name} uses none)"
    reference = DenseReference(dense, images, device=device, batch=batch, precision=precision)
    shared: dict[str, object] = {"cost": None}

    with progress.task(f"accuracy budget: {knob.param}", total=budget.evaluations) as advance:
        def evaluate(value: float) -> tuple[float, float]:
            candidate, candidate_params = copy.deepcopy(model), knob.params_at(params, value)
            torch.manual_seed(seed)
            ctx = context(candidate, fit, cost=shared["cost"])
            pruner_cls().prune(ctx, candidate_params)
            shared["cost"] = ctx.cost
            score = reference.score(candidate.eval())
            del candidate
            advance(**{knob.param: knob.format(value).split(" = ")[1], "agreement": f"{score[0]:.1%}"})
            return score

        result = search(knob, budget, evaluate)
    chosen = knob.params_at(params, result.value)
    record = {"budget": budget.model_dump(), "knob": knob.param, "weak": knob.weak, "strong": knob.strong,
              "chosen": knob.value(result.value), "outcome": result.outcome,
              "trials": [trial.to_dict() for trial in result.trials]}
    # an impossible budget: was it already broken before this step (by earlier steps)? one more pass
    incoming = reference.score(model) if result.outcome == "impossible" else None
    spent = incoming is not None and not budget.within(*incoming)
    notes = [describe_search(knob, budget, result, name, spent=spent)]
    warnings = []
    speed = speed_note(knob, budget, result)
    if incoming is not None:
        warnings.append(_impossible_warning(budget, knob, result, name, speed=speed, incoming=incoming, spent=spent))
    elif speed:  # asked for and not delivered: a warning, not a note
        warnings.append(speed)
    elif result.outcome == "weakest":  # within budget, but only by (nearly) not pruning
        warnings.append(f"accuracy budget {budget.describe()}: only {name}'s weakest setting, "
                        f"{knob.format(result.value)}, is within it ({result.chosen.agreement:.1%} agreement); that "
                        f"was applied, so the step prunes as little as it can: loosen the budget for a stronger cut")
    return _Budget(params=chosen, budget=budget, fit=fit, reference=reference, where=where, record=record,
                   cost=shared["cost"], notes=notes, warnings=warnings)


def _impossible_warning(budget: AccuracyBudget, knob: StrengthKnob, result: SearchResult, name: str, *,
                        speed: str, incoming: tuple[float, float], spent: bool) -> str:
    """Why a budget cannot be had. A budget counts from the dense model, so in a later step of a
    recipe the model may break it before this step prunes at all (``spent``; ``incoming``: its
    agreement and KL as it came to the step); then the earlier steps spent it, and a weaker setting
    of this pruner cannot help: say that, not "prune with another method". A speed target keeps its
    own line (``speed``), followed by the same explanation."""
    if speed:
        return f"{speed}; {_spent_clause(incoming)}" if spent else speed
    weakest, chosen = knob.format(result.value), result.chosen
    if spent:
        after = _figures(chosen.agreement, chosen.kl)
        applied = (f"{weakest} (the weakest setting) " +
                   ("was applied" if after == _figures(*incoming) else f"leaves {after} and was applied"))
        return (f"accuracy budget {budget.describe()} cannot be had with {name}: {_spent_clause(incoming)}. "
                f"{applied}: give this step a looser budget than the earlier ones, or let them prune less")
    return (f"accuracy budget {budget.describe()} cannot be had with {name}: even {weakest} (the weakest setting) "
            f"leaves {chosen.agreement:.1%} agreement, KL {chosen.kl:.3g}; it was applied anyway: loosen the "
            f"budget, or prune with another method")


def _figures(agreement: float, kl: float) -> str:
    """An agreement and KL as every budget line prints them."""
    return f"{agreement:.1%} (KL {kl:.3g})"


def _spent_clause(incoming: tuple[float, float]) -> str:
    """That the model broke the budget before the step pruned, and why that can happen."""
    return (f"the model as it came to this step already agrees with dense on only {_figures(*incoming)}; a budget "
            f"counts from the dense model, and what changed the model before this step (a recipe's earlier steps) "
            f"spent it")


def _agreement(model: nn.Module, pruner_cls: type[Pruner], params: PrunerParams, *, name: str,
               dense: nn.Module | None, budget: _Budget | None, calibration: DataLoader | None,
               pruner_data: DataLoader | None, held_out: DataLoader | None, device: torch.device, precision: str,
               warnings: list[str]) -> dict | None:
    """The pruned model's top-1 agreement with ``dense`` and mean KL (None without ``dense`` or
    calibration images): on a budget's held-out calibration images; else, when the pruner
    calibrated and ``held_out`` images were given, on the first
    :data:`~rmtp.fidelity.agreement.DEFAULT_IMAGES` of those; else on the first of ``calibration``
    (labelled "not held out" when the pruner calibrated on them). A warning in ``warnings`` when
    it agrees on fewer than half."""
    from rmtp.fidelity.accuracy_budget import BROKEN_AGREEMENT

    if budget is not None:
        reference, where, unseen = budget.reference, budget.where, True
    elif dense is not None and calibration is not None:
        from rmtp.fidelity.agreement import DEFAULT_IMAGES, DenseReference, images_of

        source = held_out if pruner_data is not None and held_out is not None else calibration
        images = images_of(source, DEFAULT_IMAGES)
        reference = DenseReference(dense, images, device=device, batch=getattr(source, "batch_size", None) or 64,
                                   precision=precision)
        unseen = pruner_data is None or source is held_out
        if source is held_out:
            where = f"{len(images)} held-out images ({name} calibrated on others)"
        elif unseen:
            where = f"{len(images)} calibration images ({name} uses none)"
        else:
            where = (f"{len(images)} calibration images {name} calibrated on (not held out: a recipe scores on "
                     f"its val split, rmtp.prune on held_out=, an accuracy_budget holds some out)")
    else:
        return None
    top1, kl = reference.score(model)
    out = {"top1": top1, "kl": kl, "images": len(reference), "held_out": unseen, "where": where}
    if budget is not None:
        out["budget"] = budget.record
        if budget.record["outcome"] != "impossible" and not budget.budget.within(top1, kl):
            warnings.append(f"{name}: the applied model is outside the accuracy budget {budget.budget.describe()} "
                            f"({top1:.1%} agreement, KL {kl:.3g} on {where}) although the same setting was "
                            f"within it when searched: the pruner is not deterministic here (GPU kernels, "
                            f"timing-based choices); loosen the budget or fix the seed and timing")
    if top1 < BROKEN_AGREEMENT:
        warnings.append(broken_warning(name, top1, where, pruner_cls, params, budget))
    return out


def broken_warning(name: str, top1: float, where: str, pruner_cls: type[Pruner], params: PrunerParams,
                   budget: _Budget | None) -> str:
    """What happened to a model that agrees with dense on fewer than half the images, and what
    would recover it."""
    from rmtp.fidelity.accuracy_budget import budget_knob

    if budget is not None and budget.record["outcome"] == "impossible":
        advice = ("or prune fewer layers (layers:) or with another method: the accuracy budget's weakest setting "
                  "broke it")
    elif budget is not None:
        advice = f"or tighten the accuracy budget (it allowed this: {budget.budget.describe()})"
    else:
        try:
            knob = budget_knob(pruner_cls, params)
            advice = f"or set accuracy_budget: {{max_drop: 0.05}} to choose a milder {knob.param}"
        except RmtpError:
            advice = "or prune less"
    return (f"{name} left {top1:.1%} top-1 agreement with the dense model on {where}: the model is broken (it "
            f"gives the dense model's class on fewer than half of them); recover with a reconstruct: step "
            f"(rmtp.reconstruct) or a finetune with distill, {advice}")


def skipped_note(rows: Sequence[LayerRow], most: int = 3) -> str:
    """'' unless the pruner left layers as they were (rows with ``skipped``): then how many, and why,
    grouped by reason, most common first. Why: a pruner that skips every layer (n:m on a CPU, where
    no N:M kernel is faster) otherwise reads as a step that ran; the reasons sit in a per-layer
    column a narrow table hides."""
    skipped = [row.skipped for row in rows if row.skipped]
    if not skipped:
        return ""
    counts = Counter(skipped).most_common()
    reasons = "; ".join(f"{reason} ({count})" for reason, count in counts[:most])
    if len(counts) > most:
        reasons += f"; {len(counts) - most} other reasons"
    head = f"nothing pruned: all {len(rows)} layers skipped" if len(skipped) == len(rows) else \
        f"{len(skipped)} of {len(rows)} layers skipped"
    return f"{head}: {reasons}"


def _check_latency_cache(params: PrunerParams, latency: LatencySettings | None) -> None:
    """A step that will time refuses an unwritable cost-table folder now, not after timing."""
    from rmtp.latency.settings import LatencySettings, plans_in_time

    if plans_in_time(params):
        (latency or LatencySettings()).check_cache()


def _loadavg() -> float | None:
    from rmtp.bench.environment import loadavg

    return loadavg()


def busy_timing_note(cost: CostModel | None, device: torch.device, load_before: float | None) -> str:
    """'' unless the step timed on the device (``cost`` measured) while the machine was busy: then
    the warning ``rmtp bench`` gives, since the step chose by those timings."""
    if cost is None or cost.kind != "measured":
        return ""
    from rmtp.bench.environment import busy_note, usable_cores

    busy = busy_note([load_before, _loadavg()], usable_cores())
    if not busy:
        return ""
    threads = getattr(cost, "threads", None) or 1
    advice = "; try latency.threads: 1" if device.type == "cpu" and threads > 1 else ""
    return f"{busy}; the step's speed choices and figures may be off: prune on an idle machine{advice}"


def _check_speed(ctx: PruneContext, speed_plan: dict, notes: list[str]) -> dict:
    """The pruner's predicted speed-up (its result's ``speed_plan``), and (measured cost,
    ``verify_rounds`` > 0) the whole model timed against dense, so the report shows how far the
    prediction was from the clock."""
    from rmtp.latency.target import speed_report
    from rmtp.run.precision import autocast

    plan = dict(speed_plan)
    cost = ctx.cost_model()
    settings = cost.settings
    if plan.get("note"):
        notes.append(plan["note"])
    line = f"speed: {speed_report(plan)}"
    if cost.kind == "measured" and settings.verify_rounds and ctx.dense_model is not None:
        with ctx.progress.task("latency: timing dense vs pruned", total=settings.verify_rounds) as advance, \
                autocast(settings.precision, ctx.device):
            timing = measure.paired_speedup(ctx.dense_model, ctx.model, ctx.cost_model().input_shape,
                                            batch=settings.batch, device=ctx.device, rounds=settings.verify_rounds,
                                            threads=settings.threads, on_round=lambda done: advance())
        plan["measured"] = timing.to_dict()
        r = timing.ratio
        plan["prediction_error"] = plan["predicted_speedup"] / r.median - 1
        line += f"; measured ×{r.median:.2f} [{r.q1:.2f}–{r.q3:.2f}] ({plan['prediction_error']:+.1%} off)"
    notes.append(line)
    return plan


@timed
def finetune_step(model: nn.Module, data: DataBundle, config: TrainConfig, *, device: torch.device,
                  input_shape: tuple[int, ...], teacher: nn.Module | None = None, penalize: Sequence[str] = (),
                  progress: Progress = NULL_PROGRESS, index: int = 0, label: str = "finetune",
                  resume: TrainState | None = None,
                  on_checkpoint: Callable[[TrainState], None] | None = None) -> StepReport:
    """Fine-tune ``model`` in place (distilling from ``teacher`` when ``config.distill`` is set); the
    exact zeros of masked layers stay zero, ``penalize`` names the layers elastic-net acts on.

    The progress bar advances per optimizer step, showing the epoch, loss, lr, images/s and the
    epoch's ETA (the bar's own ETA covers the whole fine-tune). ``resume`` / ``on_checkpoint``
    are :func:`rmtp.training.train`'s: continue from a checkpoint, and receive new ones.
    """
    from rmtp.training import train

    if config.distill is not None and teacher is None:
        raise RmtpError("finetune: distill is set but no teacher was given (pass the dense model as teacher)")
    history: list[dict] = []
    keep_zeros = masked_layers(model) if resume is None else list(resume.mask_layers)  # as they began
    with progress.task(f"fine-tuning ({config.epochs} epochs)") as advance:
        def on_batch(step) -> None:
            advance(epoch=f"{step.epoch}/{step.epochs}", loss=f"{step.loss:.3f}", lr=f"{step.lr:.2e}",
                    **{"img/s": f"{step.images_per_second:.0f}", "epoch ETA": f"{step.eta_seconds:.0f}s"})

        def on_epoch(stats) -> None:
            history.append(stats.__dict__.copy())

        result = train(model, data, config, device=device, teacher=teacher if config.distill is not None else None,
                       keep_zeros=keep_zeros, penalize=list(penalize), on_epoch=on_epoch, on_batch=on_batch,
                       resume=resume, on_checkpoint=on_checkpoint)
    model.eval()
    history = [stats.__dict__.copy() for stats in result.history]
    return StepReport(index=index, kind="finetune", name=label, rows=[],
                      stats=model_stats(model, input_shape, device, result.final_val_top1), seconds=0.0,
                      history=history)


def reconstruct_problem(arch: Architecture, model: nn.Module) -> str | None:
    """Why ``model``'s architecture cannot be reconstructed block by block (``None`` if it can): it
    declares no blocks. Asked before a recipe's first step too (:mod:`rmtp.run.preflight`)."""
    if arch.blocks(model):
        return None
    return (f"reconstruct: architecture {arch.name!r} declares no blocks to reconstruct one by one "
            f"(Architecture.blocks); recover it with distillation instead (a finetune step with distill)")


@timed
def reconstruct_step(model: nn.Module, dense: nn.Module, calibration: Iterable, config: ReconstructConfig, *,
                     arch: Architecture, device: torch.device, input_shape: tuple[int, ...], seed: int = 0,
                     progress: Progress = NULL_PROGRESS, index: int = 0,
                     label: str = "reconstruct") -> StepReport:
    """Block-wise reconstruction of ``model`` against ``dense`` on the calibration images
    (:mod:`rmtp.fidelity.blockwise`): each block, in forward order, trained to give the dense block's
    outputs from the inputs the already-reconstructed model feeds it. Refused, before anything
    runs, for a token-reduced model (its blocks see fewer tokens than the dense ones) and for an
    architecture that declares no blocks."""
    from rmtp.contract.saved_types import patches_of
    from rmtp.fidelity.blockwise import calibration_images, reconstruct_blocks

    if any(patch.changes_tokens for patch in patches_of(model)):
        raise RmtpError("reconstruct: the model is token-reduced, so its blocks see other tokens than the dense "
                        "model's; reconstruct before the token pruner (or rmtp.unpatch(model) first)")
    problem = reconstruct_problem(arch, model)
    if problem:
        raise RmtpError(problem)
    blocks = arch.blocks(model)
    missing = [name for name in blocks if not has_submodule(dense, name)]
    if missing:
        raise RmtpError(f"reconstruct: the dense model has no {missing[0]}: give the dense model this one was "
                        f"pruned from")
    images = calibration_images(calibration, config.images)
    fits = reconstruct_blocks(model, dense.to(device).eval(), blocks, images, config=config, device=device,
                              seed=config.seed if config.seed is not None else seed, progress=progress)
    kept = [fit for fit in fits if fit.kept]
    notes = [f"{len(fits)} blocks on {len(images)} calibration images, {sum(f.steps for f in fits)} optimizer "
             f"steps: output error (‖f(x) − y‖²/‖y‖², median over blocks) "
             f"{median([f.error_before for f in fits]):.4g} → {median([f.error_after for f in fits]):.4g}"]
    if len(kept) < len(fits):
        notes.append(f"{len(fits) - len(kept)} block(s) kept as they came: their calibration error rose "
                     f"({', '.join(f.block for f in fits if not f.kept)}); try a lower lr")
    return StepReport(index=index, kind="reconstruct", name=label, rows=[],
                      stats=model_stats(model, input_shape, device), seconds=0.0, notes=notes,
                      history=[fit.to_dict() for fit in fits])


def top1_with_progress(model: nn.Module, loader: DataLoader, device: torch.device, progress: Progress,
                       description: str, precision: str = "fp32") -> float:
    """Top-1 (percent) of ``model`` on ``loader``, one progress tick per batch."""
    with progress.task(description, total=len(loader)) as advance:
        return measure.top1(model, loader, device=device, progress=lambda done, total: advance(), precision=precision)


@timed
def evaluate_step(model: nn.Module, loader: DataLoader, settings: EvaluateParams, *, device: torch.device,
                  input_shape: tuple[int, ...], dense: nn.Module | None = None, dense_top1: float | None = None,
                  progress: Progress = NULL_PROGRESS, index: int = 0, label: str = "evaluate") -> StepReport:
    """Top-1 on ``loader``, params, MACs, and (``settings.latency``) the speed-up over ``dense``,
    timed in interleaved rounds as ``rmtp bench`` times."""
    top1 = top1_with_progress(model, loader, device, progress, "evaluating", settings.precision)
    stats = model_stats(model, input_shape, device, top1)
    notes = []
    if dense_top1 is not None:
        notes.append(f"top-1 {top1:.2f}% vs dense {dense_top1:.2f}% ({top1 - dense_top1:+.2f} points)")
    if settings.latency:
        if dense is None:
            raise RmtpError("evaluate: latency compares against the dense model, and none was given (pass dense=)")
        with progress.task("timing dense vs pruned", total=settings.latency_rounds) as advance:
            timing = measure.paired_speedup(dense, model, input_shape, batch=settings.latency_batch, device=device,
                                            rounds=settings.latency_rounds, threads=settings.latency_threads,
                                            on_round=lambda done: advance())
        stats.dense_latency_ms, stats.latency_ms = timing.dense_ms.median, timing.pruned_ms.median
        stats.speedup = timing.to_dict()
        notes.append(timing.describe())
    return StepReport(index=index, kind="evaluate", name=label, rows=[], stats=stats, seconds=0.0, notes=notes)
