"""Save → load identity, replaced layers included, and atomic output folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT
from torch import nn

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.saved_types import rebuildable
from rmtp.errors import CheckpointError, RmtpError
from rmtp.plugins import get_plugins
from rmtp.storage.saving import META_FILE, WEIGHTS_FILE, save
from rmtp.storage.weights import write_safetensors_atomic


@rebuildable("test-saving.two_factor_linear")
class TwoFactorLinear(nn.Module):
    """A Linear split into two thin ones, as a low-rank pruner would leave it."""

    def __init__(self, in_features: int, rank: int, out_features: int):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features)
        self.effective_shape = (out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def rmtp_config(self) -> dict:
        return {"in_features": self.first.in_features, "rank": self.first.out_features,
                "out_features": self.second.out_features}


class Unregistered(TwoFactorLinear):
    pass


def _tiny() -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    torch.manual_seed(0)
    return timm.create_model(spec.name, **spec.kwargs).eval(), spec


def test_save_load_identity_with_replaced_layer(tmp_path: Path) -> None:
    model, spec = _tiny()
    model.blocks[1].mlp.fc1 = TwoFactorLinear(32, 5, 128)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:, :3] = 0
    x = torch.randn(4, 1, 16, 16)
    expected = model(x)
    out = save(model, tmp_path / "saved", spec=spec, arch=get_plugins().architecture("vit"), baseline=spec)
    loaded = rmtp.load(out)
    assert isinstance(loaded.model.blocks[1].mlp.fc1, TwoFactorLinear)
    assert loaded.model.blocks[1].mlp.fc1.first.out_features == 5
    torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=0)
    assert loaded.arch == "vit" and loaded.baseline == spec
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE, META_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    model, spec = _tiny()
    arch = get_plugins().architecture("vit")
    save(model, tmp_path / "m", spec=spec, arch=arch)
    with pytest.raises(RmtpError, match="already exists"):
        save(model, tmp_path / "m", spec=spec, arch=arch)
    model.head = nn.Linear(32, 10)  # a different model overwrites atomically
    save(model, tmp_path / "m", spec=spec, arch=arch, overwrite=True)
    torch.testing.assert_close(rmtp.load(tmp_path / "m").model.head.weight, model.head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_interrupted_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, spec = _tiny()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rmtp.storage.saving.write_safetensors_atomic", boom)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "m", spec=spec, arch=get_plugins().architecture("vit"))
    assert list(tmp_path.iterdir()) == []


def test_unregistered_module_type_is_refused_on_load(tmp_path: Path) -> None:
    model, spec = _tiny()
    save(model, tmp_path / "m", spec=spec, arch=get_plugins().architecture("vit"))
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    meta["replaced"] = [{"path": "head", "type": "os.system", "config": {"command": "true"}}]
    (tmp_path / "m" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"needs module type 'os.system', which no loaded plugin provides"):
        rmtp.load(tmp_path / "m")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / META_FILE).unlink(), "not an rmtp model folder"),
    (lambda d: (d / META_FILE).write_text("{"), "not valid JSON"),
    (lambda d: (d / META_FILE).write_text('{"format": "rmtp-model", "format_version": 99}'), "newer rmtp"),
    (lambda d: (d / WEIGHTS_FILE).write_bytes(b"garbage"), WEIGHTS_FILE),
])
def test_damaged_folder_gives_one_clear_error(tmp_path: Path, damage, message: str) -> None:
    model, spec = _tiny()
    save(model, tmp_path / "m", spec=spec, arch=get_plugins().architecture("vit"))
    damage(tmp_path / "m")
    with pytest.raises(CheckpointError, match=message):
        rmtp.load(tmp_path / "m")


def test_a_file_given_as_a_folder_is_one_clear_error(tmp_path: Path) -> None:
    """A checkpoint file passed to rmtp.load was the OS's NotADirectoryError on '<file>/rmtp_model.json'."""
    model, _ = _tiny()
    checkpoint = tmp_path / "model.safetensors"
    write_safetensors_atomic(model.state_dict(), checkpoint)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a file, not an rmtp output folder \(a folder "
                                              r"with rmtp_model\.json\)$"):
        rmtp.load(checkpoint)
