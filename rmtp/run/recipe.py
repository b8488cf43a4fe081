"""Recipes: YAML files that say which model to prune, on which data, with which steps, in order.

A recipe is validated completely before any model is built: structure (pydantic models with
unknown keys forbidden), every pruner name against the registry, every pruner's params against
that pruner's own schema, file paths, layer-filter patterns, the output folder. Every problem is
reported as ``file: key.path: message (got value)``, all at once; the checks that need timm (the
model name, its architecture plugin, an imagefolder's fit to the model) run once the rest is clean,
so that a typo is answered without waiting seconds for torch.

What validation resolved travels with the :class:`Recipe`: the plugins it was checked against and,
for every prune step, a :class:`ResolvedPrune` (the pruner class and its validated params), so a
run never looks a pruner up again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rmtp.contract.architecture import timm_name_hint
from rmtp.contract.pruner import Pruner, PrunerParams
from rmtp.data.spec import DataSpec
from rmtp.errors import CheckpointError, PluginError, RecipeError, RmtpError, short_repr
from rmtp.fidelity.accuracy_budget import AccuracyBudget, budget_knob
from rmtp.latency.settings import LatencySettings
from rmtp.plugins import Plugins, get_plugins
from rmtp.run.layer_filter import LayerFilter
from rmtp.run.precision import Precision
from rmtp.storage.atomic import check_writable
from rmtp.storage.overwrite import replace_problem
from rmtp.storage.safe_yaml import read_yaml_file
from rmtp.training.config import ReconstructConfig, TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    """``model:``: a timm model by name, built by an architecture plugin."""

    name: str | None = Field(None, description="timm model name: vit_base_patch16_224, NAME.tag, timm/NAME.tag or "
                                               "hf-hub:org/name; optional when checkpoint is a folder in timm's hub "
                                               "layout (config.json) or an rmtp output folder")
    arch: str | None = Field(None, description="architecture plugin; inferred from the name when omitted")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to timm.create_model (img_size, depth, num_classes, ...)")
    pretrained: bool = Field(False, description="load timm's pretrained weights (needs network access)")
    checkpoint: Path | None = Field(None, description=".safetensors/.pth/.bin file, a folder in timm's hub layout "
                                                      "(config.json + model.safetensors) or an rmtp output folder, "
                                                      "relative to the recipe")


class EvaluateParams(_Strict):
    """``evaluate:`` step: top-1 on the val split, params, MACs, optionally latency."""

    latency: bool = Field(
        False, description="also time the model next to the dense one (interleaved rounds, as rmtp bench)")
    latency_batch: int = Field(1, ge=1, le=1024, description="batch size for the latency measurement")
    latency_rounds: int = Field(15, ge=3, le=1000, description="interleaved timing rounds (median and IQR over them)")
    latency_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads while timing (null: torch's current setting)")
    precision: Precision = Field("fp32", description="autocast of the top-1 passes: fp32, bf16 (CPU and CUDA), fp16 "
                                                     "(CUDA); latency is timed in fp32")


class OutputSection(_Strict):
    """``output:``: where the pruned model, resolved recipe and report are written."""

    dir: Path = Field(description="output folder, relative to the recipe")
    overwrite: bool = Field(False, description="replace an existing rmtp output folder (atomically); a folder with "
                                            "files rmtp did not write, or holding the recipe, its data, its model or "
                                            "the current directory, is refused")
    save_model: bool = Field(True, description="write model.safetensors (off: report only)")
    checkpoints: bool = Field(True, description="checkpoint beside the output (<dir>.checkpoint/) after each "
                                                "step and during fine-tunes, so `rmtp prune --resume` can "
                                                "continue a killed run; removed when the run completes")


class PruneStep(_Strict):
    prune: str = Field(description="registered pruner name (see `rmtp list`)")
    params: dict[str, Any] = Field(default_factory=dict)
    layers: LayerFilter | None = None
    name: str | None = None
    precision: Precision = Field("fp32", description="autocast of the pruner's calibration passes (spp's search, "
                                                     "n:m's activation statistics): fp32, bf16, fp16 (CUDA)")
    latency: LatencySettings | None = Field(None, description="how replacements are timed for only_if_faster and "
                                                              "speed targets (batch and threads default to the "
                                                              "next timed evaluate step's)")
    accuracy_budget: AccuracyBudget | None = Field(
        None, description="choose the strongest setting of the pruner's strength (svd-mp target_params, n:m "
                          "target_macs, spp ratio, tome r, token-cls/token-mean r_max, magnitude sparsity, int8 "
                          "max_layer_kl; with target_speedup: the speed target) whose result stays within "
                          "max_drop / max_kl of the dense model on held-out calibration images")


class _StepWithSettings(_Strict):
    """A step whose one key holds its settings (``BODY``): ``finetune:`` with no body (``null``)
    means every default, as ``finetune: {}`` does."""

    BODY: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get(cls.BODY) is None:
            data = {**data, cls.BODY: {}}
        return data


class FinetuneStep(_StepWithSettings):
    BODY: ClassVar[str] = "finetune"
    finetune: TrainConfig = Field(default_factory=TrainConfig)
    name: str | None = None


class EvaluateStep(_StepWithSettings):
    BODY: ClassVar[str] = "evaluate"
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    name: str | None = None


class ReconstructStep(_StepWithSettings):
    BODY: ClassVar[str] = "reconstruct"
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    name: str | None = None


Step = PruneStep | FinetuneStep | ReconstructStep | EvaluateStep
STEP_KINDS: dict[str, type[_Strict]] = {"prune": PruneStep, "finetune": FinetuneStep, "reconstruct": ReconstructStep,
                                        "evaluate": EvaluateStep}


def step_label(step: Step) -> str:
    """'svd-mp', 'finetune', 'reconstruct' or 'evaluate' (or the step's own ``name``): how reports
    name a step."""
    if step.name:
        return step.name
    if isinstance(step, PruneStep):
        return step.prune
    return next(kind for kind, cls in STEP_KINDS.items() if isinstance(step, cls))


class _RecipeShape(_Strict):
    model: ModelSection
    data: DataSpec = Field(default_factory=DataSpec)
    steps: list[dict[str, Any]] = Field(min_length=1)
    output: OutputSection | None = None
    seed: int = Field(0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"


@dataclass(frozen=True)
class ResolvedPrune:
    """A validated prune step: the registered pruner class, its params (validated against its
    ``Params``), the step's layer filter and its optional ``name``."""

    pruner_cls: type[Pruner]
    params: PrunerParams
    layers: LayerFilter | None = None
    name: str | None = None
    precision: str = "fp32"
    latency: LatencySettings | None = None
    accuracy_budget: AccuracyBudget | None = None

    @property
    def label(self) -> str:
        """How reports name the step: its ``name``, else the pruner's (as :func:`step_label`)."""
        return self.name or self.pruner_cls.name


#: A step as the pipeline runs it: prune steps resolved, the others as validated.
PlannedStep = ResolvedPrune | FinetuneStep | ReconstructStep | EvaluateStep


@dataclass
class Recipe:
    """A validated recipe. Paths are resolved against the recipe's folder.

    ``resolved`` maps the index of every prune step in ``steps`` to its :class:`ResolvedPrune`;
    ``plugins`` are the plugins the recipe was validated against, the ones
    :func:`rmtp.run_recipe` uses unless given others.
    """

    path: Path | None
    model: ModelSection
    data: DataSpec
    steps: list[Step]
    output: OutputSection | None
    seed: int
    device: Literal["cpu", "cuda", "auto"]
    resolved: dict[int, ResolvedPrune] = field(default_factory=dict)
    plugins: Plugins | None = field(default=None, repr=False, compare=False)

    @property
    def plan(self) -> list[PlannedStep]:
        """The steps in order, each prune step as its :class:`ResolvedPrune`."""
        return [self.resolved[index] if isinstance(step, PruneStep) else step for index, step in enumerate(self.steps)]

    @property
    def pruner_params(self) -> dict[int, PrunerParams]:
        """Step index → validated params, for every prune step."""
        return {index: resolved.params for index, resolved in self.resolved.items()}

    def kept_paths(self) -> dict[str, Path | None]:
        """What an overwritten output folder must never hold (:mod:`rmtp.storage.overwrite`)."""
        return kept_paths(self.path, self.data.root, self.model.checkpoint)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in, absolute paths), as saved next to the model."""
        steps = []
        for index, step in enumerate(self.steps):
            dumped = step.model_dump(mode="json", exclude_none=True)
            if isinstance(step, PruneStep):
                dumped["params"] = self.resolved[index].params.model_dump(mode="json")
            steps.append(dumped)
        return {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "steps": steps,
            "output": self.output.model_dump(mode="json") if self.output else None,
            "seed": self.seed,
            "device": self.device,
        }


def kept_paths(recipe: Path | None, data_root: Path | None, checkpoint: Path | None) -> dict[str, Path | None]:
    """The recipe's own paths, by the key that names them: an output folder holding one is never replaced."""
    return {"recipe": recipe, "data.root": data_root, "model.checkpoint": checkpoint}


