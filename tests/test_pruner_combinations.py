"""Pruners chained in one recipe (spp → svd-mp, spp → n:m, n:m → spp, spp twice, svd-mp after spp on
ResNets): each combination saves, reloads and reports correctly, or is refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VIT, tiny_recipe, write_recipe

import rmtp
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import load_recipe

#: A ViT with enough heads that spp removes a few without removing a whole attention branch.
MANY_HEADS = {**TINY_VIT, "embed_dim": 64, "num_heads": 8}
SPP_HEADS = {"prune": "spp", "params": {"ratio": 0.2, "target": "groups", "structures": ["heads"],
                                        "steps": 3, "batch_size": 16}}


def _run(tmp_path: Path, steps: list, *, kwargs: dict | None = None, output: bool = True):
    out = tmp_path / "out"
    recipe = tiny_recipe(steps, output=out if output else None)
    recipe["data"]["eval_limit"] = 32
    if kwargs is not None:
        recipe["model"]["kwargs"] = dict(kwargs)
    return run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe))), out


def _assert_reloads(result, out: Path) -> None:
    loaded = rmtp.load(out).model.eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x), result.model.eval().cpu()(x), atol=1e-5, rtol=1e-5)


def test_spp_heads_then_svd_mp_saved_folder_reloads(tmp_path: Path) -> None:
    """spp (heads) → svd-mp: the run saves, but ``rmtp.load`` of the folder raises
    ``AttributeError: 'BlockLowRankLinear' object has no attribute 'out_features'``: the
    AttentionHeads patch, re-applied on load, checks ``attn.qkv.out_features`` /
    ``attn.proj.in_features``, which svd-mp's split layers do not have. docs/spp.md says svd-mp can
    follow spp. Expected: the folder loads and computes what the run's model computes."""
    result, out = _run(tmp_path, [SPP_HEADS, {"prune": "svd-mp", "params": {"min_dim": 8}}], kwargs=MANY_HEADS)
    _assert_reloads(result, out)


def test_spp_heads_then_permuted_nm_saved_folder_reloads(tmp_path: Path) -> None:
    """spp (heads) → n:m with ``permute: true``: qkv becomes a ``PermutedInput`` (no
    ``out_features``), so re-applying the AttentionHeads patch on ``rmtp.load`` raises
    AttributeError. Expected: the saved folder loads."""
    result, out = _run(tmp_path, [SPP_HEADS, {"prune": "n:m", "params": {"budget": "uniform", "permute": True}}],
                       kwargs=MANY_HEADS)
    _assert_reloads(result, out)


def test_second_spp_step_with_an_output_folder(tmp_path: Path) -> None:
    """Two spp steps in one recipe with ``output:``: the second step's ``spp_path.json`` collides
    with the first's in the run's StagedOutput, and the whole run fails with "step output
    'spp_path.json' was already written by an earlier step" after both searches (nothing is
    saved). docs/spp.md: "a second spp step finds the sliced units again". Expected: the run
    completes and saves both steps' artefacts (e.g. a per-step path file name)."""
    steps = [{"prune": "spp", "params": {"ratio": 0.3, "structures": ["neurons"], "steps": 3, "batch_size": 16}},
             {"prune": "spp", "params": {"ratio": 0.2, "structures": ["neurons"], "steps": 3, "batch_size": 16}}]
    result, out = _run(tmp_path, steps)
    assert (out / "rmtp_model.json").is_file()
    assert (out / "spp_path.json").is_file() and (out / "step1-spp_path.json").is_file()
    assert (out / "spp-0.30" / "rmtp_model.json").is_file() and (out / "spp-0.20" / "rmtp_model.json").is_file()


def test_svd_mp_target_params_after_spp_removed_a_resnet_conv(tmp_path: Path) -> None:
    """spp on a ResNet that removes every channel of some conv turns it into a ``RemovedConv2d``
    (no ``weight``); a following svd-mp with ``target_params`` is offered it (svd-mp revisits
    replaced layers), skips it, but ``_allocate_globally`` still calls ``dense_cost()`` on every
    plan: ``AttributeError: 'RemovedConv2d' object has no attribute 'weight'``. Expected: the
    skipped layer counts with what it holds (0 weights) and the step runs."""
    recipe = {
        "model": {"name": "resnet50", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 24, 32],
                                                 "num_classes": 10, "in_chans": 1}},
        "data": {"name": "digits", "img_size": 32, "batch_size": 128, "calibration_size": 64, "eval_limit": 32},
        "steps": [{"prune": "spp", "params": {"ratio": 0.9, "structures": ["channels"], "steps": 5, "batch_size": 16}},
                  {"prune": "svd-mp", "params": {"target_params": 0.5, "min_dim": 2}}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = run_recipe(load_recipe(path))
    from rmtp_plugins.spp import RemovedConv2d

    assert any(isinstance(m, RemovedConv2d) for m in result.model.modules())  # the case this test is about


def test_second_round_macs_before_of_a_split_qkv() -> None:
    """svd-mp on an already split fused qkv (``BlockLowRankLinear``): ``LayerPlan.current_cost`` is
    ``rank·(M+N)`` = Σkᵢ·(N + ΣMᵢ), but the layer holds N·Σkᵢ + Σkᵢ·Mᵢ weights (each block's
    second factor maps only its own kᵢ channels). The report's "MACs/pos" before, and the budget
    subtracted for a skipped split qkv under ``target_params``, are overstated (here 768 vs 384).
    Expected: current_cost equals the weights the split layer holds."""
    from rmtp_plugins.svd_mp.lowrank import BlockLowRankLinear
    from rmtp_plugins.svd_mp.plan import LayerPlan

    layer = BlockLowRankLinear(64, [1, 1, 1], [64, 64, 64], edges=[1.0, 1.0, 1.0])
    held = layer.first.weight.numel() + sum(s.weight.numel() for s in layer.seconds)
    assert LayerPlan("blocks.0.attn.qkv", layer).current_cost() == held


def test_nm_then_spp_neurons_is_refused_not_silently_broken(tmp_path: Path) -> None:
    """n:m (2:4) → spp on MLP neurons: slicing single fc2 input columns would shift fc2's 2:4 groups
    (in_features 128 → 95, not even a multiple of 4) and the layer would silently stop being N:M.
    spp refuses, before its search, naming the layer and the order that works; whole heads of a
    head_dim that is a multiple of m keep the groups aligned and are still accepted."""
    from rmtp.errors import RmtpError
    from rmtp_plugins.nm import check_nm

    steps = [{"prune": "n:m", "params": {"budget": "uniform"}},
             {"prune": "spp", "params": {"ratio": 0.3, "structures": ["neurons"], "steps": 3, "batch_size": 16}}]
    with pytest.raises(RmtpError, match=r"mlp\.fc2 holds a 2:4 mask.*run spp before n:m"):
        _run(tmp_path, steps, output=False)
    steps[1]["params"]["structures"] = ["heads"]
    result, _ = _run(tmp_path, steps, output=False)
    proj = result.model.blocks[0].attn.proj
    assert check_nm(proj.weight, 2, 4).ok and proj.in_features % 4 == 0
