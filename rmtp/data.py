"""Datasets for pruning, calibration, fine-tuning and evaluation.

``digits`` is scikit-learn's embedded ``load_digits`` (1,797 real 8×8 handwritten digits, no
download), upsampled to the model's input size: the default for the quickstart and the tests.
``imagefolder`` reads class subfolders like torchvision's ``ImageFolder``, converted to the model's
channels (greyscale or RGB) and through timm's eval transform for the model.
Splits are fixed by the seed, so every step of a run, and every rerun, sees the same images.

Data that does not fit the model (class count, channels, size, layout) is refused by
:func:`build_data` before any work; an image that cannot be decoded is only found when read, mid-run,
and is then named (:class:`ImageReadError`), from a DataLoader worker too.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from rmtp.errors import DataError

#: Normalisation of the digits images (pixel values scaled to [0, 1] first).
DIGITS_MEAN = 0.5
DIGITS_STD = 0.5
#: The digits are ten classes, 0-9.
DIGITS_CLASSES = 10
#: PIL mode an imagefolder image is converted to, by the model's input channels.
IMAGE_MODES = {1: "L", 3: "RGB"}
#: What PIL raises for a file it cannot identify or decode (UnidentifiedImageError and truncated
#: files are OSErrors; bad PNG chunks are SyntaxErrors; bad headers struct/zlib errors).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageReadError(DataError):
    """An imagefolder file that cannot be decoded, named with its path.

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    ``ImageReadError("Caught ImageReadError in DataLoader worker process 0. Original Traceback
    ...")``; the constructor keeps only the original one-line message, so wherever the loader was
    made (``DataBundle.loader``, the fine-tuning loop's own), the CLI prints one red line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_unwrap_worker_message(message, type(self)))


def _unwrap_worker_message(message: str, cls: type) -> str:
    """The original message inside a torch worker re-raise (the last ``module.Class: ...`` line)."""
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if message.startswith("Caught ") and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    return message


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


@dataclass
class DataBundle:
    """The three fixed splits of a run."""

    train: Dataset
    val: Dataset
    calibration: Dataset
    num_classes: int
    batch_size: int
    num_workers: int = 0

    def loader(self, split: Literal["train", "val", "calibration"], *, shuffle: bool = False,
               seed: int = 0, batch_size: int | None = None) -> DataLoader:
        dataset = {"train": self.train, "val": self.val, "calibration": self.calibration}[split]
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=generator, num_workers=self.num_workers)


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model expects, from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)  # timm ViTs built with img_size=...
    in_chans = _first_conv_in_channels(model)
    if img_size is not None:
        return in_chans, int(img_size[0]), int(img_size[1])
    if size is not None:
        return in_chans, int(size[1]), int(size[2])
    return in_chans, 224, 224


def _first_conv_in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def digits_tensors(img_size: int, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as a normalised float tensor (N, in_chans, img_size, img_size) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear",
                                             align_corners=False)
    images = ((images - DIGITS_MEAN) / DIGITS_STD).repeat(1, in_chans, 1, 1)
    return images, torch.tensor(digits.target, dtype=torch.long)


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


