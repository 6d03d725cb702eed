"""`vidlens compact`: merge the many small files of past runs into few large ones.

Per table and run date, the rows still visible (in the latest view or the history view)
are rewritten into files of up to `rows_per_file` rows; rows no view shows any more (an
earlier run of the same date, a superseded unit) are dropped, and so are the store's records
of what each run attempted (`pipeline.ledger.ATTEMPTS`) that the history views no longer go
by: they go by the latest attempt at each unit, and at all, per video and date. A compaction
manifest lists the new files and the files they replace, and is published like a batch, so
readers switch from the old file list to the new one at once. The latest and history views
return the same rows before and after.

A date's rows can be far more than memory (the frames and thumbnails of a first run over 2M
videos: tens of GB), so a group is read a file at a time, twice: first the columns whether a
row stays goes by (it depends on the date's other files), then each file whole, its rows kept
filtered into the new file being built. At most one input file's rows and `rows_per_file` rows
of the new file are held, and the bytes of the next input files as they arrive (the next
one's, and up to `pipeline.read_ahead.BYTES_AHEAD` after it): on a bucket the files are read
several at once.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from functools import partial
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ledger import ATTEMPTS, ATTEMPTS_SCHEMA, unit_of
from pipeline.lock import OutputLock
from pipeline.output_checks import check_run_date
from pipeline.parquet_reading import arrow_file
from pipeline.read_ahead import read_ahead
from pipeline.store import Store, time_ordered_id
from schemas.tables import table_schema

log = logging.getLogger(__name__)


def compact(out: str, storage_options: dict | None = None, run_date: str | None = None,
            rows_per_file: int = 500_000) -> Counter:
    """Compact the published files of `out` (only those of `run_date` when given); returns counts
    of the tables' files and rows before and after (`files_before`, `rows_after`, ...), of those
    left as they were (`files_left`: a table's one file of a date), and of the attempts
    record's apart (`attempts_files_before`, ...)."""
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows per file (--rows-per-file) must be a whole number of at least 1, got {rows_per_file!r}")
    if run_date is not None:
        check_run_date(run_date)  # an impossible date would silently compact nothing
    store = Store(out, storage_options)
    store.require_outputs()
    # sorts among run ids by time, so its manifest folds after the runs it compacts
    compaction_id = time_ordered_id("compact", after=store.newest_manifest())
    counts: Counter = Counter()
    with OutputLock(store, compaction_id):
        store.recover()
        state = store.state()
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for record in state.files.values():
            if run_date is None or record["run_date"] == run_date:
                groups[(record["table"], record["run_date"])].append(record)
        keep = _visible_rows(state)
        attempted_on, attempted = None, {}
        urls: dict[str, list[str]] = {}

        def files_of(table: str, records: list[dict[str, Any]]) -> list[str]:
            """The URLs of these records' files, in published order."""
            if table not in urls:  # one listing of a table's files, not one per run date (a request a file
                urls[table] = store.committed_files(table, state)  # folder on a bucket)
            by_path = {store.url(r["path"]) for r in records} | {store.url(r["staged"]) for r in records
                                                                  if r["staged"]}
            return [u for u in urls[table] if u in by_path]

        for (table, date), records in sorted(groups.items(), key=lambda group: group[0][::-1]):  # date by date
            # files as few as their rows allow are left as they are (a date compacted before),
            # unless one holds more rows than a file may now (compacted with the default, a
            # date's thumbnails ~2.5 GB a file)
            rows = [record.get("rows", 0) for record in records]
            if max(rows) <= rows_per_file and len(records) <= max(1, math.ceil(sum(rows) / rows_per_file)):
                counts["files_left" if table != ATTEMPTS else "attempts_files_left"] += len(records)
                continue
            if date != attempted_on:  # read before any group of the date is rewritten, its attempts' too
                attempted_on = date
                attempted = _latest_attempts(store, files_of(ATTEMPTS, groups.get((ATTEMPTS, date), [])))
            group = _compact_group(store, table, date, records, files_of(table, records), keep, attempted,
                                   compaction_id, rows_per_file)
            # the store's own record of attempts is counted apart: the user's counts are of the tables
            counts.update({f"attempts_{k}": n for k, n in group.items()} if table == ATTEMPTS else group)
        store.write_snapshot()
    return counts


def _visible_rows(state: Any) -> dict[str, set[tuple[str, str]]]:
    """Per unit (and "errors"), the (video_id, run_id) pairs the latest view shows."""
    keep: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for entry in state.entries.values():
        for unit in ("core", "labels", "matches", "captions", "texts"):
            if entry.get(f"{unit}_run_id"):
                keep[unit].add((entry["video_id"], entry[f"{unit}_run_id"]))
        if entry.get("last_run_id"):
            keep["errors"].add((entry["video_id"], entry["last_run_id"]))
    return keep


def _latest_attempts(store: Store, urls: list[str]) -> dict[tuple[str, str | None], str]:
    """Of one run date's attempts files, per (video_id, unit) the latest run that recomputed the
    unit, and per (video_id, None) the latest that attempted the video at all."""
    latest: dict[tuple[str, str | None], str] = {}
    # held a few keys a video over the date (millions): one string each for the date's few runs
    # and units, not one a row
    names: dict[str | None, str | None] = {}
    # (no file for a date before attempts were recorded)
    for data in read_ahead(partial(store.read_table, columns=["video_id", "run_id", "units"]), urls):
        for video_id, run_id, units in zip(*(data.column(c).to_pylist() for c in ("video_id", "run_id", "units"))):
            run_id = names.setdefault(run_id, run_id)
            for unit in (None, *units):
                unit = names.setdefault(unit, unit)
                if run_id > latest.get((video_id, unit), ""):
                    latest[(video_id, unit)] = run_id
    return latest


def _compact_group(store: Store, table: str, run_date: str, records: list[dict[str, Any]], urls: list[str],
                   keep: dict[str, set[tuple[str, str]]], attempted: dict[tuple[str, str | None], str],
                   compaction_id: str, rows_per_file: int) -> Counter:
    """Rewrite one table's files of one date (`urls`), a file at a time: see the module."""
    name = f"{compaction_id}-{table}-{run_date}.json"
    if not urls:  # every file of the group deleted by hand: readers skip them, and so their records go
        store.publish_replacing({"kind": "compaction", "files": []}, name, records, compaction_id)
        log.warning("%s %s: none of its %d published files is there: their records are dropped",
                    table, run_date, len(records))
        return Counter({"files_before": len(records)})
    schema, shown, sizes = _first_pass(store, table, urls, keep, attempted)
    files: list[dict[str, Any]] = []
    held: list[pa.Table] = []  # kept rows not yet written: fewer than rows_per_file, and the last file's
    before = after = 0

    def stage(rows: pa.Table) -> None:
        name = f"part-{compaction_id}-{len(files):02d}.parquet"
        files.append(store.stage_file(rows, table, run_date, name, compaction_id))

    for whole in read_ahead(partial(_whole_file, store), urls, sizes):
        data = pq.read_table(whole)
        del whole  # the file's bytes, not held beside its rows
        before += data.num_rows
        data = data.filter(shown(data)) if data.num_rows else data
        after += data.num_rows
        held.append(data)
        while sum(t.num_rows for t in held) >= rows_per_file:
            # (zero-copy: slices of the files' rows; a file written before a column was added lacks
            # it, and every new file has the whole schema, as one read of the group together had)
            rows = pa.concat_tables([schema.empty_table(), *held], promote_options="permissive")
            stage(rows.slice(0, rows_per_file))
            held = [rows.slice(rows_per_file)]
    if sum(t.num_rows for t in held) or not files:  # an empty group still leaves its schema
        stage(pa.concat_tables([schema.empty_table(), *held], promote_options="permissive"))
    store.publish_replacing({"kind": "compaction", "files": files}, name, records, compaction_id)
    log.info("compacted %s %s: %d files, %d -> %d rows", table, run_date, len(records), before, after)
    return Counter({"files_before": len(records), "files_after": len(files), "rows_before": before,
                    "rows_after": after})


def _first_pass(store: Store, table: str, urls: list[str], keep: dict[str, set[tuple[str, str]]],
                attempted: dict[tuple[str, str | None], str]
                ) -> tuple[pa.Schema, Callable[[pa.Table], pa.Array], dict[str, int]]:
    """The schema of a group's files together, the mask of a file's rows to keep, and each file's
    size: whether a row stays can depend on the date's other files (a later run's rows, a run's
    final row), so the columns that decides it are read first, a file at a time, and alone (a few
    bytes a row)."""
    columns = {"runs": ["run_id", "finished_at"], ATTEMPTS: []}.get(table, ["video_id", "run_id"])
    schemas = []
    sizes: dict[str, int] = {}
    finished: set[str] = set()
    latest_of_date: dict[str | None, str] = {}

    def first_read(url: str) -> tuple[pa.Schema, pa.Table | None, int]:
        with store.open_url(url) as handle:
            parquet = pq.ParquetFile(arrow_file(handle))
            return parquet.schema_arrow, (parquet.read(columns=columns) if columns else None), handle.size

    for url, (file_schema, data, size) in zip(urls, read_ahead(first_read, urls)):
        schemas.append(file_schema)
        sizes[url] = size
        if table == "runs":
            finished.update(r for r, f in zip(*(data.column(c).to_pylist() for c in columns)) if f is not None)
        elif data is not None:
            for video_id, run_id in zip(*(data.column(c).to_pylist() for c in columns)):
                if run_id > latest_of_date.get(video_id, ""):
                    latest_of_date[video_id] = run_id
    schema = _in_declared_order(pa.unify_schemas(schemas, promote_options="permissive"), table)
    if table == "runs":
        return schema, lambda data: _final_rows_mask(data, finished), sizes
    if table == ATTEMPTS:  # `attempted` is the date's: read before any of its groups was rewritten
        return schema, lambda data: _needed_attempts_mask(data, attempted), sizes
    return schema, lambda data: _visible_mask(data, table, keep, attempted, latest_of_date), sizes


def _in_declared_order(schema: pa.Schema, table: str) -> pa.Schema:
    """`schema` with the columns `table` declares first, in their order, then any other (the
    embedding, a later version's): unified, they came as the group's first file had them, and a
    column added since (`SCHEMA_VERSION`) after the last of a file written before it."""
    try:
        declared = (ATTEMPTS_SCHEMA if table == ATTEMPTS else table_schema(table)).names
    except KeyError:  # a table this version does not know (a later one's)
        return schema
    place = {name: i for i, name in enumerate(declared)}
    return pa.schema(sorted(schema, key=lambda field: place.get(field.name, len(declared))), metadata=schema.metadata)


def _whole_file(store: Store, url: str) -> pa.BufferReader:
    with store.open_url(url) as handle:
        return arrow_file(handle)


def _final_rows_mask(data: pa.Table, finished: set[str]) -> pa.Array:
    """Every run's rows but its opening row where its final one (of `finished`, the runs the
    date's files hold a final row of) is there: the views show that."""
    return pa.array([f is not None or r not in finished
                     for r, f in zip(data.column("run_id").to_pylist(), data.column("finished_at").to_pylist())])


def _visible_mask(data: pa.Table, table: str, keep: dict[str, set[tuple[str, str]]],
                  attempted: dict[tuple[str, str | None], str], latest_of_date: dict[str | None, str]) -> pa.Array:
    """Rows shown by the latest view (current run of their unit) or the history view (latest run
    of the date that wrote rows or recomputed their unit: `pipeline.views._history_sql`);
    `latest_of_date`: per video, the latest run among the table's rows of the date, in all its files."""
    unit = unit_of(table)
    current = keep["errors" if table == "errors" else unit]
    video_ids = data.column("video_id").to_pylist()
    run_ids = data.column("run_id").to_pylist()
    # a later run of the date that recomputed the unit and wrote no rows hides them all
    return pa.array([(v, r) in current or r == max(latest_of_date[v], attempted.get((v, unit), ""))
                     for v, r in zip(video_ids, run_ids)])


def _needed_attempts_mask(data: pa.Table, attempted: dict[tuple[str, str | None], str]) -> pa.Array:
    """Attempts that are, for their video and date, the latest of a unit or of all: the others
    the history views never go by."""
    return pa.array([any(attempted.get((v, unit)) == r for unit in (None, *units))
                     for v, r, units in zip(*(data.column(c).to_pylist() for c in ("video_id", "run_id", "units")))])
