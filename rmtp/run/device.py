"""The one device resolver: a user's device name to a ``torch.device`` this machine can run.

The recipe's ``device:``, ``rmtp bench --device`` and every measuring function in
:mod:`rmtp.measure` go through :func:`resolve_device`, so a machine without the device is refused
with the same line everywhere; each caller names its own option (``option="device:"``,
``option="--device"``) so the line says how to fix it there.
"""

from __future__ import annotations

import torch

from rmtp.errors import DeviceError

__all__ = ["DeviceLike", "resolve_device"]

DeviceLike = str | torch.device


def resolve_device(device: DeviceLike, *, option: str | None = None) -> torch.device:
    """Parse ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, a ``torch.device``, or ``auto``: CUDA
    when torch sees a GPU, else CPU) and refuse, with one :class:`~rmtp.errors.DeviceError` line, a
    device this machine cannot run.

    ``option`` is how the caller's user sets the device (``"device:"`` in a recipe, ``"--device"``
    on the command line); when given, the refusal ends ``; run with <option> cpu``.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {device!r} is not a valid torch device ({exc})" + _fix(option)) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} requested but CUDA is not available on this machine"
                              + _fix(option))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)" + _fix(option))
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} requested but MPS is not available on this machine" + _fix(option))
    return dev


def _fix(option: str | None) -> str:
    return f"; run with {option} cpu" if option else ""
