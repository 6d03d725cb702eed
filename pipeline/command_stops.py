"""How the `vidlens` command is stopped, and how its process ends.

While a command runs, SIGTERM and Ctrl-C go to `on_stop` (`handling_stops`): the first raises the
stop in the main thread (held back through the lines `pipeline.stops` runs whole, and let go where
the run is at its end), a second is waited through while the cleanup runs, a third ends the process
at once. `STOPPED` keeps their exit codes, the first's the command's. Once the command has returned,
its process ends with its exit code whatever stop comes (`keep_the_exit_code`, `shut_ray_down`), and at
once where a model thread is still inside torch (`flush_and_exit`). The Ray a command started or joined
(`pipeline.ray_cluster.ensure_ray`) is shut down before its last word (`shut_ray_down`); one this
process was connected to otherwise, its caller's (`pipeline.cli.main` used as a library), is left as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pipeline import stop_deadline, stops

#: what a stop's exit code says it was
STOP_NAMES = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "Ctrl-C"}
#: the exit codes of the stops received (SIGTERM, Ctrl-C), the first's the command's: its exception,
#: raised wherever the main thread was, is lost where that was a `__del__` (Python prints it as
#: "Exception ignored"); the run then failed on its workers' end (they stopped too) and its exit
#: said "error", 2
STOPPED: list[int] = []
#: set where the first stop came once the run was at its end (`stops.ending`), and was let go
LET_GO = threading.Event()


def stop_code() -> int | None:
    """The exit code of the stop that ended the command; None where none came, or where the run
    was at its end when the first came, and went on to it (`LET_GO`): the command then ends as
    the run did (the runs table says so), not as stopped. A stop that came before, its exception
    lost (see STOPPED), the run going on to its end all the same, is no stop let go."""
    return STOPPED[0] if STOPPED and not LET_GO.is_set() else None


def on_stop(signum: int, frame: Any) -> None:
    """The handler of SIGTERM and Ctrl-C while a command runs (`handling_stops`)."""
    if STOPPED:
        # a stop already under way: its cleanup (the workers ended, the lock given back) goes on.
        # Raised again inside it, it was cut short, and a model thread still inside torch at the
        # exit that followed aborted the process (134, "terminate called"). A third ends the
        # process at once: a cleanup that hangs (a store that does not answer), or a first stop
        # whose exception was lost (see STOPPED), is not waited for ever.
        STOPPED.append(128 + signum)
        if len(STOPPED) > 2:
            try:
                say(b"vidlens: stopped at once, its cleanup cut short\n")
            finally:
                os._exit(STOPPED[0])
        say(b"vidlens: already stopping, cleaning up (stop it once more to end it at once)\n")
        return
    STOPPED[:] = [128 + signum]
    if stops.ending.is_set():  # (a second then waited for and a third ending it, as above)
        LET_GO.set()
        say(b"vidlens: the run is publishing its last batch: it finishes that rather than stop "
            b"(stop it twice more to end it at once)\n")
        return
    pool = sys.modules.get("pipeline.cpu_pool")
    if pool is not None:  # its workers' SIGTERM is then the run's stop, not one worker's kill
        pool.DRIVER_STOPPED.set()
    stop_deadline.stopping()  # (its cleanup waits on the output's store a few seconds in all)
    stop = KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
    if not stops.held(stop):  # (else raised once the lines the run must finish whole are run)
        raise stop


def say(line: bytes) -> None:
    """Write to stderr from a signal handler: not print, which raises "reentrant call" where it
    interrupts one of the main thread's, and nothing raised where stderr is a closed pipe (a
    `| tee` ended by the same Ctrl-C), which would cut the cleanup short."""
    try:
        os.write(2, line)
    except OSError:
        pass


@contextlib.contextmanager
def handling_stops() -> Iterator[None]:
    """The command's stops handled by `on_stop` while it runs, and as they were after.

    systemd's, a scheduler's or `timeout`'s SIGTERM ends the command as Ctrl-C does, its cleanup
    run (it was killed outright, and a run from a bucket left its downloads in the temp folder).
    Ctrl-C keeps Python's KeyboardInterrupt, noted too; where it is ignored (a job started in the
    background by a script), it stays ignored. Off the main thread, nothing is handled."""
    handled = [signal.SIGTERM]
    if threading.current_thread() is not threading.main_thread():
        handled = []
    elif signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handled.append(signal.SIGINT)
    STOPPED.clear()
    LET_GO.clear()
    stops.ending.clear()
    stop_deadline.clear()
    previous = {}
    try:
        for stop in handled:
            previous[stop] = signal.signal(stop, on_stop)
        if handled:
            stops.handled.set()
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        stops.handled.clear()
        stops.ending.clear()
        stop_deadline.over()  # (a program's run after this command is not bounded by its stop)


def flush_and_exit(code: int) -> None:
    """End the process at once with `code`, what it wrote flushed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (a closed pipe: nothing more can be said)
            pass
    os._exit(code)


