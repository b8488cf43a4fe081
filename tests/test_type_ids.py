"""Saved types are stable ids: what new folders write, the names old folders used, and the
registry's refusals (no id, a malformed id, an id or alias taken by another class)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT
from safetensors.torch import load_file
from torch import nn

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.saved_types import (
    ModelPatch,
    TypeRegistry,
    apply_patch,
    model_patch,
    rebuildable,
    registered_types,
    resolve_type,
    type_aliases,
)
from rmtp.errors import CheckpointError, PluginError
from rmtp.plugins import get_plugins
from rmtp.storage import saving
from rmtp.storage.saving import META_FILE, save
from rmtp_plugins.svd_mp.lowrank import LowRankLinear

#: Every type name rmtp wrote before ids (formats 1 and 2: the class's import path), with the id it
#: has now. Frozen: these strings are in users' folders, so an entry is never removed or changed.
LEGACY_NAMES: dict[str, dict[str, str]] = {
    "module": {
        "rmtp.lowrank.LowRankLinear": "lowrank.linear",
        "rmtp.lowrank.LowRankConv2d": "lowrank.conv2d",
        "rmtp.lowrank.BlockLowRankLinear": "lowrank.block_linear",
        "rmtp_plugins._spp_modules.SlicedLinear": "spp.sliced_linear",
        "rmtp_plugins._spp_modules.ConstantBranch": "spp.constant_branch",
        "rmtp_plugins._spp_conv_modules.SlicedConv2d": "spp.sliced_conv2d",
        "rmtp_plugins._spp_conv_modules.SlicedBatchNorm2d": "spp.sliced_batchnorm2d",
        "rmtp_plugins._spp_conv_modules.ConstantChannels": "spp.constant_channels",
        "rmtp_plugins._spp_conv_modules.RemovedConv2d": "spp.removed_conv2d",
        "rmtp_plugins._spp_conv_modules.RemovedNorm": "spp.removed_norm",
        "rmtp_plugins._spp_conv_modules.ZeroInputConv2d": "spp.zero_input_conv2d",
        "rmtp_plugins._nm_permute.PermutedInput": "nm.permuted_input",
    },
    "patch": {
        "rmtp_plugins._spp_modules.AttentionHeads": "spp.attention_heads",
        "rmtp_plugins.tokens.patch.TokenReduction": "tokens.reduction",
    },
}
#: Built-in types added after ids (they never had an import-path name to alias).
NEW_SINCE_IDS: set[str] = {"int8.linear"}
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saved"


def _builtin(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("rmtp", "rmtp_plugins")


def _vit() -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    torch.manual_seed(0)
    return timm.create_model(spec.name, **spec.kwargs).eval(), spec


def _save(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    return save(model, path, spec=spec, arch=get_plugins().architecture("vit"), baseline=spec)


# ------------------------------------------------------------------------------------ old names


@pytest.mark.parametrize("kind", ["module", "patch"])
def test_every_name_written_before_ids_resolves_to_its_class(kind: str) -> None:
    get_plugins()  # imports every built-in plugin, which registers its types
    registered = registered_types()[kind]
    for old, type_id in LEGACY_NAMES[kind].items():
        assert type_aliases()[kind][old] == type_id
        assert resolve_type(kind, old) is registered[type_id], old
        assert resolve_type(kind, type_id) is registered[type_id]


@pytest.mark.parametrize("kind", ["module", "patch"])
def test_every_builtin_type_has_its_old_name_as_an_alias(kind: str) -> None:
    """Each registered built-in class resolves from the import path it was saved under before ids,
    so the alias table misses no class. Most have moved since (spp, n:m and the architectures
    became packages), which is what the aliases are for."""
    get_plugins()
    builtin = {type_id: cls for type_id, cls in registered_types()[kind].items() if _builtin(cls)}
    assert set(builtin) == set(LEGACY_NAMES[kind].values()) | (NEW_SINCE_IDS & set(builtin))
    old_name = {type_id: old for old, type_id in LEGACY_NAMES[kind].items()}
    for type_id, cls in builtin.items():
        if type_id not in NEW_SINCE_IDS:
            assert resolve_type(kind, old_name[type_id]) is cls


# ------------------------------------------------------------------------------------ writing


def test_new_saves_write_ids_and_format_3(tmp_path: Path) -> None:
    from rmtp_plugins.tokens.patch import TokenReduction

    model, spec = _vit()
    model.blocks[0].mlp.fc1 = LowRankLinear(32, 4, 128)
    apply_patch(model, TokenReduction(method="tome", r=[1, 1]))
    meta = json.loads((_save(model, spec, tmp_path / "m") / META_FILE).read_text())
    assert meta["format_version"] == saving.FORMAT_VERSION == 3
    assert [e["type"] for e in meta["replaced"]] == ["lowrank.linear"]
    assert [e["type"] for e in meta["patches"]] == ["tokens.reduction"]
    plain, spec = _vit()
    assert json.loads((_save(plain, spec, tmp_path / "plain") / META_FILE).read_text())["format_version"] == 1


@pytest.mark.parametrize("name", ["svd-mp-vit", "spp-tome-vit", "nm-resnet"])
def test_an_old_folder_saved_again_names_ids_and_keeps_its_outputs(tmp_path: Path, name: str) -> None:
    old = rmtp.load(FIXTURES / name)
    out = save(old.model, tmp_path / name, spec=old.spec, arch=get_plugins().architecture(old.arch),
               baseline=old.baseline)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format_version"] == 3
    for entry in [*meta["replaced"], *meta["patches"]]:
        assert "." in entry["type"] and entry["type"] == entry["type"].lower(), entry["type"]
    x = load_file(FIXTURES / name / "expected.safetensors")["input"]
    with torch.no_grad():
        torch.testing.assert_close(rmtp.load(out).model(x), old.model(x), rtol=0, atol=0)


def test_an_rmtp_before_ids_refuses_a_new_folder_as_newer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, spec = _vit()
    model.head = LowRankLinear(32, 3, 10)
    out = _save(model, spec, tmp_path / "m")
    monkeypatch.setattr(saving, "FORMAT_VERSION", 2)
    with pytest.raises(CheckpointError, match=r"saved by a newer rmtp \(format 3 > 2\)"):
        rmtp.load(out)


@pytest.mark.parametrize("version", ["3", 2.5, True, None])
def test_a_malformed_format_version_is_one_clear_error(tmp_path: Path, version: object) -> None:
    model, spec = _vit()
    out = _save(model, spec, tmp_path / "m")
    meta = json.loads((out / META_FILE).read_text())
    meta["format_version"] = version
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version must be a whole number"):
        rmtp.load(out)


# ------------------------------------------------------------------------------------ unknown ids


def test_an_unknown_module_id_is_a_clear_checkpoint_error(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "svd-mp-vit", tmp_path / "m")
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    meta["replaced"][0]["type"] = "someplugin.lowrank"
    (tmp_path / "m" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"needs module type 'someplugin\.lowrank', which no loaded plugin "
                                              r"provides \(known: .*lowrank\.linear.*\); install the plugin"):
        rmtp.load(tmp_path / "m")


def test_an_unknown_patch_id_is_a_clear_checkpoint_error(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "tome-vit", tmp_path / "m")
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    meta["patches"][0]["type"] = "tokens.nosuch"
    (tmp_path / "m" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"needs patch type 'tokens\.nosuch', which no loaded plugin provides "
                                              r"\(known: .*tokens\.reduction.*\)"):
        rmtp.load(tmp_path / "m")


# ------------------------------------------------------------------------------------ refusals


class _Layer(nn.Module):
    def rmtp_config(self) -> dict:
        return {}


class _OtherLayer(_Layer):
    pass


class _Patch(ModelPatch):
    def rmtp_config(self) -> dict:
        return {}


def test_a_class_without_an_id_is_refused() -> None:
    with pytest.raises(TypeError, match=r'@rebuildable needs a stable type id, e\.g\. @rebuildable\("my_plugin'):
        rebuildable(_Layer)  # what a bare @rebuildable does
    with pytest.raises(TypeError, match=r"@model_patch needs a stable type id"):
        model_patch(_Patch)


@pytest.mark.parametrize("bad", ["linear", "LowRank.linear", "rmtp.lowrank.LowRankLinear", "a..b", ".a.b", "", 3])
def test_an_id_not_of_the_form_family_kind_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="is not of the form family.kind"):
        rebuildable(bad)  # type: ignore[arg-type]


def test_a_second_class_under_a_taken_id_is_refused_naming_both() -> None:
    get_plugins()
    with pytest.raises(PluginError, match=r"two module types are registered as 'lowrank\.linear': "
                                          r"rmtp_plugins\.svd_mp\.lowrank\.LowRankLinear and test_type_ids\._Layer"):
        rebuildable("lowrank.linear")(_Layer)
    with pytest.raises(PluginError, match=r"two patch types are registered as 'tokens\.reduction': "
                                          r"rmtp_plugins\.tokens\.patch\.TokenReduction and test_type_ids\._Patch"):
        model_patch("tokens.reduction")(_Patch)
    assert resolve_type("module", "lowrank.linear") is LowRankLinear  # nothing changed


def test_an_alias_taken_by_another_type_is_refused() -> None:
    get_plugins()
    with pytest.raises(PluginError, match=r"alias 'rmtp\.lowrank\.LowRankLinear' is claimed by two module types: "
                                          r"'lowrank\.linear' \(rmtp_plugins\.svd_mp\.lowrank\.LowRankLinear\) "
                                          r"and 'test-ids\.layer'"):
        rebuildable("test-ids.layer", aliases=["rmtp.lowrank.LowRankLinear"])(_Layer)
    assert resolve_type("module", "test-ids.layer") is None


def test_registry_refusals_between_ids_and_aliases() -> None:
    registry: TypeRegistry[type] = TypeRegistry("module")
    registry.add(_Layer, "a.layer", aliases=["a.old_layer", "pkg.mod.Layer"])
    with pytest.raises(PluginError, match=r"type id 'a\.old_layer' of test_type_ids\._OtherLayer is already an alias "
                                          r"of 'a\.layer' \(test_type_ids\._Layer\)"):
        registry.add(_OtherLayer, "a.old_layer")
    with pytest.raises(PluginError, match=r"alias 'a\.layer' of module type 'b\.other' .* is the id of "
                                          r"test_type_ids\._Layer"):
        registry.add(_OtherLayer, "b.other", aliases=["a.layer"])
    with pytest.raises(PluginError, match=r"test_type_ids\._Layer is registered twice, as 'a\.layer' and 'a\.again'"):
        registry.add(_Layer, "a.again")
    assert registry.ids() == ["a.layer"] and registry.resolve("pkg.mod.Layer") is _Layer
    assert registry.resolve("a.old_layer") is _Layer and registry.resolve("b.other") is None
    assert registry.id_of(_OtherLayer) is None, "a subclass is not saved as its parent"
    registry.add(_Layer, "a.layer", aliases=["a.old_layer"])  # the same class again (a re-import): accepted
