"""The output's published tables: staging, commit manifests, the ledger (and its DuckDB views,
`pipeline.views`). The files themselves (paths, and the writes, copies and deletes that differ
between a local folder and a bucket) are `pipeline.output_files`, which `Store` builds on.

Layout under OUT (a local folder or any fsspec URL such as s3://bucket/prefix):

    <table>/run_date=YYYY-MM-DD/part-<run_id>-<batch>-<n>.parquet   published rows (hive style)
    _vidlens/attempts/run_date=.../part-<run_id>-<batch>-00.parquet   the units each run recomputed per video
    _vidlens/staging/<run_id>/<table>/run_date=.../part-...parquet    rows of batches not yet published
    _vidlens/commits/<run_id>-<batch>.json                            one manifest per published batch
    _vidlens/snapshots/ledger-<last manifest>.parquet                 the ledger folded so far
    _vidlens/lock                                                     held by the running job

A batch is published by writing its manifest (the atomic step: a rename, or one PUT on a
bucket); its staged files are then moved to their final names. Readers resolve each listed
file to whichever of the two names exists, so they see whole batches or nothing. The ledger
is the fold of all manifests in name order (run ids sort by time; `pipeline.snapshot`).
Names starting with "_" are skipped by pyarrow, pandas and Spark dataset discovery.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.ledger import ATTEMPTS, LEDGER_SCHEMA, ledger_table
from pipeline.output_files import OutputFiles, forget_listings
from pipeline.parquet_reading import arrow_file
from pipeline.failpoints import failpoint
from pipeline.snapshot import State, fold, load_snapshot, write_snapshot

log = logging.getLogger(__name__)

META = "_vidlens"
_FORMAT = 1


class NoOutputs(ValueError):
    """Nothing was ever published at the path given as an output (`Store.require_outputs`)."""


class Store(OutputFiles):
    """One output location: its published tables, read and written through fsspec."""

    def __init__(self, out: str, storage_options: dict | None = None):
        super().__init__(out, storage_options)
        self._cache: State | None = None
        #: called before each manifest is written: the bucket lock's check that this job still
        #: holds it (`pipeline.lock`), which raises where another job has taken it over
        self.publish_guard: Callable[[], None] | None = None
        #: the names of the manifests this object wrote, oldest first: a run that failed names
        #: itself in its summary only where one of its batches was published (`pipeline.job`)
        self.written: list[str] = []

    # --- staging ---------------------------------------------------------------------------

    def staged_name(self, run_id: str, table: str, run_date: str, name: str) -> tuple[str, str]:
        """(final, staged) relative paths of a file of one table written by one run."""
        final = f"{table}/run_date={run_date}/{name}"
        staged = f"{META}/staging/{run_id}/{final}"
        # the attempts record is the views' bookkeeping, not a table: kept out of the tables' folders
        return (f"{META}/{final}" if table == ATTEMPTS else final), staged

    def stage_file(self, data: Any, table: str, run_date: str, name: str, staging_id: str,
                   run_id: str | None = None) -> dict[str, Any]:
        """Write `data` (a pyarrow table) under `staging_id`'s staging folder as the file `name`
        of `table` and `run_date` will be published; returns its record for a manifest (`run_id`:
        the run whose rows it holds, `staging_id` by default)."""
        final, staged = self.staged_name(staging_id, table, run_date, name)
        target = self.path(staged)
        self.makedirs(posixpath.dirname(target))
        if self.is_local:  # on disk before the manifest that names it: a power cut left 0-byte files it named
            with open(target, "wb") as handle:
                pq.write_table(data, handle, compression="zstd")
                handle.flush()
                os.fsync(handle.fileno())
        else:
            with self.fs.open(target, "wb") as handle:
                pq.write_table(data, handle, compression="zstd")
        return {"table": table, "path": final, "staged": staged, "rows": data.num_rows,
                "run_id": staging_id if run_id is None else run_id, "run_date": run_date}

    def stage_files(self, files: list[tuple[Any, str, str]], run_date: str, staging_id: str) -> list[dict[str, Any]]:
        """`stage_file` of each (data, table, name) of `files` (at once on a bucket); their records, in order."""
        return self.each(lambda file: self.stage_file(file[0], file[1], run_date, file[2], staging_id), files)

    # --- manifests and the ledger -----------------------------------------------------------

    def manifests(self) -> list[str]:
        """Names of the published manifests, oldest first."""
        folder = self.path(META, "commits")
        self.fs.invalidate_cache(folder)  # bucket filesystems cache listings; another process may have published
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))

    def newest_manifest(self) -> str:
        """The name of the newest published manifest ("" where there is none)."""
        names = self.manifests()
        return names[-1] if names else ""

    def _read_json(self, relative: str) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(self.path(relative)))

    def state(self, entries: bool = True) -> State:
        """The folded manifests (from the newest snapshot on), cached, and kept current by this
        store's own publishing; rebuilt when the output holds manifests the cache lacks.

        With `entries` False (the readers: views, file lists) the snapshot's ledger stays a table
        (`State.snapshot_ledger`): made entries and then a table, 2M videos took ~3 GB and ~30 s.
        """
        names = self.manifests()
        cache = self._cache
        if cache is not None and cache.folded == set(names) and (cache.snapshot_ledger is None or not entries):
            return cache
        state = load_snapshot(self.fs, self.path(META, "snapshots"), names, entries)
        for name in names:
            if name not in state.folded:
                fold(state, self._read_json(f"{META}/commits/{name}"), name)
        self._cache = state
        return state

    def ledger_entries(self) -> Mapping[str, dict[str, Any]]:
        """The current ledger entry of each source URI: the store's own, read-only, not a copy
        (a run over a large output would hold the ledger twice)."""
        return MappingProxyType(self.state().entries)

    def ledger(self, state: State | None = None) -> pa.Table:
        """The ledger as a table: one row per source URI (see `pipeline.ledger.LEDGER_SCHEMA`); that
        of `state` where given (as for `committed_files`)."""
        state = self.state(entries=False) if state is None else state
        folded = ledger_table(state.entries)
        if state.snapshot_ledger is None:
            return folded
        snapshot = state.snapshot_ledger
        snapshot = pa.table([snapshot[f.name] if f.name in snapshot.column_names else pa.nulls(len(snapshot), f.type)
                             for f in LEDGER_SCHEMA], schema=LEDGER_SCHEMA)
        if not folded.num_rows:
            return snapshot  # (written sorted by URI)
        older = snapshot.filter(pc.invert(pc.is_in(snapshot["uri"], value_set=folded["uri"])))
        return pa.concat_tables([older, folded]).sort_by("uri")

    def has_ledger(self) -> bool:
        """Whether anything was ever published here."""
        return bool(self.manifests())

    def require_outputs(self) -> None:
        """ValueError where nothing was ever published here: a wrong path, which a command that
        changes an output (forget, compact) must not make an output of by taking its lock."""
        if not self.has_ledger():
            self.require_bucket()  # a mistyped bucket is named as one
            raise NoOutputs(first_run_message(self, "run this command again")
                            or f"{self.out} holds no vidlens outputs: check the path (it is the --out of a run)")

    def committed_files(self, table: str, state: State | None = None) -> list[str]:
        """URLs of the published files of a table, each under whichever name it has right now;
        those of `state` where given (one state for several tables: each `state()` lists the
        manifests again, a request on a bucket)."""
        state = self.state(entries=False) if state is None else state
        records = [r for r in state.files.values() if r["table"] == table]
        if not records:
            return []
        present = self._existing([r["path"] for r in records] + [r["staged"] for r in records if r["staged"]])
        urls = []
        for record in records:
            for relative in (record["path"], record["staged"]):
                if relative and relative in present:
                    urls.append(self.url(relative))
                    break
            else:
                log.warning("published file %s is missing from %s", record["path"], self.out)
        return urls

    def open_url(self, url: str):
        """A published file, by the URL `committed_files` gives, open for reading."""
        return self.fs.open(url if self.is_local else self.fs._strip_protocol(url), "rb")

    def read_table(self, url: str, columns: list[str] | None = None) -> pa.Table:
        """A published file's rows (only `columns`, where given), by the URL `committed_files` gives."""
        with self.open_url(url) as handle:
            return pq.read_table(arrow_file(handle), columns=columns)

    def _existing(self, relatives: list[str]) -> set[str]:
        # one recursive listing per top folder rather than one request per file (buckets); under
        # META, per folder of it (staging, attempts), not the whole of it
        tops = {"/".join(r.split("/", 2)[:2]) if r.startswith(f"{META}/") else r.split("/", 1)[0]
                for r in relatives}
        found: set[str] = set()
        prefix = self.root.rstrip("/") + "/"
        for top in tops:
            forget_listings(self.fs, self.path(top))
            try:
                for full in self.fs.find(self.path(top)):
                    found.add(full[len(prefix):] if full.startswith(prefix) else full)
            except FileNotFoundError:
                continue
        return found

    # --- publishing ------------------------------------------------------------------------

    def publish(self, manifest: dict[str, Any], name: str, later: list[str] | None = None) -> None:
        """Publish a batch: write its manifest atomically, then move its staged files into place.

        On a bucket a move is a copy, and the staged copies are deleted after it: given `later`,
        their paths are added to it instead, for `remove` once the caller has moved on (killed
        before, `recover` copies them into place again and deletes them).
        """
        if self.publish_guard is not None:
            self.publish_guard()
        manifest = {"format": _FORMAT, **manifest}
        body = json.dumps(manifest, sort_keys=True, default=str).encode()
        self._write_manifest(name, body)
        self.written.append(name)  # (published: its files are moved into place by this or the next command)
        failpoint("committed")
        if self._cache is not None and name > self._cache.upto:
            # folded here as a reader would fold it, so the next `state()` reads no manifest
            # again (a run's end had read back every batch it published: one GET each on a
            # bucket); a cache that misses another writer's manifests is rebuilt by `state()`
            fold(self._cache, json.loads(body), name)
        else:
            self._cache = None  # out of name order (a clock behind): fold everything again
        self.move_into_place(manifest, staged_known=True, later=later)

    def publish_replacing(self, manifest: dict[str, Any], name: str, replaced: list[dict[str, Any]],
                          staging_id: str) -> None:
        """Publish `manifest` (staged files) in place of the published files of the records
        `replaced`, as compaction and `vidlens forget` do; then delete those and the staging folder
        (killed before that, `recover` deletes them: the manifest lists them as `replaces`)."""
        self.publish({**manifest, "replaces": [r["path"] for r in replaced]}, name)
        self.delete_present([relative for record in replaced for relative in (record["path"], record.get("staged"))
                      if relative])
        self.drop_staging(staging_id)

    def read_manifest(self, name: str) -> dict[str, Any]:
        """A published manifest, by name (see `manifests`)."""
        return self._read_json(f"{META}/commits/{name}")

    def rewrite_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        """Replace a published manifest atomically (`vidlens forget` takes ledger entries out of
        old ones); what the output shows must not change but for what is taken out."""
        self._write_manifest(name, json.dumps(manifest, sort_keys=True, default=str).encode())
        self._cache = None

    def _write_manifest(self, name: str, body: bytes) -> None:
        commits = self.path(META, "commits")
        self.makedirs(commits)
        final = posixpath.join(commits, name)
        if self.is_local:
            temporary = posixpath.join(commits, f".tmp-{uuid.uuid4().hex}-{name}")
            with open(temporary, "wb") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
            _sync_folder(commits)  # the rename itself
        else:
            self.fs.pipe_file(final, body)  # one PUT: the object appears whole or not at all

    def move_into_place(self, manifest: dict[str, Any], staged_known: bool = False,
                         later: list[str] | None = None) -> int:
        """Move a published manifest's staged files to their final names: those still staged
        (all, where `staged_known`: just staged for it); returns how many were moved. `later`:
        see `publish`."""
        records = [r for r in manifest.get("files", []) if r.get("staged")]
        if not staged_known:
            still = set(self._there([record["staged"] for record in records]))
            records = [record for record in records if record["staged"] in still]

        def move(record: dict[str, Any]) -> None:
            if self.is_local:
                self.makedirs(posixpath.dirname(self.path(record["path"])))
                self.fs.mv(self.path(record["staged"]), self.path(record["path"]))
            else:  # a copy, the staged files deleted after it: not fs.mv's five requests a file
                self._copy(self.path(record["staged"]), self.path(record["path"]))

        self.each(move, records, after_first=lambda: failpoint("moving"))
        if not self.is_local:
            staged = [self.path(record["staged"]) for record in records]
            if later is None:
                self.remove(staged)
            else:
                later.extend(staged)
        return len(records)

    def recover(self) -> Counter:
        """Finish what a killed command left (`pipeline.recovery.recover`); call it while
        holding the lock. Returns counts of what was done."""
        from pipeline.recovery import recover

        return recover(self)

    def drop_staging(self, run_id: str) -> None:
        """Remove a run's (empty) staging folder once all its batches are published."""
        folder = self.path(META, "staging", run_id)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)

    # --- snapshots -------------------------------------------------------------------------

    def write_snapshot(self, keep: int = 2) -> str | None:
        """Save the folded ledger and file list, so later readers fold only newer manifests;
        the `keep` newest snapshots stay (a reader may be loading the one before)."""
        state = self.state()
        if not state.upto:
            return None
        folder = self.path(META, "snapshots")
        self.makedirs(folder)
        return write_snapshot(self.fs, folder, state, keep)

    # --- reading with DuckDB -----------------------------------------------------------------

    def register_duckdb(self, con: Any) -> list[str]:
        """Create the output's views on a DuckDB connection; returns their names (see
        `pipeline.views.register_views`)."""
        from pipeline.views import register_views

        return register_views(self, con)


