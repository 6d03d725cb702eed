"""Feeding tasks into one Ray Data execution while the listing is still running.

A thread on the driver pulls `VideoTask`s from the listing (a generator: a bucket page
or a manifest chunk at a time) and puts them, pickled, on a queue actor (`ListingQueue`).
The dataset's read tasks take them off the queue a group at a time and emit one small block
per group of videos (one row: what the first CPU task takes), so the streaming executor
starts decoding the first video while the listing goes on. A group is what the queue holds
or receives within a second, up to a number of videos and of bytes: small clips share a Ray
task (whose own cost is more than decoding a short clip's sampled frames), a large video has
one to itself, and a listing that trickles holds a video back for a second at most. The
number of videos between the listing and the end of the pipeline is bounded, which holds
the listing back while the workers are busy. Only video references (a few hundred bytes
each) travel this way, never video bytes.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.ray_cluster import cause_in_a_line
from workers.stage import GROUP_COLUMN, encode_group
from workers.task import VideoTask

log = logging.getLogger(__name__)

#: a reader gives up waiting for the next video after this long with no word from the driver.
_READER_IDLE_TIMEOUT_S = 24 * 3600.0
#: CPUs a reader declares: none, as it only waits on the queue. Not equal to any stage's share (a
#: stage declares more than 0), so Ray Data does not fuse the reader with the decode stage (which
#: would decode one video per reader at a time). Even a sliver would cost a decode task on its
#: node: on a GPU node decode tasks take a whole CPU each, and a reader of 0.01 CPU left one of
#: them unused (16 CPUs: the model actor's 1, then 14 decode tasks, not 15).
READER_CPUS = 0
#: memory a reader declares to Ray's scheduler: a worker process holds ~110 MiB doing nothing else.
READER_MEMORY = 192 * 1024**2
#: a reader's own runtime env: Ray never reuses a worker process across runtime envs, so the
#: reader's worker never takes a decode task. Without it, once a long listing ended, Ray could
#: hand the next decode task to the reader's idle worker, which then built the CPU stages and
#: stayed beside the working decode worker, idle at ~280 MiB, until the run ended (1 of 5 runs of
#: benchmark 4 at 1,000 clips, 2 of 5 the session before). A short listing's reader now leaves
#: its worker idle rather than decoding in it (Ray ends idle workers beyond about one a CPU).
READER_RUNTIME_ENV = {"env_vars": {"VIDLENS_ROLE": "listing-reader"}}
#: puts the feeding thread sends before it waits for the queue to have taken them. Waiting for
#: each (1 ms) bounded the feed to about 1,000 videos a second, and cost the driver's CPU.
_PUTS_UNSETTLED = 32
#: how long a reader waits for more videos to fill a group. Once the pipeline is full, the
#: listing sends a video for each one finished, so groups fill at the pipeline's own pace:
#: taking only what was queued at that instant (or within 0.1 s) made groups of one or two,
#: and Ray's cost for each of the extra tasks slowed a 1,000-clip run on 2 cores 1.4-1.6x.
#: Where videos come slower than four a second, a task's cost hardly matters beside theirs.
GROUP_LINGER_S = 1.0


def _drain(take: Callable[[], list[Any]]) -> Iterator[Any]:
    """The body of one read task: one single-row block per group that `take` gives (see
    `ListingQueue.take`), until a sentinel."""
    import pyarrow as pa

    while True:
        group = take()
        if not group:
            raise TimeoutError(f"no word from the driver's listing in {_READER_IDLE_TIMEOUT_S:.0f} s")
        ended = group[-1] is None
        if ended:
            group.pop()
        if group:
            body = encode_group(payload for _, payload in group)
            yield pa.table({GROUP_COLUMN: pa.array([body], type=pa.binary())})
        if ended:
            return


class TaskFeed:
    """A Ray Data datasource over a queue that a driver thread fills from an iterator of tasks.

    Use as a context manager: `with TaskFeed(tasks, readers, in_flight) as feed: ds = feed.dataset()`,
    and call `feed.finished()` for every video that comes out of the dataset. Its rows are
    groups of up to `videos_per_group` videos and (but for the last video in) `group_bytes`
    (see `_drain`); `workers.stage.unpack` gives their tasks. At most
    `in_flight` videos are between the listing and the end of the pipeline at any time (the
    listing waits for a slot), so neither the driver nor Ray's object store ever holds a whole
    bucket's listing. On exit the feeding thread is stopped and the queue actor released; an
    error raised by the listing is raised again from `check()`.
    """

    def __init__(self, tasks: Iterable[VideoTask], readers: int = 1, in_flight: int = 256,
                 videos_per_group: int = 1, group_bytes: int | None = None) -> None:
        import ray

        from pipeline.feed_queue import ListingQueue

        self.readers = max(1, readers)
        self.in_flight = max(1, in_flight)
        self.videos_per_group = max(1, videos_per_group)
        self.group_bytes = group_bytes
        # the queue actor does no work of its own: it must never wait for a free CPU. Its size is
        # bounded by the slots below: a video is queued only once it has one. On the driver's node:
        # Ray placed it on any node, and a queue lost with another node (a killed or preempted worker
        # node) failed the job with a traceback, where the tasks and actors lost with it are retried.
        # Not soft: Ray places an actor that asks for no resources on a random node whatever a soft
        # affinity says (6 of 10 queues elsewhere on 3 nodes, 2026-12-07), and the rerun of lost videos
        # lost its queue with a node killed moments before (exit 2). That node gone, so is the driver
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = ray.remote(ListingQueue).options(num_cpus=0, scheduling_strategy=here).remote()
        self.fed = 0
        self._tasks = tasks
        self._unsettled: list = []  # puts not yet known to have reached the queue
        self._slots = threading.Semaphore(self.in_flight)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name="vidlens-feed", daemon=True)

    def finished(self) -> None:
        """One video came out of the pipeline: the listing may send one more."""
        self._slots.release()

    def __enter__(self) -> "TaskFeed":
        import ray.data

        # one block per row (a reader's group of videos, a stage's video): Ray Data would otherwise
        # hold a reader's rows back until 128 MiB of them pile up (that is, until the listing ends),
        # and batch videos into blocks by size
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
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        context.target_max_block_size = self._block_size
        context._max_num_blocks_in_streaming_gen_buffer = self._stream_buffer
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            ray.kill(self.queue)
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            pass

    def dataset(self) -> Any:
        """A Ray dataset of groups of pickled tasks, one block per group, read from the queue."""
        import ray.data

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            return ray.data.read_datasource(
                _QueueDatasource(self.queue, self.readers, self.videos_per_group, self.group_bytes),
                override_num_blocks=self.readers,
                num_cpus=READER_CPUS,
                memory=READER_MEMORY,
                runtime_env=READER_RUNTIME_ENV,
                # never retried: a retry takes the queue's next groups, and Ray drops as many of its
                # first outputs as the dead reader gave (replays, it assumes): those videos were
                # lost, holding their places in flight, and the run waited a day. A dead reader's
                # videos are lost blocks instead, run again at the end, and the listing goes on
                # in the next execution
                ray_remote_args={"max_retries": 0},
            )

    def check(self) -> None:
        """Raise the listing's error, if it raised one."""
        if self._error is not None:
            raise self._error

    def _feed(self) -> None:
        try:
            for task in self._tasks:
                if not self._take_slot():
                    return
                self._put((task.ref.size_bytes, task.to_bytes()))
                self.fed += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer through check()
            self._error = exc
            log.error("listing the videos failed after %d: %s", self.fed, exc)
        try:
            self._settle()  # every video is queued before the first sentinel
            for _ in range(self.readers):
                self._put(None)
            self._settle()
        except Exception as exc:  # noqa: BLE001 - the queue lost (its node killed): its readers fail, their videos
            # lost, as the executor counts them; raised here, it was a thread's traceback on the console (soak
            # of Ray on S3 with both worker nodes killed, 2026-12-07)
            log.warning("the listing's queue was lost after %d videos were listed: %s", self.fed, cause_in_a_line(exc))

    def _take_slot(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=1.0):
                return True
        return False

    def _put(self, payload: tuple[int, bytes] | None) -> None:
        """Queue one video, or a reader's sentinel (None). The queue has room (the slots bound it),
        so the call is not waited for: only every `_PUTS_UNSETTLED`th, for its errors."""
        self._unsettled.append(self.queue.put.remote([payload]))
        if len(self._unsettled) >= _PUTS_UNSETTLED:
            self._settle()

    def _settle(self) -> None:
        """Wait until the queue has taken every put so far (raises the queue actor's error)."""
        import ray

        ray.get(self._unsettled)
        self._unsettled.clear()


class _QueueDatasource(Datasource):
    """`readers` read tasks, each draining the shared queue until its sentinel."""

    def __init__(self, queue: Any, readers: int, videos_per_group: int, group_bytes: int | None) -> None:
        self.queue = queue
        self.readers = readers
        self.videos_per_group = videos_per_group
        self.group_bytes = group_bytes

    def estimate_inmemory_data_size(self) -> int | None:
        """Unknown: the listing is still running."""
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """One read task per reader, whatever parallelism Ray Data asks for."""
        queue, videos, group_bytes = self.queue, self.videos_per_group, self.group_bytes
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)

        def take() -> list[Any]:
            import ray

            return ray.get(queue.take.remote(videos, group_bytes, GROUP_LINGER_S, _READER_IDLE_TIMEOUT_S))

        return [ReadTask(lambda: _drain(take), metadata) for _ in range(self.readers)]

    def get_name(self) -> str:
        """The operator's name in Ray Data's progress and stats."""
        return "VideoListing"
