"""spp on ConvNeXt and ResNet: the units found, the sliced model against the gated reference (partial
and full removals, folded gates), real params/MACs drops, save/load, exact removal counts, planted
useless channels ranking last, refused variants, and a recipe with finetune on digits."""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.pruner import PruneContext
from rmtp.errors import RmtpError
from rmtp.measure import count_macs, count_params
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.saving import save
from rmtp_plugins.spp import PATH_FILE, SppParams, SppPruner, extract, search
from rmtp_plugins.spp.conv_modules import (
    ConstantChannels,
    RemovedConv2d,
    RemovedNorm,
    SlicedBatchNorm2d,
    SlicedConv2d,
    ZeroInputConv2d,
)
from rmtp_plugins.spp.groups import find_units, gated, group_params, shared_params
from rmtp_plugins.spp.modules import ConstantBranch, SlicedLinear
from rmtp_plugins.spp.path import removal_count, removal_mask, removed_params

TINY = {"num_classes": 10, "in_chans": 1}
MODELS = {
    "convnext": ("convnext", "convnext_atto", {"depths": [1, 1, 1, 1], "dims": [16, 32, 48, 64], "conv_mlp": False}),
    "convnext-conv-mlp": ("convnext", "convnext_atto", {"depths": [1, 1, 1, 1], "dims": [16, 32, 48, 64],
                                                        "conv_mlp": True}),
    "resnet-basic": ("resnet", "resnet18", {"channels": [16, 32, 64, 128]}),
    "resnet-bottleneck": ("resnet", "resnet50", {"channels": [8, 16, 24, 32], "layers": [1, 1, 1, 1]}),
}
SIZE = (1, 32, 32)


def make(key: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model whose BatchNorms and layer scales are random, so no branch is trivially constant
    (timm zero-initialises the last BatchNorm of a ResNet block and ConvNeXt's layer scale is 1e-6)."""
    _, name, kwargs = MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, **TINY, **{**kwargs, **overrides}).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.3 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, torch.nn.Parameter):
                gamma.fill_(0.5)
    return model


def arch_of(key: str):
    from rmtp.plugins import get_plugins

    return get_plugins().architecture(MODELS[key][0])


def units_of(model: torch.nn.Module, key: str):
    arch = arch_of(key)
    return find_units(model, arch.couplings(model), arch.prunable_layers(model), ("heads", "neurons", "channels"),
                      arch=arch)


def context(model: torch.nn.Module, key: str, *, images: int = 64, seed: int = 0) -> PruneContext:
    arch = arch_of(key)
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(images, *SIZE, generator=generator),
                         torch.randint(0, 10, (images,), generator=generator))
    return PruneContext(model=model, arch=arch, layers=arch.prunable_layers(model), device=torch.device("cpu"),
                        seed=seed, calibration=DataLoader(data, batch_size=32))


# ------------------------------------------------------------------------------------ units


def test_units_are_found_with_their_sizes() -> None:
    convnext = units_of(make("convnext"), "convnext")
    assert [(u.path, u.kind, u.count, u.consumer, u.channel_dim) for u in convnext[:2]] == [
        ("stages.0.blocks.0.mlp", "neuron", 64, "stages.0.blocks.0.mlp.fc2", -1),
        ("stages.1.blocks.0.mlp", "neuron", 128, "stages.1.blocks.0.mlp.fc2", -1)]
    assert convnext[0].group_params == 16 + 1 + 16  # fc1 row + bias, fc2 column
    conv_mlp = units_of(make("convnext-conv-mlp"), "convnext-conv-mlp")
    assert [(u.count, u.channel_dim, u.group_params) for u in conv_mlp] == [(64, 1, 33), (128, 1, 65),
                                                                             (192, 1, 97), (256, 1, 129)]
    basic = units_of(make("resnet-basic"), "resnet-basic")
    assert [(u.path, u.count, u.consumer) for u in basic[:3]] == [
        ("layer1.0.conv1", 16, "layer1.0.conv2"), ("layer1.1.conv1", 16, "layer1.1.conv2"),
        ("layer2.0.conv1", 32, "layer2.0.conv2")]
    # conv1 filter (the stem has 64 channels), bn1 weight and bias, conv2 column
    assert len(basic) == 8 and basic[0].group_params == 64 * 9 + 2 + 16 * 9
    bottleneck = units_of(make("resnet-bottleneck"), "resnet-bottleneck")
    assert [(u.path, u.count, u.consumer) for u in bottleneck[:2]] == [
        ("layer1.0.conv1", 8, "layer1.0.conv2"), ("layer1.0.conv2", 8, "layer1.0.conv3")]
    assert bottleneck[0].group_params == 64 + 2 + 8 * 9 and bottleneck[1].group_params == 8 * 9 + 2 + 32
    assert [u.offset for u in bottleneck] == [0, 8, 16, 32, 48, 72, 96, 128]


