"""A bucket's next videos downloaded on threads while earlier ones decode.

A process that downloads a video before decoding it leaves its core idle for the store's
latency and the transfer. The local executor's driver downloads ahead for its pool of
workers; a Ray decode task of several videos downloads the next of them while it decodes
one (`pipeline.ray_executor`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from pipeline.lookahead import in_order_ahead
from pipeline.sources import is_remote
from schemas.config import RunConfig
from workers.task import VideoTask

log = logging.getLogger(__name__)


class DownloadAhead:
    """Remote videos downloaded on threads while earlier ones decode.

    A worker that downloads its own video leaves its core idle for the store's latency and the
    transfer: 60 real clips from an HTTP store answering after 40 ms took 12.2 s against 9.9 s
    from local files (2 cores), and more workers than cores did not win it back (the cores are
    busy). Here the next `ahead` videos download while the pool decodes, in the listing's
    order, into temporary files the tasks name (`VideoTask.local_path`). A copy is deleted when
    its video leaves the last CPU segment, or the first one when `keep` copies are kept already
    (the shot detector runs between decoding and sampling, and its queues would hold many
    videos' copies: the sample stage's worker then downloads it itself, as without this). While
    the copies on disk and those downloading take `max_bytes` (by the listed sizes), the next
    videos are left to their workers too: long videos do not fill the temp folder. A download
    that fails is left to the worker, whose errors row names it. `ahead` 0: off. A Ray task
    of several videos takes each copy over instead (`hand_over`), one video after another.
    """

    def __init__(self, config: RunConfig, ahead: int, keep: int, max_bytes: int) -> None:
        self.storage = config.storage
        self.ahead = ahead
        self.keep = keep
        self.max_bytes = max_bytes
        self._kept: set[str] = set()  # copies kept past the first CPU segment for a later one
        self._lock = threading.Lock()
        self._copies: dict[str, int] = {}  # path -> bytes
        self._bytes = 0  # of the copies, and reserved for those downloading
        self._threads = ThreadPoolExecutor(ahead, thread_name_prefix="vidlens-download") if ahead else None

    def tasks(self, tasks: Iterable[VideoTask]) -> Iterator[VideoTask]:
        """`tasks` in their order, each once its download (if it needs one) has ended."""
        if self._threads is None:
            yield from tasks
            return
        for task, download in in_order_ahead(tasks, self._start, self.ahead):
            if download is not None:
                task.local_path = download.result()
            yield task

    def passed(self, tasks: list[VideoTask], last: bool) -> None:
        """`tasks` left a CPU segment (`last`: the last one): delete the copies no later one needs."""
        for task in tasks:
            path = task.local_path
            if path is None:
                continue
            with self._lock:
                keep = not last and (path in self._kept or len(self._kept) < self.keep)
                if keep:
                    self._kept.add(path)
                else:
                    self._kept.discard(path)
            if not keep:
                self._delete(path)
                task.local_path = None

    def hand_over(self, task: VideoTask) -> str | None:
        """The task's copy (None without one), no longer this object's to count or delete."""
        path, task.local_path = task.local_path, None
        if path is not None:
            with self._lock:
                self._bytes -= self._copies.pop(path, 0)
        return path

    def close(self) -> None:
        """Stop downloading and delete every copy left (a run stopped midway)."""
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
        for path in list(self._copies):
            self._delete(path)

    def _start(self, task: VideoTask) -> Future | None:
        """The task's download, begun; None for a video that needs none or finds no room."""
        from workers.sampling import listed_version

        size = task.ref.size_bytes or 0
        if not (_downloads(task) and self._reserve(size)):
            return None
        return self._threads.submit(self._fetch, task.ref.uri, size, listed_version(task))

    def _reserve(self, size: int) -> bool:
        """Room for a copy of `size` bytes (always for one when there is none)."""
        with self._lock:
            if self._bytes and self._bytes + size > self.max_bytes:
                return False
            self._bytes += size
            return True

    def _fetch(self, uri: str, size: int, version: tuple) -> str | None:
        from workers.remote_copy import download

        try:
            path = download(uri, self.storage, version)
        except Exception as exc:  # noqa: BLE001 - the worker downloads it again and reports it
            log.info("%s: not downloaded ahead (%s); its worker will try", uri, exc)
            with self._lock:
                self._bytes -= size
            return None
        actual = os.path.getsize(path)
        with self._lock:
            self._copies[path] = actual
            self._bytes += actual - size
        return path

    def _delete(self, path: str) -> None:
        with self._lock:
            self._bytes -= self._copies.pop(path, 0)
        with contextlib.suppress(OSError):
            os.unlink(path)


def _downloads(task: VideoTask) -> bool:
    """Whether the task's video is remote and will be decoded (or sampled: not after its
    decoding failed), with no copy here already (one a Ray decode task handed on on this node)."""
    return (is_remote(task.ref.uri) and not task.ref.absent and not task.failed
            and (task.stages is None or "decode" in task.stages)
            and not (task.local_path is not None and os.path.isfile(task.local_path)))
