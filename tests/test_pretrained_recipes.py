"""The recipes for a user's own pretrained model and images (recipes/pretrained/) validate as written,
and run on the real ViT-Ti where ../shared/realdata exists, so they cannot rot.

They name timm's pretrained weights (network) and the user's image folder, which a test has neither
of: validation builds the model on the meta device (no download) with only ``data.root`` and the
output redirected; the run (slow, skipped without the real data) points ``model.checkpoint`` and
``data.root`` at ../shared/realdata and shrinks the image counts, every step and its params as the
recipe has them. No test asserts the recipe's accuracy or speed figures: those are measurements,
quoted with their command in the recipe's header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO

import rmtp
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import PruneStep, parse_recipe

RECIPES = sorted((REPO / "recipes" / "pretrained").glob("*.yaml"))
REALDATA = REPO.parent / "shared" / "realdata"
CHECKPOINT = REALDATA / "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
IMAGES = REALDATA / "imagenet-sample"


def _copy(path: Path, root: Path, tmp_path: Path) -> dict[str, Any]:
    """The recipe as written, but for data.root and the output folder."""
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {**raw["data"], "root": str(root)}
    raw["output"] = {**raw["output"], "dir": str(tmp_path / "out")}
    return raw


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two class folders of two small PNGs: what validation needs of ``data.root``."""
    from PIL import Image

    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (index * 90, 40, 200)).save(root / name / f"{index}.png")
    return root


def test_there_are_pretrained_recipes() -> None:
    assert [p.name for p in RECIPES] == ["vit-tome-budget.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_pretrained_recipe_is_written_for_a_users_model_and_images(path: Path) -> None:
    """Pretrained weights, the user's image folder, every prune step under an accuracy budget, and
    a header that says what it gave on the real model."""
    raw = yaml.safe_load(path.read_text())
    assert raw["model"]["pretrained"] is True
    assert raw["data"]["name"] == "imagefolder" and raw["data"]["root"] == "../../data/my-images"
    prunes = [step for step in raw["steps"] if "prune" in step]
    assert prunes and all(step["accuracy_budget"] for step in prunes)
    assert "What it gives on the real ViT-Ti" in path.read_text()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_pretrained_recipe_validates(path: Path, image_folder: Path, tmp_path: Path) -> None:
    recipe = parse_recipe(_copy(path, image_folder, tmp_path), source=path)
    assert recipe.model.pretrained
    assert all(step.accuracy_budget is not None for step in recipe.steps if isinstance(step, PruneStep))


@pytest.mark.slow
@pytest.mark.skipif(not (CHECKPOINT.is_dir() and IMAGES.is_dir()),
                    reason=f"{REALDATA} (the real ViT-Ti and ImageNet sample) is absent")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_pretrained_recipe_runs_on_the_real_model(path: Path, tmp_path: Path) -> None:
    """Every step as written, on the real checkpoint and images, with few images: the budget
    searches and records its choice, the evaluate step scores top-1, and the saved folder reloads
    the same weights."""
    raw = _copy(path, IMAGES, tmp_path)
    raw["model"] = {"name": raw["model"]["name"], "checkpoint": str(CHECKPOINT)}
    raw["data"] = {**raw["data"], "calibration_size": 24, "eval_limit": 8, "batch_size": 8}
    for step in raw["steps"]:
        if "prune" in step:
            step["accuracy_budget"] = {**step["accuracy_budget"], "evaluations": 3}
        elif "evaluate" in step:
            step["evaluate"] = {**(step["evaluate"] or {}), "latency": False}
    result = run_recipe(parse_recipe(raw, source=path))
    pruned = [report for report in result.report.steps if report.agreement is not None]
    assert pruned and all(report.agreement["budget"]["trials"] for report in pruned)
    assert all(report.agreement["images"] == 24 for report in pruned)
    assert [s.stats.top1 for s in result.report.steps if s.stats.top1 is not None]
    loaded = rmtp.load(tmp_path / "out").model.eval()
    saved = loaded.state_dict()
    assert all(torch.equal(saved[key], value) for key, value in result.model.state_dict().items())
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same weights; a GEMM's summation order may differ with memory layout
        torch.testing.assert_close(loaded(images), result.model.eval()(images), atol=1e-6, rtol=1e-5)
