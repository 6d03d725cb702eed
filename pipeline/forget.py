"""`vidlens forget`: take videos out of an output, every row of theirs and their ledger entries.

For videos deleted from the source (`--missing`: those a complete listing no longer found)
and for named URIs (a takedown). A nightly run keeps a deleted video's rows, so that a file
that comes back or a listing that failed halfway costs nothing; forgetting is the user's call.

A forget first publishes its intent (the URIs' hashes). Each file that holds a row of theirs
(any run, any table but `runs`; the store's record of what each run attempted too) is rewritten
without it and published as a compaction is: new file and replaced file in one manifest. Their
ledger entries are then taken out of the manifests that published them, a forget manifest drops
them from the ledger (it keeps a hash of each URI, not the name), and a new ledger snapshot
replaces the old ones: the output keeps no trace of their names. Interrupted, the next command
on the output (a nightly run too: its half-forgotten videos were taken as unchanged) finishes
it first (`finish_forgets`): the ledger snapshot still names the videos, and the tables that
give each video's ids by URI (`videos`, `errors`) are rewritten after the others; its manifests
are named after the killed forget's, so that they fold before the finishing command's. Killed once
its forget manifest is published, the rerun's recovery (`Store.recover`) deletes the files it
replaced and writes the snapshot, and a URI that manifest names counts as forgotten. A
forgotten video that appears in the source again is a new video to the next run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ledger import ATTEMPTS
from pipeline.lock import OutputLock
from pipeline.read_ahead import read_ahead
from pipeline.sources import as_listed
from pipeline.snapshot import State, uri_hash
from pipeline.store import Store, time_ordered_id
from schemas.tables import TABLES

log = logging.getLogger(__name__)

#: tables whose rows carry the source URI, by which the videos' ids in every run are found.
_URI_TABLES = ("videos", "errors")
#: how the name of a forget manifest (the one that drops URIs from the ledger) ends.
_URIS = "-uris.json"
#: how the name of a forget's first manifest ends: the hashes of the URIs it is taking out, so
#: that a forget killed midway is finished by the next command (`finish_forgets`).
_INTENT = "-intent.json"


@dataclass
class Forgotten:
    """What `forget` did."""

    videos: int = 0
    files_rewritten: int = 0
    rows_removed: int = 0
    manifests_scrubbed: int = 0
    #: URIs given that the output does not hold (as `videos.uri` gives them), so not forgotten.
    unknown: list[str] = field(default_factory=list)
    #: URIs given that an earlier forget took out (one killed before its end, run again).
    already: list[str] = field(default_factory=list)
    #: forgets killed midway that this one finished first (`finish_forgets`).
    finished: int = 0


def forget(out: str, uris: Iterable[str] = (), missing: bool = False,
           storage_options: dict | None = None) -> Forgotten:
    """Remove `uris` (and with `missing`, every video the ledger marks missing) from `out`."""
    store = Store(out, storage_options)
    store.require_outputs()
    # sorts among run ids by time, so its manifests fold after the runs whose rows they remove
    forget_id = time_ordered_id("forget", after=store.newest_manifest())
    done = Forgotten()
    with OutputLock(store, forget_id):
        done.finished = store.recover().get("forgets_finished", 0)
        state = store.state()  # (one folding of the manifests for every look below: a listing each on a bucket)
        entries = state.entries
        found = {_as_stored(u, entries): set() for u in uris}
        found.update({u: set() for u, e in entries.items() if missing and e.get("status") == "missing"})
        for uri, video_ids in _ids_by_uri(store, state, set(found)).items():
            found[uri] |= video_ids
        for uri in found:
            if uri in entries:
                found[uri].add(entries[uri]["video_id"])
        chosen = {uri for uri, video_ids in found.items() if video_ids}
        done.already = sorted(_forgotten_before(store, set(found) - chosen))
        done.unknown = sorted(set(found) - chosen - set(done.already))
        if not chosen:
            return done
        video_ids = set().union(*(found[uri] for uri in chosen))
        done.videos = len(chosen)
        hashes = sorted(uri_hash(u) for u in chosen)
        intent = f"{forget_id}{_INTENT}"
        store.publish({"kind": "forget-intent", "forgetting": hashes}, intent)
        _take_out(store, state, forget_id, chosen, video_ids, hashes, intent, done)
    log.info("forgot %d videos in %s: %d files rewritten, %d rows removed", done.videos, out,
             done.files_rewritten, done.rows_removed)
    return done


def _take_out(store: Store, state: State, forget_id: str, uris: set[str], video_ids: set[str], hashes: list[str],
              intent: str, done: Forgotten) -> None:
    """Rewrite every file without the rows of `video_ids`, scrub the `uris` from the manifests,
    and publish the forget manifest (of `hashes`) that drops them from the ledger and closes `intent`."""
    for n, record in enumerate(_files_holding(store, state, video_ids) if video_ids else []):
        removed = _rewrite_without(store, record, video_ids, f"{forget_id}-rows-{n:05d}")
        if record["table"] != ATTEMPTS:  # the counts are of the tables' rows, not the store's own record
            done.rows_removed += removed
            done.files_rewritten += 1
    done.manifests_scrubbed += _scrub_manifests(store, uris) if uris else 0
    # the ledger's snapshot still names them until this manifest folds over it
    store.publish({"kind": "forget", "forget": hashes, "finishes": [intent]}, f"{forget_id}{_URIS}")
    store.write_snapshot(keep=1)  # the one before still names them


def finish_forgets(store: Store) -> int:
    """Finish each forget a killed `vidlens forget` left (`Store.recover`, holding the lock);
    returns how many. Its videos' rows were partly taken out while the ledger still held them as
    done: a nightly run took them as unchanged, and kept them so, some or all of their rows gone.
    Its intent manifest holds the URIs' hashes; the ledger (or its snapshot) still names them."""
    names = store.state().folded  # (every published manifest's name: no listing)
    closed = {name for name in names if name.endswith(_URIS)}
    pending = sorted(name for name in names if name.endswith(_INTENT) and name[:-len(_INTENT)] + _URIS not in closed)
    if pending:  # (finished by a later command: its forget manifest says so)
        finished = {intent for name in closed for intent in store.read_manifest(name).get("finishes") or []}
        pending = [name for name in pending if name not in finished]
    for intent in pending:
        hashes = store.read_manifest(intent).get("forgetting") or []
        state, wanted = store.state(), set(hashes)
        uris = {uri for uri in state.entries if uri_hash(uri) in wanted}
        video_ids = {state.entries[uri]["video_id"] for uri in uris} | set().union(
            *_ids_by_uri(store, state, uris).values())
        # after the killed forget's manifests, before those of the command finishing it: a new id sorted after that
        # command's (taken before its lock), and the manifests folded in name order (without the snapshot) lost
        # the video a run had made again from the source
        forget_id = f"{intent[:-len(_INTENT)]}-then-{time_ordered_id('finishing')}"
        done = Forgotten(videos=len(uris))
        _take_out(store, state, forget_id, uris, video_ids - {None}, hashes, intent, done)
        log.warning("finished the forget of %d video(s) a killed `vidlens forget` left (%s): %d files rewritten, "
                    "%d rows removed", len(hashes), intent, done.files_rewritten, done.rows_removed)
    return len(pending)


