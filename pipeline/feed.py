"""Feeding tasks into one Ray Data execution while the listing is still running.

A thread on the driver pulls `VideoTask`s from the listing (a generator: a bucket page
or a manifest chunk at a time) and puts them, pickled, on a bounded `ray.util.queue.Queue`.
The dataset's read tasks take them off the queue and emit one small block per video, so
the streaming executor starts decoding the first video while the listing goes on. The
number of videos between the listing and the end of the pipeline is bounded, which holds
the listing back while the workers are busy. Only video references (a few hundred bytes
each) travel this way, never video bytes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from workers.stage import TASK_COLUMN
from workers.task import VideoTask

log = logging.getLogger(__name__)

#: a reader gives up waiting for the next video after this long with no word from the driver.
_READER_IDLE_TIMEOUT_S = 24 * 3600.0
#: CPUs a reader declares: it only waits on the queue. Not equal to any stage's share, so Ray Data
#: does not fuse the reader with the decode stage (which would decode one video per reader at a time).
READER_CPUS = 0.01
#: memory a reader declares to Ray's scheduler: a worker process holds ~110 MiB doing nothing else.
READER_MEMORY = 192 * 1024**2


def _drain(queue: Any) -> Iterator[Any]:
    """The body of one read task: one single-row block per queued task, until a sentinel."""
    import pyarrow as pa

    while True:
        payload = queue.get(block=True, timeout=_READER_IDLE_TIMEOUT_S)
        if payload is None:
            return
        yield pa.table({TASK_COLUMN: pa.array([payload], type=pa.binary())})


class TaskFeed:
    """A Ray Data datasource over a queue that a driver thread fills from an iterator of tasks.

    Use as a context manager: `with TaskFeed(tasks, readers, in_flight) as feed: ds = feed.dataset()`,
    and call `feed.finished()` for every video that comes out of the dataset. At most
    `in_flight` videos are between the listing and the end of the pipeline at any time (the
    listing waits for a slot), so neither the driver nor Ray's object store ever holds a whole
    bucket's listing. On exit the feeding thread is stopped and the queue actor released; an
    error raised by the listing is raised again from `check()`.
    """

    def __init__(self, tasks: Iterable[VideoTask], readers: int = 2, in_flight: int = 256) -> None:
        from ray.util.queue import Queue

        self.readers = max(1, readers)
        self.in_flight = max(1, in_flight)
        # the queue actor does no work of its own: it must never wait for a free CPU
        self.queue = Queue(maxsize=self.in_flight, actor_options={"num_cpus": 0})
        self.fed = 0
        self._tasks = tasks
        self._slots = threading.Semaphore(self.in_flight)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name="vidlens-feed", daemon=True)

    def finished(self) -> None:
        """One video came out of the pipeline: the listing may send one more."""
        self._slots.release()

    def __enter__(self) -> "TaskFeed":
        import ray.data

        # one block per video: Ray Data would otherwise hold a reader's rows back until 128 MiB
        # of them pile up (that is, until the listing ends), and batch videos into blocks by size
        context = ray.data.DataContext.get_current()
        self._block_size, context.target_max_block_size = context.target_max_block_size, 1
        # a stage's batch of N videos then leaves its task or actor as N blocks, and Ray Data pauses
        # a task with two blocks unread until the driver's executor takes them: a model waited
        # for each of its videos in turn. The videos in flight bound what may pile up instead.
        self._stream_buffer = context._max_num_blocks_in_streaming_gen_buffer
        context._max_num_blocks_in_streaming_gen_buffer = self.in_flight
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.target_max_block_size = self._block_size
        context._max_num_blocks_in_streaming_gen_buffer = self._stream_buffer
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.queue.shutdown(force=True)
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            pass

    def dataset(self) -> Any:
        """A Ray dataset of pickled tasks, one block per video, read from the queue."""
        import ray.data

        return ray.data.read_datasource(
            _QueueDatasource(self.queue, self.readers),
            override_num_blocks=self.readers,
            num_cpus=READER_CPUS,
            memory=READER_MEMORY,
        )

    def check(self) -> None:
        """Raise the listing's error, if it raised one."""
        if self._error is not None:
            raise self._error

    def _feed(self) -> None:
        try:
            for task in self._tasks:
                if not self._take_slot() or not self._put(task.to_bytes()):
                    return
                self.fed += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer through check()
            self._error = exc
            log.error("listing the videos failed after %d: %s", self.fed, exc)
        for _ in range(self.readers):
            if not self._put(None):
                return

    def _take_slot(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=1.0):
                return True
        return False

    def _put(self, payload: bytes | None) -> bool:
        from ray.util.queue import Full

        while not self._stop.is_set():
            try:
                self.queue.put(payload, block=True, timeout=1.0)
                return True
            except Full:
                continue
        return False


class _QueueDatasource(Datasource):
    """`readers` read tasks, each draining the shared queue until its sentinel."""

    def __init__(self, queue: Any, readers: int) -> None:
        self.queue = queue
        self.readers = readers

    def estimate_inmemory_data_size(self) -> int | None:
        """Unknown: the listing is still running."""
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """One read task per reader, whatever parallelism Ray Data asks for."""
        queue = self.queue
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(lambda: _drain(queue), metadata) for _ in range(self.readers)]

    def get_name(self) -> str:
        """The operator's name in Ray Data's progress and stats."""
        return "VideoListing"
