"""Running the plan in one process tree, without Ray: decoding overlapped with inference.

The stages form a pipeline of threads joined by small queues. Each model stage (shots, embed,
captions, ocr) runs on a thread of its own, one batch after another, so the GPU (or the
cores torch uses) works on one batch while the next ones decode and the driver writes the
last. The CPU stages (decode, sample) run video by video in a pool of worker processes, one
per core by default (`resources.decode_concurrency`), as Ray's decode tasks would.

The pool's processes start with the run, before any model is loaded and before any thread
of the pipeline runs: forked, or through a forkserver once CUDA is initialised in this
process. That matters: a process forked while another of its threads is inside torch can
inherit a lock held by that thread, and its next thread to exit deadlocks on it (seen with
decord's decoder thread and torch's allocator). The workers stay single-threaded and fork
their guarded decoder child (`workers.guard`) themselves, from a small, quiet process.
Each worker runs its share of the cores' threads (decoder, torch): left to choose,
every one of 16 workers ran 16 decoder threads, and the 16-core machine decoded no faster
than one process did.

Queues hold at most one waiting batch per stage, so the videos in flight stay bounded
(about three batches per stage) however long the listing is, and batches come out in the
order they went in. A failure of the machinery itself (a listing that raises, a worker
process killed) stops the pipeline and is raised to the caller; a failing video is, as
always, one task's error and nothing more.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from pipeline.log_relay import LogRelay, send_logs_to
from pipeline.downloads import DownloadAhead
from schemas.config import RunConfig
from workers.frame_sources import set_decode_threads, share_threads
from workers.guard import die_with, fork_available
from workers.stage import Stage, build_stage
from workers.task import VideoTask

#: CPU-stage batches decoding at once, so the pool is not idle while a batch's slowest video ends.
_BATCHES_DECODING = 2
#: how often a thread blocked on a queue looks whether the pipeline was stopped.
_POLL_S = 0.1


@dataclass(frozen=True)
class Segment:
    """A run of consecutive CPU stages (`cpu`: their group's index in the pool), or one model stage."""

    name: str
    cpu: int | None = None
    spec: Any = None  # the model stage's StageSpec
    stage: Stage | None = None  # ... and the stage, loaded
    #: videos per call of a model stage (`resources.per_stage.<stage>.videos_per_batch`); None
    #: runs each batch as it comes.
    batch_size: int | None = None


def split_plan(specs: Sequence[Any]) -> tuple[list[tuple[str, ...]], list[Segment]]:
    """The plan's CPU stage groups (targets of consecutive "task" stages) and its segments, in order."""
    groups: list[tuple[str, ...]] = []
    segments: list[Segment] = []
    for spec in specs:
        if spec.kind != "task":
            segments.append(Segment(spec.name, spec=spec, batch_size=spec.batch_size))
        elif segments and segments[-1].cpu is not None:
            groups[-1] += (spec.target,)
            segments[-1] = Segment(f"{segments[-1].name}+{spec.name}", cpu=segments[-1].cpu)
        else:
            groups.append((spec.target,))
            segments.append(Segment(spec.name, cpu=len(groups) - 1))
    return groups, segments


def run_local(tasks: Iterable[VideoTask], specs: Sequence[Any], config: RunConfig,
              preparers: dict | None = None) -> Iterator[VideoTask]:
    """Run the plan: the pool started first, then the first videos decoding while the models load.

    The models load on this thread while the pool decodes the first batches, so loading
    (and, on a GPU, starting CUDA) costs the run no time the decoders could use. No model
    thread starts before every model is loaded: loading one on a thread of its own while
    another model ran was tried, and a CI run hung with two threads spinning at full speed.
    """
    groups, segments = split_plan(specs)
    workers = decode_workers(config.resources.decode_concurrency)
    pool = CpuPool(config, groups, workers, preparers=preparers)
    from workers.models import resolve_device

    # on a CPU every model stage's torch uses all the cores: running two at once only makes
    # their thread teams compete (two spinning OpenMP teams once stalled a run for minutes)
    one_at_a_time = resolve_device(config.models.device).type == "cpu"
    ahead = config.resources.download_ahead
    batch_size = feed_batch_size(specs, config)
    downloads = DownloadAhead(config, workers if ahead is None else ahead, keep=workers + 2 * batch_size,
                              max_bytes=config.resources.download_ahead_bytes)
    try:
        yield from run_pipelined(downloads.tasks(tasks), segments, pool, batch_size,
                                 one_at_a_time, load=lambda spec: spec.load_class()(config), downloads=downloads)
    finally:
        downloads.close()


def describe(specs: Sequence[Any], config: RunConfig) -> str:
    """One line per stage as this executor runs it, printed at the start of a run (the plan's
    Ray resources do not apply here)."""
    from workers.models import resolve_device

    workers = decode_workers(config.resources.decode_concurrency)
    lines = []
    for spec in specs:
        if spec.kind == "task":
            lines.append(f"  {spec.name:<9} {workers} worker process{'es' if workers > 1 else ''}, a video at a time each")
        else:  # (its batch size from `resources.per_stage`, else `resources.videos_per_batch`)
            lines.append(f"  {spec.name:<9} a thread of its own, {spec.batch_size} video{'' if spec.batch_size == 1 else 's'}/batch")
    if resolve_device(config.models.device).type == "cpu":
        lines.append("  (on the CPU the model stages take turns, each using every core)")
    return "\n".join(lines)


def feed_batch_size(specs: Sequence[Any], config: RunConfig) -> int:
    """Videos per batch through the pipeline: `resources.videos_per_batch`, or more where a model
    stage's `per_stage` says (each model stage splits a batch into its own, `_model_segment`)."""
    return max([config.resources.videos_per_batch, *(spec.batch_size for spec in specs if spec.kind != "task")])


def decode_workers(configured: int | None) -> int:
    """Videos decoded at once: `resources.decode_concurrency`, else one per core."""
    return max(1, configured or os.cpu_count() or 1)


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
            context.set_forkserver_preload(["pipeline.local", "workers.sampling", "workers.models"])
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

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; with `cancel`, drop the videos not yet started and do not wait."""
        self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
        if self._logs is not None:
            self._logs.close(wait=not cancel)


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
#: in a pool worker stopped by a signal: its exit code.
_STOPPED: int | None = None


def _stop_on_signals() -> None:
    """In a new pool worker: stopped with its driver (SIGTERM to the group, as systemd does;
    Ctrl-C in a terminal), it ends with its download deleted (killed outright, it left it behind)."""
    global _POOL_WORKER

    _POOL_WORKER = True
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(stop, _stop_worker)


def _stop_worker(signum: int, frame: Any) -> None:
    """A pool worker's SIGTERM and SIGINT (and its SIGALRM, set here): the worker ends, its
    download deleted, never in the middle of sending a video's result.

    Within a video's stages, as SystemExit, so that their cleanups run (a download being made is
    deleted, a decode child killed) before `_run_group` ends the worker. Sending a result, it
    looks again every 50 ms until the result is sent: a worker ended midway left the driver
    reading the rest of it forever. Anywhere else (waiting for the next video) it ends at once.
    Not as SystemExit there: raised inside multiprocessing's code (just after it took its result
    queue's lock, say), the exception left that lock held, by a worker that went on running, and
    the other workers and the driver's exit waited on it forever (a run stopped with SIGTERM
    hung, 1 time in ~60).
    """
    global _STOPPED

    if signum != signal.SIGALRM:
        _STOPPED = 128 + signum
    if _STOPPED is None:
        return
    if _IN_VIDEO:
        raise SystemExit(_STOPPED)
    if _sending_result(frame):
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    _end_worker(_STOPPED)


def _sending_result(frame: Any) -> bool:
    """Whether `frame` (a signal's) is within ProcessPoolExecutor's sending of a result."""
    from concurrent.futures import process

    sending = getattr(process, "_sendback_result", None)
    while frame is not None:
        if sending is not None and frame.f_code is sending.__code__:
            return True
        frame = frame.f_back
    return False


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
        return _run_stages(group, task)
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


def run_pipelined(tasks: Iterable[VideoTask], segments: list[Segment], pool: CpuPool,
                  batch_size: int, models_one_at_a_time: bool = False,
                  load: Callable[[Any], Stage] | None = None,
                  downloads: DownloadAhead | None = None) -> Iterator[VideoTask]:
    """Yield every task once all segments have run on it, batches overlapping across segments.

    With `models_one_at_a_time`, the model stages take turns (each still on its own thread,
    one batch each while the CPU stages go on decoding); else they run at once. A model
    segment without its stage gets `load(segment.spec)`, called on this thread once the
    listing and the CPU stages are running; the model threads start when all are loaded.
    `downloads`: told when a video leaves each CPU segment, so its copy is deleted once no
    later one reads it.
    """
    stop = threading.Event()
    turns = threading.Lock() if models_one_at_a_time else contextlib.nullcontext()
    links: list[queue.Queue] = [queue.Queue(maxsize=1) for _ in range(len(segments) + 1)]
    workers = [_thread("feed", lambda: _feed(tasks, batch_size, links[0], stop), links[0], stop)]
    cpu_left = sum(segment.cpu is not None for segment in segments)
    for segment, source, out in zip(segments, links, links[1:]):
        if segment.cpu is not None:
            cpu_left -= 1
            done = functools.partial(downloads.passed, last=cpu_left == 0) if downloads else None
            body = functools.partial(_cpu_segment, segment, pool, source, out, stop, done)
            workers.append(_thread(segment.name, body, out, stop))
    for worker in workers:
        worker.start()
    finished = False
    try:
        loaded = [replace(s, stage=load(s.spec)) if s.cpu is None and s.stage is None else s for s in segments]
        for segment, source, out in zip(loaded, links, links[1:]):
            if segment.cpu is None:
                body = functools.partial(_model_segment, segment, source, out, stop, turns)
                workers.append(_thread(segment.name, body, out, stop))
                workers[-1].start()
        while True:
            item = _take(links[-1], stop)
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                finished = True
                return
            yield from item
    finally:
        stop.set()
        pool.close(cancel=not finished)
        for worker in workers:
            worker.join(timeout=5)


class _End:
    """Sent down the queues after the last batch; carries the exception that ended the pipeline, if any."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def _thread(name: str, body: Callable[[], None], downstream: queue.Queue, stop: threading.Event) -> threading.Thread:
    """A pipeline thread running `body`; any exception it raises ends the pipeline and reaches the caller."""

    def guarded() -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            _give(downstream, _End(exc), stop)

    return threading.Thread(target=guarded, name=f"vidlens-{name}", daemon=True)


def _feed(tasks: Iterable[VideoTask], batch_size: int, out: queue.Queue, stop: threading.Event) -> None:
    batch: list[VideoTask] = []
    for task in tasks:
        batch.append(task)
        if len(batch) >= batch_size:
            if not _give(out, batch, stop):
                return
            batch = []
    if batch and not _give(out, batch, stop):
        return
    _give(out, _End(), stop)


def _model_segment(segment: Segment, source: queue.Queue, out: queue.Queue, stop: threading.Event,
                   turns: contextlib.AbstractContextManager) -> None:
    while True:
        item = _take(source, stop)
        if isinstance(item, _End):
            _give(out, item, stop)
            return
        size = segment.batch_size or len(item)
        for start in range(0, len(item), size):
            with turns:  # (the stages take turns batch by batch)
                segment.stage.run(item[start:start + size])
        if not _give(out, item, stop):
            return


def _cpu_segment(segment: Segment, pool: CpuPool, source: queue.Queue, out: queue.Queue,
                 stop: threading.Event, done: Callable[[list[VideoTask]], None] | None = None) -> None:
    decoding: deque[list[Future]] = deque()
    end: _End | None = None
    while decoding or end is None:
        if end is None and len(decoding) < _BATCHES_DECODING:
            item = _take(source, stop)
            if isinstance(item, _End):
                end = item
            else:
                decoding.append([pool.submit(segment.cpu, task) for task in item])
            continue
        futures = decoding.popleft()
        wait(futures)
        # a video's failure is already on its task: result() raises only when a worker died
        finished = [future.result() for future in futures]
        if done is not None:
            done(finished)
        if not _give(out, finished, stop):
            return
    _give(out, end, stop)


def _give(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item` on `out`, waiting for room; False when the pipeline was stopped meanwhile."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _take(source: queue.Queue, stop: threading.Event) -> Any:
    """The next item of `source`; an `_End` when the pipeline was stopped meanwhile."""
    while not stop.is_set():
        try:
            return source.get(timeout=_POLL_S)
        except queue.Empty:
            continue
    return _End()
