"""Write small files (JSON reports, CSV tables) so a reader never sees half of one.

The text goes to a temporary file in the destination's folder, which is then renamed over the
destination: on POSIX the rename is atomic, so an interrupted run leaves the old file or the new
one, never a torn mix. ``mkstemp`` creates files as 0600; they get the permissions any file
created under the process umask would have, since a report is meant to be shared.

:func:`check_writable` checks a destination before a run starts, and :func:`write_errors` turns a
write that fails anyway (full disk) into one line naming the file: a run can take hours, and an
``OSError`` traceback from its last line would lose its result.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rmtp.errors import RmtpError

#: How what a killed write leaves is named (the 8 characters are ``tempfile.mkstemp``'s): a file's
#: temp copy ``.NAME.<8>.tmp`` before its rename over NAME, and a writability probe.
_TEMP_SUFFIX = ".tmp"
_PROBE_PREFIX = ".rmtp-probe-"
_TEMP_COPY = re.compile(r"\.(.+)\.[a-z0-9_]{8}" + re.escape(_TEMP_SUFFIX))
_PROBE = re.compile(re.escape(_PROBE_PREFIX) + r"[a-z0-9_]{8}")


def leftover_of(name: str) -> str | None:
    """What an entry named ``name`` was, when a killed write of this module left it: the name of
    the file its temp copy was to replace (``.model.onnx.p7yz3y9a.tmp`` → ``model.onnx``), ``""``
    for a writability probe; None for any other name."""
    if _PROBE.fullmatch(name):
        return ""
    copy = _TEMP_COPY.fullmatch(name)
    return copy.group(1) if copy else None


def replace_atomically(path: Path | str, write: Callable[[str], object]) -> Path:
    """Call ``write(temp_path)`` on a fresh temp file in ``path``'s folder, then rename it over
    ``path`` with the umask's permissions; on any failure the temp file goes and ``path`` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` via a temp file and a rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return replace_atomically(path, write)


def save_figure_atomic(figure: Any, path: Path | str, **savefig: Any) -> Path:
    """``figure.savefig`` to a temp file in ``path``'s folder, then renamed over ``path``: a killed
    plot leaves the previous PNG or the new one, never a truncated image."""
    image_format = Path(path).suffix.lstrip(".").lower() or "png"
    return replace_atomically(path, lambda tmp: figure.savefig(tmp, format=image_format, **savefig))


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


def check_writable(path: Path | str, *, what: str, is_dir: bool) -> None:
    """Raise :class:`RmtpError` (``"<what>: <path>: ..."``) unless rmtp can create ``path`` now.

    ``is_dir``: the destination is a folder rmtp creates (or replaces, or writes files into);
    otherwise a file written via a temp file and a rename in its folder. The nearest existing
    folder above ``path`` (and an existing folder ``path`` itself) must take a new file. That is
    tested by creating and removing one, since ``os.access`` says yes to root for any mode and
    knows nothing of read-only mounts, /proc or /sys.
    """
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        _check_existing_kind(path, what=what, is_dir=is_dir)
        if is_dir and path.is_dir():
            _probe(path, path, what)
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise RmtpError(f"{what}: {path}: cannot be created, because {parent} is a file, not a folder")
    _probe(parent, path, what)


def check_json_report_path(path: Path | str, *, what: str = "--json") -> None:
    """:func:`check_writable` for a JSON report, which may replace only a JSON document: a file there
    that does not start like one (``{`` or ``[``, the recipe passed twice, a checkpoint, a CSV) is
    refused before the run, instead of being overwritten by its report when the run ends."""
    check_writable(path, what=what, is_dir=False)
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as handle:
        start = handle.read(4096).lstrip()
    if start and start[:1] not in (b"{", b"["):
        raise RmtpError(f"{what}: {path}: exists and is not a JSON report; rmtp replaces only JSON there, so that "
                        f"a mistyped path cannot destroy another file (remove it, or give another path)")


def _check_existing_kind(path: Path, *, what: str, is_dir: bool) -> None:
    """An existing destination must be what will replace it: a folder for a folder, a regular file
    for a file (renaming a report over a device such as /dev/null would replace the device)."""
    if is_dir and not path.is_dir():
        raise RmtpError(f"{what}: {path}: is a file, not a folder")
    if not is_dir and path.is_dir():
        raise RmtpError(f"{what}: {path}: is a folder, not a file")
    if not is_dir and not path.is_file() and os.path.exists(path):
        raise RmtpError(f"{what}: {path}: is not a regular file (a device, pipe or socket); give a file path")


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _probe(folder: Path, path: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the one test that read-only mounts and /proc answer truly."""
    where = f"{what}: {path}: " + ("the folder" if folder == path else str(folder)) + " is not writable"
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RmtpError(f"{where} (permission denied)")
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    except OSError as exc:  # /proc answers ENOENT, sysfs EACCES, a read-only mount EROFS
        reason = "it takes no new files" if exc.errno == errno.ENOENT else (exc.strerror or str(exc))
        raise RmtpError(f"{where} ({reason})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


@contextlib.contextmanager
def write_errors(what: str, path: Path | str, *, consequence: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into one :class:`RmtpError` line naming
    ``what`` and ``path`` (and ``consequence``, e.g. what was kept), instead of a traceback."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RmtpError(f"{what}: {path}: could not write it ({reason})" +
                        (f"; {consequence}" if consequence else "")) from None
