"""The built-in architecture plugins (vit, convnext, resnet) against real, tiny timm models.

Expected layer lists are derived here from the configurations (depths, block kinds), not read off
the model, so a change in timm's module naming or in the adapters' rules shows up as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rmtp.contract.architecture import Architecture, ModelSpec, PrunableLayer
from rmtp.errors import CheckpointError, PluginError
from rmtp.plugins import load_plugins
from rmtp_plugins.architectures.convnext import ConvNextArchitecture
from rmtp_plugins.architectures.deit import DeitDistilledArchitecture
from rmtp_plugins.architectures.resnet import ResNetArchitecture
from rmtp_plugins.architectures.swin import SwinArchitecture
from rmtp_plugins.architectures.vit import VitArchitecture

INPUT = (2, 3, 32, 32)
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
CONVNEXT_DEPTHS = (2, 1, 1, 1)
CONVNEXT_KWARGS = {"depths": CONVNEXT_DEPTHS, "dims": (16, 32, 48, 64), "num_classes": 10}
RESNET_LAYERS = (2, 1, 1, 1)
RESNET_CHANNELS = (16, 32, 64, 128)  # timm's default (64, 128, 256, 512) only makes the tests slower
RESNET_STEM_WIDTH = 64
RESNET_KWARGS = {"layers": RESNET_LAYERS, "channels": RESNET_CHANNELS, "num_classes": 10}


@dataclass(frozen=True)
class Case:
    """One adapter with a tiny model of its family."""

    arch: type[Architecture]
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def spec(self, **changes: Any) -> ModelSpec:
        kwargs = {**self.kwargs, **changes.pop("kwargs", {})}
        return ModelSpec(name=self.model, arch=self.arch.name, kwargs=kwargs, **changes)

    def create(self, **changes: Any) -> nn.Module:
        return self.arch().create(self.spec(**changes))


CASES = {
    "vit": Case(VitArchitecture, "vit_tiny_patch16_224", VIT_KWARGS),
    "convnext": Case(ConvNextArchitecture, "convnext_atto", CONVNEXT_KWARGS),
    "resnet": Case(ResNetArchitecture, "resnet18", RESNET_KWARGS),
}
HEAD_WEIGHT = {"vit": "head.weight", "convnext": "head.fc.weight", "resnet": "fc.weight"}


def _layer(name: str, role: str | None = None, optional: bool = False) -> PrunableLayer:
    return PrunableLayer(name=name, role=role or name.rsplit(".", 1)[-1], optional=optional)


def _expected_vit(depth: int, heads: tuple[str, ...] = ("head",)) -> list[PrunableLayer]:
    layers = [_layer("patch_embed.proj", "patch_embed", optional=True)]
    for i in range(depth):
        layers += [_layer(f"blocks.{i}.attn.qkv"), _layer(f"blocks.{i}.attn.proj"),
                   _layer(f"blocks.{i}.mlp.fc1"), _layer(f"blocks.{i}.mlp.fc2")]
    return layers + [_layer(head, "head", optional=True) for head in heads]


def _expected_convnext(depths: tuple[int, ...]) -> list[PrunableLayer]:
    layers = [_layer("stem.0", "stem", optional=True)]
    for i, depth in enumerate(depths):
        if i > 0:  # stage 0 keeps the stem's width and resolution: no downsample
            layers.append(_layer(f"stages.{i}.downsample.1", "downsample"))
        for j in range(depth):
            layers += [_layer(f"stages.{i}.blocks.{j}.mlp.fc1"), _layer(f"stages.{i}.blocks.{j}.mlp.fc2")]
    return layers + [_layer("head.fc", "head", optional=True)]


def _expected_resnet(*, bottleneck: bool, stem: tuple[str, ...] = ("conv1",), downsample_index: int = 0,
                     grouped_conv2: bool = False) -> list[PrunableLayer]:
    layers = [_layer(name, "stem", optional=True) for name in stem]
    width = RESNET_STEM_WIDTH
    for stage, (count, channels) in enumerate(zip(RESNET_LAYERS, RESNET_CHANNELS), start=1):
        out_width = channels * (4 if bottleneck else 1)
        for j in range(count):
            block = f"layer{stage}.{j}"
            layers.append(_layer(f"{block}.conv1"))
            if not grouped_conv2:
                layers.append(_layer(f"{block}.conv2"))
            if bottleneck:
                layers.append(_layer(f"{block}.conv3"))
            # a projection shortcut where the resolution (stages 2-4) or the width changes
            if j == 0 and (stage > 1 or width != out_width):
                layers.append(_layer(f"{block}.downsample.{downsample_index}", "downsample"))
            width = out_width
    return layers + [_layer("fc", "head", optional=True)]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One randomly initialised tiny model per adapter, shared by the read-only tests."""
    torch.manual_seed(0)
    return {key: case.create() for key, case in CASES.items()}


