"""Typed errors raised by the library.

The library never prints and never exits: it raises one of these. Only the CLI turns an
``RmtpError`` into a red line on stderr and exit code 1; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import reprlib
from typing import Any

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 6, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` bounded for an error line: nested containers elided level by level
    (``reprlib``, so a huge value costs what is shown, not its size), then cut to ``limit``."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RmtpError(Exception):
    """Base class for every error a user can cause (bad input, missing file, unknown plugin)."""


class RecipeError(RmtpError):
    """A recipe failed to load or validate.

    Holds every problem found (``problems``), each already formatted as
    ``file: key.path: message``, so the CLI can print all of them at once.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PluginError(RmtpError):
    """A plugin is unknown, duplicated, blocked or broken."""


class CheckpointError(RmtpError):
    """A checkpoint or saved rmtp model could not be read or does not fit the model."""


class DataError(RmtpError):
    """A dataset could not be built (missing folder, empty split, bad size)."""


class DeviceError(RmtpError):
    """The requested device is not available on this machine."""
