"""svd-mp: low-rank layers against dense references, MP ranks on planted spikes, budgets, save/load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe, write_recipe
from torch import nn

import rmtp
from rmtp.contract.pruner import PruneContext
from rmtp.plugins import get_plugins
from rmtp.run.layer_filter import select_layers
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import load_recipe
from rmtp.spectral.mp import weight_matrix
from rmtp_plugins.svd_mp import SvdMpParams, SvdMpPruner
from rmtp_plugins.svd_mp.lowrank import (
    BlockLowRankLinear,
    LowRankConv2d,
    LowRankLinear,
    factor_svds,
    factorize,
    factorize_blocks,
    product_svd,
    refactorize,
)


def _svd(weight: torch.Tensor):
    return torch.linalg.svd(weight_matrix(weight.detach()).double(), full_matrices=False)


def _truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = _svd(weight)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float().reshape(weight.shape)


# ---------------------------------------------------------------------------------- low-rank modules

def test_full_rank_linear_split_is_the_dense_layer() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(24, 40)
    low = factorize(dense, *_svd(dense.weight), rank=24)
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)
    assert low.first.weight.shape == (24, 24) and low.second.bias is not None


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2),
                                    dict(kernel_size=(1, 3), padding=(0, 1), dilation=2, bias=False),
                                    dict(kernel_size=3, padding="same", padding_mode="reflect")])
def test_conv_split_equals_truncated_svd_conv(kwargs) -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 12, **kwargs)
    low = factorize(dense, *_svd(dense.weight), rank=5)
    reference = nn.Conv2d(8, 12, **kwargs)
    reference.load_state_dict(dense.state_dict())
    with torch.no_grad():
        reference.weight.copy_(_truncated(dense.weight, 5))
    x = torch.randn(2, 8, 11, 13)
    torch.testing.assert_close(low(x), reference(x), atol=1e-5, rtol=1e-5)
    assert isinstance(low, LowRankConv2d) and low.rank == 5
    assert sum(p.numel() for p in low.parameters()) == (5 * (8 * dense.weight[0, 0].numel() + 12)
                                                        + (12 if dense.bias is not None else 0))


def test_block_split_matches_per_block_truncation() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 3 * 10)
    blocks, reference = [], dense.weight.detach().clone()
    for rows, rank in zip((slice(0, 10), slice(10, 20), slice(20, 30)), (2, 5, 3)):
        u, s, vh = _svd(dense.weight[rows])
        blocks.append((rows, u, s, vh, rank))
        reference[rows] = _truncated(dense.weight[rows], rank)
    low = factorize_blocks(dense, blocks)
    x = torch.randn(4, 9, 16)
    torch.testing.assert_close(low(x), nn.functional.linear(x, reference, dense.bias), atol=1e-5, rtol=1e-5)
    assert low.ranks == [2, 5, 3] and low.effective_shape == (30, 16)


def test_product_svd_is_the_svd_of_the_product() -> None:
    torch.manual_seed(0)
    first, second = torch.randn(6, 50, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    u, s, vh = product_svd(first, second)
    torch.testing.assert_close(s, torch.linalg.svdvals(second @ first)[:6])
    torch.testing.assert_close((u * s) @ vh, second @ first)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(vh @ vh.T, torch.eye(6, dtype=torch.float64))


def test_refactorize_cuts_each_block_to_its_truncated_product() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 3 * 10)
    low = factorize_blocks(dense, [(rows, *_svd(dense.weight[rows]), 6) for rows in
                                   (slice(0, 10), slice(10, 20), slice(20, 30))], edges=[1.0, 2.0, 3.0])
    parts = factor_svds(low)
    thinner = refactorize(low, [(u, s, vh, rank) for (_, u, s, vh), rank in zip(parts, (1, 4, 2))])
    reference = torch.cat([_truncated(dense.weight[rows], rank) for rows, rank in
                           zip((slice(0, 10), slice(10, 20), slice(20, 30)), (1, 4, 2))])
    x = torch.randn(4, 16)
    torch.testing.assert_close(thinner(x), nn.functional.linear(x, reference, dense.bias), atol=1e-5, rtol=1e-5)
    assert thinner.ranks == [1, 4, 2] and thinner.mp_edges == [1.0, 2.0, 3.0]
    conv = nn.Conv2d(8, 12, 3, padding=1)
    low = factorize(conv, *_svd(conv.weight), rank=6, edge=0.5)
    ((_, u, s, vh),) = factor_svds(low)
    thinner = refactorize(low, [(u, s, vh, 2)])
    x = torch.randn(2, 8, 7, 7)
    expected = nn.functional.conv2d(x, _truncated(conv.weight, 2), conv.bias, padding=1)
    torch.testing.assert_close(thinner(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(thinner, LowRankConv2d) and thinner.rmtp_config()["edges"] == [0.5]


# ---------------------------------------------------------------------------------- the pruner

def _planted(rows: int, cols: int, spikes: list[float], sigma: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Signal directions of strength θ (in units of the BBP threshold) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    threshold = sigma * (rows * cols) ** 0.25
    u = torch.linalg.qr(torch.randn(rows, len(spikes), generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, len(spikes), generator=g))[0]
    signal = (u * torch.tensor(spikes) * threshold) @ v.T
    return signal + sigma * torch.randn(rows, cols, generator=g)


class _TwoLayers(nn.Module):
    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        super().__init__()
        self.a = nn.Linear(first.shape[1], first.shape[0])
        self.b = nn.Linear(second.shape[1], second.shape[0])
        with torch.no_grad():
            self.a.weight.copy_(first)
            self.b.weight.copy_(second)

    def forward(self, x):
        return self.b(self.a(x))


def _context(model: nn.Module, names: list[str]) -> PruneContext:
    from rmtp.contract.architecture import PrunableLayer

    arch = get_plugins().architecture("vit")  # only its qkv_split is consulted, and these are not qkv
    return PruneContext(model=model, arch=arch, layers=[PrunableLayer(n, "fc1") for n in names],
                        device=torch.device("cpu"), seed=0)


def test_mp_edge_keeps_exactly_the_planted_spikes() -> None:
    first = _planted(200, 120, [4.0, 3.0, 2.5])            # 3 spikes well above the BBP threshold
    second = _planted(60, 200, [5.0, 0.3], seed=1)         # 1 above, 1 far below: invisible
    model = _TwoLayers(first, second)
    expected = {"a": _truncated(first, 3), "b": _truncated(second, 1)}
    rows = SvdMpPruner().prune(_context(model, ["a", "b"]), SvdMpParams()).rows
    assert [r.kept_rank for r in rows] == [3, 1]
    for row, name in zip(rows, ("a", "b")):
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        m, n = row.shape_before
        assert row.params_after == row.kept_rank * (m + n) + m  # factors + bias
        product = layer.second.weight @ layer.first.weight
        torch.testing.assert_close(product, expected[name], atol=1e-5, rtol=1e-5)


def test_split_that_does_not_pay_is_reconstructed_or_kept() -> None:
    weight = _planted(40, 40, [], seed=2)
    model = _TwoLayers(weight, torch.randn(8, 40))
    loose = SvdMpParams(min_dim=8, margin=0.2)  # a fifth of the edge: keeps most of the bulk, k·(M+N) ≥ M·N
    rows = SvdMpPruner().prune(_context(model, ["a"]), loose).rows
    assert rows[0].kept_rank * 80 >= 1600
    assert isinstance(model.a, nn.Linear) and rows[0].note.startswith("dense, rank-k reconstruction")
    torch.testing.assert_close(model.a.weight, _truncated(weight, rows[0].kept_rank), atol=1e-5, rtol=1e-5)
    model = _TwoLayers(weight, torch.randn(8, 40))
    SvdMpPruner().prune(_context(model, ["a"]), loose.model_copy(update={"when_split_does_not_pay": "keep"}))
    torch.testing.assert_close(model.a.weight, weight)


class _OneConv(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.a = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], padding=1)
        with torch.no_grad():
            self.a.weight.copy_(weight)

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("coefficients", [0.0, 0.3])
def test_reconstruction_is_written_into_a_channels_last_conv(coefficients: float) -> None:
    """A channels_last conv weight is not contiguous, so its (out, in·kh·kw) reshape is a copy:
    the rank-k reconstruction (and coefficient pruning after it) must land in the parameter."""
    weight = _planted(48, 16 * 9, [], seed=5).reshape(48, 16, 3, 3)
    model = _OneConv(weight).to(memory_format=torch.channels_last)
    assert not model.a.weight.is_contiguous()  # the case weight_matrix(...) copies
    loose = SvdMpParams(min_dim=8, margin=0.4, coefficient_pruning=coefficients)  # rank 40: no split pays
    rows = SvdMpPruner().prune(_context(model, ["a"]), loose).rows
    assert isinstance(model.a, nn.Conv2d) and rows[0].note.startswith("dense, rank-k reconstruction")
    rank = rows[0].kept_rank
    assert rank < 48 and rank * (48 + 144) >= 48 * 144
    expected = _truncated(weight, rank)
    if coefficients:
        drop = torch.sort(expected.abs().flatten(), stable=True).indices[:round(coefficients * expected.numel())]
        expected = expected.flatten().index_fill(0, drop, 0.0).view_as(expected)
        assert int((model.a.weight == 0).sum()) == drop.numel()
    # float32 weights, reconstruction computed in float64: relative Frobenius error ≤ 1e-6
    error = torch.linalg.norm(model.a.weight.detach() - expected) / torch.linalg.norm(expected)
    assert error <= 1e-6
    assert torch.linalg.norm(expected - weight) / torch.linalg.norm(weight) > 0.01  # it did change
    assert model.a.weight.is_contiguous(memory_format=torch.channels_last)  # layout kept


def test_small_layers_are_skipped_with_a_reason() -> None:
    model = _TwoLayers(torch.randn(20, 10), torch.randn(5, 20))
    before = model.a.weight.clone()
    rows = SvdMpPruner().prune(_context(model, ["a"]), SvdMpParams()).rows
    assert rows[0].skipped and "min(M,N)=10 < min_dim=32" in rows[0].note
    assert torch.equal(model.a.weight, before)


def test_global_budget_meets_target_and_favours_signal() -> None:
    strong = _planted(128, 128, [8, 7, 6, 5, 4, 3, 2.5, 2], seed=3)
    noise = _planted(128, 128, [], seed=4)
    model = _TwoLayers(strong, noise)
    total = 2 * 128 * 128
    rows = SvdMpPruner().prune(_context(model, ["a", "b"]), SvdMpParams(target_params=0.15)).rows
    kept_weights = sum(r.kept_rank * 256 for r in rows)
    assert kept_weights <= 0.15 * total
    assert kept_weights > 0.15 * total - 2 * 256  # tight: at most one direction per layer short
    assert rows[0].kept_rank > rows[1].kept_rank  # the spiked layer gets the budget


def test_coefficient_pruning_zeroes_the_stated_share() -> None:
    model = _TwoLayers(_planted(100, 80, [4, 3]), torch.randn(8, 100))
    rows = SvdMpPruner().prune(_context(model, ["a"]), SvdMpParams(coefficient_pruning=0.3)).rows
    factors = model.a.first.weight.numel() + model.a.second.weight.numel()
    zeros = int((model.a.first.weight == 0).sum() + (model.a.second.weight == 0).sum())
    assert zeros == round(0.3 * factors)
    assert rows[0].params_after - rows[0].nonzeros_after == zeros + int((model.a.second.bias == 0).sum())


def test_second_round_truncates_split_layers_against_the_dense_edge() -> None:
    """Round 1 at margin 1 then round 2 at margin 1.6 equals one round at 1.6 on the dense weights."""
    first = _planted(200, 120, [6.0, 4.0, 2.5, 1.6])
    second = _planted(60, 200, [5.0, 2.0], seed=1)
    twice, once = _TwoLayers(first, second), _TwoLayers(first, second)
    once.load_state_dict(twice.state_dict())  # same biases
    SvdMpPruner().prune(_context(twice, ["a", "b"]), SvdMpParams())
    rows = SvdMpPruner().prune(_context(twice, ["a", "b"]), SvdMpParams(margin=1.6)).rows
    reference = SvdMpPruner().prune(_context(once, ["a", "b"]), SvdMpParams(margin=1.6)).rows
    assert [r.kept_rank for r in rows] == [r.kept_rank for r in reference]
    assert rows[0].kept_rank < 4  # something was cut
    x = torch.randn(5, 120)
    torch.testing.assert_close(twice(x), once(x), atol=1e-5, rtol=1e-5)
    assert rows[0].note.startswith("split, rank cut") and rows[0].detail["edge s₊"] == reference[0].detail["edge s₊"]
    again = SvdMpPruner().prune(_context(twice, ["a", "b"]), SvdMpParams(margin=1.6)).rows
    assert [r.note for r in again] == ["split, rank unchanged"] * 2
    floor = SvdMpPruner().prune(_context(twice, ["a", "b"]), SvdMpParams(min_rank=20)).rows
    assert [r.kept_rank for r in floor] == [r.kept_rank for r in rows]  # min_rank never grows a split layer


def test_split_layer_without_a_recorded_edge_is_skipped() -> None:
    model = _TwoLayers(torch.randn(40, 40), torch.randn(8, 40))
    model.a = LowRankLinear(40, 5, 40)  # made by hand, not by svd-mp
    rows = SvdMpPruner().prune(_context(model, ["a"]), SvdMpParams()).rows
    assert rows[0].skipped and "no recorded MP edge" in rows[0].note and model.a.rank == 5


def test_tw_confidence_below_the_tw_median_is_refused_at_validation() -> None:
    SvdMpParams(tw_confidence=0.95)
    with pytest.raises(ValueError, match="at least 0.8319"):
        SvdMpParams(tw_confidence=0.5)


def test_vit_qkv_is_fitted_per_block() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "embed_dim": 64, "num_heads": 2})
    arch = get_plugins().architecture("vit")
    layers = [layer for layer in select_layers(arch.prunable_layers(model), None) if layer.role == "qkv"]
    ctx = PruneContext(model=model, arch=arch, layers=layers, device=torch.device("cpu"), seed=0)
    rows = SvdMpPruner().prune(ctx, SvdMpParams(max_rank_fraction=0.25)).rows
    for row in rows:
        module = model.get_submodule(row.layer)
        assert isinstance(module, BlockLowRankLinear) and len(module.ranks) == 3
        assert all(1 <= k <= 16 for k in module.ranks)


# ---------------------------------------------------------------------------------- end to end

def test_recipe_prune_finetune_save_load(tmp_path: Path) -> None:
    recipe = tiny_recipe(
        [{"prune": "svd-mp", "params": {"min_dim": 16, "max_rank_fraction": 0.25, "coefficient_pruning": 0.2}},
         {"finetune": {"epochs": 1, "lr": 1e-3, "l1": 1e-5, "l2": 1e-5}}, {"evaluate": {}}],
        output=tmp_path / "out")
    recipe["model"]["kwargs"] = {**TINY_VIT, "embed_dim": 64, "num_heads": 2}
    result = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    pruned = result.report.steps[0]
    assert result.report.steps[0].stats.params < result.report.dense.params
    assert result.report.steps[0].stats.macs < result.report.dense.macs  # MACs really drop
    for row in pruned.rows:
        module = result.model.get_submodule(row.layer)
        for factor in (m for m in module.modules() if isinstance(m, nn.Linear)):
            assert (factor.weight == 0).any()  # coefficient-pruning zeros survived fine-tuning
    loaded = rmtp.load(tmp_path / "out").model
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)
    assert isinstance(loaded.blocks[0].mlp.fc1, LowRankLinear)
    assert isinstance(loaded.blocks[0].attn.qkv, BlockLowRankLinear)


def test_iterative_recipe_prunes_split_layers_again(tmp_path: Path) -> None:
    """The seeds' Algorithm 3 as a recipe: svd-mp → finetune → svd-mp → finetune, saved and reloaded."""
    recipe = tiny_recipe(
        [{"prune": "svd-mp", "params": {"min_dim": 16, "margin": 0.8}},
         {"finetune": {"epochs": 1, "lr": 1e-3, "l2": 1e-4}},
         {"prune": "svd-mp", "params": {"min_dim": 16, "margin": 1.2}}, {"finetune": {"epochs": 1, "lr": 1e-3}}],
        output=tmp_path / "out")
    recipe["model"]["kwargs"] = {**TINY_VIT, "embed_dim": 64, "num_heads": 2}
    result = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    first, second = result.report.steps[0], result.report.steps[2]
    split = {r.layer for r in first.rows if r.detail.get("mode") == "split"}
    assert split and {r.layer for r in second.rows} == {r.layer for r in first.rows if r.skipped is None}
    assert all(r.skipped is None for r in second.rows)
    assert second.stats.params < first.stats.params
    for row in (r for r in second.rows if r.layer in split):
        assert row.note.startswith("split, rank")
        assert row.kept_rank <= next(r.kept_rank for r in first.rows if r.layer == row.layer)
    loaded = rmtp.load(tmp_path / "out").model
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)
    assert loaded.blocks[0].mlp.fc1.mp_edges == result.model.blocks[0].mlp.fc1.mp_edges is not None


