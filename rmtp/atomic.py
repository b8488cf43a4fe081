"""Write small files (JSON reports, CSV tables) so a reader never sees half of one.

The text goes to a temporary file in the destination's folder, which is then renamed over the
destination: on POSIX the rename is atomic, so an interrupted run leaves the old file or the new
one, never a torn mix. ``mkstemp`` creates files as 0600; they get the permissions any file
created under the process umask would have, since a report is meant to be shared.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` via a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path | str, data: Any) -> Path:
    """Write ``data`` as indented JSON with a final newline, atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux), since setting it
    to read it back races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
