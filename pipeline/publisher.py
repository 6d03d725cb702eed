"""A run's publisher: the rows, units and ledger entries of its finished videos, queued and
published batch by batch (`pipeline.store.Store.publish`), each on a thread of its own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipeline.store import Store, failpoint
from pipeline.writer import BatchWriter
from schemas.config import RunConfig

log = logging.getLogger(__name__)


class Publisher:
    """Collects finished videos and publishes them batch by batch (see `pipeline.store`).

    A batch is published on a thread of its own while the next one fills: on a bucket its
    requests (its files written, the manifest, the files moved) wait tenths of a second of
    round trips, which the driver, collecting videos, would otherwise spend idle while the
    workers' finished videos wait for it. One batch at a time, in order: a batch's publish waits
    for the one before, and `wait` (and the final batch) for the last; `close` on any exit, so
    that the lock is never given back while a batch is being published.
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
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vidlens-publish")
        self._publishing: Future | None = None  # the batch being published

    def add(self, rows: dict[str, list[dict[str, Any]]], entry: dict[str, Any], units: frozenset[str]) -> None:
        """Queue one video's rows, the units it recomputed and its ledger entry; publish when the
        batch is full or old enough."""
        for table, table_rows in rows.items():
            self.writer.add(table, table_rows)
            self.tables_written.update([table] if table_rows else [])
        self.writer.attempted(entry["video_id"], units)
        self.entries.append(entry)
        out = self.config.output
        if len(self.entries) >= out.commit_every_videos or time.monotonic() - self.opened >= out.commit_every_s:
            self.publish()

    def publish(self, empty_tables: tuple[str, ...] = (), **extra: Any) -> None:
        """Stage the queued rows and publish them with their ledger entries as one batch, on the
        publishing thread (see the class); the final batch (`final=True`) is waited for."""
        if not self.entries and not extra and not self.writer.pending:
            return
        self.wait()  # the batch before (its error raised here, before a later batch is published)
        # swapped first: the listing (maybe on a feeder thread) may append entries meanwhile
        entries, self.entries = self.entries, []
        if self.batch == 0 and not extra.get("final") and self.opening_row is not None:
            self.writer.add("runs", [self.opening_row()])
        writer, self.writer = self.writer, self.writer.next_batch()
        batch, self.batch = self.batch, self.batch + 1
        self._publishing = self._thread.submit(self._publish, writer, batch, entries, empty_tables, extra)
        self.opened = time.monotonic()
        if extra.get("final"):
            self.wait()

    def _publish(self, writer: BatchWriter, batch: int, entries: list[dict[str, Any]], empty_tables: tuple[str, ...],
                 extra: dict[str, Any]) -> None:
        files = writer.stage(batch, empty_tables)
        failpoint("staged")
        manifest = {"kind": "batch", "run_id": self.run_id, "batch": batch, "run_date": self.run_date,
                    "files": files, "ledger": entries, **extra}
        self.store.publish(manifest, f"{self.run_id}-{batch:05d}.json")

    def wait(self) -> None:
        """Wait for the batch being published, if one is; raises its error."""
        publishing = self._publishing
        if publishing is not None:
            try:
                publishing.result()
            finally:
                if publishing.done():  # (not where Ctrl-C interrupted the wait: `close` waits on)
                    self._publishing = None

    def close(self) -> None:
        """Wait for the batch being published, if one is (for the run's exit, whatever ended it),
        through Ctrl-C and SIGTERM, which are raised after: the lock given back while a batch is
        published would let another job recover (delete) its staging under it. Its error is
        logged, not raised: the run is failing for another reason."""
        publishing, interrupted = self._publishing, None
        while publishing is not None and not publishing.done():
            try:
                futures.wait([publishing])
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = exc
                log.warning("finishing the batch being published before the output's lock is given back")
        if publishing is not None and not publishing.cancelled() and publishing.exception() is not None:
            log.error("publishing batch %d failed too: %s", self.batch - 1, publishing.exception())
        self._publishing = None
        self._thread.shutdown(wait=False)  # (idle now: nothing to join, which Ctrl-C could interrupt)
        if interrupted is not None:
            raise interrupted
