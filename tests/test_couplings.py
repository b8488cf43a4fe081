"""The couplings of the architecture contract: which layers share a hidden dimension.

Expected couplings are derived here from the model configurations and from timm's forward order
of each block (Mlp: fc1 → act → drop1 → norm → fc2; Attention: v rows of qkv → norm → proj;
BasicBlock: conv1 → bn1 → drop_block → act1 → aa → conv2; Bottleneck: conv1 → bn1 → act1 → conv2
→ bn2 → drop_block → act2 → aa → conv3), not read off the adapters. The last tests add a model
family by one architecture class and check that spp and n:m work on it without any change to
them: the point of keeping structure in the contract.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import Mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmtp.contract.architecture import Architecture, Coupling, PrunableLayer
from rmtp.contract.pruner import PruneContext
from rmtp.plugins import get_plugins

VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 4}


def _arch(name: str) -> Architecture:
    return get_plugins().architecture(name)


def test_vit_declares_heads_then_neurons_per_block() -> None:
    model = timm.create_model("vit_tiny_patch16_224", **VIT)
    dim, head_dim = VIT["embed_dim"], VIT["embed_dim"] // VIT["num_heads"]
    expected = []
    for b in range(VIT["depth"]):
        attn, mlp = f"blocks.{b}.attn", f"blocks.{b}.mlp"
        expected += [
            Coupling("heads", attn, f"{attn}.qkv", f"{attn}.proj", between=(f"{attn}.norm",),
                     rows=slice(2 * dim, 3 * dim), group=head_dim),
            Coupling("neurons", mlp, f"{mlp}.fc1", f"{mlp}.fc2", between=(f"{mlp}.act", f"{mlp}.drop1", f"{mlp}.norm")),
        ]
    assert _arch("vit").couplings(model) == expected


def test_convnext_declares_one_mlp_per_block_and_the_v2_grn_as_its_norm() -> None:
    depths = (2, 1, 1, 1)
    v1 = timm.create_model("convnext_atto", depths=depths, dims=(8, 16, 24, 32), num_classes=4)
    v2 = timm.create_model("convnextv2_atto", depths=depths, dims=(8, 16, 24, 32), num_classes=4)
    mlps = [f"stages.{s}.blocks.{j}.mlp" for s, d in enumerate(depths) for j in range(d)]
    assert _arch("convnext").couplings(v1) == [
        Coupling("neurons", m, f"{m}.fc1", f"{m}.fc2", between=(f"{m}.act", f"{m}.drop1", f"{m}.norm")) for m in mlps]
    assert _arch("convnext").couplings(v2) == [
        Coupling("neurons", m, f"{m}.fc1", f"{m}.fc2", between=(f"{m}.act", f"{m}.drop1", f"{m}.grn"),
                 norms=(f"{m}.grn",)) for m in mlps]


def test_resnet_declares_the_inner_channels_of_basic_blocks_and_bottlenecks() -> None:
    basic = timm.create_model("resnet18", layers=[2, 1, 1, 1], channels=[8, 16, 24, 32], num_classes=4)
    bottleneck = timm.create_model("resnet26", layers=[1, 1, 1, 1], channels=[8, 16, 24, 32], num_classes=4)
    blocks = ["layer1.0", "layer1.1", "layer2.0", "layer3.0", "layer4.0"]
    assert _arch("resnet").couplings(basic) == [
        Coupling("channels", f"{b}.conv1", f"{b}.conv1", f"{b}.conv2",
                 between=(f"{b}.bn1", f"{b}.drop_block", f"{b}.act1", f"{b}.aa"), norms=(f"{b}.bn1",))
        for b in blocks]
    expected = []
    for b in ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]:
        expected += [
            Coupling("channels", f"{b}.conv1", f"{b}.conv1", f"{b}.conv2", between=(f"{b}.bn1", f"{b}.act1"),
                     norms=(f"{b}.bn1",)),
            Coupling("channels", f"{b}.conv2", f"{b}.conv2", f"{b}.conv3",
                     between=(f"{b}.bn2", f"{b}.drop_block", f"{b}.act2", f"{b}.aa"), norms=(f"{b}.bn2",)),
        ]
    assert _arch("resnet").couplings(bottleneck) == expected


def test_a_branch_an_earlier_pruner_removed_declares_no_coupling() -> None:
    model = timm.create_model("vit_tiny_patch16_224", **VIT)
    model.blocks[0].attn = nn.Identity()
    names = [c.name for c in _arch("vit").couplings(model)]
    assert names == ["blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]


# ---------------------------------------------------------------- a family added by one module


class MlpStack(nn.Module):
    """A model no built-in family covers: residual timm MLP blocks on feature vectors."""

    def __init__(self, width: int = 12, hidden: int = 24, depth: int = 2, classes: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Mlp(width, hidden) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class MlpStackArchitecture(Architecture):
    """Everything spp and n:m need to know about :class:`MlpStack`, and nothing more."""

    name = "mlp-stack"
    description = "test family"
    model_patterns = ("mlp_stack",)

    def prunable_layers(self, model: nn.Module, *, include_replaced: bool = False) -> list[PrunableLayer]:
        return [PrunableLayer(f"blocks.{i}.{fc}", fc) for i in range(len(model.blocks)) for fc in ("fc1", "fc2")]

    def couplings(self, model: nn.Module) -> list[Coupling]:
        return [Coupling("neurons", f"blocks.{i}", f"blocks.{i}.fc1", f"blocks.{i}.fc2",
                         between=(f"blocks.{i}.act", f"blocks.{i}.drop1", f"blocks.{i}.norm"))
                for i in range(len(model.blocks))]


def _stack_context(model: nn.Module) -> PruneContext:
    arch = MlpStackArchitecture()
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 12, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    return PruneContext(model=model, arch=arch, layers=arch.prunable_layers(model), device=torch.device("cpu"),
                        seed=0, calibration=DataLoader(data, batch_size=32))


def test_spp_slices_the_neurons_of_a_family_it_has_never_heard_of() -> None:
    from rmtp_plugins.spp import SppParams, SppPruner

    torch.manual_seed(0)
    model = MlpStack().eval()
    rows = SppPruner().prune(_stack_context(model), SppParams(ratio=0.5, target="groups", steps=20)).rows
    hidden = [block.fc1.weight.shape[0] for block in model.blocks]
    assert sum(hidden) == 24 and all(block.fc2.weight.shape[1] == h for block, h in zip(model.blocks, hidden))
    assert [row.layer for row in rows] == ["blocks.0", "blocks.1"]
    assert model(torch.randn(2, 12)).shape == (2, 3)


def test_nm_permutes_a_new_familys_producer_rows_through_its_coupling() -> None:
    from rmtp_plugins.nm.permute import apply_permutation, find_absorber

    torch.manual_seed(0)
    model = MlpStack().eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        reference = model(x)
    couplings = MlpStackArchitecture().couplings(model)
    absorber = find_absorber(model, "blocks.1.fc2", couplings)
    assert absorber is not None and absorber.producer == "blocks.1.fc1" and absorber.what == "fc1 rows"
    assert find_absorber(model, "blocks.1.fc1", couplings) is None  # reads the residual stream
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    assert apply_permutation(model, "blocks.1.fc2", perm, absorber) == "real"
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=1e-6)
