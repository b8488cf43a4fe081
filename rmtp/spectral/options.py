"""The MP-fit option types that pruner params share, under their first import path: they are
defined in :mod:`rmtp.contract.param_types`, outside this package, so that params load without torch.
"""

from __future__ import annotations

from rmtp.contract.param_types import TwConfidence  # defined there, torch-free, for pruner params

__all__ = ["TwConfidence"]
