"""An output's manifests folded into its state (ledger entries, live files, run dates), and the
snapshots that save the fold so that later readers fold only newer manifests
(`_vidlens/snapshots/ledger-<last manifest>.parquet`; see `pipeline.store`)."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ledger import LEDGER_SCHEMA, ledger_table
from pipeline.parquet_reading import arrow_file

log = logging.getLogger(__name__)


@dataclass
class State:
    """The fold of every manifest: ledger entries, live files and the date of each run."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: relative final path -> {"table", "path", "staged", "rows", "run_id", "run_date"}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_dates: dict[str, str] = field(default_factory=dict)
    #: the manifests folded so far; `upto` is the last of them by name.
    folded: set[str] = field(default_factory=set)
    upto: str = ""
    #: what the manifests folded since the snapshot ask of recovery, should their command have
    #: been killed: the files they replaced (deleted after them), and whether one forgot videos.
    replaced: set[str] = field(default_factory=set)
    forgot: bool = False
    #: a reader's state (`Store.state(entries=False)`): the snapshot's ledger rows as read, not
    #: made entries; `entries` then holds only the entries of the manifests folded after it.
    snapshot_ledger: pa.Table | None = None


def write_snapshot(fs: Any, folder: str, state: State, keep: int = 2) -> str:
    """Save `state` (its ledger and file list) in `folder` as the snapshot of the manifests it
    folded, so later readers fold only newer ones; the `keep` newest snapshots stay (a reader
    may be loading the one before). Its name."""
    extra = json.dumps({"upto": state.upto, "files": state.files, "run_dates": state.run_dates,
                        "folded": sorted(state.folded)})
    name = f"ledger-{state.upto[:-len('.json')]}.parquet"
    temporary = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    uris = sorted(state.entries)
    # the file list goes in the footer once: pyarrow's copy of the Arrow schema (store_schema)
    # held it a second time, in base64 (the footer was ~1 KB a published file, not ~0.4)
    with fs.open(temporary, "wb") as handle, \
            pq.ParquetWriter(handle, LEDGER_SCHEMA, compression="zstd", store_schema=False) as writer:
        # a row group at a time: the whole ledger as Arrow columns would be another copy of it
        for first in range(0, len(uris), _SNAPSHOT_ROWS):
            chunk = {uri: state.entries[uri] for uri in uris[first : first + _SNAPSHOT_ROWS]}
            writer.write_table(ledger_table(chunk))
        writer.add_key_value_metadata({"vidlens.snapshot": extra})
    fs.mv(temporary, posixpath.join(folder, name))
    state.replaced.clear()  # what recovery would read of the folded manifests, as the snapshot holds them
    state.forgot = False
    for old in sorted(p for p in fs.ls(folder, detail=False) if posixpath.basename(p).startswith("ledger-"))[:-keep]:
        fs.rm(old)
    return name


def load_snapshot(fs: Any, folder: str, names: list[str], entries: bool = True) -> State:
    """The state saved by the newest snapshot in `folder` of manifests among `names` (the
    published ones), or an empty state; with `entries` False, its ledger as read, a table."""
    # (a bucket's filesystem, shared within a process, keeps the listing it made: a long-lived
    # reader registering the views again after later runs tried the snapshots those had deleted,
    # warned that each "cannot be read", and folded every manifest instead, never a newer snapshot)
    fs.invalidate_cache(folder)
    try:
        snapshots = sorted(p for p in fs.ls(folder, detail=False) if posixpath.basename(p).startswith("ledger-"))
    except FileNotFoundError:
        return State()
    published = set(names)
    for path in reversed(snapshots):
        try:
            state = _read_snapshot(fs, path, published, entries)
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            # a cache of the manifests: one cut short (a full disk, a power cut) stopped every
            # command on the output, queries too; the one before, or the manifests, give the state
            log.warning("%s: the ledger snapshot cannot be read (%s: %s); the state is read from the published "
                        "manifests instead, and the next run writes a new snapshot", path, type(exc).__name__, exc)
            continue
        if state is not None:
            return state
    return State()