def test_removed_params_count_shared_bottleneck_weights_once() -> None:
    """The pricing of a removal equals the params slicing really removes (conv2's kernels are held by
    a conv1 channel and a conv2 channel together), and removal_count picks the closest count."""
    model = make("resnet-bottleneck")
    units = units_of(model, "resnet-bottleneck")
    sizes, shared = group_params(units), shared_params(model, units)
    assert [(p.first, p.second, p.per_pair) for p in shared[:1]] == [(units[0].gates, units[1].gates, 9)]
    remove = _removal(units, "resnet-bottleneck")
    sliced = copy.deepcopy(model)
    extract(sliced, units, remove)
    assert removed_params(remove, sizes, shared) == count_params(model) - count_params(sliced)
    order = list(torch.randperm(len(sizes), generator=torch.Generator().manual_seed(3)).tolist())
    total = removed_params(torch.ones(len(sizes), dtype=torch.bool), sizes, shared)
    for ratio in (0.1, 0.3, 0.5, 0.8):
        priced = [removed_params(removal_mask(order, c), sizes, shared) for c in range(len(order) + 1)]
        best = min(range(len(priced)), key=lambda c: (abs(priced[c] - ratio * total), c))
        assert removal_count(ratio, sizes, order, "params", shared) == best


# ------------------------------------------------------------------------------ extraction


def _removal(units, key: str) -> torch.Tensor:
    """A random 40% plus, per family, whole units removed (and whole-unit combinations in bottlenecks)."""
    n = sum(u.count for u in units)
    remove = torch.rand(n, generator=torch.Generator().manual_seed(2)) < 0.4
    if key == "resnet-bottleneck":
        remove[units[0].gates] = True  # layer1.0: conv1 all gone, conv2 partly
        remove[units[3].gates] = True  # layer2.0: conv2 all gone, conv1 partly
        remove[units[4].gates] = True  # layer3.0: both gone
        remove[units[5].gates] = True
    else:
        remove[units[0].gates] = True  # the first block loses its whole unit
        remove[units[1].gates] = False
        remove[units[1].offset] = True
    return remove


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("key", list(MODELS))
def test_sliced_model_equals_the_gated_model_and_reloads(key: str, fold: bool, tmp_path: Path) -> None:
    model = make(key, seed=3)
    units = units_of(model, key)
    n = sum(u.count for u in units)
    gates = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(1))
    remove = _removal(units, key)
    images = torch.randn(4, *SIZE)
    with torch.no_grad(), gated(model, units, torch.where(remove, torch.zeros(n), gates if fold else torch.ones(n))):
        expected = model(images)
    params, macs = count_params(model), count_macs(model, SIZE)
    kept = [k for _, k in extract(model, units, remove, gates if fold else None)]
    assert kept == [u.count - int(remove[u.gates].sum()) for u in units]
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # removed channels are gone for real: fewer params and MACs, no zeros left behind
    assert count_params(model) < params and count_macs(model, SIZE) < macs
    first = model.get_submodule(units[0].path if key.startswith("convnext") else units[0].producer)
    if key == "convnext":
        assert isinstance(first, ConstantBranch) and isinstance(model.stages[1].blocks[0].mlp.fc1, SlicedLinear)
    elif key == "convnext-conv-mlp":
        assert isinstance(first, ConstantChannels) and isinstance(model.stages[1].blocks[0].mlp.fc2, SlicedConv2d)
    else:
        block = model.layer1[0]
        assert isinstance(first, RemovedConv2d) and isinstance(block.bn1, RemovedNorm)
        assert isinstance(block.conv2, ZeroInputConv2d)  # conv2 read only the removed channels
    if key == "resnet-bottleneck":
        assert isinstance(model.layer2[0].conv1, SlicedConv2d) and isinstance(model.layer2[0].conv2, RemovedConv2d)
        assert isinstance(model.layer2[0].conv3, ZeroInputConv2d)
        assert isinstance(model.layer1[0].bn2, SlicedBatchNorm2d) and model.layer1[0].bn2.num_features == kept[1]
    # save → load gives the same function
    _, name, kwargs = MODELS[key]
    spec = ModelSpec(name=name, kwargs={**TINY, **kwargs})
    loaded = rmtp.load(save(model, tmp_path / "m", spec=spec, arch=arch_of(key), baseline=spec)).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), out, atol=0, rtol=0)
    # a second spp step finds the sliced units again (fully removed ones, and units feeding them, skipped)
    again = units_of(loaded, key)
    feeding_removed = {"resnet-bottleneck": {"layer2.0.conv1"}}.get(key, set())
    assert [(u.path, u.count) for u in again] == [
        (u.path, k) for u, k in zip(units, kept, strict=True) if k and u.path not in feeding_removed]
    # and it still trains (train-mode BatchNorms on the sliced and the size-carrying channels)
    loaded.train()
    loaded(images).sum().backward()