def data_input_size(spec: DataSpec, model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images ``spec`` gives ``model``: the digits at ``img_size``
    when set (a ResNet or ConvNeXt accepts any size, and its timm config says 224), else what the
    model expects (:func:`model_input_size`, which imagefolder transforms follow too)."""
    in_chans, height, width = model_input_size(model)
    if spec.name == "digits" and spec.img_size is not None:
        return in_chans, spec.img_size, spec.img_size
    return in_chans, height, width


def saved_split_seed(recipe: dict) -> object:
    """The split seed of a saved, resolved recipe (a dict as read from ``recipe.yaml``).

    ``data.split_seed`` when present; recipes saved before it existed split by the run's ``seed``.
    Returned unvalidated (callers report a bad value in their own words).
    """
    data = recipe.get("data") or {}
    if isinstance(data, dict) and "split_seed" in data:
        return data["split_seed"]
    return recipe.get("seed", 0)


def build_data(spec: DataSpec, model: nn.Module) -> DataBundle:
    """Build the train/val/calibration splits ``spec`` describes, shaped for ``model``.

    The splits depend on ``spec.split_seed`` only, never on a run's seed: a checkpoint trained on
    one split (the reference model: split seed 0) must be evaluated on images it has not seen,
    whatever seed a recipe fine-tunes with.

    Data that cannot fit the model (class count vs the model's head, channels, a digits size the
    model cannot take) is refused here, before any work, as a :class:`DataError`.
    """
    seed = spec.split_seed
    in_chans, height, _ = model_input_size(model)
    if spec.name == "digits":
        _check_digits_size(spec, model, in_chans)
        _check_class_count("data: digits", DIGITS_CLASSES, model)
        images, labels = digits_tensors(spec.img_size or height, in_chans)
        full: Dataset = TensorDataset(images, labels)
        train_idx, val_idx = _split_indices(len(labels), spec.val_fraction, seed)
        train, val, num_classes = Subset(full, train_idx), Subset(full, val_idx), DIGITS_CLASSES
    else:
        train, val, num_classes = _imagefolder_splits(spec, model, seed)
    if spec.eval_limit is not None and len(val) > spec.eval_limit:
        val = Subset(val, list(range(spec.eval_limit)))
    n_cal = min(spec.calibration_size, len(train))
    cal_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:n_cal]
    calibration = Subset(train, cal_idx.tolist())
    return DataBundle(train=train, val=val, calibration=calibration, num_classes=num_classes,
                      batch_size=spec.batch_size, num_workers=spec.num_workers)


def model_num_classes(model: nn.Module) -> int | None:
    """Outputs of the model's classifier head (timm's ``num_classes``, else the head layer's width);
    None when it cannot be told."""
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    return None


def class_count_problem(where: str, data_classes: int, model_classes: int | None) -> str | None:
    """The message for data with ``data_classes`` classes on a head of ``model_classes`` outputs.

    Both ways fail badly if let through: more classes than outputs is an IndexError in the loss,
    fewer is a run that "succeeds" with logits no label can reach.
    """
    if model_classes is None or model_classes == data_classes:
        return None
    if model_classes == 0:
        return (f"{where} has {data_classes} classes but the model has no classifier head "
                f"(num_classes 0); set model.kwargs.num_classes: {data_classes}")
    return (f"{where} has {data_classes} classes but the model's head has {model_classes} outputs; "
            f"set model.kwargs.num_classes: {data_classes}, or use data with {model_classes} classes")


def _check_class_count(where: str, data_classes: int, model: nn.Module) -> None:
    problem = class_count_problem(where, data_classes, model_num_classes(model))
    if problem is not None:
        raise DataError(problem)


def _check_digits_size(spec: DataSpec, model: nn.Module, in_chans: int) -> None:
    """Refuse a ``data.img_size`` the model cannot take, by one forward pass of a blank image.

    Conv nets take most sizes but not every one (a ConvNeXt needs 32 px), a ViT only its own
    ``img_size``; a trial forward is the one check that knows every model. Skipped at the model's
    own input size, which always fits.
    """
    if spec.img_size is None:
        return
    _, height, width = model_input_size(model)
    side = spec.img_size
    if (side, side) == (height, width):
        return
    param = next(model.parameters(), None)
    blank = torch.zeros(1, in_chans, side, side, device=param.device if param is not None else "cpu")
    # Modes restored module by module: a part the caller froze in eval stays in eval.
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(blank)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"data.img_size: the model cannot take {side}x{side} digits ({reason}); "
                        f"remove data.img_size to use the model's input size ({height}x{width}), "
                        f"or choose a size it accepts") from None
    finally:
        for module, training in modes.items():
            module.training = training


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except OSError as exc:  # unreadable (permissions), vanished, not a folder
        raise DataError(f"data.root: cannot list {folder}: {exc.strerror or exc}") from None


def _class_folders(folder: Path) -> list[str]:
    """The class subfolders of ``folder``, sorted; hidden ones (.ipynb_checkpoints, .git) are not
    classes: torchvision would count them and shift every label."""
    return sorted(e.name for e in _entries(folder) if e.is_dir() and not _hidden(e.name))


def _require_classes(folder: Path) -> list[str]:
    classes = _class_folders(folder)
    if classes:
        return classes
    loose = [e.name for e in _entries(folder) if e.is_file() and _is_image_name(e.name)]
    if loose:
        raise DataError(f"data.root: {folder} holds images but no class subfolders; "
                        f"put each class's images in its own subfolder ({folder}/<class>/{loose[0]})")
    raise DataError(f"data.root: {folder} is empty or has no class subfolders with images")


def _is_image_name(name: str) -> bool:
    """An image by its extension, like torchvision's; hidden files are not (macOS copies leave
    ``._name.png`` resource forks that no decoder reads)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return not _hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


def imagefolder_layout(root: Path) -> tuple[list[Path], list[str]]:
    """(the folders to read: [train, val] or [root], the class names) of an imagefolder root.

    Lists folders only, never images, so ``rmtp validate`` can afford it on ImageNet. Refuses a
    root with only one of train/ and val/ (it would be read as one folder with a class called
    "train"), and train/ and val/ with different class folders (labels would mean different things).
    """
    train, val = root / "train", root / "val"
    if train.is_dir() and val.is_dir():
        train_classes, val_classes = _require_classes(train), _require_classes(val)
        if train_classes != val_classes:
            raise DataError(f"data.root: {train} and {val} have different class folders "
                            f"({_class_difference(train_classes, val_classes)})")
        return [train, val], train_classes
    if train.is_dir() or val.is_dir():
        have, missing = ("train", "val") if train.is_dir() else ("val", "train")
        raise DataError(f"data.root: {root} has {have}/ but no {missing}/; add {root / missing}, "
                        f"or set data.root to {root / have} to split it by data.val_fraction")
    return [root], _require_classes(root)


