"""The scale recipes (recipes/imagenet/: the seeds' headline experiments for a GPU and ImageNet)
validate, and run end to end on a tiny image folder, so they cannot rot.

They need ImageNet, a GPU and timm's pretrained weights (network), none of which a test has: each
recipe is read as written and only what makes it run in seconds here is overridden — ``data.root``
(a 3-class folder of real digits images as PNGs), ``device: cpu``, the model swapped for a tiny,
random-init timm model of the same family (same architecture plugin, ``pretrained: false``), batch
sizes, loader workers, ``data.eval_limit``, ``finetune.max_steps``, spp's search length and
``evaluate.latency``. Every step, its pruner and its other params stay as the recipe has them.
tests/test_recipes_examples.py covers the other recipes (recipes/*.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO

import rmtp
from rmtp.data import model_input_size
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import FinetuneStep, parse_recipe

SCALE = REPO / "recipes" / "imagenet"
RECIPES = sorted(SCALE.glob("*.yaml"))
CLASSES = 3
IMAGES_PER_CLASS = 4
IMG_SIZE = 32

#: The tiny stand-in per model family: the recipe's timm name prefix → a model of the same timm
#: class (the same architecture plugin), random init, 32 px inputs, 3 classes.
TINY_KWARGS = {"img_size": IMG_SIZE, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
               "mlp_ratio": 2.0, "num_classes": CLASSES}
TINY_MODELS = {"vit_base_patch16_224": "vit_tiny_patch16_224", "deit_small_patch16_224": "deit_tiny_patch16_224"}


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder in ImageNet's layout: train/ and val/, each with 3 class folders of 4 RGB
    PNGs at 32×32 — real handwritten digits (scikit-learn's, 0, 1 and 2) upsampled."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("imagenet")
    for split, offset in (("train", 0), ("val", IMAGES_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"n0000000{label}"
            folder.mkdir(parents=True)
            images = digits.images[digits.target == label][offset:offset + IMAGES_PER_CLASS]
            for index, image in enumerate(images):
                grey = Image.fromarray((image * (255 / 16)).astype("uint8"), mode="L")
                grey.resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR).convert("RGB").save(folder / f"{index}.png")
    return root


def _raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _tiny_model(model: dict[str, Any]) -> dict[str, Any]:
    base = model["name"].split(".")[0]
    assert base in TINY_MODELS, f"no tiny stand-in for {model['name']}: add one to TINY_MODELS"
    return {"name": TINY_MODELS[base], "kwargs": dict(TINY_KWARGS), "pretrained": False}


def _validation_copy(path: Path, root: Path, tmp_path: Path) -> dict[str, Any]:
    """The recipe as written, but for data.root, the device and the output folder."""
    raw = _raw(path)
    raw["data"] = {**raw["data"], "root": str(root)}
    raw["device"] = "cpu"
    raw["output"] = {**raw["output"], "dir": str(tmp_path / "out")}
    return raw


def _smoke_copy(path: Path, root: Path, tmp_path: Path) -> dict[str, Any]:
    """The recipe shrunk to seconds: tiny model, small batches, 2 optimizer steps per fine-tune."""
    raw = _validation_copy(path, root, tmp_path)
    raw["model"] = _tiny_model(raw["model"])
    raw["data"] = {**raw["data"], "batch_size": 4, "num_workers": 0, "eval_limit": 6,
                   "calibration_size": min(raw["data"].get("calibration_size", 256), 8)}
    for step in raw["steps"]:
        if "finetune" in step:
            # workers stay on (1) so that pin_memory and persistent_workers are exercised
            step["finetune"] = {**step["finetune"], "max_steps": 2, "batch_size": 4, "num_workers": 1}
        elif "evaluate" in step:
            step["evaluate"] = {**(step["evaluate"] or {}), "latency": False}
        elif step.get("prune") == "spp":
            step["params"] = {**step["params"], "steps": 3, "batch_size": 4}
    return raw


def test_there_are_scale_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"vit-b16-svd-mp.yaml", "vit-b16-nm-tome.yaml", "deit-s-spp.yaml"}


def test_every_recipe_is_covered_by_a_test() -> None:
    """recipes/*.yaml is tests/test_recipes_examples.py's, recipes/imagenet/*.yaml this file's,
    recipes/pretrained/*.yaml tests/test_pretrained_recipes.py's: a recipe anywhere else under
    recipes/ would be tested by none."""
    everything = set((REPO / "recipes").glob("**/*.yaml"))
    pretrained = set((REPO / "recipes" / "pretrained").glob("*.yaml"))
    assert everything == set((REPO / "recipes").glob("*.yaml")) | set(RECIPES) | pretrained


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_scale_recipe_is_written_for_a_gpu_and_imagenet(path: Path) -> None:
    """What makes it a scale recipe: pretrained weights, ImageNet in image-folder layout, CUDA,
    bf16 fine-tuning with loader workers and checkpoints, and the paper's number to compare with."""
    raw = _raw(path)
    assert raw["model"]["pretrained"] is True
    assert raw["data"]["name"] == "imagefolder" and raw["data"]["root"] == "../../data/imagenet"
    assert raw["device"] == "cuda"
    text = path.read_text()
    assert "Compare with: seed 00" in text
    finetunes = [step["finetune"] for step in raw["steps"] if "finetune" in step]
    assert finetunes
    for finetune in finetunes:
        assert finetune["precision"] == "bf16"  # fp16 would be refused on the CPU, where this is tested
        assert finetune["num_workers"] > 0 and finetune["pin_memory"] and finetune["persistent_workers"]
        assert finetune["checkpoint_every"] and finetune["distill"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_scale_recipe_validates(path: Path, tiny_imagenet: Path, tmp_path: Path) -> None:
    """Parsed and validated as written (``pretrained: true`` downloads nothing), with only data.root,
    device and output redirected. Not preflighted: the tiny folder's 3 classes do not match the
    pretrained 1000-class head; the smoke run below checks every step on a model of the family."""
    recipe = parse_recipe(_validation_copy(path, tiny_imagenet, tmp_path), source=path)
    assert recipe.model.pretrained
    assert any(isinstance(step, FinetuneStep) for step in recipe.steps)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator:UserWarning")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_scale_recipe_runs_end_to_end(path: Path, tiny_imagenet: Path, tmp_path: Path) -> None:
    """Every step of the recipe runs on the tiny folder (bf16 fine-tuning on the CPU, KD, the
    recipe's pruner params), the output is saved, and it reloads to the same function."""
    recipe = parse_recipe(_smoke_copy(path, tiny_imagenet, tmp_path), source=path)
    result = run_recipe(recipe)
    assert len(result.report.steps) == len(recipe.steps)
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file()
    assert not (tmp_path / "out.checkpoint").exists()  # removed when the run completes
    loaded = rmtp.load(out).model.eval()
    # the saved weights are the run's, bit for bit ...
    saved_state, run_state = loaded.state_dict(), result.model.state_dict()
    assert saved_state.keys() == run_state.keys()
    assert all(torch.equal(saved_state[key], run_state[key]) for key in run_state)
    # ... and compute the same function: to float rounding only, since a GEMM's summation order
    # depends on its operands' memory layout and alignment (a sliced or fine-tuned parameter is
    # laid out unlike one read from the file), which differs in the last bits (seen: 7e-8)
    images = torch.randn(4, *model_input_size(result.model), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), result.model.eval()(images), atol=1e-6, rtol=1e-5)
    evaluated = [s.stats.top1 for s in result.report.steps if s.stats.top1 is not None]
    assert evaluated and all(0 <= t <= 100 for t in evaluated)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [s["finetune"]["precision"] for s in saved["steps"] if "finetune" in s] == ["bf16"]
    for step in _raw(path)["steps"]:
        if step.get("prune") == "n:m":  # the pattern survived fine-tuning and the save
            from rmtp_plugins.nm import check_nm

            n, m = step["params"]["n"], step["params"]["m"]
            linears = [mod for name, mod in loaded.named_modules()
                       if name.startswith("blocks.") and isinstance(mod, torch.nn.Linear)]
            assert linears and all(check_nm(mod.weight, n, m).ok for mod in linears)
