"""n:m: masks against brute force, layouts, Wanda, permutations (function kept, save/load), MP
budgets on planted spectra, prune–restore, masks through fine-tuning, and the CUDA export guard."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import REPO, TINY_VIT, tiny_recipe
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.contract.architecture import ModelSpec, PrunableLayer
from rmtp.contract.pruner import PruneContext
from rmtp.errors import DeviceError, RmtpError
from rmtp.gemm import from_gemm, gemm_view
from rmtp.plugins import load_plugins
from rmtp.run.layer_filter import select_layers
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.saving import save
from rmtp_plugins.nm import (
    NmParams,
    NmPruner,
    check_nm,
    collect_input_stats,
    semi_structured_kernel,
    semi_structured_problem,
    to_semi_structured,
)
from rmtp_plugins.nm.budget import Option, allocate
from rmtp_plugins.nm.masks import (
    nm_mask,
    reconstruction_error,
    restore_mask,
)
from rmtp_plugins.nm.permute import (
    PermutedInput,
    apply_permutation,
    find_absorber,
    retained_energy,
    search_permutation,
)

#: A tiny ViT whose widths (48, 192; heads of 24) take every common pattern, 6:12 and 12:16 included.
NM_VIT = {**TINY_VIT, "embed_dim": 48, "num_heads": 2}
RESNET = {"layers": (1, 1, 1, 1), "channels": (16, 32, 32, 32), "num_classes": 10}
CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (16, 32, 32, 32), "num_classes": 10}


def _plugins():
    plugins = load_plugins()
    if "n:m" not in plugins.pruners:  # until the entry point is installed
        plugins.pruners.add(NmPruner)
    return plugins


@pytest.fixture()
def nm_plugins():
    return _plugins()  # recipes parsed with them carry them into run_recipe


def _arch(name: str):
    return rmtp.get_plugins().architecture(name)


def _vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**NM_VIT, **kwargs}).eval()


def _context(model: nn.Module, arch: str = "vit", calibration=None, names: list[str] | None = None) -> PruneContext:
    architecture = rmtp.get_plugins().architecture(arch)
    if names is None:
        layers = select_layers(architecture.prunable_layers(model), None)
    else:
        layers = [PrunableLayer(name, "fc1") for name in names]
    return PruneContext(model=model, arch=architecture, layers=layers, device=torch.device("cpu"), seed=0,
                        calibration=calibration)


def _images(shape=(1, 16, 16), count: int = 24, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *shape, generator=g)
    return DataLoader(TensorDataset(x, torch.zeros(count, dtype=torch.long)), batch_size=8)


def _nm_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of every Linear/Conv2d that holds zeros (a mask), PermutedInput contents included."""
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and bool((m.weight == 0).any())}


# ---------------------------------------------------------------------------------- masks and layout


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (6, 12), (8, 16), (12, 16), (1, 4), (3, 5)])
def test_mask_keeps_the_n_largest_of_every_group(n: int, m: int) -> None:
    scores = torch.rand(7, 6 * m, generator=torch.Generator().manual_seed(n * 100 + m))
    keep = nm_mask(scores, n, m)
    for row, group in itertools.product(range(7), range(6)):
        block = scores[row, group * m:(group + 1) * m]
        expected = set(sorted(range(m), key=lambda j: -float(block[j]))[:n])
        assert set(keep[row, group * m:(group + 1) * m].nonzero().flatten().tolist()) == expected
    check = check_nm(scores * keep, n, m)
    assert check.ok and check.max_nonzeros == n and check.groups == 7 * 6
    assert not check_nm(scores * keep, n - 1, m) if n > 1 else True


def test_mask_ties_go_to_the_lower_index() -> None:
    keep = nm_mask(torch.ones(2, 8), 2, 4)
    assert keep.tolist() == [[True, True, False, False] * 2] * 2


