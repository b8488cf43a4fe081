"""The CLI through Typer's test runner: thin commands, clear errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_recipe, write_recipe
from typer.testing import CliRunner

from rmtp import __version__
from rmtp.cli import build_app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(build_app(), list(args))


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"rmtp {__version__}"


def test_help_lists_commands_and_every_command_has_help() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("prune", "validate", "list"):
        assert command in result.output
        sub = invoke(command, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.output


def test_list_shows_plugins_with_params() -> None:
    result = invoke("list")
    assert result.exit_code == 0
    for text in ("magnitude", "sparsity=0.5", "vit", "convnext", "resnet"):
        assert text in result.output


def test_validate_ok_and_errors(tmp_path: Path) -> None:
    good = write_recipe(tmp_path / "good.yaml", tiny_recipe([{"prune": "magnitude"}, {"evaluate": {}}]))
    result = invoke("validate", str(good))
    assert result.exit_code == 0 and "ok" in result.output and "magnitude, evaluate" in result.output
    bad = write_recipe(tmp_path / "bad.yaml", tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 2}}]))
    result = invoke("validate", str(bad))
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"error: {bad}: steps[0].params.sparsity: Input should be less than 1 (got 2)" in result.output


def test_prune_prints_report_and_writes_json(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        [{"prune": "magnitude", "params": {"sparsity": 0.5}}, {"evaluate": {}}], output=tmp_path / "out"))
    result = invoke("prune", str(recipe), "--json", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    for text in ("step 0 · prune · magnitude", "blocks.0.attn.qkv", "summary", "dense", "top-1", "saved to"):
        assert text in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == "rmtp-run-report/1"
    assert report["steps"][0]["layers"][0]["sparsity"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_json_naming_the_recipe_is_refused_before_the_run_and_the_recipe_kept(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe([{"prune": "magnitude"}], output=tmp_path / "out"))
    text = recipe.read_text()
    result = invoke("prune", str(recipe), "--json", str(recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().startswith(f"error: --json: {recipe}: exists and is not a JSON report")
    assert recipe.read_text() == text and not (tmp_path / "out").exists()


def test_missing_recipe_is_one_line_exit_1(tmp_path: Path) -> None:
    result = invoke("prune", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tmp_path / 'missing.yaml'}: no such recipe file"
