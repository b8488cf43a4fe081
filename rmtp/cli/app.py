"""The root ``rmtp`` Typer app and its recipe commands: ``prune``, ``validate``, ``list``.

:func:`build_app` adds ``analyze-spectrum`` (:mod:`rmtp.cli.spectrum`), ``bench``
(:mod:`rmtp.cli.bench`) and the commands plugins register; :func:`main` is the ``rmtp`` script.
Each command parses its options, makes one library call and renders the result; errors end it
through :func:`rmtp.cli.exits.user_errors`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from rmtp import __version__
from rmtp.cli.exits import OneLineUsageErrors, print_error, user_errors
from rmtp.cli.options import JSON_REPLACES
from rmtp.errors import RmtpError
from rmtp.storage.atomic import check_json_report_path, write_errors, write_json_atomic

if TYPE_CHECKING:
    from rmtp.plugins import Plugins
    from rmtp.run.recipe import Recipe


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rmtp {__version__}")
        raise typer.Exit()


def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print rmtp's version and exit.")] = False,
) -> None:
    """Make timm vision models smaller and faster, guided by random matrix theory."""


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (model, data, steps, output).", show_default=False)]


def prune(
    recipe: RecipeArg,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help=f"Also write the report as JSON to this file ({JSON_REPLACES}).")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print only the summary, not the per-layer tables.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Per-layer tables with every column, however wide (by default "
                                       "the least important ones are hidden to fit the terminal).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run of this recipe from its last "
                                         "checkpoint (<output.dir>.checkpoint/): finished steps are not redone, "
                                         "a fine-tune continues mid-epoch. Refused if the recipe or its data "
                                         "changed. Without it, a run over such a checkpoint is refused.")] = False,
) -> None:
    """Run a recipe: build the model, apply its steps in order, print reports, save the result."""
    from rmtp.reports.render import RichProgress, render_report, render_step
    from rmtp.run.distributed import is_main_process
    from rmtp.run.pipeline import run_recipe
    from rmtp.run.recipe import load_recipe

    with user_errors():
        if json_path is not None:  # before the run, which may take hours
            check_json_report_path(json_path)
        loaded = load_recipe(recipe)
    started = time.time()
    with user_errors(interrupted=lambda: _kept_after_interrupt(loaded, started)):
        on_step = None if quiet else functools.partial(render_step, wide=wide)
        result = run_recipe(loaded, progress=RichProgress(), on_step=on_step, resume=resume)
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    render_report(result.report)
    if json_path is not None:
        with user_errors(), write_errors("--json", json_path, consequence="the report is printed above only"):
            write_json_atomic(json_path, result.report.to_dict())


def _kept_after_interrupt(recipe: Recipe, started: float) -> str:
    """What Ctrl-C left: the output folder is swapped in whole (rmtp.storage.saving), so it is either as
    before the run or the complete new result; its model description's age tells which."""
    from rmtp.storage.saving import META_FILE

    if recipe.output is None:
        return "interrupted: the recipe saves nothing, so nothing was written"
    folder = recipe.output.dir
    try:
        if (folder / META_FILE).stat().st_mtime >= started:
            return f"interrupted after the result was saved: {folder} holds the complete new output"
    except OSError:
        pass
    from rmtp.run.resume import checkpoint_root

    before = f"{folder} is as it was before the run" if folder.exists() else f"{folder} was not created"
    again = ""
    if (checkpoint_root(folder) / "latest.json").is_file():
        again = f"; `rmtp prune {recipe.path or 'RECIPE'} --resume` continues from the last checkpoint"
    return f"interrupted: the run's result was not saved; {before}{again}"


def validate(recipe: RecipeArg) -> None:
    """Check a recipe completely (structure, plugin names, params, paths) without running it."""
    from rmtp.reports.render import stderr, stdout
    from rmtp.run.recipe import load_recipe, step_label

    with user_errors():
        loaded = load_recipe(recipe)  # a bad recipe is answered before torch is imported
        from rmtp.run.preflight import preflight

        checked = preflight(loaded)  # the model's structure, built on the meta device (no weights)
    for warning in checked.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}")
    kinds = ", ".join(step_label(step) for step in loaded.steps)
    stdout.print(f"[green]ok[/] {escape(str(recipe))}: {loaded.model.name}, "
                 f"{len(loaded.steps)} steps ({escape(kinds)})")


def list_plugins() -> None:
    """List the installed pruners and architectures with their descriptions and params."""
    from rmtp.plugins import get_plugins
    from rmtp.reports.render import plugins_table, stdout

    with user_errors():
        stdout.print(plugins_table(get_plugins()))


def _show_flags_as_flags() -> None:
    """Typer's rich help prints a value type beside every option, flags included (``--quiet
    <bool>``, ``--help <bool>``), although a flag takes no value: print none for flags (and
    counters). A no-op on a Typer without ``TyperOption.display_type_rich``, and when done."""
    from typer.core import TyperOption

    display = getattr(TyperOption, "display_type_rich", None)
    if display is None or getattr(display, "rmtp_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag or self.count else display(self, ctx)

    display_type_rich.rmtp_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def build_app(plugins: Plugins | None = None) -> typer.Typer:
    """The ``rmtp`` Typer app: built-in commands, then the commands plugins add (``register_commands``)."""
    from rmtp.plugins import get_plugins

    _show_flags_as_flags()
    app = typer.Typer(
        name="rmtp",
        help="Make timm vision models (ViT, ConvNeXt, ResNet) smaller and faster, guided by random matrix theory.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        cls=OneLineUsageErrors,
    )
    app.callback()(_main)
    app.command()(prune)
    app.command()(validate)
    app.command("list")(list_plugins)
    from rmtp.cli.bench import bench
    from rmtp.cli.export import export
    from rmtp.cli.spectrum import analyze_spectrum

    app.command("analyze-spectrum")(analyze_spectrum)
    app.command()(bench)
    app.command()(export)
    (plugins or get_plugins()).manager.hook.register_commands(app=app)
    return app


def main() -> None:
    """Entry point of the ``rmtp`` script."""
    try:
        app = build_app()
    except RmtpError as exc:  # a broken plugin: say which, do not crash with a traceback
        print_error(str(exc))
        raise SystemExit(1) from None
    app()
