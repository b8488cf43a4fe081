"""Bad input met while running (not only validating): each case ends as one line on stderr naming
the file or key, exit code 1, no traceback, and nothing written to the output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_recipe, write_recipe
from typer.testing import CliRunner

from rmtp.cli import build_app


def _cli(*args: str):
    return CliRunner().invoke(build_app(), list(args))


def _one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _recipe(tmp_path: Path, steps: list[dict[str, Any]], **model: Any) -> Path:
    recipe = tiny_recipe(steps, output=tmp_path / "out")
    recipe["model"]["kwargs"].update(model)
    return write_recipe(tmp_path / "recipe.yaml", recipe)


@pytest.mark.parametrize("command", ["validate", "prune"])
def test_timm_kwargs_naming_unknown_things(tmp_path: Path, command: str) -> None:
    """`act_layer: os.system` used to surface as a raw KeyError from timm's layer registry."""
    path = _recipe(tmp_path, [{"evaluate": {}}], act_layer="os.system")
    line = _one_error_line(_cli(command, str(path)), str(path), "model.kwargs", "KeyError", "os.system")
    assert "act_layer" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["validate", "prune"])
def test_a_step_the_models_structure_refuses_is_refused_before_the_first_step(tmp_path: Path, command: str) -> None:
    """token-cls on a ViT without a class token used to be refused only when its turn came, after the
    steps before it had run (hours, on a real model); the pruner's structure_problem is asked first."""
    steps = [{"prune": "magnitude", "params": {"sparsity": 0.5}}, {"prune": "token-cls", "params": {"r_max": 0.5}}]
    path = _recipe(tmp_path, steps, class_token=False, global_pool="avg")
    _one_error_line(_cli(command, str(path)), str(path), "steps[1] (token-cls)", "no class token")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()


@pytest.mark.parametrize("pruner", ["magnitude", "svd-mp", "n:m"])
def test_a_layer_filter_matching_nothing_prunes_nothing_and_says_so(tmp_path: Path, pruner: str) -> None:
    """magnitude crashed in torch.cat on an empty list; every pruner now reports the empty step,
    and `rmtp validate` warns before the run."""
    steps = [{"prune": pruner, "layers": {"include": ["no.such.layer*"]}}]
    path = _recipe(tmp_path, steps)
    checked = _cli("validate", str(path))
    assert checked.exit_code == 0, checked.output
    assert "warning:" in checked.output and "steps[0].layers: selects none of the model's" in checked.output
    ran = _cli("prune", str(path))
    assert ran.exit_code == 0, ran.output
    assert "selected no layers; nothing was pruned" in ran.output


def test_validate_is_silent_about_filters_that_match(tmp_path: Path) -> None:
    path = _recipe(tmp_path, [{"prune": "magnitude", "layers": ["blocks.*.mlp.fc1"]}])
    checked = _cli("validate", str(path))
    assert checked.exit_code == 0 and "warning" not in checked.output


