"""How an ``rmtp`` command ends when it cannot finish: one line on stderr and an exit code.

User errors (bad recipe, missing file, unknown plugin, no GPU) arrive as
:class:`rmtp.errors.RmtpError` and leave as red lines with exit code 1, never a traceback; Ctrl-C
leaves one line saying what was kept, and exit code 130. Every command, built-in or a plugin's
(``register_commands``), wraps its library calls in :func:`user_errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.markup import escape

from rmtp.errors import RecipeError, RmtpError

__all__ = ["INTERRUPTED", "user_errors"]


#: What Ctrl-C leaves behind, unless a command knows better: every file rmtp writes is written
#: to a temporary name and renamed into place, so an interrupted command never leaves half a file.
INTERRUPTED = "interrupted: no file was left half-written (rmtp writes each one whole, or not at all)"


@contextmanager
def user_errors(interrupted: str | Callable[[], str] = INTERRUPTED) -> Iterator[None]:
    """Turn library errors into red lines on stderr and exit code 1, and Ctrl-C into one line
    saying what was kept (``interrupted``, or a function that tells) and exit code 130."""
    from rmtp.render import stderr

    try:
        yield
    except KeyboardInterrupt:
        message = interrupted() if callable(interrupted) else interrupted
        stderr.print(f"[yellow]{escape(message)}[/]")
        raise typer.Exit(130) from None
    except RecipeError as exc:
        for problem in exc.problems:
            stderr.print(f"[red]error:[/] {escape(problem)}")
        raise typer.Exit(1) from None
    except RmtpError as exc:
        stderr.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
