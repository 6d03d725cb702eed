"""A run's stop (SIGTERM, Ctrl-C) held back through the few lines that must run whole.

The command line's handler (`pipeline.command_stops`) raises a stop in the main thread wherever it is.
Raised between a video's rows and its ledger entry being queued, or between the publisher's
swap of its queue and the batch's start, it left the queue half made: a stopped run could
not publish its final row. Those lines run `whole()`: a stop that comes in them is raised
as they end. Only stops that the handler raises are held back (`handled`): Python's own
Ctrl-C, in a program calling `run_job`, is raised anywhere, and such a run publishes nothing
more, as before.

Once `vidlens run`'s run is at its end (its videos done, or the GPU failed), a stop is not raised
at all (`ending`): stopped there, the run would publish the same last batch, only its final row
saying `stopped`, and a stop raised inside that publishing left the runs table saying `succeeded`
(or `running`) while the command said stopped. The run goes on to its end, and the command
reports what it published. A second stop is waited through and a third ends the process at once,
as in a stopped run's cleanup (`pipeline.command_stops`): a store that does not answer is not waited for ever.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_held = 0  # the main thread's sections running whole, nested
_pending: list[BaseException] = []  # the stop that came in one, raised as the outermost ends
#: set while the command line's handler raises the stops
handled = threading.Event()
#: set once the run is at its end (`at_the_end`): the handler then lets it go on to it
ending = threading.Event()


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


def at_the_end() -> None:
    """For `vidlens run`'s run: from here it goes on to its end through a stop (`ending`, set until
    the command ends), where the command line's handler raises the stops (a program calling
    `run_job` keeps Python's Ctrl-C)."""
    if handled.is_set():
        ending.set()
