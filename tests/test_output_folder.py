"""Output folders under kills, concurrent writers, odd umasks and failed saves.

A killed writer's leftovers are cleared by the next one, a second writer is refused while the
first holds the folder, the folder always holds a whole model, and permissions follow the umask.
Children are forked processes, because flock and SIGKILL are about processes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe
from torch import nn

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.pruner import LayerRow, PruneContext, Pruner, PrunerParams
from rmtp.errors import RmtpError
from rmtp.plugins import get_plugins
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage import output_folder, saving
from rmtp.storage.output_folder import lock_file
from rmtp.storage.saving import META_FILE, WEIGHTS_FILE, output_lock, save

SPEC = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))

def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(SPEC.name, **SPEC.kwargs).eval()


def _save(model: nn.Module, out: Path, **kwargs) -> Path:
    return save(model, out, spec=SPEC, arch=get_plugins().architecture("vit"), **kwargs)


def _block_then_sleep(ready: Path) -> None:
    ready.touch()
    time.sleep(120)


def _save_blocking(out: Path, ready: Path, block: str) -> None:
    """Child: overwrite ``out`` with model 1, stopping for good where ``block`` says, to be SIGKILLed."""
    if block == "writing":  # the weights half staged
        real_writer = saving.write_safetensors_atomic

        def writer(*args, **kwargs) -> None:
            real_writer(*args, **kwargs)
            _block_then_sleep(ready)

        saving.write_safetensors_atomic = writer
    else:  # no atomic exchange: between the two renames
        real_replace = os.replace

        def replace(src, dst) -> None:
            real_replace(src, dst)
            if str(dst).endswith(".old"):
                _block_then_sleep(ready)

        output_folder._exchange = lambda a, b: False
        os.replace = replace
    _save(_model(1), out, overwrite=True)


def _save_repeatedly(out: Path, ctl: Path, seed: int, times: int) -> None:
    """Child: save ``times`` times once told to go; only a clear refusal may stop a save."""
    model = _model(seed)
    (ctl / f"ready-{seed}").touch()
    while not (ctl / "go").exists():
        time.sleep(0.005)
    saved = refused = 0
    for _ in range(times):
        try:
            _save(model, out, overwrite=True)
            saved += 1
        except RmtpError as exc:
            if "held by another rmtp process" not in str(exc):
                raise
            refused += 1
    (ctl / f"result-{seed}.json").write_text(json.dumps({"saved": saved, "refused": refused}))


def _fork(target, *args) -> multiprocessing.Process:
    """A child process that starts at once: forked, it already has torch and timm imported.
    (flock and SIGKILL are about processes: threads would not show what these tests check.)"""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    return child


def _wait_ready(child: multiprocessing.Process, ready: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if not child.is_alive():
            pytest.fail(f"child ended (exit code {child.exitcode}) before it got there")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("child never got there")
        time.sleep(0.01)


def _kill_mid_save(tmp_path: Path, block: str) -> Path:
    """Save model 0 to models/out, then SIGKILL a child while it overwrites it with model 1."""
    out = tmp_path / "models" / "out"
    _save(_model(0), out)
    ready = tmp_path / "ready"
    child = _fork(_save_blocking, out, ready, block)
    _wait_ready(child, ready)
    child.kill()  # SIGKILL: no handler, no finally
    child.join()
    return out


def _same_weights(out: Path, model: nn.Module) -> bool:
    return torch.equal(rmtp.load(out).model.head.weight, model.head.weight)


def test_a_save_killed_while_writing_leaves_the_old_model_and_the_next_save_clears_up(tmp_path: Path) -> None:
    out = _kill_mid_save(tmp_path, "writing")
    assert _same_weights(out, _model(0)), "the folder still holds the previous whole model"
    left = sorted(p.name for p in out.parent.iterdir())
    assert ".out.lock" in left and any(name.endswith(".partial") for name in left), left
    _save(_model(2), out, overwrite=True)
    assert _same_weights(out, _model(2))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "stale entries were cleaned"


def test_a_save_killed_between_the_renames_gets_the_old_model_back(tmp_path: Path) -> None:
    out = _kill_mid_save(tmp_path, "renaming")
    assert not out.exists() and any(p.name.endswith(".old") for p in out.parent.iterdir())
    with output_lock(out):  # the next writer (or run) to take the folder puts the old model back
        pass
    assert _same_weights(out, _model(0))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_stale_retire_folder_of_the_same_pid_does_not_block_overwriting(tmp_path: Path) -> None:
    # rmtp 0.1.0 retired the old folder to .NAME.old-<pid>: left by a killed PID 1 in a container,
    # it made every later overwrite by the next PID 1 fail with "Directory not empty".
    out = _save(_model(0), tmp_path / "out")
    stale = tmp_path / f".out.old-{os.getpid()}"
    stale.mkdir()
    (stale / "junk").write_text("left by a killed run")
    _save(_model(1), out, overwrite=True)
    assert _same_weights(out, _model(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_writers_never_race_and_the_folder_always_loads(tmp_path: Path) -> None:
    out, ctl = tmp_path / "models" / "out", tmp_path / "ctl"
    ctl.mkdir()
    children = [_fork(_save_repeatedly, out, ctl, seed, 30) for seed in (1, 2)]
    for seed, child in zip((1, 2), children):
        _wait_ready(child, ctl / f"ready-{seed}")
    (ctl / "go").touch()
    atomic_swap = _exchange_works(tmp_path)  # elsewhere the folder is briefly missing while replaced
    while any(child.is_alive() for child in children):
        if atomic_swap and out.exists():
            assert saving.is_saved_model(out)
            rmtp.load(out)  # whole at every moment, not only at the end
    for child in children:
        child.join()
        assert child.exitcode == 0, "a writer failed with something other than the clear refusal"
    results = [json.loads((ctl / f"result-{seed}.json").read_text()) for seed in (1, 2)]
    assert sum(r["saved"] for r in results) >= 1 and sum(r["saved"] + r["refused"] for r in results) == 60
    rmtp.load(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def _exchange_works(tmp_path: Path) -> bool:
    (tmp_path / "swap-a").mkdir()
    (tmp_path / "swap-b").mkdir()
    works = output_folder._exchange(tmp_path / "swap-a", tmp_path / "swap-b")
    (tmp_path / "swap-a").rmdir()
    (tmp_path / "swap-b").rmdir()
    return works


def _hold_elsewhere(out: Path, pid: int = 4242) -> int:
    """Lock ``out`` through a separate open file, as another process would."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file(out), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{pid}\n".encode())
    return fd


