"""``overwrite`` replaces rmtp output folders only: never a clone, the recipe's folder, its data, the
model it starts from, the current directory, or a user's file put in an output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe, write_recipe
from typer.testing import CliRunner

import rmtp
from rmtp.cli import build_app
from rmtp.contract.architecture import ModelSpec
from rmtp.errors import RecipeError, RmtpError
from rmtp.plugins import get_plugins
from rmtp.run.recipe import load_recipe
from rmtp.storage.overwrite import replace_problem


def _tiny_model() -> tuple[torch.nn.Module, ModelSpec]:
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    torch.manual_seed(0)
    return timm.create_model(spec.name, **spec.kwargs).eval(), spec


def _save(out: Path, **kwargs) -> Path:
    model, spec = _tiny_model()
    return rmtp.save(model, out, spec=spec, arch=get_plugins().architecture("vit"), **kwargs)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what must be exactly as it was after a refusal."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _clone(tmp_path: Path, output_dir: str) -> tuple[Path, Path]:
    """A git clone with a recipe in recipes/ and images in data/, the recipe writing to ``output_dir``."""
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / "data" / "train").mkdir(parents=True)
    (clone / "data" / "train" / "notes.txt").write_text("my labels")
    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["data"] = {"name": "imagefolder", "root": "../data"}
    recipe["output"] = {"dir": output_dir, "overwrite": True}
    (clone / "recipes").mkdir()
    path = write_recipe(clone / "recipes" / "r.yaml", recipe)
    return clone, path


def _cli(*args: str):
    return CliRunner().invoke(build_app(), list(args))


@pytest.mark.parametrize(("output_dir", "reason"), [("..", "holds the recipe"), (".", "holds the recipe"),
                                                    ("../..", "holds the recipe"), ("../data", "holds the data.root")])
@pytest.mark.parametrize("command", ["validate", "prune"])
def test_a_folder_holding_the_recipe_or_data_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        output_dir: str, reason: str, command: str) -> None:
    """`output.dir: ..` replaced the whole clone with four output files; now validate and prune refuse
    (the data's own problems, an image folder with no images, may be listed beside)."""
    clone, recipe = _clone(tmp_path, output_dir)
    monkeypatch.chdir(tmp_path.parent)
    before = _snapshot(tmp_path)
    result = _cli(command, str(recipe))
    assert result.exit_code == 1, result.output
    assert "output.dir:" in result.output and reason in result.output and "Traceback" not in result.output
    assert _snapshot(tmp_path) == before
    assert (clone / ".git" / "HEAD").is_file()


def test_a_folder_holding_the_data_or_the_checkpoint_is_never_replaced(tmp_path: Path) -> None:
    data = tmp_path / "store" / "images"
    (data / "train" / "a").mkdir(parents=True)
    weights = tmp_path / "ckpt" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    assert "holds the data.root" in replace_problem(tmp_path / "store", keep={"data.root": data})
    assert "holds the model.checkpoint" in replace_problem(weights.parent, keep={"model.checkpoint": weights})
    assert replace_problem(tmp_path / "elsewhere", keep={"data.root": data}) is None


def test_the_current_directory_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")  # even an rmtp output folder, while the process stands in it
    with pytest.raises(RmtpError, match="holds the current directory"):
        _save(tmp_path / "run", overwrite=True)
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "run", overwrite=True)


