"""Decoding in a child process, so a hung or crashing decoder cannot stall a worker.

decord and FFmpeg run native code that can loop forever or crash on a hostile file, and
Python cannot interrupt a thread stuck inside a C call. So decoding runs in a child forked
from the worker, which inherits everything already loaded (no imports, no model loads),
decodes, and sends its result back through a pipe. The worker waits at most `timeout_s`;
then it kills the child and the video gets an errors row. A decoder that segfaults kills
only the child.

The child is reused: forking a worker that has torch and transformers loaded costs about
40 ms, more than decoding a short clip's sampled frames, so each worker thread keeps one
child for `CALLS_PER_CHILD` calls and forks a new one after that (whatever memory a decoder
leaked is returned to the system then), after a timeout or after a crash. Work that cannot
be pickled (a lambda) cannot be sent to a running child: it gets a child of its own. A child
that dies as a bad file makes a decoder die (`DecoderCrashed.bad_file`) is not taken at its
word: the work runs once more in a new child, and only a second crash alike is the file's.

Arrays in the result travel out of band (pickle protocol 5): each is written once into the
pipe and read straight into a writable buffer, without an extra pickled copy.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from workers.decode import VideoDecodeError
from workers.exhaustion import memory_limit_note

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds to wait for the rest of a result once the child has started sending it.
_TRANSFER_TIMEOUT_S = 600.0
#: calls a reused decode child serves before a new one is forked.
CALLS_PER_CHILD = 64


class DecodeTimeout(VideoDecodeError):
    """Decoding a video took longer than the configured timeout; its child process was killed."""


class DecoderCrashed(VideoDecodeError):
    """The child process decoding a video died without a result (a crash inside native code).

    A bad file (`VideoDecodeError.bad_file`) where it died of a signal a decoder meets on data it
    cannot handle (`_FILE_CRASHES`), in two children in a row (`run_guarded`); not where it was
    killed (SIGKILL: the kernel's out-of-memory killer, or a person) or exited by itself, which a
    later run may not meet."""


#: signals a decoder dies of where the file drives it there: a read out of bounds, an assertion
#: or allocation that fails on absurd sizes, a division by zero, a jump into garbage
_FILE_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL})


def fork_available() -> bool:
    """Whether this platform can fork (Linux and macOS can; Windows cannot)."""
    return "fork" in multiprocessing.get_all_start_methods()


def usable_cpus() -> int:
    """The cores this process may run on (a container's cpuset, taskset), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (no affinity on this platform)
        return os.cpu_count() or 1


def run_guarded(work: Callable[[], T], timeout_s: float | None, what: str) -> T:
    """`work()` in a child process, with its result (or exception) brought back; at most `timeout_s`.

    `what` names the video in error messages. A `timeout_s` of None or <= 0, or a platform
    without fork, runs `work` in this process (no isolation). Raises `DecodeTimeout` when the
    child is still running at the deadline (it is killed), `DecoderCrashed` when it dies
    without a result (where it died of a signal a bad file gives, twice: a new child runs `work`
    once more first), and re-raises the child's own exception otherwise. Pass a picklable
    `work` (a module-level function, or a `functools.partial` of one) to use the reused child.
    """
    if not timeout_s or timeout_s <= 0 or not fork_available():
        return work()
    try:
        status, payload = _run_in_child(work, timeout_s, what)
    except DecoderCrashed as crashed:
        if not crashed.bad_file:
            raise
        # the machine may have done it, not the file (an allocation failing under memory pressure
        # aborts too), and runs give up on a bad file: only a second crash alike is the file's
        log.warning("%s; decoding it once more, in a new child", crashed)
        status, payload = _run_in_child(work, timeout_s, what)
    if status == "error":
        raise payload
    return payload


def _run_in_child(work: Callable[[], T], timeout_s: float, what: str) -> tuple[str, Any]:
    """("ok", result) or ("error", the child's exception) of `work` in the reused child, or in a
    child of its own where it cannot be pickled (a closure); raises as `run_guarded` says."""
    try:
        request = pickle.dumps(work, protocol=5)
    except Exception:  # noqa: BLE001 - a closure: it runs in a child of its own
        return _run_in_new_child(work, timeout_s, what)
    return _reused_child().call(request, timeout_s, what)


class _DecodeChild:
    """A child forked once that runs pickled calls one at a time, until closed."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self.connection, child_end = context.Pipe(duplex=True)
        self.owner = os.getpid()
        self.calls = 0
        self.process = context.Process(target=_serve, args=(child_end, self.connection, self.owner), daemon=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see _run_in_new_child
            self.process.start()
        child_end.close()
        _CHILDREN.add(self)

    def call(self, request: bytes, timeout_s: float, what: str) -> tuple[str, Any]:
        self.calls += 1
        try:
            self.connection.send_bytes(request)
            if not self.connection.poll(timeout_s):
                self.close()
                raise _timeout(what, timeout_s)
            return _receive(self.connection)
        except (EOFError, OSError):
            self.process.join(5)
            crashed = _crashed(what, self.process)  # (before close, which kills one still running)
            self.close()
            raise crashed from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the child (if still running) and forget it."""
        _CHILDREN.discard(self)
        if self.owner == os.getpid():
            _kill(self.process)
        self.connection.close()


#: this process's reused children, one per thread that decodes.
_CHILDREN: set[_DecodeChild] = set()
_THREAD = threading.local()


def _reused_child() -> _DecodeChild:
    child = getattr(_THREAD, "child", None)
    if child is not None and (child.owner != os.getpid() or child.calls >= CALLS_PER_CHILD
                              or child not in _CHILDREN or not child.process.is_alive()):
        if child.owner == os.getpid():
            child.close()
        child = None
    if child is None:
        child = _THREAD.child = _DecodeChild()
    return child


def stop_children() -> None:
    """Kill this process's reused decode children (the next call forks a new one)."""
    for child in list(_CHILDREN):
        child.close()


def _forget_children_after_fork() -> None:
    """In a new child: the parent's decode children are not ours; close our copies of their pipes."""
    for child in list(_CHILDREN):
        _CHILDREN.discard(child)
        child.connection.close()


os.register_at_fork(after_in_child=_forget_children_after_fork)


def die_with(parent: int) -> None:
    """End this process when `parent` ends, even by SIGKILL.

    A pool worker: the workers share the pool's queues, so none of them sees the others' end of
    a pipe close, and a killed driver left them waiting forever (holding its stdout open). A
    decode child: no one else ends a hung decode once its worker is gone, and it holds what it
    inherited, the pool's sentinel of its worker (the driver never learnt the worker died) and
    the output's lock (every rerun was refused).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="vidlens-parent-watch", daemon=True).start()


def _as_child_of(parent: int) -> None:
    """A decode child's start: it ends with `parent`, and on Ctrl-C or SIGTERM it just ends (not
    through the worker's handlers it forked with; a Ctrl-C in the terminal reaches the parent).
    A Ctrl-C its worker ignores (a script's background job) it ignores too: it killed the videos
    being decoded, which the run went on to record as decoder crashes."""
    die_with(parent)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def _serve(connection: Any, parent_end: Any, parent: int) -> None:
    """In a reused child: run each request and send back its outcome, until the pipe closes."""
    parent_end.close()  # else this child would keep its own pipe open and never see it close
    _as_child_of(parent)
    while True:
        try:
            request = connection.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        try:
            work = pickle.loads(request)
        except BaseException as exc:  # noqa: BLE001 - reported like any failure of the work
            outcome = ("error", _portable(exc))
        else:
            outcome = _outcome(work)
        try:
            _send(connection, outcome)
        except (OSError, ValueError):
            os._exit(0)


def _run_in_new_child(work: Callable[[], Any], timeout_s: float, what: str) -> tuple[str, Any]:
    """Fork a child for this one call (work that cannot be pickled) and bring its outcome back."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(work, sender, os.getpid()), daemon=True)
    with warnings.catch_warnings():
        # Python warns that fork in a threaded process may deadlock the child; the child only
        # decodes (no locks of the worker's threads), and a deadlocked child times out anyway.
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    sender.close()  # the child holds the only writing end, so its death ends the pipe
    try:
        if not receiver.poll(timeout_s):
            _kill(child)
            raise _timeout(what, timeout_s)
        try:
            return _receive(receiver)
        except (EOFError, OSError):
            child.join(5)
            raise _crashed(what, child) from None
    except BaseException:
        _kill(child)
        raise
    finally:
        receiver.close()
    # The child exits by itself once its result is sent. It is not waited for here (tearing
    # down a large worker's memory map takes as long as the fork did): multiprocessing reaps
    # finished children when the next one starts, and kills daemonic ones at exit.


def _timeout(what: str, timeout_s: float) -> DecodeTimeout:
    return DecodeTimeout(
        f"{what}: decoding took longer than {timeout_s:g} s and was stopped "
        "(resources.decode_timeout_s; a file that hangs the decoder, or a very long video)"
    )


def _child_main(work: Callable[[], Any], sender: Any, parent: int) -> None:
    """In a one-call child: run the work, send ("ok", result) or ("error", exception), exit at once."""
    _as_child_of(parent)
    outcome = _outcome(work)
    try:
        _send(sender, outcome)
    finally:
        sender.close()
        # skip atexit handlers and buffered output inherited from the worker (Ray's, pytest's)
        os._exit(0)


def _outcome(work: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", work()) or ("error", the exception, marked with where it was raised)."""
    try:
        return "ok", work()
    except SystemExit as exc:  # a library's exit(): this video's error, never the worker's end
        return "error", VideoDecodeError(f"a library called exit({exc.code!r}) while this video was read")
    except BaseException as exc:  # noqa: BLE001 - every failure travels back to the parent
        # where it failed, for the errors table: the parent's traceback ends in run_guarded
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            exc.child_location = _location(frames[-1])
        return "error", _portable(exc)


def _send(sender: Any, outcome: tuple[str, Any]) -> None:
    buffers: list[pickle.PickleBuffer] = []
    try:
        header = pickle.dumps(outcome, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:  # noqa: BLE001 - an unpicklable result becomes a clear error
        header = pickle.dumps(("error", VideoDecodeError(f"result cannot be sent back: {exc}")))
        buffers = []
    sizes = [memoryview(b).nbytes for b in buffers]
    sender.send((header, sizes))
    for buffer in buffers:
        sender.send_bytes(memoryview(buffer).cast("B"))


def _receive(receiver: Any) -> tuple[str, Any]:
    header, sizes = receiver.recv()
    buffers = []
    for size in sizes:
        if not receiver.poll(_TRANSFER_TIMEOUT_S):
            raise EOFError("result transfer stalled")
        target = bytearray(size)  # writable, so arrays rebuilt on it are writable too
        if size:
            receiver.recv_bytes_into(target)
        else:
            receiver.recv_bytes()
        buffers.append(target)
    return pickle.loads(header, buffers=buffers)


def describe_failure(exc: BaseException) -> str:
    """One line for the errors table: the message and where it was raised (in the child, if there)."""
    message = str(exc).strip() or type(exc).__name__
    location = getattr(exc, "child_location", None)
    if location is None:
        frames = traceback.extract_tb(exc.__traceback__)
        location = _location(frames[-1]) if frames else None
    return f"{message} (at {location})" if location else message


def _location(frame: traceback.FrameSummary) -> str:
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles (keeping its type), else a VideoDecodeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - some native exceptions do not pickle
        return VideoDecodeError(f"{type(exc).__name__}: {exc}")


def _kill(child: Any) -> None:
    if child.is_alive():
        child.kill()
        deadline = time.monotonic() + 10
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.error("decode child %s did not exit after SIGKILL", child.pid)


def _crashed(what: str, child: Any) -> DecoderCrashed:
    """The error of a decode child that died without a result (joined: its exit code known)."""
    code = child.exitcode
    note = memory_limit_note()  # (an allocation that fails aborts a C++ decoder too)
    bad_file = code is not None and code < 0 and -code in _FILE_CRASHES and not note
    return DecoderCrashed(f"{what}: the decoder crashed ({_exit_reason(child)}){note}", bad_file=bad_file)


def _exit_reason(child: Any) -> str:
    code = child.exitcode
    if code is None:
        return "no result and still running"
    if code == -signal.SIGKILL:  # (said as only a signal's name, a row gave no hint what to do)
        return ("killed by signal SIGKILL, as the kernel's out-of-memory killer ends a process: give the job more "
                "memory or run fewer decode workers (resources.decode_concurrency); not counted as the file's")
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code} without a result"
