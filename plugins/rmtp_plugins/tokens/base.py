"""The old home of what the three token pruners share (before the one pruner layout): the
names stay importable from here for plugins that subclass them. ``TokenPruner`` is declared in
:mod:`rmtp_plugins.tokens`, the params in :mod:`.params`, ``block_macs`` in :mod:`.pruner`."""

from __future__ import annotations

from rmtp.lazy import lazy_exports
from rmtp_plugins.tokens import TokenPruner
from rmtp_plugins.tokens.params import KeepRatio, PruneScheduleParams, TokenParams

_LAZY = {"block_macs": "rmtp_plugins.tokens.pruner"}  # imports torch: on first use

__all__ = ["KeepRatio", "PruneScheduleParams", "TokenParams", "TokenPruner", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
