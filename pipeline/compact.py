"""`vidlens compact`: merge the many small files of past runs into few large ones.

Per table and run date, the rows still visible (in the latest view or the history view)
are rewritten into files of up to `rows_per_file` rows; rows no view shows any more (an
earlier run of the same date, a superseded unit) are dropped, and so are the store's records
of what each run attempted (`pipeline.ledger.ATTEMPTS`) that the history views no longer go
by: they go by the latest attempt at each unit, and at all, per video and date. A compaction
manifest lists the new files and the files they replace, and is published like a batch, so
readers switch from the old file list to the new one at once. The latest and history views
return the same rows before and after.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ledger import ATTEMPTS, unit_of
from pipeline.lock import OutputLock
from pipeline.output_checks import check_run_date
from pipeline.store import Store, time_ordered_id

log = logging.getLogger(__name__)


def compact(out: str, storage_options: dict | None = None, run_date: str | None = None,
            rows_per_file: int = 500_000) -> Counter:
    """Compact the published files of `out` (only those of `run_date` when given); returns counts."""
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows per file (--rows-per-file) must be a whole number of at least 1, got {rows_per_file!r}")
    if run_date is not None:
        check_run_date(run_date)  # an impossible date would silently compact nothing
    store = Store(out, storage_options)
    store.require_outputs()
    # sorts among run ids by time, so its manifest folds after the runs it compacts
    compaction_id = time_ordered_id("compact")
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
        for (table, date), records in sorted(groups.items(), key=lambda group: group[0][::-1]):  # date by date
            if len(records) < 2:
                continue
            if date != attempted_on:  # read before any group of the date is rewritten, its attempts' too
                attempted_on, attempted = date, _latest_attempts(store, groups.get((ATTEMPTS, date), []))
            counts.update(_compact_group(store, table, date, records, keep, attempted, compaction_id, rows_per_file))
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


def _latest_attempts(store: Store, records: list[dict[str, Any]]) -> dict[tuple[str, str | None], str]:
    """Of one run date's attempts files, per (video_id, unit) the latest run that recomputed the
    unit, and per (video_id, None) the latest that attempted the video at all."""
    latest: dict[tuple[str, str | None], str] = {}
    if not records:
        return latest  # a date before attempts were recorded
    data = _read_group(store, ATTEMPTS, records)
    for video_id, run_id, units in zip(*(data.column(c).to_pylist() for c in ("video_id", "run_id", "units"))):
        for unit in (None, *units):
            if run_id > latest.get((video_id, unit), ""):
                latest[(video_id, unit)] = run_id
    return latest


def _read_group(store: Store, table: str, records: list[dict[str, Any]]) -> pa.Table:
    urls = store.committed_files(table)
    by_path = {store.url(r["path"]): r for r in records} | {store.url(r["staged"]): r for r in records if r["staged"]}
    parts = [pq.read_table(store.open_url(u)) for u in urls if u in by_path]
    return pa.concat_tables(parts, promote_options="permissive")


def _compact_group(store: Store, table: str, run_date: str, records: list[dict[str, Any]],
                   keep: dict[str, set[tuple[str, str]]], attempted: dict[tuple[str, str | None], str],
                   compaction_id: str, rows_per_file: int) -> Counter:
    data = _read_group(store, table, records)
    before = data.num_rows
    if table == "runs" and data.num_rows:
        data = data.filter(_final_rows_mask(data))
    elif table == ATTEMPTS and data.num_rows:
        data = data.filter(_needed_attempts_mask(data, attempted))
    elif data.num_rows:
        data = data.filter(_visible_mask(data, table, keep, attempted))
    files = [store.stage_file(data.slice(start, rows_per_file), table, run_date,
                              f"part-{compaction_id}-{n:02d}.parquet", compaction_id)
             for n, start in enumerate(range(0, max(data.num_rows, 1), rows_per_file))]
    store.publish_replacing({"kind": "compaction", "files": files}, f"{compaction_id}-{table}-{run_date}.json",
                            records, compaction_id)
    log.info("compacted %s %s: %d files, %d -> %d rows", table, run_date, len(records), before, data.num_rows)
    return Counter({"files_before": len(records), "files_after": len(files), "rows_before": before,
                    "rows_after": data.num_rows})


def _final_rows_mask(data: pa.Table) -> pa.Array:
    """Every run's rows but its opening row where its final one is there (the views show that)."""
    finished = {r for r, f in zip(data.column("run_id").to_pylist(), data.column("finished_at").to_pylist())
                if f is not None}
    return pa.array([f is not None or r not in finished
                     for r, f in zip(data.column("run_id").to_pylist(), data.column("finished_at").to_pylist())])


def _visible_mask(data: pa.Table, table: str, keep: dict[str, set[tuple[str, str]]],
                  attempted: dict[tuple[str, str | None], str]) -> pa.Array:
    """Rows shown by the latest view (current run of their unit) or the history view (latest run
    of the date that wrote rows or recomputed their unit: `pipeline.views._history_sql`)."""
    unit = unit_of(table)
    current = keep["errors" if table == "errors" else unit]
    video_ids = data.column("video_id").to_pylist()
    run_ids = data.column("run_id").to_pylist()
    latest_of_date: dict[str | None, str] = {}
    for video_id, run_id in zip(video_ids, run_ids):
        if run_id > latest_of_date.get(video_id, ""):
            latest_of_date[video_id] = run_id
    # a later run of the date that recomputed the unit and wrote no rows hides them all
    return pa.array([(v, r) in current or r == max(latest_of_date[v], attempted.get((v, unit), ""))
                     for v, r in zip(video_ids, run_ids)])


def _needed_attempts_mask(data: pa.Table, attempted: dict[tuple[str, str | None], str]) -> pa.Array:
    """Attempts that are, for their video and date, the latest of a unit or of all: the others
    the history views never go by."""
    return pa.array([any(attempted.get((v, unit)) == r for unit in (None, *units))
                     for v, r, units in zip(*(data.column(c).to_pylist() for c in ("video_id", "run_id", "units")))])
