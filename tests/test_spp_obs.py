"""spp ``search: obs``: structured OBS choice against brute-force least squares and ZipLM's own loop,
the refit written into the sliced model, allocation, and the params' rules."""

from __future__ import annotations

import pytest
import timm
import torch
from _ziplm_reference import reference_hessian, reference_order
from conftest import TINY_VIT
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.fidelity.layerwise import input_columns
from rmtp.gemm import gemm_view
from rmtp_plugins.spp import SppParams
from rmtp_plugins.spp.obs import remove_groups
from rmtp_plugins.spp.oneshot import group_columns, uniform_order
from rmtp_plugins.spp.unit import Unit


def _problem(seed: int, rows: int = 300, k: int = 12, out: int = 5, correlated: bool = True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator, dtype=torch.float64)
    if correlated:  # inputs that explain each other, as hidden activations do
        x = x @ (torch.eye(k, dtype=torch.float64) + 0.5 * torch.randn(k, k, generator=generator,
                                                                       dtype=torch.float64))
        x = x + 0.3  # a mean the bias refit can take over
    w = torch.randn(out, k, generator=generator, dtype=torch.float64)
    b = torch.randn(out, generator=generator, dtype=torch.float64)
    return x, w, b


def _stats(x: torch.Tensor):
    return x.T @ x, x.sum(0), x.shape[0]


