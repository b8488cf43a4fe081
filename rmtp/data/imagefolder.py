"""Image folders: class subfolders like torchvision's ``ImageFolder``, read in the model's channels;
or, with ``data.unlabeled: true``, every image under the folder, sub-folders never taken as classes.

The layout is checked by folder names only (cheap on ImageNet); an image that cannot be decoded is
only found when read, mid-run, and is then named (:class:`ImageReadError`), from a DataLoader worker too.
"""

from __future__ import annotations

import copy
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from rmtp.data.fit import (
    check_class_count,
    class_count_problem,
    model_input_size,
    model_num_classes,
    model_takes,
)
from rmtp.data.preprocessing import ImageTransforms, resolve_transforms
from rmtp.data.spec import NATIVE, UNLABELED, DataSpec
from rmtp.data.splits import split_indices
from rmtp.errors import DataError

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


class ImageSizeError(ImageReadError):
    """An imagefolder file whose size differs from the others' under ``data.resize: native``
    (images are batched as they are, so every one must have the size the model was trained on)."""


def _unwrap_worker_message(message: str, cls: type) -> str:
    """The original message inside a torch worker re-raise (the last ``module.Class: ...`` line)."""
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if message.startswith("Caught ") and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    return message


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
                        f"put each class's images in its own subfolder ({folder}/<class>/{loose[0]}), or set "
                        f"data.unlabeled: true to read them as unlabeled images (distillation, reconstruct)")
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


def unlabeled_layout(root: Path) -> list[Path]:
    """The folders an unlabeled root is read from: [train, val] when it has both, else [root].

    Every image below a folder is one image of its split, whatever sub-folders it sits in (they
    are never classes). A root with only one of train/ and val/ is refused as for labelled data:
    its val images would silently become training images.
    """
    train, val = root / "train", root / "val"
    if train.is_dir() and val.is_dir():
        return [train, val]
    if train.is_dir() or val.is_dir():
        have, missing = ("train", "val") if train.is_dir() else ("val", "train")
        raise DataError(f"data.root: {root} has {have}/ but no {missing}/; add {root / missing}, "
                        f"or set data.root to {root / have} to split it by data.val_fraction")
    return [root]


def _unlabeled_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be read as unlabeled images (no image anywhere below it); None when it can."""
    if _has_image(folder):
        return None
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return (f"data.root: {folder} has no images, in it or in any folder below it "
            f"(data.unlabeled: true; looked for {', '.join(IMG_EXTENSIONS)})")


def _images_below(folder: Path) -> list[str]:
    """Every image file below ``folder`` (links followed, as torchvision does; a link back up the tree
    read once; hidden files and folders skipped), sorted by path so the split is the same on every
    machine."""
    found, seen = [], set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [name for name in dirs if not _hidden(name)]
        found.extend(os.path.join(current, name) for name in files if _is_image_name(name))
    return sorted(found)


def _class_difference(train: list[str], val: list[str]) -> str:
    parts = []
    for name, only in (("train/", sorted(set(train) - set(val))), ("val/", sorted(set(val) - set(train)))):
        if only:
            shown = ", ".join(only[:5]) + (f" and {len(only) - 5} more" if len(only) > 5 else "")
            parts.append(f"only in {name}: {shown}")
    return "; ".join(parts) or "same names, different order"


def imagefolder_problems(root: Path, model_kwargs: dict[str, Any], *, unlabeled: bool = False) -> list[str]:
    """What ``rmtp validate`` can tell cheaply about an imagefolder root and the model's kwargs:
    the layout, ``num_classes`` vs the class folders, class folders with no image (which would
    otherwise pass validation and fail when the run reads the data), an ``in_chans`` images
    cannot be given in. ``unlabeled``: the layout of unlabeled images, each folder holding one image
    at least (no classes to count)."""
    problems = []
    in_chans = model_kwargs.get("in_chans")
    if isinstance(in_chans, int) and in_chans not in IMAGE_MODES:
        problems.append(_channels_problem(root, in_chans))
    if unlabeled:
        try:
            folders = unlabeled_layout(root)
        except DataError as exc:
            return [*problems, str(exc)]
        return [*problems, *filter(None, (_unlabeled_problem(folder) for folder in folders))]
    try:
        folders, classes = imagefolder_layout(root)
    except DataError as exc:
        return [*problems, str(exc)]
    empties = [(folder, [name for name in classes if not _has_image(folder / name)]) for folder in folders]
    num_classes = model_kwargs.get("num_classes")
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and not any(e for _, e in empties):
        # counted only once every class folder holds images: advice on num_classes from a folder
        # that is not a class yet (no image in it) would be wrong
        problem = class_count_problem(f"data.root: {root}", len(classes), num_classes)
        problems.extend([problem] if problem else [])
    problems.extend(_empty_classes_problem(folder, empty) for folder, empty in empties if empty)
    return problems


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` or a folder below it (links followed, as torchvision does) holds an image.

    Stops at the first image and reads folders lazily, so on a real dataset it costs about one
    directory read per class; validation stays affordable on ImageNet.
    """
    pending, seen = [str(folder)], set()
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in seen:  # a link back up the tree
            continue
        seen.add(real)
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir():
                        pending.append(entry.path)
                    elif _is_image_name(entry.name):
                        return True
        except OSError:
            continue  # unreadable: reading the data will name it
    return False


