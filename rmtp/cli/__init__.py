"""The ``rmtp`` command line: thin commands over the library API.

Each command parses its options, makes one library call and renders the result. User errors
(bad recipe, missing file, unknown plugin, no GPU) arrive as :class:`rmtp.errors.RmtpError` and
leave as red lines on stderr with exit code 1, never a traceback.

- :mod:`rmtp.cli.app`: the root Typer app (:func:`build_app`, the ``rmtp`` script :func:`main`)
  and the recipe commands ``prune``, ``validate``, ``list``;
- :mod:`rmtp.cli.spectrum`: ``rmtp analyze-spectrum``;
- :mod:`rmtp.cli.bench`: ``rmtp bench``;
- :mod:`rmtp.cli.export`: ``rmtp export``;
- :mod:`rmtp.cli.exits`: :func:`user_errors`, how every command (a plugin's too) turns errors and
  Ctrl-C into one line and an exit code.

Importing this package loads no torch: the commands import the library when they run.
"""

from __future__ import annotations

from rmtp.cli.app import build_app, main
from rmtp.cli.exits import INTERRUPTED, user_errors

__all__ = ["INTERRUPTED", "build_app", "main", "user_errors"]