def _lstsq_fit(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, kept_cols: torch.Tensor):
    """Brute force: the kept columns (and the bias) fitted to the dense outputs by lstsq on the rows."""
    target = x @ w.T + (b if b is not None else 0.0)
    design = x[:, kept_cols]
    if b is not None:
        design = torch.cat([design, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, target).solution.T
    residual = float(((design @ solution.T - target) ** 2).sum())
    return solution, residual


def _columns(width: int, count: int) -> list[torch.Tensor]:
    return [torch.arange(g * width, (g + 1) * width) for g in range(count)]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("width", [1, 3])
def test_the_refit_is_the_least_squares_optimum_of_the_kept_columns(with_bias: bool, width: int) -> None:
    x, w, b = _problem(0)
    groups = _columns(width, 12 // width)
    gram, sums, count = _stats(x)
    fit = remove_groups(w, b if with_bias else None, gram, sums, count, groups, 2, percdamp=0.0)
    kept = torch.cat([cols for g, cols in enumerate(groups) if not fit.removed[g]])
    solution, residual = _lstsq_fit(x, w, b if with_bias else None, kept)
    # float64 throughout; the normal equations vs QR: agree to 1e-8 relative
    torch.testing.assert_close(fit.weight[:, kept], solution[:, :kept.numel()], rtol=1e-8, atol=1e-8)
    if with_bias:
        torch.testing.assert_close(fit.bias, solution[:, -1], rtol=1e-8, atol=1e-8)
    removed_cols = torch.cat([cols for g, cols in enumerate(groups) if fit.removed[g]])
    assert bool((fit.weight[:, removed_cols] == 0).all())
    assert fit.error == pytest.approx(residual, rel=1e-6)


@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_first_removal_is_the_brute_force_cheapest_group(width: int, seed: int) -> None:
    """Undamped OBS prices a group at exactly the least-squares error of doing without it."""
    x, w, b = _problem(seed)
    groups = _columns(width, 12 // width)
    gram, sums, count = _stats(x)
    fit = remove_groups(w, b, gram, sums, count, groups, 1, percdamp=0.0)
    residuals = []
    for g in range(len(groups)):
        kept = torch.cat([cols for i, cols in enumerate(groups) if i != g])
        residuals.append(_lstsq_fit(x, w, b, kept)[1])
    best = min(range(len(groups)), key=residuals.__getitem__)
    assert fit.order == (best,)
    assert fit.costs[0] == pytest.approx(residuals[best], rel=1e-6)
    assert fit.error == pytest.approx(residuals[best], rel=1e-6)


@pytest.mark.parametrize(("width", "remove"), [(1, 7), (4, 5)])
@pytest.mark.parametrize("seed", [0, 4])
def test_the_greedy_order_is_ziplms(width: int, remove: int, seed: int) -> None:
    """Without a bias (the reference has none), the groups go in the reference loop's order, at its
    damping (1% of the mean diagonal) and with its running-average Hessian."""
    x, w, _ = _problem(seed, rows=400, k=24, out=6)
    groups = _columns(width, 24 // width)
    gram, sums, count = _stats(x)
    fit = remove_groups(w, None, gram, sums, count, groups, remove)
    assert list(fit.order) == reference_order(w, reference_hessian(x, batch_size=64), width, remove)


def test_a_dead_input_goes_first_at_no_cost() -> None:
    x, w, b = _problem(5)
    x[:, 7] = 0.0
    gram, sums, count = _stats(x)
    fit = remove_groups(w, b, gram, sums, count, _columns(1, 12), 1)
    assert fit.order == (7,) and fit.costs[0] == 0.0


def test_group_columns_of_a_conv_are_its_input_channels_at_every_kernel_offset() -> None:
    """Zeroing a channel's GEMM columns computes the conv of the input with that channel zeroed."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=False).double()
    unit = Unit("block", "channel", 6, 1, 0, 0, producer="a", consumer="b", channel_dim=1)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    matrix = gemm_view(conv.weight.detach()).clone()
    cols = group_columns(unit, conv)[2]
    assert cols.numel() == 9
    matrix[:, cols] = 0
    masked = x.clone()
    masked[:, 2] = 0
    expected = conv(masked).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(input_columns(conv, x) @ matrix.T, expected)


def test_uniform_order_takes_the_same_share_of_every_unit() -> None:
    units = [Unit("a", "head", 4, 16, 1, 0), Unit("b", "neuron", 8, 1, 1, 4)]
    removal = uniform_order(units)[::-1]
    first_half = removal[:6]
    assert sorted(g for g in first_half if g < 4) == [0, 1] and len([g for g in first_half if g >= 4]) == 4


def _tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "depth": 2}).eval()


def _calibration(images: int = 48) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(images, 1, 16, 16, generator=generator),
                         torch.randint(0, 10, (images,), generator=generator))
    return DataLoader(data, batch_size=16)


def test_the_sliced_model_carries_the_refit_of_the_first_mlp() -> None:
    """End to end on a tiny ViT: block 0's fc2 in the pruned model is the least-squares fit of the
    dense fc2 outputs from the kept neurons (its inputs are the dense model's, nothing before it
    was cut), to float32 precision."""
    model, calibration = _tiny_vit(), _calibration()
    dense = rmtp.frozen_copy(model)
    rmtp.prune(model, "spp", dense=dense, calibration=calibration, search="obs", ratio=0.5,
               structures=["neurons"], percdamp=0.0, layers={"include": ["blocks.0.*"]})
    hidden = []
    handle = dense.blocks[0].mlp.fc2.register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    with torch.no_grad():
        for images, _ in calibration:
            dense(images)
    handle.remove()
    x = torch.cat(hidden).reshape(-1, hidden[0].shape[-1]).double()
    fc2 = dense.blocks[0].mlp.fc2
    fc1_new = model.blocks[0].mlp.fc1
    kept = torch.tensor([int(torch.nonzero((dense.blocks[0].mlp.fc1.weight == row).all(1))[0])
                         for row in fc1_new.weight])
    assert kept.numel() == fc2.in_features // 2
    solution, _ = _lstsq_fit(x, fc2.weight.double(), fc2.bias.double(), kept)
    torch.testing.assert_close(model.blocks[0].mlp.fc2.weight.double(), solution[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.blocks[0].mlp.fc2.bias.double(), solution[:, -1], rtol=1e-4, atol=1e-4)
    assert model.blocks[1].mlp.fc1.out_features == fc2.in_features  # outside the layer filter: untouched


def test_obs_holds_the_outputs_better_than_the_same_cut_without_refit() -> None:
    model, calibration = _tiny_vit(seed=1), _calibration()
    dense = rmtp.frozen_copy(model)
    report = rmtp.prune(model, "spp", dense=dense, calibration=calibration, search="obs", ratio=0.4,
                        structures=["neurons"])
    assert report.rows and all("output error" in row.detail for row in report.rows)
    images = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        expected, got = dense(images), model(images)
    unrefit = rmtp.frozen_copy(dense)
    from rmtp_plugins.spp.groups import slice_unit
    from rmtp_plugins.spp.mlp import neuron_unit
    # the same neurons removed with the dense fc2 columns (no refit) in every MLP the obs step cut
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp.fc1, nn.Linear) and block.mlp.fc1.out_features < unrefit.blocks[i].mlp.fc1.out_features:
            dense_fc1 = unrefit.blocks[i].mlp.fc1.weight
            kept = torch.tensor([int(torch.nonzero((dense_fc1 == row).all(1))[0]) for row in block.mlp.fc1.weight])
            keep = torch.zeros(dense_fc1.shape[0], dtype=torch.bool)
            keep[kept] = True
            slice_unit(unrefit, neuron_unit(f"blocks.{i}.mlp", unrefit.blocks[i].mlp), keep, None)
    with torch.no_grad():
        plain = unrefit(images)
    assert (got - expected).norm() < 0.8 * (plain - expected).norm()


@pytest.mark.parametrize(("params", "message"), [
    ({"ratio": 0.3, "search": "obs", "steps": 10}, "steps set the LBI gate search"),
    ({"ratio": 0.3, "search": "obs", "fold_gates": True}, "fold_gates set the LBI gate search"),
    ({"ratio": 0.3, "percdamp": 0.1}, "percdamp sets search: obs"),
])
def test_params_of_one_search_are_refused_with_the_other(params: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SppParams(**params)


def test_search_obs_validates_on_unlabeled_data_and_lbi_with_ce_does_not(tmp_path) -> None:
    """obs reads no labels; the LBI search's default loss (ce) does."""
    from conftest import tiny_recipe, write_recipe

    from rmtp.errors import RecipeError
    from rmtp.run.recipe import load_recipe

    for search, refused in (("obs", False), ("lbi", True)):
        recipe = tiny_recipe([{"prune": "spp", "params": {"ratio": 0.3, "search": search}}])
        recipe["data"]["unlabeled"] = True
        path = write_recipe(tmp_path / f"{search}.yaml", recipe)
        if refused:
            with pytest.raises(RecipeError, match="loss: ce is cross-entropy on labels"):
                load_recipe(path)
        else:
            load_recipe(path)


def test_a_resnet_conv_consumer_is_refitted_on_its_im2col_columns() -> None:
    """ResNet basic block layer1.0: its conv1 channels cut by obs, conv2 (3×3, no bias) is the lstsq
    fit of the dense conv2's outputs from the kept channels' im2col columns (float32 precision)."""
    from rmtp.fidelity.layerwise import input_columns

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=[16, 32, 64, 128]).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.num_features, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.num_features, generator=generator))
    dense = rmtp.frozen_copy(model)
    data = TensorDataset(torch.randn(32, 1, 32, 32, generator=generator), torch.zeros(32, dtype=torch.long))
    calibration = DataLoader(data, batch_size=16)
    rmtp.prune(model, "spp", dense=dense, calibration=calibration, search="obs", ratio=0.5, percdamp=0.0,
               structures=["channels"], layers={"include": ["layer1.0.conv1", "layer1.0.conv2"]})
    conv2 = dense.layer1[0].conv2
    columns = []
    handle = conv2.register_forward_pre_hook(lambda m, args: columns.append(input_columns(m, args[0])))
    with torch.no_grad():
        for images, _ in calibration:
            dense(images)
    handle.remove()
    x = torch.cat(columns).double()
    new_conv1 = model.layer1[0].conv1
    kept = torch.tensor([int(torch.nonzero((dense.layer1[0].conv1.weight == f).flatten(1).all(1))[0])
                         for f in new_conv1.weight])
    assert kept.numel() == 8
    from rmtp_plugins.spp.oneshot import group_columns

    unit = Unit("layer1.0", "channel", 16, 1, 0, 0, producer="layer1.0.conv1", consumer="layer1.0.conv2",
                channel_dim=1)
    kept_cols = torch.cat([group_columns(unit, conv2)[c] for c in kept]).sort().values
    solution, _ = _lstsq_fit(x, gemm_view(conv2.weight).double(), None, kept_cols)
    got = gemm_view(model.layer1[0].conv2.weight).double()
    torch.testing.assert_close(got, solution, rtol=1e-3, atol=1e-4)


def test_the_lbi_search_refuses_unlabeled_images_for_cross_entropy_in_one_line() -> None:
    from rmtp.errors import RmtpError

    model = _tiny_vit()
    data = TensorDataset(torch.randn(16, 1, 16, 16), torch.full((16,), -1, dtype=torch.long))
    with pytest.raises(RmtpError, match="loss: ce is cross-entropy on labels, and the calibration images are "
                                        "unlabeled"):
        rmtp.prune(model, "spp", dense=rmtp.frozen_copy(model), calibration=DataLoader(data, batch_size=8),
                   ratio=0.3, steps=2, batch_size=8)
