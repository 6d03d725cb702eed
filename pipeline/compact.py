"""`vidlens compact`: merge the many small files of past runs into few large ones.

Per table and run date, the rows still visible (in the latest view or the history view)
are rewritten into files of up to `rows_per_file` rows; rows no view shows any more (an
earlier run of the same date, a superseded unit) are dropped. A compaction manifest lists
the new files and the files they replace, and is published like a batch, so readers switch
from the old file list to the new one at once. The latest view returns the same rows before
and after.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ledger import unit_of
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
        for (table, date), records in sorted(groups.items()):
            if len(records) < 2:
                continue
            counts.update(_compact_group(store, table, date, records, keep, compaction_id, rows_per_file))
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


def _compact_group(store: Store, table: str, run_date: str, records: list[dict[str, Any]],
                   keep: dict[str, set[tuple[str, str]]], compaction_id: str, rows_per_file: int) -> Counter:
    urls = store.committed_files(table)
    by_path = {store.url(r["path"]): r for r in records} | {store.url(r["staged"]): r for r in records if r["staged"]}
    parts = [pq.read_table(store.open_url(u)) for u in urls if u in by_path]
    data = pa.concat_tables(parts, promote_options="permissive")
    before = data.num_rows
    if table == "runs" and data.num_rows:
        data = data.filter(_final_rows_mask(data))
    elif data.num_rows:
        data = data.filter(_visible_mask(data, table, keep))
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


def _visible_mask(data: pa.Table, table: str, keep: dict[str, set[tuple[str, str]]]) -> pa.Array:
    """Rows shown by the latest view (current run of their unit) or the history view (latest run of the date)."""
    current = keep["errors" if table == "errors" else unit_of(table)]
    video_ids = data.column("video_id").to_pylist()
    run_ids = data.column("run_id").to_pylist()
    latest_of_date: dict[str | None, str] = {}
    for video_id, run_id in zip(video_ids, run_ids):
        if run_id > latest_of_date.get(video_id, ""):
            latest_of_date[video_id] = run_id
    return pa.array([(v, r) in current or latest_of_date[v] == r for v, r in zip(video_ids, run_ids)])
