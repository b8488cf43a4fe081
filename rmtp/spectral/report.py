"""Rendering a :class:`~rmtp.spectral.analysis.SpectrumReport`: rich table, summary, CSV and plots.

The table, the CSV and the JSON (``SpectrumReport.to_dict``) are views of the same object, so
they always agree. Plots use matplotlib's Agg canvas directly (no pyplot, no global backend
switch), one PNG per analysed matrix plus ``overview.png``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rmtp.errors import RmtpError
from rmtp.reports.render import human, stdout
from rmtp.run.progress import NULL_PROGRESS, Progress
from rmtp.spectral.analysis import SpectrumReport
from rmtp.spectral.layers import LayerSpectrum
from rmtp.spectral.mp import mp_pdf
from rmtp.storage.atomic import save_figure_atomic, write_text_atomic
from rmtp.storage.figure_folder import write_figure_folder

CSV_COLUMNS = (
    "name", "module", "role", "optional", "rows_start", "rows_stop", "M", "N", "gamma", "sigma", "sigma2",
    "lambda_plus", "s_plus", "rank", "min_dim", "rank_fraction", "spikes", "top_spike", "ks", "bulk_is_mp",
    "params", "params_kept_by_split", "skipped",
)


def _shape(layer: LayerSpectrum) -> str:
    shape = layer.shape if layer.shape is not None else layer.weight_shape
    return "×".join(map(str, shape)) if shape else "–"


def _g(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def _settings_line(report: SpectrumReport) -> str:
    s = report.settings
    tw = "none (asymptotic edge)" if s["tw_confidence"] is None else f"TW1 at {s['tw_confidence']:g}"
    line = f"α {s['alpha']:g} · edge margin {tw} · min_dim {s['min_dim']}"
    if any(layer.role == "qkv" for layer in report.layers):
        line += f" · qkv {'split into q, k, v' if s['split_qkv'] else 'as one matrix'}"
    return line


def _model_line(report: SpectrumReport) -> str:
    if report.spec is None:
        return f"state dict {report.source} (no architecture: layers by key)"
    if report.kind == "timm":
        weights = "pretrained" if report.spec.pretrained else "random init"
        return f"{report.spec.name} ({report.arch}, {weights})"
    return f"{report.spec.name} ({report.arch}) from {report.source}"


def spectrum_table(report: SpectrumReport) -> Table:
    """One row per analysed matrix, in forward order (skipped ones are listed under the table)."""
    table = Table(title=f"spectrum · {escape(_model_line(report))}", title_justify="left",
                  caption=escape(_settings_line(report)), caption_justify="left")
    for column in ("layer", "shape", "γ", "σ", "λ₊", "k / min(M,N)", "top spike", "KS", "bulk", "split keeps"):
        table.add_column(column, justify="left" if column in ("layer", "shape") else "right",
                         no_wrap=column in ("layer", "shape", "k / min(M,N)"))
    for layer in report.analysed:
        fit = layer.fit
        assert fit is not None
        top = f"{fit.spikes[0] / fit.lambda_plus:.2f}×λ₊" if fit.rank else "–"
        kept = layer.params_kept_by_split
        table.add_row(
            escape(layer.name), _shape(layer), f"{fit.gamma:.3g}", _g(fit.sigma), _g(fit.lambda_plus),
            f"{fit.rank} / {fit.min_dim} ({fit.rank_fraction:.1%})", top, f"{fit.ks:.3f}",
            "MP" if fit.bulk_is_mp else "[yellow]not MP[/]", f"{human(kept)} ({kept / layer.params:.0%})",
        )
    return table


def skipped_lines(report: SpectrumReport) -> list[str]:
    lines = []
    for layer in report.skipped:
        shape = f" ({_shape(layer)})" if layer.shape is not None or layer.weight_shape else ""
        lines.append(f"skipped {escape(layer.name)}{shape}: {escape(layer.skipped or '')}")
    return lines


def summary_table(report: SpectrumReport) -> Table:
    summary = report.summary()
    table = Table(title="summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    skipped = report.skipped
    reasons: dict[str, int] = {}
    for layer in skipped:
        key = (layer.skipped or "").split(":")[0].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    table.add_row("matrices", f"{summary['analysed']} analysed, {summary['skipped']} skipped"
                  + (f" ({', '.join(f'{n} {escape(k)}' for k, n in reasons.items())})" if reasons else ""))
    if summary["analysed"]:
        table.add_row("params in analysed matrices", human(summary["params_analysed"]))
        table.add_row("a full MP split would keep",
                      f"{human(summary['params_kept_by_split'])} ({summary['kept_fraction']:.1%})")
        table.add_row("signal rank k / min(M,N)",
                      f"median {summary['rank_fraction_median']:.1%}, max {summary['rank_fraction_max']:.1%}")
        not_mp = summary["not_mp"]
        shown = ", ".join(not_mp[:6]) + (f", … ({len(not_mp)})" if len(not_mp) > 6 else "")
        table.add_row("bulk not MP-like", f"{len(not_mp)}" + (f": {escape(shown)}" if not_mp else ""))
    table.add_row("analysis time", f"{report.seconds:.2f} s")
    return table


def render_spectrum(report: SpectrumReport, console: Console = stdout, *, layers: bool = True) -> None:
    for note in report.notes:
        console.print(f"[dim]{escape(note)}[/]")
    if layers:
        if report.analysed:
            console.print(spectrum_table(report))
        for line in skipped_lines(report):
            console.print(f"[dim]{line}[/]")
    console.print(summary_table(report))


def csv_rows(report: SpectrumReport) -> list[dict[str, Any]]:
    rows = []
    for layer in report.layers:
        fit = layer.fit
        row: dict[str, Any] = {
            "name": layer.name, "module": layer.module, "role": layer.role, "optional": layer.optional,
            "rows_start": layer.rows[0] if layer.rows else "", "rows_stop": layer.rows[1] if layer.rows else "",
            "M": layer.shape[0] if layer.shape else "", "N": layer.shape[1] if layer.shape else "",
            "params": layer.params, "params_kept_by_split": layer.params_kept_by_split, "skipped": layer.skipped or "",
        }
        if fit is not None:
            row.update(gamma=fit.gamma, sigma=fit.sigma, sigma2=fit.sigma2, lambda_plus=fit.lambda_plus,
                       s_plus=fit.s_plus, rank=fit.rank, min_dim=fit.min_dim, rank_fraction=fit.rank_fraction,
                       spikes=fit.rank, top_spike=float(fit.spikes[0]) if fit.rank else "", ks=fit.ks,
                       bulk_is_mp=fit.bulk_is_mp)
        rows.append({column: row.get(column, "") for column in CSV_COLUMNS})
    return rows


def write_csv_atomic(report: SpectrumReport, path: Path) -> None:
    """The table as CSV, written to a temporary file and renamed, so no reader sees half of it."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    write_text_atomic(path, buffer.getvalue())