def _sync_folder(folder: str) -> None:
    """Flush a local folder's entries (a file renamed into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


#: the time at the start of every id `time_ordered_id` makes, and so of every manifest's name
_ID_TIME = "%Y%m%dT%H%M%S%fZ"
_ID_TIME_CHARS = len("20240101T000000000000Z")


def first_run_message(store: Store, then: str) -> str | None:
    """What to say of an output where nothing is published yet and a job holds its lock (its first
    run, under way): to `then` once its first batch is published; None where no job holds it."""
    from pipeline.lock import describe_job, job_holding

    holder = job_holding(store)
    if holder is None:
        return None
    return (f"{store.out} holds no vidlens outputs yet: its first run, {describe_job(holder)}, is under way and "
            f"publishes its results in batches (output.commit_every_videos, commit_every_s): {then} once its first "
            "batch is published")


def time_ordered_id(suffix: str, after: str = "") -> str:
    """An id that sorts by when it was made (UTC, to the microsecond), then `suffix`: a run's, a
    compaction's or a forget's, so that each one's manifests fold after those it follows; and
    after `after`, the output's newest manifest (`Store.newest_manifest`): made on a host whose
    clock is behind that of the host that published it, its manifests folded before, and a
    compaction's brought back the files it had replaced (a video's rows twice in the views)."""
    made = datetime.now(timezone.utc)
    try:
        newest = datetime.strptime(after[:_ID_TIME_CHARS], _ID_TIME).replace(tzinfo=timezone.utc)
    except ValueError:  # (none)
        newest = None
    if newest is not None and newest >= made:
        made = newest + timedelta(microseconds=1)
    return made.strftime(_ID_TIME) + "-" + suffix