def ignore_stops_at_the_end() -> None:
    """Register what ignores SIGTERM and Ctrl-C in the last part of the process's exit; call it before
    the command runs, so that it runs after the exit functions registered later (torch's, Ray's,
    multiprocessing's). After them, Python gives each signal whose handler is a Python function back
    to its default as it frees its modules (torch's among them: a moment), and a stop there killed a
    stopped run by SIGTERM (-15) in place of its 143 (chaos soak, 2026-12-07); an ignored one it
    leaves ignored. Until then `keep_the_exit_code`'s handler answers."""
    def ignore() -> None:
        if threading.current_thread() is threading.main_thread():
            for stop in (signal.SIGTERM, signal.SIGINT):
                signal.signal(stop, signal.SIG_IGN)

    atexit.register(ignore)


def exit_code_of(exc: BaseException) -> int:
    """The exit code of a command that `exc` ended: a SystemExit's own (a stopped run's 143), 130 for
    a KeyboardInterrupt, 1 for anything else (a bug)."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 128 + signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1


def keep_the_exit_code(code: int) -> None:
    """From here to the process's exit, a stop (SIGTERM, Ctrl-C) changes nothing: the command has ended
    (its lock given back, its summary printed) and exits with `code`. `handling_stops` gives the
    handlers back as the command returns, and Python's exit then takes a second or more (its threads
    joined, torch's and multiprocessing's finalizers): a stop in it ended a run that had succeeded, its
    summary and `runs` row saying so, killed by SIGTERM (143 to a shell) or with a KeyboardInterrupt
    (130), and a second stop, which a stopped run's cleanup waits through, ended such a run by SIGTERM
    in place of its 143 (chaos reviews, 2026-12-07). A stop now is said and waited through, a second
    ends the process at once, with `code` either way (`_said_then_ended`, as in `shut_ray_down`)."""
    if threading.current_thread() is threading.main_thread():
        _said_then_ended(code, b"vidlens: the command has ended and is exiting (stop it once more to end it at once)\n")


def shut_ray_down(code: int, settle: Callable[[], None] | None = None) -> None:
    """End the Ray instance this thread's command started (or its connection to a cluster) before the
    exit: in Ray's own handler at the exit, SIGTERM and Ctrl-C were back to their defaults, and a stop
    in that second ended with 143 or 130 a run whose summary said it had succeeded. The run has
    ended: a stop now is said and waited through, a second ends the process at once, with the
    run's exit code either way. `settle` (a failed run's wait for Ray's last lines) is run first,
    under the same handling. Neither is run where the command did not connect this process to Ray
    (`pipeline.ray_cluster.connected_here`): not at all, or the Ray is its caller's (`pipeline.cli.main`
    used as a library), which stays connected. Never imports Ray, which a local run does not."""
    ray, ray_cluster = sys.modules.get("ray"), sys.modules.get("pipeline.ray_cluster")
    if ray_cluster is None or not ray_cluster.connected_here():
        return
    if ray is None or not ray.is_initialized():  # (shut down by its caller, say: nothing is left to end)
        ray_cluster.disconnected()
        return
    previous = _said_then_ended(code, b"vidlens: the run has ended: Ray is shutting down (stop it once more to end "
                                      b"it at once)\n")
    try:
        if settle is not None:
            settle()
        ray.shutdown()
        ray_cluster.disconnected()
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _said_then_ended(code: int, message: bytes) -> dict[int, Any]:
    """SIGTERM and Ctrl-C handled, once the command has ended, by saying `message` at a first stop and
    ending the process at once with `code` at a second; the handlers replaced, to give back. One that
    is ignored (a script's `vidlens run &`) stays so; off the main thread (`main` called there, as a
    library), where no handler can be set, none is."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    received = []

    def on_stop(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            os._exit(code)
        say(message)

    return {stop: signal.signal(stop, on_stop) for stop in (signal.SIGTERM, signal.SIGINT)
            if signal.getsignal(stop) is not signal.SIG_IGN}


def exit_at_once() -> bool:
    """Whether the process must end at once once the command has returned (`flush_and_exit`): a
    thread of the local executor's pipeline has not ended (`pipeline_threads_running`), or a stop's
    cleanup left a step on the output's store undone, maybe still running (`stop_deadline.LEFT`):
    Python's exit joins the publisher's threads, which would wait out the store's retries that the
    stop no longer waits for."""
    return pipeline_threads_running() or bool(stop_deadline.LEFT)


def pipeline_threads_running() -> bool:
    """Whether a thread of the local executor's pipeline (`pipeline.local`) has not ended yet
    (imported only where a run imported it)."""
    local = sys.modules.get("pipeline.local")
    return local is not None and any(thread.name.startswith(local.THREAD_PREFIX) and thread.is_alive()
                                     for thread in threading.enumerate())
