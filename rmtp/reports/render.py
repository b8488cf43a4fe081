"""Rendering reports and plugin listings with rich: the only place rmtp draws tables.

Consoles live here: reports go to stdout, diagnostics and progress to stderr. Colour follows the
terminal (rich turns it off when the stream is not a TTY, and honours ``NO_COLOR``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgressBar
from rich.table import Table
from rich.text import Text

from rmtp.run.progress import Progress

if TYPE_CHECKING:  # reports render themselves through this module (StepReport.__rich__)
    from rmtp.plugins import Plugins
    from rmtp.reports.records import ModelStats, RunReport, StepReport

# emoji=False: rich would turn the ":m:" of "n:m" (and any :name: in a layer, a note, a path) into
# an emoji code (nⓂ); rmtp prints names, never emoji.
stdout = Console(highlight=False, emoji=False)
if not stdout.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    stdout.width = max(stdout.width, 140)
stderr = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def markup(text: str) -> Text:
    """Console markup as a :class:`~rich.text.Text` with emoji codes left alone, for renderables that
    other consoles (a notebook's, ``rich.print``'s) draw too."""
    return Text.from_markup(text, emoji=False)


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


#: The per-layer columns in the order a table shows them; ``DETAIL`` stands for the pruner's own
#: figures (``LayerRow.detail``, in the order the pruner gives them).
DETAIL = "<detail>"
_COLUMN_ORDER = ("layer", "shape", "budget", "kept", "sparsity", "params", "nonzeros", DETAIL, "note")

#: Which columns a step table keeps when the terminal is too narrow for all of them, most important
#: first, per pruner kind; the last ones are hidden first. The pruner's detail figures come after
#: layer, shape, params, kept and sparsity (for token pruners, whose blocks keep their shape and
#: weights, right after kept), last ones first; budget, nonzeros and the free note go before them.
COLUMN_PRIORITY: dict[str, tuple[str, ...]] = {
    "weight": ("layer", "kept", "params", "shape", "sparsity", DETAIL, "budget", "nonzeros", "note"),
    "mask": ("layer", "kept", "sparsity", "params", "shape", DETAIL, "budget", "nonzeros", "note"),
    "token": ("layer", "kept", DETAIL, "params", "budget", "shape", "sparsity", "nonzeros", "note"),
}
_NO_WRAP = ("layer", "shape", "params")
_UNBOUNDED = 100_000


class StepTable:
    """The per-layer table of a prune step, with the columns that fit the width it is drawn at.

    A rich renderable: the columns are chosen when a console draws it (``rmtp prune``, a notebook's
    ``StepReport.__rich__``), so that no row wraps. Columns are hidden least important first
    (:data:`COLUMN_PRIORITY`, by the pruner's kind) until the table's natural width fits; a caption
    names the hidden ones. ``wide`` shows every column whatever the width (``rmtp prune --wide``).
    Every figure stays in the report's JSON either way.
    """

    def __init__(self, step: StepReport, *, wide: bool = False):
        self.step = step
        self.wide = wide
        detail_keys: list[str] = []
        for row in step.rows:
            detail_keys.extend(k for k in row.detail if k not in detail_keys)
        self.detail_keys = detail_keys
        notes = ["note"] if any(row.note for row in step.rows) else []
        self.columns = [c for c in _COLUMN_ORDER if c not in (DETAIL, "note")]
        self.columns[self.columns.index("nonzeros") + 1:] = [*detail_keys, *notes]

    def drop_order(self) -> list[str]:
        """The columns in the order they are hidden when space runs out (least important first)."""
        priority = COLUMN_PRIORITY.get(self._kind(), COLUMN_PRIORITY["weight"])
        ranked: list[str] = []
        for name in priority:
            ranked.extend(self.detail_keys if name == DETAIL else [name])
        ranked = [c for c in ranked if c in self.columns]
        return [c for c in reversed(ranked) if c != "layer"]

    def fit(self, console: Console, width: int) -> tuple[list[str], list[str]]:
        """(shown, hidden) columns for ``width``: all of them when ``wide`` or when they fit."""
        shown = list(self.columns)
        if self.wide:
            return shown, []
        hidden: list[str] = []
        unbounded = console.options.update_width(_UNBOUNDED)  # a measurement is capped at the width given
        for column in self.drop_order():
            if self.natural_width(console, shown, unbounded) <= width:
                break
            shown.remove(column)
            hidden.append(column)
        return shown, [c for c in self.columns if c in hidden]

    def natural_width(self, console: Console, shown: list[str], options: ConsoleOptions | None = None) -> int:
        """The width of the table with the ``shown`` columns when no cell wraps."""
        options = options or console.options.update_width(_UNBOUNDED)
        return Measurement.get(console, options, self.table(shown)).maximum

    def table(self, shown: list[str], caption: str | None = None) -> Table:
        """The table with only the ``shown`` columns."""
        step = self.step
        table = Table(title=Text(f"step {step.index} · {step.kind} · {step.name}"), title_justify="left",
                      caption=Text(caption, style="dim") if caption else None, caption_justify="left")
        for column in shown:
            table.add_column(Text(column), justify="left" if column in ("layer", "shape", "note") else "right",
                             no_wrap=column in _NO_WRAP)
        for row in step.rows:
            cells = self._cells(row)
            table.add_row(*(Text(cells[c]) for c in shown))
        return table

    @staticmethod
    def caption(hidden: list[str], width: int) -> str:
        """One line naming the hidden columns (as many as ``width`` allows) and how to see them."""
        tail = " (--wide or --json shows them)"
        for count in range(len(hidden), 0, -1):
            names = ", ".join(hidden[:count]) + (f" +{len(hidden) - count} more" if count < len(hidden) else "")
            text = f"hidden: {names}{tail}"
            if cell_len(text) <= width:
                return text
        return f"{len(hidden)} columns hidden (--wide, --json)"

    def _kind(self) -> str:
        from rmtp.errors import RmtpError
        from rmtp.plugins import get_plugins

        try:  # the pruner's kind (weight, mask, token); a report can outlive the plugin that made it
            return get_plugins().pruners.get(self.step.name).kind
        except RmtpError:  # a step under its own name, or a pruner no longer installed
            return "token" if any("tokens_in" in row.detail for row in self.step.rows) else "weight"

    def _cells(self, row: Any) -> dict[str, str]:
        shape = _shape(row.shape_before)
        if row.shape_after != row.shape_before:
            shape += f" → {_shape(row.shape_after)}"
        kept = str(row.kept_rank) if row.kept_rank is not None else _fraction(row.kept_fraction)
        if row.skipped:  # said where it is always shown: the reason itself is in the note column and notes
            kept = "skipped"
        cells = {"layer": row.layer, "shape": shape, "budget": _fraction(row.budget), "kept": kept,
                 "sparsity": _fraction(row.sparsity), "params": _change(row.params_before, row.params_after),
                 "nonzeros": human(row.nonzeros_after), "note": row.note}
        cells.update({k: _plain(row.detail.get(k)) for k in self.detail_keys})
        return cells

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._fitted(console, options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self._fitted(console, options.max_width))

    def _fitted(self, console: Console, width: int) -> Table:
        shown, hidden = self.fit(console, width)
        if not hidden:
            return self.table(shown)
        return self.table(shown, self.caption(hidden, self.natural_width(console, shown)))


def step_table(step: StepReport, *, wide: bool = False) -> StepTable:
    """Per-layer rows of a prune step: shape, budget, kept, sparsity, params, nonzeros and the
    pruner's detail figures, as many as fit the width it is drawn at (all with ``wide``)."""
    return StepTable(step, wide=wide)


def _change(before: int, after: int) -> str:
    return human(before) if before == after else f"{human(before)} → {human(after)}"


def _plain(value: Any) -> str:
    """A detail figure as table text: ``–`` for none, floats to 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(report: RunReport) -> Table:
    """One line per step next to the dense model: params, nonzeros, MACs, top-1, latency, time."""
    table = Table(title=f"summary · {escape(report.model)} ({escape(report.arch)}) · seed {report.seed} · "
                        f"{report.device}",
                  title_justify="left")
    for column in ("stage", "params", "nonzeros", "MACs", "attn MACs", "top-1", "latency", "seconds"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    table.add_row("dense", *_stats_cells(_dense_with_latency(report), report.dense), "–")
    for step in report.steps:
        label = step.kind if step.name == step.kind else f"{step.kind} {step.name}"
        label += f" ({_skipped_count(step)})" if _skipped_count(step) else ""
        label += " (warning: see its report)" if step.warnings else ""
        table.add_row(f"{step.index} {escape(label)}", *_stats_cells(step.stats, report.dense),
                      f"{step.seconds:.1f}")
    return table


def _dense_with_latency(report: RunReport) -> ModelStats:
    """The dense model's figures with the latency the last timed step measured for it (the dense
    model is timed only next to a pruned one, in an ``evaluate: {latency: true}`` step)."""
    timed = [step.stats.dense_latency_ms for step in report.steps if step.stats.dense_latency_ms is not None]
    return replace(report.dense, latency_ms=timed[-1]) if timed else report.dense


def _skipped_count(step: StepReport) -> str:
    """'nothing pruned' / 'k of n skipped' for a prune step that left layers as they were, else ''."""
    skipped = sum(1 for row in step.rows if row.skipped)
    if not skipped:
        return ""
    return "nothing pruned" if skipped == len(step.rows) else f"{skipped} of {len(step.rows)} layers skipped"


def headline(report: RunReport) -> str:
    """One line of what the run achieved against the dense model: params, MACs, top-1 (the last
    evaluated), and the last measured speed-up where its verdict allows a figure. '' without steps."""
    if not report.steps:
        return ""
    dense, final = report.dense, report.final
    parts = [f"params {human(dense.params)} → {human(final.params)}{_times(final.params, dense.params)}",
             f"MACs {human(dense.macs)} → {human(final.macs)}{_times(final.macs, dense.macs)}"]
    if final.nonzeros != final.params:
        parts.insert(1, f"nonzeros {human(final.nonzeros)}{_times(final.nonzeros, dense.nonzeros)}")
    top1 = next((step.stats.top1 for step in reversed(report.steps) if step.stats.top1 is not None), None)
    if top1 is not None and dense.top1 is not None:
        parts.append(f"top-1 {dense.top1:.2f}% → {top1:.2f}% ({top1 - dense.top1:+.2f})")
    speedup = next((step.stats.speedup for step in reversed(report.steps) if step.stats.speedup), None)
    if speedup is not None:
        parts.append(_speed_phrase(speedup))
    return "result: " + ", ".join(parts)


def _times(value: int, reference: int) -> str:
    return f" (×{value / reference:.2f})" if reference and value != reference else ""


def _speed_phrase(speedup: dict[str, Any]) -> str:
    """A measured speed-up (``PairedSpeedup.to_dict()``) in a few words, a figure only where its
    verdict says it means something."""
    r, at = speedup["ratio"], f"at batch {speedup['batch']}"
    if speedup["verdict"] in ("faster", "slower"):
        return f"×{r['median']:.2f} [{r['q1']:.2f}–{r['q3']:.2f}] speed-up {at}"
    if speedup["verdict"] == "same":
        return f"not measurably faster {at}"
    return f"speed-up not measurable {at} (timings too noisy)"


def _stats_cells(stats: ModelStats, dense: ModelStats) -> list[str]:
    def ratio(value: int, reference: int) -> str:
        return human(value) if value == reference or not reference else f"{human(value)} ({value / reference:.0%})"

    top1 = "–" if stats.top1 is None else f"{stats.top1:.2f}%"
    latency = "–" if stats.latency_ms is None else f"{stats.latency_ms:.2f} ms"
    return [ratio(stats.params, dense.params), ratio(stats.nonzeros, dense.nonzeros), ratio(stats.macs, dense.macs),
            human(stats.attention_macs), top1, latency]


def step_renderable(step: StepReport, *, wide: bool = False) -> Group:
    """What :func:`render_step` prints, as one rich renderable: the per-layer table (prune; its
    columns fit the width it is drawn at, all of them with ``wide``), the epochs (finetune), the
    before → after figures when the step carries them, and its notes."""
    parts: list[Any] = []
    if step.rows:
        parts.append(step_table(step, wide=wide))
    elif step.kind == "finetune" and step.history:
        last = step.history[-1]
        if last.get("val_top1") is not None:
            scored = f"val top-1 {last['val_top1']:.2f}%"
        elif last.get("val_agreement") is not None:  # unlabeled data: no top-1 (rmtp.fidelity.unlabeled)
            scored = f"val agreement with dense {last['val_agreement']:.2f}%"
        else:
            scored = "no val score (unlabeled data without val images)"
        stopped = (f", stopped by {last['stopped']} after {last['steps']} optimizer step(s)"
                   if last.get("stopped") else "")
        parts.append(markup(f"[bold]step {step.index} · finetune[/] {len(step.history)} epoch(s), "
                            f"last loss {last['train_loss']:.4f}, {scored}{stopped}"))
    elif step.kind == "reconstruct" and step.history:
        parts.append(markup(f"[bold]step {step.index} · reconstruct[/] {len(step.history)} block(s), "
                            f"{sum(fit['steps'] for fit in step.history)} optimizer steps, params "
                            f"{human(step.stats.params)}"))
    elif step.kind == "evaluate":
        top1 = f"top-1 {step.stats.top1:.2f}%, " if step.stats.top1 is not None else ""  # unlabeled: none
        parts.append(markup(f"[bold]step {step.index} · evaluate[/] {top1}params "
                            f"{human(step.stats.params)}, MACs {human(step.stats.macs)}"))
    if step.baseline is not None:
        before, after = step.baseline, step.stats
        skipped = _skipped_count(step)
        parts.append(Text(f"params {_change(before.params, after.params)}, nonzeros "
                          f"{_change(before.nonzeros, after.nonzeros)}, MACs {_change(before.macs, after.macs)}"
                          + (f"; {skipped} (why: below)" if skipped else "")))
    if step.agreement is not None:
        parts.append(Text(agreement_line(step.agreement)))
    parts.extend(markup(f"  [dim]{escape(note)}[/]") for note in step.notes)
    parts.extend(markup(f"[bold yellow]warning:[/] {escape(warning)}") for warning in step.warnings)
    return Group(*parts)


def agreement_line(agreement: dict[str, Any]) -> str:
    """'agreement with dense: 93.8% top-1, KL 0.051, on 64 held-out calibration images (…)'."""
    return (f"agreement with dense: {agreement['top1']:.1%} top-1, KL {agreement['kl']:.3g}, on "
            f"{agreement['where']}")


def render_step(step: StepReport, console: Console = stdout, *, wide: bool = False) -> None:
    """Print a step's report; ``wide``: every table column, rows as long as they need (not cut to
    the terminal: a terminal wraps them, a file or pipe keeps one line per row)."""
    for part in step_renderable(step, wide=wide).renderables:
        if wide and isinstance(part, StepTable):
            width = console.width  # print(width=...) is capped at the console's: widen it for the table
            console.width = max(part.natural_width(console, part.columns), width)
            try:
                console.print(part.table(part.columns), crop=False)
            finally:
                console.width = width
        else:
            console.print(part)


def render_report(report: RunReport, console: Console = stdout) -> None:
    console.print(summary_table(report))
    if headline(report):
        console.print(markup(f"[bold]{escape(headline(report))}[/]"))
    if report.preprocessing.get("description"):
        console.print(f"[dim]data: {escape(report.preprocessing['description'])}[/]")
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
        # Plain text, not markup: a label like "n:m: masks" is printed as it is (markup would read
        # ":m:" as an emoji code, whatever the console's emoji setting).
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False)]
        # Off where nothing is interactive (a pipe, a file, CI): a transient bar shows nothing there,
        # and rich would still end each one with an empty line.
        with RichProgressBar(*columns, console=self.console, transient=True,
                             disable=not self.console.is_interactive) as bar:
            task_id = bar.add_task(description, total=total, info="")

            def advance(advance: int = 1, **fields: Any) -> None:
                info = "  ".join(f"{k} {v}" for k, v in fields.items())
                bar.update(task_id, advance=advance, **({"info": info} if fields else {}))

            yield advance

    def note(self, message: str) -> None:
        """The line on the progress console (stderr), kept: it says what the run is doing."""
        self.console.print(message, markup=False, highlight=False)
