"""Reading many of an output's files in order, several at once: what compact and forget do.

On a bucket each file read is a request or two of round trip (tens of milliseconds), so an
output of 60,000 small files, read one at a time, costs the better part of an hour of waiting
for each pass over it. `read_ahead` keeps up to `READS_AT_ONCE` reads under way on threads
(fsspec's requests and Parquet's decoding release the GIL) and gives their results in order,
so that the caller's bookkeeping, and what it publishes, stays as it was one at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: reads under way at once (as many as `pipeline.manifests.LOOKUPS_AT_ONCE` lookups: a bucket
#: answers each in tens of milliseconds, whatever the others do)
READS_AT_ONCE = 16
#: bytes of whole files read ahead of the one the caller holds, where their sizes are given
BYTES_AHEAD = 64 * 2**20


def read_ahead(read: Callable[[Item], Result], items: Iterable[Item], sizes: Mapping[Item, int] | None = None,
               at_once: int | None = None, bytes_ahead: int | None = None) -> Iterator[Result]:
    """`read(item)` of each item, in the items' order, with up to `at_once` (`READS_AT_ONCE`) reads
    under way; given `sizes`, also no more than `bytes_ahead` (`BYTES_AHEAD`) bytes of the items
    after the one being waited for (an item larger than that is read once those before it are). A read's
    exception is raised when its turn comes; the reads under way then are finished first."""
    at_once = max(1, READS_AT_ONCE if at_once is None else at_once)
    budget = BYTES_AHEAD if bytes_ahead is None else bytes_ahead
    pending: deque[tuple[Future, int]] = deque()
    ahead = 0  # bytes of the pending reads after the first
    items = iter(items)
    with ThreadPoolExecutor(at_once, thread_name_prefix="vidlens-read") as pool:
        for item in items:
            size = sizes[item] if sizes is not None else 0
            # wait for the oldest read while a further one would pass either bound
            while pending and (len(pending) >= at_once or ahead + size > budget):
                ahead -= pending[1][1] if len(pending) > 1 else 0
                # (no name holds the result while the caller has it: it lets it go when done)
                yield pending.popleft()[0].result()
            if pending:
                ahead += size
            pending.append((pool.submit(read, item), size))
        while pending:
            yield pending.popleft()[0].result()