def _file_stem(index: int, name: str) -> str:
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RmtpError("--plot needs matplotlib: pip install 'rmtp[plot]'") from None
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def write_plots(report: SpectrumReport, folder: Path, progress: Progress = NULL_PROGRESS) -> list[Path]:
    """Per analysed matrix an ESD histogram with the fitted MP density and the edge; plus
    ``overview.png``. They are drawn aside and replace the figures rmtp drew in ``folder`` before
    (:mod:`rmtp.storage.figure_folder`): none of an earlier, larger run stays, a run killed while
    drawing leaves the previous set, and a file of the user's there is never touched."""
    analysed = [(index, layer) for index, layer in enumerate(report.layers) if layer.fit is not None]

    def render(staging: Path) -> list[Path]:
        written = []
        with progress.task("plots", total=len(analysed) + 1) as advance:
            for index, layer in analysed:
                path = staging / f"{_file_stem(index, layer.name)}.png"
                _plot_layer(layer, path)
                written.append(path)
                advance(layer=layer.name)
            path = staging / "overview.png"
            _plot_overview(report, path)
            written.append(path)
            advance()
        return written

    return write_figure_folder(folder, render)


def _plot_layer(layer: LayerSpectrum, path: Path) -> None:
    fit = layer.fit
    assert fit is not None and layer.singular_values is not None and layer.shape is not None
    p, n = min(layer.shape), max(layer.shape)
    lam = np.sort(np.asarray(layer.singular_values, dtype=np.float64)) ** 2 / n
    edge0 = fit.sigma2 * (1 + math.sqrt(fit.gamma)) ** 2
    top = float(lam[-1]) if lam.size else fit.lambda_plus
    right = top * 1.05 if top <= 3 * fit.lambda_plus else 1.6 * fit.lambda_plus  # far spikes: say so instead
    shown = lam[lam <= right]
    figure = _figure()
    ax = figure.add_subplot()
    bins = np.linspace(0.0, right, int(np.clip(p / 3, 15, 80)) + 1)
    ax.hist(shown, bins=bins, weights=np.full(shown.size, 1.0 / (p * (bins[1] - bins[0]))),
            color="#7aa6d6", edgecolor="white", linewidth=0.3, label=f"eigenvalues λ = s²/{n}")
    # The fitted bulk law: s²/(n-k) ~ MP((p-k)/(n-k), σ²) for the p-k bulk values, mass (p-k)/p.
    k = fit.rank
    scale = (n - k) / n
    x = np.linspace(0.0, min(right, fit.lambda_plus * 1.02), 800)
    if p - k > 0:
        density = mp_pdf(x / scale, (p - k) / (n - k), fit.sigma2) / scale * (p - k) / p
        ax.plot(x, density, color="#c0392b", linewidth=1.5, label=f"fitted MP, σ = {fit.sigma:.4g}")
    ax.axvline(fit.lambda_plus, color="#c0392b", linestyle="--", linewidth=1, label=f"edge λ₊ = {fit.lambda_plus:.4g}")
    if not math.isclose(edge0, fit.lambda_plus):
        ax.axvline(edge0, color="grey", linestyle=":", linewidth=1,
                   label="full-size edge σ²(1+√γ)² (no spikes removed)")
    beyond = int(np.count_nonzero(lam > right))
    if beyond:
        ax.annotate(f"{beyond} spike(s) beyond, up to λ = {top:.4g} →", xy=(0.98, 0.92), xycoords="axes fraction",
                    ha="right", fontsize=8)
    ax.set_xlabel("λ")
    ax.set_ylabel("density")
    flag = "" if fit.bulk_is_mp else " · bulk NOT MP-like"
    ax.set_title(f"{layer.name}  {layer.shape[0]}×{layer.shape[1]}  γ={fit.gamma:.3g}\n"
                 f"k = {k} / {p}  KS = {fit.ks:.3f}{flag}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right" if not beyond else "center right")
    figure.tight_layout()
    save_figure_atomic(figure, path)


def _plot_overview(report: SpectrumReport, path: Path) -> None:
    analysed = report.analysed
    figure = _figure(max(6.4, 0.09 * len(analysed) + 2.0), 4.0)
    ax = figure.add_subplot()
    roles = list(dict.fromkeys(layer.role for layer in analysed))
    colours = [f"C{i % 10}" for i in range(len(roles))]
    for role, colour in zip(roles, colours):
        for mp_like, marker in ((True, "o"), (False, "x")):
            points = [(i, layer.fit.rank_fraction * 100) for i, layer in enumerate(analysed)
                      if layer.role == role and layer.fit is not None and layer.fit.bulk_is_mp == mp_like]
            if points:
                xs, ys = zip(*points)
                label = role if mp_like else f"{role} (bulk not MP)"
                ax.plot(xs, ys, marker=marker, linestyle="none", color=colour, markersize=4, label=label)
    ax.set_xlabel("matrix, in forward order (depth →)")
    ax.set_ylabel("signal rank k / min(M, N)  [%]")
    ax.set_title(f"{_model_line(report)}: signal rank per layer", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if roles:
        ax.legend(fontsize=7, ncol=min(4, len(roles)))
    figure.tight_layout()
    save_figure_atomic(figure, path)