def test_a_fully_removed_resnet_path_is_exact_in_train_mode_too() -> None:
    """With every channel of a unit gone the branch is bn2(conv2(0)): in train mode BatchNorm then
    sees an all-zero batch (mean 0, var 0) and outputs its shift, exactly as the gated block does."""
    model = make("resnet-basic", seed=5)
    units = units_of(model, "resnet-basic")
    n = sum(u.count for u in units)
    remove = torch.zeros(n, dtype=torch.bool)
    remove[units[2].gates] = True
    reference = copy.deepcopy(model).train()
    images = torch.randn(4, *SIZE)
    with torch.no_grad(), gated(reference, units, (~remove).float()):
        expected = reference(images)
    extract(model, units, remove)
    with torch.no_grad():
        out = model.train()(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["convnext", "resnet-bottleneck"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_groups_target_removes_exactly_the_requested_count(key: str, ratio: float) -> None:
    model = make(key)
    total = sum(u.count for u in units_of(model, key))
    rows = SppPruner().prune(context(model, key), SppParams(ratio=ratio, target="groups", steps=3)).rows
    noun = "neurons" if key == "convnext" else "channels"
    kept = sum(int(r.detail[noun].split("→")[1]) for r in rows)
    assert kept == total - math.floor(ratio * total + 0.5)
    assert sum(r.params_after for r in rows) < sum(r.params_before for r in rows)


# ------------------------------------------------------------------------------- the path


@pytest.mark.parametrize("key", ["convnext", "resnet-basic"])
def test_planted_useless_channels_enter_last(key: str) -> None:
    """Channels with no effect carry no gradient on their gate: every useful channel ranks first."""
    model = make(key)
    units = units_of(model, key)
    with torch.no_grad():
        if key == "convnext":  # fc1 rows and biases zeroed: GELU(0) = 0, the channel is dead
            for mlp, dead in ((model.stages[0].blocks[0].mlp, slice(0, 24)),
                              (model.stages[1].blocks[0].mlp, slice(100, 128))):
                mlp.fc1.weight[dead] = 0
                mlp.fc1.bias[dead] = 0
            planted = [(0, range(0, 24)), (1, range(100, 128))]
        else:  # BatchNorm's shift keeps a zero filter alive: zero what conv2 reads of the channel
            model.layer1[0].conv2.weight[:, :6] = 0
            model.layer2[0].conv2.weight[:, 20:] = 0
            planted = [(0, range(0, 6)), (2, range(20, 32))]
        # confident logits, so KD to the dense model pulls on useful channels (×30 overflows the ResNet)
        model.head.fc.weight.mul_(30) if key == "convnext" else model.fc.weight.mul_(3)
    dead = {units[i].offset + j for i, channels in planted for j in channels}
    ctx = context(model, key)
    ctx.dense_model = copy.deepcopy(model)
    path = search(ctx, units, SppParams(ratio=0.3, loss="kd", steps=120, lam=1.0))
    order = path.order()
    entered = [j for j in order if math.isfinite(path.entry[j])]
    assert len(entered) >= 100 and not dead & set(entered)  # useful channels enter, planted ones never
    assert order[:len(entered)] == entered  # so every planted channel ranks after every entered one
    for i, _ in planted:
        unit = units[i]
        assert any(unit.offset <= j < unit.offset + unit.count for j in entered)
    # Not asserted: that planted channels rank after useful channels that never entered either.
    # Among never-entered groups the order is the signed Z, and a dead group's Z follows the
    # loss-free decay towards 1/κ, while a group the loss pushes down stays lower (see docs/spp.md,
    # "The order").
    assert all(p.requires_grad for p in model.parameters())
    assert not model.get_submodule(units[0].consumer)._forward_pre_hooks


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("key", "overrides", "message"), [
    ("convnext", {"use_grn": True}, r"neurons of stages.0.blocks.0.mlp: it is a GlobalResponseNormMlp .*mean"),
    ("resnet-bottleneck", {"cardinality": 4, "base_width": 64}, r"channels of layer1.0.conv1: its conv2 is grouped"),
    ("resnet-basic", {"norm_layer": partial(timm.layers.GroupNorm, num_groups=4)},
     r"its bn1 is a GroupNorm, not BatchNorm2d"),
    ("resnet-basic", {"aa_layer": timm.layers.BlurPool2d},
     r"layer2.0.conv1: its aa \(BlurPool2d\) holds parameters or buffers"),
])
def test_unsupported_variants_are_refused_before_the_search(key: str, overrides: dict, message: str) -> None:
    _, name, kwargs = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY, **{**kwargs, **overrides}).eval()
    structures = ["neurons"] if key == "convnext" else ["channels"]
    with pytest.raises(RmtpError, match=message):
        SppPruner().prune(context(model, key), SppParams(ratio=0.3, steps=1, structures=structures))


