"""``rmtp export``: the thin command over :func:`rmtp.export.export_model`.

Parses the options, makes the library call, prints the report as a short table and writes
``--json``. Every user error (unknown format, unwritable file, a model no exporter can write, a
failed check) is one red line on stderr and exit code 1; the file is written whole or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from rmtp.cli.exits import user_errors

if TYPE_CHECKING:
    from rich.table import Table

    from rmtp.export import ExportReport

#: What ``-o`` defaults to, in the run folder.
DEFAULT_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2"}


def export(
    run_dir: Annotated[Path, typer.Argument(
        help="An rmtp output folder (the saved pruned model).", show_default=False)],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="onnx (checked by running it in ONNX Runtime) or pt2 (torch.export, checked by "
                               "reloading it).", show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--output", "-o", help="File to write (default: RUN_DIR/model.onnx or RUN_DIR/model.pt2).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size of the exported graph (graphs are static).")] = 1,
    check: Annotated[bool, typer.Option(
        "--check", help="Compare the file's outputs with the PyTorch model's on val images of the run's data "
                        "(max |difference| <= 1e-4, fp32); without it, on one seeded random batch.")] = False,
    check_images: Annotated[int, typer.Option(
        "--check-images", help="How many val images --check compares on (at most 4096).")] = 32,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default 17).")] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write the report as JSON to this file.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the output file and the --json file if they exist (without it, an existing "
                            "file is refused and left as it is).")] = False,
) -> None:
    """Write a saved model as a file a runtime executes (ONNX or torch.export's pt2), verified."""
    from rmtp.reports.render import stdout
    from rmtp.storage.atomic import write_errors, write_json_atomic

    with user_errors():
        from rmtp.export import FORMATS, ExportError, export_model
        from rmtp.export.refusals import check_new_file

        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
        target = out if out is not None else run_dir / DEFAULT_NAMES[fmt]
        if json_path is not None:  # before the model is loaded and exported
            if Path(os.path.abspath(json_path)) == Path(os.path.abspath(target)):
                raise ExportError(f"--json {json_path} is the exported model's own path: the report would replace "
                                  f"the model; name another file")
            check_new_file(json_path, what="--json", overwrite=overwrite, replaced_by="--overwrite")
        report = export_model(run_dir, target, format=fmt, batch=batch, check=check,  # type: ignore[arg-type]
                              check_images=check_images, opset=opset, overwrite=overwrite)
    stdout.print(report_table(report))
    if json_path is not None:
        with user_errors(), write_errors("--json", json_path, consequence="the report is printed above only"):
            write_json_atomic(json_path, report.to_dict())
        stdout.print(f"wrote [bold]{escape(str(json_path))}[/]")


def report_table(report: ExportReport) -> Table:
    """The report as a two-column table: what was written, and how it was checked."""
    from rich.table import Table

    from rmtp.export import TOLERANCE

    table = Table(title=f"exported {escape(str(report.path))}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    size = report.bytes / 1e6
    table.add_row("format", f"{report.format} ({escape(report.exporter)})")
    table.add_row("size", f"{size:.2f} MB" if size >= 0.1 else f"{report.bytes / 1e3:.1f} kB")
    table.add_row("input", f"{report.batch} × {' × '.join(map(str, report.input_shape))} (static)")
    table.add_row("checked on", f"{report.images} {escape(report.inputs)}")
    table.add_row("max |diff|",
                  f"[green]{report.max_abs_diff:.2e}[/] vs PyTorch (≤ {TOLERANCE:.0e}".replace("e-0", "e-") + ")")
    table.add_row("time", f"{report.seconds:.1f} s")
    return table
