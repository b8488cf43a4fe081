"""Bad data through the CLI: one red line naming the file or key, exit code 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import write_recipe
from PIL import Image
from typer.testing import CliRunner

from rmtp.cli import build_app

runner = CliRunner()

#: A 32 px RGB ViT small enough to run a recipe in a second.
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


def _write_split(root: Path, classes: int = 2, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    root / split / f"class{c}" / f"{i}.png")


def _recipe(tmp_path: Path, kwargs: dict, **data) -> Path:
    recipe = {"model": {"name": "vit_tiny_patch16_224", "kwargs": kwargs},
              "data": {"name": "imagefolder", "root": str(tmp_path / "images"), "batch_size": 2, **data},
              "steps": [{"evaluate": {}}]}
    return write_recipe(tmp_path / "recipe.yaml", recipe)


def _error_lines(output: str) -> list[str]:
    """The red lines (the CLI's ``error: ...``), after checking no traceback came with them."""
    assert "Traceback" not in output
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_class_count_mismatch_is_one_line(tmp_path: Path) -> None:
    """No num_classes in kwargs: timm's 1000-class head, which only the built model can tell."""
    _write_split(tmp_path / "images", classes=3)
    result = runner.invoke(build_app(), ["prune", str(_recipe(tmp_path, KWARGS))])
    assert result.exit_code == 1
    [line] = _error_lines(result.output)
    assert line.endswith(f"data.root: {tmp_path / 'images'} has 3 classes but the model's head has 1000 "
                         "outputs; set model.kwargs.num_classes: 3, or use data with 1000 classes")


def test_validate_catches_a_class_count_mismatch(tmp_path: Path) -> None:
    _write_split(tmp_path / "images", classes=3)
    recipe = _recipe(tmp_path, {**KWARGS, "num_classes": 12})
    result = runner.invoke(build_app(), ["validate", str(recipe)])
    assert result.exit_code == 1
    [line] = _error_lines(result.output)
    assert line == (f"error: {recipe}: data.root: {tmp_path / 'images'} has 3 classes but the model's head has "
                    "12 outputs; set model.kwargs.num_classes: 3, or use data with 12 classes")


def test_corrupt_png_in_a_worker_is_one_line(tmp_path: Path) -> None:
    _write_split(tmp_path / "images")
    bad = tmp_path / "images" / "val" / "class1" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header reads, the pixels do not
    result = runner.invoke(build_app(), ["prune", str(_recipe(tmp_path, {**KWARGS, "num_classes": 2}, num_workers=2))])
    assert result.exit_code == 1
    [line] = _error_lines(result.output)
    assert f"data.root: cannot read image {bad}: " in line
