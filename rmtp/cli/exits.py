"""How an ``rmtp`` command ends when it cannot finish: one line on stderr and an exit code.

User errors (bad recipe, missing file, unknown plugin, no GPU) arrive as
:class:`rmtp.errors.RmtpError` and leave as red lines with exit code 1, never a traceback; Ctrl-C
leaves one line saying what was kept, and exit code 130; SIGTERM (a scheduler's stop) the same
cleanup and line, and exit code 143. Every command, built-in or a plugin's
(``register_commands``), wraps its library calls in :func:`user_errors`.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from rmtp.errors import RecipeError, RmtpError

__all__ = ["INTERRUPTED", "OneLineUsageErrors", "Terminated", "print_error", "user_errors"]


#: What Ctrl-C leaves behind, unless a command knows better: every file rmtp writes is written
#: to a temporary name and renamed into place, so an interrupted command never leaves half a file.
INTERRUPTED = "interrupted: no file was left half-written (rmtp writes each one whole, or not at all)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers (Slurm, Kubernetes, torchrun) send before a kill, raised like
    Ctrl-C's KeyboardInterrupt: the same cleanup runs (the output lock is released, a checkpoint
    kept for ``--resume``) and the same one line is printed, instead of a silent death."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated`; the previous handler is restored
    after. Only the main thread can set signal handlers (elsewhere SIGTERM keeps its handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_error(message: str) -> None:
    """One red ``error:`` line on stderr, as every command ends on bad input."""
    from rmtp.reports.render import stderr

    stderr.print(f"[red]error:[/] {escape(message)}")


@contextmanager
def user_errors(interrupted: str | Callable[[], str] = INTERRUPTED) -> Iterator[None]:
    """Turn library errors into red lines on stderr and exit code 1, and Ctrl-C into one line
    saying what was kept (``interrupted``, or a function that tells) and exit code 130; SIGTERM
    into the same line, saying so, and exit code 143 (128 + SIGTERM, what schedulers expect)."""
    from rmtp.reports.render import stderr

    try:
        with _sigterm_as_interrupt():
            yield
    except KeyboardInterrupt as exc:
        message = interrupted() if callable(interrupted) else interrupted
        if isinstance(exc, Terminated):
            message = (f"terminated (SIGTERM){message[len('interrupted'):]}" if message.startswith("interrupted")
                       else f"terminated (SIGTERM): {message}")
        stderr.print(f"[yellow]{escape(message)}[/]")
        raise typer.Exit(128 + signal.SIGTERM if isinstance(exc, Terminated) else 130) from None
    except RecipeError as exc:
        for problem in exc.problems:
            print_error(problem)
        raise typer.Exit(1) from None
    except RmtpError as exc:
        print_error(str(exc))
        raise typer.Exit(1) from None


class OneLineUsageErrors(TyperGroup):
    """The ``rmtp`` command group, whose usage errors (an unknown command or option, a missing
    argument, an option value Click refuses) end like every other bad input: one red line saying
    what is wrong and where the help is, exit code 1. Click's own way is a framed usage block and
    exit code 2; ``rmtp`` alone still prints the help."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        from rmtp.reports.render import stderr

        errors = _click_exceptions()
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except getattr(errors, "NoArgsIsHelpError", ()) as exc:  # Click ≥ 8.2: the help is printed already
            sys.exit(exc.exit_code)
        except errors.UsageError as exc:
            where = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "rmtp --help"
            print_error(f"{exc.format_message()} (see {where})")
            sys.exit(1)
        except errors.ClickException as exc:
            print_error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            stderr.print("[yellow]aborted[/]")
            sys.exit(1)
        # without standalone mode, Click returns an Exit's code; a command's own return value is
        # dropped by invoke below, so a plugin command returning something still exits 0
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)

    def invoke(self, ctx: Any) -> None:
        super().invoke(ctx)


def _click_exceptions() -> Any:
    """The module of the Click exceptions the installed Typer raises: its own copy of Click (Typer
    0.2x), or Click itself where Typer still uses it; ``typer.BadParameter`` is one of them."""
    return sys.modules[typer.BadParameter.__module__]
