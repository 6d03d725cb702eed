"""Decoding one video in a forked child process, so a hung or crashing decoder cannot stall a worker.

decord and FFmpeg run native code that can loop forever or crash on a hostile file, and
Python cannot interrupt a thread stuck inside a C call. So each video's decoding runs in a
child forked from the worker: the child inherits everything already loaded (no imports, no
model loads; a fork costs a few milliseconds), decodes, sends its result back through a pipe
and exits. The worker waits at most `timeout_s`; then it kills the child and the video gets
an errors row. A decoder that segfaults kills only the child, and whatever memory a decoder
leaks is returned to the system when the child exits.

Arrays in the result travel out of band (pickle protocol 5): each is written once into the
pipe and read straight into a writable buffer, without an extra pickled copy.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from workers.decode import VideoDecodeError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds to wait for the rest of a result once the child has started sending it.
_TRANSFER_TIMEOUT_S = 600.0


class DecodeTimeout(VideoDecodeError):
    """Decoding a video took longer than the configured timeout; its child process was killed."""


class DecoderCrashed(VideoDecodeError):
    """The child process decoding a video died without a result (a crash inside native code)."""


def fork_available() -> bool:
    """Whether this platform can fork (Linux and macOS can; Windows cannot)."""
    return "fork" in multiprocessing.get_all_start_methods()


def run_guarded(work: Callable[[], T], timeout_s: float | None, what: str) -> T:
    """`work()` in a forked child, with its result (or exception) brought back; at most `timeout_s`.

    `what` names the video in error messages. A `timeout_s` of None or <= 0, or a platform
    without fork, runs `work` in this process (no isolation). Raises `DecodeTimeout` when the
    child is still running at the deadline (it is killed), `DecoderCrashed` when it dies
    without a result, and re-raises the child's own exception otherwise.
    """
    if not timeout_s or timeout_s <= 0 or not fork_available():
        return work()
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(work, sender), daemon=True)
    with warnings.catch_warnings():
        # Python warns that fork in a threaded process may deadlock the child; the child only
        # decodes (no locks of the worker's threads), and a deadlocked child times out anyway.
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    sender.close()  # the child holds the only writing end, so its death ends the pipe
    try:
        if not receiver.poll(timeout_s):
            _kill(child)
            raise DecodeTimeout(
                f"{what}: decoding took longer than {timeout_s:g} s and was stopped "
                "(resources.decode_timeout_s; a file that hangs the decoder, or a very long video)"
            )
        try:
            status, payload = _receive(receiver)
        except (EOFError, OSError):
            child.join(5)
            raise DecoderCrashed(f"{what}: the decoder crashed ({_exit_reason(child)})") from None
    except BaseException:
        _kill(child)
        raise
    finally:
        receiver.close()
    # The child exits by itself once its result is sent. It is not waited for here (tearing
    # down a large worker's memory map takes as long as the fork did): multiprocessing reaps
    # finished children when the next one starts, and kills daemonic ones at exit.
    if status == "error":
        raise payload
    return payload


def _child_main(work: Callable[[], Any], sender: Any) -> None:
    """In the child: run the work, send ("ok", result) or ("error", exception), exit at once."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C in the terminal reaches the parent
    try:
        outcome = ("ok", work())
    except BaseException as exc:  # noqa: BLE001 - every failure travels back to the parent
        # where it failed, for the errors table: the parent's traceback ends in run_guarded
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            exc.child_location = _location(frames[-1])
        outcome = ("error", _portable(exc))
    try:
        _send(sender, outcome)
    finally:
        sender.close()
        # skip atexit handlers and buffered output inherited from the worker (Ray's, pytest's)
        os._exit(0)


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


def _exit_reason(child: Any) -> str:
    code = child.exitcode
    if code is None:
        return "no result and still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code} without a result"