def test_conv_groups_run_along_input_channels_at_each_kernel_position() -> None:
    weight = torch.zeros(3, 8, 2, 2)
    weight[1, 0:2, 1, 0] = 1.0  # 2 of the channel group 0..3 at kernel position (1, 0): valid 2:4
    weight[1, 4:7, 0, 1] = 1.0  # 3 of the channel group 4..7 at (0, 1): one bad group
    weight[2, 0, :, :] = 1.0    # channel 0 at all 4 kernel positions: 4 different groups, each fine
    check = check_nm(weight, 2, 4)
    assert (check.groups, check.bad_groups, check.max_nonzeros) == (3 * 2 * 4, 1, 3)
    weight[1, 6, 0, 1] = 0.0
    assert check_nm(weight, 2, 4).ok
    assert torch.equal(from_gemm(gemm_view(weight), tuple(weight.shape)), weight)
    with pytest.raises(ValueError, match="in_channels=6 is not a multiple of m=4"):
        check_nm(torch.ones(2, 6, 3, 3), 2, 4)


@pytest.mark.parametrize("conv", [{"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "stride": 2, "dilation": 2},
                                  {"kernel_size": (1, 3), "padding": "same", "padding_mode": "reflect"}])
def test_gemm_layout_and_calibration_columns_reproduce_the_conv(conv) -> None:
    """A·colsᵀ with the layout's A and the calibration's im2col columns is the convolution itself."""
    from rmtp.fidelity.layerwise import input_columns as _columns

    torch.manual_seed(0)
    layer = nn.Conv2d(8, 5, bias=False, **conv)
    x = torch.randn(2, 8, 9, 11)
    out = layer(x)
    cols = _columns(layer, x)  # (B·L, K)
    product = cols @ gemm_view(layer.weight.detach()).T  # (B·L, out)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(product, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- the pruner


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (6, 12), (8, 16), (12, 16)])
def test_every_group_holds_at_most_n_after_pruning(n: int, m: int, nm_plugins) -> None:
    model = _vit(seed=n + m)
    ctx = _context(model, calibration=_images())
    rows = NmPruner().prune(ctx, NmParams(n=n, m=m, budget="uniform", score="wanda")).rows
    assert [r.layer for r in rows] == [layer.name for layer in ctx.layers] and not any(r.skipped for r in rows)
    for row in rows:
        weight = ctx.module(row.layer).weight
        check = check_nm(weight, n, m)
        assert check.ok and check.max_nonzeros == n
        assert row.nonzeros_after == check.nonzeros == weight.numel() * n // m
        assert row.detail["pattern"] == f"{n}:{m}" and row.budget == pytest.approx(n / m)


def test_layers_that_cannot_take_the_pattern_are_skipped_with_a_reason(nm_plugins) -> None:
    model = _vit()
    ctx = _context(model)
    rows = NmPruner().prune(ctx, NmParams(n=5, m=10, budget="uniform", score="magnitude")).rows
    assert all(r.skipped == "in_features=48 is not a multiple of m=10"
               for r in rows if r.layer.endswith(("qkv", "fc1")))
    assert all(r.nonzeros_after == r.nonzeros_before for r in rows)
    assert "MACs counted as weights" not in rows[0].note  # skipped rows say why they were skipped


def test_wanda_and_restore_need_calibration(nm_plugins) -> None:
    ctx = _context(_vit())
    with pytest.raises(RmtpError, match="score: wanda needs calibration data"):
        NmPruner().prune(ctx, NmParams(score="wanda"))
    with pytest.raises(RmtpError, match="restore needs calibration data"):
        NmPruner().prune(ctx, NmParams(score="magnitude", restore=True))


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="n=4 must be smaller than m=4"):
        NmParams(n=4, m=4)
    with pytest.raises(ValueError, match="target_macs, z_scale: only used with budget: mp"):
        NmParams(budget="uniform", target_macs=0.5, z_scale=1.0)
    with pytest.raises(ValueError, match="below the sparsest allowed pattern 2:4"):
        NmParams(target_macs=0.4)
    with pytest.raises(ValueError, match="neither 'dense' nor 'N:M'"):
        NmParams(patterns=["dense", "2-4"])
    with pytest.raises(ValueError, match="needs 1 <= N < M"):
        NmParams(patterns=["4:4"])
    with pytest.raises(ValueError, match="restore_overprune=3 exceeds n=2"):
        NmParams(restore=True, restore_overprune=3)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        NmParams(sparsity=0.5)
    assert NmParams(target_macs=0.3, patterns=["1:4", "dense"]).options() == [(2, 4), (1, 4), None]


