"""Datasets for pruning, calibration, fine-tuning and evaluation.

``digits`` is scikit-learn's embedded ``load_digits`` (1,797 real 8×8 handwritten digits, no
download), upsampled to the model's input size: the default for the quickstart and the tests.
``imagefolder`` reads class subfolders like torchvision's ``ImageFolder``, converted to the model's
channels (greyscale or RGB) and through timm's eval transform of the model's pretrained config,
each value overridable by a ``data:`` key, or ``resize: native`` for none
(:mod:`rmtp.data.preprocessing`; the resolved values are ``DataBundle.preprocessing``). The train
split can take timm's training transform instead (``DataBundle.train_with``, :class:`TrainAugment`).
Splits are fixed by the seed, so every step of a run, and every rerun, sees the same images.

Data that does not fit the model (class count, channels, size, layout) is refused by
:func:`build_data` before any work; an image that cannot be decoded is only found when read, mid-run,
and is then named (:class:`ImageReadError`), from a DataLoader worker too.
"""

from rmtp.data.augment import TrainAugment, train_transform
from rmtp.data.build import build_data, data_input_size
from rmtp.data.bundle import DataBundle
from rmtp.data.digits import DIGITS_CLASSES, DIGITS_MEAN, DIGITS_STD, digits_tensors
from rmtp.data.fit import class_count_problem, model_input_size, model_num_classes
from rmtp.data.imagefolder import (
    IMAGE_MODES,
    ImageFiles,
    ImageReadError,
    ImageSizeError,
    imagefolder_layout,
    imagefolder_problems,
)
from rmtp.data.preprocessing import ImageTransforms, describe_preprocessing
from rmtp.data.spec import (
    CROP_MODES,
    INTERPOLATIONS,
    NATIVE,
    DataSpec,
    saved_split_seed,
)
from rmtp.errors import DataError

__all__ = [
    "CROP_MODES",
    "DIGITS_CLASSES",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGE_MODES",
    "INTERPOLATIONS",
    "NATIVE",
    "DataBundle",
    "DataError",
    "DataSpec",
    "ImageFiles",
    "ImageReadError",
    "ImageSizeError",
    "ImageTransforms",
    "TrainAugment",
    "build_data",
    "class_count_problem",
    "data_input_size",
    "describe_preprocessing",
    "digits_tensors",
    "imagefolder_layout",
    "imagefolder_problems",
    "model_input_size",
    "model_num_classes",
    "saved_split_seed",
    "train_transform",
]