def load_recipe(path: str | Path, *, plugins: Plugins | None = None) -> Recipe:
    """Read and fully validate a recipe file; raise :class:`RecipeError` listing every problem."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError([f"{path}: is a folder, not a recipe file{_recipes_inside(path)}"])
    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"])
    try:
        raw = read_yaml_file(path)
    except RmtpError as exc:
        raise RecipeError([str(exc)]) from None
    return parse_recipe(raw, source=path, plugins=plugins)


#: How many of a folder's YAML files a "folder, not a recipe file" message names.
_SUGGESTED_RECIPES = 3


def _recipes_inside(folder: Path) -> str:
    """``"; did you mean …"`` naming the recipe files in ``folder`` (an output folder's saved
    recipe.yaml first), or ``""``: a folder given for a recipe is usually one level off."""
    try:
        found = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    except OSError:
        return ""
    found.sort(key=lambda p: p.name != "recipe.yaml")  # stable: recipe.yaml first, the rest by name
    if not found:
        return ""
    shown = ", ".join(str(p) for p in found[:_SUGGESTED_RECIPES])
    more = f" (and {len(found) - _SUGGESTED_RECIPES} more)" if len(found) > _SUGGESTED_RECIPES else ""
    return f"; did you mean {shown}{more}?"


def parse_recipe(raw: Any, *, source: Path | None = None, plugins: Plugins | None = None) -> Recipe:
    """Validate an already-parsed recipe mapping (``source`` names it in errors, anchors paths)."""
    label = str(source) if source else "<recipe>"
    base = source.parent if source else Path.cwd()
    if not isinstance(raw, dict):
        raise RecipeError([f"{label}: a recipe must be a mapping with model, steps (and data, output), "
                           f"got {type(raw).__name__}"])
    problems: list[str] = []
    try:
        shape = _RecipeShape.model_validate(raw)
    except ValidationError as exc:
        # Keep going into the steps, so one run of `rmtp validate` lists every problem.
        problems.extend(format_errors(label, exc, _RecipeShape))
        shape = None

    plugins = plugins or get_plugins()
    raw_steps = shape.steps if shape else raw.get("steps")
    raw_steps = raw_steps if isinstance(raw_steps, list) else []
    steps: list[Step] = []
    resolved: dict[int, ResolvedPrune] = {}
    for index, raw_step in enumerate(raw_steps):
        where = f"steps[{index}]"
        if not isinstance(raw_step, dict):
            continue  # already reported by the shape check
        step = _validate_step(label, where, raw_step, problems)
        if step is None:
            continue
        steps.append(step)
        if isinstance(step, PruneStep):
            prune = _validate_pruner(label, where, step, plugins, problems)
            if prune is not None:
                resolved[len(steps) - 1] = prune
            if step.layers is not None:
                problems.extend(f"{label}: {where}.layers.{p}" for p in step.layers.problems())
    if shape is None:
        raise RecipeError(problems)
    for index, prune in resolved.items():
        resolved[index] = replace(prune, latency=_latency_settings(steps, index))
    problems.extend(f"{label}: {problem}" for problem in _latency_cache_problems(resolved))

    output = shape.output
    if output is not None:
        output = output.model_copy(update={"dir": (base / output.dir).resolve()})
        replaced = replace_problem(output.dir, keep=kept_paths(
            source, base / shape.data.root if shape.data.root else None,
            base / shape.model.checkpoint if shape.model.checkpoint else None))
        if replaced is not None:  # first: overwrite would not help, so it must not be suggested
            problems.append(f"{label}: output.dir: {replaced}")
        elif output.dir.exists() and not output.overwrite:
            problems.append(f"{label}: output.dir: {output.dir} already exists; set output.overwrite: true or "
                            "choose another folder")
        else:
            try:  # now, not at the end of the run, when its result would have nowhere to go
                check_writable(output.dir, what="output.dir", is_dir=True)
            except RmtpError as exc:
                problems.append(f"{label}: {exc}")
    if problems:  # what follows needs timm (and torch): seconds a typo above should not wait for
        raise RecipeError(problems)

    model = _validate_model(label, base, shape.model, plugins, problems)

    data = shape.data
    if data.root is not None:
        data = data.model_copy(update={"root": (base / data.root).resolve()})
    if data.name == "imagefolder" and (data.root is None or not data.root.is_dir()):
        problems.append(f"{label}: data.root: imagefolder needs an existing folder, got {data.root}")
    elif data.name == "imagefolder":
        from rmtp.data import imagefolder_problems

        # Folder names only (cheap on ImageNet); a saved rmtp folder brings its own kwargs.
        kwargs = {} if model.checkpoint is not None and model.checkpoint.is_dir() else model.kwargs
        problems.extend(f"{label}: {problem}" for problem in imagefolder_problems(data.root, kwargs,
                                                                                   unlabeled=data.unlabeled))
    if data.unlabeled:
        problems.extend(f"{label}: {problem}" for problem in _unlabeled_problems(steps, resolved))
    problems.extend(f"{label}: {problem}" for problem in _training_after_frozen_problems(steps, resolved))
    problems.extend(f"{label}: {problem}" for problem in _budget_image_problems(resolved, data.calibration_size))

    for index, step in enumerate(steps):  # timm's training transform works on PIL images
        if isinstance(step, FinetuneStep) and not isinstance(step.finetune.augment, bool) \
                and shape.data.name != "imagefolder":
            problems.append(f"{label}: steps[{index}].finetune.augment: timm's training augmentation needs data: "
                            f"imagefolder; the {shape.data.name} images are tensors (augment: true shifts them)")
    if shape.device == "cpu":  # the device is known: refuse now what it cannot run, not after the pruning
        for index, step in enumerate(steps):
            if isinstance(step, FinetuneStep) and step.finetune.precision == "fp16":
                problems.append(f"{label}: steps[{index}].finetune.precision: fp16 needs a CUDA device (device: cpu); "
                                f"on the CPU use bf16")
            if isinstance(step, PruneStep) and step.precision == "fp16":
                problems.append(f"{label}: steps[{index}].precision: fp16 needs a CUDA device (device: cpu); "
                                f"on the CPU use bf16")
            if isinstance(step, EvaluateStep) and step.evaluate.precision == "fp16":
                problems.append(f"{label}: steps[{index}].evaluate.precision: fp16 needs a CUDA device (device: cpu); "
                                f"on the CPU use bf16")

    if problems:  # once each: an unknown model name is what the architecture and timm checks both say
        raise RecipeError(list(dict.fromkeys(problems)))
    return Recipe(path=source, model=model, data=data, steps=steps, output=output, seed=shape.seed,
                  device=shape.device, resolved=resolved, plugins=plugins)


def _budget_image_problems(resolved: dict[int, ResolvedPrune], calibration_size: int) -> list[str]:
    """A step with an accuracy budget needs calibration images to score on (and, for a pruner that
    calibrates, some left over for it): refused now, not when the step is reached after hours."""
    from rmtp.fidelity.accuracy_budget import MIN_HELD_OUT

    problems = []
    for index, prune in resolved.items():
        if prune.accuracy_budget is None:
            continue
        calibrates = prune.pruner_cls.calibration_use(prune.params) != "unused"
        held = max(MIN_HELD_OUT, round(calibration_size * prune.accuracy_budget.holdout)) if calibrates \
            else MIN_HELD_OUT
        if calibration_size < held + calibrates:
            problems.append(f"data.calibration_size: {calibration_size} calibration images are too few for "
                            f"steps[{index}].accuracy_budget, which scores on {held} of them"
                            + (f" and leaves the rest to {prune.pruner_cls.name}" if calibrates else "")
                            + f"; give at least {held + calibrates}")
    return problems


def _training_after_frozen_problems(steps: list[Step], resolved: dict[int, ResolvedPrune]) -> list[str]:
    """A step that trains (finetune, distill, reconstruct) after a prune step whose layers pass no
    gradient (``passes_gradients = False``: int8) would train nothing before those layers, or fail
    at its first backward pass; a weight or mask pruner after it would find those layers no longer plain
    Linear layers and cut nothing, or only the few left in float. Both refused now: the order that
    works is to prune and train first and quantize last (token steps may follow)."""
    problems = []
    frozen: int | None = None
    for index, step in enumerate(steps):
        if index in resolved and not resolved[index].pruner_cls.passes_gradients and frozen is None:
            frozen = index
        elif frozen is not None and isinstance(step, (FinetuneStep, ReconstructStep)):
            problems.append(f"steps[{index}]: {step_label(step)} trains after steps[{frozen}] "
                            f"({resolved[frozen].pruner_cls.name}), whose layers pass no gradient; "
                            f"move steps[{frozen}] after it")
        elif frozen is not None and index in resolved and resolved[index].pruner_cls.kind != "token":
            problems.append(f"steps[{index}]: {step_label(step)} cuts weights after steps[{frozen}] "
                            f"({resolved[frozen].pruner_cls.name}) replaced its layers, so it would find "
                            f"nothing to cut; move steps[{frozen}] after it")
    return problems


def _unlabeled_problems(steps: list[Step], resolved: dict[int, ResolvedPrune]) -> list[str]:
    """What needs labels on unlabeled data (``data.unlabeled: true``), by key: a fine-tune that is
    not distillation alone, mixup, a pruner whose ``loss`` is ``ce`` (spp's cross-entropy on labels).
    Refused now: on images with no labels they would train on, or score, labels that do not exist."""
    problems = []
    for index, step in enumerate(steps):
        if isinstance(step, FinetuneStep):
            problems.extend(f"steps[{index}].finetune.{key}: {why}" for key, why in step.finetune.unlabeled_problems())
        elif index in resolved and getattr(resolved[index].params, "loss", None) == "ce" \
                and getattr(resolved[index].params, "search", "lbi") != "obs":  # obs reads no labels
            problems.append(f"steps[{index}].params.loss: ce is cross-entropy on labels, and the data is unlabeled "
                            f"(data.unlabeled: true); use loss: kd (distil from the dense model)")
    return problems


def _latency_cache_problems(resolved: dict[int, ResolvedPrune]) -> list[str]:
    """The cost-table folder of every prune step that will time on the device, checked now (once
    per folder): a bad ``RMTP_LATENCY_CACHE`` used to surface as a traceback after the timing."""
    from rmtp.latency.settings import plans_in_time

    problems, seen = [], set()
    for index, prune in resolved.items():
        settings = prune.latency or LatencySettings()
        if settings.cost != "measured" or not plans_in_time(prune.params) or settings.cache_dir() in seen:
            continue
        seen.add(settings.cache_dir())
        try:
            settings.check_cache()
        except RmtpError as exc:
            problems.append(f"steps[{index}]: {exc}")
    return problems


def _latency_settings(steps: list[Step], index: int) -> LatencySettings:
    """The prune step's ``latency:``, with ``batch`` and ``threads`` it leaves unset taken from the
    first later ``evaluate`` step that times latency: the speed the recipe will report is the
    speed its budget is planned in."""
    step = steps[index]
    settings = step.latency if isinstance(step, PruneStep) and step.latency is not None else LatencySettings()
    timed = next((s.evaluate for s in steps[index + 1:] if isinstance(s, EvaluateStep) and s.evaluate.latency), None)
    if timed is None:
        return settings
    update: dict[str, Any] = {}
    if "batch" not in settings.model_fields_set:
        update["batch"] = timed.latency_batch
    if "threads" not in settings.model_fields_set and timed.latency_threads is not None:
        update["threads"] = timed.latency_threads
    return settings.model_copy(update=update)


def _validate_step(label: str, where: str, raw_step: dict[str, Any], problems: list[str]) -> Step | None:
    kinds = [k for k in STEP_KINDS if k in raw_step]
    if len(kinds) != 1:
        found = ", ".join(_short_key(key) for key in sorted(raw_step, key=str)[:_SHOWN_KEYS]) or "nothing"
        found += f" and {len(raw_step) - _SHOWN_KEYS} more" if len(raw_step) > _SHOWN_KEYS else ""
        problems.append(f"{label}: {where}: a step needs exactly one of {', '.join(STEP_KINDS)} (found keys: {found})")
        return None
    model_cls = STEP_KINDS[kinds[0]]
    try:
        return model_cls.model_validate(raw_step)
    except ValidationError as exc:
        problems.extend(format_errors(label, exc, model_cls, prefix=where))
        return None


def _validate_pruner(label: str, where: str, step: PruneStep, plugins: Plugins,
                     problems: list[str]) -> ResolvedPrune | None:
    if step.prune not in plugins.pruners:
        problems.append(f"{label}: {where}.prune: unknown pruner {short_repr(step.prune)}; "
                        f"{plugins.pruners.known_hint(step.prune[:_KEY_CHARS])}")
        return None
    pruner_cls = plugins.pruners.get(step.prune)
    params_cls = pruner_cls.Params
    try:
        params = params_cls.model_validate(step.params)
    except ValidationError as exc:
        problems.extend(format_errors(label, exc, params_cls, prefix=f"{where}.params"))
        return None
    if step.accuracy_budget is not None:
        try:
            budget_knob(pruner_cls, params)
        except RmtpError as exc:
            problems.append(f"{label}: {where}.accuracy_budget: {exc}")
            return None
    return ResolvedPrune(pruner_cls=pruner_cls, params=params, layers=step.layers, name=step.name,
                         precision=step.precision, accuracy_budget=step.accuracy_budget)


def _validate_model(label: str, base: Path, model: ModelSection, plugins: Plugins,
                    problems: list[str]) -> ModelSection:
    """``model:`` with its checkpoint resolved against the recipe's folder and what the checkpoint says
    of the model filled in (:func:`_model_from_checkpoint`); problems appended."""
    from rmtp import sources

    if model.checkpoint is not None:
        model = model.model_copy(update={"checkpoint": (base / model.checkpoint).resolve()})
        if not model.checkpoint.exists():
            problems.append(f"{label}: model.checkpoint: {model.checkpoint} does not exist")
        else:
            try:
                model = _model_from_checkpoint(model)
            except RmtpError as exc:
                problems.append(f"{label}: {exc}")
                return model
    if model.name is None:
        problems.append(f"{label}: model.name: required, unless model.checkpoint is a folder in timm's hub layout "
                        f"(config.json beside model.safetensors), an rmtp output folder, or a weights file with a "
                        f"model card <stem>.json (timm_name, kwargs) or timm's config.json beside it")
        return model
    name = sources.normalise_name(model.name)
    if name != model.name:
        model = model.model_copy(update={"name": name})
    try:
        registry = sources.registry_name(name)  # an hf-hub: name's config.json (hub or local cache)
    except RmtpError as exc:
        problems.append(f"{label}: {exc}")
        return model
    if model.arch is not None and model.arch not in plugins.architectures:
        problems.append(f"{label}: model.arch: unknown architecture {model.arch!r}; "
                        f"{plugins.architectures.known_hint(model.arch)}")
    else:
        try:
            plugins.architecture_for(registry, model.arch)
        except PluginError as exc:
            problems.append(f"{label}: model.name: {exc}")
    _check_timm_name(label, name, registry, problems)
    return model


def _model_from_checkpoint(model: ModelSection) -> ModelSection:
    """What ``model.checkpoint`` says of the model (:func:`rmtp.sources.resolve_source`): an rmtp
    output folder fills a missing name from its record; a folder in timm's hub layout gives name and
    kwargs (its weights file becomes the checkpoint); a weights file without ``model.name`` takes
    them from its model card ``<stem>.json``, else from timm's config.json beside it. A weights file
    under a given name is the recipe's to describe: its kwargs are the recipe's, no card is read."""
    from rmtp.sources import CONFIG_FILE, HubLayout, NameConflict, NotASource, SavedFolder, WeightsFile, resolve_source
    from rmtp.storage.overwrite import META_FILE

    checkpoint = model.checkpoint
    assert checkpoint is not None
    if model.name is not None and checkpoint.is_file():
        return model
    try:
        source = resolve_source(checkpoint, model.name)
    except NotASource:
        raise CheckpointError(f"model.checkpoint: {checkpoint} is a folder, but not an rmtp output folder (no "
                              f"{META_FILE}) nor in timm's hub layout (no {CONFIG_FILE})") from None
    except NameConflict as exc:
        raise CheckpointError(f"model.name: {model.name!r}, but {exc.hub.config.source} says the weights are a "
                              f"{exc.hub.config.architecture!r}; drop model.name (the config decides) or give the "
                              f"checkpoint file") from None
    if isinstance(source, SavedFolder):
        if model.name is not None:
            return model
        spec = source.spec
        return model.model_copy(update={"name": spec.name, "arch": model.arch or spec.arch})
    spec = source.spec
    if spec is None:  # a bare weights file: model.name is required (said by the caller)
        return model
    assert isinstance(source, (HubLayout, WeightsFile))
    return model.model_copy(update={"name": spec.name, "arch": model.arch or spec.arch,
                                    "kwargs": {**spec.kwargs, **model.kwargs}, "checkpoint": spec.checkpoint})


def _check_timm_name(label: str, name: str, registry: str, problems: list[str]) -> None:
    import timm

    if timm.is_model(registry.split(".")[0]):
        return
    if registry != name:  # an hf-hub: repo whose config names a model this timm lacks
        from rmtp.sources import unknown_architecture

        problems.append(f"{label}: {unknown_architecture(name, registry)}")
    else:
        # worded as plugins.architecture_for words it, so that the two reports dedupe into one
        problems.append(f"{label}: model.name: timm has no model {short_repr(name, 80)}{timm_name_hint(name)}")


def format_errors(label: str, exc: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per pydantic error: file, key path, what is wrong, what was given."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
        path = _loc_to_path(loc, prefix)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model_cls, loc[:-1])
            message = f"unknown key {short_repr(loc[-1])}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = f"{error['msg']} (got {short_repr(error['input'])})"
        lines.append(f"{label}: {path}: {message}" if path else f"{label}: {message}")
    return lines


def _loc_to_path(loc: list[Any], prefix: str) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{_short_key(part)}" if path else _short_key(part)
    return path


#: Longest key a key path shows whole (a 100,000-character key made a 200 KB message); the
#: "unknown key"/"unknown pruner" text bounds its repr with short_repr.
_KEY_CHARS = 60
#: How many of a step's keys "found keys: …" lists.
_SHOWN_KEYS = 8


def _short_key(key: Any) -> str:
    """A key as it appears in a key path, cut to :data:`_KEY_CHARS` characters with an ellipsis."""
    text = str(key)
    return text if len(text) <= _KEY_CHARS else text[: _KEY_CHARS - 1] + "…"


def _allowed_keys(model_cls: type[BaseModel], loc: list[Any]) -> list[str]:
    """The field names of the (possibly nested) pydantic model at ``loc``."""
    current: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        field_info = getattr(current, "model_fields", {}).get(part)
        if field_info is None:
            return []
        current = _model_in_annotation(field_info.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in_annotation(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in_annotation(arg)
        if found is not None:
            return found
    return None
