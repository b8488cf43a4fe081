"""Checkpoints and resume: a killed run continues to exactly the weights of one never interrupted.

The uninterrupted run is the reference; every claim is equality with it (``atol=0``), on the CPU
with ``num_workers: 0`` (the documented condition for bit-exactness).
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import REPO, TINY_VIT, tiny_recipe, wait_for_mid_epoch_checkpoint

import rmtp
from rmtp.data import DataSpec, build_data
from rmtp.errors import CheckpointError, RmtpError
from rmtp.run.recipe import parse_recipe
from rmtp.run.resume import RUN_FILE, checkpoint_root, read_checkpoint
from rmtp.training import TrainConfig, TrainState, train


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "drop_rate": 0.1}).eval()


@pytest.fixture(scope="module")
def bundle():
    return build_data(DataSpec(name="digits", batch_size=96, calibration_size=32, eval_limit=64), _model())


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [
    {"epochs": 2, "lr": 1e-3, "seed": 5, "augment": True, "warmup_epochs": 0.5, "distill": {"weight": 0.5}},
    {"epochs": 2, "lr": 1e-3, "seed": 6, "accumulate": 3, "mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}},
    {"epochs": 2, "lr": 1e-3, "seed": 7, "precision": "bf16", "l1": 1e-6},
], ids=["distill-augment", "accumulate-mixup", "bf16"])
def test_resuming_from_any_checkpoint_reaches_the_uninterrupted_weights(bundle, config: dict) -> None:
    config = TrainConfig(**config, checkpoint_every=4)
    teacher = _model(1)
    model = _model()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[:, ::3] = 0
    start = _weights(model)
    checkpoints: list[tuple[TrainState, dict]] = []
    reference = train(model, bundle, config, device="cpu", teacher=teacher, keep_zeros=["blocks.0.mlp.fc1"],
                      penalize=["blocks.0.mlp.fc1"],
                      on_checkpoint=lambda state: checkpoints.append((copy.deepcopy(state), _weights(model))))
    final = _weights(model)
    mid_epoch = [c for c in checkpoints if c[0].batches_done > 0]
    boundary = [c for c in checkpoints if c[0].batches_done == 0]
    assert mid_epoch and boundary, [(s.epoch, s.batches_done) for s, _ in checkpoints]
    for state, weights in (mid_epoch[0], boundary[0], mid_epoch[-1]):
        resumed = _model()
        resumed.load_state_dict(start)  # any weights: the checkpoint's are loaded next, as a resume does
        resumed.load_state_dict(weights)
        torch.manual_seed(1234)  # whatever the process did before: the checkpoint restores every generator
        result = train(resumed, bundle, config, device="cpu", teacher=teacher, keep_zeros=["blocks.0.mlp.fc1"],
                       penalize=["blocks.0.mlp.fc1"], resume=copy.deepcopy(state))
        for key, value in final.items():
            torch.testing.assert_close(resumed.state_dict()[key], value, atol=0, rtol=0, msg=key)
        assert [vars(s) | {"seconds": 0} for s in result.history] == \
               [vars(s) | {"seconds": 0} for s in reference.history]


def test_a_train_state_round_trips_through_weights_only_loading(bundle, tmp_path: Path) -> None:
    states: list[TrainState] = []
    train(_model(), bundle, TrainConfig(epochs=1, lr=1e-3, seed=0, checkpoint_every=2), device="cpu",
          on_checkpoint=states.append)
    torch.save(states[0].to_payload(), tmp_path / "state.pt")
    loaded = TrainState.from_payload(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded.step == states[0].step and torch.equal(loaded.shuffle, states[0].shuffle)
    assert loaded.rng["python"] == states[0].rng["python"]


# ------------------------------------------------------------------------------- recipes


def _recipe(tmp_path: Path, name: str = "r.yaml", output: str = "out", **finetune) -> Path:
    steps = [{"prune": "magnitude", "params": {"sparsity": 0.5}},
             {"finetune": {"epochs": 2, "lr": 1e-3, "distill": {"weight": 1.0}, "checkpoint_every": 2, **finetune}},
             {"evaluate": {}}]
    raw = tiny_recipe(steps, output=tmp_path / output, seed=0)
    raw["data"] = {"name": "digits", "batch_size": 32, "calibration_size": 32, "eval_limit": 64}
    raw["model"]["kwargs"]["depth"] = 4
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rmtp", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_model(tmp_path: Path) -> None:
    reference = _recipe(tmp_path, "reference.yaml", "reference")
    killed = _recipe(tmp_path, "killed.yaml", "killed")
    done = _cli("prune", str(reference), "--quiet")
    assert done.wait(timeout=600) == 0, done.stderr.read()

    run = _cli("prune", str(killed), "--quiet")
    root = checkpoint_root(tmp_path / "killed")
    wait_for_mid_epoch_checkpoint(tmp_path / "killed", run, timeout=300)  # then kill at once
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed").exists()  # nothing half-written
    state = read_checkpoint(tmp_path / "killed").progress
    assert state.next_step == 1 and state.train.epoch in (1, 2)

    resumed = _cli("prune", str(killed), "--resume", "--quiet")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert not root.exists()  # removed once the run completed
    want = rmtp.load(tmp_path / "reference").model.state_dict()
    got = rmtp.load(tmp_path / "killed").model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)


def _interrupt_after(step_index: int):
    """An on_step that stops the run (as a kill would) once step ``step_index`` reported."""
    def on_step(report) -> None:
        if report.index == step_index:
            raise KeyboardInterrupt
    return on_step


def test_resume_after_a_step_redoes_nothing_finished(tmp_path: Path) -> None:
    path = _recipe(tmp_path, epochs=1)
    recipe = rmtp.load_recipe(path)
    with pytest.raises(KeyboardInterrupt):
        rmtp.run_recipe(recipe, on_step=_interrupt_after(0))
    checkpoint = read_checkpoint(recipe.output.dir)
    assert checkpoint.progress.next_step == 1 and checkpoint.progress.train is None

    seen = []
    result = rmtp.run_recipe(rmtp.load_recipe(path), resume=True, on_step=seen.append)
    assert [s.index for s in seen] == [0, 1, 2]
    assert seen[0].to_dict() == checkpoint.progress.reports[0]  # restored, not pruned again
    reference = rmtp.run_recipe(rmtp.load_recipe(_recipe(tmp_path, "b.yaml", "b", epochs=1)))
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    assert result.report.steps[2].stats.top1 == reference.report.steps[2].stats.top1
    assert not checkpoint_root(recipe.output.dir).exists()


def test_a_changed_recipe_is_refused_naming_what_changed(tmp_path: Path) -> None:
    path = _recipe(tmp_path, epochs=1)
    with pytest.raises(KeyboardInterrupt):
        rmtp.run_recipe(rmtp.load_recipe(path), on_step=_interrupt_after(0))
    raw = yaml.safe_load(path.read_text())
    raw["steps"][1]["finetune"]["lr"] = 2e-3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RmtpError, match=r"--resume: the recipe changed since the checkpoint "
                                        r"\(steps\[1\]\.finetune\.lr: 0\.001 → 0\.002\)"):
        rmtp.run_recipe(rmtp.load_recipe(path), resume=True)


def test_resume_without_a_checkpoint_or_output_says_so(tmp_path: Path) -> None:
    with pytest.raises(RmtpError, match=r"--resume: no checkpoint of .*out to resume"):
        rmtp.run_recipe(rmtp.load_recipe(_recipe(tmp_path)), resume=True)
    raw = tiny_recipe([{"evaluate": {}}])
    with pytest.raises(RmtpError, match="--resume: the recipe has no output.dir"):
        rmtp.run_recipe(parse_recipe(raw), resume=True)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rmtp-pwned-by-checkpoint",))


# torch's weights-only unpickler warns that the pickle's protocol is not its default before it refuses it
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_malicious_checkpoint_runs_nothing(tmp_path: Path) -> None:
    path = _recipe(tmp_path, epochs=1)
    with pytest.raises(KeyboardInterrupt):
        rmtp.run_recipe(rmtp.load_recipe(path), on_step=_interrupt_after(0))
    root = checkpoint_root(tmp_path / "out")
    run_file = next(root.glob("gen-*/" + RUN_FILE))
    run_file.write_bytes(pickle.dumps({"schema": "rmtp-checkpoint/1", "x": _Boom()}))
    marker = Path("/tmp/rmtp-pwned-by-checkpoint")
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"--resume: cannot read .*run\.pt: UnpicklingError"):
        rmtp.run_recipe(rmtp.load_recipe(path), resume=True)
    assert not marker.exists()


def test_checkpoints_can_be_turned_off(tmp_path: Path) -> None:
    raw = yaml.safe_load(_recipe(tmp_path, epochs=1).read_text())
    raw["output"]["checkpoints"] = False
    seen = []

    def watch(report) -> None:
        seen.append(checkpoint_root(tmp_path / "out").exists())

    rmtp.run_recipe(parse_recipe(raw, source=tmp_path / "r.yaml"), on_step=watch)
    assert seen == [False, False, False]