def _read_snapshot(fs: Any, path: str, published: set[str], entries: bool) -> State | None:
    """The state a snapshot saved, None where it is of manifests that are not there."""
    with fs.open(path, "rb") as handle:
        # a footer past pyarrow's default limit (100 MB: ~180k published files, a first run
        # of ~700k videos) was refused, and with it every command on the output
        snapshot = pq.ParquetFile(arrow_file(handle), thrift_string_size_limit=_FOOTER_BYTES)
        extra = json.loads(snapshot.schema_arrow.metadata[b"vidlens.snapshot"])
        if extra["upto"] not in published:
            return None  # a snapshot of manifests that are not there (should not happen): ignore it
        state = State({}, extra["files"], extra["run_dates"], set(extra["folded"]), extra["upto"])
        if not entries:
            state.snapshot_ledger = snapshot.read()
            return state
        # a batch of rows at a time: the whole table, in Arrow or as row dicts, would be
        # another copy of the ledger
        state.entries = {row["uri"]: _entry(row) for batch in snapshot.iter_batches(batch_size=8192)
                         for row in batch.to_pylist()}
    return state


def uri_hash(uri: str) -> str:
    """What a forget manifest keeps of a URI it takes out of the ledger."""
    return hashlib.sha256(uri.encode()).hexdigest()


def fold(state: State, manifest: dict[str, Any], name: str) -> None:
    """Apply one manifest to the folded state."""
    for path in manifest.get("replaces", []):
        state.files.pop(path, None)
    state.replaced.update(manifest.get("replaces", []))
    state.forgot |= bool(manifest.get("forget"))
    if manifest.get("forget"):  # `vidlens forget`: the URIs' hashes, so the manifest keeps no name
        forgotten = set(manifest["forget"])
        for uri in [u for u in state.entries if uri_hash(u) in forgotten]:
            del state.entries[uri]
        if state.snapshot_ledger is not None:
            uris = state.snapshot_ledger["uri"].to_pylist()
            state.snapshot_ledger = state.snapshot_ledger.filter(pa.array([uri_hash(u) not in forgotten for u in uris]))
    for record in manifest.get("files", []):
        state.files[record["path"]] = record
    if manifest.get("run_id") and manifest.get("run_date"):
        state.run_dates[manifest["run_id"]] = manifest["run_date"]
    state.run_dates.update(manifest.get("run_dates", {}))
    for entry in manifest.get("ledger", []):
        state.entries[entry["uri"]] = _entry(entry)
    state.folded.add(name)
    state.upto = max(state.upto, name)


#: ledger rows per row group of a snapshot, written one group at a time.
_SNAPSHOT_ROWS = 65_536
#: the largest snapshot footer read (the most Thrift allows): its file list takes ~0.4 KB a file.
_FOOTER_BYTES = 2**31 - 1
#: the ledger's field names, made once: every entry's keys are these same strings (pyarrow's
#: `Schema.names` makes new ones at each call, and an entry would keep its own 18: 1 KB a video).
_FIELDS = tuple(sys.intern(name) for name in LEDGER_SCHEMA.names)
#: ledger fields whose values repeat across videos (run ids, fingerprints, status, failure).
_SHARED_FIELDS = frozenset(f for f in _FIELDS if f in ("status", "failure") or f.endswith(("_run_id", "_fingerprint")))


def _entry(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger entry with exactly the ledger's fields, its repeated strings shared.

    Each manifest or snapshot row read brings its own copy of the run ids and fingerprints,
    which are the same for every video a run processed: shared, with the field names, they
    take the ledger on the driver from about 2.6 to 0.9 KB a video.
    """
    return {f: sys.intern(v) if f in _SHARED_FIELDS and isinstance(v, str) else v
            for f, v in ((f, row.get(f)) for f in _FIELDS)}
