"""The finetune step under torchrun: 2 CPU processes (gloo), DistributedSampler, rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_recipe, wait_for_mid_epoch_checkpoint, write_recipe

import rmtp


@pytest.mark.slow
def test_finetune_runs_data_parallel_under_torchrun(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        [{"prune": "magnitude", "params": {"sparsity": 0.5}},
         {"finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 64, "l1": 1e-6, "distill": {"weight": 0.5}}},
         {"evaluate": {}}],
        output=tmp_path / "out"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rmtp", "prune", str(recipe), "--json", str(tmp_path / "report.json")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("summary ·") == 1, "only rank 0 prints the report"
    report = json.loads((tmp_path / "report.json").read_text())
    finetune = report["steps"][1]
    assert finetune["kind"] == "finetune" and len(finetune["history"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml", "report.json"]  # nothing half-written
    loaded = rmtp.load(tmp_path / "out").model
    # masks survived data-parallel training: the pruned layers are still half zeros
    pruned = report["steps"][0]["layers"]
    for row in pruned:
        weight = loaded.get_submodule(row["layer"]).weight
        assert int(torch.count_nonzero(weight)) <= row["nonzeros_after"]
    assert report["final"]["top1"] == pytest.approx(finetune["stats"]["top1"])


def _torchrun(recipe: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "rmtp", "prune", str(recipe), "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True)


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    import time

    from rmtp.run.resume import checkpoint_root

    def recipe(name: str) -> Path:
        raw = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.5}},
                           {"finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 32, "checkpoint_every": 3,
                                         "distill": {"weight": 0.5}}}], output=tmp_path / name)
        raw["data"]["batch_size"] = 32
        return write_recipe(tmp_path / f"{name}.yaml", raw)

    reference = _torchrun(recipe("reference"), tmp_path)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    run = _torchrun(recipe("killed"), tmp_path)
    root = checkpoint_root(tmp_path / "killed")
    wait_for_mid_epoch_checkpoint(tmp_path / "killed", run, timeout=240)
    # torchrun's workers run in sessions of their own: kill every process of this run by its recipe
    subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "killed.yaml")], check=False)
    run.wait(timeout=60)
    time.sleep(1.0)
    # a kill between publishing a generation and removing the previous one leaves both: the one
    # latest.json names is the checkpoint, and it holds rank 1's mid-epoch training state
    latest = json.loads((root / "latest.json").read_text())["generation"]
    assert not (tmp_path / "killed").exists()
    assert sorted(p.name for p in (root / f"gen-{latest:06d}").glob("train-rank*.pt")) == ["train-rank1.pt"]
    resumed = _torchrun(tmp_path / "killed.yaml", tmp_path, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    want, got = rmtp.load(tmp_path / "reference").model.state_dict(), rmtp.load(tmp_path / "killed").model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)
