"""The defaults of a benchmark (batch sizes, timing rounds), torch-free so that ``rmtp bench --help``
can show them without loading torch."""

from __future__ import annotations

DEFAULT_BATCHES = (1, 32)
DEFAULT_ROUNDS = 16
MIN_ROUNDS = 3
