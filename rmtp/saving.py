"""Saving and loading pruned models as self-describing folders.

A saved model is a folder::

    model.safetensors   the weights (replaced layers included)
    rmtp_model.json     how to rebuild it: timm name + kwargs, architecture, replaced layers,
                        forward-pass patches (token reduction), and the dense baseline it came from
    recipe.yaml         the resolved recipe that produced it (when it came from a recipe)
    report.json         the run's report (when it came from a recipe)

The folder is written next to its destination under a temporary name and renamed into place,
so an interrupted run never leaves a half-written model where a finished one is expected.

Next to a folder ``NAME`` only rmtp's own bookkeeping appears, never inside it:

    .NAME.lock                   held (``flock``) by the one process writing NAME; a second one
                                 is refused at once instead of racing it
    .NAME.<16 hex>.partial       a folder being written (``.extras.partial``: a run's step outputs)
    .NAME.<16 hex>.old           the previous NAME, for the instant it is being replaced

The temporary names are random, not the PID: PIDs repeat (every container's rmtp is PID 1), and
a name a killed process left behind must not block the next one. Whoever takes the lock first
clears what dead writers left: it holds the lock, so no live writer owns any such entry.

Format versions (``format_version`` in ``rmtp_model.json``):

    1   ``replaced``: ``[{path, type, config}]``, ``type`` the replacement class's import path
        (``rmtp.lowrank.LowRankLinear``). Still written for a model with no replaced layer and no
        patch: such a folder names no type, so every rmtp reads it.
    2   adds ``patches``: ``[{type, config}]``, forward-pass patches such as token reduction, also
        by import path. An rmtp that could not re-apply them refuses the folder ("saved by a newer
        rmtp") instead of silently loading the unpatched model.
    3   every ``type`` is a stable id registered with its class (``lowrank.linear``,
        ``tokens.reduction``; see :mod:`rmtp.modules`), not where the class lives, so modules can
        move without orphaning folders. Written for every model with a replaced layer or a patch,
        so an rmtp from before ids says to upgrade rather than that a plugin is missing.

Reading: every version up to :data:`FORMAT_VERSION` loads. A type is looked up as an id, then in
the alias table of the names older folders used (:func:`rmtp.modules.type_aliases`: each import
path versions 1 and 2 wrote maps to its id), whatever the version, so a folder loads as long as
the plugin of each type is installed. A version above :data:`FORMAT_VERSION` is refused with
"saved by a newer rmtp".
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # Windows: folders are still written under unique names, just not held
    fcntl = None  # type: ignore[assignment]

import yaml
from torch import nn

from rmtp import __version__
from rmtp.architecture import Architecture, ModelSpec
from rmtp.checkpoint import load_state_dict_into, read_state_dict, write_safetensors_atomic
from rmtp.errors import CheckpointError, RmtpError
from rmtp.modules import apply_patches, apply_replacements, describe_patches, describe_replacements

if TYPE_CHECKING:
    from rmtp.plugins import Plugins

FORMAT = "rmtp-model"
#: Newest format this rmtp reads and writes (the versions are in the module docstring): 3, types
#: named by stable id. A model that names no type (no replaced layer, no patch) is written as 1,
#: which every rmtp reads.
FORMAT_VERSION = 3
_FORMAT_VERSION_WITHOUT_TYPES = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "rmtp_model.json"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"


@dataclass
class LoadedModel:
    """A model read back from an rmtp folder, with what is known about where it came from."""

    model: nn.Module
    spec: ModelSpec
    arch: str
    baseline: ModelSpec | None
    meta: dict[str, Any]


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def save(model: nn.Module, out_dir: str | Path, *, spec: ModelSpec, arch: Architecture,
         baseline: ModelSpec | None = None, recipe: dict[str, Any] | None = None,
         report: dict[str, Any] | None = None, save_weights: bool = True,
         overwrite: bool = False) -> Path:
    """Write ``model`` (and optionally its recipe and report) to ``out_dir`` atomically.

    Holds :func:`output_lock` while it writes (a run that already holds it keeps it), so two
    processes saving to one folder never interleave: the second gets an :class:`RmtpError`.
    """
    out_dir = Path(out_dir)
    with output_lock(out_dir, overwrite=overwrite):
        if os.path.lexists(out_dir) and not out_dir.is_dir():
            raise RmtpError(f"output folder {out_dir} is a file, not a folder")
        staging = make_temp_dir(out_dir, "partial")
        try:
            _write_folder(staging, model, spec=spec, arch=arch, baseline=baseline, recipe=recipe, report=report,
                          save_weights=save_weights)
            _move_into_place(staging, out_dir)
        except BaseException:
            _remove(staging)
            raise
    return out_dir


def _write_folder(folder: Path, model: nn.Module, *, spec: ModelSpec, arch: Architecture,
                  baseline: ModelSpec | None, recipe: dict[str, Any] | None, report: dict[str, Any] | None,
                  save_weights: bool) -> None:
    """Fill the staging ``folder``; nothing here is visible under the output name until it is whole."""
    replaced, patches = describe_replacements(model), describe_patches(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if replaced or patches else _FORMAT_VERSION_WITHOUT_TYPES,
        "rmtp_version": __version__,
        "arch": arch.name,
        "model": {**spec.to_dict(), "checkpoint": None, "pretrained": False},
        "replaced": replaced,
        "patches": patches,
        "baseline": baseline.to_dict() if baseline else None,
        "has_weights": save_weights,
    }
    if save_weights:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        write_safetensors_atomic(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if recipe is not None:
        (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    if report is not None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing folder is swapped out, then removed.

    Where the OS can (Linux ``renameat2``), the two are exchanged in one step, so a reader never
    finds ``out_dir`` missing. Elsewhere the old folder is first renamed aside (``.old``); a writer
    killed before the new one is in place leaves it there, and the next lock holder puts it back.
    """
    if not os.path.lexists(out_dir):
        os.replace(staging, out_dir)
        return
    if _exchange(staging, out_dir):
        _remove(staging)  # now the previous folder
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
    _remove(trash)


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _recover(out_dir: Path) -> None:
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
    retired = sorted((path for path, kind in stale if kind == "old" and is_saved_model(path)), key=_changed,
                     reverse=True)
    if retired and not os.path.lexists(out_dir):
        try:
            os.replace(retired[0], out_dir)
        except OSError:  # keep it where it is rather than delete the only copy of the previous model
            stale = [(path, kind) for path, kind in stale if path != retired[0]]
    for path, _ in stale:
        if os.path.lexists(path):
            _remove(path)


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
def output_lock(out_dir: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Hold ``out_dir`` for this process until the block ends, or raise :class:`RmtpError` at once.

    A run takes it before its first step and keeps it until its model is saved, so a second run
    on the same folder fails before it works, not after. Re-entrant in the thread that holds it
    (:func:`save` takes it too). Taking it first clears entries dead writers left
    (:func:`_recover`). With ``overwrite`` false an existing folder is refused, checked under the
    lock. Yields ``out_dir`` as an absolute path.
    """
    out_dir = Path(os.path.abspath(out_dir))
    hold = _enter(out_dir)
    try:
        if not overwrite and os.path.lexists(out_dir):
            raise RmtpError(f"output folder {out_dir} already exists (pass overwrite to replace it)")
        yield out_dir
    finally:
        _leave(out_dir, hold)


def _enter(out_dir: Path) -> _Hold:
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
            _recover(out_dir)
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


def read_saved_recipe(folder: Path) -> dict[str, Any] | None:
    """The resolved recipe saved in ``folder`` (``recipe.yaml``), or None when it has none.

    Read as untrusted input (safe loader, size cap: :mod:`rmtp.safe_yaml`), since a folder may come
    from anyone; anything but a mapping is one-line :class:`RmtpError`.
    """
    from rmtp.safe_yaml import read_yaml_file

    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    recipe = read_yaml_file(path)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("data") or {}, dict):
        raise RmtpError(f"{path}: not a resolved recipe (no data mapping)")
    return recipe


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an rmtp model folder (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META_FILE}: not an rmtp model description (format != {FORMAT!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path / META_FILE}: format_version must be a whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: saved by a newer rmtp (format {version} > {FORMAT_VERSION}); upgrade rmtp"
        )
    return meta


def _spec_from(data: dict[str, Any] | None) -> ModelSpec | None:
    if data is None:
        return None
    checkpoint = data.get("checkpoint")
    return ModelSpec(name=data["name"], arch=data.get("arch"), kwargs=dict(data.get("kwargs") or {}),
                     pretrained=bool(data.get("pretrained")), checkpoint=Path(checkpoint) if checkpoint else None)


def load(path: str | Path, *, plugins: Plugins | None = None) -> LoadedModel:
    """Rebuild a saved model: base timm model, replaced layers, the saved weights (strict), then
    the recorded forward-pass patches. ``plugins`` provide the architecture (default: the
    process-wide ones, :func:`rmtp.get_plugins`)."""
    if plugins is None:
        from rmtp.plugins import get_plugins

        plugins = get_plugins()
    path = Path(path)
    meta = read_meta(path)
    try:
        spec = _spec_from(meta["model"])
        arch = plugins.architecture(meta["arch"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: missing or malformed field {exc}") from None
    if not meta.get("has_weights", True):
        raise CheckpointError(f"{path}: saved without weights (output.save_model was false)")
    model = arch.create(spec)
    apply_replacements(model, meta.get("replaced") or [], source=str(path))
    load_state_dict_into(model, read_state_dict(path / WEIGHTS_FILE), source=str(path / WEIGHTS_FILE))
    apply_patches(model, meta.get("patches") or [], source=str(path))
    return LoadedModel(model=model.eval(), spec=spec, arch=arch.name, baseline=_spec_from(meta.get("baseline")),
                       meta=meta)
