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
than one process did. What runs in a worker, and how it ends when stopped, is
`pipeline.pool_worker`.

A worker that dies (killed for lack of memory, a crash outside the guarded decoding) breaks
ProcessPoolExecutor's pool and fails every video it had taken. The pool starts new workers,
through a forkserver (the driver's threads now run), and runs each of those videos again,
one at a time, in a worker of its own (`CpuPool._run_alone`): a video that ends that worker
too is the culprit and gets a `WorkerLost` errors row; the others are finished, and the run
goes on, as a Ray run does once its retries are spent.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection

from pipeline import pool_worker
from pipeline.log_relay import LogRelay
from schemas.config import RunConfig
from workers.frame_sources import set_decode_threads
from workers.guard import fork_available, usable_cpus
from workers.task import StageError, VideoTask

log = logging.getLogger(__name__)


def decode_workers(configured: int | None) -> int:
    """Videos decoded at once: `resources.decode_concurrency`, else one per core this process may use."""
    return max(1, configured or usable_cpus())


#: set where this process itself was stopped (SIGTERM, Ctrl-C: `pipeline.command_stops` sets it): its workers
#: ended by SIGTERM then stopped with the run. Otherwise one of them was stopped on its own (a
#: memory watchdog such as earlyoom sends SIGTERM first, or a `kill` of its pid), which is a crash.
DRIVER_STOPPED = threading.Event()
#: how long a broken pool's thread waits for the driver's stop to be said: its handler runs on the
#: main thread, which may see the signal after the workers end
DRIVER_STOP_WAIT_S = 1.0


class WorkerDied(RuntimeError):
    """The pool's workers were stopped (SIGTERM, Ctrl-C), or its workers die whatever video they
    run (`DEATHS_IN_A_ROW`): the run cannot go on."""


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
        DRIVER_STOPPED.clear()  # (a stop of an earlier run of this process is not this one's)
        self._settings = (config, groups, preparers)
        self._workers = workers
        self._logs: LogRelay | None = None  # the workers' log records, logged here
        #: each future of `submit` not yet given back: its group, its task and its executor.
        self._submitted: dict[Future, tuple[int, VideoTask, Executor]] = {}
        self._restarting = threading.Lock()  # (a pool's CPU segments each call `results`)
        self._alone: ProcessPoolExecutor | None = None  # one worker: a dead pool's videos, one at a time
        self._deaths_in_a_row = 0
        if self.start_method == "thread":  # the decoders share the cores with the models
            set_decode_threads(threads_per_worker(workers))
            pool_worker.build_worker_stages(config, groups, preparers)
            self._executor: Executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vidlens-decode")
            return
        self._executor = self._start(self.start_method, workers)
        self._logs.start()

    def _start(self, start_method: str, workers: int) -> ProcessPoolExecutor:
        """A process pool of `workers` workers started by `start_method`, every worker started."""
        config, groups, preparers = self._settings
        context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            context = forkserver_context()
            if preparers:
                from workers.models import detached_preparers

                preparers = detached_preparers(preparers)
        # a forked worker's parent is this process; a forkserver's worker's is the server, which
        # ends with this process (and its workers with it)
        parent = os.getpid() if start_method == "fork" else None
        if self._logs is None:
            self._logs = LogRelay(context)
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=pool_worker.start_worker,
                                       initargs=(config, groups, parent, threads_per_worker(self._workers),
                                                 preparers, self._logs.writer,
                                                 logging.getLogger().getEffectiveLevel()))
        if start_method == "fork":
            # what the workers inherit stays shared: the driver's garbage collections no longer
            # write to those objects (a page written is copied, and is then the driver's and the
            # worker's each): the driver and its workers by PSS 1.22-1.26x from 100 to 3,000
            # videos without, 1.03-1.06x with it (`bench.memory`); let go in `close`
            gc.freeze()
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a threaded process: here no thread of ours runs yet
            warnings.simplefilter("ignore", DeprecationWarning)
            # every worker starts now, not at the first videos (with fork, they all start at the
            # first call; other methods start one per call while none is idle)
            for future in [executor.submit(int) for _ in range(workers)]:
                future.result()
        return executor

    def submit(self, group: int, task: VideoTask) -> Future:
        """Run group `group`'s stages on `task` in a worker; the future's result is the updated task."""
        executor = self._executor
        try:
            future = executor.submit(pool_worker.run_group, group, task)
        except BrokenProcessPool as exc:  # (broken since: `results` runs it again)
            future = Future()
            future.set_exception(exc)
        self._submitted[future] = (group, task, executor)
        return future

    def results(self, futures: list[Future]) -> list[VideoTask]:
        """The tasks `futures` (of `submit`) give back, once all are done (a video's own failure
        is an error on its task, not raised).

        A video whose worker died is run again alone (`_recover`); `WorkerDied` where the
        workers were stopped (SIGTERM, Ctrl-C: the run is being stopped), or where videos one
        after another each end the worker they run in alone.
        """
        self._wait(futures, self._executor)
        done = [self._result(future) for future in futures]
        if self._alone is not None:
            with self._restarting:  # (another segment's thread may be running a video alone)
                if self._alone is not None and all(used is self._executor for _, _, used in self._in_hand()):
                    self._alone.shutdown(wait=False)  # the dead pool's videos are all back
                    self._alone = None
        return done

    def _in_hand(self) -> list[tuple[int, VideoTask, Executor]]:
        return list(self._submitted.values())  # (a copy: other segments' threads submit meanwhile)

    def _wait(self, futures: list[Future], executor: Executor) -> None:
        """Until `futures` are done.

        A worker killed while it sent a result back (by the kernel, out of memory, say) left
        half the result in the pool's pipe, and ProcessPoolExecutor read the rest of it forever:
        the run, and its exit, never ended, its output's lock held. A worker of `executor` found
        dead while its pool is not broken `STUCK_AFTER_S` later is taken for that, and the pool
        is made to see it (`_unstick`): its videos then come back as on any dead worker.
        """
        dead_since = None
        while wait(futures, timeout=1.0).not_done:
            if not _dead_worker(executor):
                dead_since = None
            elif dead_since is None:
                dead_since = time.monotonic()
            elif time.monotonic() - dead_since > STUCK_AFTER_S:
                log.error("a decode worker process died while sending a video back: its pool is ended")
                _unstick(executor)

    def _result(self, future: Future) -> VideoTask:
        group, task, executor = self._submitted.pop(future)
        try:
            return future.result()
        except BrokenProcessPool:
            return self._recover(group, task, executor)

    def _recover(self, group: int, task: VideoTask, executor: Executor) -> VideoTask:
        """`task`, whose worker pool `executor` broke, run again alone; the first of that pool's
        videos back starts a new pool for the videos after them."""
        with self._restarting:
            if executor is self._executor:
                codes = _exit_codes(executor)
                if _stopped(codes):
                    raise WorkerDied(_STOPPED_MESSAGE)
                in_hand = 1 + sum(used is executor for _, _, used in self._in_hand())
                log.warning("a decode worker process died (%s): the %d video%s the pool had taken are run again, "
                            "one at a time in a worker of their own, and the run goes on in new workers",
                            _describe(codes), in_hand, "" if in_hand == 1 else "s")
                executor.shutdown(wait=False)
                self._executor = self._start_again(self._workers)
            return self._run_alone(group, task)

    def _run_alone(self, group: int, task: VideoTask) -> VideoTask:
        """`task` run in a worker of its own: a video that ends that one too gets a `WorkerLost`
        error (the run goes on); `WorkerDied` once `DEATHS_IN_A_ROW` videos in a row did."""
        if self._alone is None:
            self._alone = self._start_again(1)
        future = self._alone.submit(pool_worker.run_group, group, task)
        self._wait([future], self._alone)
        try:
            done = future.result()
        except BrokenProcessPool:
            codes = _exit_codes(self._alone)
            self._alone.shutdown(wait=False)
            self._alone = None
            if _stopped(codes):
                raise WorkerDied(_STOPPED_MESSAGE) from None
            self._deaths_in_a_row += 1
            if self._deaths_in_a_row >= DEATHS_IN_A_ROW:
                raise WorkerDied(
                    f"{self._deaths_in_a_row} videos in a row each ended the decode worker process they ran in alone "
                    f"({_describe(codes)}): the trouble is not one video, and the run stops (the batches it "
                    "published stay: the same command goes on from there). Killed for lack of memory? the "
                    "kernel's log (dmesg) says; lower resources.decode_concurrency") from None
            log.error("%s ended the decode worker process it ran in alone (%s): it gets a WorkerLost errors row",
                      task.ref.uri, _describe(codes))
            task.errors.append(StageError(
                "worker", "WorkerLost", f"the decode worker process died on this video ({_describe(codes)}), again "
                "when it ran alone in a new one; the rest of the run went on. Killed for lack of memory? the "
                "kernel's log (dmesg) says"))
            return task
        self._deaths_in_a_row = 0
        return done

    def _start_again(self, workers: int) -> ProcessPoolExecutor:
        """New workers once the driver's threads run: through a forkserver (a process forked now
        could inherit a lock another thread holds)."""
        try:
            return self._start("forkserver", workers)
        except BrokenProcessPool:
            raise WorkerDied("a decode worker process died, and a new one could not start: the run stops (the "
                             "batches it published stay: the same command goes on from there)") from None

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; with `cancel`, drop the videos not yet started and do not wait."""
        if self._alone is not None:
            self._alone.shutdown(wait=not cancel, cancel_futures=cancel)
        self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
        if self._logs is not None:
            self._logs.close(wait=not cancel)
        if self.start_method == "fork":
            gc.unfreeze()  # (their garbage is collected again: a process may run many pools)


_STOPPED_MESSAGE = ("a decode worker process was stopped (SIGTERM or Ctrl-C), and the run stops (the batches it "
                    "published stay: the same command goes on from there)")
#: videos in a row that each end the worker they run in alone before the run stops (`CpuPool._run_alone`).
DEATHS_IN_A_ROW = 3
#: what a pool worker ends with when stopped (`_stop_worker`, or SIGTERM before its handler is set).
_STOP_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}
#: Ctrl-C's: a terminal's, to the whole group (no watchdog ends one process with it)
_INTERRUPT_CODES = {128 + signal.SIGINT, -signal.SIGINT}


def _dead_worker(executor: Executor) -> bool:
    """Whether a worker of a process pool not (yet) broken has ended (ProcessPoolExecutor's
    own parts, as Python 3.10-3.13 name them: not looked for where they are not)."""
    if not isinstance(executor, ProcessPoolExecutor) or getattr(executor, "_broken", True):
        return False
    processes = getattr(executor, "_processes", None) or {}
    return any(_ended(process) for process in list(processes.values()))


def _ended(process: multiprocessing.process.BaseProcess) -> bool:
    """Whether a pool's worker process has ended, as the pool's own thread sees it (its
    sentinel ready), its exit code left unread. A forkserver's worker's code is read from a pipe,
    once: a second thread reading it as well, while the pool's thread joined the worker, made it
    255 (CPython's `Popen.poll`; 13 runs of 100 in a script where one thread polled `exitcode`
    while another joined), and a pool stopped with SIGTERM could be taken for a crash (`_stopped`)."""
    return bool(connection.wait([process.sentinel], timeout=0))


def _exit_codes(executor: Executor) -> list[int]:
    """The exit codes of a broken process pool's workers, once its thread has ended them all
    (ProcessPoolExecutor's own parts: none where they are not)."""
    thread = getattr(executor, "_executor_manager_thread", None)
    if thread is not None:
        thread.join(10)
    processes = getattr(executor, "_processes", None) or {}
    return [process.exitcode for process in list(processes.values()) if process.exitcode is not None]


def _stopped(codes: list[int]) -> bool:
    """Whether a broken pool's workers were all stopped with the run: each with a stop's code (the
    pool ends the others with SIGTERM when one dies: a worker that crashed or was killed ends with
    another code), and Ctrl-C's, or the driver stopped too (`DRIVER_STOPPED`): a SIGTERM to one
    worker alone stopped the whole run, and each rerun again on the same video. Once the driver
    is stopped, any worker's end is the stop's: its cleanup may have closed the pool, the exit
    codes gone with it (read as none: a crash, and new workers were started during the stop)."""
    if DRIVER_STOPPED.is_set():
        return True
    if not codes or not all(code in _STOP_CODES for code in codes):
        return False
    return any(code in _INTERRUPT_CODES for code in codes) or DRIVER_STOPPED.wait(DRIVER_STOP_WAIT_S)


def _describe(codes: list[int]) -> str:
    """How a broken pool's worker that died ended, in words: the first of `codes` that is not a
    stop's (the others were ended by the pool: a stop's code)."""
    crashed = [code for code in codes if code not in _STOP_CODES]
    if not crashed:
        if not codes:
            return "exit code unknown"
        # a stop's code, where the run was not stopped: one worker's SIGTERM (a memory watchdog's)
        return f"stopped by {signal.Signals(-codes[0] if codes[0] < 0 else codes[0] - 128).name}"
    code = crashed[0]
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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


def forkserver_context() -> multiprocessing.context.BaseContext:
    """The forkserver start method, its server (one a process, started at its first use) made to
    import what the workers run first, and to ignore SIGTERM (`pipeline.forkserver_start`: its
    workers take it)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.forkserver_start", "pipeline.cpu_pool", "pipeline.pool_worker",
                                    "workers.sampling", "workers.models"])
    return context


def threads_per_worker(workers: int) -> int:
    """Threads each of `workers` processes decoding side by side may run: its share of the cores."""
    return max(1, usable_cpus() // max(1, workers))
