"""Drawing a :class:`~rmtp.bench.BenchReport`: rich tables for the terminal, PNG plots for ``--plot``.

The tables and the JSON read the same report object. One table holds what does not depend on the
batch size (params, nonzeros, MACs, weights, top-1, kernels), then one table per batch size holds
the timed figures: median latency with its quartiles, throughput, the speed-up against the first
model (the median of per-round ratios, with their quartiles), peak memory and the first call's
time (the compile time with ``--compile``).

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work on
a headless machine and leave an interactive session's matplotlib alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rmtp.bench.schema import BatchRun, BenchError, BenchModel, BenchReport
from rmtp.measure import Spread
from rmtp.reports.render import human, stdout
from rmtp.storage.atomic import save_figure_atomic
from rmtp.storage.figure_folder import write_figure_folder

THROUGHPUT_PNG = "throughput.png"
ACCURACY_PNG = "accuracy_vs_macs.png"
LATENCY_PNG = "accuracy_vs_latency.png"


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"×{ratio:.2f}"


def _with_ratio(text: str, ratio: float | None, index: int) -> str:
    return text if index == 0 or ratio is None else f"{text} ({_times(ratio)})"


def _spread_ms(s: Spread) -> str:
    return f"{_ms(s.q1)}–{_ms(s.q3)}"


def setup_line(report: BenchReport) -> str:
    s = report.settings
    mode = ", ".join(x for x in ("compiled" if s.compile else "eager",
                                 "channels-last" if s.channels_last else "") if x)
    threads = f"{s.threads} thread" + ("s" if s.threads != 1 else "")
    return (f"{s.device} ({s.device_name}) · {s.dtype} · {mode} · {threads} · "
            f"{s.rounds} interleaved rounds")


def models_table(report: BenchReport) -> Table:
    """Batch-independent figures, each with its ratio to the baseline (the first row)."""
    evaluated = any(m.top1 is not None for m in report.models)
    table = Table(title=f"bench · {escape(setup_line(report))} · ratios (×) against #0", title_justify="left")
    columns = ["#", "model", "kernel", "params", "nonzeros", "MACs/image", "weights"]
    if evaluated:
        columns.append("top-1")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "kernel") else "right")
    for m in report.models:
        row = [str(m.index), escape(m.label), escape(m.kernel),
               _with_ratio(human(m.params), m.ratios.get("params"), m.index),
               _with_ratio(human(m.nonzeros), m.ratios.get("nonzeros"), m.index),
               _with_ratio(human(m.macs), m.ratios.get("macs"), m.index),
               _with_ratio(_bytes(m.weights_bytes), m.ratios.get("weights_bytes"), m.index)]
        if evaluated:
            top1 = "–" if m.top1 is None else f"{m.top1:.2f}%"
            if m.index and m.top1_delta is not None:
                top1 += f" ({m.top1_delta:+.2f})"
            row.append(top1)
        table.add_row(*row)
    return table


def batch_table(report: BenchReport, run: BatchRun) -> Table:
    """Timed figures at one batch size: medians over rounds, quartiles, speed-up vs the baseline."""
    s = report.settings
    first = "compile s" if s.compile else "first call s"
    title = f"batch {run.batch}"
    if run.recompiles is not None:
        title += f" · recompiles after warm-up: {run.recompiles}"
    table = Table(title=title, title_justify="left")
    rss = any(r.peak_rss_bytes is not None for r in run.results)
    columns = ["#", "model", "latency ms", "IQR ms", "images/s", "speed-up", "speed-up IQR", "peak mem"]
    for column in columns + (["peak RSS"] if rss else []) + [first]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in run.results:
        base = r.model == 0
        table.add_row(
            str(r.model), escape(r.label), _ms(r.latency_ms.median), _spread_ms(r.latency_ms),
            _rate(r.throughput.median),
            "baseline" if base else _times(r.throughput_ratio.median),
            "–" if base else f"{r.throughput_ratio.q1:.2f}–{r.throughput_ratio.q3:.2f}",
            _with_ratio(_bytes(r.peak_mem_bytes), r.peak_mem_ratio, r.model),
            *([_bytes(r.peak_rss_bytes)] if rss else []),
            f"{r.first_call_s:.2f}",
        )
    return table


def render_bench(report: BenchReport, console: Console = stdout) -> None:
    console.print(models_table(report))
    for m in report.models:
        if m.source and m.source != m.label:
            console.print(f"  [dim]{m.index} {escape(m.label)}: {escape(m.source)}[/]")
        for note in m.notes:
            console.print(f"  [dim]{m.index} {escape(m.label)}: {escape(note)}[/]")
    if report.settings.eval is not None:
        ev = report.settings.eval
        images = report.models[0].eval_images
        console.print(f"  [dim]top-1 on {images} val images of {escape(ev.spec.name)} (seed {ev.seed}, "
                      f"from {escape(ev.source)}), in {report.settings.dtype}[/]")
    for run in report.batches:
        console.print(batch_table(report, run))
    console.print("  [dim]medians over rounds; speed-up = baseline latency / model latency, per round (paired)[/]")
    console.print(f"  [dim]peak mem = {escape(report.settings.memory_method or 'not measured here')}[/]")
    if report.settings.rss_method:
        console.print(f"  [dim]peak RSS = {escape(report.settings.rss_method)}[/]")
    for note in report.notes:
        console.print(f"  [yellow]{escape(note)}[/]")
    env = report.environment
    console.print(f"  [dim]torch {escape(str(env.get('torch')))}, timm {escape(str(env.get('timm')))}, "
                  f"{env.get('cpu_cores')} cores, load {env.get('loadavg_1min_start')} → "
                  f"{env.get('loadavg_1min_end')}, {report.seconds:.1f} s[/]")


# --------------------------------------------------------------------------- plots


def check_plotting() -> None:
    """Fail before any work when ``--plot`` cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'rmtp[plot]'") from None