def _class_difference(train: list[str], val: list[str]) -> str:
    parts = []
    for name, only in (("train/", sorted(set(train) - set(val))), ("val/", sorted(set(val) - set(train)))):
        if only:
            shown = ", ".join(only[:5]) + (f" and {len(only) - 5} more" if len(only) > 5 else "")
            parts.append(f"only in {name}: {shown}")
    return "; ".join(parts) or "same names, different order"


def imagefolder_problems(root: Path, model_kwargs: dict[str, Any]) -> list[str]:
    """What ``rmtp validate`` can tell cheaply about an imagefolder root and the model's kwargs:
    the layout, ``num_classes`` vs the class folders, an ``in_chans`` images cannot be given in."""
    problems = []
    in_chans = model_kwargs.get("in_chans")
    if isinstance(in_chans, int) and in_chans not in IMAGE_MODES:
        problems.append(_channels_problem(root, in_chans))
    try:
        _, classes = imagefolder_layout(root)
    except DataError as exc:
        return [*problems, str(exc)]
    num_classes = model_kwargs.get("num_classes")
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        problem = class_count_problem(f"data.root: {root}", len(classes), num_classes)
        problems.extend([problem] if problem else [])
    return problems


def _channels_problem(root: Path | None, in_chans: int) -> str:
    return (f"data.root: {root}: imagefolder images are read as greyscale (1 channel) or RGB (3), "
            f"but the model takes {in_chans} channels (model.kwargs.in_chans: {in_chans}); use 1 or 3")


class _ImageLoader:
    """Open, decode and convert one image to the model's mode; a file that cannot be decoded is an
    :class:`ImageReadError` naming it, not PIL's traceback mid-run. A class, so workers can pickle it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Any:
        from PIL import Image

        try:
            with open(path, "rb") as file:
                return Image.open(file).convert(self.mode)
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ImageReadError(f"data.root: cannot read image {path}: {reason}") from exc


def _normalisation(config: dict[str, Any], in_chans: int) -> dict[str, Any]:
    """timm's config with one mean/std value per input channel.

    Pretrained configs give three (RGB) values; a greyscale model gets their plain average
    (ImageNet: mean 0.449, std 0.226), a neutral choice since greyscale is a mix of the three.
    """
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if in_chans == 1 and len(mean) != 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return {**config, "mean": mean, "std": std}


def _image_mode(root: Path, in_chans: int) -> str:
    if in_chans not in IMAGE_MODES:
        raise DataError(_channels_problem(root, in_chans))
    return IMAGE_MODES[in_chans]


class ImageFiles(Dataset):
    """(image, label) pairs of image files: torchvision's ImageFolder with the classes given rather
    than scanned (so hidden folders stay out) and :class:`_ImageLoader` reading the files.

    Same attributes as ImageFolder (``classes``, ``samples``, ``targets``).
    """

    def __init__(self, folder: Path, classes: list[str], transform: Any, loader: _ImageLoader) -> None:
        from torchvision.datasets.folder import make_dataset

        self.root = folder
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = make_dataset(str(folder), self.class_to_idx, is_valid_file=_is_image_path, allow_empty=True)
        self.targets = [target for _, target in self.samples]
        self.transform, self.loader = transform, loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target


def _is_image_path(path: str) -> bool:
    return _is_image_name(os.path.basename(path))


def _read_folder(folder: Path, classes: list[str], transform: Any, loader: _ImageLoader) -> Dataset:
    """The images of ``folder``'s ``classes``; a class folder without images is refused by name."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    dataset = ImageFiles(folder, classes, transform, loader)
    empty = [classes[i] for i in sorted(set(range(len(classes))) - set(dataset.targets))]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"data.root: {folder}: no images in class folder(s) {shown} "
                        f"(looked for {', '.join(IMG_EXTENSIONS)})")
    return dataset


def _imagefolder_splits(spec: DataSpec, model: nn.Module, seed: int) -> tuple[Dataset, Dataset, int]:
    import timm.data

    root = spec.root
    if root is None or not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder (imagefolder needs class subfolders)")
    input_size = model_input_size(model)
    mode = _image_mode(root, input_size[0])
    folders, classes = imagefolder_layout(root)
    _check_class_count(f"data.root: {root}", len(classes), model)
    # The model's own input size wins over its pretrained config (a ViT built with img_size=384
    # keeps a 224 pretrained_cfg).
    config = _normalisation(timm.data.resolve_data_config({"input_size": input_size}, model=model), input_size[0])
    transform = timm.data.create_transform(**config, is_training=False)
    loader = _ImageLoader(mode)
    if len(folders) == 2:
        train, val = (_read_folder(folder, classes, transform, loader) for folder in folders)
        return train, val, len(classes)
    full = _read_folder(root, classes, transform, loader)
    train_idx, val_idx = _split_indices(len(full), spec.val_fraction, seed)
    if not train_idx:
        raise DataError(f"data.root: {root} has only {len(full)} image(s): too few to split into train "
                        f"and val by data.val_fraction {spec.val_fraction}")
    return Subset(full, train_idx), Subset(full, val_idx), len(classes)