# ---------------------------------------------------------------------------------- Wanda


def test_wanda_scores_match_a_brute_force_computation(nm_plugins) -> None:
    """‖x_k‖ summed over every image and token, per input column, for Linears inside a ViT."""
    model = _vit()
    loader = _images()
    inputs: dict[str, list[torch.Tensor]] = {"blocks.0.mlp.fc2": [], "blocks.1.attn.qkv": []}
    hooks = [model.get_submodule(n).register_forward_hook(lambda mod, a, out, n=n: inputs[n].append(a[0]))
             for n in inputs]
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for h in hooks:
        h.remove()
    model_copy = _vit()
    ctx = _context(model_copy, calibration=loader, names=list(inputs))
    NmPruner().prune(ctx, NmParams(score="wanda", budget="uniform"))
    for name, xs in inputs.items():
        weight = model.get_submodule(name).weight.detach()
        norms = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).pow(2).sum(0).sqrt()
        scores = weight.abs() * norms[None, :]
        expected = weight * nm_mask(scores, 2, 4)
        torch.testing.assert_close(model_copy.get_submodule(name).weight, expected, rtol=0, atol=0)


def test_conv_input_norms_match_explicit_loops() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 3, kernel_size=3, stride=2, padding=1, bias=False)
    model = nn.Sequential(layer)
    x = torch.randn(3, 4, 7, 6)
    stats = collect_input_stats(model, {"0": layer}, [(x, None)], torch.device("cpu"), squares=True, gram=False)
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    expected = torch.zeros(3, 3, 4, dtype=torch.float64)  # (r, s, c): the GEMM K order
    out_h, out_w = (7 + 2 - 3) // 2 + 1, (6 + 2 - 3) // 2 + 1
    for b, i, j, r, s, c in itertools.product(range(3), range(out_h), range(out_w), range(3), range(3), range(4)):
        expected[r, s, c] += float(padded[b, c, 2 * i + r, 2 * j + s]) ** 2
    torch.testing.assert_close(stats["0"].sq_norms, expected.reshape(-1), rtol=1e-6, atol=1e-9)
    assert stats["0"].positions == out_h * out_w


# ---------------------------------------------------------------------------------- permutation


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm/LayerNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
            if type(module).__name__ == "GlobalResponseNorm":
                module.weight.copy_(0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g))


