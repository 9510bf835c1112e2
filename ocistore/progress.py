"""Progress events a long operation reports to whoever shows them (the CLI, a UI)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class PullEvent(NamedTuple):
    """Progress of a pull, for a UI to show. ``layer`` is None for image-wide events.

    phases: resolving, resolved, waiting, downloading, verifying, unpacking,
    already-exists, done.
    """

    phase: str
    layer: str | None = None
    current: int = 0
    total: int | None = None
    message: str = ""


ProgressFn = Callable[[PullEvent], None]