def test_by_default_a_resnet_with_blur_pools_loses_the_channels_of_its_other_blocks() -> None:
    """Left at the default, ``structures`` cuts the units a model can lose and leaves the others
    (here the blocks whose stride-2 conv is followed by a BlurPool2d), saying why in their rows."""
    _, name, kwargs = MODELS["resnet-basic"]
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY, **{**kwargs, "aa_layer": timm.layers.BlurPool2d}).eval()
    result = SppPruner().prune(context(model, "resnet-basic"), SppParams(ratio=0.3, steps=1))
    skipped = {row.layer: row.skipped for row in result.rows if row.skipped}
    cut = [row.layer for row in result.rows if not row.skipped]
    assert cut == ["layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]
    assert list(skipped) == ["layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]  # the strided first blocks
    assert all("its aa (BlurPool2d) holds parameters or buffers" in why for why in skipped.values())


def test_structures_the_family_lacks_are_refused() -> None:
    with pytest.raises(RmtpError, match=r"structures \['heads'\] select nothing in a resnet model, which has channels"):
        SppPruner().prune(context(make("resnet-basic"), "resnet-basic"), SppParams(ratio=0.3, structures=["heads"]))


# -------------------------------------------------------------------------- through the pipeline


def test_recipe_on_a_tiny_bottleneck_resnet_with_finetune(tmp_path: Path) -> None:
    _, name, kwargs = MODELS["resnet-bottleneck"]
    raw = {
        "model": {"name": name, "kwargs": {**TINY, **kwargs}},
        "data": {"name": "digits", "img_size": 32, "batch_size": 128, "calibration_size": 64, "eval_limit": 128},
        "steps": [{"prune": "spp", "params": {"ratios": [0.3, 0.5], "keep": 0.5, "steps": 10, "batch_size": 32}},
                  {"finetune": {"epochs": 1, "lr": 1e-3}},
                  {"evaluate": {}}],
        "output": {"dir": str(tmp_path / "out")},
    }
    result = run_recipe(parse_recipe(raw, source=tmp_path / "r.yaml"))
    out = tmp_path / "out"
    assert (out / "spp-0.30" / "model.safetensors").is_file() and (out / PATH_FILE).is_file()
    rows = result.report.steps[0].rows
    before = sum(r.params_before for r in rows)
    removed = 1 - sum(r.params_after for r in rows) / before
    # `target: params` lands on the requested share of the inner convs' params, conv2 weights
    # (shared by a conv1 channel and a conv2 channel) counted once: within one group's params
    largest_group = max(u.group_params for u in units_of(make("resnet-bottleneck"), "resnet-bottleneck"))
    assert abs(removed - 0.5) <= largest_group / before
    levels = json.loads((out / PATH_FILE).read_text())["levels"]
    for ratio in ("0.3", "0.5"):
        level = levels[ratio]
        assert abs(level["param_share_removed"] - float(ratio)) <= largest_group / before
        assert level["group_params_removed"] == level["params_removed"]  # the pricing is the real count
    dense = count_params(timm.create_model(name, **TINY, **kwargs))
    sizes = [count_params(rmtp.load(out / v).model) for v in ("spp-0.30", "spp-0.50")]
    assert dense > sizes[0] > sizes[1]
    final = rmtp.load(out).model
    images = torch.randn(3, *SIZE)
    assert count_params(final) == sizes[1]
    with torch.no_grad():
        torch.testing.assert_close(final(images), result.model.eval()(images), atol=0, rtol=0)