def _random_perm(channels: int, blocks: int | None, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if blocks is None:
        return torch.randperm(channels, generator=g)
    return torch.cat([b * blocks + torch.randperm(blocks, generator=g) for b in range(channels // blocks)])


@pytest.mark.parametrize("name,model_name,kwargs,shape,expected", [
    ("vit", "vit_tiny_patch16_224", NM_VIT, (2, 1, 16, 16),
     {"blocks.0.attn.qkv": "index", "blocks.0.attn.proj": "real", "blocks.0.mlp.fc1": "index",
      "blocks.1.mlp.fc2": "real"}),
    ("resnet", "resnet18", RESNET, (2, 3, 32, 32),
     {"layer1.0.conv1": "index", "layer1.0.conv2": "real", "layer2.0.conv2": "real", "layer2.0.downsample.0": "index"}),
    ("resnet", "resnet26", RESNET, (2, 3, 32, 32), {"layer1.0.conv2": "real", "layer1.0.conv3": "real"}),
    ("convnext", "convnext_atto", CONVNEXT, (2, 3, 32, 32), {"stages.0.blocks.0.mlp.fc2": "real"}),
    ("convnext", "convnextv2_atto", CONVNEXT, (2, 3, 32, 32),
     {"stages.1.blocks.0.mlp.fc2": "real", "stages.1.blocks.0.mlp.fc1": "index"}),
])
def test_permutation_keeps_the_dense_function(name, model_name, kwargs, shape, expected) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, **kwargs).eval()
    _randomise_norms(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        reference = model(x)
    for seed, (layer, kind) in enumerate(expected.items()):
        absorber = find_absorber(model, layer, _arch(name).couplings(model))
        assert (absorber is not None) == (kind == "real"), layer
        module = model.get_submodule(layer)
        channels = module.weight.shape[1]
        perm = _random_perm(channels, absorber.blocks if absorber else None, seed)
        assert apply_permutation(model, layer, perm, absorber) == kind
        assert isinstance(model.get_submodule(layer), PermutedInput) == (kind == "index")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


def test_index_permutations_compose() -> None:
    model = _vit()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        reference = model(x)
    for seed in range(3):
        apply_permutation(model, "blocks.0.mlp.fc1", _random_perm(48, None, seed), None)
    assert isinstance(model.blocks[0].mlp.fc1, PermutedInput) and isinstance(model.blocks[0].mlp.fc1.layer, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


def test_attention_permutations_stay_inside_heads() -> None:
    model = _vit()
    absorber = find_absorber(model, "blocks.0.attn.proj", _arch("vit").couplings(model))
    assert absorber.blocks == 24 and absorber.rows == slice(96, 144)
    energy = torch.rand(48, 48, generator=torch.Generator().manual_seed(0)) ** 4
    perm = search_permutation(energy, 2, 4, blocks=24)
    assert sorted(perm[:24].tolist()) == list(range(24)) and sorted(perm[24:].tolist()) == list(range(24, 48))


def test_search_never_loses_and_separates_planted_strong_channels() -> None:
    # channels 0-3 strong in every row, 4-7 weak: identity keeps 2 strong + 2 weak per row;
    # the optimum (two strong per group) keeps all four strong ones.
    energy = torch.cat([torch.full((6, 4), 10.0), torch.full((6, 4), 1.0)], dim=1)
    perm = search_permutation(energy, 2, 4)
    best = max(retained_energy(energy, torch.tensor(list(first) + [c for c in range(8) if c not in first]), 2, 4)
               for first in itertools.combinations(range(8), 4))
    assert retained_energy(energy, perm, 2, 4) == pytest.approx(best) == 6 * 40.0
    for seed in range(5):
        energy = torch.rand(16, 32, generator=torch.Generator().manual_seed(seed)) ** 3
        perm = search_permutation(energy, 2, 4)
        assert sorted(perm.tolist()) == list(range(32))
        assert retained_energy(energy, perm, 2, 4) >= retained_energy(energy, torch.arange(32), 2, 4)


def test_permuted_pruning_keeps_more_score_than_unpermuted(nm_plugins) -> None:
    kept = {}
    for permute in (False, True):
        model = _vit(seed=3)
        NmPruner().prune(_context(model), NmParams(budget="uniform", score="magnitude", permute=permute))
        kept[permute] = sum(float(m.weight.detach().pow(2).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    assert kept[True] > kept[False]


# ---------------------------------------------------------------------------------- save / load


def test_save_load_identity_of_a_permuted_model(tmp_path: Path, nm_plugins) -> None:
    for arch, name, kwargs, shape in (("vit", "vit_tiny_patch16_224", NM_VIT, (1, 16, 16)),
                                      ("resnet", "resnet18", RESNET, (3, 32, 32))):
        torch.manual_seed(0)
        spec = ModelSpec(name=name, arch=arch, kwargs=kwargs)
        model = rmtp.get_plugins().architecture(arch).create(spec)
        ctx = _context(model, arch=arch, calibration=_images(shape, count=8))
        NmPruner().prune(ctx, NmParams(budget="uniform", score="wanda", permute=True, restore=True))
        wrapped = [n for n, m in model.named_modules() if isinstance(m, PermutedInput)]
        assert wrapped, "expected some layers permuted by a saved index"
        out = save(model, tmp_path / arch, spec=spec, arch=ctx.arch)
        loaded = rmtp.load(out).model
        assert [n for n, m in loaded.named_modules() if isinstance(m, PermutedInput)] == wrapped
        for n in wrapped:
            assert torch.equal(loaded.get_submodule(n).input_perm, model.get_submodule(n).input_perm)
            assert not torch.equal(loaded.get_submodule(n).input_perm,
                                   torch.arange(loaded.get_submodule(n).input_perm.numel()))
        x = torch.randn(4, *shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_permuted_input_config_is_validated() -> None:
    with pytest.raises(ValueError, match="unsupported layer config"):
        PermutedInput({"type": "os.system", "in_features": 4})
    with pytest.raises(ValueError, match="unsupported layer config"):
        PermutedInput({"type": "linear", "in_features": 4, "out_features": 2, "bias": True, "extra": 1})


# ---------------------------------------------------------------------------------- MP budgets


def _planted(rows: int, cols: int, spikes: list[float], rms: float, seed: int) -> torch.Tensor:
    """Low-rank signal of the given strengths (× the noise edge) plus Gaussian noise, scaled to ``rms``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cols, generator=g)
    edge = rows ** 0.5 + cols ** 0.5
    u = torch.linalg.qr(torch.randn(rows, len(spikes), generator=g))[0] if spikes else torch.zeros(rows, 0)
    v = torch.linalg.qr(torch.randn(cols, len(spikes), generator=g))[0] if spikes else torch.zeros(cols, 0)
    weight = noise + (u * torch.tensor(spikes) * edge) @ v.T
    return weight * rms / weight.pow(2).mean().sqrt()


class _Two(nn.Module):
    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        super().__init__()
        self.a = nn.Linear(first.shape[1], first.shape[0], bias=False)
        self.b = nn.Linear(second.shape[1], second.shape[0], bias=False)
        with torch.no_grad():
            self.a.weight.copy_(first)
            self.b.weight.copy_(second)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("spiked_first", [True, False])
def test_mp_budget_prunes_the_noise_layer_harder(spiked_first: bool, nm_plugins) -> None:
    """Same shape, same RMS weight: the budget tells them apart only by their spectra."""
    spiked = _planted(128, 128, [6, 5, 4, 3, 2.5, 2], rms=0.02, seed=1)
    noise = _planted(128, 128, [], rms=0.02, seed=2)
    first, second = (spiked, noise) if spiked_first else (noise, spiked)
    names = {"spiked": "a" if spiked_first else "b", "noise": "b" if spiked_first else "a"}
    for target, patterns in ((0.75, ["dense"]), (0.625, ["1:4", "dense"])):
        model = _Two(first, second)
        rows = NmPruner().prune(_context(model, names=["a", "b"]),
                                NmParams(score="magnitude", target_macs=target, patterns=patterns)).rows
        by_name = {r.layer: r for r in rows}
        s, n = by_name[names["spiked"]], by_name[names["noise"]]
        assert s.detail["signal u"] > 0.3
        assert n.detail["signal u"] < 0.05
        assert s.detail["z"] > 0 > n.detail["z"]
        assert n.budget < s.budget, (target, patterns, s.detail, n.detail)
        assert n.kept_fraction < s.kept_fraction
        assert sum(r.detail["sparse MACs"] for r in rows) <= target * sum(r.detail["MACs"] for r in rows)


def test_allocation_is_the_exact_knapsack_optimum_on_small_cases() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        layers = []
        for _ in range(4):
            macs = float(torch.randint(1, 5, (1,), generator=g))
            d = sorted(torch.rand(3, generator=g).tolist(), reverse=True)
            # convex damage in density: sparse options cost little, damage a lot
            layers.append([Option((1, 4), 0.25 * macs, d[0] * 3), Option((2, 4), 0.5 * macs, d[1]),
                           Option(None, macs, 0.0)])
        budget = 0.6 * sum(layer[-1].cost for layer in layers)
        chosen = allocate(layers, budget)
        assert sum(o.cost for o in chosen) <= budget + 1e-9
        feasible = [c for c in itertools.product(*layers) if sum(o.cost for o in c) <= budget + 1e-9]
        best = min(sum(o.damage for o in c) for c in feasible)
        # greedy on convex hulls: optimal up to the one step it could not afford
        assert sum(o.damage for o in chosen) <= best + max(o.damage for layer in layers for o in layer)


def test_z_scale_zero_ignores_the_spectrum(nm_plugins) -> None:
    model = _Two(_planted(64, 64, [5, 4], 0.02, 1), _planted(64, 64, [], 0.02, 2))
    rows = NmPruner().prune(_context(model, names=["a", "b"]), NmParams(score="magnitude", z_scale=0.0)).rows
    assert all(r.detail["z"] == 0.0 and r.detail["signal u"] is None for r in rows)


# ---------------------------------------------------------------------------------- prune–restore


def _correlated_layer(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32, generator=g))
    mixing = torch.randn(32, 32, generator=g) * torch.linspace(2.0, 0.1, 32)  # strongly correlated inputs
    x = torch.randn(512, 32, generator=g) @ mixing + 0.5
    return layer, x


@pytest.mark.parametrize("n,m,overprune", [(2, 4, 1), (2, 4, 2), (4, 8, 2), (1, 4, 1)])
def test_restore_keeps_the_pattern_and_never_raises_the_calibration_loss(n, m, overprune, nm_plugins) -> None:
    layer, x = _correlated_layer(seed=n + m)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=128)
    target = layer(x).detach()
    losses = {}
    for restore in (False, True):
        model = nn.Sequential(nn.Linear(32, 32, bias=False), copy.deepcopy(layer)).eval()  # "1" is pruned
        with torch.no_grad():
            model[0].weight.copy_(torch.eye(32))
        ctx = _context(model, calibration=loader, names=["1"])
        rows = NmPruner().prune(ctx, NmParams(n=n, m=m, budget="uniform", score="magnitude", restore=restore,
                                              restore_overprune=overprune)).rows
        with torch.no_grad():
            losses[restore] = float((model(x) - target).pow(2).mean())
        assert check_nm(model[1].weight, n, m).ok
    assert losses[True] <= losses[False] * (1 + 1e-9)
    assert losses[True] < 0.9 * losses[False]  # correlated inputs: restoring by the Gram matrix pays
    assert rows[0].detail["restore"].endswith("err")


def test_restore_matches_its_objective_brute_force() -> None:
    """One row, one group: greedy restore of 1 of 4 after over-pruning to 1 picks the best single weight."""
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(1, 4, generator=g, dtype=torch.float64)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    gram = x.T @ x
    scores = matrix.abs()
    keep = restore_mask(matrix, scores, gram, 2, 4, 1)
    first = int(scores.argmax())
    candidates = []
    for j in range(4):
        if j == first:
            continue
        mask = torch.zeros(1, 4, dtype=torch.bool)
        mask[0, [first, j]] = True
        candidates.append((reconstruction_error(matrix, mask, gram), j))
    error, j = min(candidates)
    only_first = torch.zeros(1, 4, dtype=torch.bool)
    only_first[0, first] = True
    expected = only_first.clone()
    if error < reconstruction_error(matrix, only_first, gram):
        expected[0, j] = True
    assert torch.equal(keep, expected)


# ---------------------------------------------------------------------------------- through the pipeline


@pytest.mark.slow
def test_masks_survive_finetune_and_the_saved_model_reloads_identically(tmp_path: Path, nm_plugins) -> None:
    prune = {"prune": "n:m", "params": {"n": 2, "m": 4, "score": "wanda", "target_macs": 0.7, "permute": True,
                                        "restore": True}}
    recipe = tiny_recipe([prune, {"finetune": {"epochs": 1, "lr": 1e-3}}, {"evaluate": {}}],
                         output=tmp_path / "out", seed=0)
    recipe["data"]["eval_limit"] = 64
    result = run_recipe(parse_recipe(recipe, plugins=nm_plugins))
    rows = result.report.steps[0].rows
    patterns = {r.layer: r.detail["pattern"] for r in rows}
    assert "2:4" in patterns.values() and "dense" in patterns.values()
    model = result.model
    for row in rows:
        weight = model.get_submodule(row.layer).weight
        if patterns[row.layer] == "2:4":
            check = check_nm(weight, 2, 4)
            assert check.ok, row.layer
            pruned_weight_nonzeros = round(row.kept_fraction * weight.numel())  # right after pruning
            assert check.nonzeros == pruned_weight_nonzeros  # fine-tuning revived no pruned weight
        else:
            assert bool((weight != 0).all())
    assert any(isinstance(m, PermutedInput) for m in model.modules())
    loaded = rmtp.load(tmp_path / "out", plugins=nm_plugins).model
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for name, weight in _nm_weights(loaded).items():
        row = next((r for r in rows if name in (r.layer, r.layer + ".layer")), None)
        if row is not None and patterns[row.layer] == "2:4":
            assert check_nm(weight, 2, 4).ok


@pytest.mark.slow
def test_example_recipe_prunes_as_documented(tmp_path: Path, nm_plugins) -> None:
    path = REPO / "recipes" / "nm-2of4.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["output"] = {**raw["output"], "dir": str(tmp_path / "out"), "overwrite": False}
    raw["data"]["eval_limit"] = 64
    raw["steps"] = raw["steps"][:2]  # prune + evaluate; the whole recipe runs in test_recipes_examples
    result = run_recipe(parse_recipe(raw, source=path, plugins=nm_plugins))
    rows = result.report.steps[0].rows
    sparse = sum(r.detail["sparse MACs"] for r in rows) / sum(r.detail["MACs"] for r in rows)
    assert 0.5 <= sparse <= 0.6
    assert result.report.steps[1].stats.top1 >= 85.0  # zero-shot, on 64 val images (dense: ~98%)
    for name, weight in _nm_weights(result.model).items():
        assert check_nm(weight, 2, 4).ok, name


# ---------------------------------------------------------------------------------- CUDA export


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_export_refuses_clearly_without_a_gpu() -> None:
    with pytest.raises(DeviceError, match="need a CUDA GPU .* torch sees none"):
        to_semi_structured(_vit())
    layer = nn.Linear(64, 32).half()
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight.abs().float(), 2, 4).half())
    before = layer.weight
    assert semi_structured_kernel(layer, device=torch.device("cuda"), dtype=torch.float16) is None  # no GPU: dense
    assert semi_structured_kernel(layer, device=torch.device("cpu"), dtype=torch.float16) is None
    assert layer.weight is before


def test_export_guard_names_each_problem() -> None:
    constraints = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}
    layer = nn.Linear(128, 64)
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight.abs(), 2, 4))
    assert "move the model to a CUDA device" in semi_structured_problem(layer, constraints=constraints)
    assert "dtype is float32" in semi_structured_problem(layer, constraints=constraints, require_cuda=False)
    half = layer.half()
    assert semi_structured_problem(half, constraints=constraints, require_cuda=False) is None
    with torch.no_grad():
        half.weight[0, :4] = 1.0
    assert "not 2:4: 1 of 2048 groups" in semi_structured_problem(half, constraints=constraints, require_cuda=False)
    odd = nn.Linear(96, 48).half()
    with torch.no_grad():
        odd.weight.mul_(nm_mask(odd.weight.abs().float(), 2, 4).half())
    assert "48×96 is not supported" in semi_structured_problem(odd, constraints=constraints, require_cuda=False)
    assert "not an nn.Linear" in semi_structured_problem(nn.Conv2d(4, 4, 1), require_cuda=False)
    from rmtp_plugins.nm.export import _backend

    backend, limits = _backend()  # the table torch itself checks (cuSPARSELt: 16×16, CUTLASS: 32×64 for fp16)
    assert backend in ("cusparselt", "cutlass") and torch.float16 in limits
    min_rows, min_cols = limits[torch.float16][:2]
    fits = nn.Linear(4 * min_cols, 2 * min_rows).half()
    with torch.no_grad():
        fits.weight.mul_(nm_mask(fits.weight.abs().float(), 2, 4).half())
    assert semi_structured_problem(fits, constraints=limits, require_cuda=False) is None
