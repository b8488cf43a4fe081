"""``build_data``: the train/val/calibration splits a ``data:`` section describes, shaped for a model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from rmtp.data.bundle import DataBundle
from rmtp.data.digits import DIGITS_CLASSES, digits_tensors
from rmtp.data.fit import check_class_count, check_digits_size, model_input_size
from rmtp.data.imagefolder import imagefolder_splits, native_image_size
from rmtp.data.preprocessing import digits_preprocessing
from rmtp.data.spec import NATIVE, UNLABELED, DataSpec
from rmtp.data.splits import split_indices


def data_input_size(spec: DataSpec, model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images ``spec`` gives ``model``: the digits at ``img_size``
    when set (a ResNet or ConvNeXt accepts any size, and its timm config says 224), imagefolder
    images at ``data.resize`` (with ``native``, the first image's size: :func:`build_data` tells),
    else what the model expects (:func:`model_input_size`)."""
    in_chans, height, width = model_input_size(model)
    if spec.name == "digits" and spec.img_size is not None:
        return in_chans, spec.img_size, spec.img_size
    if spec.name == "imagefolder" and spec.resize == NATIVE:
        return (in_chans, *native_image_size(spec.root, unlabeled=spec.unlabeled))
    if spec.name == "imagefolder" and spec.resize is not None:
        size = (spec.resize, spec.resize) if isinstance(spec.resize, int) else spec.resize
        return in_chans, size[0], size[1]
    return in_chans, height, width


def build_data(spec: DataSpec, model: nn.Module) -> DataBundle:
    """Build the train/val/calibration splits ``spec`` describes, shaped for ``model``.

    The splits depend on ``spec.split_seed`` only, never on a run's seed: a checkpoint trained on
    one split (the reference model: split seed 0) must be evaluated on images it has not seen,
    whatever seed a recipe fine-tunes with.

    Data that cannot fit the model (class count vs the model's head, channels, a digits size the
    model cannot take) is refused here, before any work, as a :class:`DataError`.

    ``spec.unlabeled``: every image is labelled :data:`~rmtp.data.spec.UNLABELED` (the digits' labels
    are dropped) and the bundle says so (``labeled`` False); there are no classes to check.
    """
    seed = spec.split_seed
    in_chans, height, _ = model_input_size(model)
    transforms = None
    if spec.name == "digits":
        check_digits_size(spec, model, in_chans)
        if not spec.unlabeled:
            check_class_count("data: digits", DIGITS_CLASSES, model)
        images, labels = digits_tensors(spec.img_size or height, in_chans)
        if spec.unlabeled:
            labels = torch.full_like(labels, UNLABELED)
        full: Dataset = TensorDataset(images, labels)
        train_idx, val_idx = split_indices(len(labels), spec.val_fraction, seed)
        train, val, num_classes = Subset(full, train_idx), Subset(full, val_idx), DIGITS_CLASSES
        preprocessing = digits_preprocessing(in_chans, spec.img_size or height)
    else:
        train, val, num_classes, transforms = imagefolder_splits(spec, model, seed)
        preprocessing = transforms.to_dict()
    if spec.eval_limit is not None and len(val) > spec.eval_limit:
        val = Subset(val, list(range(spec.eval_limit)))
    n_cal = min(spec.calibration_size, len(train))
    cal_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:n_cal]
    calibration = Subset(train, cal_idx.tolist())
    return DataBundle(train=train, val=val, calibration=calibration, num_classes=num_classes,
                      batch_size=spec.batch_size, num_workers=spec.num_workers, preprocessing=preprocessing,
                      transforms=transforms, labeled=not spec.unlabeled)
