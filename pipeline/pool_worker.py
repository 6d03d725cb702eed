"""What runs in a pool worker process of the local executor (`pipeline.cpu_pool`): its start,
the stages of each group, one video at a time, and how it ends when stopped.

Stopped with the driver (SIGTERM, Ctrl-C), a worker ends with its download deleted, never in
the middle of sending a result (`_stop_worker`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, NoReturn

from pipeline.log_relay import send_logs_to
from schemas.config import RunConfig
from workers.frame_sources import share_threads
from workers.guard import die_with
from workers.stage import Stage, build_stage
from workers.task import StageError, VideoTask

#: in a pool worker: the stage objects of each group, built once by `build_worker_stages`.
_WORKER_GROUPS: list[tuple[Stage, ...]] = []


def start_worker(config: RunConfig, groups: list[tuple[str, ...]], parent: int | None, threads: int,
                 preparers: dict | None, logs: Any, log_level: int) -> None:
    """In a new pool worker: follow its parent if it dies, log through the driver, take its share
    of threads, build the stages; delete its last video's download when it ends (a pool's worker
    ends without running `atexit`: each run left one video a worker in the temp folder)."""
    from multiprocessing import util

    from workers.remote_copy import drop_download

    die_with(parent if parent is not None else os.getppid())
    util.Finalize(None, drop_download, exitpriority=0)
    stop_on_signals()
    send_logs_to(logs, log_level)
    share_threads(threads, opencv=False)  # forked: setting OpenCV's threads can deadlock here
    build_worker_stages(config, groups, preparers)


def build_worker_stages(config: RunConfig, groups: list[tuple[str, ...]], preparers: dict | None) -> None:
    """Build the stages of each group (their targets) for this process's `run_group` calls."""
    _WORKER_GROUPS[:] = [tuple(build_stage(target, config, preparers) for target in group) for group in groups]


#: in a pool worker (`start_worker`), not on the driver's threads ("thread" start method).
_POOL_WORKER = False
#: in a pool worker, while it runs a video's stages (its own code, not multiprocessing's).
_IN_VIDEO = False
#: in a pool worker stopped by a signal: its exit code, and until when it may finish a send.
_STOPPED: int | None = None
_SEND_UNTIL = 0.0
#: seconds a stopped worker may take to finish writing a result: one the driver still reads
#: takes a fraction of that; past it the driver is not reading (its pool broken), and the
#: worker, waiting on the pipe for good, kept its pool's end (and the driver's exit) waiting.
SEND_GRACE_S = 5.0


def stop_on_signals() -> None:
    """In a new pool worker: stopped with its driver (SIGTERM to the group, as systemd does;
    Ctrl-C in a terminal), it ends with its download deleted (killed outright, it left it
    behind). A Ctrl-C its driver ignores (a script's background job) it ignores too."""
    global _POOL_WORKER

    _POOL_WORKER = True
    signal.signal(signal.SIGTERM, _stop_worker)  # (a forkserver's worker comes with it ignored)
    signal.signal(signal.SIGALRM, _stop_worker)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _stop_worker)


def _stop_worker(signum: int, frame: Any) -> None:
    """A pool worker's SIGTERM and SIGINT (and its SIGALRM, set here): the worker ends, its
    download deleted, never in the middle of writing a video's result to its driver.

    Within a video's stages, as SystemExit, so that their cleanups run (a download being made is
    deleted, a decode child killed) before `run_group` ends the worker. Writing a result, it
    looks again every 50 ms until the result is written (`SEND_GRACE_S` at most): a worker ended
    midway left the driver reading the rest of it forever. Anywhere else (waiting for the next
    video, pickling a result, waiting for the result pipe's lock) it ends at once. Not as
    SystemExit there: raised inside multiprocessing's code (just after it took its result
    queue's lock, say), the exception left that lock held, by a worker that went on running, and
    the other workers and the driver's exit waited on it forever (a run stopped with SIGTERM
    hung, 1 time in ~60).
    """
    global _STOPPED, _SEND_UNTIL

    if signum != signal.SIGALRM and _STOPPED is None:
        _STOPPED, _SEND_UNTIL = 128 + signum, time.monotonic() + SEND_GRACE_S
    if _STOPPED is None:
        return
    if _IN_VIDEO:
        raise SystemExit(_STOPPED)
    if _writing_result(frame) and time.monotonic() < _SEND_UNTIL:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    _end_worker(_STOPPED)


def _writing_result(frame: Any) -> bool:
    """Whether `frame` (a signal's) is within ProcessPoolExecutor's writing of a result to the
    pipe (`Connection._send_bytes`, under the queue's lock, within `_sendback_result`)."""
    from concurrent.futures import process
    from multiprocessing import connection

    sending = getattr(process, "_sendback_result", None)
    writing = getattr(getattr(connection, "Connection", None), "_send_bytes", None)
    if sending is None or writing is None:
        return False
    codes = set()
    while frame is not None:
        codes.add(frame.f_code)
        frame = frame.f_back
    return {sending.__code__, writing.__code__} <= codes


def _end_worker(code: int) -> NoReturn:
    # not through SystemExit: multiprocessing's worker loop would send it to the driver as the
    # video's result and wait for the next video
    from workers.remote_copy import drop_download

    drop_download()
    os._exit(code)


def run_group(group: int, task: VideoTask) -> VideoTask:
    """Run group `group`'s stages on `task` (what a pool's future carries out); in a pool worker
    stopped by a signal, end it rather than return (`_stop_worker`)."""
    global _IN_VIDEO

    if not _POOL_WORKER:
        return _run_stages(group, task)
    if _STOPPED is not None:  # (stopped while sending the last video's result)
        _end_worker(_STOPPED)
    try:
        _IN_VIDEO = True
        done = _run_stages(group, task)
        _IN_VIDEO = False  # (here: a stop just after the stages is still caught below)
        return done
    except SystemExit as exc:
        if _STOPPED is None:  # a library's own exit() (no decode child): the video's error, as any other
            task.errors.append(StageError("worker", "SystemExit",
                                          f"a library called exit({exc.code!r}) while this video was processed"))
            return task  # (raised to the driver, it ended the whole run, with nothing published)
        _end_worker(_STOPPED)
    finally:
        _IN_VIDEO = False


def _run_stages(group: int, task: VideoTask) -> VideoTask:
    for stage in _WORKER_GROUPS[group]:
        stage.run([task])
    return task
