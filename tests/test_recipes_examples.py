"""Every example recipe in recipes/ validates, and the small ones run end to end, so none can rot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

import rmtp
from rmtp.data import model_input_size
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _as_local(path: Path, tmp_path: Path) -> dict:
    """The recipe with its output redirected into tmp_path, so tests never touch runs/."""
    raw = yaml.safe_load(path.read_text())
    if raw.get("output"):
        raw["output"] = {**raw["output"], "dir": str(tmp_path / "out"), "overwrite": False}
    return raw


def test_there_are_example_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path: Path, tmp_path: Path) -> None:
    parse_recipe(_as_local(path, tmp_path), source=path)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in RECIPES if "# test: run" in p.read_text()], ids=lambda p: p.stem)
def test_small_recipe_runs_end_to_end(path: Path, tmp_path: Path) -> None:
    """Recipes marked '# test: run' (small models, digits) run completely and save their output,
    which reloads to the same function."""
    recipe = parse_recipe(_as_local(path, tmp_path), source=path)
    result = run_recipe(recipe)
    assert len(result.report.steps) == len(recipe.steps)
    if recipe.output is not None:
        assert (tmp_path / "out" / "model.safetensors").is_file()
        loaded = rmtp.load(tmp_path / "out").model.eval()
        images = torch.randn(4, *model_input_size(result.model), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), result.model.eval()(images), atol=0, rtol=0)
    evaluated = [s.stats.top1 for s in result.report.steps if s.stats.top1 is not None]
    assert all(0 <= t <= 100 for t in evaluated)
