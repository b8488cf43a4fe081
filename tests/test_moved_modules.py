"""Old module paths keep working after the core was grouped into packages (issue 22): a plugin
written against ``rmtp.pruner`` or ``rmtp.modules`` still imports, and gets the very module."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import rmtp
from rmtp.moved import MOVED

ROOT = Path(rmtp.__file__).resolve().parent


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_names_the_moved_module_itself(old: str) -> None:
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    assert not (ROOT.parent / (old.replace(".", "/") + ".py")).exists(), "the old file is gone, only the path stays"


def test_from_imports_of_old_paths_work_in_a_fresh_process() -> None:
    """What a third-party plugin written before the move does first thing, before anything imported rmtp."""
    code = ("from rmtp.pruner import Pruner, PrunerParams\n"
            "from rmtp.modules import rebuildable, ModelPatch\n"
            "import rmtp.architecture, rmtp.contract.architecture\n"
            "assert rmtp.architecture is rmtp.contract.architecture\n"
            "from rmtp.lowrank import LowRankLinear\n"
            "import rmtp_plugins.svd_mp.lowrank as new\n"
            "assert LowRankLinear is new.LowRankLinear\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_monkeypatching_through_an_old_path_reaches_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtp.contract.saved_types as saved_types

    monkeypatch.setattr("rmtp.modules.type_name", lambda cls: "patched")
    assert saved_types.type_name(int) == "patched"
