"""A run's stop (SIGTERM, Ctrl-C) held back through the few lines that must run whole.

The command line's handler (`pipeline.cli`) raises a stop in the main thread wherever it is.
Raised between a video's rows and its ledger entry being queued, or between the publisher's
swap of its queue and the batch's start, it left the queue half made: a stopped run could
not publish its final row. Those lines run `whole()`: a stop that comes in them is raised
as they end. Only stops that the handler raises are held back (`handled`): Python's own
Ctrl-C, in a program calling `run_job`, is raised anywhere, and such a run publishes nothing
more, as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_held = 0  # the main thread's sections running whole, nested
_pending: list[BaseException] = []  # the stop that came in one, raised as the outermost ends
#: set while the command line's handler raises the stops
handled = threading.Event()


@contextlib.contextmanager
def whole() -> Iterator[None]:
    """Run the block with the main thread's stop held back to its end (other threads: as is)."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            raise _pending.pop()


def held(stop: BaseException) -> bool:
    """For the handler: whether `stop` is held back (raised when the section ends)."""
    if _held:
        _pending[:] = [stop]
        return True
    return False
