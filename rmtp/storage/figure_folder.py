"""Folders of figures (``--plot DIR`` of ``rmtp analyze-spectrum`` and ``rmtp bench``).

``DIR`` is the user's folder: it may be the current directory, a mount point, a symbolic link, and
hold their own files, so it is never replaced or deleted. What rmtp owns in it is what
``DIR/rmtp_figures.json`` lists. A command

1. renders every figure into a hidden staging folder inside ``DIR`` (``.rmtp-figures.<hex>.partial``),
   so a kill while rendering, the long part, leaves the previous figures as they were;
2. lists the previous figures and the new ones together (so whatever a kill leaves from here on
   is known as rmtp's), moves each new figure into place with an atomic rename, removes the
   previous figures this run did not draw (no stale figure of an earlier, larger run stays), and
   lists the new ones alone.

Only a kill inside step 2, a few renames, can leave figures of two runs side by side, and the
next run clears them. The next run also removes a staging folder a killed one left. A file of the
user's is never touched, whatever its name.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from rmtp.storage.atomic import write_json_atomic

#: Lists the figures rmtp put in a folder: the only files of it a later run removes.
MANIFEST = "rmtp_figures.json"
FORMAT = "rmtp-figures"
_STAGING = re.compile(r"\.rmtp-figures\.[0-9a-f]{16}\.partial")


def write_figure_folder(folder: Path, render: Callable[[Path], list[Path]]) -> list[Path]:
    """``render(staging)`` writes the figures into a fresh staging folder inside ``folder`` and
    returns them; they then replace the figures rmtp put in ``folder`` before. Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_dead_staging(folder)
    staging = folder / f".rmtp-figures.{secrets.token_hex(8)}.partial"
    staging.mkdir()
    try:
        names = [path.name for path in render(staging)]
        previous = _listed(folder)
        _write_manifest(folder, sorted(previous | set(names)))
        for name in names:
            os.replace(staging / name, folder / name)
        for name in sorted(previous - set(names)):
            _remove(folder / name)
        _write_manifest(folder, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in names]


def _write_manifest(folder: Path, names: list[str]) -> None:
    write_json_atomic(folder / MANIFEST, {"format": FORMAT, "files": names})


def _listed(folder: Path) -> set[str]:
    """The plain file names ``rmtp_figures.json`` lists; none when there is no list (a folder rmtp
    never drew in, or drew in before it kept one: its figures stay) or it does not read as one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
    if not isinstance(files, list):
        return set()
    return {name for name in files if isinstance(name, str) and name == os.path.basename(name)
            and name not in ("", ".", "..", MANIFEST)}


def _remove(path: Path) -> None:
    if path.is_file() or path.is_symlink():
        path.unlink(missing_ok=True)


def _clear_dead_staging(folder: Path) -> None:
    """Remove the staging folders killed runs left (a live run's would be a concurrent run on the
    same folder, which rmtp does not support for figures)."""
    for entry in os.listdir(folder):
        if _STAGING.fullmatch(entry):
            shutil.rmtree(folder / entry, ignore_errors=True)
