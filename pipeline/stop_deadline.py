"""A stopped command's cleanup on its output's store, bounded in time.

Stopped (SIGTERM, Ctrl-C), a run publishes the videos it finished and its final row, waits for
the batches being published and gives its lock back: each a few requests to the output's store.
A bucket that did not answer had each of them retried by its client (botocore: 5 attempts with
backoff, each waiting up to 60 s for an answer): a run stopped with its S3 refusing connections
took 37 s to end, one whose S3 accepted them and never answered had not ended 400 s after the
stop, past any supervisor's grace period (Kubernetes': 30 s) (`docs/robustness.md`). The stop's
cleanup now waits on the store `CLEANUP_S` in all (`waited`), from its first step: what it has
not finished by then is left as a killed run leaves it, which the next command finishes
(`pipeline.recovery`) or takes over (the lock, once stale), and `LEFT` says what, for the stopped
line. No step starts after one left running: the lock is not given back under a batch still being
published. Only a stop the command's handler raised is under way here (`pipeline.command_stops`);
the normal path, and Python's own Ctrl-C in a program calling `run_job`, wait as before: there the
store's retries are what carries a run through a store's hiccup, and so does a run after the stopped
command in the same process (`over`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: seconds a stop's cleanup waits on the output's store, in all, from its first step
CLEANUP_S = 5.0

_stopping = threading.Event()  # a stop is under way: the cleanup's steps are bounded
#: a step of the cleanup was left running: none starts after it (not the lock's giving back under a
#: batch still publishing), whatever a clock says of the time left
_left_running = threading.Event()
_deadline: list[float] = []  # when the steps stop being waited for (time.monotonic()), set at the first
#: what the stop's cleanup left undone, as the stopped line says it
LEFT: list[str] = []


def stopping() -> None:
    """A stop is under way (the command's handler, at the first)."""
    _stopping.set()


def clear() -> None:
    """No stop under way, nothing left (a command's start)."""
    over()
    LEFT.clear()
    _left_running.clear()


def over() -> None:
    """The stopped command is over (`command_stops.handling_stops`' end): a run after it in the same
    process (a program calling `run_job` once `pipeline.cli.main` returned) waits on its store as
    ever: until 2026-12-08 the stop's deadline stayed, past, and such a run left its lock at once,
    naming a live process, which no job could take for 600 s. `LEFT` stays, for the command's exit
    (`command_stops.exit_at_once`)."""
    _stopping.clear()
    _deadline.clear()


def time_left() -> float | None:
    """Seconds the stop's cleanup still waits on the store (0 once past: a step left running is left
    at that time, so none starts after it); None where no stop is under way. The first call during a
    stop starts the clock."""
    if not _stopping.is_set():
        return None
    if not _deadline:
        _deadline.append(time.monotonic() + CLEANUP_S)
    return max(0.0, _deadline[0] - time.monotonic())


def waited(step: Callable[[], None], left: str) -> bool:
    """Run a step of the cleanup on the output's store: at once where no stop is under way; during
    one, on a thread of its own, waited for `time_left()`. False where it was not done in that time
    (or not started: the time was up), `left` (what it leaves undone) then noted in `LEFT`; a step
    that failed notes it too, and raises its error."""
    wait = time_left()
    if wait is None:
        step()
        return True
    if wait <= 0 or _left_running.is_set():
        LEFT.append(left)
        return False
    done, raised = threading.Event(), []

    def run() -> None:
        try:
            step()
        except BaseException as exc:  # noqa: BLE001 - raised in the waiting thread
            raised.append(exc)
        finally:
            done.set()

    # a daemon: a step left running does not hold the process's exit
    threading.Thread(target=run, daemon=True, name="vidlens-stop-cleanup").start()
    if not done.wait(wait):
        _left_running.set()
        LEFT.append(left)
        return False
    if raised:
        LEFT.append(left)
        raise raised[0]
    return True


def left_said() -> str:
    """What the stop's cleanup left undone, a sentence for the stopped line ("" where nothing)."""
    if not LEFT:
        return ""
    return (f"Its cleanup could not finish on the output's store within {CLEANUP_S:.0f} s, and left, as a killed job "
            f"does: {'; '.join(dict.fromkeys(LEFT))}")
