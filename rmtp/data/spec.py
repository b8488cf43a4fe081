"""The ``data:`` section of a recipe (:class:`DataSpec`) and what saved recipes say about it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DataSpec(BaseModel):
    """The ``data:`` section of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["digits", "imagefolder"] = "digits"
    root: Path | None = Field(None, description="imagefolder: a folder with train/ and val/ subfolders, or one folder to split")
    img_size: int | None = Field(None, ge=8, le=1024, description="digits: side to upsample to (default: the model's input size)")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share held out for validation when the data has no val/ folder")
    calibration_size: int = Field(256, ge=1, description="images from the train split that pruners needing calibration see")
    batch_size: int = Field(64, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    eval_limit: int | None = Field(None, ge=1, description="evaluate on at most this many val images (quick checks)")
    split_seed: int = Field(0, ge=0, description="seed of the train/val split and the calibration subset; "
                                                  "independent of the recipe's seed, so changing the run's "
                                                  "seed never moves images between train and val")



def saved_split_seed(recipe: dict) -> object:
    """The split seed of a saved, resolved recipe (a dict as read from ``recipe.yaml``).

    ``data.split_seed`` when present; recipes saved before it existed split by the run's ``seed``.
    Returned unvalidated (callers report a bad value in their own words).
    """
    data = recipe.get("data") or {}
    if isinstance(data, dict) and "split_seed" in data:
        return data["split_seed"]
    return recipe.get("seed", 0)
