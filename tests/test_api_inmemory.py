"""``rmtp.prune`` / ``rmtp.finetune`` / ``rmtp.evaluate`` on a model in hand.

Every built-in pruner goes through ``rmtp.prune`` and must leave the model exactly as the same
prune step of a recipe leaves it (same weights, same rows): both run :mod:`rmtp.run.steps`, and this
is the test that they cannot drift apart.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from conftest import REPO, TINY_VIT, tiny_recipe
from torch import nn

import rmtp
from rmtp.errors import PluginError, RecipeError, RmtpError
from rmtp.run.pipeline import seed_everything
from rmtp.run.recipe import parse_recipe

DATA = {"name": "digits", "batch_size": 128, "calibration_size": 64, "eval_limit": 128}

#: One step per built-in pruner, with params a tiny ViT takes quickly.
STEPS = {
    "magnitude": {"sparsity": 0.5, "scope": "global"},
    "svd-mp": {"margin": 1.0, "whiten": True},  # whitened: the recipe step loads calibration, as the call passes it
    "n:m": {"n": 2, "m": 4, "score": "wanda", "budget": "mp", "target_macs": 0.7, "permute": True},
    "spp": {"ratio": 0.3, "steps": 5, "batch_size": 32},
    "token-cls": {"r_max": 0.5, "alpha": 1.5},
    "token-mean": {"r_max": 0.5, "alpha": 1.5, "fuse": True},
    "tome": {"r": 2},
}


def _tiny_vit(seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()


@pytest.mark.parametrize("pruner", list(STEPS))
def test_every_pruner_through_rmtp_prune_matches_the_recipe_step(pruner: str) -> None:
    params = STEPS[pruner]
    recipe = parse_recipe(tiny_recipe([{"prune": pruner, "params": params}], data=DATA, seed=0))
    expected = rmtp.run_recipe(recipe)

    model = _tiny_vit(0)  # the recipe seeds before building, and each step with seed + index
    data = rmtp.build_data(DATA, model)
    seed_everything(0)
    report = rmtp.prune(model, pruner, calibration=data.loader("calibration"), seed=0, **params)

    want = expected.model.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)
    assert [row.to_dict() for row in report.rows] == [row.to_dict() for row in expected.report.steps[0].rows]
    assert report.stats == expected.report.steps[0].stats
    assert report.baseline.params == expected.report.dense.params
    assert report.to_dict()["baseline"]["macs"] == expected.report.dense.macs
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected.model(x), atol=0, rtol=0)


def test_token_pruners_need_no_layer_list_and_take_none() -> None:
    model = _tiny_vit()
    report = rmtp.prune(model, "tome", r=3)
    assert [row.layer for row in report.rows] == ["blocks.0", "blocks.1"] and report.notes == []
    with pytest.raises(PluginError, match="token pruners act on whole blocks"):
        rmtp.prune(_tiny_vit(), "token-cls", layers=["blocks.0.*"], r_max=0.5)


def test_a_pruner_that_needs_calibration_says_so() -> None:
    with pytest.raises(RmtpError, match=r"^spp needs calibration data .*calibration=bundle.loader\('calibration'\)"):
        rmtp.prune(_tiny_vit(), "spp", ratio=0.3)


def test_params_fail_with_the_recipe_messages() -> None:
    with pytest.raises(RecipeError) as info:
        rmtp.prune(_tiny_vit(), "svd-mp", margn=1.0, split_qkv="maybe")
    lines = str(info.value).splitlines()
    assert any(re.match(r"rmtp.prune\('svd-mp'\): margn: unknown key 'margn'; allowed: margin, ", line)
               for line in lines)
    assert any(line.startswith("rmtp.prune('svd-mp'): split_qkv: Input should be a valid boolean") for line in lines)
    with pytest.raises(RecipeError, match=r"rmtp.finetune: epochs: Input should be greater than or equal to 1"):
        rmtp.finetune(_tiny_vit(), DATA, epochs=0)
    with pytest.raises(RecipeError, match=r"rmtp.evaluate: latency_rounds: Input should be greater"):
        rmtp.evaluate(_tiny_vit(), DATA, latency_rounds=1)
    with pytest.raises(RecipeError, match=r"rmtp.build_data: data.name: Input should be 'digits' or 'imagefolder'"):
        rmtp.build_data({"name": "mnist"}, _tiny_vit())


def test_unknown_pruner_and_unknown_model_are_named() -> None:
    with pytest.raises(PluginError, match=r"unknown pruner 'svd'; known: svd-mp"):
        rmtp.prune(_tiny_vit(), "svd")
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PluginError, match=r"cannot tell which architecture a Sequential is .* pass arch="):
        rmtp.prune(plain, "magnitude", sparsity=0.5)


def test_arch_can_be_passed_and_is_checked() -> None:
    resnet = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=[8, 8, 8, 8], num_classes=4)
    report = rmtp.prune(resnet, "magnitude", arch="resnet", sparsity=0.5, input_shape=(3, 32, 32))
    assert report.stats.nonzeros < report.baseline.nonzeros
    with pytest.raises(PluginError, match="architecture 'vit' cannot handle"):
        rmtp.prune(timm.create_model("resnet18", num_classes=4), "magnitude", sparsity=0.5,
                   arch=rmtp.get_plugins().architecture("vit"), input_shape=(3, 32, 32))


def test_finetune_and_evaluate_match_the_recipe_steps() -> None:
    steps = [{"prune": "magnitude", "params": {"sparsity": 0.6}},
             {"finetune": {"epochs": 1, "lr": 1e-3, "distill": {"weight": 1.0}, "seed": 1}},
             {"evaluate": {}}]
    expected = rmtp.run_recipe(parse_recipe(tiny_recipe(steps, data=DATA, seed=0)))

    model = _tiny_vit(0)
    dense = rmtp.frozen_copy(model)
    data = rmtp.build_data(DATA, model)
    seed_everything(0)
    rmtp.prune(model, "magnitude", sparsity=0.6)
    seed_everything(1)
    tuned = rmtp.finetune(model, data, teacher=dense, penalize=[], epochs=1, lr=1e-3, distill={"weight": 1.0}, seed=1)
    seed_everything(2)
    evaluated = rmtp.evaluate(model, data, dense=dense)
    def timeless(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]

    assert timeless(tuned.history) == timeless(expected.report.steps[1].history)
    assert evaluated.stats.top1 == expected.report.steps[2].stats.top1
    assert evaluated.notes == expected.report.steps[2].notes
    assert int((model.blocks[0].mlp.fc1.weight == 0).sum()) > 0  # masks kept through fine-tuning
    assert rmtp.evaluate(model, data.loader("val")).stats.top1 == evaluated.stats.top1


def test_finetune_with_distill_needs_a_teacher() -> None:
    with pytest.raises(RmtpError, match="distill is set but no teacher was given"):
        rmtp.finetune(_tiny_vit(), DATA, epochs=1, distill={})


def test_reports_render_in_rich() -> None:
    from rich.console import Console

    report = rmtp.prune(_tiny_vit(), "svd-mp", margin=1.0)
    console = Console(width=200, record=True)
    console.print(report)
    text = console.export_text()
    assert "step 0 · prune · svd-mp" in text and "blocks.0.attn.qkv" in text and "params 26.92k → " in text


def test_dir_lists_the_api() -> None:
    assert {"prune", "finetune", "evaluate", "build_data", "load", "run_recipe"} <= set(dir(rmtp))


def _readme_snippets() -> list[str]:
    """Every python block of the README's Python API section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README's Python API section has python code blocks"
    return blocks


@pytest.mark.slow
def test_readme_python_api_examples_run(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The README's notebook examples, executed as written and in order (they fine-tune and run
    every pruner), from a fresh folder that sees the committed digits ViT as models/; what they
    save lands there."""
    (tmp_path / "models").symlink_to(REPO / "models", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(_readme_snippets()):
        exec(compile(block, f"README.md (Python API, block {index})", "exec"), namespace)
    assert isinstance(namespace["report"], rmtp.reports.records.StepReport)
    assert namespace["report"].stats.params < namespace["report"].baseline.params
    loaded = rmtp.load(tmp_path / "runs" / "my-model-copy")
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), namespace["model"].eval()(x), atol=0, rtol=0)
