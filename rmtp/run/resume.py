"""Checkpoints of a recipe run, next to its output folder, and resuming a killed run from the last one.

While a run with ``output.dir: runs/x`` goes, ``runs/x.checkpoint/`` holds its last checkpoint:
after every finished step, at each fine-tune epoch's end and every ``finetune.checkpoint_every``
optimizer steps. A checkpoint is one *generation* folder ``gen-NNNNNN/`` with

* ``run.pt``: which steps are done, their reports, the pruned layers, the dense top-1, the names
  of the prune steps' staged extras, and, in the middle of a fine-tune, rank 0's
  :class:`~rmtp.training.TrainState` (``train-rank<r>.pt`` for the other torchrun ranks);
* ``model/``: the model as :func:`rmtp.storage.saving.save` writes it (structure and weights), only when
  the model changed since the last generation (``latest.json`` names the generation whose model
  is current), so an ``evaluate`` step does not rewrite a large model.

A generation is written under a temporary name and renamed into place, then ``latest.json`` is
replaced atomically: a kill at any moment leaves the previous checkpoint or the complete new one.
Everything is read back with ``torch.load(weights_only=True)`` and :func:`rmtp.storage.saving.load`, like
any untrusted file. The folder is removed when the run completes. ``rmtp prune recipe.yaml
--resume`` continues from it without redoing finished steps (the pruned structure is rebuilt from
``model/``, not re-pruned) and refuses, naming the keys, a recipe that changed since.

``latest.json`` also records the data's identity (:func:`rmtp.data.identity.data_identity`: per
split, the image count and a digest of the files), so a resume on changed data is refused too.
Checkpoints written before that field existed have no ``data`` and still resume, unchecked: the
field is optional, so the schema stays ``rmtp-checkpoint/1`` and older rmtp reads newer checkpoints.

A run without ``--resume`` over a checkpoint is refused by :mod:`rmtp.run.pipeline` (it would discard
hours of work): the way to start over is to delete the folder. Every field is checked when read
back: a damaged or hand-edited checkpoint is a :class:`~rmtp.errors.CheckpointError` naming the
file and the field, never a ``KeyError``. Its messages name no option: the run that reads it
(:mod:`rmtp.run.pipeline`) says what to do.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmtp.errors import CheckpointError, short_repr
from rmtp.run import distributed
from rmtp.storage import saving
from rmtp.storage.atomic import write_json_atomic

if TYPE_CHECKING:
    from rmtp.contract.architecture import Architecture, ModelSpec
    from rmtp.training import TrainState

SUFFIX = ".checkpoint"
LATEST_FILE = "latest.json"
RUN_FILE = "run.pt"
MODEL_DIR = "model"
STAGED_DIR = "staged"
SCHEMA = "rmtp-checkpoint/1"


def checkpoint_root(out_dir: Path) -> Path:
    """``runs/x.checkpoint`` for the output folder ``runs/x``."""
    return out_dir.with_name(out_dir.name + SUFFIX)


@dataclass
class RunProgress:
    """Where a run stands between two steps (or inside a fine-tune step, with ``train``)."""

    next_step: int
    reports: list[dict[str, Any]] = field(default_factory=list)
    pruned_layers: list[str] = field(default_factory=list)
    dense_top1: float | None = None
    extras: list[str] = field(default_factory=list)
    train: TrainState | None = None


@dataclass
class Checkpoint:
    """The last checkpoint of a run, read back: its progress and the folder its model is in."""

    progress: RunProgress
    model_dir: Path
    recipe: dict[str, Any]
    data: dict[str, Any] | None = None  # None: written before rmtp recorded the data's identity


def describe_position(checkpoint: Checkpoint) -> str:
    """Where the checkpointed run stands, for the lines that name it (``step 2 of 3 (finetune),
    epoch 1 of 2, after batch 12``): hours of work are easier to keep, or let go, when seen.
    Read from the checkpoint's own recipe (a resume has checked it equal to the current one)."""
    steps = checkpoint.recipe["steps"]
    index, train = checkpoint.progress.next_step, checkpoint.progress.train
    step = steps[index] if isinstance(steps[index], dict) else {}
    text = f"step {index + 1} of {len(steps)} ({_saved_step_label(step)})"
    if train is None:
        return f"{text}, from its start"
    finetune = step.get("finetune")
    epochs = finetune.get("epochs") if isinstance(finetune, dict) else None
    text += f", epoch {train.epoch}" + (f" of {epochs}" if isinstance(epochs, int) else "")
    return f"{text}, after batch {train.batches_done}" if train.batches_done else f"{text}, from its first batch"