# --- registration and matching ------------------------------------------------------------------


def test_builtin_adapters_are_registered_through_entry_points() -> None:
    plugins = load_plugins(disabled=())
    for key, case in CASES.items():
        assert plugins.architectures.get(key) is case.arch
        assert case.arch.description and "\n" not in case.arch.description


@pytest.mark.parametrize(
    ("arch", "model_name", "expected"),
    [
        (VitArchitecture, "vit_base_patch16_224", True),
        (VitArchitecture, "vit_base_patch16_224.augreg_in21k", True),
        (VitArchitecture, "vit_small_patch16_384", True),
        (VitArchitecture, "vit_base_r50_s16_384", True),  # hybrid: ResNet stem, ViT blocks
        (VitArchitecture, "vit_relpos_base_patch16_224", True),
        (VitArchitecture, "deit_small_patch16_224", True),
        (VitArchitecture, "deit_tiny_distilled_patch16_224", False),  # the deit family's
        (DeitDistilledArchitecture, "deit_tiny_distilled_patch16_224", True),
        (DeitDistilledArchitecture, "deit_base_distilled_patch16_384", True),
        (DeitDistilledArchitecture, "deit_small_patch16_224", False),  # plain VisionTransformer: vit's
        (SwinArchitecture, "swin_tiny_patch4_window7_224", True),
        (SwinArchitecture, "swin_base_patch4_window12_384.ms_in22k", True),
        (SwinArchitecture, "swinv2_tiny_window8_256", False),  # another module, cosine attention
        (SwinArchitecture, "vit_base_patch16_224", False),
        (VitArchitecture, "deit3_base_patch16_224", True),
        (VitArchitecture, "flexivit_small", True),
        (VitArchitecture, "vit_base_patch16_dinov3", False),  # built by timm.models.eva
        (VitArchitecture, "vit_base_patch16_xp_224", False),  # ParallelScalingBlock
        (VitArchitecture, "vit_small_patch16_18x2_224", False),  # ParallelThingsBlock
        (VitArchitecture, "eva02_tiny_patch14_224", False),
        (VitArchitecture, "resnet50", False),
        (ConvNextArchitecture, "convnext_tiny", True),
        (ConvNextArchitecture, "convnext_atto.d2_in1k", True),
        (ConvNextArchitecture, "convnextv2_nano", True),
        (ConvNextArchitecture, "convit_tiny", False),
        (ConvNextArchitecture, "resnet50", False),
        (ResNetArchitecture, "resnet18", True),
        (ResNetArchitecture, "resnet50d", True),
        (ResNetArchitecture, "wide_resnet50_2", True),
        (ResNetArchitecture, "resnext50_32x4d", True),
        (ResNetArchitecture, "seresnet50", True),
        (ResNetArchitecture, "resnetv2_50", False),  # stages.{i}.blocks.{j}: other names
        (ResNetArchitecture, "resnet50_clip", False),  # built by timm.models.byobnet
        (ResNetArchitecture, "resnet32ts", False),
        (ResNetArchitecture, "convnext_tiny", False),
    ],
)
def test_matches(arch: type[Architecture], model_name: str, expected: bool) -> None:
    assert arch().matches(model_name) is expected


@pytest.mark.parametrize(
    ("model_name", "arch_name"),
    [("vit_tiny_patch16_224", "vit"), ("deit3_small_patch16_224", "vit"), ("convnext_small", "convnext"),
     ("resnet34", "resnet"), ("resnext101_32x8d", "resnet")],
)
def test_exactly_one_adapter_claims_a_model(model_name: str, arch_name: str) -> None:
    assert load_plugins(disabled=()).architecture_for(model_name).name == arch_name


