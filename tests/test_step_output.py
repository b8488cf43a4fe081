"""Extra artefacts of prune steps: staged, published only with the run's model, never half there."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import timm
from conftest import TINY_VIT, tiny_recipe

from rmtp.contract.architecture import ModelSpec
from rmtp.contract.pruner import LayerRow, PruneContext, Pruner, PrunerParams
from rmtp.errors import RmtpError
from rmtp.plugins import get_plugins
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.run.step_output import StagedOutput
from rmtp.storage import saving


def _staged(tmp_path: Path) -> StagedOutput:
    recipe = parse_recipe(tiny_recipe([{"evaluate": {}}], output=tmp_path / "out"), source=tmp_path / "r.yaml")
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    return StagedOutput(tmp_path / "out", spec=spec, arch=get_plugins().architecture("vit"), baseline=spec,
                        recipe=recipe)


def test_entries_appear_only_with_the_saved_model_and_stay_staged_until_discarded(tmp_path: Path) -> None:
    staged = _staged(tmp_path)
    target = staged.write_json("path.json", {"a": 1})
    staged.write_file("figure.bin", lambda path: path.write_bytes(b"\x00\x01"))
    assert target == tmp_path / "out" / "path.json" and not target.exists()
    spec = staged.spec
    saving.save(timm.create_model(spec.name, **spec.kwargs), tmp_path / "out", spec=spec, arch=staged.arch,
                extras=staged.names, add_extras=staged.place_into)
    assert json.loads(target.read_text()) == {"a": 1}
    assert (tmp_path / "out" / "figure.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "out" / saving.META_FILE).read_text())["files"][-2:] == ["path.json", "figure.bin"]
    staging = next(tmp_path.glob(".out.*.extras.partial"))
    assert json.loads((staging / "path.json").read_text()) == {"a": 1}  # still staged: a resume needs them
    staged.discard()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging removed
    assert json.loads(target.read_text()) == {"a": 1}  # the output's own link


@pytest.mark.parametrize("name, message", [("../escape", "not a plain file name"), ("a/b", "not a plain file name"),
                                           ("model.safetensors", "one rmtp reserves"), ("", "not a plain file name")])
def test_bad_names_are_refused(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(RmtpError, match=message):
        _staged(tmp_path).write_json(name, {})


def test_a_name_is_written_once_and_a_discard_leaves_nothing(tmp_path: Path) -> None:
    staged = _staged(tmp_path)
    staged.write_json("x.json", {})
    with pytest.raises(RmtpError, match="already written"):
        staged.write_json("x.json", {})
    staged.discard()
    assert list(tmp_path.iterdir()) == []


class _WritesThenFails(Pruner):
    name = "writes-then-fails"
    description = "test pruner: writes an artefact, then fails"
    kind = "mask"
    Params = PrunerParams

    def prune(self, ctx: PruneContext, params: PrunerParams) -> list[LayerRow]:
        ctx.output.write_json("half.json", {"written": True})
        raise RmtpError("failed after writing")


def test_a_failed_run_publishes_nothing(tmp_path: Path) -> None:
    import rmtp.plugins

    plugins = rmtp.plugins.load_plugins()  # a private registry: the test pruner never leaks into others
    plugins.pruners.add(_WritesThenFails)
    raw = tiny_recipe([{"prune": _WritesThenFails.name}], output=tmp_path / "out")
    with pytest.raises(RmtpError, match="failed after writing"):
        run_recipe(parse_recipe(raw, source=tmp_path / "r.yaml", plugins=plugins))
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder


def test_a_writer_that_creates_nothing_is_an_error_at_once(tmp_path: Path) -> None:
    staged = _staged(tmp_path)
    with pytest.raises(RmtpError, match="returned without creating it"):
        staged.write_file("figure.png", lambda path: None)


def test_published_model_variants_follow_the_umask(tmp_path: Path) -> None:
    staged = _staged(tmp_path)
    spec = staged.spec
    previous = os.umask(0o022)
    try:
        staged.save_model("variant", timm.create_model(spec.name, **spec.kwargs), {"level": 1})
        saving.save(timm.create_model(spec.name, **spec.kwargs), tmp_path / "out", spec=spec, arch=staged.arch,
                    extras=staged.names, add_extras=staged.place_into)
        staged.discard()
    finally:
        os.umask(previous)
    variant = tmp_path / "out" / "variant"
    assert stat.S_IMODE(variant.stat().st_mode) == 0o755  # mkdtemp made it 0700
    assert stat.S_IMODE((variant / saving.WEIGHTS_FILE).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_entries_are_copied_where_the_file_system_refuses_hard_links_and_links_stay_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    staged = _staged(tmp_path)
    staged.write_json("path.json", {"a": 1})
    (tmp_path / "elsewhere.txt").write_text("not rmtp's")
    staged.write_file("pointer", lambda path: path.symlink_to(tmp_path / "elsewhere.txt"))
    spec = staged.spec
    staged.save_model("variant", timm.create_model(spec.name, **spec.kwargs), {"level": 1})

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    saving.save(timm.create_model(spec.name, **spec.kwargs), tmp_path / "out", spec=spec, arch=staged.arch,
                extras=staged.names, add_extras=staged.place_into)
    staged.discard()
    out = tmp_path / "out"
    assert json.loads((out / "path.json").read_text()) == {"a": 1}
    assert (out / "pointer").is_symlink() and (out / "pointer").resolve() == tmp_path / "elsewhere.txt"
    assert (out / "variant" / saving.WEIGHTS_FILE).stat().st_nlink == 1  # a copy, as asked
    assert (tmp_path / "elsewhere.txt").read_text() == "not rmtp's"
