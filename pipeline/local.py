"""Running the plan in one process tree, without Ray: decoding overlapped with inference.

The stages form a pipeline of threads joined by small queues. Each model stage (shots, embed,
captions, ocr) runs on a thread of its own, one batch after another, so the GPU (or the
cores torch uses) works on one batch while the next ones decode and the driver writes the
last. The CPU stages (decode, sample) run video by video in a pool of worker processes
(`pipeline.cpu_pool`), one per core by default (`resources.decode_concurrency`), as Ray's
decode tasks would.

Queues hold at most one waiting batch per stage, so the videos in flight stay bounded
(about three batches per stage) however long the listing is, and batches come out in the
order they went in. A failure of the machinery itself (a listing that raises, workers
stopped, or dying whatever video they run) stops the pipeline and is raised to the caller; a
failing video is, as always, one task's error and nothing more, even one that kills its
worker process (`pipeline.cpu_pool`).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from pipeline.cpu_pool import CpuPool, decode_workers
from pipeline.downloads import DownloadAhead
from schemas.config import RunConfig
from workers.stage import DeviceLostError, Stage
from workers.task import VideoTask

#: the names of the pipeline's threads begin so (`pipeline.cli.command` looks for them at exit).
THREAD_PREFIX = "vidlens-pipeline-"
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
    try:  # (closed by run_pipelined once it runs)
        from workers.models import resolve_device

        # on a CPU every model stage's torch uses all the cores: running two at once only makes
        # their thread teams compete (two spinning OpenMP teams once stalled a run for minutes)
        one_at_a_time = resolve_device(config.models.device).type == "cpu"
        ahead = config.resources.download_ahead
        batch_size = feed_batch_size(specs, config)
        downloads = DownloadAhead(config, workers if ahead is None else ahead, keep=workers + 2 * batch_size,
                                  max_bytes=config.resources.download_ahead_bytes)
    except BaseException:
        pool.close(cancel=True)
        raise
    try:
        yield from run_pipelined(downloads.tasks(tasks), segments, pool, batch_size, one_at_a_time,
                                 load=lambda spec: spec.load_class()(config), downloads=downloads, first_batch=workers)
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


def run_pipelined(tasks: Iterable[VideoTask], segments: list[Segment], pool: CpuPool,
                  batch_size: int, models_one_at_a_time: bool = False,
                  load: Callable[[Any], Stage] | None = None,
                  downloads: DownloadAhead | None = None, first_batch: int | None = None) -> Iterator[VideoTask]:
    """Yield every task once all segments have run on it, batches overlapping across segments.

    With `models_one_at_a_time`, the model stages take turns (each still on its own thread,
    one batch each while the CPU stages go on decoding; the latest in the pipeline first, `_Turns`);
    else they run at once. A model segment without its stage gets `load(segment.spec)`, called on
    this thread once the listing and the CPU stages are running; the model threads start when all
    are loaded.
    `downloads`: told when a video leaves each CPU segment, so its copy is deleted once no
    later one reads it. `first_batch`: the first batch's videos go in pieces, of this many, then
    each twice the last (`_feed`).
    """
    stop = threading.Event()
    turns = _Turns().turn if models_one_at_a_time else (lambda position: contextlib.nullcontext())
    links: list[queue.Queue] = [queue.Queue(maxsize=1) for _ in range(len(segments) + 1)]
    workers = [_thread("feed", lambda: _feed(tasks, batch_size, links[0], stop, first_batch), links[0], stop)]
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
        for position, (segment, source, out) in enumerate(zip(loaded, links, links[1:])):
            if segment.cpu is None:
                body = functools.partial(_model_segment, segment, source, out, stop, functools.partial(turns, position))
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


class _Turns:
    """The model stages' turns on a CPU, a batch each: one at a time, and of those waiting, the one latest
    in the pipeline first. A lock gives the turn to whichever thread the OS wakes first, often the stage
    that has just ended a batch and has its next one: two stub model stages in a row, the first's input
    always there, ran the first two batches ahead of the second in 4 runs of 4. A later stage's batch is
    nearer its end (the first results come out sooner, what it holds is freed sooner); a stage never waits
    for one that is not waiting itself, so the cores are not left idle for it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._taken = False
        self._waiting: list[int] = []  # the positions of the stages waiting for a turn

    @contextlib.contextmanager
    def turn(self, position: int) -> Iterator[None]:
        """A turn for the stage at `position` in the pipeline (higher: later)."""
        with self._changed:
            self._waiting.append(position)
            try:
                self._changed.wait_for(lambda: not self._taken and max(self._waiting) == position)
            except BaseException:
                self._waiting.remove(position)
                self._changed.notify_all()  # (the turn may be another's now)
                raise
            self._waiting.remove(position)
            self._taken = True
        try:
            yield
        finally:
            with self._changed:
                self._taken = False
                self._changed.notify_all()


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

    return threading.Thread(target=guarded, name=f"{THREAD_PREFIX}{name}", daemon=True)