def write_plots(report: BenchReport, folder: Path) -> tuple[list[Path], list[str]]:
    """Write ``throughput.png`` (images/s vs batch size, IQR bars, one line per model) and, when
    top-1 was measured, ``accuracy_vs_macs.png`` (one point per model) and
    ``accuracy_vs_latency.png`` (top-1 vs measured latency, a panel per batch size, the Pareto
    front marked) into ``folder``.

    They are drawn aside and replace the plots rmtp drew in ``folder`` before
    (:mod:`rmtp.storage.figure_folder`): none of an earlier run (an accuracy plot a run without
    ``--eval`` does not draw) stays beside them, and a run killed while drawing leaves the previous
    set. Returns the files written and notes on what was not plotted.
    """
    check_plotting()
    notes = []
    measured_top1 = any(m.top1 is not None for m in report.models)
    if not measured_top1:
        notes.append(f"{ACCURACY_PNG} and {LATENCY_PNG} not written: accuracy needs --eval")

    def render(staging: Path) -> list[Path]:
        written = [_throughput_plot(report, staging / THROUGHPUT_PNG)]
        if measured_top1:
            written.append(_accuracy_plot(report, staging / ACCURACY_PNG))
            written.append(_latency_plot(report, staging / LATENCY_PNG))
        return written

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BenchError(f"--plot {folder}: not a folder (it names the folder the PNGs go into)")
    return write_figure_folder(folder, render), notes


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(cost, accuracy)`` points on the Pareto front, cheapest first: those that no
    other point dominates (as cheap or cheaper *and* as accurate or more, better in one of them).
    Two identical points are both on it."""
    def dominated(i: int) -> bool:
        cost, accuracy = points[i]
        return any(c <= cost and a >= accuracy and (c, a) != (cost, accuracy) for c, a in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: points[i])


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _throughput_plot(report: BenchReport, path: Path) -> Path:
    figure = _figure()
    ax = figure.add_subplot()
    batches = [run.batch for run in report.batches]
    for m in report.models:
        results = [run.results[m.index] for run in report.batches]
        medians = [r.throughput.median for r in results]
        errors = [[r.throughput.median - r.throughput.q1 for r in results],
                  [r.throughput.q3 - r.throughput.median for r in results]]
        ax.errorbar(batches, medians, yerr=errors, marker="o", capsize=3, label=_legend(m))
    if len(batches) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 10 else f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (median, IQR bars)")
    ax.set_title(f"throughput · {setup_line(report)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure_atomic(figure, path)
    return path


def _legend(m: BenchModel) -> str:
    return f"#{m.index} {m.label}" + (" · baseline" if m.index == 0 else "")


def _accuracy_plot(report: BenchReport, path: Path) -> Path:
    figure = _figure()
    ax = figure.add_subplot()
    for m in report.models:
        if m.top1 is None:
            continue
        ax.scatter([m.macs / 1e6], [m.top1], s=60, marker="*" if m.index == 0 else "o", label=_legend(m))
        ax.annotate(str(m.index), (m.macs / 1e6, m.top1), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"accuracy vs MACs · {report.settings.dtype}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure_atomic(figure, path)
    return path


def _latency_plot(report: BenchReport, path: Path) -> Path:
    """Top-1 against median latency (IQR bars), one panel per batch size: the trade-off a pruned
    model buys, judged by the clock rather than by MACs."""
    figure = _figure()
    runs = report.batches
    axes = figure.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    scored = [m for m in report.models if m.top1 is not None]
    for ax, run in zip(axes, runs):
        latency = [run.results[m.index].latency_ms for m in scored]
        for m, spread in zip(scored, latency):
            ax.errorbar([spread.median], [m.top1], xerr=[[spread.median - spread.q1], [spread.q3 - spread.median]],
                        marker="*" if m.index == 0 else "o", markersize=8, capsize=3, linestyle="none",
                        label=_legend(m))
            ax.annotate(str(m.index), (spread.median, m.top1), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
        front = pareto_front([(spread.median, m.top1) for m, spread in zip(scored, latency)])
        ax.plot([latency[i].median for i in front], [scored[i].top1 for i in front], "--", color="grey",
                zorder=0, label="Pareto front")
        ax.set_xlabel(f"latency at batch {run.batch} (ms, median, IQR bars)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[-1].legend(fontsize=8)
    figure.suptitle(f"accuracy vs measured latency · {setup_line(report)}", fontsize=9)
    save_figure_atomic(figure, path)
    return path
