"""The one autocast policy: ``fp32`` (off), ``bf16`` (CPU and CUDA), ``fp16`` (CUDA only).

Fine-tuning, evaluation and the calibration passes of pruners that run the model take the same
``precision`` key and go through :func:`autocast`, so a model is measured in the precision it is
trained in. Weights stay fp32 (autocast casts per op); logits that feed a loss or an argmax are
compared in fp32.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal

from rmtp.errors import RmtpError

if TYPE_CHECKING:  # recipes name precisions before torch is imported (rmtp validate stays fast)
    import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def check_precision(precision: str, device: torch.device, *, option: str) -> None:
    """Refuse, in one line naming ``option``, a precision this device cannot run."""
    if precision not in PRECISIONS:
        raise RmtpError(f"{option}: unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise RmtpError(f"{option}: fp16 needs a CUDA device (got {device}); on the CPU use bf16")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device``'s type (a no-op context for fp32)."""
    import torch

    dtype = _DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