def test_a_held_folder_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    fd = _hold_elsewhere(tmp_path / "out")
    try:
        with pytest.raises(RmtpError, match=r"out is held by another rmtp process \(pid 4242\)"):
            _save(_model(0), tmp_path / "out")
    finally:
        os.close(fd)
    _save(_model(0), tmp_path / "out")  # free again once the holder is gone
    assert not lock_file(tmp_path / "out").exists(), "the lock file goes with its holder"


def test_a_run_holds_its_output_folder_from_before_step_0_until_saved(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    recipe = parse_recipe(tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.5}}], output=out),
                          source=tmp_path / "r.yaml")
    fd = _hold_elsewhere(out)
    try:
        with monkeypatch.context() as patch:
            patch.setattr("rmtp.run.pipeline.build_model", lambda *a: pytest.fail("worked on a held folder"))
            with pytest.raises(RmtpError, match="held by another rmtp process"):
                run_recipe(recipe)
    finally:
        os.close(fd)

    def try_to_take_it(step_report) -> None:
        other = os.open(lock_file(out), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)

    run_recipe(recipe, on_step=try_to_take_it)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_entries_of_other_folders_are_never_taken_for_stale_ones() -> None:
    for other in (".m.x.0123456789abcdef.partial", ".m.extras.0123456789abcdef.partial", ".m.x.lock",
                  ".m.0123456789abcdef.0123456789abcdef.old", ".m.lock", "m"):
        assert output_folder._entry_kind("m", other) is None, other
    for own, kind in ((".m.0123456789abcdef.partial", "partial"), (".m.0123456789abcdef.extras.partial", "partial"),
                      (".m.0123456789abcdef.old", "old"), (".m.ab_cd123.partial", "partial"), (".m.old-1", "old")):
        assert output_folder._entry_kind("m", own) == kind, own


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_folders_and_files_follow_the_umask(tmp_path: Path, umask: int, folder_mode: int,
                                                 file_mode: int) -> None:
    previous = os.umask(umask)
    try:
        out = _save(_model(0), tmp_path / "out", recipe={"seed": 0}, report={"ok": True})
        _save(_model(1), out, recipe={"seed": 0}, report={"ok": True}, overwrite=True)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    for name in (WEIGHTS_FILE, META_FILE, "recipe.yaml", "report.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == file_mode, name


class _WritesANote(Pruner):
    name = "writes-a-note"
    description = "test pruner: writes one step output and prunes nothing"
    kind = "mask"
    Params = PrunerParams

    def prune(self, ctx: PruneContext, params: PrunerParams) -> list[LayerRow]:
        ctx.output.write_json("note.json", {"kept": True})
        return []


def test_a_failed_save_after_the_run_keeps_the_result_elsewhere(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    import rmtp.plugins

    plugins = rmtp.plugins.load_plugins()
    plugins.pruners.add(_WritesANote)  # a private registry, passed where it is used
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = tmp_path / "models" / "out"
    real_save = saving.save

    def disk_full_at(target: Path):
        def save(model, out_dir, **kwargs):
            if Path(out_dir) == target:
                raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))
            return real_save(model, out_dir, **kwargs)
        return save

    monkeypatch.setattr(saving, "save", disk_full_at(out))
    recipe = parse_recipe(tiny_recipe([{"prune": _WritesANote.name}], output=out), source=tmp_path / "r.yaml",
                          plugins=plugins)
    with pytest.raises(RmtpError, match=r"No space left on device.*; it was saved to .*rmtp-rescued-") as caught:
        run_recipe(recipe, plugins=plugins)
    rescued = Path(str(caught.value).rsplit(" to ", 1)[1].removesuffix(" instead"))
    assert rescued.parent.parent == tmp_path / "tmp" and rescued.name == "out"
    rmtp.load(rescued, plugins=plugins)
    assert json.loads((rescued / "note.json").read_text()) == {"kept": True}
    assert json.loads((rescued / "report.json").read_text())["output_dir"] == str(rescued)
    assert list((tmp_path / "models").iterdir()) == [], "no output folder, no staging left behind"


