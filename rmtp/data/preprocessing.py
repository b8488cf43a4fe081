"""How images become model inputs, resolved once per run and reported.

imagefolder: timm's eval transform of the model's pretrained config
(``timm.data.create_transform(**timm.data.resolve_data_config(model=model))``: resize to
size / crop_pct, crop by crop_mode, normalise), each value overridable by a ``data:`` key
(``resize``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``), or
``resize: native`` (no resizing or cropping: only to-tensor and normalise, for a model trained on
the images' own size). The training split can be given timm's training transform instead
(:func:`rmtp.data.augment.train_transform`, ``finetune: augment: timm``).

digits: a fixed preprocessing (:func:`digits_preprocessing`), stated in the report like the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from rmtp.data.digits import DIGITS_MEAN, DIGITS_STD
from rmtp.data.spec import NATIVE, DataSpec
from rmtp.errors import DataError


@dataclass(frozen=True)
class ImageTransforms:
    """The resolved preprocessing of an imagefolder run (what timm calls a data config).

    ``input_size`` is (channels, height, width) of what the model gets; with ``native`` it is the
    images' own size and ``interpolation``/``crop_pct``/``crop_mode`` only serve the training
    transform's random resized crop. ``from_recipe`` names the ``data:`` keys that set a value; every
    other value is the model's pretrained config (``model.pretrained_cfg``, as timm resolves it).
    """

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native: bool = False
    from_recipe: tuple[str, ...] = ()

    def timm_config(self) -> dict[str, Any]:
        """The keyword arguments of ``timm.data.create_transform`` for the eval transform (the keys
        ``resolve_data_config`` returns)."""
        return {"input_size": self.input_size, "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def eval_transform(self) -> Any:
        """PIL image → normalised tensor, as the model is evaluated (and calibrated, and fine-tuned
        without ``augment: timm``)."""
        import timm.data

        if self.native:
            return native_transform(self.mean, self.std)
        return timm.data.create_transform(**self.timm_config(), is_training=False)

    def scale_size(self) -> tuple[int, int]:
        """The size images are resized to before the crop (timm's ``floor(size / crop_pct)``)."""
        return (math.floor(self.input_size[1] / self.crop_pct), math.floor(self.input_size[2] / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the run's report: every value the eval transform uses."""
        native = self.native
        return {
            "name": "imagefolder",
            "input_size": list(self.input_size),
            "resize": NATIVE if native else list(self.scale_size()),
            "interpolation": None if native else self.interpolation,
            "crop_pct": None if native else self.crop_pct,
            "crop_mode": None if native else self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "from_recipe": list(self.from_recipe),
            "from_model": self.from_model(),
        }

    def from_model(self) -> list[str]:
        """The values the model's pretrained config gave (with ``native``, the size is the images')."""
        used = (("mean", "std") if self.native
                else ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"))
        given = {"input_size" if key == "resize" else key for key in self.from_recipe}
        return [key for key in used if key not in given]


def native_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """To tensor and normalise, nothing else: the tail of timm's eval transform."""
    import torch
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms

    return transforms.Compose([MaybeToTensor(), transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))])


def resolve_transforms(spec: DataSpec, model: nn.Module, in_chans: int, size: tuple[int, int],
                       native: bool = False) -> ImageTransforms:
    """The imagefolder preprocessing for ``model``: timm's ``resolve_data_config`` of the model
    (its pretrained config) with the ``data:`` keys ``spec`` sets as overrides, at ``size``
    (height, width: ``data.resize``, the images' own size for ``native``, else the model's input size).

    A greyscale model gets one mean/std value: the average of the pretrained config's three (ImageNet:
    0.449, 0.226), a neutral choice since greyscale is a mix of the three; a ``data.mean``/``std``
    must have one value per channel, or one for all (a :class:`DataError` otherwise).
    """
    import timm.data

    args: dict[str, Any] = {"input_size": (in_chans, *size)}
    for key in ("interpolation", "crop_pct", "crop_mode"):
        if getattr(spec, key) is not None:
            args[key] = getattr(spec, key)
    for key in ("mean", "std"):
        values = getattr(spec, key)
        if values is not None:
            if len(values) not in (1, in_chans):
                raise DataError(f"data.{key}: {len(values)} values for a model with {in_chans} input channel(s); "
                                f"give {in_chans} (one per channel) or one for all")
            args[key] = values * in_chans if len(values) == 1 else values
    config = timm.data.resolve_data_config(args, model=model)
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if in_chans == 1 and len(mean) != 1:
        mean = (sum(mean) / len(mean),)
    if in_chans == 1 and len(std) != 1:
        std = (sum(std) / len(std),)
    from_recipe = tuple(key for key in ("resize", "interpolation", "crop_pct", "crop_mode", "mean", "std")
                        if getattr(spec, key) is not None)
    return ImageTransforms(input_size=tuple(config["input_size"]), interpolation=config["interpolation"],
                           crop_pct=float(config["crop_pct"]), crop_mode=config["crop_mode"], mean=mean, std=std,
                           native=native, from_recipe=from_recipe)


def digits_preprocessing(in_chans: int, side: int) -> dict[str, Any]:
    """The digits' fixed preprocessing, in the keys imagefolder reports (for the run's report)."""
    return {
        "name": "digits",
        "input_size": [in_chans, side, side],
        "resize": [side, side],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": None,
        "mean": [DIGITS_MEAN] * in_chans,
        "std": [DIGITS_STD] * in_chans,
        "from_recipe": [],
        "fixed": "8x8 digits (pixel values / 16) upsampled with torch bilinear (align_corners=False), no crop, "
                 "repeated to the model's channels",
    }


def describe_preprocessing(preprocessing: dict[str, Any]) -> str:
    """One line for the terminal: what the model's inputs went through, and where each value came from."""
    _, height, width = preprocessing["input_size"]
    norm = f"mean ({_numbers(preprocessing['mean'])}), std ({_numbers(preprocessing['std'])})"
    if preprocessing["name"] == "digits":
        return f"preprocessing (digits, fixed): 8x8 → {height}x{width} bilinear, no crop, {norm}"
    if preprocessing["resize"] == NATIVE:
        shape = f"native {height}x{width} (no resize, no crop)"
    else:
        scale_h, scale_w = preprocessing["resize"]
        resized = f"{scale_h}" if scale_h == scale_w else f"{scale_h}x{scale_w}"
        shape = (f"resize {resized} {preprocessing['interpolation']}, {preprocessing['crop_mode']} crop to "
                 f"{height}x{width} (crop_pct {preprocessing['crop_pct']:g})")
    from_recipe = preprocessing.get("from_recipe") or []
    source = ("the model's pretrained config" if not from_recipe else
              f"data: {', '.join(from_recipe)}; the rest the model's pretrained config")
    return f"preprocessing ({source}): {shape}, {norm}"


def _numbers(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)
