"""Datasets for pruning, calibration, fine-tuning and evaluation.

``digits`` is scikit-learn's embedded ``load_digits`` (1,797 real 8×8 handwritten digits, no
download), upsampled to the model's input size: the default for the quickstart and the tests.
``imagefolder`` reads class subfolders like torchvision's ``ImageFolder``, converted to the model's
channels (greyscale or RGB) and through timm's eval transform of the model's pretrained config,
each value overridable by a ``data:`` key, or ``resize: native`` for none
(:mod:`rmtp.data.preprocessing`; the resolved values are ``DataBundle.preprocessing``). The train
split can take timm's training transform instead (``DataBundle.train_with``, :class:`TrainAugment`).
Splits are fixed by the seed, so every step of a run, and every rerun, sees the same images.
``data.unlabeled: true`` reads images without labels (every image below an imagefolder root, or
the digits with their labels dropped), for label-free work only: distillation, reconstruction,
calibration.

Data that does not fit the model (class count, channels, size, layout) is refused by
:func:`build_data` before any work; an image that cannot be decoded is only found when read, mid-run,
and is then named (:class:`ImageReadError`), from a DataLoader worker too.
"""

from __future__ import annotations

from rmtp.lazy import lazy_exports

# Lazy (PEP 562), so that a recipe, which needs only DataSpec, validates without importing torch.
_EXPORTS = {
    **dict.fromkeys(("TrainAugment", "train_transform"), "rmtp.data.augment"),
    **dict.fromkeys(("build_data", "data_input_size"), "rmtp.data.build"),
    **dict.fromkeys(("DataBundle", "UnlabeledImages", "has_length", "unlabeled_bundle"), "rmtp.data.bundle"),
    **dict.fromkeys(("DIGITS_CLASSES", "DIGITS_MEAN", "DIGITS_STD", "digits_tensors"), "rmtp.data.digits"),
    **dict.fromkeys(("class_count_problem", "model_input_size", "model_num_classes"), "rmtp.data.fit"),
    **dict.fromkeys(("IMAGE_MODES", "ImageFiles", "ImageReadError", "ImageSizeError", "imagefolder_layout",
                     "imagefolder_problems", "unlabeled_layout"), "rmtp.data.imagefolder"),
    **dict.fromkeys(("ImageTransforms", "describe_preprocessing"), "rmtp.data.preprocessing"),
    **dict.fromkeys(("CROP_MODES", "INTERPOLATIONS", "NATIVE", "UNLABELED", "DataSpec", "saved_split_seed"),
                    "rmtp.data.spec"),
    "DataError": "rmtp.errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
