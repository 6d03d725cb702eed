"""`vidlens forget`: take videos out of an output, every row of theirs and their ledger entries.

For videos deleted from the source (`--missing`: those a complete listing no longer found)
and for named URIs (a takedown). A nightly run keeps a deleted video's rows, so that a file
that comes back or a listing that failed halfway costs nothing; forgetting is the user's call.

Each file that holds a row of theirs (any run, any table but `runs`) is rewritten without
it and published as a compaction is: new file and replaced file in one manifest. Last, a
manifest drops their ledger entries. Interrupted, it is run again as it was: the ledger still
names the videos, and the tables that give each video's ids by URI (`videos`, `errors`) are
rewritten after the others. A forgotten video that appears in the source again is a new
video to the next run.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.lock import OutputLock
from pipeline.store import META, Store
from schemas.tables import TABLES

log = logging.getLogger(__name__)

#: tables whose rows carry the source URI, by which the videos' ids in every run are found.
_URI_TABLES = ("videos", "errors")


def forget(out: str, uris: Iterable[str] = (), missing: bool = False,
           storage_options: dict | None = None) -> Counter:
    """Remove `uris` (and with `missing`, every video the ledger marks missing) from `out`;
    returns counts: videos, files_rewritten, rows_removed."""
    store = Store(out, storage_options)
    # sorts among run ids by time, so its manifests fold after the runs whose rows they remove
    forget_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-forget"
    counts: Counter = Counter()
    with OutputLock(store, forget_id):
        store.recover()
        entries = store.state().entries
        chosen = set(uris) | ({u for u, e in entries.items() if e.get("status") == "missing"} if missing else set())
        if not chosen:
            return counts
        video_ids = {entries[u]["video_id"] for u in chosen if u in entries} | _ids_by_uri(store, chosen)
        counts["videos"] = len(chosen)
        for n, record in enumerate(_files_holding(store, video_ids)):
            counts["rows_removed"] += _rewrite_without(store, record, video_ids, f"{forget_id}-rows-{n:05d}")
            counts["files_rewritten"] += 1
        store.publish({"kind": "forget", "forget": sorted(chosen)}, f"{forget_id}-uris.json")
        store.write_snapshot()
    log.info("forgot %d videos in %s: %d files rewritten, %d rows removed", counts["videos"], out,
             counts["files_rewritten"], counts["rows_removed"])
    return counts


def _ids_by_uri(store: Store, uris: set[str]) -> set[str]:
    """Every video id the URIs had in any run (a changed file got a new id)."""
    wanted = pa.array(sorted(uris), pa.string())
    found: set[str] = set()
    for table in _URI_TABLES:
        for url in store.committed_files(table):
            data = pq.read_table(store.open_url(url), columns=["video_id", "uri"])
            found.update(v for v in data.filter(pc.is_in(data["uri"], wanted))["video_id"].to_pylist() if v)
    return found


def _files_holding(store: Store, video_ids: set[str]) -> list[dict]:
    """The published file records of every table but `runs` with a row of these videos."""
    wanted = pa.array(sorted(video_ids), pa.string())
    records = {store.url(r["path"]): r for r in store.state().files.values()}
    records |= {store.url(r["staged"]): r for r in store.state().files.values() if r.get("staged")}
    holding = []
    # the tables that give the ids by URI last, so that a forget interrupted here finds them again
    for table in sorted(set(TABLES) - {"runs"}, key=lambda t: (t in _URI_TABLES, TABLES.index(t))):
        for url in store.committed_files(table):
            ids = pq.read_table(store.open_url(url), columns=["video_id"])["video_id"]
            if pc.any(pc.is_in(ids, wanted)).as_py():
                holding.append(records[url])
    return holding


def _rewrite_without(store: Store, record: dict, video_ids: set[str], name: str) -> int:
    """Publish the file of `record` again without the rows of `video_ids`; returns rows removed."""
    url = next(store.url(r) for r in (record["path"], record.get("staged")) if r and store.fs.exists(store.path(r)))
    data = pq.read_table(store.open_url(url))
    kept = data.filter(pc.invert(pc.is_in(data["video_id"], pa.array(sorted(video_ids), pa.string()))))
    files = []
    if kept.num_rows:
        relative = posixpath.join(posixpath.dirname(record["path"]), f"part-{name}.parquet")
        staged = f"{META}/staging/{name}/{relative}"
        store.fs.makedirs(posixpath.dirname(store.path(staged)), exist_ok=True)
        with store.fs.open(store.path(staged), "wb") as handle:
            pq.write_table(kept, handle, compression="zstd")
        files.append({"table": record["table"], "path": relative, "staged": staged, "rows": kept.num_rows,
                      "run_id": record.get("run_id"), "run_date": record["run_date"]})
    store.publish({"kind": "forget", "files": files, "replaces": [record["path"]]}, f"{name}.json")
    for relative in (record["path"], record.get("staged")):
        if relative and store.fs.exists(store.path(relative)):
            store.fs.rm(store.path(relative))
    store.drop_staging(name)
    return data.num_rows - kept.num_rows
