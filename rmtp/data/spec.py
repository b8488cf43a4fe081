"""The ``data:`` section of a recipe (:class:`DataSpec`) and what saved recipes say about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

#: Interpolation names timm's transforms take (``timm.data.transforms.str_to_interp_mode``).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
Interpolation = Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]
#: timm's eval crop modes: ``center`` keeps the aspect ratio (shorter edge resized, centre cropped),
#: ``squash`` resizes each edge (aspect ratio not kept), ``border`` fits the longer edge and pads.
CROP_MODES = ("center", "squash", "border")
#: ``data.resize: native``: images reach the model at their own size (no resize, no crop).
NATIVE = "native"
#: The ``data:`` keys that set imagefolder preprocessing (each defaults to the model's pretrained config).
PREPROCESSING_KEYS = ("resize", "interpolation", "crop_pct", "crop_mode", "mean", "std")
#: What digits use instead, said where an imagefolder key is given for digits.
DIGITS_PREPROCESSING = ("the 8x8 digits are upsampled to data.img_size (torch bilinear), scaled to [0, 1] "
                        "and normalised with mean 0.5, std 0.5")
#: The label every image of unlabeled data (``data.unlabeled: true``) carries: no class index, so a
#: cross-entropy or a top-1 that is handed one anyway fails instead of training or scoring on it.
UNLABELED = -1


def problem(message: str) -> PydanticCustomError:
    """A validation error whose message is printed as is (no "Value error, " prefix)."""
    return PydanticCustomError("rmtp_data", message)


class DataSpec(BaseModel):
    """The ``data:`` section of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["digits", "imagefolder"] = "digits"
    root: Path | None = Field(
        None, description="imagefolder: a folder with train/ and val/ subfolders, or one folder to split")
    img_size: int | None = Field(
        None, ge=8, le=1024, description="digits: side to upsample to (default: the model's input size)")
    resize: int | tuple[int, int] | Literal["native"] | None = Field(
        None, description="imagefolder: the size images reach the model (timm's input_size), an int or "
                          "[height, width]; 'native': no resizing or cropping at all (default: the model's input size)")
    interpolation: Interpolation | None = Field(
        None, description="imagefolder: resize interpolation (default: the model's pretrained config)")
    crop_pct: float | None = Field(
        None, gt=0.0, le=1.0, description="imagefolder: resize to resize / crop_pct, then crop; "
                                          "1.0: no crop (default: the model's pretrained config)")
    crop_mode: Literal["center", "squash", "border"] | None = Field(
        None, description="imagefolder: timm's crop mode "
                          "(default: the model's pretrained config)")
    mean: tuple[float, ...] | None = Field(
        None, description="imagefolder: normalisation mean, one value per channel or one "
                          "for all (default: the model's pretrained config)")
    std: tuple[float, ...] | None = Field(
        None, description="imagefolder: normalisation std, one value per channel or one "
                          "for all (default: the model's pretrained config)")
    unlabeled: bool = Field(False, description="the images have no labels: imagefolder reads every image under "
                                               "root (or under root/train and root/val), sub-folders included and "
                                               "never taken as classes; digits drop their labels. Only "
                                               "label-free work runs on them: distillation alone (finetune "
                                               "distill weight 1.0), reconstruct, calibration; evaluate reports "
                                               "top-1 agreement with the dense model instead of top-1")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share held out for validation when the data has no val/ folder")
    calibration_size: int = Field(
        256, ge=1, description="images from the train split that pruners needing calibration see")
    batch_size: int = Field(64, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    eval_limit: int | None = Field(None, ge=1, description="evaluate on at most this many val images (quick checks)")
    split_seed: int = Field(0, ge=0, description="seed of the train/val split and the calibration subset; "
                                                  "independent of the recipe's seed, so changing the run's "
                                                  "seed never moves images between train and val")

    @model_serializer(mode="wrap")
    def _labelled_as_before(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``unlabeled`` is written only when true: a labelled recipe saves (``recipe.yaml``, the
        checkpoint a ``--resume`` compares with) exactly as before the key existed."""
        dumped = handler(self)
        if isinstance(dumped, dict) and not self.unlabeled:
            dumped.pop("unlabeled", None)
        return dumped

    @field_validator("img_size")
    @classmethod
    def _img_size_is_for_digits(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("name") == "imagefolder":
            raise problem("img_size is the digits' upsampling side; for imagefolder set data.resize (the size "
                           "images reach the model), or data.resize: native for no resizing")
        return value

    @field_validator("resize", mode="before")
    @classmethod
    def _resize_shape(cls, value: Any) -> Any:
        if value is None or value == NATIVE:
            return value
        sides = [value] if isinstance(value, int) else value
        if (not isinstance(sides, (list, tuple)) or len(sides) not in (1, 2)
                or not all(isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= 4096
                           for side in sides)):
            raise problem("resize takes a side (an int), [height, width] (1 to 4096 px), or 'native' "
                           "(images at their own size: no resizing or cropping)")
        return value if isinstance(value, int) else (sides[0], sides[-1])

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _per_channel(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if (not isinstance(values, (list, tuple)) or not values
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise problem(f"{info.field_name} takes one number per input channel (3 for RGB, 1 for greyscale), "
                           "or one number for every channel")
        if info.field_name == "std" and not all(v > 0 for v in values):
            raise problem("std values must be greater than 0")
        return tuple(float(v) for v in values)

    @field_validator(*PREPROCESSING_KEYS)
    @classmethod
    def _preprocessing_is_for_imagefolder(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        if info.data.get("name") == "digits":
            raise problem(f"{info.field_name} sets imagefolder preprocessing; digits use a fixed one "
                           f"({DIGITS_PREPROCESSING})")
        if info.field_name in ("interpolation", "crop_pct", "crop_mode") and info.data.get("resize") == NATIVE:
            raise problem(f"{info.field_name} has no effect with data.resize: native (images reach the model at "
                           "their own size, never resized or cropped); remove one of the two")
        return value


def saved_split_seed(recipe: dict) -> object:
    """The split seed of a saved, resolved recipe (a dict as read from ``recipe.yaml``).

    ``data.split_seed`` when present; recipes saved before it existed split by the run's ``seed``.
    Returned unvalidated (callers report a bad value in their own words).
    """
    data = recipe.get("data") or {}
    if isinstance(data, dict) and "split_seed" in data:
        return data["split_seed"]
    return recipe.get("seed", 0)