# ------------------------------------------------------------------ the end of a run: output, extras, checkpoint


def _note_recipe(tmp_path: Path, plugins, **output: object):
    raw = tiny_recipe([{"prune": _WritesANote.name}, {"evaluate": {}}], output=tmp_path / "out")
    raw["output"].update(overwrite=True, **output)
    raw["data"] = {"name": "digits", "batch_size": 32, "calibration_size": 32, "eval_limit": 32}
    return parse_recipe(raw, source=tmp_path / "r.yaml", plugins=plugins)


def _note_plugins():
    import rmtp.plugins

    plugins = rmtp.plugins.load_plugins()
    plugins.pruners.add(_WritesANote)  # a private registry, passed where it is used
    return plugins


@pytest.mark.parametrize("checkpoints", [True, False])
def test_the_folder_renamed_into_place_already_holds_the_step_outputs(tmp_path: Path, checkpoints: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Model and step outputs appear in one rename: no kill leaves a new model without its extras
    (they used to be moved in one by one after the model's rename)."""
    renamed: list[list[str]] = []
    real_move = saving.move_into_place

    def watch(staging: Path, out_dir: Path) -> None:
        if Path(out_dir) == tmp_path / "out":  # not a checkpoint's model
            renamed.append(sorted(p.name for p in staging.iterdir()))
        real_move(staging, out_dir)

    monkeypatch.setattr(saving, "move_into_place", watch)
    plugins = _note_plugins()
    run_recipe(_note_recipe(tmp_path, plugins, checkpoints=checkpoints), plugins=plugins)
    assert len(renamed) == 1 and "note.json" in renamed[0] and META_FILE in renamed[0]
    assert json.loads((tmp_path / "out" / "note.json").read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no checkpoint left


def test_a_kill_after_the_save_before_the_checkpoint_is_removed_resumes_with_the_step_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed once the output was saved (checkpoint and staged extras still there): the resume
    saves the output again, with the extras the checkpoint records (they used to be gone by then)."""
    from rmtp.run.resume import Checkpointer, checkpoint_root
    from rmtp.run.step_output import StagedOutput

    plugins = _note_plugins()
    with monkeypatch.context() as patch:  # what runs after the save, a kill never runs
        patch.setattr(Checkpointer, "remove", lambda self: None)
        patch.setattr(StagedOutput, "discard", lambda self: self._held.close())
        run_recipe(_note_recipe(tmp_path, plugins), plugins=plugins)
    assert (tmp_path / "out" / "note.json").is_file() and checkpoint_root(tmp_path / "out").is_dir()
    with pytest.raises(RmtpError, match="pass --resume to continue it"):
        run_recipe(_note_recipe(tmp_path, plugins), plugins=plugins)
    run_recipe(_note_recipe(tmp_path, plugins), plugins=plugins, resume=True)
    assert json.loads((tmp_path / "out" / "note.json").read_text()) == {"kept": True}
    assert "note.json" in json.loads((tmp_path / "out" / META_FILE).read_text())["files"]
    assert not checkpoint_root(tmp_path / "out").exists()


def test_a_kill_while_the_checkpoint_is_removed_leaves_no_checkpoint_only_leftovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """latest.json goes first: a kill in the middle of the removal leaves generations and staged
    extras the next run replaces, not a checkpoint naming a generation already deleted (which
    refused every later run as damaged)."""
    import shutil

    import rmtp.run.resume
    from rmtp.run.resume import checkpoint_root

    plugins = _note_plugins()
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # removing the checkpoint: its generations go, then the kill
        if Path(path) != checkpoint_root(tmp_path / "out"):
            return real_rmtree(path, ignore_errors=ignore_errors)
        for generation in sorted(Path(path).glob("gen-*")):
            real_rmtree(generation)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # shutil is one module: every other rmtree passes through
        patch.setattr(rmtp.run.resume.shutil, "rmtree", killed_midway)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(_note_recipe(tmp_path, plugins), plugins=plugins)
    root = checkpoint_root(tmp_path / "out")
    assert root.is_dir() and (tmp_path / "out" / "note.json").is_file()
    run_recipe(_note_recipe(tmp_path, plugins), plugins=plugins)  # a plain rerun: nothing to resume
    assert json.loads((tmp_path / "out" / "note.json").read_text()) == {"kept": True}
    assert not root.exists()