def _as_stored(uri: str, entries) -> str:
    """A local path as the ledger stores it (absolute), where the one given is relative or a file:// URL."""
    if uri in entries:
        return uri
    path = as_listed(uri)
    return path if path in entries else uri


def _forgotten_before(store: Store, uris: set[str]) -> set[str]:
    """The URIs among `uris` that a published forget manifest took out of the ledger."""
    if not uris:
        return set()
    hashes: set[str] = set()
    for name in store.manifests():
        if name.endswith(_URIS):  # only forget manifests: a GET each on a bucket, and forgets are few
            hashes.update(store.read_manifest(name).get("forget") or [])
    # as given, or as the ledger stored a local path (absolute)
    return {u for u in uris if {uri_hash(u), uri_hash(as_listed(u))} & hashes}


def _ids_by_uri(store: Store, state: State, uris: set[str]) -> dict[str, set[str]]:
    """Every video id each URI had in any run (a changed file got a new id). None asked for, no file
    is read: `forget --missing` with no video missing read every file of both tables for nothing (on a
    bucket, a request or two each), and that pyarrow reading at the process's exit aborted it now and
    then ("terminate called without an active exception", in a chaos soak on Ray, 2026-12-07), the
    command's own line said and done (the cause, in any forget that reads: `pipeline.parquet_reading`)."""
    if not uris:
        return {}
    wanted = pa.array(sorted(uris), pa.string())
    found: dict[str, set[str]] = {}
    for table in _URI_TABLES:
        urls = store.committed_files(table, state)
        for data in read_ahead(partial(store.read_table, columns=["video_id", "uri"]), urls):
            data = data.filter(pc.is_in(data["uri"], wanted))
            for uri, video_id in zip(data["uri"].to_pylist(), data["video_id"].to_pylist()):
                if video_id:
                    found.setdefault(uri, set()).add(video_id)
    return found


