"""Progress reporting without printing: the library calls a :class:`Progress`, the CLI draws it.

Library code that loops for more than a second takes a ``Progress`` and wraps its loop in
``with progress.task("what", total=n) as advance: ... advance()``. The default does nothing, so
scripted use stays silent; the CLI passes a rich-backed implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    """No-op progress: the base for real implementations and the default for library callers."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        yield lambda advance=1, **fields: None

    def note(self, message: str) -> None:
        """One line a run tells as it goes (``resuming from ... at step 2 of 3``); the library
        never prints, so this is where such a line goes. Ignored by default."""


NULL_PROGRESS = Progress()
