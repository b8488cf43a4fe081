"""Reports are written whole or not at all, with normal permissions, to destinations checked up front."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from rmtp.errors import RmtpError
from rmtp.storage.atomic import (
    check_json_report_path,
    check_writable,
    write_errors,
    write_json_atomic,
    write_text_atomic,
)


def test_json_is_written_with_umask_permissions(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "sub" / "report.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = write_text_atomic(tmp_path / "table.csv", "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, 42)  # type: ignore[arg-type]  # handle.write refuses a non-str
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def _refusal(path: Path, *, what: str = "--json", is_dir: bool = False) -> str:
    with pytest.raises(RmtpError) as caught:
        check_writable(path, what=what, is_dir=is_dir)
    message = str(caught.value)
    assert message.startswith(f"{what}: ") and "\n" not in message
    return message


@pytest.mark.parametrize("path", ["/proc/rmtp-test/report.json", "/proc/self/status", "/sys/rmtp-test.json",
                                  "/sys/kernel/rmtp/report.json"])
def test_pseudo_file_systems_are_refused_even_for_root(path: str) -> None:
    # root may write anywhere os.access can see; /proc and /sys refuse it anyway
    assert path in _refusal(Path(path))


def test_a_path_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    message = _refusal(tmp_path / "file" / "plots", what="--plot", is_dir=True)
    assert f"{tmp_path / 'file'} is a file, not a folder" in message


def test_the_wrong_kind_of_existing_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in _refusal(tmp_path / "file", what="output.dir", is_dir=True)
    assert "is a folder, not a file" in _refusal(tmp_path, what="--csv")
    assert "not a regular file" in _refusal(Path("/dev/null"))  # a rename would replace the device


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0500 folder regardless")
def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert f"{locked} is not writable (permission denied)" in _refusal(locked / "deeper" / "out",
                                                                           what="output.dir", is_dir=True)
        assert "the folder is not writable" in _refusal(locked, what="--plot", is_dir=True)
    finally:
        locked.chmod(0o700)


def test_a_writable_destination_passes_and_the_probe_leaves_nothing(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "deeper" / "report.json", what="--json", is_dir=False)
    check_writable(tmp_path, what="--plot", is_dir=True)
    (tmp_path / "old.csv").write_text("")
    check_writable(tmp_path / "old.csv", what="--csv", is_dir=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]


def test_a_late_write_failure_is_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(RmtpError, match=r"^--json: .*r.json: could not write it \(No space left on device\); "
                                        r"kept above$"):
        with write_errors("--json", tmp_path / "r.json", consequence="kept above"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_json_report_replaces_only_a_json_document(tmp_path: Path) -> None:
    """``--json`` may rerun over its earlier report (or an empty file), never over another kind of
    file a mistyped path names: the recipe, a checkpoint, a CSV."""
    check_json_report_path(tmp_path / "new.json")
    check_json_report_path(write_json_atomic(tmp_path / "old.json", {"schema": "rmtp-run-report/1"}))
    (tmp_path / "empty.json").write_text("")
    check_json_report_path(tmp_path / "empty.json")
    for name, content in [("recipe.yaml", b"model:\n  name: vit_tiny_patch16_224\n"),
                          ("model.pth", b"PK\x03\x04" + bytes(64)), ("table.csv", b"layer,rank\n")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(RmtpError) as caught:
            check_json_report_path(path)
        assert str(caught.value) == (f"--json: {path}: exists and is not a JSON report; rmtp replaces only JSON "
                                     f"there, so that a mistyped path cannot destroy another file (remove it, "
                                     f"or give another path)")
        assert path.read_bytes() == content
