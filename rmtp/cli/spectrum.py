"""``rmtp analyze-spectrum``: option parsing, one library call (:func:`rmtp.spectral.analysis.analyze`), rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rmtp.cli.exits import user_errors
from rmtp.cli.options import JSON_REPLACES, KWARGS_HELP, KWARGS_METAVAR, parse_kwargs

__all__ = ["analyze_spectrum", "parse_kwargs"]


def analyze_spectrum(
    checkpoint: Annotated[str, typer.Argument(
        metavar="CKPT", show_default=False,
        help="A .safetensors/.pth/.bin state dict, a saved rmtp output folder, a folder in timm's hub layout "
             "(config.json + model.safetensors), or timm:NAME (random init unless --pretrained; NAME may be "
             "NAME.tag, timm/NAME.tag or hf-hub:org/name).")],
    model: Annotated[str | None, typer.Option(
        "--model", help="timm name of a bare checkpoint. Without it, a model card <ckpt stem>.json beside the "
                        "checkpoint (fields timm_name, kwargs; e.g. models/digits_vit.json), or else timm's "
                        "config.json, is used when present; with neither, every 2-D/4-D weight is analysed by its "
                        "state-dict key.")] = None,
    arch: Annotated[str | None, typer.Option(
        "--arch",
        help="Architecture plugin (vit, convnext, resnet, ...) when it cannot be inferred from the name.")] = None,
    kwargs: Annotated[list[str] | None, typer.Option(
        "--kwargs", metavar=KWARGS_METAVAR, help=f"{KWARGS_HELP}; overrides the model card's.")] = None,
    pretrained: Annotated[bool, typer.Option(
        "--pretrained", help="timm:NAME only: load timm's pretrained weights (needs network access).")] = False,
    alpha: Annotated[float, typer.Option(
        "--alpha", help="BEMA band: fit σ² on the eigenvalues between the alpha and 1-alpha quantiles.")] = 0.25,
    tw_confidence: Annotated[float | None, typer.Option(
        "--tw-confidence", help="Raise the edge by the Tracy–Widom quantile at this confidence (≥ 0.832, e.g. "
                                "0.95); default: the asymptotic edge of the bulk the spikes leave, "
                                "σ(√(n−k)+√(p−k)).")] = None,
    min_dim: Annotated[int, typer.Option(
        "--min-dim", help="Skip matrices with min(M, N) below this (too few eigenvalues to fit).")] = 32,
    no_split_qkv: Annotated[bool, typer.Option(
        "--no-split-qkv", help="Analyse a fused qkv projection as one matrix instead of its q, k, v blocks.")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help=f"Also write the report as JSON to this file ({JSON_REPLACES}).")] = None,
    csv_path: Annotated[Path | None, typer.Option(
        "--csv", help="Also write the per-layer table as CSV to this file.")] = None,
    plot_dir: Annotated[Path | None, typer.Option(
        "--plot", help="Write per-layer ESD plots (histogram, fitted MP density, edge) and overview.png here.")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print only the summary, not the per-layer table.")] = False,
) -> None:
    """Fit the Marchenko–Pastur law to every prunable weight matrix of a model and report its signal rank."""
    from rmtp.reports.render import RichProgress, stderr
    from rmtp.spectral.analysis import analyze
    from rmtp.spectral.report import render_spectrum, write_csv_atomic, write_plots
    from rmtp.storage.atomic import write_errors, write_json_atomic

    with user_errors():
        _check_destinations(json_path, csv_path, plot_dir)
        report = analyze(checkpoint, model_name=model, arch=arch, kwargs=parse_kwargs(kwargs), pretrained=pretrained,
                         split_qkv=not no_split_qkv, min_dim=min_dim, alpha=alpha, tw_confidence=tw_confidence,
                         progress=RichProgress())
        render_spectrum(report, layers=not quiet)
        if json_path is not None:
            with write_errors("--json", json_path):
                write_json_atomic(json_path, report.to_dict())
        if csv_path is not None:
            with write_errors("--csv", csv_path):
                write_csv_atomic(report, csv_path)
        if plot_dir is not None:
            with write_errors("--plot", plot_dir):
                written = write_plots(report, plot_dir, progress=RichProgress())
            stderr.print(f"wrote {len(written)} plots to {plot_dir}")


def _check_destinations(json_path: Path | None, csv_path: Path | None, plot_dir: Path | None) -> None:
    """Refuse unwritable --json/--csv/--plot paths before the model is loaded and analysed."""
    from rmtp.storage.atomic import check_json_report_path, check_writable

    if json_path is not None:
        check_json_report_path(json_path)
    for path, what, is_dir in ((csv_path, "--csv", False), (plot_dir, "--plot", True)):
        if path is not None:
            check_writable(path, what=what, is_dir=is_dir)
