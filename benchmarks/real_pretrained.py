"""A real pretrained model on real images: every pruner zero-shot, held-out top-1 and measured speed.

    python benchmarks/real_pretrained.py --rounds 8   # real ViT-Ti, imagenet-sample, calibration 256: ~17 min, 2 cores
    python benchmarks/real_pretrained.py --methods svd-mp-whitened-edge    # an extra row (and dense)
    python benchmarks/real_pretrained.py --methods tome-r8,magnitude-50 --limit 64 --calibration 16 --rounds 3 \
        --out /tmp/rp.json --plot /tmp/rp.png   # a smoke run: a few minutes

Issue 21, item 1. Every figure rmtp published before came from models trained from scratch on toy
data; users come with pretrained checkpoints and a few hundred images. This script takes any timm
checkpoint (``--checkpoint``: a folder in timm's hub layout, an rmtp output folder, a weights file
with ``--model`` or a card/config beside it, or a timm name with pretrained weights) and any image
folder whose sorted class folders give the model's class index (``--images``), and reports, for the
dense model and every method of :data:`METHODS`, zero-shot (no training):

- top-1 on the evaluation images and top-1 agreement with dense (same predicted class);
- params, nonzeros and MACs of one image (``rmtp.measure``: attention included);
- measured CPU speed-up at batch 32 and batch 1: ``rmtp bench``'s method, every model timed in the
  same interleaved rounds (``rmtp.measure.models_timed_together``), 1 thread (``--threads``),
  median [IQR] of the per-round ratios dense / model;
- the wall time of the compression itself (``rmtp.prune``, on ``--work-threads``; where a step times
  layers, its cost table starts empty, so the figure includes measuring it).

The split: a ``--seed``-ed permutation of the images; its first ``--calibration`` images are the
calibration set (handed to the methods that take one), the rest are the evaluation set. No
method is scored on an image it calibrated on; every top-1 is on the evaluation set only.

Images are decoded once, through the model's own eval transform (``rmtp.data``'s: timm's
``resolve_data_config`` + ``create_transform`` of the model's pretrained config), and the tensors
cached under ``~/.cache/rmtp/bench-tensors/`` (``--cache``), keyed by the folder, its file list
(names, sizes, modification times) and the transform: never in the repository.

Outputs: a markdown table on stdout, JSON (``--out``) with the machine, versions, the rmtp commit,
the exact settings and the split, and a figure (``--plot``, needs matplotlib: ``pip install -e
".[plot]"``): top-1 vs measured speed-up at batch 32, one point per method, dense marked.

A method is one row of :data:`METHODS` (key, label, pruner, params, whether it takes the
calibration images); a row whose pruner is not registered or whose params this tree's pruner does
not accept (a method still being built) is skipped with the reason printed, so the script runs on
any tree. Rows marked ``default=False`` run only when named in ``--methods``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
DEFAULT_CHECKPOINT = REALDATA / "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
DEFAULT_IMAGES = REALDATA / "imagenet-sample"
DEFAULT_CACHE = Path.home() / ".cache" / "rmtp" / "bench-tensors"
#: Bump when what a cache file holds changes, so older files are not read as the new layout.
CACHE_FORMAT = 1
#: Batches the speed-ups are measured at (the issue's: a throughput batch and a latency batch).
SPEED_BATCHES = (32, 1)


# ------------------------------------------------------------------------------------------ methods

@dataclass(frozen=True)
class Method:
    """One row of the benchmark: ``rmtp.prune(model, pruner, **params)`` on a fresh copy of dense.

    ``calibrate``: hand the method the calibration images (the pruners that read them: Wanda
    scores, spp's search, and n:m, which refuses to run without them even with magnitude scores).
    ``pending``: the work a row waits for, when its params are not in every tree yet; such a row is
    skipped, saying so, until the pruner accepts them.
    """

    key: str
    label: str
    pruner: str | None  # None: the dense model itself
    params: Mapping[str, Any] = field(default_factory=dict)
    calibrate: bool = False
    pending: str = ""
    #: In a run without ``--methods``; an extra row (run by naming it) keeps the default run's time down.
    default: bool = True
    #: Further prune steps after the first, in order: (pruner, params) each (weights and tokens in one row).
    then: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    #: Recovery after the prune steps: ``rmtp.reconstruct``'s settings (block-wise, on the calibration
    #: images only, no labels), or None for a zero-shot row.
    reconstruct: Mapping[str, Any] | None = None
    #: Recovery by distillation after the prune steps (and any reconstruction): ``rmtp.finetune``'s
    #: settings, the dense model as teacher, on the calibration images only, their labels unused; or None.
    distill: Mapping[str, Any] | None = None
    #: Prune steps after the recovery (token pruners, whose merged tokens block-wise reconstruction
    #: cannot compare with the dense blocks').
    after: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    @property
    def trains_on_calibration(self) -> bool:
        """Whether anything of the row (a pruner, reconstruction, distillation) reads the calibration images."""
        return self.calibrate or self.reconstruct is not None or self.distill is not None

    @property
    def steps(self) -> tuple[tuple[str, Mapping[str, Any]], ...]:
        """Every prune step of the row, in order (none for dense)."""
        return ((self.pruner, self.params), *self.then, *self.after) if self.pruner is not None else ()


#: 2:4 on every layer; ``only_if_faster: false`` because a CPU has no N:M kernel, so with the
#: default every layer would be left dense (the rows then measure accuracy at ×1 speed).
_NM_24 = {"n": 2, "m": 4, "budget": "uniform", "only_if_faster": False}

#: spp's structured cut without training: structured OBS on calibration activations, consumer refitted.
_SPP_OBS = {"ratio": 0.25, "search": "obs", "structures": ["neurons"]}
#: Block-wise reconstruction as the rows' recovery: 100 Adam steps of 32 calibration images per block.
_RC = {"steps": 100}
_RC_LABEL = "reconstruct (100 steps/block)"
#: Distillation as the recovery of token pruners (block-wise reconstruction cannot compare merged or
#: dropped tokens with the dense blocks'): the whole model trained to the dense model's logits on the
#: calibration images (no labels), 25 epochs of 8 batches of 32 = 200 AdamW steps, lr 3e-5 (cosine).
#: On 256 images a larger lr or a longer run overfits them (docs/unlabeled.md).
_KD = {"epochs": 25, "lr": 3e-5, "distill": {"weight": 1.0}}
_KD_LABEL = "KD (200 steps on the calibration images)"

#: The methods, in table order. New method: one line.
METHODS: tuple[Method, ...] = (
    Method("dense", "dense", None),
    Method("svd-mp-edge", "svd-mp, MP edge (margin 1)", "svd-mp", {}),
    Method("svd-mp-p0.9", "svd-mp, target_params 0.9", "svd-mp", {"target_params": 0.9}),
    Method("svd-mp-whitened-edge", "svd-mp whitened, MP edge", "svd-mp", {"whiten": True}, calibrate=True,
           pending="svd-mp with calibration data (issue 21 item 2)", default=False),
    Method("svd-mp-whitened-1p-p0.9", "svd-mp whitened (one pass), target_params 0.9", "svd-mp",
           {"target_params": 0.9, "whiten": True, "sequential": False}, calibrate=True,
           pending="svd-mp with calibration data (issue 21 item 2)"),
    # ranks by each layer's measured sensitivity (ASVD's measurement: 48 layers × 9 shares, 64 images each)
    Method("svd-mp-whitened-sens-p0.9", "svd-mp whitened, ranks by measured sensitivity, target_params 0.9",
           "svd-mp", {"target_params": 0.9, "whiten": True, "allocation": "sensitivity"}, calibrate=True),
    Method("svd-mp-whitened-sens128-p0.9", "svd-mp whitened, ranks by sensitivity on 128 images, target_params 0.9",
           "svd-mp", {"target_params": 0.9, "whiten": True, "allocation": "sensitivity", "sensitivity_images": 128},
           calibrate=True, default=False),
    # layer by layer: ~24 passes over the calibration images for ViT-Ti's 48 Linears (rmtp.fidelity.layerwise),
    # about 10× the one pass; an extra row (svd-mp's docs: no better on this model)
    Method("svd-mp-whitened-seq-p0.9", "svd-mp whitened (layer by layer), target_params 0.9", "svd-mp",
           {"target_params": 0.9, "whiten": True, "sequential": True}, calibrate=True,
           pending="svd-mp with calibration data (issue 21 item 2)", default=False),
    Method("nm-2:4-magnitude", "n:m 2:4, magnitude", "n:m", {**_NM_24, "score": "magnitude"}, calibrate=True),
    Method("nm-2:4-wanda", "n:m 2:4, Wanda", "n:m", {**_NM_24, "score": "wanda"}, calibrate=True),
    Method("nm-2:4-sparsegpt", "n:m 2:4, SparseGPT", "n:m", {**_NM_24, "score": "sparsegpt"}, calibrate=True,
           pending="n:m score: sparsegpt (issue 21 item 3)"),
    # each row's kept weights then refitted by least squares on the calibration inputs (n:m's refit)
    Method("nm-2:4-sparsegpt-refit", "n:m 2:4, SparseGPT + refit", "n:m",
           {**_NM_24, "score": "sparsegpt", "refit": True}, calibrate=True),
    Method("magnitude-50", "magnitude 50% global", "magnitude", {"sparsity": 0.5, "scope": "global"}),
    # a short search, 25 steps of 16 images (400 images, 1.6 passes over 256): spp's default 200 × 64 is
    # about an hour for ViT-Ti on 2 shared cores (a forward + backward of 64 images took 12-27 s there)
    Method("spp-0.3", "spp ratio 0.3 (25 steps × 16)", "spp", {"ratio": 0.3, "steps": 25, "batch_size": 16},
           calibrate=True),
    # structured cuts with the consumer refitted, no training (issue 21 item 4): a quarter of every MLP's
    # neurons (spp search: obs, layer by layer)
    Method("spp-obs-0.25", "spp obs, 25% of MLP neurons", "spp", _SPP_OBS, calibrate=True,
           pending="spp search: obs (issue 21 item 4)"),
    Method("spp-obs-0.1", "spp obs, 10% of MLP neurons", "spp", {**_SPP_OBS, "ratio": 0.1}, calibrate=True,
           pending="spp search: obs (issue 21 item 4)"),
    Method("token-cls-0.5", "token-cls r_max 0.5", "token-cls", {"r_max": 0.5}),
    Method("tome-r8", "tome r=8", "tome", {"r": 8}),
    Method("tome-r13", "tome r=13", "tome", {"r": 13}),
    Method("token-mean-0.5", "token-mean r_max 0.5", "token-mean", {"r_max": 0.5}),
    Method("tome-r16", "tome r=16", "tome", {"r": 16}, default=False),
    # weights and tokens in one recipe, zero-shot
    Method("spp-obs-0.25+tome-r13", "spp obs 25% of MLP neurons, then tome r=13", "spp", _SPP_OBS,
           calibrate=True, then=(("tome", {"r": 13}),), pending="spp search: obs (issue 21 item 4)"),
    # recovery (issue 21 item 6): block-wise reconstruction on the 256 calibration images, no labels
    Method("nm-2:4-sparsegpt+rc", f"n:m 2:4, SparseGPT + {_RC_LABEL}", "n:m", {**_NM_24, "score": "sparsegpt"},
           calibrate=True, reconstruct=_RC),
    Method("nm-2:4-sparsegpt-refit+rc", f"n:m 2:4, SparseGPT + refit + {_RC_LABEL}", "n:m",
           {**_NM_24, "score": "sparsegpt", "refit": True}, calibrate=True, reconstruct=_RC),
    # SparseGPT's damping raised from the reference's 1% to 10% of the mean Hessian diagonal, which gains after
    # reconstruction on two splits (docs/nm.md; an extra row, default off)
    Method("nm-2:4-sparsegpt-refit-d0.1+rc", f"n:m 2:4, SparseGPT percdamp 0.1 + refit + {_RC_LABEL}", "n:m",
           {**_NM_24, "score": "sparsegpt", "refit": True, "percdamp": 0.1}, calibrate=True, reconstruct=_RC,
           default=False),
    Method("svd-mp-whitened-1p-p0.9+rc", f"svd-mp whitened, target_params 0.9 + {_RC_LABEL}", "svd-mp",
           {"target_params": 0.9, "whiten": True, "sequential": False}, calibrate=True, reconstruct=_RC),
    Method("svd-mp-whitened-sens-p0.9+rc", f"svd-mp whitened, ranks by sensitivity, target_params 0.9 + {_RC_LABEL}",
           "svd-mp", {"target_params": 0.9, "whiten": True, "allocation": "sensitivity"}, calibrate=True,
           reconstruct=_RC, default=False),
    Method("spp-obs-0.25+rc", f"spp obs, 25% of MLP neurons + {_RC_LABEL}", "spp", _SPP_OBS, calibrate=True,
           reconstruct=_RC, pending="spp search: obs (issue 21 item 4)"),
    # distillation from dense on the calibration images: the recovery a token pruner can have
    Method("tome-r13+kd", f"tome r=13 + {_KD_LABEL}", "tome", {"r": 13}, distill=_KD, default=False),
    Method("tome-r16+kd", f"tome r=16 + {_KD_LABEL}", "tome", {"r": 16}, distill=_KD, default=False),
    Method("spp-obs-0.25+rc+tome-r13", f"spp obs 25% of MLP neurons + {_RC_LABEL}, then tome r=13", "spp",
           _SPP_OBS, calibrate=True, reconstruct=_RC, after=(("tome", {"r": 13}),),
           pending="spp search: obs (issue 21 item 4)"),
    # int8 weights (not pruning: every weight kept in 8 bits), the layers whose quantization alone moves the
    # predictions on calibration images kept in float; alone, then with token merging
    Method("int8", "int8 (sensitive layers in float)", "int8", {}, calibrate=True),
    Method("int8+tome-r8", "int8, then tome r=8", "int8", {}, calibrate=True, then=(("tome", {"r": 8}),)),
    Method("int8+tome-r13", "int8, then tome r=13", "int8", {}, calibrate=True, then=(("tome", {"r": 13}),)),
    # the screening on all 256 calibration images instead of the first 64 (4× its time): extra rows
    Method("int8-s256", "int8, screened on 256 images", "int8", {"screen_images": 256}, calibrate=True,
           default=False),
    Method("int8-s256+tome-r8", "int8 screened on 256 images, then tome r=8", "int8", {"screen_images": 256},
           calibrate=True, then=(("tome", {"r": 8}),), default=False),
)


def select_methods(keys: Sequence[str] | None, table: Sequence[Method] = METHODS) -> list[Method]:
    """The rows named by ``keys`` (the default rows when None), in table order, dense always first:
    every other row is compared with it."""
    known = {m.key: m for m in table}
    if keys is None:
        return [m for m in table if m.default]
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = set(keys) | {"dense"}
    return [m for m in table if m.key in wanted]


def unavailable(method: Method, plugins: Any) -> str | None:
    """Why ``method`` cannot run in this tree (its pruner is not registered, its params do not
    validate, or it needs calibration images its pruner does not take), or None when it can."""
    if method.pruner is None:
        return None
    from pydantic import ValidationError

    from rmtp.errors import PluginError

    calibrated = False
    for pruner, raw in method.steps:
        try:
            pruner_cls = plugins.pruners.get(pruner)
        except PluginError as exc:
            return str(exc)
        try:
            params = pruner_cls.Params.model_validate(dict(raw))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
                                 for e in exc.errors())
            return f"{pruner} does not accept {dict(raw)} here ({problems})"
        calibrated = calibrated or takes_calibration(pruner_cls, params)
    if method.calibrate and not calibrated:
        # rmtp.prune hands calibration images only to pruners that use them: the row would
        # silently be the method without data
        return f"{method.pruner} takes no calibration images in this tree, so the row would not be what it says"
    for recovery, settings in (("reconstruct", method.reconstruct), ("finetune", method.distill)):
        if settings is not None and not hasattr(__import__("rmtp"), recovery):
            return f"this tree has no rmtp.{recovery}"
    return None


def takes_calibration(pruner_cls: Any, params: Any) -> bool:
    """Whether ``rmtp.prune`` hands this pruner, with these params, the calibration images: its
    ``calibration_use(params)`` where the tree has it (svd-mp uses them when given), else its
    older class-wide ``calibration_needed()``."""
    use = getattr(pruner_cls, "calibration_use", None)
    if use is not None:
        return use(params) != "unused"
    return bool(pruner_cls.calibration_needed())


def skip_reason(method: Method, reason: str) -> str:
    """The line printed for a skipped row: the reason, and what it waits for where that is known."""
    return f"{method.label}: skipped, {reason}" + (f" (waits for {method.pending})" if method.pending else "")


# ------------------------------------------------------------------------------------------ the model

@dataclass
class Checkpoint:
    """The dense model and where it came from (for the JSON)."""

    model: nn.Module
    source: str
    name: str
    weights_sha256: str | None


def load_checkpoint(text: str, model_name: str | None = None) -> Checkpoint:
    """The model ``text`` names: a path (hub-layout folder, rmtp output folder, weights file with
    ``model_name`` or a card/config beside it, through ``rmtp bench``'s loader) or a timm name whose
    pretrained weights timm fetches. Raises an :class:`~rmtp.errors.RmtpError` with one line."""
    from rmtp import sources
    from rmtp.errors import CheckpointError

    path = Path(text).expanduser()
    if path.exists():
        from rmtp.bench.loading import load_candidates

        candidate = load_candidates([str(path)], model_name=model_name)[-1]
        return Checkpoint(model=candidate.model.eval(), source=str(path), name=candidate.timm_name or "?",
                          weights_sha256=_weights_digest(path))
    if _looks_like_path(text):
        raise CheckpointError(f"--checkpoint {text}: no such file or folder"
                              + (f" (the default needs {REALDATA}; see its README, or pass --checkpoint)"
                                 if path.resolve() == DEFAULT_CHECKPOINT.resolve() else ""))
    from rmtp.contract.architecture import ModelSpec
    from rmtp.plugins import get_plugins

    name = sources.normalise_name(text)
    model = sources.architecture_for(get_plugins(), name).create(ModelSpec(name=name, pretrained=True))
    return Checkpoint(model=model.eval(), source=text, name=name, weights_sha256=None)


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` was meant as a file or folder rather than a timm name (``timm/NAME`` and
    ``hf-hub:org/name`` contain a slash but are names)."""
    from rmtp import sources

    if sources.is_hub_name(text) or (text.startswith("timm/") and text.count("/") == 1):
        return False
    return os.sep in text or text.startswith((".", "~")) or text.endswith((".safetensors", ".pth", ".pt", ".bin"))


def _weights_digest(path: Path) -> str | None:
    """SHA-256 of the weights file behind ``path`` (a file, or a hub-layout folder's), else None."""
    from rmtp import sources

    weights = path if path.is_file() else None
    if weights is None:
        hub = sources.hub_folder(path)
        weights = hub.weights if hub is not None else None
    if weights is None:
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ the images

@dataclass
class ImageTensors:
    """Every image of a folder through the eval transform, decoded once (see :func:`image_tensors`)."""

    images: torch.Tensor  # (N, C, H, W) float32, normalised
    labels: torch.Tensor  # (N,) int64: the index of the image's class folder in sorted order
    files: list[str]  # paths relative to the folder, in the order of ``images``
    classes: list[str]
    transform: dict[str, Any]  # ImageTransforms.to_dict(): every value the eval transform used
    cache_file: Path | None
    from_cache: bool
    seconds: float


def eval_transforms(model: nn.Module, root: Path) -> Any:
    """rmtp's imagefolder preprocessing for ``model`` (its pretrained config through timm's
    ``resolve_data_config``; :class:`rmtp.data.ImageTransforms`), the same a recipe would use."""
    from rmtp.data import DataSpec, model_input_size
    from rmtp.data.preprocessing import resolve_transforms

    in_chans, height, width = model_input_size(model)
    return resolve_transforms(DataSpec(name="imagefolder", root=root), model, in_chans, (height, width))


def list_images(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, (path, label) of every image) of an image folder, as rmtp lists one: class
    folders sorted by name give the labels, hidden folders and non-image files are left out. A
    folder with train/ and val/ gives both (the benchmark makes its own split)."""
    from rmtp.data import DataError, ImageFiles, imagefolder_layout

    if not root.is_dir():
        raise DataError(f"--images {root}: no such folder" + (
            f" (the default needs {REALDATA}; see its README, or pass --images)"
            if root.resolve() == DEFAULT_IMAGES.resolve() else ""))
    folders, classes = imagefolder_layout(root)
    samples = [s for folder in folders for s in ImageFiles(folder, classes, None, _decode_rgb).samples]
    if not samples:
        raise DataError(f"--images {root}: no images in its class folders")
    return classes, samples


def files_digest(root: Path, samples: Sequence[tuple[str, int]]) -> str:
    """SHA-256 of every (relative path, size, modification time, label): changes when an image is
    added, removed, renamed, relabelled or rewritten, at one ``stat`` per file."""
    digest = hashlib.sha256()
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def cache_key(root: Path, samples: Sequence[tuple[str, int]], transform: dict[str, Any], mode: str) -> dict[str, Any]:
    """What decides the cached tensors: the folder, its files and the transform (and PIL mode)."""
    return {"format": CACHE_FORMAT, "root": str(root.resolve()), "images": len(samples),
            "files": files_digest(root, samples), "transform": transform, "mode": mode}


def cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"{name}.pt"


def _decode_rgb(path: str) -> Any:
    return _decode(path, "RGB")


def _decode(path: str, mode: str) -> Any:
    """One image as a PIL image in ``mode``; a file that cannot be read is named."""
    from PIL import Image

    from rmtp.data import ImageReadError

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert(mode)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"--images: cannot read image {path}: {' '.join(str(exc).split())}") from exc


def sample_images(samples: list[tuple[str, int]], limit: int | None, seed: int) -> list[tuple[str, int]]:
    """At most ``limit`` of ``samples``: a ``seed``-ed sample, kept in folder order (smoke runs and
    tests on a real folder; the figures of record use every image)."""
    if limit is None or limit >= len(samples):
        return samples
    chosen = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in chosen]


def image_tensors(root: Path, transforms: Any, cache_dir: Path | None, *, limit: int | None = None, seed: int = 0,
                  log: Callable[[str], None] = print) -> ImageTensors:
    """Every image under ``root`` (or a ``limit``-ed seeded sample, :func:`sample_images`) through
    ``transforms.eval_transform()``, from the cache when its key (:func:`cache_key`) matches, else
    decoded now and cached (``cache_dir`` None: no cache).

    Why a cache: decoding and resizing 1000 full-size JPEGs takes longer than several of the
    benchmark's rows, and every run needs the same tensors. Why the key holds sizes and
    modification times rather than pixels: one ``stat`` per file, and an image rewritten in place
    still changes its time.
    """
    from rmtp.data import IMAGE_MODES

    started = time.perf_counter()
    classes, samples = list_images(root)
    samples = sample_images(samples, limit, seed)
    mode = IMAGE_MODES[transforms.input_size[0]]
    transform_dict = transforms.to_dict()
    key = cache_key(root, samples, transform_dict, mode)
    path = cache_file(cache_dir, key) if cache_dir is not None else None
    files = [os.path.relpath(p, root) for p, _ in samples]
    cached = _read_cache(path, key) if path is not None else None
    if cached is not None:
        images, labels = cached
        return ImageTensors(images, labels, files, classes, transform_dict, path, True,
                            time.perf_counter() - started)
    transform = transforms.eval_transform()
    images = torch.stack([transform(_decode(p, mode)) for p, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    if path is not None:
        from rmtp.storage.atomic import replace_atomically

        payload = {"key": json.dumps(key, sort_keys=True), "images": images, "labels": labels}
        replace_atomically(path, lambda tmp: torch.save(payload, tmp))
        log(f"decoded {len(files)} images in {time.perf_counter() - started:.0f} s; cached as {path}")
    return ImageTensors(images, labels, files, classes, transform_dict, path, False, time.perf_counter() - started)


def _read_cache(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (images, labels) when ``path`` holds exactly ``key``'s tensors, else None (a
    missing, unreadable or foreign file is decoded again and overwritten)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable cache file is only a cache miss
        return None
    if not isinstance(payload, dict) or payload.get("key") != json.dumps(key, sort_keys=True):
        return None
    return payload["images"], payload["labels"]


# ------------------------------------------------------------------------------------------ the split

@dataclass(frozen=True)
class Split:
    """Indices into the images: the calibration set and the evaluation set (disjoint, together all)."""

    calibration: list[int]
    evaluation: list[int]
    seed: int

    def describe(self, total: int) -> str:
        return (f"calibration: the first {len(self.calibration)} of a seed-{self.seed} permutation of the {total} "
                f"images; evaluation: the other {len(self.evaluation)} (every top-1 is on these only)")


def split_indices(count: int, calibration: int, seed: int) -> Split:
    """A ``seed``-ed permutation of ``count`` images: the first ``calibration`` calibrate, the rest
    evaluate. Python's ``random.Random(seed).shuffle``, which gives the same order on every
    platform and Python 3 version, so a split is reproducible from its seed alone."""
    if not 0 <= calibration < count:
        raise SystemExit(f"--calibration {calibration}: needs 0 ≤ N < {count} (the images), so that some "
                         f"images are left to evaluate on")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return Split(calibration=sorted(order[:calibration]), evaluation=sorted(order[calibration:]), seed=seed)


# ------------------------------------------------------------------------------------------ measuring

@torch.inference_mode()
def predictions(model: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The predicted class of every image (argmax of the logits), in eval mode (restored after)."""
    from rmtp.measure.running import evaluating

    with evaluating(model):
        return torch.cat([model(images[i:i + batch]).argmax(dim=-1) for i in range(0, len(images), batch)])


def calibration_loader(data: ImageTensors, split: Split, batch: int = 32) -> torch.utils.data.DataLoader | None:
    """The calibration images with their labels (spp's default loss reads them), in a fixed order."""
    from torch.utils.data import DataLoader, TensorDataset

    if not split.calibration:
        return None
    index = torch.tensor(split.calibration)
    return DataLoader(TensorDataset(data.images[index], data.labels[index]), batch_size=batch, shuffle=False)


@dataclass
class Row:
    """One method's figures (the JSON's ``rows``). ``zero_shot`` holds the scores of the model the
    row ends with: zero-shot when ``reconstruct`` and ``distill`` are None, else after that recovery (the key keeps
    its name so that older JSON reads the same)."""

    key: str
    label: str
    pruner: str | None
    params: dict[str, Any]
    calibrated_on: int
    compression_seconds: float
    params_count: int
    nonzeros: int
    macs: int
    zero_shot: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=dict)  # batch → ratio and ms spreads
    #: Every prune step, in order ([pruner, params]), and the recovery after them (None: zero-shot, and
    #: then ``zero_shot`` is what its name says; else the scores are after recovery).
    steps: list[list[Any]] = field(default_factory=list)
    reconstruct: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "pruner": self.pruner, "params": self.params,
                "steps": self.steps, "reconstruct": self.reconstruct, "distill": self.distill,
                "calibrated_on_images": self.calibrated_on, "compression_seconds": self.compression_seconds,
                "params_count": self.params_count, "nonzeros": self.nonzeros, "macs": self.macs,
                "zero_shot": self.zero_shot, "speed": self.speed, "notes": self.notes}


