"""timm's training augmentation for imagefolder images (``finetune: augment: timm``).

:class:`TrainAugment` holds the values (a pydantic model the ``finetune:`` section references);
:func:`train_transform` is ``timm.data.create_transform(input_size, is_training=True, ...)`` with
them, at a run's resolved input size and mean/std.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from rmtp.data.spec import problem

if TYPE_CHECKING:  # TrainAugment is part of a recipe (finetune.augment), which validates without torch
    from rmtp.data.preprocessing import ImageTransforms

#: Training may also pick an interpolation at random per image (timm's ``random``: bilinear or bicubic).
TrainInterpolation = Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random"]


class TrainAugment(BaseModel):
    """timm's training augmentation for imagefolder images, as ``finetune:`` sets it.

    :meth:`rmtp.data.DataBundle.train_with` gives the train split through
    ``timm.data.create_transform(input_size, is_training=True, ...)`` with these values, the run's
    input size and its mean/std; the defaults are ``create_transform``'s own. Mixup/CutMix are
    batch-level and work on any data: ``finetune: mixup:`` (:class:`rmtp.training.MixupConfig`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    auto_augment: str | None = Field(None, description="timm policy: rand-m9-mstd0.5-inc1 (RandAugment), "
                                                       "augmix-m5-w4-d2, original, v0, 3a; null: none")
    re_prob: float = Field(0.0, ge=0.0, le=1.0, description="random erasing probability")
    re_mode: Literal["const", "rand", "pixel"] = Field("const", description="random erasing fill")
    re_count: int = Field(1, ge=1, le=16, description="random erasing regions per image")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="horizontal flip probability")
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="vertical flip probability")
    color_jitter: float | tuple[float, float, float] | tuple[float, float, float, float] | None = Field(
        0.4, description="brightness, contrast, saturation (and hue) factors, or one for the first three; "
                         "timm skips it when auto_augment is set (except 3a)")
    scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop: area range")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random resized crop: aspect ratio range")
    interpolation: TrainInterpolation | None = Field(
        None, description="random resized crop interpolation; null: the data's (data.interpolation, else the "
                          "model's pretrained config)")

    @field_validator("auto_augment")
    @classmethod
    def _timm_policy(cls, value: str | None) -> str | None:
        if not value:
            return None
        from timm.data import auto_augment

        build = (auto_augment.rand_augment_transform if value.startswith("rand") else
                 auto_augment.augment_and_mix_transform if value.startswith("augmix") else
                 auto_augment.auto_augment_transform)
        try:
            build(value, {"translate_const": 100, "img_mean": (124, 116, 104)})
        except (AssertionError, KeyError, ValueError, IndexError, TypeError) as exc:  # timm's parsers assert
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise problem(f"timm cannot read the auto_augment policy ({reason}); e.g. rand-m9-mstd0.5-inc1, "
                           "augmix-m5-w4-d2, original, v0, 3a") from None
        return value

    @field_validator("color_jitter", mode="before")
    @classmethod
    def _jitter(cls, value: Any) -> Any:
        numbers = [value] if isinstance(value, (int, float)) else value
        if value is not None and (isinstance(value, bool) or not isinstance(numbers, (list, tuple))
                                  or len(numbers) not in (1, 3, 4)
                                  or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                             for v in numbers)):
            raise problem("color_jitter takes one factor (brightness, contrast, saturation), three, or four "
                           "(with hue), each >= 0; null: none")
        return numbers[0] if isinstance(numbers, (list, tuple)) and len(numbers) == 1 else value

    @field_validator("scale", "ratio")
    @classmethod
    def _range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high or (info.field_name == "scale" and high > 1):
            bound = "0 < low <= high <= 1" if info.field_name == "scale" else "0 < low <= high"
            raise problem(f"{info.field_name} is a [low, high] range with {bound}")
        return value


def train_transform(augment: TrainAugment, transforms: ImageTransforms) -> Any:
    """timm's training transform at ``transforms``' input size and mean/std, with ``augment``'s values
    (its interpolation, else the eval one: ``data.interpolation`` or the model's pretrained config)."""
    import timm.data

    return timm.data.create_transform(
        transforms.input_size, is_training=True, scale=augment.scale, ratio=augment.ratio, hflip=augment.hflip,
        vflip=augment.vflip, color_jitter=augment.color_jitter, auto_augment=augment.auto_augment,
        interpolation=augment.interpolation or transforms.interpolation, mean=transforms.mean, std=transforms.std,
        re_prob=augment.re_prob, re_mode=augment.re_mode, re_count=augment.re_count)
