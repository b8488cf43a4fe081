"""Checkpoint traps: nothing lost, nothing silently wrong.

A plain run over an unfinished run's checkpoint is refused (it used to discard it silently); a
damaged or hand-edited checkpoint is one line saying how to start over; a resume on changed data
is refused, naming what changed; every resume says where it continues; SIGTERM is Ctrl-C.

Most tests share one run stopped at a mid-epoch checkpoint (restored before each test, which may
edit it), and stop a resume as soon as it announced its position: what follows is test_resume.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from conftest import REPO, TINY_VIT, tiny_recipe, write_recipe
from PIL import Image
from typer.testing import CliRunner

import rmtp
from rmtp.cli import build_app
from rmtp.data import DataSpec, build_data
from rmtp.data.identity import data_changes, data_identity
from rmtp.errors import RmtpError
from rmtp.run.progress import Progress
from rmtp.run.resume import LATEST_FILE, RUN_FILE, Checkpointer, checkpoint_root, read_checkpoint
from rmtp.storage.output_folder import lock_file

# ------------------------------------------------------------------------------- helpers


def _recipe(folder: Path, name: str = "r.yaml") -> Path:
    steps = [{"prune": "magnitude", "params": {"sparsity": 0.5}},
             {"finetune": {"epochs": 1, "lr": 1e-3, "checkpoint_every": 2}},
             {"evaluate": {}}]
    raw = tiny_recipe(steps, output=folder / "out", seed=0)
    raw["data"] = {"name": "digits", "batch_size": 32, "calibration_size": 32, "eval_limit": 32}
    return write_recipe(folder / name, raw)


def _stop_at_mid_epoch(write: Any) -> Any:
    """Checkpointer.write that stops the run (as a kill would) once a mid-epoch checkpoint is written."""
    def stop(checkpointer: Checkpointer, model: torch.nn.Module, progress: Any, **kwargs: Any) -> None:
        write(checkpointer, model, progress, **kwargs)
        if progress.train is not None and progress.train.batches_done > 0:
            raise KeyboardInterrupt
    return stop


class _Resumed(Exception):
    """Raised by :class:`_Notes` once a resume announced itself: the rest is test_resume.py's."""


class _Notes(Progress):
    """Records the run's notes; stops the run at the first one when ``stop``."""

    def __init__(self, stop: bool = True) -> None:
        self.notes: list[str] = []
        self.stop = stop

    def note(self, message: str) -> None:
        self.notes.append(message)
        if self.stop:
            raise _Resumed(message)


@pytest.fixture(scope="module")
def _mid_epoch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("mid-epoch")
    path = _recipe(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "write", _stop_at_mid_epoch(Checkpointer.write))
        with pytest.raises(KeyboardInterrupt):
            rmtp.run_recipe(rmtp.load_recipe(path))
    root = checkpoint_root(folder / "out")
    shutil.copytree(root, folder / "pristine")
    return path, root, folder / "pristine"


@pytest.fixture
def stopped(_mid_epoch: tuple[Path, Path, Path]) -> Path:
    """The recipe of a run stopped at step 2's (finetune) first mid-epoch checkpoint, after batch 2."""
    path, root, pristine = _mid_epoch
    shutil.rmtree(path.parent / "out", ignore_errors=True)  # a run that wrongly went on saved it
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(pristine, root)
    return path


def _root(path: Path) -> Path:
    return checkpoint_root(path.parent / "out")