def _scrub_manifests(store: Store, uris: set[str]) -> int:
    """Take the URIs' ledger entries out of the published manifests that hold them, so that the
    output keeps no trace of their names (the ledger snapshot names them until the forget
    manifest that follows)."""
    scrubbed = 0
    names = store.manifests()
    for name, manifest in zip(names, read_ahead(store.read_manifest, names)):
        ledger = manifest.get("ledger") or []
        kept = [entry for entry in ledger if entry.get("uri") not in uris]
        if len(kept) < len(ledger):
            store.rewrite_manifest(name, {**manifest, "ledger": kept})
            scrubbed += 1
    return scrubbed


def _files_holding(store: Store, state: State, video_ids: set[str]) -> list[dict]:
    """The published file records with a row of these videos: of every table but `runs`, and of the attempts."""
    wanted = pa.array(sorted(video_ids), pa.string())
    records = {store.url(r["path"]): r for r in state.files.values()}
    records |= {store.url(r["staged"]): r for r in state.files.values() if r.get("staged")}
    holding = []
    # the tables that give the ids by URI last, so that a forget interrupted here finds them again
    for table in [ATTEMPTS, *sorted(set(TABLES) - {"runs"}, key=lambda t: (t in _URI_TABLES, TABLES.index(t)))]:
        urls = store.committed_files(table, state)
        for url, ids in zip(urls, read_ahead(partial(store.read_table, columns=["video_id"]), urls)):
            if pc.any(pc.is_in(ids["video_id"], wanted)).as_py():
                holding.append(records[url])
    return holding


def _rewrite_without(store: Store, record: dict, video_ids: set[str], name: str) -> int:
    """Publish the file of `record` again without the rows of `video_ids`; returns rows removed."""
    url = next(store.url(r) for r in (record["path"], record.get("staged")) if r and store.fs.exists(store.path(r)))
    data = store.read_table(url)
    # (is_in gives false for a null id: a run-level errors row, of no video, is kept)
    kept = data.filter(pc.invert(pc.is_in(data["video_id"], pa.array(sorted(video_ids), pa.string()))))
    files = ([store.stage_file(kept, record["table"], record["run_date"], f"part-{name}.parquet", name,
                               run_id=record.get("run_id"))] if kept.num_rows else [])
    store.publish_replacing({"kind": "forget", "files": files}, f"{name}.json", [record], name)
    return data.num_rows - kept.num_rows
