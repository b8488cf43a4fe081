"""``--plot`` folders: figures are drawn aside and moved in at the end, the previous figures rmtp
listed are replaced (none stale), and nothing of the user's in the folder is ever touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rmtp.storage.figure_folder import MANIFEST, write_figure_folder


def _render(*names: str, fail_after: int | None = None):
    def render(staging: Path) -> list[Path]:
        written = []
        for index, name in enumerate(names):
            if fail_after is not None and index == fail_after:
                raise KeyboardInterrupt  # as a kill in the middle of the drawing would stop it
            (staging / name).write_bytes(f"figure {name}".encode())
            written.append(staging / name)
        return written
    return render


def _write(folder: Path, *names: str, **kwargs) -> list[Path]:
    return write_figure_folder(folder, _render(*names, **kwargs))


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_smaller_run_leaves_no_figure_of_the_earlier_one(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    _write(plots, "000_a.png", "001_b.png", "013_head.png", "overview.png")
    written = _write(plots, "000_a.png", "overview.png")
    assert written == [plots / "000_a.png", plots / "overview.png"]
    assert sorted(p.name for p in plots.iterdir()) == ["000_a.png", "overview.png", MANIFEST]
    assert json.loads((plots / MANIFEST).read_text())["files"] == ["000_a.png", "overview.png"]
    assert (plots / "000_a.png").read_bytes() == b"figure 000_a.png"


def test_a_run_stopped_while_drawing_leaves_the_previous_figures_and_no_staging(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    _write(plots, "000_a.png", "overview.png")
    before = _contents(plots)
    with pytest.raises(KeyboardInterrupt):
        _write(plots, "000_new.png", "001_new.png", "overview.png", fail_after=2)
    assert _contents(plots) == before


def test_what_a_killed_run_left_is_cleared_by_the_next(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    _write(plots, "000_a.png", "001_b.png")
    dead = plots / ".rmtp-figures.0123456789abcdef.partial"  # a SIGKILL while drawing leaves its staging
    dead.mkdir()
    (dead / "000_a.png").write_bytes(b"half")
    # a kill between the moves: both runs' figures listed, a new one already in place
    listed = ["000_a.png", "001_b.png", "002_c.png"]
    (plots / MANIFEST).write_text(json.dumps({"format": "rmtp-figures", "files": listed}))
    (plots / "002_c.png").write_bytes(b"new")
    _write(plots, "000_a.png")
    assert sorted(p.name for p in plots.iterdir()) == ["000_a.png", MANIFEST]


def test_the_users_files_are_never_touched_whatever_their_names(tmp_path: Path, monkeypatch) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    mine = {"thesis.tex": b"mine", "overview.png": b"my slide", "001_intro.png": b"my slide 1", "report.json": b"{}"}
    for name, data in mine.items():
        (plots / name).write_bytes(data)
    _write(plots, "000_a.png", "overview.png")  # a figure of the same name replaces it: it is the run's output
    _write(plots, "000_a.png")  # ... and goes when a later run draws none
    assert _contents(plots) == {"thesis.tex": b"mine", "001_intro.png": b"my slide 1", "report.json": b"{}",
                                "000_a.png": b"figure 000_a.png", MANIFEST: (plots / MANIFEST).read_bytes()}
    monkeypatch.chdir(plots)  # --plot .: the current directory stays what it is
    _write(Path("."), "000_a.png")
    assert os.getcwd() == str(plots) and (plots / "thesis.tex").read_bytes() == b"mine"


def test_a_list_naming_paths_outside_the_folder_removes_nothing_there(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    (plots / MANIFEST).write_text(json.dumps({"format": "rmtp-figures", "files": ["../precious.txt", "/etc/passwd"]}))
    _write(plots, "000_a.png")
    assert (tmp_path / "precious.txt").read_text() == "keep"
