"""Extra artefacts of prune steps (model variants, JSON, figures), published with the run's output.

A step that produces more than the model it hands on (spp's levels and solution path, a token
map) writes through :class:`StagedOutput`, the pipeline's implementation of
:class:`rmtp.contract.pruner.StepOutput`. The entries are placed into the run's output while
:func:`rmtp.storage.saving.save` still writes it under its temporary name (:meth:`StagedOutput.place_into`),
so the model and its step outputs appear in one rename: a killed run leaves the previous output or
the complete new one, never a model without its extras. The staged entries stay until the run ends
(linked, not moved), so a run killed after its output was saved but before its checkpoint was removed
still resumes with them. The staging folder lives under the output folder's lock
(:func:`rmtp.storage.saving.output_lock`), so no other rmtp process mistakes it for a dead writer's
leftover and clears it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from rmtp.errors import RmtpError
from rmtp.storage import saving
from rmtp.storage.atomic import write_json_atomic
from rmtp.storage.output_folder import make_temp_dir

if TYPE_CHECKING:
    from rmtp.contract.architecture import Architecture, ModelSpec
    from rmtp.run.recipe import Recipe


_EXTRA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_RESERVED = {saving.WEIGHTS_FILE, saving.META_FILE, saving.RECIPE_FILE, saving.REPORT_FILE}


class StagedOutput:
    """:class:`~rmtp.contract.pruner.StepOutput` of a run with an output folder.

    Entries are written into a staging folder next to the output as the steps produce them (so a
    model variant need not stay in memory) and put into the output folder by :meth:`place_into`
    while it is saved; :meth:`discard` drops the staging folder when the run ends.
    """

    def __init__(self, out_dir: Path, *, spec: ModelSpec, arch: Architecture, baseline: ModelSpec,
                 recipe: Recipe, staging: Path | None = None, kept: list[str] | None = None) -> None:
        """``staging``: a fixed staging folder that outlives a killed run (the checkpoint's), instead
        of a temporary one; ``kept``: the entries a resumed run's checkpoint recorded there, which
        stay (anything else in it was written after that checkpoint and is dropped)."""
        self.out_dir, self.spec, self.arch, self.baseline, self.recipe = out_dir, spec, arch, baseline, recipe
        self.names: list[str] = list(kept or [])
        self.step = 0  # index of the step now running (the pipeline sets it)
        self._fixed = staging
        self._staging: Path | None = None
        self._held = contextlib.ExitStack()  # the output folder's lock, from staging to discard
        if staging is not None and staging.is_dir():
            for entry in staging.iterdir():
                if entry.name not in self.names:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            self._staging = staging if self.names else None

    def free_name(self, name: str) -> str:
        """``name``, or ``step<k>-<name>`` when an earlier step of the run already used it."""
        return name if name not in self.names else f"step{self.step}-{name}"

    def _claim(self, name: str) -> Path:
        if not _EXTRA_NAME.fullmatch(name) or name in _RESERVED:
            raise RmtpError(f"step output name {name!r} is not a plain file name, or is one rmtp reserves")
        if name in self.names:
            raise RmtpError(f"step output {name!r} was already written by an earlier step of this run")
        if self._staging is None:
            self._held.enter_context(saving.output_lock(self.out_dir))
            if self._fixed is not None:
                self._fixed.mkdir(parents=True, exist_ok=True)
                self._staging = self._fixed
            else:
                self._staging = make_temp_dir(self.out_dir, "extras.partial")
        self.names.append(name)
        return self._staging / name

    def save_model(self, name: str, model: nn.Module, report: dict[str, Any]) -> Path:
        saving.save(model, self._claim(name), spec=self.spec, arch=self.arch, baseline=self.baseline,
                    recipe=self.recipe.to_dict(), report=report, save_weights=self.recipe.output.save_model)
        return self.out_dir / name

    def write_json(self, name: str, data: Any) -> Path:
        write_json_atomic(self._claim(name), data)
        return self.out_dir / name

    def write_file(self, name: str, write: Callable[[Path], Any]) -> Path:
        staged = self._claim(name)
        write(staged)
        if not staged.exists():  # caught now, not after the run's model is saved, when publishing
            raise RmtpError(f"step output {name!r}: the writer returned without creating it")
        return self.out_dir / name

    def place_into(self, folder: Path) -> None:
        """Put every entry into ``folder``: the run's output (or the folder it is rescued to) while
        :func:`rmtp.storage.saving.save` still writes it under its temporary name (its ``add_extras``).
        Hard links where the file system allows (the staging folder is the output's sibling), copies
        elsewhere; the staged entries stay until :meth:`discard`."""
        if self._staging is None:
            return
        for name in self.names:
            _link_or_copy(self._staging / name, folder / name)

    def discard(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._held.close()


#: Why ``os.link`` may refuse where a copy works: another file system, or one without hard links.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES})


def _link_or_copy(source: Path, target: Path) -> None:
    """``source`` (a file or a folder) at ``target`` too: hard-linked file by file, copied where
    links cannot be made. A symbolic link stays a link (to what it pointed at), as a move kept it."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_file)
    else:
        _link_file(source, target)


def _link_file(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        shutil.copy2(source, target, follow_symlinks=False)
