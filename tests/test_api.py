"""The scriptable library API: every name ``rmtp`` exports resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rmtp


@pytest.mark.parametrize("name", [n for n in rmtp.__all__ if n != "__version__"])
def test_every_export_resolves(name: str) -> None:
    assert getattr(rmtp, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'prune_everything'"):
        rmtp.prune_everything  # noqa: B018


def test_import_is_lazy() -> None:
    """``import rmtp`` must not import torch: the CLI's --help and --version stay fast."""
    code = "import sys, rmtp; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
