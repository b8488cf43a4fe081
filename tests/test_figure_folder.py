"""``--plot`` folders are replaced whole: a killed command leaves the previous figures, a smaller
run leaves no stale figure, and a folder with a user's file in it is refused before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rmtp.errors import RmtpError
from rmtp.storage.figure_folder import MANIFEST, check_figure_folder, write_figure_folder

LEGACY = re.compile(r"(?:\d{3}_.+|overview)\.png")


def _render(*names: str, fail_after: int | None = None):
    def render(staging: Path) -> list[Path]:
        written = []
        for index, name in enumerate(names):
            if fail_after is not None and index == fail_after:
                raise KeyboardInterrupt  # as a kill in the middle of the figures would stop it
            (staging / name).write_bytes(f"figure {name}".encode())
            written.append(staging / name)
        return written
    return render


def _write(folder: Path, *names: str, **kwargs) -> list[Path]:
    return write_figure_folder(folder, _render(*names, **kwargs), what="--plot", legacy=LEGACY)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_smaller_run_leaves_no_figure_of_the_earlier_one(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    _write(plots, "000_a.png", "001_b.png", "013_head.png", "overview.png")
    written = _write(plots, "000_a.png", "overview.png")
    assert written == [plots / "000_a.png", plots / "overview.png"]
    assert sorted(p.name for p in plots.iterdir()) == ["000_a.png", "overview.png", MANIFEST]
    assert json.loads((plots / MANIFEST).read_text())["files"] == ["000_a.png", "overview.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]  # no staging, no lock left


def test_a_run_stopped_midway_leaves_the_previous_figures_whole(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    _write(plots, "000_a.png", "overview.png")
    before = _contents(plots)
    with pytest.raises(KeyboardInterrupt):
        _write(plots, "000_new.png", "001_new.png", "overview.png", fail_after=2)
    assert _contents(plots) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_a_folder_with_a_users_file_is_refused_before_any_work_and_kept(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    _write(plots, "000_a.png")
    (plots / "thesis.tex").write_text("mine")
    with pytest.raises(RmtpError, match=r"--plot: .*plots: holds 1 entry rmtp did not write \(thesis.tex\); the "
                                        r"figures replace the whole folder"):
        check_figure_folder(plots, what="--plot", legacy=LEGACY)
    with pytest.raises(RmtpError, match="thesis.tex"):  # and under the lock, if it appeared since the check
        _write(plots, "000_a.png")
    assert (plots / "thesis.tex").read_text() == "mine" and (plots / "000_a.png").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RmtpError, match="is a file, not a folder"):
        check_figure_folder(tmp_path / "file", what="--plot", legacy=LEGACY)


def test_a_folder_written_before_the_list_existed_is_told_by_its_figure_names(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    for name in ("000_blocks.0.attn.qkv-q.png", "overview.png"):
        (plots / name).write_bytes(b"old figure")
    check_figure_folder(plots, what="--plot", legacy=LEGACY)
    _write(plots, "overview.png")
    assert sorted(p.name for p in plots.iterdir()) == ["overview.png", MANIFEST]
    (plots / "999_mine.png").write_bytes(b"a user's figure with a figure's name")  # listed folders: the list rules
    with pytest.raises(RmtpError, match="999_mine.png"):
        check_figure_folder(plots, what="--plot", legacy=LEGACY)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_figure_folder(empty, what="--plot", legacy=LEGACY)
