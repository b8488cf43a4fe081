"""The bookkeeping next to an output folder: one writer at a time, temporary names, recovery.

A folder ``NAME`` is written by :func:`rmtp.storage.saving.save` (a run's step outputs by
:mod:`rmtp.run.step_output`); this module owns what appears beside it, never inside it (the
folder's contents are a public format)::

    .NAME.lock                   held (``flock``) by the one process writing NAME; a second one
                                 is refused at once instead of racing it
    .NAME.<16 hex>.partial       a folder being written (``.extras.partial``: a run's step outputs)
    .NAME.<16 hex>.old           the previous NAME, for the instant it is being replaced

The temporary names are random, not the PID: PIDs repeat (every container's rmtp is PID 1), and
a name a killed process left behind must not block the next one. Whoever takes the lock first
clears what dead writers left: it holds the lock, so no live writer owns any such entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: folders are still written under unique names, just not held
    fcntl = None  # type: ignore[assignment]

from rmtp.errors import RmtpError


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing folder is swapped out, then removed.

    Where the OS can (Linux ``renameat2``), the two are exchanged in one step, so a reader never
    finds ``out_dir`` missing. Elsewhere the old folder is first renamed aside (``.old``); a writer
    killed before the new one is in place leaves it there, and the next lock holder puts it back.
    """
    if not os.path.lexists(out_dir):
        os.replace(staging, out_dir)
        return
    if _exchange(staging, out_dir):
        remove_entry(staging)  # now the previous folder
        return
    retired = temp_name(out_dir, "old")
    os.replace(out_dir, retired)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(retired, out_dir)
        raise
    trash = temp_name(out_dir, "partial")  # a half-deleted folder must never be mistaken for a whole .old
    os.replace(retired, trash)
    remove_entry(trash)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False (nothing done) where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


# --- temporary entries next to an output folder -------------------------------------------------

_NEW_PARTIAL = re.compile(r"[0-9a-f]{16}\.(?:extras\.)?partial")
_NEW_OLD = re.compile(r"[0-9a-f]{16}\.old")
# Names rmtp 0.1.0 used (mkdtemp's 8 characters; the PID), so leftovers from before are cleared too.
_LEGACY_PARTIAL = re.compile(r"(?:extras\.)?[a-z0-9_]{8}\.partial")
_LEGACY_OLD = re.compile(r"old-\d+")


def temp_name(out_dir: Path, kind: str) -> Path:
    """An unused ``.NAME.<16 random hex>.<kind>`` next to ``out_dir`` (kind: partial, extras.partial, old).

    The random part is fixed-length hex and the kinds are fixed words, so the entries of NAME can
    be told from those of any other folder (``NAME.x``, ``NAME.extras``) by their name alone.
    """
    while True:
        candidate = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(8)}.{kind}")
        if not os.path.lexists(candidate):
            return candidate


def make_temp_dir(out_dir: Path, kind: str) -> Path:
    """Create a fresh :func:`temp_name` folder, with the umask's permissions (mkdtemp's are 0700)."""
    while True:
        path = temp_name(out_dir, kind)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path


def _entry_kind(name: str, entry: str) -> str | None:
    """``"partial"`` or ``"old"`` when ``entry`` is a temporary entry of folder ``name``, else None."""
    prefix = f".{name}."
    if not entry.startswith(prefix):
        return None
    rest = entry[len(prefix):]
    if _NEW_PARTIAL.fullmatch(rest) or _LEGACY_PARTIAL.fullmatch(rest):
        return "partial"
    if _NEW_OLD.fullmatch(rest) or _LEGACY_OLD.fullmatch(rest):
        return "old"
    return None


def remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _recover(out_dir: Path, restorable: Callable[[Path], bool]) -> None:
    """Clear what writers killed mid-save left next to ``out_dir``.

    Only called by a process that has just taken the lock, so no live writer owns any of these
    entries. A previous folder (``.old``, holding a model) goes back in place if ``out_dir`` itself
    is gone (a kill between the two renames); everything else is removed.
    """
    try:
        names = os.listdir(out_dir.parent)
    except OSError:
        return
    stale = [(out_dir.parent / name, kind) for name in names if (kind := _entry_kind(out_dir.name, name))]
    retired = sorted((path for path, kind in stale if kind == "old" and restorable(path)), key=_changed,
                     reverse=True)
    if retired and not os.path.lexists(out_dir):
        try:
            os.replace(retired[0], out_dir)
        except OSError:  # keep it where it is rather than delete the only copy of the previous model
            stale = [(path, kind) for path, kind in stale if path != retired[0]]
    for path, _ in stale:
        if os.path.lexists(path):
            remove_entry(path)


def _changed(path: Path) -> float:
    try:
        return path.lstat().st_ctime
    except OSError:
        return 0.0


# --- holding an output folder --------------------------------------------------------------------


def lock_file(out_dir: Path) -> Path:
    """The lock file of ``out_dir``: next to it, never inside (the folder's contents are a format)."""
    return out_dir.with_name(f".{out_dir.name}.lock")


@dataclass
class _Hold:
    thread: int
    depth: int
    fd: int | None  # None: the file system has no locks (the folder is written, just not held)


_holds: dict[str, _Hold] = {}
_holds_guard = threading.Lock()


@contextlib.contextmanager
def hold(out_dir: str | Path, *, overwrite: bool = True,
         restorable: Callable[[Path], bool] = lambda path: False) -> Iterator[Path]:
    """Hold ``out_dir`` for this process until the block ends, or raise :class:`RmtpError` at once.

    A run takes it before its first step and keeps it until its model is saved, so a second run
    on the same folder fails before it works, not after. Re-entrant in the thread that holds it
    (:func:`rmtp.storage.saving.save` takes it too). Taking it first clears entries dead writers left
    (:func:`_recover`; a retired folder for which ``restorable`` is true goes back in place when
    ``out_dir`` is gone). With ``overwrite`` false an existing folder is refused, checked under
    the lock. Yields ``out_dir`` as an absolute path.
    """
    out_dir = Path(os.path.abspath(out_dir))
    held = _enter(out_dir, restorable)
    try:
        if not overwrite and os.path.lexists(out_dir):
            raise RmtpError(f"output folder {out_dir} already exists (pass overwrite to replace it)")
        yield out_dir
    finally:
        _leave(out_dir, held)


def _enter(out_dir: Path, restorable: Callable[[Path], bool]) -> _Hold:
    with _holds_guard:
        hold = _holds.get(str(out_dir))
        if hold is not None:
            if hold.thread != threading.get_ident():
                raise RmtpError(f"output folder {out_dir} is held by another rmtp run in this process")
            hold.depth += 1
            return hold
        fd = _acquire(out_dir)
        hold = _holds[str(out_dir)] = _Hold(thread=threading.get_ident(), depth=1, fd=fd)
    try:
        if fd is not None:
            _recover(out_dir, restorable)
    except BaseException:
        _leave(out_dir, hold)
        raise
    return hold


def _leave(out_dir: Path, hold: _Hold) -> None:
    with _holds_guard:
        hold.depth -= 1
        if hold.depth:
            return
        del _holds[str(out_dir)]
        if hold.fd is not None:
            path = lock_file(out_dir)
            if _is_file_of(hold.fd, path):  # removed while held, so nobody can lock a file gone stale
                with contextlib.suppress(OSError):
                    path.unlink()
            os.close(hold.fd)


def _acquire(out_dir: Path) -> int | None:
    """An open, ``flock``-ed lock file of ``out_dir`` (None where the file system has no locks)."""
    path = lock_file(out_dir)
    while True:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            if fcntl is None:
                return None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise RmtpError(f"output folder {out_dir}: cannot create its lock file {path} "
                            f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            raise RmtpError(f"output folder {out_dir} is held by another rmtp process"
                            f"{f' (pid {holder})' if holder else ''}; wait for it to finish, or choose "
                            f"another output folder") from None
        except OSError:  # e.g. ENOLCK: a file system without locks
            os.close(fd)
            return None
        if _is_file_of(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # opened just before its last holder removed it: lock the file now there


def _is_file_of(fd: int, path: Path) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _holder_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
