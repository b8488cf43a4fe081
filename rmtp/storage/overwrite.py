"""What ``overwrite`` may replace: an rmtp output folder, and nothing a user keeps in or above it.

Replacing a folder deletes everything in it, so ``output.overwrite: true`` (which every shipped
recipe sets) and ``rmtp.save(..., overwrite=True)`` replace a folder only when rmtp wrote all of
it: an empty folder, or one with ``rmtp_model.json`` whose every entry is one rmtp put there. A
folder that holds (or is) the recipe, its data, the model it starts from or the current directory
is never replaced, whatever it contains: ``output.dir: ..`` must not take a git clone with it.

A user's file in an output folder (``rmtp export`` writes ``model.onnx`` there by default) is not
deleted: the replacement is refused and the message names the file, so the user moves it or picks
another folder. Keeping it in the new folder instead would put an export of the previous model
next to the new one. The hidden temp file a killed rmtp write leaves (``.model.onnx.<8>.tmp`` for a
file rmtp writes there, a ``.rmtp-probe-<8>``) is rmtp's own and goes with the folder.

No torch here: ``rmtp validate`` runs these checks before it imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from rmtp.errors import RmtpError
from rmtp.storage.atomic import leftover_of

WEIGHTS_FILE = "model.safetensors"
META_FILE = "rmtp_model.json"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
#: Every saved folder may hold these; anything else must be listed in ``rmtp_model.json``'s ``files``.
OWN_FILES = (WEIGHTS_FILE, META_FILE, RECIPE_FILE, REPORT_FILE)
#: How step outputs were named in a folder saved before ``files`` was recorded: one note per step.
_LEGACY_EXTRAS_NOTE = "also saved in the output folder: "
_SHOWN = 4
#: Files rmtp's commands write into an output folder by default, besides the folder's own
#: (``rmtp export``'s model.onnx / model.pt2, ``rmtp token-map``'s token_map.png).
_WRITTEN_INTO = ("model.onnx", "model.pt2", "token_map.png")


def replace_problem(out_dir: Path | str, *, keep: Mapping[str, Path | str | None] | None = None) -> str | None:
    """Why ``out_dir`` must not be replaced by a new rmtp output, or None when it may be.

    ``keep`` names paths that must survive (``{"recipe": path, "data.root": path}``): a folder
    that is one of them or holds one is refused. The current directory is always among them.
    Nothing is refused when ``out_dir`` does not exist.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if not os.path.lexists(out_dir):
        return None
    if out_dir.is_symlink() or not out_dir.is_dir():
        kind = "a symbolic link" if out_dir.is_symlink() else "a file"
        return f"{out_dir} is {kind}, not an rmtp output folder; overwrite replaces only rmtp output folders"
    kept = {**(keep or {}), "current directory": Path.cwd()}
    for what, path in kept.items():
        if path is not None and _holds(out_dir, Path(path)):
            return (f"{out_dir} holds the {what} ({path}); overwrite never replaces a folder with the recipe, "
                    f"its data, its model or the current directory in it: choose a new output folder")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return None
    if META_FILE not in entries:
        return (f"{out_dir} is not an rmtp output folder (no {META_FILE}); overwrite replaces only rmtp output "
                f"folders: choose a new folder, or remove this one yourself")
    own = _own_entries(out_dir)
    if own is None:
        return f"{out_dir / META_FILE} is not an rmtp model description; overwrite replaces only rmtp output folders"
    foreign = [name for name in entries if name not in own and not _temp_leftover(out_dir, name, own)]
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        return (f"{out_dir} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} rmtp did not write "
                f"({shown}); overwrite never deletes them: move them out, or choose another output folder")
    return None


def check_replaceable(out_dir: Path | str, *, what: str = "output folder",
                      keep: Mapping[str, Path | str | None] | None = None) -> None:
    """Raise :class:`RmtpError` (``"<what>: <reason>"``) when :func:`replace_problem` finds one."""
    problem = replace_problem(out_dir, keep=keep)
    if problem is not None:
        raise RmtpError(f"{what}: {problem}")


def _temp_leftover(out_dir: Path, name: str, own: set[str]) -> bool:
    """Whether ``name`` is a file a killed rmtp write left in ``out_dir`` (its temp copy of one of
    the folder's files or of what rmtp's commands write there, or a probe): rmtp's own, replaced
    with the folder instead of blocking it. A user's hidden file of another name never is."""
    target = leftover_of(name)
    ours = target == "" or (target is not None and (target in own or target in _WRITTEN_INTO))
    return ours and (out_dir / name).is_file() and not (out_dir / name).is_symlink()


def _holds(folder: Path, path: Path) -> bool:
    """``path`` is ``folder`` or lies under it (symbolic links resolved on both sides)."""
    folder, path = Path(os.path.realpath(folder)), Path(os.path.realpath(path))
    return path == folder or folder in path.parents


def _own_entries(out_dir: Path) -> set[str] | None:
    """The entries rmtp wrote in ``out_dir``: ``rmtp_model.json``'s ``files``, or for a folder saved
    before that was recorded, the fixed files and the step outputs its report's notes name."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != "rmtp-model":
        return None
    files = meta.get("files")
    if isinstance(files, list) and all(isinstance(name, str) for name in files):
        return {*OWN_FILES, *files}
    return {*OWN_FILES, *_legacy_extras(out_dir / REPORT_FILE)}


def _legacy_extras(report_path: Path) -> list[str]:
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    names: list[str] = []
    steps = report.get("steps") if isinstance(report, dict) else None
    for step in steps if isinstance(steps, list) else []:
        notes = step.get("notes") if isinstance(step, dict) else None
        for note in notes if isinstance(notes, list) else []:
            if isinstance(note, str) and note.startswith(_LEGACY_EXTRAS_NOTE):
                names.extend(name.strip() for name in note[len(_LEGACY_EXTRAS_NOTE):].split(","))
    return names
