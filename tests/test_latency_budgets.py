"""Speed targets of n:m, spp and the token pruners, and one budget shared across steps.

(The cost model itself and svd-mp's speed decisions are in ``test_latency.py``.) Nothing here
asserts a time: targets run under the suite's ``cost: macs``, which is exact, so a predicted
speed-up can be checked against the MACs counted on the pruned model; n:m's "no kernel on a CPU"
runs measured, and only its decision is checked.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_VIT
from torch import nn

import rmtp

# ------------------------------------------------------------------- speed targets, tiny ViT (MACs)

@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "embed_dim": 64, "num_heads": 2}).eval()


@pytest.mark.parametrize("pruner, extra", [("token-cls", {}), ("token-mean", {}), ("tome", {})])
def test_token_targets_choose_the_gentlest_schedule_that_reaches_them(tiny_vit, pruner, extra) -> None:
    model = rmtp.frozen_copy(tiny_vit)
    report = rmtp.prune(model, pruner, target_speedup=1.3, dense=tiny_vit, **extra)
    predicted = report.speed["predicted_speedup"]
    assert predicted >= 1.3 - 1e-9
    # the patched model was counted whole and the search redone with what the per-block figures
    # missed (pruned-token scoring), so the prediction is the pruned model's own MACs
    assert report.baseline.macs / report.stats.macs == pytest.approx(predicted, rel=1e-3)
    # one step gentler would not have reached it: the predicted figure is the least above target
    gentler = rmtp.frozen_copy(tiny_vit)
    key = "r" if pruner == "tome" else "r_max"
    chosen = next(n for n in report.notes if "chosen for the speed target" in n).split(" = ")[1].split(" ")[0]
    step = 1 if pruner == "tome" else 0.005
    value = int(chosen) - step if pruner == "tome" else round(float(chosen) - step, 3)
    base = rmtp.prune(gentler, pruner, **{key: value})
    assert report.baseline.macs / base.stats.macs < 1.3
    with pytest.raises(rmtp.errors.RecipeError, match="chooses"):
        rmtp.prune(rmtp.frozen_copy(tiny_vit), pruner, target_speedup=1.3, **{key: value})


def test_nm_target_speedup_and_only_if_faster(tiny_vit) -> None:
    import rmtp.data

    bundle = rmtp.build_data({"name": "digits", "batch_size": 64, "calibration_size": 64}, tiny_vit)
    model = rmtp.frozen_copy(tiny_vit).requires_grad_(True)
    report = rmtp.prune(model, "n:m", target_speedup=1.2, dense=tiny_vit, calibration=bundle.loader("calibration"))
    assert report.speed["predicted_speedup"] >= 1.2 - 1e-9
    assert {row.detail["pattern"] for row in report.rows} == {"2:4", "dense"}
    with pytest.raises(rmtp.errors.RecipeError, match="one budget"):
        rmtp.prune(rmtp.frozen_copy(tiny_vit), "n:m", target_speedup=1.2, target_macs=0.5)
    # measured on a CPU: no 2:4 kernel, so by default every layer stays dense and says why
    model = rmtp.frozen_copy(tiny_vit).requires_grad_(True)
    report = rmtp.prune(model, "n:m", calibration=bundle.loader("calibration"),
                        latency={"cost": "measured", "batch": 2, "threads": 1, "rounds": 3, "block_ms": 1.0,
                                 "verify_rounds": 0})
    active = [row for row in report.rows if "MP budget" not in row.note]
    assert active and all("no 2:4 kernel" in row.note for row in active)
    assert all(bool((module.weight != 0).all()) for module in model.modules() if isinstance(module, nn.Linear))


def test_spp_target_speedup(tiny_vit) -> None:
    bundle = rmtp.build_data({"name": "digits", "batch_size": 64, "calibration_size": 64}, tiny_vit)
    model = rmtp.frozen_copy(tiny_vit).requires_grad_(True)
    report = rmtp.prune(model, "spp", target_speedup=1.3, steps=10, batch_size=32, dense=tiny_vit,
                        calibration=bundle.loader("calibration"))
    assert report.speed["predicted_speedup"] >= 1.3 - 1e-9
    # the sliced model was counted whole and the search redone with what the container figures
    # missed (the patch embedding and head are untouched, the in-context scale is one figure), so
    # the prediction is the pruned model's own MACs
    assert report.baseline.macs / report.stats.macs == pytest.approx(report.speed["predicted_speedup"], rel=1e-3)
    with pytest.raises(rmtp.errors.RecipeError, match="exactly one of ratio"):
        rmtp.prune(rmtp.frozen_copy(tiny_vit), "spp", target_speedup=1.3, ratio=0.3)


def test_steps_share_one_budget_against_the_dense_model(tiny_vit) -> None:
    """A second step's target is the whole recipe's: it needs only what the first step left."""
    model = rmtp.frozen_copy(tiny_vit).requires_grad_(True)
    first = rmtp.prune(model, "svd-mp", target_speedup=1.15, dense=tiny_vit, min_dim=16)
    second = rmtp.prune(model, "token-cls", target_speedup=1.4, dense=tiny_vit)
    assert second.speed["start_speedup"] == pytest.approx(first.speed["predicted_speedup"], rel=1e-6)
    assert second.speed["predicted_speedup"] >= 1.4 - 1e-9