# --- creating -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CASES)
def test_create_random_init_with_kwargs(key: str, models: dict[str, nn.Module]) -> None:
    model = models[key]
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(INPUT))
    assert out.shape == (INPUT[0], 10)
    assert torch.isfinite(out).all()


def test_create_refuses_a_model_of_another_layout() -> None:
    resnet = CASES["resnet"]
    with pytest.raises(PluginError, match="architecture 'vit' cannot handle resnet18: it has no blocks"):
        VitArchitecture().create(ModelSpec(name=resnet.model, kwargs=resnet.kwargs))
    with pytest.raises(PluginError, match=r"vit_base_patch16_xp_224: block blocks\.0 has no 'attn\.qkv'"):
        VitArchitecture().create(ModelSpec(name="vit_base_patch16_xp_224", kwargs=VIT_KWARGS))


def test_vit_refuses_attention_with_biases_outside_qkv() -> None:
    """Eva computes F.linear(x, qkv.weight, q/v bias): replacing qkv would be silently bypassed."""
    with pytest.raises(PluginError, match="q/v biases outside attn.qkv"):
        VitArchitecture().create(ModelSpec(name="eva02_tiny_patch14_224", kwargs=VIT_KWARGS))


def test_prunable_layers_refuses_a_foreign_model(models: dict[str, nn.Module]) -> None:
    with pytest.raises(PluginError, match="architecture 'convnext'"):
        ConvNextArchitecture().prunable_layers(models["resnet"])


# --- prunable layers --------------------------------------------------------------------------------


def test_vit_layers(models: dict[str, nn.Module]) -> None:
    assert VitArchitecture().prunable_layers(models["vit"]) == _expected_vit(VIT_KWARGS["depth"])


def test_vit_without_head_or_qkv_bias() -> None:
    model = CASES["vit"].create(kwargs={"num_classes": 0, "qkv_bias": False})
    assert model.blocks[0].attn.qkv.bias is None  # timm: a bias-free Linear, no separate q/v biases
    assert VitArchitecture().prunable_layers(model) == _expected_vit(VIT_KWARGS["depth"], heads=())


def test_deit_distilled_lists_both_heads() -> None:
    model = DeitDistilledArchitecture().create(ModelSpec(name="deit_tiny_distilled_patch16_224", kwargs=VIT_KWARGS))
    assert DeitDistilledArchitecture().prunable_layers(model) == _expected_vit(
        VIT_KWARGS["depth"], heads=("head", "head_dist"))


def test_vit_qkv_split_follows_timm_attention_layout(models: dict[str, nn.Module]) -> None:
    attn = models["vit"].blocks[1].attn
    dim = VIT_KWARGS["embed_dim"]
    split = VitArchitecture().qkv_split("blocks.1.attn.qkv", attn.qkv)
    assert split == {"q": slice(0, dim), "k": slice(dim, 2 * dim), "v": slice(2 * dim, 3 * dim)}
    # timm's Attention.forward: reshape(B, N, 3, heads, head_dim) and unbind along the "3" axis.
    tokens = torch.randn(2, 5, dim)
    with torch.no_grad():
        out = attn.qkv(tokens)
        q, k, v = out.reshape(2, 5, 3, attn.num_heads, attn.head_dim).unbind(2)
    for name, part in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(out[..., split[name]], part.reshape(2, 5, dim)), name


def test_qkv_split_is_none_for_other_layers(models: dict[str, nn.Module]) -> None:
    vit = models["vit"]
    assert VitArchitecture().qkv_split("blocks.0.attn.proj", vit.blocks[0].attn.proj) is None
    assert VitArchitecture().qkv_split("blocks.0.mlp.fc1", vit.blocks[0].mlp.fc1) is None
    for key in ("convnext", "resnet"):
        arch = CASES[key].arch()
        for layer in arch.prunable_layers(models[key]):
            assert arch.qkv_split(layer.name, models[key].get_submodule(layer.name)) is None


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_convnext_layers_never_include_depthwise_conv(conv_mlp: bool) -> None:
    model = CASES["convnext"].create(kwargs={"conv_mlp": conv_mlp})
    layers = ConvNextArchitecture().prunable_layers(model)
    assert layers == _expected_convnext(CONVNEXT_DEPTHS)
    fc1 = model.get_submodule("stages.0.blocks.0.mlp.fc1")
    assert isinstance(fc1, nn.Conv2d if conv_mlp else nn.Linear)
    conv_dw = model.get_submodule("stages.0.blocks.0.conv_dw")
    assert conv_dw.groups == conv_dw.in_channels > 1  # the model has depthwise convs ...
    for layer in layers:  # ... and none of them is listed
        module = model.get_submodule(layer.name)
        assert not (isinstance(module, nn.Conv2d) and module.groups > 1), layer.name