def scored(model: nn.Module, data: ImageTensors, split: Split, dense_eval: torch.Tensor,
           predicted: torch.Tensor | None = None) -> dict[str, Any]:
    """Top-1 on the evaluation images and agreement with dense's predictions on them (``predicted``:
    the model's predictions there when already known, as the dense model's are)."""
    index = torch.tensor(split.evaluation)
    if predicted is None:
        predicted = predictions(model, data.images[index])
    correct = int((predicted == data.labels[index]).sum())
    agree = int((predicted == dense_eval).sum())
    n = len(split.evaluation)
    return {"top1": 100.0 * correct / n, "correct": correct, "agreement": 100.0 * agree / n, "agree": agree,
            "images": n}


def compress(dense: nn.Module, method: Method, calibration: torch.utils.data.DataLoader | None, *, seed: int,
             input_shape: tuple[int, ...], latency: dict[str, Any]) -> tuple[nn.Module, float, list[str]]:
    """A fresh copy of ``dense`` through the public API, as a user calls it (``rmtp.prune`` for each
    step, ``rmtp.reconstruct`` / ``rmtp.finetune`` for a recovery): the model, the wall time of all
    those calls, and the reports' notes. Where a step times layers it gets an empty cost-table
    folder of its own, so its time includes that measuring."""
    import rmtp

    model = rmtp.frozen_copy(dense).requires_grad_(True)
    if method.pruner is None:
        return model.eval(), 0.0, []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rmtp-real-latency-") as cache:
        started = time.perf_counter()
        def prune(steps: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
            for pruner, params in steps:
                report = rmtp.prune(model, pruner, dense=dense, calibration=calibration if method.calibrate else None,
                                    seed=seed, input_shape=input_shape, latency={**latency, "cache": cache},
                                    **dict(params))
                notes.extend(f"{pruner}: {note}" if len(method.steps) > 1 else note for note in report.notes)

        prune(method.steps[:len(method.steps) - len(method.after)])
        if method.reconstruct is not None:
            if calibration is None:
                raise ValueError("reconstruct needs the calibration images")
            report = rmtp.reconstruct(model, calibration, dense=dense, seed=seed, **dict(method.reconstruct))
            notes += [f"reconstruct: {note}" for note in report.notes]
        if method.distill is not None:
            if calibration is None:
                raise ValueError("distillation needs the calibration images")
            model.train()
            report = rmtp.finetune(model, calibration, teacher=dense, seed=seed, **dict(method.distill))
            notes += [f"distill: {note}" for note in report.notes]
        prune(method.after)
        seconds = time.perf_counter() - started
    return model.eval().requires_grad_(False), seconds, notes


def timed_together(models: Sequence[nn.Module], input_shape: tuple[int, ...], *, batch: int, rounds: int,
                   threads: int) -> list[dict[str, Any]]:
    """Every model timed in the same interleaved rounds (``rmtp bench``'s method); per model the
    per-call ms and the per-round ratio dense (``models[0]``) / model, as median/IQR spreads."""
    from rmtp import measure

    seconds, n_threads = measure.models_timed_together(models, input_shape, batch=batch, rounds=rounds,
                                                       threads=threads)
    return [{"batch": batch, "threads": n_threads, "rounds": rounds,
             "ms": measure.Spread.of([s * 1e3 for s in each]).to_dict(),
             "ratio": measure.Spread.of([d / s for d, s in zip(seconds[0], each)]).to_dict()} for each in seconds]


# ------------------------------------------------------------------------------------------ the run

@dataclass
class Settings:
    """Everything a run depends on (written to the JSON as given)."""

    checkpoint: str = str(DEFAULT_CHECKPOINT)
    model_name: str | None = None
    images: Path = DEFAULT_IMAGES
    calibration: int = 256
    seed: int = 0
    methods: list[str] | None = None
    rounds: int = 10
    threads: int = 1
    work_threads: int | None = None
    latency_cost: str = "measured"
    cache: Path | None = DEFAULT_CACHE
    limit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "model": self.model_name, "images": str(self.images),
                "calibration": self.calibration, "seed": self.seed, "methods": self.methods, "rounds": self.rounds,
                "timing_threads": self.threads, "work_threads": self.work_threads or torch.get_num_threads(),
                "speed_batches": list(SPEED_BATCHES), "latency_cost": self.latency_cost,
                "cache": str(self.cache) if self.cache else None, "limit": self.limit}


