"""``rmtp token-map``, the command the ``tokens`` plugin adds: torch-free until it runs, since
every ``rmtp`` invocation (``--help`` included) builds the command line with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def token_map_command(
    folder: Annotated[Path, typer.Argument(help="A saved token-reduced model (an rmtp output folder).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="PNG to write (default: FOLDER/token_map.png).")] = None,
    images: Annotated[int, typer.Option("--images", "-n", min=1, max=64, help="How many val images to draw.")] = 8,
) -> None:
    """Draw which patches each token of a token-reduced model (tome, token-cls, token-mean) covers."""
    from rich.markup import escape

    from rmtp.cli import user_errors
    from rmtp.reports.render import stdout
    from rmtp_plugins.tokens.visualize import visualize_run

    with user_errors():
        path = visualize_run(folder, out, images)
    stdout.print(f"[green]wrote[/] {escape(str(path))}")