def _empty_classes_problem(folder: Path, empty: list[str], shown: int = 5) -> str:
    """The class folders with no image, at most ``shown`` named."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    names = ", ".join(empty[:shown]) + (f" and {len(empty) - shown} more" if len(empty) > shown else "")
    return f"data.root: {folder}: no images in class folder(s) {names} (looked for {', '.join(IMG_EXTENSIONS)})"


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


def _image_mode(root: Path, in_chans: int) -> str:
    if in_chans not in IMAGE_MODES:
        raise DataError(_channels_problem(root, in_chans))
    return IMAGE_MODES[in_chans]


class ImageFiles(Dataset):
    """(image, label) pairs of image files: torchvision's ImageFolder with the classes given rather
    than scanned (so hidden folders stay out) and :class:`_ImageLoader` reading the files.

    Same attributes as ImageFolder (``classes``, ``samples``, ``targets``). ``classes=None``: every
    image below ``folder``, unlabeled (each labelled :data:`~rmtp.data.spec.UNLABELED`, no classes).
    """

    def __init__(self, folder: Path, classes: list[str] | None, transform: Any, loader: _ImageLoader,
                 native_size: tuple[int, int] | None = None) -> None:
        from torchvision.datasets.folder import make_dataset

        self.root = folder
        self.classes = list(classes or [])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        if classes is None:
            self.samples = [(path, UNLABELED) for path in _images_below(folder)]
        else:
            self.samples = make_dataset(str(folder), self.class_to_idx, is_valid_file=_is_image_path,
                                        allow_empty=True)
        self.targets = [target for _, target in self.samples]
        self.transform, self.loader = transform, loader
        #: (height, width) every image must have (``data.resize: native``), else None.
        self.native_size = native_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        image = self.loader(path)
        if self.native_size is not None and (image.height, image.width) != tuple(self.native_size):
            height, width = self.native_size
            raise ImageSizeError(f"data.resize: native: image {path} is {image.width}x{image.height} (width x height) "
                                 f"but the first one is {width}x{height}; native size needs every image at one size, "
                                 f"or set data.resize to resize them")
        return self.transform(image), target

    def with_transform(self, transform: Any) -> ImageFiles:
        """The same files and labels through another transform (one that gives every image one size)."""
        clone = copy.copy(self)
        clone.transform, clone.native_size = transform, None
        return clone


def with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """``dataset`` (:class:`ImageFiles`, or a Subset of one) with ``transform`` instead of its own."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    if isinstance(dataset, ImageFiles):
        return dataset.with_transform(transform)
    raise TypeError(f"only image files take another transform, not {type(dataset).__name__}")


def _is_image_path(path: str) -> bool:
    return _is_image_name(os.path.basename(path))


def _read_folder(folder: Path, classes: list[str], loader: _ImageLoader) -> ImageFiles:
    """The images of ``folder``'s ``classes`` (no transform yet); a class folder without images is
    refused by name."""
    dataset = ImageFiles(folder, classes, None, loader)
    empty = [classes[i] for i in sorted(set(range(len(classes))) - set(dataset.targets))]
    if empty:
        raise DataError(_empty_classes_problem(folder, empty))
    return dataset


