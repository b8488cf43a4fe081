"""Block-wise reconstruction (``rmtp.reconstruct``, the ``reconstruct:`` step): each pruned block
trained to reproduce the dense block's outputs from the inputs the reconstructed model feeds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import REPO, TINY_VIT, tiny_recipe, write_recipe
from typer.testing import CliRunner

import rmtp
from rmtp.cli import build_app
from rmtp.errors import RecipeError, RmtpError
from rmtp.fidelity.blockwise import capture
from rmtp.run.recipe import parse_recipe


def _pruned(sparsity: float = 0.6, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    dense = rmtp.frozen_copy(model)
    rmtp.prune(model, "magnitude", sparsity=sparsity, scope="global")
    return model, dense


def _calibration(count: int = 48, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images = torch.randn(count, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return [(batch, torch.zeros(len(batch), dtype=torch.long)) for batch in images.split(16)]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_every_block_comes_closer_to_the_dense_block_and_the_rest_is_untouched() -> None:
    model, dense = _pruned()
    dense_before, outside = _state(dense), {k: v for k, v in _state(model).items() if not k.startswith("blocks.")}
    report = rmtp.reconstruct(model, _calibration(), dense=dense, steps=30)
    fits = report.history
    assert [fit["block"] for fit in fits] == ["blocks.0", "blocks.1"]
    assert all(fit["kept"] and fit["steps"] == 30 for fit in fits)
    assert all(fit["error_after"] < 0.8 * fit["error_before"] for fit in fits), fits
    assert all(torch.equal(dense_before[k], v) for k, v in dense.state_dict().items())  # the teacher is read only
    after = model.state_dict()
    assert all(torch.equal(outside[k], after[k]) for k in outside)  # patch embedding, norm, head: not blocks
    assert report.kind == "reconstruct" and "output error" in report.notes[0]
    assert not model.training


def test_exact_zeros_stay_zero() -> None:
    model, dense = _pruned(sparsity=0.7)
    zeros = {name: (m.weight == 0).clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rmtp.reconstruct(model, _calibration(), dense=dense, steps=20)
    for name, mask in zeros.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[mask] == 0), name
        assert bool((weight[~mask] != 0).all()) or name == "head", name


def test_a_block_is_fitted_to_the_inputs_the_pruned_model_feeds_it() -> None:
    """Block 1 is left dense: on the dense model's inputs it would have nothing to learn (error 0);
    on the pruned model's inputs it absorbs what block 0 still gets wrong."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    dense = rmtp.frozen_copy(model)
    rmtp.prune(model, "magnitude", sparsity=0.8, layers=["blocks.0.*"])
    report = rmtp.reconstruct(model, _calibration(), dense=dense, steps=20)
    second = report.history[1]
    assert second["error_before"] > 1e-6  # exactly 0 on the dense model's own inputs
    assert second["error_after"] < second["error_before"]


def test_capture_takes_a_blocks_input_or_output_and_stops_there() -> None:
    model, _ = _pruned()
    images = torch.randn(5, 1, 16, 16)
    calls = []
    model.head.register_forward_hook(lambda *args: calls.append(1))  # never reached: the pass stops at blocks.1
    x1 = capture(model, "blocks.1", images, torch.device("cpu"), 2, what="input")
    y0 = capture(model, "blocks.0", images, torch.device("cpu"), 2, what="output")
    assert x1.shape == (5, 17, 32) and torch.equal(x1, y0) and not calls


def test_capture_refuses_a_block_called_with_more_than_its_input() -> None:
    """A block whose model hands it a second input (Eva's rotary embeddings, a mask) would be fitted
    without it: refused with the block and the argument named, not fitted wrong."""

    class Block(torch.nn.Module):
        def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
            return x if rope is None else x * rope

    class Model(torch.nn.Module):
        def __init__(self, rope: torch.Tensor | None) -> None:
            super().__init__()
            self.block, self.rope = Block(), rope

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x, rope=self.rope)

    images = torch.randn(4, 3)
    with pytest.raises(RmtpError, match=r"block block is called with more than its input \(rope\)"):
        capture(Model(torch.ones(3)), "block", images, torch.device("cpu"), 2, what="input")
    assert torch.equal(capture(Model(None), "block", images, torch.device("cpu"), 2, what="input"), images)


