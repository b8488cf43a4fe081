"""Forward-pass patches are saved with the model and re-applied by rmtp.load (token reduction and
the generic ModelPatch registry), with a clear error wherever a folder cannot be trusted or read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT
from test_tokens_reference import PLANS, make_vit
from torch import nn

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.saved_types import ModelPatch, apply_patch, describe_patches, model_patch, patches_of, remove_patch
from rmtp.errors import CheckpointError
from rmtp.plugins import get_plugins
from rmtp.storage import saving
from rmtp.storage.saving import META_FILE, save
from rmtp_plugins.tokens.patch import TokenReduction, TokenVisionTransformer


def _save(model: nn.Module, path: Path) -> Path:
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    return save(model, path, spec=spec, arch=get_plugins().architecture("vit"), baseline=spec)


@pytest.mark.parametrize("plan", ["token-cls-fuse", "token-mean", "tome", "token-cls-prefix-original"])
def test_save_load_reapplies_the_patch_with_identical_outputs(tmp_path: Path, plan: str) -> None:
    model = make_vit("plain")
    apply_patch(model, TokenReduction(**PLANS[plan]))
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = model(images)
    out = _save(model, tmp_path / "m")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format_version"] == 3
    assert meta["patches"] == [{"type": "tokens.reduction",
                                "config": TokenReduction(**PLANS[plan]).rmtp_config()}]
    loaded = rmtp.load(out).model
    assert isinstance(loaded, TokenVisionTransformer) and describe_patches(loaded) == meta["patches"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, atol=0, rtol=0)
    remove_patch(loaded)  # and it comes off again
    assert type(loaded).__name__ == "VisionTransformer" and not patches_of(loaded)


def test_tome_on_an_attention_pooled_vit_saves_and_reloads_with_identical_outputs(tmp_path: Path) -> None:
    """rmtp.prune's tome on a SigLIP-style ViT (no class token, ``global_pool="map"``), saved and loaded."""
    kwargs = {**TINY_VIT, "global_pool": "map", "class_token": False}
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=kwargs)
    torch.manual_seed(0)
    model = get_plugins().architecture("vit").create(spec)
    report = rmtp.prune(model, "tome", r=3)
    assert report.rows[0].detail["tokens_in"] == 16 and report.rows[-1].detail["tokens_out"] < 16
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = model(images)
    loaded = rmtp.load(save(model, tmp_path / "m", spec=spec, arch=get_plugins().architecture("vit"),
                            baseline=spec)).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, atol=0, rtol=0)


def test_tome_records_from_before_ab_sets_keep_their_matching(tmp_path: Path) -> None:
    """A tome folder saved before rmtp matched ToMe (its record has every field of then, no
    ``ab_sets``) loads with the patch-only A/B sets it was saved with, outputs bit for bit; saving
    it again names them."""
    model = make_vit("plain")
    apply_patch(model, TokenReduction(**PLANS["tome"]))
    out = _save(model, tmp_path / "m")
    meta = json.loads((out / META_FILE).read_text())
    record = meta["patches"][0]["config"]
    assert record.pop("ab_sets") == "sequence", "a tome record today names ToMe's sets"
    (out / META_FILE).write_text(json.dumps(meta))
    legacy = make_vit("plain")
    apply_patch(legacy, TokenReduction(**PLANS["tome"], ab_sets="patches"))
    images = torch.randn(4, 1, 16, 16)
    loaded = rmtp.load(out).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), legacy(images), atol=0, rtol=0)
        assert not torch.allclose(loaded(images), model(images), atol=1e-4)
    assert describe_patches(loaded)[0]["config"]["ab_sets"] == "patches"


def test_token_pruning_records_are_unchanged_and_new_tome_configs_match_like_tome() -> None:
    """token-cls / token-mean records carry no ab_sets (older readers read them as before); a tome
    config that leaves fields out is built today and gets ToMe's sets."""
    for plan in ("token-cls-fuse", "token-mean"):
        assert "ab_sets" not in TokenReduction(**PLANS[plan]).rmtp_config()
    assert TokenReduction(method="tome", r=[1, 1]).plan.ab_sets == "sequence"
    with pytest.raises(ValueError, match="ab_sets applies to tome"):
        TokenReduction(method="cls", keep=[0.5, 0.5], ab_sets="patches")


def test_unpatched_models_keep_format_1_for_older_readers(tmp_path: Path) -> None:
    out = _save(make_vit("plain"), tmp_path / "m")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format_version"] == 1 and meta["patches"] == []


def test_an_older_reader_refuses_a_patched_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_vit("plain")
    apply_patch(model, TokenReduction(**PLANS["tome"]))
    out = _save(model, tmp_path / "m")
    monkeypatch.setattr(saving, "FORMAT_VERSION", 1)  # what rmtp before patches did
    with pytest.raises(CheckpointError, match="saved by a newer rmtp"):
        rmtp.load(out)


@pytest.mark.parametrize("entry, message", [
    ({"type": "os.system", "config": {"command": "true"}}, "needs patch type 'os.system', which no loaded plugin"),
    ({"type": "rmtp_plugins.tokens.patch.TokenReduction", "config": {"method": "tome", "r": [1]}},
     "cannot re-apply .*1 per-block entries but the model has 2 blocks"),
    ({"type": "rmtp_plugins.tokens.patch.TokenReduction", "config": {"method": "tome", "r": [1, 1], "x": 1}},
     "cannot re-apply .*Extra inputs are not permitted"),
    ({"type": "rmtp_plugins.tokens.patch.TokenReduction", "config": ["not", "a", "dict"]}, "config must be an object"),
    ("nonsense", "a patch entry must be an object"),
])
def test_bad_patch_entries_are_refused_on_load(tmp_path: Path, entry, message: str) -> None:
    out = _save(make_vit("plain"), tmp_path / "m")
    meta = json.loads((out / META_FILE).read_text())
    meta["patches"] = [entry]
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        rmtp.load(out)


@model_patch("test-tokens.head_scale")
class _HeadScale(ModelPatch):
    """A toy patch: scales a model's output by swapping the head's forward."""

    def __init__(self, factor: float):
        self.factor = float(factor)

    def rmtp_config(self) -> dict:
        return {"factor": self.factor}

    def apply(self, model: nn.Module) -> None:
        head, factor = model.head, self.factor
        model.head.forward = lambda x: nn.Linear.forward(head, x) * factor

    def remove(self, model: nn.Module) -> None:
        del model.head.forward


class _Unregistered(_HeadScale):
    pass


def test_generic_patches_stack_and_come_off_newest_first(tmp_path: Path) -> None:
    model = make_vit("plain")
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        dense = model(images)
        first = apply_patch(model, TokenReduction(**PLANS["tome"]))
        reduced = model(images)
        second = apply_patch(model, _HeadScale(2.0))
        torch.testing.assert_close(model(images), 2 * reduced)
        loaded = rmtp.load(_save(model, tmp_path / "m")).model
        torch.testing.assert_close(loaded(images), 2 * reduced, atol=0, rtol=0)
        with pytest.raises(ValueError, match="not the most recent patch"):
            remove_patch(model, first)
        remove_patch(model, second)
        remove_patch(model)
        torch.testing.assert_close(model(images), dense, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no rmtp patches"):
        remove_patch(model)
    with pytest.raises(TypeError, match="not registered"):
        apply_patch(model, _Unregistered(1.0))
