"""Shared fixtures: tiny models and recipe files, so every test runs in seconds on a CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from rmtp.plugins import reset_plugins

REPO = Path(__file__).resolve().parents[1]

#: A ViT small enough for unit tests, with the digits input (16×16 greyscale, 10 classes).
TINY_VIT = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2,
            "num_classes": 10, "in_chans": 1}


def tiny_recipe(steps: list[dict[str, Any]], output: Path | None = None, **extra: Any) -> dict[str, Any]:
    """A recipe dict on the tiny ViT and digits (val capped for speed)."""
    recipe: dict[str, Any] = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": dict(TINY_VIT)},
        "data": {"name": "digits", "batch_size": 128, "calibration_size": 64},
        "steps": steps,
        **extra,
    }
    if output is not None:
        recipe["output"] = {"dir": str(output)}
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def write_png(path: Path, size: tuple[int, int], seed: int) -> None:
    """A random RGB PNG of ``size`` (width, height) at ``path``, its pixels drawn from ``seed``."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)


def wait_for_mid_epoch_checkpoint(out_dir: Path, run: subprocess.Popen, timeout: float) -> None:
    """Poll until the live run ``run`` (a ``subprocess.Popen``) has written a checkpoint in the middle
    of a fine-tune epoch next to ``out_dir``. The writer rotates generations while this reads (a
    generation named a moment ago may be gone), so a read that fails is simply retried."""
    import time

    from rmtp.errors import CheckpointError
    from rmtp.run.resume import checkpoint_root, read_checkpoint

    latest, deadline = checkpoint_root(out_dir) / "latest.json", time.time() + timeout
    while time.time() < deadline:
        try:
            state = read_checkpoint(out_dir) if latest.is_file() else None
        except CheckpointError:
            state = None
        if state is not None and state.progress.train is not None and state.progress.train.batches_done > 0:
            return
        assert run.poll() is None, "the run finished before a mid-epoch checkpoint was seen"
        time.sleep(0.02)
    raise AssertionError(f"no mid-epoch checkpoint of {out_dir} within {timeout:.0f} s")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread hand-offs cost 100× the math."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch: pytest.MonkeyPatch):
    """Each test sees the plugins its own environment allows (RMTP_DISABLE_PLUGINS, sys.path)."""
    monkeypatch.delenv("RMTP_DISABLE_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


# Speed decisions (svd-mp/n:m only_if_faster, speed targets) predict time by MACs in the suite:
# deterministic, nothing timed, and what rmtp decided before it measured time. Set in the
# environment so that recipe runs in subprocesses inherit it; tests of the measured cost model
# pass `cost: measured` explicitly, and the cost table never lands in the user's cache.
import os as _os  # noqa: E402
import tempfile as _tempfile  # noqa: E402

_os.environ["RMTP_LATENCY_COST"] = "macs"
_os.environ["RMTP_LATENCY_CACHE"] = _tempfile.mkdtemp(prefix="rmtp-latency-test-")