def _one_line(result: Any, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _prune(*args: str) -> Any:
    return CliRunner().invoke(build_app(), ["prune", *args])


# ------------------------------------------------------------------------------- plain run over a checkpoint


def test_a_plain_run_over_a_checkpoint_is_refused_naming_its_progress_and_both_ways_out(stopped: Path) -> None:
    root = _root(stopped)
    line = _one_line(_prune(str(stopped)))
    assert line.startswith(f"error: {stopped}: output.dir: {stopped.parent / 'out'}: "), line
    assert f"an unfinished run's checkpoint is at {root}, stopped at step 2 of 3 (finetune), epoch 1 of 1, " \
           f"after batch 2; pass --resume to continue it, or delete {root} to start over" in line
    assert read_checkpoint(stopped.parent / "out").progress.train.batches_done == 2  # kept, untouched


def test_a_plain_run_over_a_corrupt_checkpoint_says_to_delete_it_not_resume(stopped: Path) -> None:
    root = _root(stopped)
    (root / LATEST_FILE).write_text("{not json")
    line = _one_line(_prune(str(stopped)))
    assert "--resume" not in line, line
    assert f"an unfinished run's checkpoint at {root} cannot be resumed (cannot read {root / LATEST_FILE}" in line
    assert line.endswith(f"delete {root} to start over"), line


# ------------------------------------------------------------------------------- hand-edited checkpoints


def _edit_latest(root: Path, edit: Any) -> None:
    latest = json.loads((root / LATEST_FILE).read_text())
    edit(latest)
    (root / LATEST_FILE).write_text(json.dumps(latest))


def _edit_run(root: Path, edit: Any) -> None:
    latest = json.loads((root / LATEST_FILE).read_text())
    run_file = root / f"gen-{latest['generation']:06d}" / RUN_FILE
    payload = torch.load(run_file, weights_only=True)
    edit(payload)
    torch.save(payload, run_file)


@pytest.mark.parametrize(("edit", "named"), [
    (lambda root: _edit_latest(root, lambda d: d.pop("recipe")), f"{LATEST_FILE}: no 'recipe'"),
    (lambda root: _edit_latest(root, lambda d: d.update(generation=str(d["generation"]))),
     f"{LATEST_FILE}: 'generation' is '"),
    (lambda root: _edit_latest(root, lambda d: d.update(model_generation=99)),
     f"{LATEST_FILE}: 'model_generation' is 99"),
    (lambda root: _edit_run(root, lambda d: d.pop("train")), f"{RUN_FILE}: no 'train'"),
    (lambda root: _edit_run(root, lambda d: d.update(next_step=7)), f"{RUN_FILE}: 'next_step' is 7"),
    (lambda root: _edit_run(root, lambda d: d["train"].pop("optimizer")),
     f"{RUN_FILE}: the training state does not fit"),
    (lambda root: _edit_run(root, lambda d: d["train"].update(epoch="one")), f"{RUN_FILE}: 'train.epoch' is 'one'"),
    (lambda root: _edit_run(root, lambda d: d["reports"][0].pop("stats")),
     f"{RUN_FILE}: reports[0] is not a step report"),
], ids=["no-recipe", "generation-string", "model-generation", "no-train", "next-step", "train-field", "epoch",
        "report"])
def test_a_hand_edited_checkpoint_is_one_line_naming_the_file_and_field(stopped: Path, edit: Any, named: str) -> None:
    root = _root(stopped)
    edit(root)
    line = _one_line(_prune(str(stopped), "--resume"))
    assert line.startswith("error: --resume: ") and named in line, line
    assert line.endswith(f"delete {root} and run without --resume to start over"), line


# ------------------------------------------------------------------------------- where a resume continues


def test_a_resume_says_where_it_continues(stopped: Path) -> None:
    notes = _Notes()
    with pytest.raises(_Resumed):
        rmtp.run_recipe(rmtp.load_recipe(stopped), resume=True, progress=notes)
    assert notes.notes == [f"resuming from {_root(stopped)} at step 2 of 3 (finetune), epoch 1 of 1, after batch 2"]


def test_the_resume_line_reaches_the_terminal(stopped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtp.run.pipeline

    def stop(*args: Any, **kwargs: Any) -> Any:  # right after the line: the resumed steps are not this test's
        raise KeyboardInterrupt

    monkeypatch.setattr(rmtp.run.pipeline, "_Run", stop)
    result = _prune(str(stopped), "--resume", "--quiet")
    assert result.exit_code == 130, result.output
    assert f"resuming from {_root(stopped)} at step 2 of 3 (finetune), epoch 1 of 1, after batch 2" \
           in " ".join(result.output.split()), result.output


def test_a_generation_published_but_not_yet_named_by_a_kill_does_not_block_the_resume(stopped: Path) -> None:
    """A kill between renaming a generation into place and replacing latest.json leaves that
    generation on disk, unnamed: the resume writes the same generation number next and must
    replace the orphan, not fail on it (or mistake it for its own)."""
    root = _root(stopped)
    latest = json.loads((root / LATEST_FILE).read_text())["generation"]
    orphan = root / f"gen-{latest + 1:06d}"
    shutil.copytree(root / f"gen-{latest:06d}", orphan)
    (orphan / "from-the-killed-run").write_text("stale")
    result = rmtp.run_recipe(rmtp.load_recipe(stopped), resume=True, progress=_Notes(stop=False))
    assert result.report.steps[-1].stats is not None and not root.exists()


# ------------------------------------------------------------------------------- the data's identity


def test_a_checkpoint_records_the_data_and_an_old_one_without_it_still_resumes(stopped: Path) -> None:
    root = _root(stopped)
    latest = json.loads((root / LATEST_FILE).read_text())
    assert latest["data"] == {"dataset": "digits", "splits": {"train": {"images": 1438}, "val": {"images": 32}}}
    _edit_latest(root, lambda d: d.pop("data"))  # as written before rmtp recorded the data: resumed, unchecked
    notes = _Notes()
    with pytest.raises(_Resumed):
        rmtp.run_recipe(rmtp.load_recipe(stopped), resume=True, progress=notes)
    assert notes.notes[0].startswith("resuming from ")


def _images(root: Path, per_class: int = 10) -> Path:
    for label in ("a", "b", "c"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("L", (16, 16), color=20 * i + 5).save(root / label / f"{i}.png")
    return root


def _imagefolder_recipe(tmp_path: Path, root: Path) -> Path:
    raw = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.5}}, {"evaluate": {}}],
                      output=tmp_path / "out")
    raw["model"]["kwargs"]["num_classes"] = 3
    raw["data"] = {"name": "imagefolder", "root": str(root), "batch_size": 8, "calibration_size": 8,
                   "mean": [0.5], "std": [0.5]}
    return write_recipe(tmp_path / "r.yaml", raw)


