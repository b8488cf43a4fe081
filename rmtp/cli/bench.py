"""``rmtp bench``: the thin command over :func:`rmtp.bench.benchmark_models`.

Parses the options, makes the library call, renders the tables, writes ``--json`` and ``--plot``.
Every user error (bad option, missing model, no GPU) is one red line on stderr and exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from rmtp.bench.defaults import DEFAULT_ROUNDS
from rmtp.cli.exits import user_errors
from rmtp.cli.options import JSON_REPLACES, KWARGS_HELP, KWARGS_METAVAR, parse_kwargs


def bench(
    models: Annotated[list[str], typer.Argument(
        help="Models to compare: rmtp output folders, checkpoint files (.safetensors/.pth/.pt) or timm:NAME "
             "(random init). The first is the baseline; one folder alone is compared with its dense baseline.",
        show_default=False)],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated, e.g. 1,32,256.")] = "1,32",
    dtype: Annotated[str, typer.Option(help="fp32, bf16, or fp16 (cuda only: CPUs emulate fp16).")] = "fp32",
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="torch.compile each model (static shapes); compile time is reported apart.")] = False,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last", help="Weights and inputs in channels-last.")] = False,
    rounds: Annotated[int, typer.Option(
        help="Interleaved timing rounds per batch size (at least 3; a multiple of the number of models "
             "balances who runs first).")] = DEFAULT_ROUNDS,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (default: torch's current).")] = None,
    evaluate: Annotated[bool, typer.Option(
        "--eval", help="Also measure top-1 on the val data of the first folder's recipe (or a checkpoint card), "
                       "each model through its own recipe's or card's preprocessing; models naming other val data "
                       "are refused.",
    )] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help=f"Also write the results as JSON (schema rmtp-bench/1; {JSON_REPLACES}).")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Folder to write throughput.png into, and with --eval accuracy_vs_macs.png and "
                       "accuracy_vs_latency.png (Pareto front marked).")] = None,
    model_name: Annotated[str | None, typer.Option(
        "--model", help="timm name of checkpoint files (default: the <stem>.json card next to each).")] = None,
    kwargs: Annotated[list[str] | None, typer.Option(
        "--kwargs", metavar=KWARGS_METAVAR, help=f"{KWARGS_HELP}; for checkpoints and timm:NAME models.")] = None,
) -> None:
    """Compare models side by side: latency, throughput, peak memory, MACs, params, nonzeros (and top-1)."""
    from rmtp.bench import benchmark_models, check_plotting, parse_batches, render_bench, write_plots
    from rmtp.reports.render import RichProgress, stderr, stdout
    from rmtp.storage.atomic import check_json_report_path, check_writable, write_errors, write_json_atomic

    with user_errors():
        batches = parse_batches(batch)
        model_kwargs = parse_kwargs(kwargs)
        if json_path is not None:  # before the models are loaded and timed
            check_json_report_path(json_path)
        if plot is not None:
            check_writable(plot, what="--plot", is_dir=True)
            check_plotting()
        report = benchmark_models(models, device=device, batches=batches, dtype=dtype, compile=compile_model,
                                  channels_last=channels_last, rounds=rounds, threads=threads, evaluate=evaluate,
                                  model_name=model_name, model_kwargs=model_kwargs, progress=RichProgress())
    render_bench(report)
    if json_path is not None:
        with user_errors(), write_errors("--json", json_path, consequence="the results are printed above only"):
            write_json_atomic(json_path, report.to_dict())
        stdout.print(f"wrote [bold]{escape(str(json_path))}[/]")
    if plot is not None:
        with user_errors(), write_errors("--plot", plot):
            written, notes = write_plots(report, plot)
        for path in written:
            stdout.print(f"wrote [bold]{escape(str(path))}[/]")
        for note in notes:
            stderr.print(f"[yellow]note:[/] {escape(note)}")
