"""rmtp.storage.weights: untrusted weight files are read as data only, and fail with one clear line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rmtp.errors import CheckpointError
from rmtp.storage import weights as checkpoint
from rmtp.storage.weights import load_state_dict_into, read_state_dict, write_safetensors_atomic


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=generator), "a.bias": torch.randn(4, generator=generator)}


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for key in left:
        assert torch.equal(left[key], right[key]), key


def _assert_one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --- reading ---------------------------------------------------------------------------------


def test_reads_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    _assert_same(read_state_dict(path), _tensors())


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_reads_plain_pickled_state_dict(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    torch.save(_tensors(), path)
    _assert_same(read_state_dict(path), _tensors())


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_unwraps_training_checkpoint(tmp_path: Path, key: str) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({key: _tensors(), "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    _assert_same(read_state_dict(path), _tensors())


def test_strips_ddp_prefix(tmp_path: Path) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _tensors().items()}}, path)
    _assert_same(read_state_dict(path), _tensors())


def test_keeps_prefix_not_shared_by_every_key(tmp_path: Path) -> None:
    tensors = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    assert sorted(read_state_dict(path)) == ["b", "module.a"]


# --- refusing untrusted or broken files --------------------------------------------------------


class _WritesMarker:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("error::UserWarning")  # torch's "Detected pickle protocol" note must not reach the user
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_runs_nothing(tmp_path: Path, writer: str) -> None:
    def write(path: Path, marker: Path) -> None:
        payload = {"weight": torch.zeros(2), "evil": _WritesMarker(marker)}
        if writer == "torch.save":
            torch.save(payload, path)
        else:
            with open(path, "wb") as handle:
                pickle.dump(payload, handle)

    # Control: the payload is live; an unrestricted load really does create its marker.
    control, control_marker = tmp_path / "control.pth", tmp_path / "control-marker"
    write(control, control_marker)
    if writer == "torch.save":
        torch.load(control, map_location="cpu", weights_only=False)
    else:
        with open(control, "rb") as handle:
            pickle.load(handle)
    assert control_marker.exists()

    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write(path, marker)
    with pytest.raises(CheckpointError) as exc:
        read_state_dict(path)
    assert not marker.exists()
    message = _assert_one_line(exc, path)
    assert "refused to unpickle" in message
    # torch's advice on how to load it anyway is not passed on
    assert "weights_only` set to `False" not in message and "safe_globals" not in message


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as exc:
        read_state_dict(path)
    _assert_one_line(exc, path)


def test_garbage_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_state_dict(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_pth(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "w.pth"
    torch.save(_tensors(), path)
    path.write_bytes(path.read_bytes()[:60] if damage == "truncated" else b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError) as exc:
        read_state_dict(path)
    _assert_one_line(exc, path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "w.ckpt"
    torch.save(_tensors(), path)
    with pytest.raises(CheckpointError, match=r"unknown file type '\.ckpt'.*\.safetensors, \.pth, \.pt, \.bin") as exc:
        read_state_dict(path)
    _assert_one_line(exc, path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    folder = tmp_path / "dir.pth"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_dict(folder)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ([torch.zeros(1)], "holds a list, not a state dict"),
        ({"a": torch.zeros(1), "step": 3}, "entry 'step' holds a int"),
        ({"state_dict": {"a": torch.zeros(1), "b": "text"}}, "entry 'b' holds a str"),
        ({}, "state dict is empty"),
    ],
)
def test_not_a_dict_of_tensors(tmp_path: Path, content: object, expected: str) -> None:
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=expected) as exc:
        read_state_dict(path)
    _assert_one_line(exc, path)


# --- loading into a model --------------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_load_into_model() -> None:
    source, target = _model(), _model()
    load_state_dict_into(target, source.state_dict(), source="src")
    x = torch.randn(5, 3)
    assert torch.equal(source(x), target(x))


def test_load_reports_shape_mismatch_missing_and_unexpected() -> None:
    state = _model().state_dict()
    state["0.weight"] = torch.zeros(7, 3)
    del state["2.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as exc:
        load_state_dict_into(_model(), state, source="ckpt.pth")
    message = str(exc.value)
    assert "\n" not in message and "ckpt.pth" in message
    assert "0.weight: checkpoint (7, 3) vs model (4, 3)" in message
    assert "missing keys (1): 2.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "num_classes" in message


def test_load_lists_at_most_five_keys() -> None:
    state = {f"stray{i}": torch.zeros(1) for i in range(8)} | _model().state_dict()
    with pytest.raises(CheckpointError, match=r"unexpected keys \(8\): stray0, .*stray4 and 3 more") as exc:
        load_state_dict_into(_model(), state, source="x")
    assert "stray5" not in str(exc.value)


# --- atomic writing ---------------------------------------------------------------------------


def test_write_roundtrip_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic(_tensors(), path, metadata={"format": "pt", "rmtp": "1"})
    _assert_same(read_state_dict(path), _tensors())
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "rmtp": "1"}
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_write_replaces_existing_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic({"x": torch.zeros(3)}, path)
    write_safetensors_atomic({"y": torch.ones(2)}, path)
    _assert_same(read_state_dict(path), {"y": torch.ones(2)})
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_write_handles_shared_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"tied.a": base, "tied.b": base, "view": base[1], "transposed": base.t()}
    with pytest.raises(RuntimeError):  # what the writer protects against
        save_file(tensors, str(tmp_path / "raw.safetensors"))
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic(tensors, path)
    _assert_same(read_state_dict(path), {key: value.contiguous() for key, value in tensors.items()})


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic({"old": torch.zeros(1)}, path)

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    with pytest.raises(CheckpointError, match="could not write .*No space left"):
        write_safetensors_atomic({"new": torch.ones(1)}, path)
    monkeypatch.undo()
    _assert_same(read_state_dict(path), {"old": torch.zeros(1)})
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_write_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="could not write"):
        write_safetensors_atomic({"a": torch.zeros(1)}, tmp_path / "missing" / "w.safetensors")