def test_convnext_and_resnet_layers_split(tmp_path: Path) -> None:
    for name, kwargs in (("convnext_atto", {"depths": [1, 1, 1, 1], "dims": [16, 32, 48, 64]}),
                         ("resnet18", {"channels": [16, 32, 64, 128]})):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
        arch = get_plugins().architecture_for(name)
        layers = select_layers(arch.prunable_layers(model), None)
        ctx = PruneContext(model=model, arch=arch, layers=layers, device=torch.device("cpu"), seed=0)
        originals = {layer.name: ctx.module(layer).weight.detach().clone() for layer in layers}
        rows = SvdMpPruner().prune(ctx, SvdMpParams(min_dim=8, max_rank_fraction=0.25)).rows
        split = [r for r in rows if r.detail.get("mode") == "split"]
        assert split, f"{name}: nothing was split"
        for row in split:
            module = model.get_submodule(row.layer)
            effective = weight_matrix(module.second.weight) @ weight_matrix(module.first.weight)
            truncated = weight_matrix(_truncated(originals[row.layer], row.kept_rank))
            torch.testing.assert_close(effective, truncated, atol=1e-5, rtol=1e-5)
        model(torch.randn(2, 1, 32, 32))  # still runs
        assert math.isfinite(float(model(torch.randn(1, 1, 32, 32)).detach().sum()))


