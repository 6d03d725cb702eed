"""Finishing what a killed command left in an output (`Store.recover`).

A command may be killed at any point of publishing (`pipeline.store`): after staging a batch's
files, after writing its manifest, midway through moving the files into place, or before
deleting the files a compaction or a forget replaced. The next command that takes the output's
lock first completes every published batch and drops every unpublished one, so readers never
see half a batch and no row is lost or written twice.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter

from pipeline.store import META, Store

log = logging.getLogger(__name__)


def recover(store: Store) -> Counter:
    """Finish what a killed command left: move files of published batches, drop unpublished
    staging, delete the files published manifests replaced, finish a forget killed midway, and
    rewrite the ledger snapshot that still names videos a published forget manifest took out.

    Call it while holding the lock. Returns counts of files moved, staging runs removed,
    replaced files deleted and snapshots rewritten.
    """
    done: Counter = Counter()
    staging = store.path(META, "staging")
    try:
        runs = [posixpath.basename(p) for p in store.fs.ls(staging, detail=False)]
    except FileNotFoundError:
        runs = []
    if runs:
        def holds_files(run_id: str) -> bool:
            found = store.fs.find(posixpath.join(staging, run_id), detail=True)
            return any(info.get("type") == "file" for info in found.values())

        # a finished run's folder is empty, and a bucket server that keeps empty folders
        # (SeaweedFS) lists it, removed or not: only a folder holding files has batches to
        # finish (reading every manifest of every such run cost each command seconds)
        holding = [run_id for run_id, held in zip(runs, store.each(holds_files, runs)) if held]
        if holding:
            for name in store.manifests():
                if any(name.startswith(run_id) for run_id in holding):
                    done["files_moved"] += store.move_into_place(store.read_manifest(name))
        for run_id in runs:
            left = run_id in holding and holds_files(run_id)  # counted where files were left
            if left or store.is_local:
                store.fs.rm(posixpath.join(staging, run_id), recursive=True)
            done["staging_removed"] += left
    # after the moves, so that a replaced file still in staging is at the name `replaces` gives
    done["replaced_deleted"] = _delete_replaced(store)
    from pipeline.forget import finish_forgets  # (it imports the store, as this module does)

    done["forgets_finished"] = finish_forgets(store)
    if store.state().forgot:
        store.write_snapshot(keep=1)  # the snapshots before the forget manifest name its videos
        done["snapshots_rewritten"] = 1
    done = +done  # (no zero counts: nothing to say)
    for folder in ("commits", "snapshots"):
        for name in _leftover_temporaries(store, folder):
            store.fs.rm(store.path(META, folder, name))
    if done:
        log.warning("recovered %s: %s", store.out, dict(done))
    return done


def _delete_replaced(store: Store) -> int:
    """Delete the files that manifests folded since the snapshot replaced and that are still
    there; returns how many. Only those manifests: a snapshot is written after a command's
    deletes, so an older manifest's are done, and the output is never listed whole."""
    state = store.state()
    # most were deleted before the kill or by an earlier recovery
    return store.delete_present(sorted(state.replaced - set(state.files)))


def _leftover_temporaries(store: Store, folder: str) -> list[str]:
    """Names of the temporary files a killed write left (`.tmp-...`) in a folder of META: a
    manifest's (local folders), a ledger snapshot's (which names every video: `vidlens forget`
    must leave no copy of a forgotten one's URI)."""
    try:
        names = [posixpath.basename(p) for p in store.fs.ls(store.path(META, folder), detail=False)]
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(".tmp-")]