def test_a_block_whose_error_would_rise_is_kept_as_it_came() -> None:
    model, dense = _pruned()
    before = _state(model)
    report = rmtp.reconstruct(model, _calibration(), dense=dense, steps=10, lr=1.0)  # Adam at lr 1 diverges
    refused = [fit for fit in report.history if not fit["kept"]]
    assert refused, report.history
    for fit in refused:
        prefix = fit["block"] + "."
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith(prefix))
    assert "kept as they came" in report.notes[-1]


def test_the_minutes_budget_stops_blocks_early() -> None:
    model, dense = _pruned()
    report = rmtp.reconstruct(model, _calibration(), dense=dense, steps=10_000, max_minutes=1e-9)
    assert all(fit["steps"] < 10_000 for fit in report.history)


def test_same_seed_same_weights() -> None:
    results = []
    for _ in range(2):
        model, dense = _pruned()
        rmtp.reconstruct(model, _calibration(), dense=dense, steps=10, batch_size=8, seed=3)
        results.append(_state(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_refusals_name_the_reason() -> None:
    model, dense = _pruned()
    rmtp.prune(model, "tome", r=2)
    with pytest.raises(RmtpError, match="token-reduced.*reconstruct before the token pruner"):
        rmtp.reconstruct(model, _calibration(), dense=dense)
    rmtp.unpatch(model)
    with pytest.raises(RmtpError, match="dense model has no blocks.0"):
        rmtp.reconstruct(model, _calibration(), dense=torch.nn.Sequential(torch.nn.Identity()), arch="vit")
    with pytest.raises(RmtpError, match="steps"):
        rmtp.reconstruct(model, _calibration(), dense=dense, steps=0)
    with pytest.raises(RmtpError, match="calibration data is empty"):
        rmtp.reconstruct(model, [], dense=dense)


def test_the_recipe_step_validates_with_defaults_and_refuses_unknown_keys(tmp_path: Path) -> None:
    recipe = parse_recipe(tiny_recipe([{"prune": "magnitude"}, {"reconstruct": None}]), source=tmp_path / "r.yaml")
    assert recipe.steps[1].reconstruct.steps == 200 and recipe.to_dict()["steps"][1]["reconstruct"]["lr"] == 1e-3
    with pytest.raises(RecipeError, match=r"steps\[1\]\.reconstruct\.epochs"):
        parse_recipe(tiny_recipe([{"prune": "magnitude"}, {"reconstruct": {"epochs": 1}}]), source=tmp_path / "r.yaml")


def test_a_recipe_runs_a_reconstruct_step(tmp_path: Path) -> None:
    steps = [{"prune": "magnitude", "params": {"sparsity": 0.6}},
             {"reconstruct": {"steps": 5, "images": 32}}, {"evaluate": {}}]
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(steps, output=tmp_path / "out"))
    result = CliRunner().invoke(build_app(), ["prune", str(path)])
    assert result.exit_code == 0, result.output
    assert "step 1 · reconstruct 2 block(s), 10 optimizer steps" in result.output
    report = rmtp.load(tmp_path / "out").meta  # saved like any other run
    assert report["format"] == "rmtp-model"


@pytest.mark.slow
def test_reconstruction_recovers_most_of_a_trained_models_accuracy_without_labels() -> None:
    """The committed digits ViT, 80% magnitude pruning: top-1 falls to about half; reconstruction
    on the 256 calibration images (labels unused) brings most of it back."""
    from rmtp.storage.weights import read_state_dict

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=96, depth=6, num_heads=3)
    model.load_state_dict(read_state_dict(REPO / "models" / "digits_vit.safetensors"))
    data = rmtp.build_data({"name": "digits"}, model)
    dense = rmtp.frozen_copy(model)
    dense_top1 = rmtp.evaluate(dense, data).stats.top1
    rmtp.prune(model, "magnitude", sparsity=0.8, scope="global")
    pruned_top1 = rmtp.evaluate(model, data).stats.top1
    rmtp.reconstruct(model, data.loader("calibration"), dense=dense, steps=60)
    recovered = rmtp.evaluate(model, data).stats.top1
    assert pruned_top1 < dense_top1 - 20
    assert recovered > dense_top1 - 5, (dense_top1, pruned_top1, recovered)
