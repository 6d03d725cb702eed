"""The local executor's pool of CPU worker processes: each runs groups of CPU stages (decode,
sample) on one video at a time, as Ray's decode tasks would.

The pool's processes start with the run, before any model is loaded and before any thread
of the pipeline runs: forked, or through a forkserver once CUDA is initialised in this
process. That matters: a process forked while another of its threads is inside torch can
inherit a lock held by that thread, and its next thread to exit deadlocks on it (seen with
decord's decoder thread and torch's allocator). The workers stay single-threaded and fork
their guarded decoder child (`workers.guard`) themselves, from a small, quiet process.
Each worker runs its share of the cores' threads (decoder, torch): left to choose,
every one of 16 workers ran 16 decoder threads, and the 16-core machine decoded no faster
than one process did. Stopped with the driver (SIGTERM, Ctrl-C), a worker ends with its
download deleted, never in the middle of sending a result (`_stop_worker`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import sys
import time
import warnings
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NoReturn

from pipeline.log_relay import LogRelay, send_logs_to
from schemas.config import RunConfig
from workers.frame_sources import set_decode_threads, share_threads
from workers.guard import die_with, fork_available
from workers.stage import Stage, build_stage
from workers.task import VideoTask

log = logging.getLogger(__name__)


def decode_workers(configured: int | None) -> int:
    """Videos decoded at once: `resources.decode_concurrency`, else one per core."""
    return max(1, configured or os.cpu_count() or 1)


class WorkerDied(RuntimeError):
    """A pool's worker process died (killed, or crashed outside a video's guarded decoding)."""


class CpuPool:
    """Worker processes that run groups of CPU stages on one video at a time.

    Started at construction: call it before loading models or starting threads, on the thread
    that will close it (a forked worker ends when the thread that forked it does, as when the
    driver dies). Each worker builds the stages of every group once, the sample stage with
    the driver's `preparers` when given (else it loads its own): as they are in a forked
    worker, which inherits the processors loaded already; detached from their processors in a
    forkserver's (`workers.models.detached_preparers`). `start_method` is
    `worker_start_method()`'s choice unless given.
    """

    def __init__(self, config: RunConfig, groups: list[tuple[str, ...]], workers: int,
                 start_method: str | None = None, preparers: dict | None = None) -> None:
        self.start_method = start_method or worker_start_method()
        self._logs: LogRelay | None = None  # the workers' log records, logged here
        if self.start_method == "thread":  # the decoders share the cores with the models
            set_decode_threads(threads_per_worker(workers))
            _build_worker_stages(config, groups, preparers)
            self._executor: Executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vidlens-decode")
            return
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # (pipeline.forkserver_start: the server ignores SIGTERM, its workers take it)
            context.set_forkserver_preload(["pipeline.forkserver_start", "pipeline.cpu_pool", "workers.sampling",
                                            "workers.models"])
            if preparers:
                from workers.models import detached_preparers

                preparers = detached_preparers(preparers)
        # a forked worker's parent is this process; a forkserver's worker's is the server, which
        # ends with this process (and its workers with it)
        parent = os.getpid() if self.start_method == "fork" else None
        self._logs = LogRelay(context)
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                             initializer=_start_worker,
                                             initargs=(config, groups, parent, threads_per_worker(workers), preparers,
                                                       self._logs.writer, logging.getLogger().getEffectiveLevel()))
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a threaded process: here no thread of ours runs yet
            warnings.simplefilter("ignore", DeprecationWarning)
            # every worker starts now, not at the first videos (with fork, they all start at the
            # first call; other methods start one per call while none is idle)
            for future in [self._executor.submit(int) for _ in range(workers)]:
                future.result()
        self._logs.start()

    def submit(self, group: int, task: VideoTask) -> Future:
        """Run group `group`'s stages on `task` in a worker; the future's result is the updated task."""
        return self._executor.submit(_run_group, group, task)

    def results(self, futures: list[Future]) -> list[VideoTask]:
        """The tasks `futures` (of `submit`) give back, once all are done; `WorkerDied` where a
        worker process died (a video's own failure is an error on its task, not raised).

        A worker killed while it sent a result back (by the kernel, out of memory, say) left
        half the result in the pool's pipe, and ProcessPoolExecutor read the rest of it forever:
        the run, and its exit, never ended, its output's lock held. A worker found dead while
        its pool is not broken `STUCK_AFTER_S` later is taken for that, and the pool is made to
        see it (`_unstick`): the run then stops as on any dead worker.
        """
        dead_since = None
        while wait(futures, timeout=1.0).not_done:
            if not self._dead_worker():
                dead_since = None
            elif dead_since is None:
                dead_since = time.monotonic()
            elif time.monotonic() - dead_since > STUCK_AFTER_S:
                log.error("a decode worker process died while sending a video back: the run stops")
                _unstick(self._executor)
        try:
            return [future.result() for future in futures]
        except BrokenProcessPool:
            raise WorkerDied("a decode worker process died, and the run stops (the batches it published stay: "
                             "the same command goes on from there). Killed for lack of memory? the kernel's log "
                             "(dmesg) says; lower resources.decode_concurrency") from None

    def _dead_worker(self) -> bool:
        """Whether a worker of a process pool not (yet) broken has ended (ProcessPoolExecutor's
        own parts, as Python 3.10-3.13 name them: not looked for where they are not)."""
        executor = self._executor
        if not isinstance(executor, ProcessPoolExecutor) or getattr(executor, "_broken", True):
            return False
        processes = getattr(executor, "_processes", None) or {}
        return any(process.exitcode is not None for process in list(processes.values()))

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; with `cancel`, drop the videos not yet started and do not wait."""
        self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
        if self._logs is not None:
            self._logs.close(wait=not cancel)


def _unstick(executor: ProcessPoolExecutor, within_s: float = 60.0) -> None:
    """Complete, with zeros, the message a dead worker left half written in `executor`'s result
    pipe, until the executor's thread, reading it, gives up on it (it is not a result) and
    breaks the pool. (ProcessPoolExecutor's own parts: its Python has no way out of that read.)
    A page at a time, once the pipe has room for it: a write never waits (the pipe's end is the
    live workers' too, so it is not made non-blocking)."""
    thread, writer = executor._executor_manager_thread, executor._result_queue._writer
    page, deadline = bytes(select.PIPE_BUF), time.monotonic() + within_s
    while (thread is not None and thread.is_alive() and not executor._broken
           and time.monotonic() < deadline):
        if select.select([], [writer.fileno()], [], 0.05)[1]:
            os.write(writer.fileno(), page)


#: seconds a pool's worker may lie dead before the pool is taken for stuck (`CpuPool.results`):
#: ProcessPoolExecutor otherwise breaks the pool within milliseconds of a worker's death.
STUCK_AFTER_S = 5.0
#: in a pool worker: the stage objects of each group, built once by `_build_worker_stages`.
_WORKER_GROUPS: list[tuple[Stage, ...]] = []


def worker_start_method() -> str:
    """How pool workers start: "fork" (cheap, inherits everything loaded), or "forkserver" once
    CUDA is initialised in this process (a forked copy of a CUDA process must not be relied on:
    a benchmark's run hung after the plan was printed when its workers were forked from one),
    or "thread" where there is no fork (Windows: the stages then run in this process)."""
    if not fork_available():
        return "thread"
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return "forkserver" if cuda is not None and cuda.is_initialized() else "fork"


def _start_worker(config: RunConfig, groups: list[tuple[str, ...]], parent: int | None, threads: int,
                  preparers: dict | None, logs: Any, log_level: int) -> None:
    """In a new pool worker: follow its parent if it dies, log through the driver, take its share
    of threads, build the stages; delete its last video's download when it ends (a pool's worker
    ends without running `atexit`: each run left one video a worker in the temp folder)."""
    from multiprocessing import util

    from workers.decode import drop_download

    die_with(parent if parent is not None else os.getppid())
    util.Finalize(None, drop_download, exitpriority=0)
    _stop_on_signals()
    send_logs_to(logs, log_level)
    share_threads(threads, opencv=False)  # forked: setting OpenCV's threads can deadlock here
    _build_worker_stages(config, groups, preparers)


def threads_per_worker(workers: int) -> int:
    """Threads each of `workers` processes decoding side by side may run: its share of the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _build_worker_stages(config: RunConfig, groups: list[tuple[str, ...]], preparers: dict | None) -> None:
    _WORKER_GROUPS[:] = [tuple(build_stage(target, config, preparers) for target in group) for group in groups]


#: in a pool worker (`_start_worker`), not on the driver's threads ("thread" start method).
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


def _stop_on_signals() -> None:
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
    deleted, a decode child killed) before `_run_group` ends the worker. Writing a result, it
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
    from workers.decode import drop_download

    drop_download()
    os._exit(code)


def _run_group(group: int, task: VideoTask) -> VideoTask:
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
    except SystemExit:
        if _STOPPED is None:
            raise  # a library's own sys.exit: the video's error, as any other
        _end_worker(_STOPPED)
    finally:
        _IN_VIDEO = False


def _run_stages(group: int, task: VideoTask) -> VideoTask:
    for stage in _WORKER_GROUPS[group]:
        stage.run([task])
    return task
