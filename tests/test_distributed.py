"""The finetune step under torchrun: 2 CPU processes (gloo), DistributedSampler, rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rmtp

from conftest import REPO, tiny_recipe, write_recipe


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