def test_save_keeps_a_users_file_in_the_output_folder(tmp_path: Path) -> None:
    """rmtp.save(..., overwrite=True) deleted a user's notes.txt along with the previous model."""
    out = _save(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(RmtpError, match=r"holds 1 entry rmtp did not write \(notes.txt\); overwrite never deletes"):
        _save(out, overwrite=True)
    assert _snapshot(out) == before


def test_an_export_in_the_output_folder_is_named_and_kept(tmp_path: Path) -> None:
    """`rmtp export` writes model.onnx into the run folder by default: re-running the recipe says so."""
    out = tmp_path / "out"
    _save(out, recipe={"seed": 0}, report={"steps": []})
    (out / "model.onnx").write_bytes(b"onnx")
    recipe = tiny_recipe([{"evaluate": {}}], output=out)
    recipe["output"]["overwrite"] = True
    with pytest.raises(RecipeError, match=r"output.dir: .* \(model.onnx\); overwrite never deletes them"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert (out / "model.onnx").read_bytes() == b"onnx"


def test_what_a_killed_rmtp_write_left_goes_with_the_folder_instead_of_blocking_it(tmp_path: Path) -> None:
    """A SIGKILL during `rmtp export` (or a writability probe) leaves a hidden temp file in the
    output folder; it is rmtp's own, and used to block every later overwrite as a user's file."""
    out = _save(tmp_path / "out")
    (out / ".model.onnx.p7yz3y9a.tmp").write_bytes(b"half an export")  # replace_atomically's temp name
    (out / ".rmtp-probe-7o_u0xnc").write_bytes(b"")  # check_writable's probe
    assert replace_problem(out) is None
    _save(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "rmtp_model.json"]
    for mine in (".notes.tmp", ".model.onnx.tmp", ".model.onnx.p7yz3y9a.tmp.bak", "x.p7yz3y9a.tmp",
                 ".notes.20240101.tmp"):  # a hidden file of the user's with a date: not a temp of rmtp's
        (out / mine).write_text("mine")  # not rmtp's pattern: still a user's
        assert mine in replace_problem(out), mine
        (out / mine).unlink()


def test_a_folder_that_is_not_an_rmtp_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("...")
    with pytest.raises(RmtpError, match=r"not an rmtp output folder \(no rmtp_model.json\)"):
        _save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "..."
    (tmp_path / "mine" / "rmtp_model.json").write_text("{not json")
    with pytest.raises(RmtpError, match="not an rmtp model description"):
        _save(tmp_path / "mine", overwrite=True)


def test_an_rmtp_output_and_an_empty_folder_are_replaced(tmp_path: Path) -> None:
    out = _save(tmp_path / "out", recipe={"seed": 0}, report={"steps": []}, extras=["level-0.30", "path.json"])
    (out / "level-0.30").mkdir()  # the step outputs the caller publishes once the folder is saved
    (out / "path.json").write_text("{}")
    assert json.loads((out / "rmtp_model.json").read_text())["files"] == [
        "model.safetensors", "rmtp_model.json", "recipe.yaml", "report.json", "level-0.30", "path.json"]
    _save(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "rmtp_model.json"]
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "empty", overwrite=True)
    assert rmtp.load(tmp_path / "empty").arch == "vit"


def test_a_folder_saved_before_files_were_listed_knows_its_step_outputs(tmp_path: Path) -> None:
    """Folders of earlier releases name their step outputs only in the report's notes."""
    out = _save(tmp_path / "out")
    meta = json.loads((out / "rmtp_model.json").read_text())
    del meta["files"]
    (out / "rmtp_model.json").write_text(json.dumps(meta))
    (out / "report.json").write_text(json.dumps({"steps": [
        {"notes": ["also saved in the output folder: spp-0.30, solution_path.json"]}]}))
    (out / "spp-0.30").mkdir()
    (out / "solution_path.json").write_text("{}")
    assert replace_problem(out) is None
    (out / "notes.txt").write_text("mine")
    assert "(notes.txt)" in replace_problem(out)


def test_a_foreign_file_appearing_after_validation_stops_the_run_before_step_0(tmp_path: Path) -> None:
    out = _save(tmp_path / "out")
    recipe = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.5}}], output=out)
    recipe["output"]["overwrite"] = True
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    (out / "model.onnx").write_bytes(b"onnx")
    steps: list[object] = []
    with pytest.raises(RmtpError, match=r"r.yaml: output.dir: .*\(model.onnx\)"):
        rmtp.run_recipe(loaded, on_step=steps.append)
    assert steps == [] and (out / "model.onnx").read_bytes() == b"onnx"
