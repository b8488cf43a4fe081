"""Rendering reports and plugin listings with rich: the only place rmtp draws tables.

Consoles live here: reports go to stdout, diagnostics and progress to stderr. Colour follows the
terminal (rich turns it off when the stream is not a TTY, and honours ``NO_COLOR``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgressBar
from rich.table import Table

from rmtp.plugins import Plugins
from rmtp.progress import Progress

if TYPE_CHECKING:  # reports render themselves through this module (StepReport.__rich__)
    from rmtp.report import ModelStats, RunReport, StepReport

stdout = Console(highlight=False)
if not stdout.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    stdout.width = max(stdout.width, 140)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def human(n: float | int | None) -> str:
    """1234567 → '1.23M': counts people can compare at a glance."""
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.2f}"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "–"


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def step_table(step: StepReport) -> Table:
    """Per-layer rows of a prune step: shape, budget, kept, sparsity, params and nonzeros."""
    detail_keys: list[str] = []
    for row in step.rows:
        detail_keys.extend(k for k in row.detail if k not in detail_keys)
    table = Table(title=f"step {step.index} · {escape(step.kind)} · {escape(step.name)}", title_justify="left")
    notes = ["note"] if any(row.note for row in step.rows) else []
    for column in ("layer", "shape", "budget", "kept", "sparsity", "params", "nonzeros", *detail_keys, *notes):
        table.add_column(column, justify="left" if column in ("layer", "shape") else "right",
                         no_wrap=column in ("layer", "shape", "params"))
    for row in step.rows:
        shape = _shape(row.shape_before)
        if row.shape_after != row.shape_before:
            shape += f" → {_shape(row.shape_after)}"
        kept = str(row.kept_rank) if row.kept_rank is not None else _fraction(row.kept_fraction)
        table.add_row(
            escape(row.layer), shape, _fraction(row.budget), kept, _fraction(row.sparsity),
            _change(row.params_before, row.params_after), human(row.nonzeros_after),
            *(_cell(row.detail.get(k)) for k in detail_keys),
            *([escape(row.note)] if notes else []),
        )
    return table


def _change(before: int, after: int) -> str:
    return human(before) if before == after else f"{human(before)} → {human(after)}"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def summary_table(report: RunReport) -> Table:
    """One line per step next to the dense model: params, nonzeros, MACs, top-1, latency, time."""
    table = Table(title=f"summary · {escape(report.model)} ({escape(report.arch)}) · seed {report.seed} · {report.device}",
                  title_justify="left")
    for column in ("stage", "params", "nonzeros", "MACs", "attn MACs", "top-1", "latency", "seconds"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    table.add_row("dense", *_stats_cells(report.dense, report.dense), "–")
    for step in report.steps:
        label = step.kind if step.name == step.kind else f"{step.kind} {step.name}"
        table.add_row(f"{step.index} {escape(label)}", *_stats_cells(step.stats, report.dense),
                      f"{step.seconds:.1f}")
    return table


def _stats_cells(stats: ModelStats, dense: ModelStats) -> list[str]:
    def ratio(value: int, reference: int) -> str:
        return human(value) if value == reference or not reference else f"{human(value)} ({value / reference:.0%})"

    top1 = "–" if stats.top1 is None else f"{stats.top1:.2f}%"
    latency = "–" if stats.latency_ms is None else f"{stats.latency_ms:.2f} ms"
    return [ratio(stats.params, dense.params), ratio(stats.nonzeros, dense.nonzeros), ratio(stats.macs, dense.macs),
            human(stats.attention_macs), top1, latency]


def step_renderable(step: StepReport) -> Group:
    """What :func:`render_step` prints, as one rich renderable: the per-layer table (prune), the
    epochs (finetune), the before → after figures when the step carries them, and its notes."""
    parts: list[Any] = []
    if step.rows:
        parts.append(step_table(step))
    elif step.kind == "finetune" and step.history:
        last = step.history[-1]
        parts.append(f"[bold]step {step.index} · finetune[/] {len(step.history)} epoch(s), "
                     f"last loss {last['train_loss']:.4f}, val top-1 {last['val_top1']:.2f}%")
    elif step.kind == "evaluate" and step.stats.top1 is not None:
        parts.append(f"[bold]step {step.index} · evaluate[/] top-1 {step.stats.top1:.2f}%, params "
                     f"{human(step.stats.params)}, MACs {human(step.stats.macs)}")
    if step.baseline is not None:
        before, after = step.baseline, step.stats
        parts.append(f"params {_change(before.params, after.params)}, nonzeros "
                     f"{_change(before.nonzeros, after.nonzeros)}, MACs {_change(before.macs, after.macs)}")
    parts.extend(f"  [dim]{escape(note)}[/]" for note in step.notes)
    return Group(*parts)


def render_step(step: StepReport, console: Console = stdout) -> None:
    for part in step_renderable(step).renderables:
        console.print(part)


def render_report(report: RunReport, console: Console = stdout) -> None:
    console.print(summary_table(report))
    if report.output_dir:
        console.print(f"saved to [bold]{escape(report.output_dir)}[/] in {report.seconds:.1f} s")


def plugins_table(plugins: Plugins) -> Table:
    """Every registered pruner and architecture with its description and params."""
    table = Table(title="rmtp plugins", title_justify="left")
    for column in ("kind", "name", "description", "params"):
        table.add_column(column)
    for name, cls in plugins.pruners.items():
        params = ", ".join(
            f"{field}={info.default!r}" if not info.is_required() else f"{field} (required)"
            for field, info in cls.Params.model_fields.items()
        )
        table.add_row(f"pruner ({cls.kind})", name, escape(cls.description), escape(params) or "–")
    for name, cls in plugins.architectures.items():
        table.add_row("architecture", name, escape(cls.description), escape(", ".join(cls.model_patterns)))
    return table


class RichProgress(Progress):
    """Progress bars on stderr (transient: they vanish once done, the report stays)."""

    def __init__(self, console: Console = stderr):
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with RichProgressBar(*columns, console=self.console, transient=True) as bar:
            task_id = bar.add_task(escape(description), total=total, info="")

            def advance(advance: int = 1, **fields: Any) -> None:
                info = "  ".join(f"{k} {v}" for k, v in fields.items())
                bar.update(task_id, advance=advance, **({"info": info} if fields else {}))

            yield advance
