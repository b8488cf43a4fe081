"""spp: the split-LBI path against its closed form and planted groups, exact removal counts, the
sliced model against the gated reference, save/load, the multi-ratio recipe, finetune and the
token pruners after it, and parameter validation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe
from pydantic import ValidationError
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.pruner import PruneContext
from rmtp.contract.saved_types import apply_patch, patches_of
from rmtp.errors import PluginError, RmtpError
from rmtp.plugins import get_plugins
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.saving import save
from rmtp_plugins.spp import PATH_FILE, SppParams, SppPruner, extract, search
from rmtp_plugins.spp.groups import find_units, gated
from rmtp_plugins.spp.modules import AttentionHeads, ConstantBranch, SlicedLinear
from rmtp_plugins.spp.path import LbiSettings, removal_count, removal_mask, split_lbi
from rmtp_plugins.tokens.patch import TokenReduction

SPEC3 = ModelSpec(name="vit_tiny_patch16_224", kwargs={**TINY_VIT, "depth": 3})


def make_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **overrides}).eval()


def context(model: torch.nn.Module, *, images: int = 64, seed: int = 0) -> PruneContext:
    arch = get_plugins().architecture("vit")
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(images, 1, 16, 16, generator=generator),
                         torch.randint(0, 10, (images,), generator=generator))
    return PruneContext(model=model, arch=arch, layers=arch.prunable_layers(model), device=torch.device("cpu"),
                        seed=seed, calibration=DataLoader(data, batch_size=32))


def units_of(model: torch.nn.Module):
    arch = get_plugins().architecture("vit")
    return find_units(model, arch.couplings(model), arch.prunable_layers(model), ("heads", "neurons"), arch=arch)


# --------------------------------------------------------------------------------- the path


def test_split_lbi_follows_the_closed_form_when_the_loss_ignores_the_gates() -> None:
    """∇L = 0: γ_k = (1 − κα/ν)^k, Z_k = (α/ν)·Σ_{i<k} γ_i → 1/κ, so with λκ ≥ 1 nothing enters."""
    settings = LbiSettings(kappa=2.0, lam=0.5, nu=4.0, lr=0.3, steps=40)
    path = split_lbi(lambda g: (g * 0).sum(), torch.ones(3), settings)
    rate = settings.kappa * settings.lr / settings.nu
    gamma = [(1 - rate) ** i for i in range(settings.steps + 1)]
    z = settings.lr / settings.nu * sum(gamma[:settings.steps])
    torch.testing.assert_close(path.gamma, torch.full((3,), gamma[-1], dtype=torch.float64))
    torch.testing.assert_close(path.z, torch.full((3,), z, dtype=torch.float64))
    assert z < 1 / settings.kappa <= settings.lam and path.entered == 0


def test_split_lbi_enters_groups_in_order_of_their_pull() -> None:
    """L(γ) = −Σ w_j·γ_j: a larger w_j keeps γ_j (and Z_j) larger, so it enters earlier; w = 0 never."""
    w = torch.tensor([0.0, 3.0, 1.0, 2.0])
    path = split_lbi(lambda g: -(w * g).sum(), torch.ones(4), LbiSettings(1.0, 1.0, 1.0, 0.05, 400))
    assert math.isinf(path.entry[0]) and torch.isfinite(path.entry[1:]).all()
    assert path.entry[1] < path.entry[3] < path.entry[2]
    assert path.order() == [1, 3, 2, 0]


def test_a_gate_the_loss_drives_negative_never_enters_and_ranks_last() -> None:
    """L = ½(γ₀ − 1)² + 0·γ₁ + 0.05·γ₂: group 0 helps, 1 is neutral, 2 hurts (lowering γ₂ lowers L).

    With the defaults (κ 1, λ 2, ν 10, α 0.5, 200 steps) γ₂ settles near −ν·0.05 = −0.5, so Z₂ falls
    by ≈ 0.025 a step and passes −λ at step 140. A two-sided threshold let it enter the path
    there, ranking the harmful group second ([0, 2, 1]); the reference's Γ ≥ 0 keeps it out, and the
    signed-Z tie-break puts it after the neutral group, so it is removed first.
    """
    def loss(g: torch.Tensor) -> torch.Tensor:
        return 0.5 * (g[0] - 1) ** 2 + 0 * g[1] + 0.05 * g[2]

    path = split_lbi(loss, torch.ones(3), LbiSettings(kappa=1.0, lam=2.0, nu=10.0, lr=0.5, steps=200))
    assert math.isfinite(path.entry[0]) and math.isinf(path.entry[1]) and math.isinf(path.entry[2])
    assert path.z[2] < -2.0 < 0 < path.z[1] < 2.0  # Z₂ is past −λ: only the clamp keeps it out
    assert (path.big_gamma >= 0).all() and path.big_gamma[2] == 0
    assert path.order() == [0, 1, 2]  # useful first, neutral, harmful last (removed first)
    assert removal_mask(path.order(), 1).tolist() == [False, False, True]


def test_planted_useless_groups_enter_last() -> None:
    """Heads and neurons whose output is zeroed carry no gradient: every useful group ranks first."""
    model = make_vit()
    units = units_of(model)
    assert [(u.kind, u.count, u.width) for u in units[:2]] == [("head", 2, 16), ("neuron", 128, 1)]
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 16:32] = 0  # head 1 of block 0
        model.blocks[1].attn.proj.weight[:, 0:16] = 0  # head 0 of block 1
        model.blocks[0].mlp.fc2.weight[:, :40] = 0  # neurons 0..39 of block 0
        model.blocks[1].mlp.fc2.weight[:, 100:] = 0  # neurons 100..127 of block 1
    planted = {units[0].offset + 1, units[2].offset + 0}
    planted |= {units[1].offset + i for i in range(40)} | {units[3].offset + i for i in range(100, 128)}
    ctx = context(model)
    ctx.dense_model = make_vit()
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident logits, so KD to the dense model pulls on useful groups
        ctx.dense_model.load_state_dict(model.state_dict())
    params = SppParams(ratio=0.3, loss="kd", steps=150, lam=1.0)
    path = search(ctx, units, params)
    order = path.order()
    entered = [j for j in order if math.isfinite(path.entry[j])]
    assert len(entered) >= 50 and not planted & set(entered)  # useful groups enter, planted ones never
    assert order[:len(entered)] == entered
    heads = [j for j in order if j in range(units[0].offset, units[0].offset + 2)
             or j in range(units[2].offset, units[2].offset + 2)]
    assert set(heads[:2]).isdisjoint(planted) and set(heads[2:]) <= planted  # useful heads first
    # the search leaves the model as it found it: no hooks, weights frozen only during the search
    assert all(p.requires_grad for p in model.parameters())
    assert not model.blocks[0].attn.proj._forward_pre_hooks


# ----------------------------------------------------------------------------- the extraction


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("n", [7, 10, 2322])
def test_groups_target_removes_exactly_round_r_times_groups(ratio: float, n: int) -> None:
    order = list(torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist())
    count = removal_count(ratio, torch.ones(n), order, "groups")
    assert count == math.floor(ratio * n + 0.5)
    mask = removal_mask(order, count)
    assert int(mask.sum()) == count and set(torch.nonzero(mask).flatten().tolist()) == set(order[n - count:])


def test_params_target_takes_the_closest_tail() -> None:
    sizes = torch.tensor([10.0, 1.0, 1.0, 5.0])  # order below: least important last
    order = [0, 3, 1, 2]
    # removing 2, 1, 3, 0 → cumulative 1, 2, 7, 17; 40% of 17 = 6.8 → 3 groups (7)
    assert removal_count(0.4, sizes, order, "params") == 3
    assert removal_count(0.05, sizes, order, "params") == 1  # 0.85: 1 is closer than 0
    assert removal_count(0.02, sizes, order, "params") == 0  # 0.34: keep everything


def _gated_reference(model, units, gates, images):
    with torch.no_grad(), gated(model, units, gates):
        return model(images)


@pytest.mark.parametrize("fold", [False, True])
def test_sliced_model_equals_the_gated_model_with_removed_gates_at_zero(fold: bool) -> None:
    model = make_vit(seed=3, depth=3)
    units = units_of(model)
    n = sum(u.count for u in units)
    gates = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(1))
    remove = torch.rand(n, generator=torch.Generator().manual_seed(2)) < 0.4
    remove[units[0].gates] = True  # every head of block 0: its attention branch goes
    remove[units[3].gates] = True  # every neuron of block 1: its MLP goes
    remove[units[2].gates] = False
    remove[units[2].offset] = True  # one of two heads of block 1
    images = torch.randn(5, 1, 16, 16)
    reference_gates = torch.where(remove, torch.zeros(n), gates if fold else torch.ones(n))
    expected = _gated_reference(model, units, reference_gates, images)
    kept = {u.path: k for u, k in extract(model, units, remove, gates if fold else None)}
    with torch.no_grad():
        out = model(images)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert isinstance(model.blocks[0].attn, ConstantBranch) and isinstance(model.blocks[1].mlp, ConstantBranch)
    assert kept["blocks.1.attn"] == 1 and model.blocks[1].attn.num_heads == 1
    assert model.blocks[1].attn.qkv.weight.shape == (3 * 16, 32)
    assert isinstance(model.blocks[1].attn.proj, SlicedLinear) and model.blocks[1].attn.proj.in_features == 16


def test_extracted_model_saves_and_reloads_with_identical_outputs(tmp_path: Path) -> None:
    model = make_vit(seed=4, depth=3)
    units = units_of(model)
    n = sum(u.count for u in units)
    remove = torch.zeros(n, dtype=torch.bool)
    remove[units[0].offset] = True
    remove[units[1].offset:units[1].offset + 100] = True
    remove[units[4].gates] = True  # block 2: attention gone
    extract(model, units, remove)
    # a second spp step on the sliced model: the heads patch is merged, not stacked
    units2 = units_of(model)
    assert [u.count for u in units2 if u.kind == "head"] == [1, 2]
    remove2 = torch.zeros(sum(u.count for u in units2), dtype=torch.bool)
    remove2[units2[2].offset] = True  # block 1: 2 → 1 heads
    extract(model, units2, remove2)
    assert len([p for p in patches_of(model) if isinstance(p, AttentionHeads)]) == 1
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = model(images)
    out = save(model, tmp_path / "m", spec=SPEC3, arch=get_plugins().architecture("vit"), baseline=SPEC3)
    loaded = rmtp.load(out).model
    assert loaded.blocks[0].attn.num_heads == 1 and loaded.blocks[1].attn.num_heads == 1
    assert isinstance(loaded.blocks[2].attn, ConstantBranch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, atol=0, rtol=0)

def test_a_model_that_lost_whole_branches_is_still_its_family_for_the_next_call(tmp_path: Path) -> None:
    """A model in hand is matched to its architecture by name and checked against the family's
    layout; an attention or MLP that spp turned into a constant is that layout, pruned, so the next
    ``rmtp.prune`` and ``rmtp.save`` infer the architecture as before (they refused it: "block
    blocks.0 has no 'attn.qkv'")."""
    model = make_vit(seed=4, depth=3)
    units = units_of(model)
    remove = torch.zeros(sum(u.count for u in units), dtype=torch.bool)
    remove[units[0].gates] = True  # block 0: attention gone
    remove[units[3].gates] = True  # block 1: MLP gone
    extract(model, units, remove)
    assert rmtp.infer_architecture(model).name == "vit"
    report = rmtp.prune(model, "magnitude", sparsity=0.5)
    assert [row.layer for row in report.rows] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.attn.qkv",
                                                  "blocks.1.attn.proj", "blocks.2.attn.qkv", "blocks.2.attn.proj",
                                                  "blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = model(images)
    loaded = rmtp.load(save(model, tmp_path / "m", spec=SPEC3)).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, atol=0, rtol=0)