def _feed(tasks: Iterable[VideoTask], batch_size: int, out: queue.Queue, stop: threading.Event,
          first: int | None = None) -> None:
    """Send `tasks` down in batches of `batch_size`; with `first` (less than it), the first batch's
    videos go in smaller ones, of `first`, then each twice the last, the last piece what is left:
    the first results come after a small batch's models, not a full one's, and every batch after
    holds the videos it would have held (where none of the first batch's is to run alone)."""
    batch: list[VideoTask] = []
    size, split_left = (first, batch_size) if first and first < batch_size else (batch_size, 0)

    def send() -> bool:
        nonlocal batch, size, split_left
        sent, batch = batch, []
        split_left = max(split_left - len(sent), 0)
        size = min(2 * size, split_left) if split_left else batch_size
        return _give(out, sent, stop)

    for task in tasks:
        if task.alone and batch and not send():
            return
        batch.append(task)
        if (len(batch) >= size or task.alone) and not send():
            return
    if batch and not send():
        return
    _give(out, _End(), stop)


def _model_segment(segment: Segment, source: queue.Queue, out: queue.Queue, stop: threading.Event,
                   turn: Callable[[], contextlib.AbstractContextManager]) -> None:
    while True:
        item = _take(source, stop)
        if isinstance(item, _End):
            _give(out, item, stop)
            return
        size = segment.batch_size or len(item)
        for start in range(0, len(item), size):
            with turn():  # (the stages take turns batch by batch, on a CPU: `_Turns`)
                try:
                    segment.stage.run(item[start:start + size])
                except DeviceLostError as exc:  # (under Ray, the worker exits and another takes the batch)
                    raise DeviceLostError(
                        f"{exc}: the run stops. The videos it finished are published, and those of this batch "
                        "with an errors row each; the same command goes on from there, running this batch's "
                        "videos one at a time after the others. Where the same video breaks the GPU again, "
                        "CUDA_LAUNCH_BLOCKING=1 names the failing call", exc.stage, exc.videos) from exc.__cause__
        if not _give(out, item, stop):
            return


def _cpu_segment(segment: Segment, pool: CpuPool, source: queue.Queue, out: queue.Queue,
                 stop: threading.Event, done: Callable[[list[VideoTask]], None] | None = None) -> None:
    decoding: deque[list[Future]] = deque()
    end: _End | None = None
    while decoding or end is None:
        if end is None and len(decoding) < _BATCHES_DECODING:
            # the next batch, or the one decoding if it ends first: a batch done goes on at once (it waited
            # for the next to come, after shot detection a whole model batch, 7-8 s on 2 cores)
            item = _take(source, stop, unless_done=decoding[0] if decoding else None)
            if isinstance(item, _End):
                end = item
                continue
            if item is not None:
                decoding.append([pool.submit(segment.cpu, task) for task in item])
                continue
        finished = pool.results(decoding.popleft())
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


def _take(source: queue.Queue, stop: threading.Event, unless_done: list[Future] | None = None) -> Any:
    """The next item of `source`; an `_End` when the pipeline was stopped meanwhile; None once every
    future of `unless_done` is done, where that comes first."""
    while not stop.is_set():
        try:
            return source.get(timeout=_POLL_S)
        except queue.Empty:
            if unless_done is not None and all(future.done() for future in unless_done):
                return None
    return _End()