def _stop_after_first_step(report: Any) -> None:
    raise KeyboardInterrupt


def test_a_resume_on_changed_images_is_refused_naming_what_changed(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    path = _imagefolder_recipe(tmp_path, root)
    with pytest.raises(KeyboardInterrupt):
        rmtp.run_recipe(rmtp.load_recipe(path), on_step=_stop_after_first_step)
    for image in sorted(root.rglob("*.png"))[::2]:  # half the images deleted
        image.unlink()
    with pytest.raises(RmtpError, match=r"^--resume: the data changed since the checkpoint \(train: 24 → 12 "
                                        r"images; val: 6 → 3 images\); restore it, or delete .*out\.checkpoint"):
        rmtp.run_recipe(rmtp.load_recipe(path), resume=True)


def test_the_same_number_of_other_images_is_a_change_too(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    spec = DataSpec(name="imagefolder", root=root, batch_size=8, calibration_size=8, mean=(0.5,), std=(0.5,))
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "num_classes": 3})
    before = data_identity(spec, build_data(spec, model))
    assert data_changes(before, data_identity(spec, build_data(spec, model))) == []
    noise = (torch.rand(16, 16) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise, mode="L").save(root / "b" / "3.png")  # replaced: same name, other size
    changes = data_changes(before, data_identity(spec, build_data(spec, model)))
    assert len(changes) == 1 and "images as before, but files renamed, replaced or resized" in changes[0]


# ------------------------------------------------------------------------------- SIGTERM


def test_sigterm_is_one_line_like_ctrl_c_and_releases_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtp.run.pipeline

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe([{"evaluate": {}}], output=tmp_path / "out"))

    def terminated(*args: Any, **kwargs: Any) -> Any:  # inside the run, the output folder's lock held
        assert lock_file(tmp_path / "out").exists()
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise AssertionError("SIGTERM would kill the process silently: no handler")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(rmtp.run.pipeline, "build_model", terminated)
    before = signal.getsignal(signal.SIGTERM)
    line = _one_line(_prune(str(path)), code=128 + signal.SIGTERM)
    assert line.startswith("terminated (SIGTERM): the run's result was not saved"), line
    assert not lock_file(tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # restored once the command ended


@pytest.mark.slow
def test_sigterm_mid_fine_tune_keeps_the_checkpoint_and_the_resume_continues(tmp_path: Path) -> None:
    raw = yaml.safe_load(_recipe(tmp_path).read_text())
    raw["steps"][1]["finetune"]["epochs"] = 3
    path = write_recipe(tmp_path / "r.yaml", raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "rmtp", "prune", str(path), "--quiet"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    root, deadline = _root(path), time.time() + 300
    while time.time() < deadline:
        checkpoint = read_checkpoint(tmp_path / "out") if (root / LATEST_FILE).is_file() else None
        if checkpoint is not None and checkpoint.progress.train is not None:
            break
        assert run.poll() is None, "the run finished before the fine-tune checkpointed"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM): the run's result was not saved"), stderr
    assert lines[0].endswith("--resume` continues from the last checkpoint"), stderr
    assert not lock_file(tmp_path / "out").exists() and (root / LATEST_FILE).is_file()
    resumed = subprocess.run([sys.executable, "-m", "rmtp", "prune", str(path), "--resume", "--quiet"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {root} at step 2 of 3 (finetune), epoch " in " ".join(resumed.stderr.split())
    assert not root.exists()
