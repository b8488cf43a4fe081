"""Recognising an allocator that ran out of memory, so commands can say so in one line.

A batch too large for the machine is a user error (``--batch``), not a bug: ``rmtp bench`` and
``rmtp export`` turn it into one line naming the batch, instead of the allocator's traceback.
"""

from __future__ import annotations

import re

import torch

__all__ = ["allocation_detail", "is_out_of_memory"]

#: How allocators say they ran out: CUDA raises torch.OutOfMemoryError; the CPU allocator a
#: RuntimeError with this text ("DefaultCPUAllocator: can't allocate memory"), or MemoryError.
OOM_MESSAGES = ("can't allocate memory", "out of memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or the error it wraps, its ``__cause__``) is an allocator running out.

    Exporters and runtimes re-raise what they hit as their own error ``from`` the original, so
    the cause is looked at too.
    """
    return any(isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OOM_MESSAGES))
        for error in _chain(exc))


def allocation_detail(exc: BaseException) -> str:
    """``tried to allocate 16.00 TiB``-style text from the allocator's message, or ``""``."""
    for error in _chain(exc):
        found = re.search(r"tried to allocate [^.(]+", str(error), flags=re.IGNORECASE)
        if found:
            return found.group(0).strip()
    return ""


def _chain(exc: BaseException | None, limit: int = 8) -> list[BaseException]:
    """``exc`` and the errors it was raised from, at most ``limit`` (a cause chain may loop)."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < limit and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__
    return chain
