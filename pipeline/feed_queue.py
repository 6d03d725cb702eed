"""The queue between the driver's listing and the feed's readers, run as a Ray actor.

A module of its own, importing only the standard library: the actor's process loads nothing
else (importing `pipeline.feed`, with Ray Data, would cost it 0.7 s and 100 MB).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any


class ListingQueue:
    """Listed videos waiting for a reader, handed out a group at a time.

    Items are `(video bytes, payload)` tuples, or None: a sentinel that ends one reader. Run as
    an asyncio actor (one event loop: no locks), a reader takes a whole group in one call. With
    `ray.util.queue.Queue` a reader made one call a video, and that bounded one reader to about
    300 videos a second.
    """

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._arrived = asyncio.Condition()

    async def put(self, items: list[Any]) -> None:
        """Queue `items` in order."""
        async with self._arrived:
            self._items.extend(items)
            self._arrived.notify_all()

    async def take(self, videos: int, group_bytes: int | None, linger_s: float, idle_s: float) -> list[Any]:
        """The next group: the next item (waiting up to `idle_s` for it; [] if none came) and those
        that come within `linger_s` of it, up to `videos` items and until their bytes reach
        `group_bytes` (the item that reaches it is the last; None: no limit). A sentinel ends
        the group and is its last item.
        """
        loop = asyncio.get_running_loop()
        group: list[Any] = []
        size, deadline = 0, loop.time() + idle_s

        def full() -> bool:
            return len(group) >= videos or (group_bytes is not None and size >= group_bytes)

        async with self._arrived:
            while True:
                while self._items and not full():
                    item = self._items.popleft()
                    group.append(item)
                    if item is None:
                        return group
                    size += item[0]
                    if len(group) == 1:
                        deadline = loop.time() + linger_s
                remaining = deadline - loop.time()
                if full() or remaining <= 0:
                    return group
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                    return group
