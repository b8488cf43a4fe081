"""Folders of figures (``--plot DIR`` of ``rmtp analyze-spectrum`` and ``rmtp bench``), replaced whole.

A command renders every figure into a temporary folder beside ``DIR`` and swaps it into place in
one rename, as an output folder is (:func:`rmtp.storage.output_folder.move_into_place`, under the
folder's lock). A killed command leaves the previous figures or the complete new set, never a
mix of two runs, and a run with fewer layers leaves no stale figure of an earlier, larger one
(writing the PNGs one by one into ``DIR`` did both).

Replacing ``DIR`` deletes what is in it, so ``DIR`` must be new, empty, or hold only figures rmtp
put there: the names its ``rmtp_figures.json`` lists, or, in a folder written before that list
existed, names the command's own figures have (``legacy``). Anything else refuses the command
before any work, naming the entries, as ``output.overwrite`` refuses a folder with a user's file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from rmtp.errors import RmtpError
from rmtp.storage.atomic import check_writable
from rmtp.storage.output_folder import hold, make_temp_dir, move_into_place, remove_entry

#: Lists the figures a folder holds, so the next command knows them as rmtp's to replace.
MANIFEST = "rmtp_figures.json"
FORMAT = "rmtp-figures"
_SHOWN = 4


def check_figure_folder(folder: Path, *, what: str, legacy: re.Pattern[str]) -> None:
    """Raise :class:`RmtpError` (one line, ``"<what>: <folder>: ..."``) unless the figures can
    replace ``folder``: it must be creatable, and hold nothing rmtp did not write there."""
    check_writable(folder, what=what, is_dir=True)
    problem = _replace_problem(Path(folder), legacy)
    if problem is not None:
        raise RmtpError(f"{what}: {folder}: {problem}")


def write_figure_folder(folder: Path, render: Callable[[Path], list[Path]], *, what: str,
                        legacy: re.Pattern[str]) -> list[Path]:
    """``render(staging)`` writes the figures into a fresh folder beside ``folder`` and returns
    them; the folder then replaces ``folder`` whole. Returns the figures' final paths."""
    folder = Path(os.path.abspath(folder))
    with hold(folder, restorable=lambda path: (path / MANIFEST).is_file()):
        problem = _replace_problem(folder, legacy)  # again under the lock: it may have changed since
        if problem is not None:
            raise RmtpError(f"{what}: {folder}: {problem}")
        staging = make_temp_dir(folder, "partial")
        try:
            written = render(staging)
            names = [path.name for path in written]
            (staging / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": names}, indent=2) + "\n",
                                            encoding="utf-8")
            move_into_place(staging, folder)
        except BaseException:
            remove_entry(staging)
            raise
    return [folder / name for name in names]


def _replace_problem(folder: Path, legacy: re.Pattern[str]) -> str | None:
    if not os.path.lexists(folder):
        return None
    if folder.is_symlink() or not folder.is_dir():
        return "is a file, not a folder (it names the folder the figures go into)"
    own = _listed(folder)
    foreign = [name for name in sorted(os.listdir(folder))
               if name != MANIFEST and name not in own and not (own == set() and legacy.fullmatch(name))]
    if not foreign:
        return None
    shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
    return (f"holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} rmtp did not write ({shown}); the "
            f"figures replace the whole folder, so that none of an earlier run stays beside them: give a new or "
            f"empty folder")


def _listed(folder: Path) -> set[str]:
    """The figures ``rmtp_figures.json`` lists; empty when there is none (a folder written before
    the list existed, whose figures are told by their names) or it does not read as one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
    if not isinstance(files, list):
        return set()
    return {name for name in files if isinstance(name, str)}
