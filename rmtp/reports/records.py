"""Reports: plain dataclasses that the terminal renderer and ``--json`` both read.

Nothing here prints; :mod:`rmtp.reports.render` draws these with rich, ``to_dict`` feeds JSON.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from rmtp.contract.pruner import LayerRow


@dataclass
class ModelStats:
    """Whole-model figures after a step (``top1`` only where the step evaluated)."""

    params: int
    nonzeros: int
    macs: int
    attention_macs: int = 0
    top1: float | None = None
    latency_ms: float | None = None
    dense_latency_ms: float | None = None
    #: ``measure.PairedSpeedup.to_dict()`` of an ``evaluate: {latency: true}`` step: spreads, the
    #: per-round speed-up ratio, settings, and a verdict (faster / slower / same / noisy).
    speedup: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepReport:
    index: int
    kind: str  # "prune", "finetune", "evaluate"
    name: str  # pruner name, or the step's own label
    rows: list[LayerRow]
    stats: ModelStats
    seconds: float
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch figures of a finetune step
    #: The model's figures before this step, where the caller measured them (``rmtp.prune`` does;
    #: a recipe's report has the dense model's instead).
    baseline: ModelStats | None = None
    #: A prune step that planned in time: its predicted speed-up over dense (``predicted_speedup``,
    #: ``target_speedup``, ``cost``) and, where timed after it, ``measured`` (PairedSpeedup.to_dict()).
    speed: dict[str, Any] | None = None
    #: A prune step with calibration data: its result's top-1 agreement with the dense model
    #: (``top1``, a share) and mean KL(dense ‖ pruned) (``kl``) on ``images`` calibration images,
    #: ``held_out`` from the pruner or not, ``where`` in words; ``budget``: an accuracy budget's
    #: search (the knob, what was tried, what was chosen).
    agreement: dict[str, Any] | None = None
    #: What a reader must not miss (a model that agrees with dense on fewer than half the images, an
    #: accuracy budget that cannot be had): drawn as warnings, not notes.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "index": self.index,
            "kind": self.kind,
            "name": self.name,
            "seconds": self.seconds,
            "stats": self.stats.to_dict(),
            "layers": [row.to_dict() for row in self.rows],
            "notes": list(self.notes),
            "history": list(self.history),
        }
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
        if self.speed is not None:
            out["speed"] = dict(self.speed)
        if self.agreement is not None:
            out["agreement"] = dict(self.agreement)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepReport:
        """Inverse of :meth:`to_dict` (a checkpoint's finished steps are read back with it)."""
        baseline = data.get("baseline")
        return cls(index=data["index"], kind=data["kind"], name=data["name"],
                   rows=[LayerRow.from_dict(row) for row in data["layers"]], stats=ModelStats(**data["stats"]),
                   seconds=data["seconds"], notes=list(data["notes"]), history=list(data["history"]),
                   baseline=ModelStats(**baseline) if baseline is not None else None, speed=data.get("speed"),
                   agreement=data.get("agreement"), warnings=list(data.get("warnings", [])))

    def __rich__(self) -> Any:
        """The step as ``rmtp prune`` draws it (table, notes, before → after), for ``rich.print``
        and notebooks."""
        from rmtp.reports.render import step_renderable

        return step_renderable(self)


@dataclass
class RunReport:
    recipe: str | None
    model: str
    arch: str
    seed: int
    device: str
    dense: ModelStats
    steps: list[StepReport] = field(default_factory=list)
    output_dir: str | None = None
    seconds: float = 0.0
    environment: dict[str, str] = field(default_factory=dict)
    #: What the images went through (``DataBundle.preprocessing``, resolved: the recipe's keys over
    #: the model's pretrained config) with its one-line ``description``.
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> ModelStats:
        return self.steps[-1].stats if self.steps else self.dense

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "rmtp-run-report/1",
            "recipe": self.recipe,
            "model": self.model,
            "arch": self.arch,
            "seed": self.seed,
            "device": self.device,
            "seconds": self.seconds,
            "output_dir": self.output_dir,
            "environment": dict(self.environment),
            "preprocessing": dict(self.preprocessing),
            "dense": self.dense.to_dict(),
            "final": self.final.to_dict(),
            "steps": [step.to_dict() for step in self.steps],
        }


def environment() -> dict[str, str]:
    """Versions and machine, so a report says where its numbers come from."""
    import os

    import timm
    import torch

    from rmtp import __version__

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        load = "n/a"
    return {
        "rmtp": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical CPUs",
        "load_average": load,
        "threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name on Linux), else what ``platform`` knows."""
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
