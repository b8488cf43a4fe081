"""The recipes for a user's own pretrained model and images (recipes/pretrained/) validate as written,
and run on the real ViT-Ti where ../shared/realdata exists, so they cannot rot.

They name timm's pretrained weights (network) and the user's image folder, which a test has neither
of. Validation parses the recipe and preflights it (``rmtp validate``: the model built on the meta
device, no download, every step checked against it) with only ``data.root`` and the output
redirected. A smoke run swaps in a tiny random-init model of the same family on a tiny image
folder; the run on the real model (slow, skipped without ../shared/realdata) points
``model.checkpoint`` and ``data.root`` there and shrinks the image counts. Both keep every step and
its params as the recipe has them. No test asserts the recipe's accuracy or speed figures: those
are measurements, quoted in the recipe's header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, write_png

import rmtp
from rmtp.data import model_input_size
from rmtp.run.pipeline import run_recipe
from rmtp.run.preflight import preflight
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


#: The tiny stand-in of each recipe's model: the same timm class (the same architecture plugin),
#: random init, 32 px inputs, 3 classes.
TINY_MODELS = {"vit_tiny_patch16_224": {"name": "vit_tiny_patch16_224", "pretrained": False,
                                        "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2,
                                                   "num_heads": 2, "num_classes": 3}}}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three class folders of six random 32×32 PNGs: enough for an accuracy budget's images."""
    root = tmp_path / "images"
    for c, name in enumerate(("a", "b", "c")):
        for index in range(6):
            write_png(root / name / f"{index}.png", (32, 32), seed=10 * c + index)
    return root


@pytest.fixture(scope="module")
def imagenet_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1000 class folders of one 4×4 PNG: a folder a 1000-class pretrained head accepts (preflight
    checks that the classes match the head)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet-layout")
    for index in range(1000):
        (root / f"n{index:08d}").mkdir()
        Image.new("RGB", (4, 4), (index % 256, 0, 0)).save(root / f"n{index:08d}" / "0.png")
    return root


def _shrunk(raw: dict[str, Any], *, calibration: int, batch: int, eval_limit: int) -> dict[str, Any]:
    """``raw`` with few images: fewer calibration and val images, 3 budget candidates per prune
    step, no latency timing; every step and its params as they were."""
    raw["data"] = {**raw["data"], "calibration_size": calibration, "batch_size": batch, "eval_limit": eval_limit}
    for step in raw["steps"]:
        if "prune" in step:
            step["accuracy_budget"] = {**step["accuracy_budget"], "evaluations": 3}
        elif "evaluate" in step:
            step["evaluate"] = {**(step["evaluate"] or {}), "latency": False}
    return raw


def _check_run(result: Any, recipe: Any, output: Path, calibration: int) -> None:
    """Every step ran, every prune step searched its budget on ``calibration`` images, and the saved
    folder reloads the same weights."""
    assert len(result.report.steps) == len(recipe.steps)
    pruned = [report for report in result.report.steps if report.agreement is not None]
    assert pruned and all(report.agreement["budget"]["trials"] for report in pruned)
    assert all(report.agreement["images"] == calibration for report in pruned)
    assert [s.stats.top1 for s in result.report.steps if s.stats.top1 is not None]
    loaded = rmtp.load(output).model.eval()
    saved = loaded.state_dict()
    assert all(torch.equal(saved[key], value) for key, value in result.model.state_dict().items())
    images = torch.randn(2, *model_input_size(loaded), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same weights; a GEMM's summation order may differ with memory layout
        torch.testing.assert_close(loaded(images), result.model.eval()(images), atol=1e-6, rtol=1e-5)


def test_there_are_pretrained_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"vit-tome-budget.yaml"}


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
def test_pretrained_recipe_validates(path: Path, imagenet_layout: Path, tmp_path: Path) -> None:
    recipe = parse_recipe(_copy(path, imagenet_layout, tmp_path), source=path)
    assert recipe.model.pretrained
    assert all(step.accuracy_budget is not None for step in recipe.steps if isinstance(step, PruneStep))
    assert preflight(recipe).warnings == []  # the real model's structure, every step checked against it


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_pretrained_recipe_runs_on_a_tiny_model_of_its_family(path: Path, image_folder: Path,
                                                              tmp_path: Path) -> None:
    raw = _copy(path, image_folder, tmp_path)
    raw["model"] = TINY_MODELS[raw["model"]["name"].split(".")[0]]
    recipe = parse_recipe(_shrunk(raw, calibration=8, batch=4, eval_limit=4), source=path)
    _check_run(run_recipe(recipe), recipe, tmp_path / "out", calibration=8)


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
    recipe = parse_recipe(_shrunk(raw, calibration=24, batch=8, eval_limit=8), source=path)
    _check_run(run_recipe(recipe), recipe, tmp_path / "out", calibration=24)