def _read_unlabeled(folder: Path, loader: _ImageLoader) -> ImageFiles:
    """Every image below ``folder``, unlabeled; a folder without one is refused by name."""
    dataset = ImageFiles(folder, None, None, loader)
    if not dataset.samples:
        raise DataError(_unlabeled_problem(folder) or f"data.root: {folder} has no images")
    return dataset


def native_image_size(root: Path, *, unlabeled: bool = False) -> tuple[int, int]:
    """(height, width) of the first image of an imagefolder root (the one ``data.resize: native``
    takes as every image's size), found without listing the whole folder (``unlabeled``: the
    first of every image below it, in path order)."""
    if unlabeled:
        folder = unlabeled_layout(root)[0]
        images = _images_below(folder)
        if not images:
            raise DataError(_unlabeled_problem(folder) or f"data.root: {folder} has no images")
        return _image_size(images[0])
    folders, classes = imagefolder_layout(root)
    for name in classes:
        for folder, _, files in sorted(os.walk(folders[0] / name, followlinks=True)):
            for file in sorted(files):
                if _is_image_name(file):
                    return _image_size(os.path.join(folder, file))
    raise DataError(f"data.root: {folders[0]} has no images in its class folders")


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) of one image, from its header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(f"data.root: cannot read image {path}: {reason}") from exc


def _eval_size(spec: DataSpec, model: nn.Module, in_chans: int, first: ImageFiles) -> tuple[int, int]:
    """(height, width) images reach the model at: ``data.resize``, the first image's for ``native``,
    else the model's own input size (which wins over its pretrained config: a ViT built with
    img_size=384 keeps a 224 pretrained_cfg). A size the model cannot take is refused here."""
    _, height, width = model_input_size(model)
    if spec.resize is None:
        return height, width
    if spec.resize == NATIVE:
        size = _image_size(first.samples[0][0])
        problem = model_takes(model, in_chans, size)
        if problem is not None:
            raise DataError(f"data.resize: native: the model cannot take the images' own {size[1]}x{size[0]} "
                            f"({problem}); set data.resize to a size it takes ({width}x{height})")
        return size
    size = (spec.resize, spec.resize) if isinstance(spec.resize, int) else tuple(spec.resize)
    problem = model_takes(model, in_chans, size)
    if problem is not None:
        raise DataError(f"data.resize: the model cannot take {size[1]}x{size[0]} images ({problem}); remove "
                        f"data.resize to use the model's input size ({width}x{height}), or choose a size it accepts")
    return size


def imagefolder_splits(spec: DataSpec, model: nn.Module, seed: int) -> tuple[Dataset, Dataset, int, ImageTransforms]:
    """The train and val splits of ``spec.root``, the class count, and their resolved preprocessing."""
    root = spec.root
    if root is None or not root.is_dir():
        needs = "images" if spec.unlabeled else "class subfolders"
        raise DataError(f"data.root: {root} is not a folder (imagefolder needs {needs})")
    in_chans = model_input_size(model)[0]
    mode = _image_mode(root, in_chans)
    loader = _ImageLoader(mode)
    if spec.unlabeled:
        folders = unlabeled_layout(root)
        datasets = [_read_unlabeled(folder, loader) for folder in folders]
        num_classes = model_num_classes(model) or 0
    else:
        folders, classes = imagefolder_layout(root)
        check_class_count(f"data.root: {root}", len(classes), model)
        datasets = [_read_folder(folder, classes, loader) for folder in folders]
        num_classes = len(classes)
    size = _eval_size(spec, model, in_chans, datasets[0])
    native = spec.resize == NATIVE
    transforms = resolve_transforms(spec, model, in_chans, size, native=native)
    transform = transforms.eval_transform()
    for dataset in datasets:
        dataset.transform, dataset.native_size = transform, (size if native else None)
    if len(datasets) == 2:
        return datasets[0], datasets[1], num_classes, transforms
    full = datasets[0]
    train_idx, val_idx = split_indices(len(full), spec.val_fraction, seed)
    if not train_idx:
        raise DataError(f"data.root: {root} has only {len(full)} image(s): too few to split into train "
                        f"and val by data.val_fraction {spec.val_fraction}")
    return Subset(full, train_idx), Subset(full, val_idx), num_classes, transforms
