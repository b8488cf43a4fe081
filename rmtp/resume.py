"""Checkpoints of a recipe run, next to its output folder, and resuming a killed run from the last one.

While a run with ``output.dir: runs/x`` goes, ``runs/x.checkpoint/`` holds its last checkpoint:
after every finished step, at each fine-tune epoch's end and every ``finetune.checkpoint_every``
optimizer steps. A checkpoint is one *generation* folder ``gen-NNNNNN/`` with

* ``run.pt``: which steps are done, their reports, the pruned layers, the dense top-1, the names
  of the prune steps' staged extras, and, in the middle of a fine-tune, rank 0's
  :class:`~rmtp.training.TrainState` (``train-rank<r>.pt`` for the other torchrun ranks);
* ``model/``: the model as :func:`rmtp.saving.save` writes it (structure and weights), only when
  the model changed since the last generation (``latest.json`` names the generation whose model
  is current), so an ``evaluate`` step does not rewrite a large model.

A generation is written under a temporary name and renamed into place, then ``latest.json`` is
replaced atomically: a kill at any moment leaves the previous checkpoint or the complete new one.
Everything is read back with ``torch.load(weights_only=True)`` and :func:`rmtp.saving.load`, like
any untrusted file. The folder is removed when the run completes. ``rmtp prune recipe.yaml
--resume`` continues from it without redoing finished steps (the pruned structure is rebuilt from
``model/``, not re-pruned) and refuses, naming the keys, a recipe that changed since.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmtp import distributed, saving
from rmtp.atomic import write_json_atomic
from rmtp.errors import CheckpointError

if TYPE_CHECKING:
    from rmtp.architecture import Architecture, ModelSpec
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


class Checkpointer:
    """Writes the checkpoints of one run (rank 0 writes the model and ``run.pt``; every rank its
    own training state under torchrun)."""

    def __init__(self, out_dir: Path, *, spec: ModelSpec, arch: Architecture, baseline: ModelSpec,
                 recipe: dict[str, Any]) -> None:
        self.root = checkpoint_root(out_dir)
        self.spec, self.arch, self.baseline, self.recipe = spec, arch, baseline, recipe
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
            partial.rename(final)
            model_generation = generation if with_model else self.model_generation
            write_json_atomic(self.root / LATEST_FILE, {"schema": SCHEMA, "generation": generation,
                                                        "model_generation": model_generation,
                                                        "recipe": self.recipe})
            keep = {f"gen-{generation:06d}", f"gen-{model_generation:06d}"}
            for old in self.root.glob("gen-*"):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
            self.model_generation = model_generation
        self.generation = generation
        distributed.barrier()

    def remove(self) -> None:
        """Drop the checkpoint folder: the run completed and its output is saved."""
        if distributed.is_main_process():
            shutil.rmtree(self.root, ignore_errors=True)


def read_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The last checkpoint next to ``out_dir``, or ``None`` when there is none."""
    root = checkpoint_root(out_dir)
    latest = _read_latest(root)
    if latest is None:
        return None
    from rmtp.training import TrainState

    generation = root / f"gen-{latest['generation']:06d}"
    model_dir = root / f"gen-{latest['model_generation']:06d}" / MODEL_DIR
    try:
        payload = torch.load(generation / RUN_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line, not a traceback
        raise CheckpointError(f"--resume: cannot read {generation / RUN_FILE}: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise CheckpointError(f"--resume: {generation / RUN_FILE} is not an rmtp checkpoint ({SCHEMA})")
    train = payload["train"]
    rank = distributed.rank()
    if train is not None and rank > 0:
        train = torch.load(generation / f"train-rank{rank}.pt", map_location="cpu", weights_only=True)
    progress = RunProgress(next_step=payload["next_step"], reports=payload["reports"],
                           pruned_layers=list(payload["pruned_layers"]), dense_top1=payload["dense_top1"],
                           extras=list(payload["extras"]),
                           train=TrainState.from_payload(train) if train is not None else None)
    return Checkpoint(progress=progress, model_dir=model_dir, recipe=latest["recipe"])


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
        raise CheckpointError(f"--resume: cannot read {path}: {exc}") from None
    if not isinstance(latest, dict) or latest.get("schema") != SCHEMA:
        raise CheckpointError(f"--resume: {path} is not an rmtp checkpoint ({SCHEMA})")
    return latest