class _Notes(rmtp.run.progress.Progress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_the_edge_without_data_says_what_it_will_cut_before_it_cuts() -> None:
    """Honest defaults (issue 21): the MP edge on raw weights can keep a few percent of a pretrained
    model; the step announces the share it keeps before replacing any layer, with the way out."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()  # random weights: almost all noise
    progress = _Notes()
    seen_before_replacing: list[int] = []
    progress.task = lambda *a, **k: (seen_before_replacing.append(len(progress.notes)),  # type: ignore[method-assign]
                                     rmtp.run.progress.Progress.task(progress, *a, **k))[1]
    report = rmtp.prune(model, "svd-mp", progress=progress, min_dim=8, only_if_faster=False)
    # q, k and v are fitted as three d×d blocks: a qkv layer's directions are 3·d, others min(M, N)
    full = sum(r.shape_before[0] if r.layer.endswith("qkv") else min(r.shape_before) for r in report.rows)
    kept = sum(r.kept_rank for r in report.rows) / full
    assert len(progress.notes) == 1 and "keeps" in progress.notes[0] and "calibration data" in progress.notes[0]
    assert f"{kept:.1%}" in progress.notes[0]
    assert seen_before_replacing and seen_before_replacing[-1] == 1  # the note came before the replacing
    budgeted = _Notes()
    rmtp.prune(timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval(), "svd-mp", progress=budgeted,
               min_dim=8, target_params=0.5)
    assert budgeted.notes == []  # a budget says what it keeps itself
