"""Recipe validation: every bad recipe in tests/bad_recipes fails with exactly the errors it expects."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from rmtp.errors import RecipeError
from rmtp.run.recipe import FinetuneStep, PruneStep, load_recipe, parse_recipe

BAD = Path(__file__).parent / "bad_recipes"


def _expected(path: Path) -> list[str]:
    return [line.removeprefix("# expect:").strip() for line in path.read_text().splitlines()
            if line.startswith("# expect:")]


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_recipe_reports_expected_error(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # a YAML exploit would write its marker here
    expected = _expected(path)
    assert expected, f"{path.name} has no '# expect:' line"
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = "\n".join(info.value.problems)
    for fragment in expected:
        assert fragment in text, f"{path.name}: expected {fragment!r} in:\n{text}"
    for problem in info.value.problems:  # every problem names the file
        assert str(path) in problem
        assert "\n" not in problem
    assert not list(tmp_path.iterdir()), "validation must not run code or write files"


def test_python_yaml_tag_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\nsteps: [{{evaluate: {{}}}}]\n')
    with pytest.raises(RecipeError, match="tags are refused"):
        load_recipe(recipe)
    assert not marker.exists()


def test_missing_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_folder_is_not_a_recipe_file_and_its_recipes_are_suggested(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"is a folder, not a recipe file$"):
        load_recipe(tmp_path)
    for name in ("b.yaml", "recipe.yaml", "a.yml", "c.yaml", "notes.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path)
    assert info.value.problems == [f"{tmp_path}: is a folder, not a recipe file; did you mean "
                                   f"{tmp_path / 'recipe.yaml'}, {tmp_path / 'a.yml'}, {tmp_path / 'b.yaml'} "
                                   f"(and 1 more)?"]


def test_huge_keys_and_names_give_short_messages(tmp_path: Path) -> None:
    """A 100,000-character key made a 200 KB message (the key twice, whole); now each is cut."""
    huge = "k" * 100_000
    recipe = tiny_recipe([{"prune": "magnitude", "params": {huge: 1}}, {huge: {}}, {"prune": huge}])
    recipe[huge] = 1
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    problems = info.value.problems
    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["model"]["name"] = huge  # checked against timm only once the rest is valid
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    problems += info.value.problems
    assert len(problems) == 5, problems
    assert all(len(problem) < 400 for problem in problems), [len(problem) for problem in problems]
    assert all("kkkkk" in problem and ("…" in problem or "..." in problem) for problem in problems)


def test_good_recipe_resolves_defaults_and_paths(tmp_path: Path) -> None:
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        [{"prune": "magnitude", "params": {"sparsity": 0.3}, "layers": ["blocks.0.*"]},
         {"finetune": None}, {"evaluate": {}}],
        output=Path("out")))
    recipe = load_recipe(recipe_path)
    assert [type(s) for s in recipe.steps][:2] == [PruneStep, FinetuneStep]
    assert recipe.pruner_params[0].sparsity == 0.3 and recipe.pruner_params[0].scope == "global"
    assert recipe.steps[0].layers.include == ["blocks.0.*"]  # a bare list means include
    assert recipe.steps[1].finetune.epochs == 1  # `finetune:` with no body takes the defaults
    assert recipe.output.dir == (tmp_path / "out").resolve()  # relative to the recipe, not the cwd
    resolved = recipe.to_dict()
    assert resolved["steps"][0]["params"] == {"sparsity": 0.3, "scope": "global"}
    assert parse_recipe(resolved, source=recipe_path).to_dict() == resolved  # the resolved form re-validates


def test_existing_output_dir_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    recipe = tiny_recipe([{"evaluate": {}}], output=tmp_path / "out")
    with pytest.raises(RecipeError, match=r"output.dir: .* already exists; set output.overwrite: true"):
        parse_recipe(recipe, source=tmp_path / "r.yaml")
    recipe["output"]["overwrite"] = True
    assert parse_recipe(recipe, source=tmp_path / "r.yaml").output.overwrite


def test_an_output_dir_overwrite_could_not_replace_says_why_instead_of_suggesting_overwrite(tmp_path: Path) -> None:
    """A file there: "set output.overwrite: true" led to a second refusal ("is a file"); say that at once."""
    (tmp_path / "afile.txt").write_text("mine")
    recipe = tiny_recipe([{"evaluate": {}}], output=tmp_path / "afile.txt")
    with pytest.raises(RecipeError, match=r"output.dir: .*afile.txt is a file, not an rmtp output folder") as info:
        parse_recipe(recipe, source=tmp_path / "r.yaml")
    assert "set output.overwrite" not in str(info.value)


def test_a_yaml_bomb_is_refused_quickly_by_the_cli() -> None:
    """In a subprocess with a timeout, so a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    bomb = BAD / "yaml_bomb.yaml"
    done = subprocess.run([sys.executable, "-m", "rmtp", "validate", str(bomb)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "YAML refused" in lines[0] and str(bomb) in lines[0]
    assert "Traceback" not in done.stderr


def test_error_values_are_shown_bounded() -> None:
    from rmtp.errors import short_repr

    huge = [[list(range(1000))] * 1000] * 1000  # 10^9 values if walked
    text = short_repr(huge)
    assert len(text) <= 120 and text.startswith("[[[0, 1, 2")
    assert short_repr("x" * 10_000).endswith("…'") or len(short_repr("x" * 10_000)) <= 120
    assert short_repr(3) == "3" and short_repr("a") == "'a'"
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": {"name": "vit_tiny_patch16_224"}, "steps": [{"evaluate": {}}], "seed": huge})
    assert all(len(problem) < 300 for problem in info.value.problems)
