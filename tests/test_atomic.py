"""Reports are written whole or not at all, with normal permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rmtp.atomic import write_json_atomic, write_text_atomic


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