def test_resnet_basic_block_layers(models: dict[str, nn.Module]) -> None:
    layers = ResNetArchitecture().prunable_layers(models["resnet"])
    assert layers == _expected_resnet(bottleneck=False)


def test_resnet_bottleneck_layers() -> None:
    model = ResNetArchitecture().create(ModelSpec(name="resnet50", kwargs=RESNET_KWARGS))
    assert ResNetArchitecture().prunable_layers(model) == _expected_resnet(bottleneck=True)


def test_resnet_d_deep_stem_and_avg_down_shortcut() -> None:
    model = ResNetArchitecture().create(ModelSpec(name="resnet50d", kwargs=RESNET_KWARGS))
    assert isinstance(model.get_submodule("layer2.0.downsample.0"), nn.AvgPool2d)
    expected = _expected_resnet(bottleneck=True, stem=("conv1.0", "conv1.3", "conv1.6"),
                                downsample_index=1)
    assert ResNetArchitecture().prunable_layers(model) == expected


def test_resnext_grouped_conv2_is_left_out() -> None:
    model = ResNetArchitecture().create(ModelSpec(name="resnext50_32x4d", kwargs=RESNET_KWARGS))
    assert model.get_submodule("layer1.0.conv2").groups == 32
    expected = _expected_resnet(bottleneck=True, grouped_conv2=True)
    assert ResNetArchitecture().prunable_layers(model) == expected


def test_replaced_layer_is_no_longer_listed() -> None:
    """After a pruner swaps a layer for its own module, that layer is not a plain candidate any more."""
    model = CASES["vit"].create()
    fc1 = model.blocks[0].mlp.fc1
    model.blocks[0].mlp.fc1 = nn.Sequential(nn.Linear(fc1.in_features, 4), nn.Linear(4, fc1.out_features))
    names = [layer.name for layer in VitArchitecture().prunable_layers(model)]
    assert "blocks.0.mlp.fc1" not in names and "blocks.0.mlp.fc1.0" not in names
    assert "blocks.1.mlp.fc1" in names


# --- checkpoints -------------------------------------------------------------------------------------


def _write(state: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    if layout == "safetensors":
        save_file(state, str(path))
    elif layout == "plain":
        torch.save(state, path)
    elif layout == "ddp":
        torch.save({f"module.{key}": value for key, value in state.items()}, path)
    else:  # nested under a training checkpoint's key
        torch.save({layout: state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)


@pytest.mark.parametrize("layout", ["safetensors", "plain", "state_dict", "model", "ddp"])
@pytest.mark.parametrize("key", CASES)
def test_create_from_local_checkpoint(key: str, layout: str, models: dict[str, nn.Module], tmp_path: Path) -> None:
    source = models[key]
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    _write({k: v.contiguous() for k, v in source.state_dict().items()}, path, layout)
    torch.manual_seed(123)  # a different random init, which the checkpoint must fully overwrite
    loaded = CASES[key].create(checkpoint=path)
    x = torch.randn(INPUT)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


@pytest.mark.parametrize("key", CASES)
def test_checkpoint_of_another_shape_names_the_key(key: str, models: dict[str, nn.Module], tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in models[key].state_dict().items()}, str(path))
    with pytest.raises(CheckpointError) as exc:
        CASES[key].create(kwargs={"num_classes": 7}, checkpoint=path)
    message = str(exc.value)
    assert f"{HEAD_WEIGHT[key]}: checkpoint (10, " in message
    assert str(path) in message and "model.kwargs" in message


@pytest.mark.parametrize("key", CASES)
def test_pretrained_offline_is_a_clear_checkpoint_error(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub reads these at import time, so the module constants are patched too; an
    # empty cache keeps weights downloaded on a developer's machine from making this pass.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="model.pretrained: could not fetch pretrained weights") as exc:
        CASES[key].create(pretrained=True)
    assert "model.checkpoint" in str(exc.value)
