"""Destinations that cannot be written are refused before any work, as one line naming the option.

/proc and /sys refuse even root (tests may run as root, where chmod stops nothing); a path under a
regular file refuses everyone.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe
from typer.testing import CliRunner

from rmtp.cli import build_app
from rmtp.errors import RecipeError
from rmtp.run.recipe import parse_recipe

runner = CliRunner()


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _under_a_file(tmp_path: Path, name: str) -> Path:
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / name


@pytest.mark.parametrize("out", ["/proc/rmtp-test/out", "/sys/rmtp-test/out", None])
def test_validate_refuses_an_unwritable_output_dir(tmp_path: Path, out: str | None) -> None:
    out_dir = Path(out) if out else _under_a_file(tmp_path, "out")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe([{"prune": "magnitude"}], output=out_dir))
    line = one_error_line(runner.invoke(build_app(), ["validate", str(recipe)]))
    assert line.startswith(f"error: {recipe}: output.dir: {out_dir}: ")
    assert "not writable" in line or "is a file, not a folder" in line


def test_parse_recipe_checks_the_output_block_with_the_other_problems(tmp_path: Path) -> None:
    raw = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 2}}], output=Path("/proc/rmtp-test/out"))
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw, source=tmp_path / "r.yaml")
    assert [p.split(":")[1].strip() for p in caught.value.problems] == ["steps[0].params.sparsity", "output.dir"]


def _must_not_run(monkeypatch: pytest.MonkeyPatch, *targets: str) -> None:
    for target in targets:
        monkeypatch.setattr(target, lambda *a, target=target, **k: pytest.fail(
            f"{target} ran despite an unwritable destination"))


@pytest.mark.parametrize("json_path", ["/proc/rmtp-test/report.json", "/sys/report.json", None])
def test_prune_refuses_an_unwritable_json_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         json_path: str | None) -> None:
    _must_not_run(monkeypatch, "rmtp.run.recipe.load_recipe", "rmtp.run.pipeline.run_recipe")
    target = json_path or str(_under_a_file(tmp_path, "report.json"))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe([{"prune": "magnitude"}], output=tmp_path / "out"))
    line = one_error_line(runner.invoke(build_app(), ["prune", str(recipe), "--json", target]))
    assert line.startswith(f"error: --json: {target}: ")
    assert not (tmp_path / "out").exists()


def test_prune_says_in_one_line_when_the_json_fails_after_the_run(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("rmtp.cli.app.write_json_atomic", disk_full)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe([{"prune": "magnitude"}], output=tmp_path / "out"))
    result = runner.invoke(build_app(), ["prune", str(recipe), "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "summary" in result.output, "the report was printed before the failed write"
    assert (f"error: --json: {tmp_path / 'report.json'}: could not write it (No space left on device); "
            f"the report is printed above only") in result.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"], "the run's result was saved"


@pytest.mark.parametrize("option", ["--json", "--csv", "--plot"])
def test_analyze_spectrum_refuses_unwritable_outputs_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    option: str) -> None:
    _must_not_run(monkeypatch, "rmtp.spectral.analysis.analyze")
    for target in (f"/proc/rmtp-test/out{option[2:]}", str(_under_a_file(tmp_path, "out"))):
        line = one_error_line(runner.invoke(build_app(), ["analyze-spectrum", "timm:vit_tiny_patch16_224", option,
                                                          target]))
        assert line.startswith(f"error: {option}: {target}: ")


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_refuses_unwritable_outputs_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         option: str) -> None:
    _must_not_run(monkeypatch, "rmtp.bench.benchmark_models")
    for target in ("/sys/rmtp-test/out", str(_under_a_file(tmp_path, "out"))):
        line = one_error_line(runner.invoke(build_app(), ["bench", "timm:vit_tiny_patch16_224", option, target]))
        assert line.startswith(f"error: {option}: {target}: ")