def run(settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark: load, decode (or read the cache), split, compress and score every
    method, time all models together; the JSON-ready result (see :func:`main` for the outputs)."""
    from rmtp import measure
    from rmtp.data import class_count_problem, model_num_classes
    from rmtp.errors import DataError
    from rmtp.plugins import get_plugins

    started = time.perf_counter()
    load_before = _load()
    code = git_state()  # the code this run imports is the tree as it is now, not when the run ends
    if settings.work_threads:
        torch.set_num_threads(settings.work_threads)
    checkpoint = load_checkpoint(settings.checkpoint, settings.model_name)
    dense = checkpoint.model.requires_grad_(False)
    transforms = eval_transforms(dense, settings.images)
    data = image_tensors(settings.images, transforms, settings.cache, limit=settings.limit, seed=settings.seed,
                         log=log)
    problem = class_count_problem(f"--images {settings.images}", len(data.classes), model_num_classes(dense))
    if problem:
        raise DataError(problem)
    split = split_indices(len(data.files), settings.calibration, settings.seed)
    log(split.describe(len(data.files)))
    shape = tuple(data.images.shape[1:])
    dense_all = predictions(dense, data.images)
    dense_eval = dense_all[torch.tensor(split.evaluation)]
    calibration = calibration_loader(data, split)
    latency = {"batch": SPEED_BATCHES[0], "threads": settings.threads, "cost": settings.latency_cost,
               "verify_rounds": 0}
    plugins = get_plugins()
    rows: list[Row] = []
    models: list[nn.Module] = []
    skipped: list[dict[str, str]] = []
    for method in select_methods(settings.methods):
        reason = unavailable(method, plugins)
        if reason is None:
            try:
                model, seconds, notes = compress(dense, method, calibration, seed=settings.seed, input_shape=shape,
                                                 latency=latency)
            except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others' figures
                reason = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if reason is not None:
            skipped.append({"key": method.key, "label": method.label, "reason": reason, "pending": method.pending})
            log(skip_reason(method, reason))
            continue
        row = Row(key=method.key, label=method.label, pruner=method.pruner, params=dict(method.params),
                  steps=[[pruner, dict(params)] for pruner, params in method.steps],
                  reconstruct=dict(method.reconstruct) if method.reconstruct is not None else None,
                  distill=dict(method.distill) if method.distill is not None else None,
                  calibrated_on=len(split.calibration) if method.trains_on_calibration else 0,
                  compression_seconds=seconds,
                  params_count=measure.count_params(model), nonzeros=measure.count_nonzeros(model),
                  macs=measure.count_macs(model, shape), notes=notes,
                  zero_shot=scored(model, data, split, dense_eval, dense_eval if method.pruner is None else None))
        log(f"{method.label}: top-1 {row.zero_shot['top1']:.2f}%, agreement {row.zero_shot['agreement']:.1f}%, "
            f"compressed in {seconds:.1f} s")
        rows.append(row)
        models.append(model)
    for batch in SPEED_BATCHES:
        log(f"timing {len(models)} models together at batch {batch}, {settings.rounds} rounds, "
            f"{settings.threads} thread(s)")
        for row, timing in zip(rows, timed_together(models, shape, batch=batch, rounds=settings.rounds,
                                                    threads=settings.threads)):
            row.speed[str(batch)] = timing
    return {
        "benchmark": "real_pretrained",
        "model": {"source": checkpoint.source, "name": checkpoint.name, "weights_sha256": checkpoint.weights_sha256,
                  "params": measure.count_params(dense), "macs": measure.count_macs(dense, shape)},
        "images": {"folder": str(settings.images), "count": len(data.files), "classes": len(data.classes),
                   "preprocessing": data.transform, "tensors_from_cache": data.from_cache,
                   "cache_file": str(data.cache_file) if data.cache_file else None,
                   "dense_top1_all_images": 100.0 * int((dense_all == data.labels).sum()) / len(data.files)},
        "split": {"seed": split.seed, "calibration_images": len(split.calibration),
                  "evaluation_images": len(split.evaluation), "description": split.describe(len(data.files)),
                  "calibration_files": [data.files[i] for i in split.calibration]},
        "rows": [row.to_dict() for row in rows],
        "skipped": skipped,
        "settings": settings.to_dict(),
        "machine": machine(load_before, code),
        "seconds": time.perf_counter() - started,
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def machine(load_before: float | None, git: dict[str, Any]) -> dict[str, Any]:
    """The CPU, cores, threads, load and versions the figures come from, and the rmtp commit (``git``:
    :func:`git_state` as read when the run began, the code it imported)."""
    import timm

    import rmtp
    from rmtp.bench.environment import cpu_name, usable_cores

    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "usable_cores": usable_cores(),
            "torch_threads_default": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_1min_start": load_before, "loadavg_1min_end": _load(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "rmtp": rmtp.__version__, **git}


def git_state() -> dict[str, Any]:
    """The rmtp commit and the files under rmtp/ and plugins/, and this script, that differ from it
    (the tree moves while others work in it), read without taking git's index lock."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    # "XY path" lines: the path from column 3
    status = git("status", "--porcelain", "--", "rmtp", "plugins", "benchmarks/real_pretrained.py")
    commit = git("rev-parse", "HEAD")
    return {"rmtp_commit": commit.strip() if commit else None,
            "rmtp_uncommitted": sorted(line[3:] for line in status.splitlines() if line.strip()) if status else []}


# ------------------------------------------------------------------------------------------ output

def _count(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _speed(row: dict[str, Any], batch: int) -> str:
    timing = row["speed"].get(str(batch))
    if not timing:
        return "–"
    r = timing["ratio"]
    return f"×{r['median']:.2f} [{r['q1']:.2f}–{r['q3']:.2f}]"


def caption(result: dict[str, Any]) -> str:
    """What the table's figures are, in one paragraph (printed above it, and for the README)."""
    m, s, model = result["machine"], result["settings"], result["model"]
    return (f"{model['name']} ({model['source']}), {result['images']['count']} images of "
            f"{result['images']['folder']}; {result['split']['description']}. Zero-shot (no training) except the "
            f"rows marked reconstruct (block-wise) or KD (distillation from dense), each on the calibration "
            f"images only, no labels; their time is in the compression column. "
            f"Speed: {s['rounds']} interleaved rounds, {s['timing_threads']} thread{'s' * (s['timing_threads'] != 1)}, "
            f"every model timed in the same "
            f"rounds, median [IQR] of per-round ratios dense / model. Compression on {s['work_threads']} threads. "
            f"{m['cpu']}, {m['usable_cores']} cores; torch {m['torch']}, timm {m['timm']}, "
            f"rmtp {(m['rmtp_commit'] or '?')[:7]}{' + uncommitted changes' if m['rmtp_uncommitted'] else ''}.")


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a markdown table (what the README shows)."""
    rows = result["rows"]
    dense = next((r for r in rows if r["key"] == "dense"), rows[0])
    lines = ["| method | top-1 | Δ top-1 | agrees with dense | params | nonzeros | MACs | "
             "CPU ×, batch 32 [IQR] | CPU ×, batch 1 [IQR] | compression s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        z = r["zero_shot"]
        delta = z["top1"] - dense["zero_shot"]["top1"]
        lines.append(f"| {r['label']} | {z['top1']:.2f}% | {delta:+.2f} | {z['agreement']:.1f}% | "
                     f"{_count(r['params_count'])} | {_count(r['nonzeros'])} | {_count(r['macs'])} | "
                     f"{_speed(r, 32)} | {_speed(r, 1)} | {r['compression_seconds']:.1f} |")
    return "\n".join(lines)


def report_text(result: dict[str, Any]) -> str:
    """Caption, table, then what was skipped and the pruners' own notes."""
    parts = [caption(result), "", markdown_table(result)]
    extra = [f"- {s['label']}: skipped, {s['reason']}" for s in result["skipped"]]
    extra += [f"- {r['label']}: {note}" for r in result["rows"] for note in r["notes"]]
    if extra:
        parts += ["", *extra]
    return "\n".join(parts)


def figure(result: dict[str, Any], path: Path) -> Path | None:
    """Top-1 on the evaluation images vs measured speed-up at batch 32 (IQR as error bars), one
    point per method, dense marked; None (with a note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"no figure: matplotlib is not installed (pip install -e \".[plot]\"); {path} not written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rmtp.storage.atomic import save_figure_atomic

    fig, ax = plt.subplots(figsize=(8.4, 5.6))
    dense_top1 = next(r["zero_shot"]["top1"] for r in result["rows"] if r["key"] == "dense")
    ax.axhline(dense_top1, color="grey", lw=0.8, ls="--", zorder=1)
    placed: list[tuple[float, float]] = []
    medians = [r["speed"]["32"]["ratio"]["median"] for r in result["rows"] if "32" in r["speed"]]
    right = min(medians, default=1.0) + 0.7 * (max(medians, default=1.0) - min(medians, default=1.0))
    for r in result["rows"]:
        ratio = r["speed"].get("32", {}).get("ratio")
        if ratio is None:
            continue
        x, y = ratio["median"], r["zero_shot"]["top1"]
        is_dense = r["key"] == "dense"
        recovered = r.get("reconstruct") is not None or r.get("distill") is not None
        ax.errorbar(x, y, xerr=[[x - ratio["q1"]], [ratio["q3"] - x]],
                    fmt="*" if is_dense else ("D" if recovered else "o"), ms=12 if is_dense else 6,
                    color="black" if is_dense else ("tab:orange" if recovered else "tab:blue"), capsize=2,
                    elinewidth=0.8, alpha=0.9, zorder=3)
        # methods that land on the same spot (the zero-shot failures near 0%, the ×1 masks) get their
        # labels stacked downwards rather than printed over each other; the key is the short name
        crowd = sum(1 for px, py in placed if abs(px - x) < 0.15 and abs(py - y) < 3.0)
        placed.append((x, y))
        # labels of the fastest points go to their left, inside the axes
        ax.annotate(r["key"], (x, y), textcoords="offset points", xytext=(-6 if x > right else 6, 3 - 8 * crowd),
                    ha="right" if x > right else "left", fontsize=7)
    ax.set_xlabel("measured CPU speed-up over dense, batch 32, 1 thread (median, IQR bars)")
    ax.set_ylabel(f"top-1 on {result['split']['evaluation_images']} held-out images (%)")
    ax.set_title(f"{result['model']['name']}: accuracy vs measured speed\n(blue: zero-shot; orange diamonds: "
                 f"after recovery on the calibration images: block-wise reconstruction or KD)", fontsize=9)
    ax.set_ylim(-3, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, Path, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="hub-layout folder, rmtp output folder, weights file, or a timm name with pretrained "
                             "weights (default: the real ViT-Ti of ../shared/realdata)")
    parser.add_argument("--model", help="timm name of a bare weights file (with no card or config.json beside it)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="image folder whose sorted class folders give the model's class index")
    parser.add_argument("--calibration", type=int, default=256, help="images that calibrate; the rest evaluate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of every pruner")
    parser.add_argument("--methods", help=f"comma-separated rows of: {', '.join(m.key for m in METHODS)} (dense "
                                          f"is always included; default: all but "
                                          f"{', '.join(m.key for m in METHODS if not m.default)})")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing speed")
    parser.add_argument("--work-threads", type=int, help="torch threads for compression and scoring "
                                                         "(default: torch's)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the decoded-image cache")
    parser.add_argument("--limit", type=int, help="use a seeded sample of this many images (smoke runs; the "
                                                  "figures of record use them all)")
    parser.add_argument("--no-cache", action="store_true", help="decode the images without reading or writing a cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/real_pretrained.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs/img/real_pretrained.png",
                        help="figure: top-1 vs measured speed-up at batch 32")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if methods is not None:
        select_methods(methods)  # unknown keys are refused before any work
    settings = Settings(checkpoint=args.checkpoint, model_name=args.model, images=args.images,
                        calibration=args.calibration, seed=args.seed, methods=methods, rounds=args.rounds,
                        threads=args.threads, work_threads=args.work_threads,
                        cache=None if args.no_cache else args.cache, limit=args.limit)
    return settings, args.out, args.plot


def main(argv: Sequence[str] | None = None) -> int:
    from rmtp.errors import RmtpError
    from rmtp.storage.atomic import write_json_atomic

    settings, out, plot = parse_args(argv)
    try:
        result = run(settings)
    except RmtpError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    result["figure"] = None
    write_json_atomic(out, result)  # first: the figures of a long run outlive a failing plot
    written = figure(result, plot) if plot else None
    if written:
        result["figure"] = str(written)
        write_json_atomic(out, result)
    print("\n" + report_text(result))
    print(f"\nwrote {out}" + (f" and {written}" if written else "") + f" in {result['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
