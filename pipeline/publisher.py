"""A run's publisher: the rows, units and ledger entries of its finished videos, queued and
published batch by batch (`pipeline.store.Store.publish`), each on a thread of its own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipeline import stop_deadline
from pipeline.failpoints import failpoint
from pipeline.stops import whole
from pipeline.store import Store
from pipeline.writer import BatchWriter
from schemas.config import RunConfig

log = logging.getLogger(__name__)

#: batches being published at once: one's staged copies deleted, the next's manifest written
#: and its files moved into place, and the next's files written under staging meanwhile. On a
#: bucket each step waits round trips: at 60 ms a request, a batch's seven in a row took 0.4 s,
#: longer than the run took to fill it.
BATCHES_AT_ONCE = 3


class Publisher:
    """Collects finished videos and publishes them batch by batch (see `pipeline.store`).

    A batch is published on a thread of its own while the next one fills: on a bucket its
    requests (its files written, the manifest, the files moved) wait tenths of a second of
    round trips, which the driver, collecting videos, would otherwise spend idle while the
    workers' finished videos wait for it. Up to `BATCHES_AT_ONCE` at once: a batch's files are
    written while the batch before is committed and moved into place, and its manifest written
    once that one is in place (in order; the batch before failed, it is never published), while
    the staged copies of the one before that are deleted. The driver waits where a full batch
    finds no room, `wait` (and the final batch) for them all; `close` on any exit, so that the
    lock is never given back while a batch is being published.
    """

    def __init__(self, store: Store, run_id: str, run_date: str, config: RunConfig):
        self.store = store
        self.run_id = run_id
        self.run_date = run_date
        self.config = config
        self.writer = BatchWriter(store, run_id, run_date, config.output.rows_per_file)
        self.entries: list[dict[str, Any]] = []
        self.batch = 0
        self.opened = time.monotonic()
        self.tables_written: set[str] = set()
        #: the run's row of the runs table as it starts: published with the first batch, so that
        #: the rows of a run killed later are described too (search needs its embed model)
        self.opening_row: Callable[[], dict[str, Any]] | None = None
        self._threads = ThreadPoolExecutor(BATCHES_AT_ONCE, thread_name_prefix="vidlens-publish")
        self._publishing: list[Future] = []  # the batches being published, oldest first
        self._raised: BaseException | None = None  # a batch's error, raised by `wait`
        self._in_place: Future | None = None  # set once the latest batch's files are in place

    def queue(self, tables: dict[str, pa.Table], entry: dict[str, Any], units: frozenset[str]) -> None:
        """Queue one video's rows (`BatchWriter.converted`), the units it recomputed and its ledger entry."""
        with whole():  # (a stop in between left a video's rows queued without its entry)
            self.writer.add_tables(tables)
            self.tables_written.update(tables)
            self.writer.attempted(entry["video_id"], units)
            self.entries.append(entry)

    def publish_if_due(self) -> None:
        """Publish the queue where the batch is full or old enough (after `queue`: apart, so that
        the caller's counts of a video are taken with it, `pipeline.recording.record`)."""
        out = self.config.output
        if len(self.entries) >= out.commit_every_videos or time.monotonic() - self.opened >= out.commit_every_s:
            self.publish()

    def publish(self, empty_tables: tuple[str, ...] = (), **extra: Any) -> None:
        """Stage the queued rows and publish them with their ledger entries as one batch, on the
        publishing thread (see the class); the final batch (`final=True`) is waited for."""
        if not self.entries and not extra and not self.writer.pending:
            return
        self._wait(len(self._publishing) - BATCHES_AT_ONCE + 1)  # room (an error of the earlier raised here)
        with whole():  # (a stop in between lost the queue, or published it without the batch's number taken)
            # swapped first: the listing (maybe on a feeder thread) may append entries meanwhile
            entries, self.entries = self.entries, []
            if self.batch == 0 and not extra.get("final") and self.opening_row is not None:
                self.writer.add("runs", [self.opening_row()])
            writer, self.writer = self.writer, self.writer.next_batch()
            batch, self.batch = self.batch, self.batch + 1
            before, self._in_place = self._in_place, Future()
            self._publishing.append(self._threads.submit(self._publish, writer, batch, entries, empty_tables, extra,
                                                         before, self._in_place))
            self.opened = time.monotonic()
        if extra.get("final"):
            self.wait()

    def _publish(self, writer: BatchWriter, batch: int, entries: list[dict[str, Any]], empty_tables: tuple[str, ...],
                 extra: dict[str, Any], before: Future | None, in_place: Future) -> None:
        """Publish a batch; `before`: set once the batch before is in place, `in_place` once this one is."""
        staged: list[str] = []
        try:
            files = writer.stage(batch, empty_tables)
            failpoint("staged")
            if before is not None:
                before.result()  # its manifest first; its error is this batch's too (staged, never published)
            manifest = {"kind": "batch", "run_id": self.run_id, "batch": batch, "run_date": self.run_date,
                        "files": files, "ledger": entries, **extra}
            self.store.publish(manifest, f"{self.run_id}-{batch:05d}.json", later=staged)
        except BaseException as exc:
            in_place.set_exception(exc)
            raise
        in_place.set_result(None)
        self.store.remove(staged)  # (while the next batch is published)

    def wait(self) -> None:
        """Wait for the batches being published; raises the first error."""
        self._wait(len(self._publishing))

    def _wait(self, batches: int) -> None:
        """Wait for the oldest `batches` of those being published, in order, and take the done
        ones after them; raises the first error."""
        while self._publishing and (batches > 0 or self._publishing[0].done()):
            batches -= 1
            publishing = self._publishing[0]
            try:
                publishing.result()
            except Exception as exc:
                self._raised = exc  # (the later batches' error too: `close` logs it no more)
                raise
            finally:
                if publishing.done():  # (not where Ctrl-C interrupted the wait: `close` waits on)
                    self._publishing.pop(0)

    def close(self) -> None:
        """Wait for the batches being published (for the run's exit, whatever ended it), through
        Ctrl-C and SIGTERM, which are raised after: the lock given back while a batch is
        published would let another job recover (delete) its staging under it. At a stop, only
        for the time its cleanup has (`pipeline.stop_deadline`): those still being published are
        then left as a killed run's, and so is the lock. Their error is logged, not raised: the
        run is failing for another reason."""
        publishing, interrupted = self._publishing, None
        while not all(future.done() for future in publishing):
            wait = stop_deadline.time_left()
            if wait == 0:
                stop_deadline.LEFT.append("the batches it was publishing: the next run rolls forward those whose "
                                          "manifest was written, and clears the others and does their videos again")
                break
            try:
                futures.wait(publishing, timeout=wait)
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = exc
                log.warning("finishing the batches being published before the output's lock is given back")
        # (a batch after one that failed failed with its error: logged once)
        errors = {id(error): error for future in publishing if future.done()
                  if not future.cancelled() and (error := future.exception()) not in (None, self._raised)}
        for error in errors.values():
            log.error("publishing a batch failed too: %s", error)
        self._publishing = []
        self._threads.shutdown(wait=False)  # (idle now: nothing to join, which Ctrl-C could interrupt)
        if interrupted is not None:
            raise interrupted
