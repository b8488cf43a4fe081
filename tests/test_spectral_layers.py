"""Per-layer analysis through the architecture adapters: names, shapes, skips with reasons, planted signal."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import REPO, TINY_VIT
from torch import nn

from rmtp.contract.architecture import ModelSpec
from rmtp.contract.saved_types import rebuildable
from rmtp.errors import RmtpError
from rmtp.plugins import get_plugins
from rmtp.run.progress import Progress
from rmtp.spectral import LayerSpectrum, analyze_model, fit_mp

CARD = json.loads((REPO / "models" / "digits_vit.json").read_text())


def build(name: str, **kwargs) -> tuple[nn.Module, object]:
    arch = get_plugins().architecture_for(name)
    torch.manual_seed(0)
    return arch.create(ModelSpec(name=name, kwargs=kwargs)), arch


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, object]:
    spec = ModelSpec(name=CARD["timm_name"], kwargs=CARD["kwargs"],
                     checkpoint=REPO / "models" / "digits_vit.safetensors")
    arch = get_plugins().architecture_for(spec.name)
    return arch.create(spec), arch


def by_name(rows: list[LayerSpectrum]) -> dict[str, LayerSpectrum]:
    return {row.name: row for row in rows}


def test_reference_model_every_matrix_in_forward_order(digits) -> None:
    model, arch = digits
    rows = analyze_model(model, arch)
    names = [row.name for row in rows]
    # 6 blocks × (q, k, v, proj, fc1, fc2), plus the optional patch embedding and head, skipped as too small
    assert len(rows) == 38 and names[0] == "patch_embed.proj" and names[-1] == "head"
    assert names[1:7] == ["blocks.0.attn.qkv[q]", "blocks.0.attn.qkv[k]", "blocks.0.attn.qkv[v]",
                          "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    table = by_name(rows)
    assert table["head"].skipped == "too small: min(M, N) = 10 < min_dim 32" and table["head"].fit is None
    assert table["patch_embed.proj"].shape == (96, 16) and table["patch_embed.proj"].optional
    k = table["blocks.2.attn.qkv[k]"]
    assert (k.module, k.role, k.rows, k.shape, k.weight_shape) == ("blocks.2.attn.qkv", "qkv", (96, 192), (96, 96),
                                                                    (288, 96))
    weight = model.get_submodule("blocks.2.attn.qkv").weight.detach()[96:192]
    direct = fit_mp(torch.linalg.svdvals(weight), (96, 96))
    assert k.fit.sigma2 == pytest.approx(direct.sigma2, rel=1e-6) and k.fit.rank == direct.rank
    for row in rows[1:-1]:
        # weight decay leaves a noise bulk with sigma close to the 0.02 init, plus a few spikes
        assert row.fit is not None and row.skipped is None and row.fit.bulk_is_mp
        assert 0.015 < row.fit.sigma < 0.025 and 1 <= row.fit.rank <= 20
        assert row.params_kept_by_split == row.fit.rank * sum(row.shape) < row.params


def test_params_kept_by_split_is_whole_when_a_split_would_not_save(digits) -> None:
    model, arch = digits
    row = by_name(analyze_model(model, arch, layers=["blocks.0.mlp.fc1"]))["blocks.0.mlp.fc1"]
    m, n = row.shape
    assert row.params_kept_by_split == min(row.fit.rank * (m + n), m * n)
    big = LayerSpectrum(name="x", module="x", role="fc1", weight_shape=(m, n), shape=(m, n),
                        fit=fit_mp(torch.linspace(1, 2, min(m, n)), (m, n), alpha=0.25))
    assert big.fit.rank * (m + n) >= m * n or big.params_kept_by_split == big.fit.rank * (m + n)
    assert LayerSpectrum(name="s", module="s", role="r", weight_shape=(4, 4), shape=(4, 4),
                         skipped="too small").params_kept_by_split == 16


def test_qkv_as_one_matrix_and_smaller_min_dim(digits) -> None:
    model, arch = digits
    rows = by_name(analyze_model(model, arch, split_qkv=False, min_dim=8))
    assert rows["blocks.0.attn.qkv"].shape == (288, 96) and rows["blocks.0.attn.qkv"].rows is None
    assert "blocks.0.attn.qkv[q]" not in rows
    assert rows["head"].fit is not None and rows["head"].shape == (10, 96)


def test_named_layers_unknown_names_and_non_matrix_modules(digits) -> None:
    model, arch = digits
    rows = analyze_model(model, arch, layers=["blocks.1.mlp.fc2", "blocks.1.norm1"])
    assert [row.name for row in rows] == ["blocks.1.mlp.fc2", "blocks.1.norm1"]
    assert rows[0].role == "fc2" and rows[0].fit is not None
    assert rows[1].skipped.startswith("not a matrix layer (LayerNorm")
    with pytest.raises(RmtpError, match="'blocks.9.mlp.fc1' is not a module"):
        analyze_model(model, arch, layers=["blocks.9.mlp.fc1"])


def test_settings_are_checked_before_any_svd(digits) -> None:
    model, arch = digits
    with pytest.raises(ValueError, match="alpha"):
        analyze_model(model, arch, alpha=0.7)
    with pytest.raises(ValueError, match="tw_confidence"):
        analyze_model(model, arch, tw_confidence=0.3)
    with pytest.raises(ValueError, match="min_dim"):
        analyze_model(model, arch, min_dim=0)


def test_depthwise_convs_are_listed_as_skipped_and_convs_are_reshaped() -> None:
    model, arch = build("convnext_atto", num_classes=10)
    rows = analyze_model(model, arch)
    table = by_name(rows)
    dw = table["stages.0.blocks.0.conv_dw"]
    assert dw.fit is None and dw.shape is None and dw.weight_shape == (40, 1, 7, 7)
    assert dw.skipped.startswith("depthwise conv (groups=40)") and dw.params == 40 * 49
    assert sum(row.role == "depthwise" for row in rows) == sum(
        isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    down = table["stages.1.downsample.1"]
    assert down.shape == (80, 40 * 2 * 2) and down.weight_shape == (80, 40, 2, 2) and down.fit is not None
    # random init: no signal anywhere, the bulk is MP
    assert all(row.fit.rank <= 1 and row.fit.bulk_is_mp for row in rows if row.fit is not None)


@rebuildable("test-spectral.pair")
class Pair(nn.Module):
    """A stand-in for a pruner's low-rank replacement."""

    def __init__(self, n_in: int, rank: int, n_out: int):
        super().__init__()
        self.first, self.second = nn.Linear(n_in, rank, bias=False), nn.Linear(rank, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def effective_shape(self) -> tuple[int, int]:
        return (self.second.out_features, self.first.in_features)

    def rmtp_config(self) -> dict:
        return {"n_in": self.first.in_features, "rank": self.first.out_features, "n_out": self.second.out_features}


@rebuildable("test-spectral.wrapped")
class Wrapped(nn.Module):
    """A stand-in for a token pruner's patched module: a replacement that keeps the original's children."""

    def __init__(self, original: nn.Module | None = None):
        super().__init__()
        for name, child in (original.named_children() if original is not None else []):
            self.add_module(name, child)

    def rmtp_config(self) -> dict:
        return {}


def test_replaced_and_non_finite_layers_are_skipped_with_reasons() -> None:
    model, arch = build("vit_tiny_patch16_224", **TINY_VIT)
    model.blocks[0].mlp.fc1 = Pair(32, 4, 128)
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[3, 5] = float("nan")
    rows = by_name(analyze_model(model, arch))
    assert rows["blocks.0.mlp.fc1"].skipped == ("replaced by Pair (rank 4, 128×32): already pruned, not one dense "
                                                "matrix; analyse the dense model")
    assert rows["blocks.0.mlp.fc1"].params == rows["blocks.0.mlp.fc1"].params_kept_by_split == 4 * (32 + 128)
    assert not any(name.startswith("blocks.0.mlp.fc1.") for name in rows)
    assert rows["blocks.1.attn.proj"].skipped == "non-finite weights (NaN or inf)"
    assert rows["blocks.1.mlp.fc1"].fit is not None


def test_a_replacement_around_listed_layers_is_not_a_row_and_its_layers_are_analysed() -> None:
    model, arch = build("vit_tiny_patch16_224", **TINY_VIT)
    model.blocks[1].attn = Wrapped(model.blocks[1].attn)  # qkv and proj keep their names: the adapter lists them
    model.blocks[0].mlp = Wrapped()  # nothing listed inside any more: the replacement is a row, with its reason
    rows = by_name(analyze_model(model, arch, min_dim=8))
    assert "blocks.1.attn" not in rows and rows["blocks.1.attn.qkv[q]"].fit is not None
    assert rows["blocks.0.mlp"].skipped.startswith("replaced by Wrapped: already pruned")
    assert rows["blocks.0.mlp"].params == 0 and rows["blocks.1.mlp.fc1"].fit is not None


def test_a_planted_signal_in_a_model_layer_is_found() -> None:
    model, arch = build("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=64, num_heads=2,
                        num_classes=10, in_chans=1)
    g = torch.Generator().manual_seed(3)
    m, n, sigma = 256, 64, 0.02
    u, _ = torch.linalg.qr(torch.randn(m, 3, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 3, generator=g))
    threshold = sigma * (m * n) ** 0.25
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.copy_(sigma * torch.randn(m, n, generator=g)
                                             + u @ torch.diag(torch.tensor([3.0, 5.0, 8.0]) * threshold) @ v.T)
    row = by_name(analyze_model(model, arch, tw_confidence=0.999))["blocks.0.mlp.fc1"]
    assert row.fit.rank == 3 and row.fit.sigma == pytest.approx(sigma, rel=0.03)
    assert row.params_kept_by_split == 3 * (m + n)


def test_threads_do_not_change_results_and_are_restored(digits) -> None:
    model, arch = digits
    before = torch.get_num_threads()
    one = analyze_model(model, arch, threads=1)
    two = analyze_model(model, arch, threads=2)
    assert torch.get_num_threads() == before
    assert [(r.name, r.fit.sigma2 if r.fit else None, r.fit.rank if r.fit else None) for r in one] == \
           [(r.name, r.fit.sigma2 if r.fit else None, r.fit.rank if r.fit else None) for r in two]


class Recorder(Progress):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None, list[str]]] = []

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        seen: list[str] = []
        self.calls.append((description, total, seen))
        yield lambda advance=1, **fields: seen.append(fields.get("layer", ""))


def test_progress_advances_once_per_row(digits) -> None:
    model, arch = digits
    recorder = Recorder()
    rows = analyze_model(model, arch, progress=recorder)
    (_, total, seen), = recorder.calls
    assert total == len(rows) == len(seen) and seen == [row.name for row in rows]


def test_to_dict_is_json_ready(digits) -> None:
    model, arch = digits
    rows = analyze_model(model, arch, layers=["blocks.0.attn.qkv", "head"])
    data = json.loads(json.dumps([row.to_dict() for row in rows]))
    assert data[0]["name"] == "blocks.0.attn.qkv[q]" and data[0]["fit"]["rank"] == rows[0].fit.rank
    assert data[0]["fit"]["spikes"] == [float(v) for v in rows[0].fit.spikes]
    assert data[-1]["skipped"].startswith("too small") and data[-1]["fit"] is None
    assert math.isclose(data[1]["fit"]["sigma"] ** 2, data[1]["fit"]["sigma2"])
