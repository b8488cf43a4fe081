"""A CLI that feels finished: fast answers without torch, flags shown as flags, one ``--kwargs``
convention, ``n:m`` printed as it is, and per-layer tables that fit the terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_VIT, tiny_recipe, write_recipe
from rich.console import Console
from typer.testing import CliRunner

import rmtp
from rmtp.cli import build_app
from rmtp.cli.options import parse_kwargs, parse_value
from rmtp.contract.pruner import LayerRow
from rmtp.errors import RmtpError
from rmtp.reports.records import ModelStats, StepReport
from rmtp.reports.render import StepTable, render_step, step_renderable

runner = CliRunner()

# ----------------------------------------------------------------------------- no torch to answer


def _modules_after(*args: str) -> set[str]:
    """Run ``rmtp ARGS`` in a fresh interpreter; the heavy modules it imported."""
    code = ("import sys\nfrom rmtp.cli import main\nsys.argv = ['rmtp', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('MODULES', *sorted(m for m in ('torch', 'timm', 'numpy', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    line = [line for line in done.stdout.splitlines() if line.startswith("MODULES")]
    assert line, done.stdout + done.stderr
    return set(line[-1].split()[1:])


@pytest.mark.parametrize("args", [["--help"], ["list"], ["prune", "--help"], ["bench", "--help"],
                                  ["analyze-spectrum", "--help"], ["token-map", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_and_list_import_no_torch(args: list[str]) -> None:
    assert _modules_after(*args) == set()


@pytest.mark.parametrize("text, expected", [
    ("model: {name: vit_tiny_patch16_224\nsteps: [", "not valid YAML"),
    ("model: {name: vit_tiny_patch16_224, colour: red}\nsteps: [{evaluate: {}}]\n", "unknown key 'colour'"),
    ("model: {name: vit_tiny_patch16_224}\nsteps: [{prune: svd-mpp}]\n", "unknown pruner 'svd-mpp'"),
    ("model: {name: vit_tiny_patch16_224}\nsteps: [{prune: svd-mp, params: {margn: 1}}]\n", "unknown key 'margn'"),
    ("model: {name: vit_tiny_patch16_224}\nsteps: [{finetune: {epoch: 1}}]\n", "unknown key 'epoch'"),
], ids=["yaml", "unknown-key", "unknown-pruner", "unknown-param", "finetune-key"])
def test_validate_errors_import_no_torch(tmp_path: Path, text: str, expected: str) -> None:
    """A typo is answered before torch and timm are imported (the model's checks need them)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert _modules_after("validate", str(recipe)) == set()
    result = runner.invoke(build_app(), ["validate", str(recipe)])
    assert result.exit_code == 1 and expected in result.output, result.output


def test_plugins_list_and_validate_params_without_torch() -> None:
    code = ("import sys\nfrom rmtp.plugins import load_plugins\np = load_plugins()\n"
            "assert {'svd-mp', 'n:m', 'spp', 'magnitude', 'tome', 'token-cls', 'token-mean'} <= set(p.pruners)\n"
            "p.pruners.get('n:m').Params.model_validate({'n': 2, 'm': 4, 'tw_confidence': None})\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip() == "False False", done.stderr


def test_saved_types_of_lazy_plugins_are_found_when_a_folder_needs_them() -> None:
    """Pruner modules load on first use, so their saved types register through the
    ``import_saved_types`` hook the first time an id is looked up (here in a fresh process)."""
    code = ("from rmtp.contract.saved_types import resolve_type\n"
            "print(*(resolve_type(k, i).__name__ for k, i in [('module', 'lowrank.linear'), "
            "('module', 'spp.sliced_linear'), ('module', 'nm.permuted_input'), ('patch', 'tokens.reduction'), "
            "('patch', 'spp.attention_heads')]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.split() == ["LowRankLinear", "SlicedLinear", "PermutedInput", "TokenReduction",
                                   "AttentionHeads"], done.stderr


# ----------------------------------------------------------------------------- help


COMMANDS = ["prune", "validate", "list", "bench", "analyze-spectrum", "token-map"]


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_as_flags_in_help(command: str) -> None:
    result = runner.invoke(build_app(), [command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert re.search(r"--help\s+Show this message", result.output)


def test_help_names_the_new_options() -> None:
    app = build_app()
    prune = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "160"}).output
    assert re.search(r"--quiet\s+-q\s+Print only", prune) and "--wide" in prune
    for command in ("bench", "analyze-spectrum"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--kwargs" in text and "KEY=VALUE" in text and "repeatable" in text, text


# ----------------------------------------------------------------------------- --kwargs


@pytest.mark.parametrize("args, expected", [
    (["prunee", "r.yaml"], "No such command 'prunee'. Did you mean 'prune'? (see rmtp --help)"),
    (["prune"], "Missing argument 'recipe'. (see rmtp prune --help)"),
    (["prune", "r.yaml", "--jsn", "x.json"], "No such option: --jsn (Possible options: --json) (see rmtp prune"),
    (["bench", "run", "--rounds", "abc"], "Invalid value for '--rounds'"),
    (["token-map", "run", "--images", "0"], "Invalid value for '--images' / '-n'"),
])
def test_usage_errors_are_one_line_and_exit_1_like_any_bad_input(args: list[str], expected: str) -> None:
    """Click's way was a framed usage block and exit code 2, unlike every other bad input."""
    result = runner.invoke(build_app(), args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def test_rmtp_alone_still_prints_the_help() -> None:
    result = runner.invoke(build_app(), [])
    assert "Usage: rmtp" in result.output and "analyze-spectrum" in result.output and "error" not in result.output
    assert result.exit_code == 2 and not result.output.endswith("\n\n"), repr(result.output[-40:])


def test_a_command_that_returns_a_value_still_exits_0_and_exit_codes_pass_through() -> None:
    """Usage errors are caught outside Click's standalone mode, where a command's return value
    would come back as its exit code: a plugin command returning something must still exit 0."""
    import typer

    from rmtp.cli.exits import OneLineUsageErrors

    app = typer.Typer(cls=OneLineUsageErrors)

    @app.command()
    def answer() -> int:
        return 3

    @app.command()
    def stop(code: int) -> None:
        raise typer.Exit(code)

    assert runner.invoke(app, ["answer"]).exit_code == 0
    assert runner.invoke(app, ["stop", "4"]).exit_code == 4
    assert runner.invoke(app, ["stop", "x"]).exit_code == 1


def test_parse_kwargs_one_convention() -> None:
    assert parse_kwargs(None) is None and parse_kwargs([]) is None
    assert parse_kwargs(["img_size=32", "drop_rate=1e-1", "act_layer=gelu", "pretrained_cfg_overlay={a: 1}"]) == {
        "img_size": 32, "drop_rate": 0.1, "act_layer": "gelu", "pretrained_cfg_overlay": {"a": 1}}
    assert parse_kwargs(["a=[1, 2],b=true,c=null,d=", '{"e": 5}', "a=3"]) == {
        "a": 3, "b": True, "c": None, "d": "", "e": 5}
    assert parse_kwargs("{img_size: 16}") == {"img_size": 16}  # a YAML flow mapping, as in a recipe
    assert parse_value("x=y") == "x=y" and parse_value("!!python/name:os.system") == "!!python/name:os.system"
    for bad, message in (("img_size", "expected key=value"), ("=1", "expected key=value"),
                         ("{bad json", "not a valid JSON object"), ("[1]", "expected a JSON object")):
        with pytest.raises(RmtpError, match=message):
            parse_kwargs([bad])


def test_bench_and_analyze_spectrum_take_the_same_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_bench(models, **options):
        seen["bench"] = options["model_kwargs"]
        raise RmtpError("stop")

    def fake_analyze(source, **options):
        seen["spectrum"] = options["kwargs"]
        raise RmtpError("stop")

    monkeypatch.setattr("rmtp.bench.measuring.benchmark_models", fake_bench)
    monkeypatch.setattr("rmtp.spectral.analysis.analyze", fake_analyze)
    args = ["--kwargs", "img_size=16,depth=2", "--kwargs", "embed_dim=32", "--kwargs", '{"num_heads": 2}']
    app = build_app()
    for command in ("bench", "analyze-spectrum"):
        result = runner.invoke(app, [command, "timm:vit_tiny_patch16_224", *args])
        assert result.exit_code == 1 and "error: stop" in result.output, result.output
    assert seen["bench"] == seen["spectrum"] == {"img_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize("value, key", [
    ('{"img_size": 16, "img_size": 32}', "'img_size'"),  # JSON keeps the last without a word
    ("{img_size: 16, img_size: 32}", "'img_size'"),  # a YAML flow mapping, refused as in a recipe
    ('pretrained_cfg_overlay={"mean": 1, "mean": 2}', "'mean'"),  # inside a key=value's value
])
def test_kwargs_with_a_key_twice_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, value: str,
                                                         key: str) -> None:
    def reached(*args, **options):
        raise AssertionError("the command ran with kwargs that hold a key twice")

    monkeypatch.setattr("rmtp.bench.measuring.benchmark_models", reached)
    monkeypatch.setattr("rmtp.spectral.analysis.analyze", reached)
    app = build_app()
    for command in ("bench", "analyze-spectrum"):
        result = runner.invoke(app, [command, "timm:vit_tiny_patch16_224", "--kwargs", value])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # no traceback
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --kwargs: duplicate key {key} in "), result.output


# ----------------------------------------------------------------------------- n:m, not nⓂ


def test_n_m_prints_literally() -> None:
    from rmtp.reports.render import RichProgress, stderr, stdout

    for console in (stdout, stderr):
        with console.capture() as captured:
            console.print("n:m: masks for 2:4 in blocks.0 :m: :smile:")
        assert captured.get().strip() == "n:m: masks for 2:4 in blocks.0 :m: :smile:"
    # a notebook's console keeps rich's emoji default: the report must not depend on it
    step = _step(name="n:m", rows=[_row("blocks.0.mlp.fc1", note="n:m pattern")], notes=["n:m: kept :m:"])
    notebook = Console(width=120, record=True, file=io.StringIO())
    notebook.print(step)
    text = notebook.export_text()
    assert "step 0 · prune · n:m" in text and "n:m pattern" in text and "n:m: kept :m:" in text
    assert "Ⓜ" not in text
    progress_console = Console(width=100, record=True, file=io.StringIO(), force_terminal=True)
    with RichProgress(progress_console).task("n:m: masks", total=2) as advance:
        advance(pattern="n:m")
    shown = progress_console.file.getvalue()
    assert "n:m: masks" in shown and "pattern n:m" in shown and "Ⓜ" not in shown


# ----------------------------------------------------------------------------- analyze-spectrum


def test_an_unknown_timm_name_is_said_so_not_recipe_wording() -> None:
    result = runner.invoke(build_app(), ["analyze-spectrum", "timm:not_a_model"])
    assert result.exit_code == 1
    assert "timm has no model 'not_a_model'" in result.output and "model.arch" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


# ----------------------------------------------------------------------------- tables that fit


def _row(layer: str, note: str = "", **detail: object) -> LayerRow:
    return LayerRow(layer=layer, shape_before=(192, 64), shape_after=(192, 64), params_before=12480,
                    params_after=576, nonzeros_before=12480, nonzeros_after=384, budget=0.046, kept_rank=3,
                    note=note, detail=dict(detail))


def _step(name: str = "svd-mp", rows: list[LayerRow] | None = None, notes: list[str] | None = None) -> StepReport:
    stats = ModelStats(params=1, nonzeros=1, macs=1)
    return StepReport(index=0, kind="prune", name=name, rows=rows or [], stats=stats, seconds=0.0,
                      notes=notes or [])


@pytest.fixture(scope="module")
def svd_mp_report() -> StepReport:
    """A real svd-mp step of a tiny ViT: 12 columns (7 base, 4 details, the note)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **dict(TINY_VIT, embed_dim=64)).eval()
    return rmtp.prune(model, "svd-mp", margin=1.0, min_dim=8, when_split_does_not_pay="keep")


def _render(renderable: object, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text().splitlines()


def _table_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    """(header cells, data rows) of the first box table in ``lines``."""
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    rule = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    bottom = next(i for i, line in enumerate(lines) if line.startswith("└"))
    header = [cell.strip() for cell in lines[top + 1].strip("┃").split("┃")]
    return header, lines[rule + 1:bottom]


@pytest.mark.parametrize("width, shown", [
    (80, ["layer", "shape", "kept", "sparsity", "params", "mode"]),
    (150, None),  # None: every column
    (250, None),
])
def test_step_tables_fit_the_width_without_wrapping(svd_mp_report: StepReport, width: int,
                                                    shown: list[str] | None) -> None:
    every = StepTable(svd_mp_report).columns
    assert every == ["layer", "shape", "budget", "kept", "sparsity", "params", "nonzeros", "mode", "rank",
                     "edge s₊", "MACs/pos", "note"]
    lines = _render(svd_mp_report, width)
    header, data = _table_lines(lines)
    assert all(len(line) <= width for line in lines)
    assert len(data) == len(svd_mp_report.rows), "\n".join(lines)  # one line per row: nothing wraps
    assert data[0].strip("│").split("│")[0].strip() == svd_mp_report.rows[0].layer
    assert header == (shown or every)
    caption = [line for line in lines if line.startswith("hidden: ")]
    if shown is None:
        assert not caption
    else:
        assert len(caption) == 1 and "--wide or --json shows them" in caption[0]
        assert caption[0].startswith("hidden: budget, nonzeros, rank")


def test_wide_shows_every_column_and_json_keeps_every_figure(svd_mp_report: StepReport) -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    render_step(svd_mp_report, console, wide=True)
    header, data = _table_lines(console.export_text().splitlines())
    assert header == StepTable(svd_mp_report).columns and len(data) == len(svd_mp_report.rows)
    layers = svd_mp_report.to_dict()["layers"]
    assert set(layers[0]["detail"]) == {"mode", "rank", "edge s₊", "MACs/pos"} and "note" in layers[0]


def test_columns_are_hidden_least_important_first() -> None:
    rows = [_row(f"blocks.{i}.attn.qkv", note="a long free note " * 3, **{"first": "x" * 12, "second": "y" * 12})
            for i in range(3)]
    table = StepTable(_step(rows=rows))
    assert table.drop_order() == ["note", "nonzeros", "budget", "second", "first", "sparsity", "shape", "params",
                                  "kept"]
    token = StepTable(_step(name="tome", rows=[_row("blocks.0", tokens_in=65, tokens_out=57)]))
    assert token.drop_order()[-3:] == ["tokens_out", "tokens_in", "kept"]  # a token pruner's figures come first
    widths = {}
    for width in (60, 90, 120, 200):
        header, data = _table_lines(_render(step_renderable(_step(rows=rows)), width))
        assert len(data) == 3
        widths[width] = header
    assert {"layer", "kept"} <= set(widths[60]) and "note" not in widths[120]
    assert len(widths[60]) < len(widths[90]) < len(widths[120]) <= len(widths[200])


def test_prune_wide_prints_every_column(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe([{"prune": "svd-mp", "params": {"min_dim": 8}}]))
    wide = runner.invoke(build_app(), ["prune", str(recipe), "--wide"])
    assert wide.exit_code == 0, wide.output
    assert "--wide or --json shows them" not in wide.output
    header, data = _table_lines(wide.output.splitlines())
    assert header[-4:] == ["mode", "rank", "edge s₊", "MACs/pos"] or "note" in header