def _saved_step_label(step: dict[str, Any]) -> str:
    """:func:`rmtp.run.recipe.step_label` of a step as a saved, resolved recipe holds it."""
    if step.get("name"):
        return str(step["name"])
    if "prune" in step:
        return str(step["prune"])
    return next((kind for kind in ("finetune", "reconstruct") if kind in step), "evaluate")


class Checkpointer:
    """Writes the checkpoints of one run (rank 0 writes the model and ``run.pt``; every rank its
    own training state under torchrun)."""

    def __init__(self, out_dir: Path, *, spec: ModelSpec, arch: Architecture, baseline: ModelSpec,
                 recipe: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        self.root = checkpoint_root(out_dir)
        self.spec, self.arch, self.baseline, self.recipe, self.data = spec, arch, baseline, recipe, data
        latest = _read_latest(self.root)
        self.generation = latest["generation"] if latest else 0
        self.model_generation = latest["model_generation"] if latest else None

    @property
    def staging(self) -> Path:
        """Where prune steps' extras wait to be published, kept across a kill."""
        return self.root / STAGED_DIR

    def write(self, model: nn.Module, progress: RunProgress, *, model_changed: bool = True) -> None:
        """Write a new generation (collective under torchrun: every rank calls it)."""
        generation = self.generation + 1
        partial = self.root / f".gen-{generation:06d}.partial"
        if distributed.is_main_process():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        distributed.barrier()
        rank = distributed.rank()
        if progress.train is not None and rank > 0:
            torch.save(progress.train.to_payload(), partial / f"train-rank{rank}.pt")
        if distributed.is_main_process():
            with_model = model_changed or self.model_generation is None
            if with_model:
                saving.save(model, partial / MODEL_DIR, spec=self.spec, arch=self.arch, baseline=self.baseline)
            payload = {
                "schema": SCHEMA, "next_step": progress.next_step, "reports": progress.reports,
                "pruned_layers": sorted(progress.pruned_layers), "dense_top1": progress.dense_top1,
                "extras": list(progress.extras),
                "train": progress.train.to_payload() if progress.train is not None else None,
            }
            torch.save(payload, partial / RUN_FILE)
        distributed.barrier()
        if distributed.is_main_process():
            final = self.root / f"gen-{generation:06d}"
            # a kill between this rename and latest.json's leaves an unnamed generation of this
            # number behind: it is no checkpoint (latest.json names the previous one), so it goes
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            model_generation = generation if with_model else self.model_generation
            write_json_atomic(self.root / LATEST_FILE, {"schema": SCHEMA, "generation": generation,
                                                        "model_generation": model_generation,
                                                        "recipe": self.recipe, "data": self.data})
            keep = {f"gen-{generation:06d}", f"gen-{model_generation:06d}"}
            for old in self.root.glob("gen-*"):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
            self.model_generation = model_generation
        self.generation = generation
        distributed.barrier()

    def remove(self) -> None:
        """Drop the checkpoint folder: the run completed and its output is saved. ``latest.json`` goes
        first: a kill in the middle of the removal then leaves no checkpoint, only leftovers the next
        run's checkpoints replace, instead of one that names a generation already deleted."""
        if distributed.is_main_process():
            with contextlib.suppress(OSError):  # as rmtree's ignore_errors: the run's output is saved
                (self.root / LATEST_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)


def read_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The last checkpoint next to ``out_dir``, or ``None`` when there is none; a damaged or
    hand-edited one is a :class:`CheckpointError` naming the file and field."""
    root = checkpoint_root(out_dir)
    latest = _read_latest(root)
    if latest is None:
        return None
    generation = root / f"gen-{latest['generation']:06d}"
    model_dir = root / f"gen-{latest['model_generation']:06d}" / MODEL_DIR
    if not model_dir.is_dir():
        raise CheckpointError(f"{root / LATEST_FILE} names the model of generation {latest['model_generation']}, "
                              f"but {model_dir} is missing")
    run_file = generation / RUN_FILE
    payload = _load_torch(run_file)
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise CheckpointError(f"{run_file} is not an rmtp checkpoint ({SCHEMA})")
    progress = _progress(payload, run_file, steps=len(latest["recipe"]["steps"]))
    if progress.train is not None and distributed.rank() > 0:
        rank_file = generation / f"train-rank{distributed.rank()}.pt"
        progress.train = _train_state(_load_torch(rank_file), rank_file)
    return Checkpoint(progress=progress, model_dir=model_dir, recipe=latest["recipe"], data=latest.get("data"))


def _load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``, any failure (missing, damaged, a pickle that would run
    code) as one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line, not a traceback
        raise CheckpointError(f"cannot read {path}: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _progress(payload: dict[str, Any], path: Path, *, steps: int) -> RunProgress:
    """``run.pt``'s fields, each checked, as a :class:`RunProgress` (``steps``: the recipe's count)."""
    next_step = _field(payload, "next_step", path, lambda v: _is_int(v) and 0 <= v < steps,
                       f"a step index below the recipe's {steps} steps")
    reports = _field(payload, "reports", path, lambda v: isinstance(v, list) and len(v) == next_step,
                     f"a list of the {next_step} finished steps' reports")
    _check_reports(reports, path)
    progress = RunProgress(
        next_step=next_step, reports=reports,
        pruned_layers=list(_field(payload, "pruned_layers", path, _is_str_list, "a list of layer names")),
        dense_top1=_field(payload, "dense_top1", path, lambda v: v is None or _is_number(v), "a number or None"),
        extras=list(_field(payload, "extras", path, _is_str_list, "a list of file names")))
    train = _field(payload, "train", path, lambda v: v is None or isinstance(v, dict), "a training state or None")
    progress.train = _train_state(train, path) if train is not None else None
    return progress


def _check_reports(reports: list[Any], path: Path) -> None:
    from rmtp.reports.records import StepReport

    for index, report in enumerate(reports):
        try:
            StepReport.from_dict(report)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: reports[{index}] is not a step report ({exc.__class__.__name__}: "
                                  f"{exc}); the file was edited or damaged") from None


def _train_state(payload: Any, path: Path) -> TrainState:
    """A :class:`~rmtp.training.TrainState` from its payload, its counters checked."""
    from rmtp.training import TrainState

    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: the training state is {short_repr(payload, 60)}, not a dict; "
                              f"the file was edited or damaged")
    for key in ("epoch", "batches_done", "step"):
        _field(payload, key, path, lambda v: _is_int(v) and v >= 0, "a count (an int, 0 or more)", where="train.")
    try:
        return TrainState.from_payload(payload)
    except TypeError as exc:  # a field missing or unknown
        raise CheckpointError(f"{path}: the training state does not fit ({exc}); the file was edited or "
                              f"damaged") from None


def _field(mapping: dict[str, Any], key: str, path: Path, valid: Callable[[Any], bool], expected: str, *,
           where: str = "") -> Any:
    """``mapping[key]`` when ``valid``, else one line naming the file, the key and what it should be."""
    if key not in mapping:
        raise CheckpointError(f"{path}: no '{where}{key}' ({expected}); the file was edited or damaged")
    value = mapping[key]
    if not valid(value):
        raise CheckpointError(f"{path}: '{where}{key}' is {short_repr(value, 60)}, not {expected}; "
                              f"the file was edited or damaged")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key.path: old → new`` for every value that differs between two resolved recipes
    (``output.overwrite`` aside: it says how to write, not what to compute)."""
    changes = []
    for path, old, new in _diff(saved, current, ""):
        if path != "output.overwrite":
            changes.append(f"{path}: {_show(old)} → {_show(new)}")
    return changes


def _diff(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _diff(old.get(key, _MISSING), new.get(key, _MISSING), f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new)):
            yield from _diff(a, b, f"{path}[{index}]")
    elif old != new:
        yield path, old, new


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def _show(value: Any) -> str:
    from rmtp.errors import short_repr

    return repr(value) if isinstance(value, _Missing) else short_repr(value, 60)


def _read_latest(root: Path) -> dict[str, Any] | None:
    path = root / LATEST_FILE
    if not path.is_file():
        return None
    try:
        latest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(latest, dict) or latest.get("schema") != SCHEMA:
        raise CheckpointError(f"{path} is not an rmtp checkpoint ({SCHEMA})")
    generation = _field(latest, "generation", path, lambda v: _is_int(v) and v >= 1, "a generation number")
    _field(latest, "model_generation", path, lambda v: _is_int(v) and 1 <= v <= generation,
           f"a generation number up to {generation}")
    _field(latest, "recipe", path, lambda v: isinstance(v, dict) and isinstance(v.get("steps"), list)
           and len(v["steps"]) > 0, "a resolved recipe with steps")
    if latest.get("data") is not None:  # absent in checkpoints written before it was recorded
        _field(latest, "data", path, lambda v: isinstance(v, dict), "the data's identity")
    return latest