def _interrupt(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_says_in_one_line_that_the_previous_output_is_intact(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C used to exit 130 silently; now one line says what was kept."""
    import rmtp.run.pipeline

    recipe = tiny_recipe([{"evaluate": {}}], output=tmp_path / "out")
    recipe["output"]["overwrite"] = True
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    (tmp_path / "out").mkdir()  # a previous output: only those may be overwritten
    (tmp_path / "out" / "rmtp_model.json").write_text('{"format": "rmtp-model"}')
    (tmp_path / "out" / "report.json").write_text("kept")
    monkeypatch.setattr(rmtp.run.pipeline, "run_recipe", _interrupt)
    result = _cli("prune", str(path))
    assert result.exit_code == 130
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "is as it was before the run" in lines[0]
    assert (tmp_path / "out" / "report.json").read_text() == "kept"


def test_ctrl_c_before_any_output_existed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtp.run.pipeline

    path = _recipe(tmp_path, [{"evaluate": {}}])
    monkeypatch.setattr(rmtp.run.pipeline, "run_recipe", _interrupt)
    result = _cli("prune", str(path))
    assert result.exit_code == 130 and "was not created" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_ctrl_c_in_other_commands_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtp.spectral.analysis

    monkeypatch.setattr(rmtp.spectral.analysis, "analyze", _interrupt)
    from conftest import REPO

    result = _cli("analyze-spectrum", str(REPO / "models" / "digits_vit.safetensors"))
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1].startswith("interrupted: no file was left half-written")


def test_validate_checks_the_class_folders_against_the_head_timm_builds(tmp_path: Path) -> None:
    """Without num_classes in the kwargs the head is timm's default 1000: only the built structure tells."""
    from PIL import Image

    root = tmp_path / "images"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (16, 16), color=40 * i).save(root / name / f"{i}.png")
    recipe = tiny_recipe([{"evaluate": {}}], output=tmp_path / "out")
    del recipe["model"]["kwargs"]["num_classes"]
    recipe["data"] = {"name": "imagefolder", "root": str(root)}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    _one_error_line(_cli("validate", str(path)), str(path), "has 3 classes but the model's head has 1000 outputs",
                    "model.kwargs.num_classes: 3")


def test_a_saved_folders_recipe_is_read_as_untrusted_yaml(tmp_path: Path) -> None:
    """`rmtp bench` and `rmtp token-map` read recipe.yaml from folders anyone may have sent."""
    from rmtp.errors import RmtpError
    from rmtp.storage.saving import read_saved_recipe

    assert read_saved_recipe(tmp_path) is None
    bomb = (Path(__file__).parent / "bad_recipes" / "yaml_bomb.yaml").read_text()
    (tmp_path / "recipe.yaml").write_text(bomb)
    with pytest.raises(RmtpError, match="YAML refused"):
        read_saved_recipe(tmp_path)
    (tmp_path / "recipe.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(RmtpError, match="tags are refused"):
        read_saved_recipe(tmp_path)
    (tmp_path / "recipe.yaml").write_text("- a list\n")
    with pytest.raises(RmtpError, match="not a resolved recipe"):
        read_saved_recipe(tmp_path)


def test_figures_are_written_atomically(tmp_path: Path) -> None:
    """A plot replaces the previous file in one rename; a failing savefig leaves it untouched."""
    from rmtp.storage.atomic import save_figure_atomic

    class Figure:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def savefig(self, target: str, format: str, **kwargs: Any) -> None:
            Path(target).write_bytes(b"half")
            if self.fail:
                raise OSError(28, "No space left on device")
            Path(target).write_bytes(b"new image")

    path = tmp_path / "plot.png"
    path.write_bytes(b"old image")
    with pytest.raises(OSError):
        save_figure_atomic(Figure(fail=True), path)
    assert path.read_bytes() == b"old image" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    save_figure_atomic(Figure(fail=False), path)
    assert path.read_bytes() == b"new image" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_token_map_checks_its_destination_before_loading(tmp_path: Path) -> None:
    result = _cli("token-map", str(tmp_path / "no-such-run"), "-o", "/proc/rmtp-nope/map.png")
    _one_error_line(result, "--out", "/proc/rmtp-nope/map.png", "not writable")


def test_token_map_of_a_model_without_token_reduction_names_the_folder(tmp_path: Path) -> None:
    """It used to say "trace_sources needs a token-reduced ViT": an internal name, no folder."""
    import timm
    from conftest import TINY_VIT

    import rmtp

    spec = rmtp.ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    folder = rmtp.save(timm.create_model(spec.name, **spec.kwargs), tmp_path / "dense", spec=spec, arch="vit")
    _one_error_line(_cli("token-map", str(folder)), str(folder), "not a token-reduced model", "tome")
    assert not (folder / "token_map.png").exists()


def test_validate_of_a_cuda_recipe_without_cuda_says_prune_would_refuse_it(tmp_path: Path) -> None:
    """`ok` alone, then `rmtp prune` refused the same recipe: validating on a login node for a GPU
    job is fine, so it stays valid, with a warning saying what happens here."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to warn about")
    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["device"] = "cuda"
    path = write_recipe(tmp_path / "gpu.yaml", recipe)
    result = _cli("validate", str(path))
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "device: cuda, and this machine has no CUDA" in result.output
    assert "ok " in result.output