def test_a_bad_heads_patch_is_refused_on_load() -> None:
    model = make_vit()
    with pytest.raises(RmtpError, match="cannot hold 1 heads"):
        AttentionHeads(heads={"blocks.0.attn": 1}).apply(model)
    assert model.blocks[0].attn.num_heads == 2
    with pytest.raises(RmtpError, match="no module"):
        AttentionHeads(heads={"blocks.9.attn": 1}).apply(model)


# ------------------------------------------------------------------------- through the pipeline


def test_recipe_with_several_ratios_saves_each_and_continues_with_keep(tmp_path: Path) -> None:
    params = {"ratios": [0.3, 0.6], "keep": 0.6, "steps": 20, "batch_size": 32}
    steps = [{"prune": "spp", "params": params},
             {"finetune": {"epochs": 1, "lr": 1e-3, "distill": {"weight": 1.0, "temperature": 2.0}}},
             {"evaluate": {}}]
    raw = tiny_recipe(steps, output=tmp_path / "out")
    raw["data"]["eval_limit"] = 64
    result = run_recipe(parse_recipe(raw, source=tmp_path / "r.yaml"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["model.safetensors", "recipe.yaml", "report.json", "rmtp_model.json", "spp-0.30", "spp-0.60", PATH_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    prune = result.report.steps[0]
    assert any("spp-0.30" in note for note in prune.notes)
    removed = 1 - sum(r.params_after for r in prune.rows) / sum(r.params_before for r in prune.rows)
    assert removed == pytest.approx(0.6, abs=0.02)  # the kept level (params of the gated branches)
    path = json.loads((out / PATH_FILE).read_text())
    assert len(path["groups"]) == 2 * 2 + 2 * 128 and len(path["losses"]) == 20
    assert sorted(g["rank"] for g in path["groups"]) == list(range(len(path["groups"])))
    share = {k: v["param_share_removed"] for k, v in path["levels"].items()}
    assert share["0.3"] == pytest.approx(0.3, abs=0.02) and share["0.6"] == pytest.approx(0.6, abs=0.02)
    images = torch.randn(3, 1, 16, 16)
    sizes = []
    for name in ("spp-0.30", "spp-0.60"):
        loaded = rmtp.load(out / name)
        report = json.loads((out / name / "report.json").read_text())
        sizes.append(sum(p.numel() for p in loaded.model.parameters()))
        assert report["ratio"] == float(name[4:]) and torch.isfinite(loaded.model(images)).all()
    assert sizes[0] > sizes[1]
    # the finetuned final model has the 0.6 variant's shapes and reloads identically
    final = rmtp.load(out).model
    assert sum(p.numel() for p in final.parameters()) == sizes[1]
    with torch.no_grad():
        torch.testing.assert_close(final(images), result.model(images), atol=0, rtol=0)


def test_without_output_one_ratio_prunes_in_place() -> None:
    raw = tiny_recipe([{"prune": "spp", "params": {"ratio": 0.5, "target": "groups", "steps": 5}}])
    result = run_recipe(parse_recipe(raw, source=Path("r.yaml")))
    rows = result.report.steps[0].rows
    heads = sum(int(r.detail["heads"].split("→")[1]) for r in rows if "heads" in r.detail)
    neurons = sum(int(r.detail["neurons"].split("→")[1]) for r in rows if "neurons" in r.detail)
    assert heads + neurons == (2 * 2 + 2 * 128) - math.floor(0.5 * 260 + 0.5)


def test_token_cls_runs_on_an_spp_extracted_vit(tmp_path: Path) -> None:
    steps = [{"prune": "spp", "params": {"ratio": 0.3, "structures": ["heads"], "target": "groups", "steps": 5}},
             {"prune": "token-cls", "params": {"r_max": 0.5}}]
    raw = tiny_recipe(steps, output=tmp_path / "out")
    result = run_recipe(parse_recipe(raw, source=tmp_path / "r.yaml"))
    assert sorted(a.num_heads for a in (b.attn for b in result.model.blocks)) == [1, 2]  # 1 of 4 heads gone
    images = torch.randn(3, 1, 16, 16)
    loaded = rmtp.load(tmp_path / "out").model
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), result.model(images), atol=0, rtol=0)


def test_token_pruners_refuse_a_vit_whose_attention_branch_was_removed() -> None:
    model = make_vit()
    units = units_of(model)
    remove = torch.zeros(sum(u.count for u in units), dtype=torch.bool)
    remove[units[0].gates] = True
    extract(model, units, remove)
    with pytest.raises(PluginError, match="blocks.0.attn is a ConstantBranch, not timm's Attention"):
        apply_patch(model, TokenReduction(method="cls", keep=[0.5, 0.5]))
    assert not patches_of(model)


# --------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("params", "message"), [
    ({}, "exactly one of ratio"),
    ({"ratio": 0.3, "ratios": [0.5]}, "exactly one of ratio"),
    ({"ratio": 1.0}, "less than 1"),
    ({"ratio": 0.0}, "greater than 0"),
    ({"ratios": [0.3, 1.2]}, r"ratios must lie in \(0, 1\)"),
    ({"ratios": [0.3, 0.3]}, "duplicates"),
    ({"ratios": [0.3, 0.5], "keep": 0.4}, "keep=0.4 is not one of the ratios"),
    ({"ratio": 0.3, "attention": "pairs"}, "Extra inputs are not permitted"),
    ({"ratio": 0.3, "structures": []}, "at least 1"),
    ({"ratio": 0.3, "nu": 0}, "greater than 0"),
    ({"ratio": 0.3, "kappa": -1}, "greater than 0"),
    ({"ratio": 0.3, "steps": 0}, "greater than or equal to 1"),
    ({"ratio": 0.3, "lamda": 1.0}, "Extra inputs are not permitted"),
])
def test_bad_params_are_refused(params: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SppParams(**params)


def test_a_family_without_couplings_is_refused_naming_what_is_needed() -> None:
    ctx = context(make_vit())
    ctx.arch = SimpleNamespace(name="swin", couplings=lambda model: [])
    with pytest.raises(RmtpError,
                       match=r"spp: the swin architecture declares no couplings .* \(Architecture.couplings\)"):
        SppPruner().prune(ctx, SppParams(ratio=0.3))


def test_unsupported_vit_variants_are_refused_before_the_search() -> None:
    model = make_vit(mlp_layer=timm.layers.SwiGLUPacked)
    with pytest.raises(RmtpError, match=r"neurons of blocks.0.mlp: it is a .*not timm's Mlp"):
        SppPruner().prune(context(model), SppParams(ratio=0.3, structures=["heads", "neurons"]))


def test_structures_left_at_the_default_cut_what_the_model_can_lose_and_say_what_they_left() -> None:
    """Named in ``structures``, a kind the model cannot lose refuses the step (above); left at the
    default, it is left out and its rows say why, and the kinds it can lose are cut (Swin's MLP
    neurons without its heads, a SwiGLU ViT's heads without its neurons)."""
    model = make_vit(mlp_layer=timm.layers.SwiGLUPacked)
    result = SppPruner().prune(context(model), SppParams(ratio=0.3, target="groups", steps=5))
    rows = {row.layer: row for row in result.rows}
    assert [name for name, row in rows.items() if row.skipped is None] == ["blocks.0.attn", "blocks.1.attn"]
    assert rows["blocks.0.mlp"].skipped.startswith("neurons not cut: it is a GluMlp, not timm's Mlp")
    assert rows["blocks.0.mlp"].params_after == rows["blocks.0.mlp"].params_before
    assert sum(int(block.attn.num_heads) for block in model.blocks) < 2 * TINY_VIT["num_heads"]
    mlps_only = context(make_vit(mlp_layer=timm.layers.SwiGLUPacked))
    mlps_only.layers = [layer for layer in mlps_only.layers if ".mlp." in layer.name]
    with pytest.raises(RmtpError, match=r"neurons of blocks.0.mlp: it is a .*not timm's Mlp"):
        SppPruner().prune(mlps_only, SppParams(ratio=0.3, steps=5))  # nothing left to cut: refused
