"""scikit-learn's embedded digits (1,797 real 8×8 images, no download), upsampled to the model's size."""

from __future__ import annotations

import torch

#: Normalisation of the digits images (pixel values scaled to [0, 1] first).
DIGITS_MEAN = 0.5
DIGITS_STD = 0.5
#: The digits are ten classes, 0-9.
DIGITS_CLASSES = 10


def digits_tensors(img_size: int, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as a normalised float tensor (N, in_chans, img_size, img_size) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear",
                                             align_corners=False)
    images = ((images - DIGITS_MEAN) / DIGITS_STD).repeat(1, in_chans, 1, 1)
    return images, torch.tensor(digits.target, dtype=torch.long)
