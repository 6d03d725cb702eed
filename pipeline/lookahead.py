"""Work started a bounded number of items ahead, handed out in the items' order.

A manifest's bucket lookups (`pipeline.manifests`) and the downloads of videos ahead
(`pipeline.downloads.DownloadAhead`) each start slow I/O for the next items on a thread pool
while the consumer works on the earlier ones, and must hand the items out in their order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def in_order_ahead(items: Iterable[T], start: Callable[[T], Future | None],
                   ahead: int) -> Iterator[tuple[T, Future | None]]:
    """Each item with `start(item)` (its work, or None for none), in the items' order.

    Items are started while at most `ahead` wait past the one handed out; one comes out as
    soon as its work and that of every item before it has ended, or when `ahead` are waiting
    (the caller then waits on its future). Stopped early, or failing, the work not yet begun
    is cancelled.
    """
    pending: deque[tuple[T, Future | None]] = deque()
    try:
        for item in items:
            pending.append((item, start(item)))
            while len(pending) > ahead or (pending and (pending[0][1] is None or pending[0][1].done())):
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        for _, future in pending:
            if future is not None:
                future.cancel()
