"""One job at a time per output location.

On a local output the lock is `fcntl.flock` on `OUT/_vidlens/lock`: the kernel releases it
when the holder exits or is killed, so a rerun after a crash can start at once. On a bucket
it is an object holding host, pid, run id and a heartbeat refreshed while the job runs; it
is stale when its host is this host and its pid is dead (in this boot and pid namespace), or
its heartbeat is older than `stale_after_s`. It is created only where none is, on a store
that can (`EXCLUSIVE_CREATE`); elsewhere, and to take over a stale one, it is written and
read again after a pause: the last writer holds it. A job whose heartbeat finds another job's
lock in its place (its own judged stale: the job was paused, or cut off from the bucket, for
longer than `stale_after_s`) writes no more heartbeats, and publishes nothing more: the store's
next publish raises `LockedError`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import posixpath
import threading
import time
from typing import Any

from pipeline import stop_deadline
from pipeline.output_files import protocols_of
from pipeline.store import META, Store
from workers.remote_copy import pid_alive, pid_space

log = logging.getLogger(__name__)

#: bucket protocols whose fsspec filesystem creates an object only where none is (`mode="create"`:
#: S3's If-None-Match, GCS's ifGenerationMatch=0, Azure's overwrite=False) and refuses it
#: otherwise (`_exists_error`); fsspec's own `mode="create"` (other stores) looks, then writes.
EXCLUSIVE_CREATE = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
#: times a job takes a local lock file again that another job removed as this one opened it
_LOCAL_TRIES = 10
#: the jobs other than runs that take the lock, by their id's suffix (`time_ordered_id`): what each
#: is called, and what its command is told to do once the lock is free
_JOBS = {"compact": ("compaction", "run the same vidlens compact again"),
         "forget": ("forget", "run the same vidlens forget again")}
#: a run (its id's suffix is random hex), whose command run again goes on from what was published
_RUN = ("run", "run the same command again to finish its work")


class LockedError(RuntimeError):
    """Another job holds the output's lock; the message names it and says what to do."""


class OutputLock:
    """Context manager holding the lock of one output location."""

    def __init__(self, store: Store, run_id: str, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
        self.store = store
        self.run_id = run_id
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.path = store.path(META, "lock")
        self._handle: Any = None
        self._made: list[str] = []  # local folders taking the lock made, from the outermost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._taken_by: dict[str, Any] | None = None  # the job found holding the lock in this one's place

    def _holder(self) -> dict[str, Any]:
        return {"host": platform.node(), "pid": os.getpid(), "pids": pid_space(), "run_id": self.run_id,
                "heartbeat": time.time()}

    def __enter__(self) -> "OutputLock":
        self.store.require_bucket()  # before the first write, which would create it
        if not self.store.is_local:
            self._lock_object()
            return self
        for _ in range(_LOCAL_TRIES):
            if self._lock_local():
                return self
        raise LockedError(self._message({}))

    def _make_folders(self) -> None:
        """Make the lock file's folder, noting those made (`_unmake`)."""
        folder = posixpath.dirname(self.path)
        made = []
        while not os.path.exists(folder):
            made.insert(0, folder)
            folder = posixpath.dirname(folder)
        self.store.makedirs(posixpath.dirname(self.path))
        self._made = made

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _lock_local(self) -> bool:
        """Take the lock file's lock; False where the file was removed as this job opened it: a
        first run that failed removes the one it held (`_unmake`), and a lock on it held nothing."""
        import fcntl

        self._make_folders()
        try:
            handle = open(self.path, "a+")
        except FileNotFoundError:  # (its folder removed meanwhile, with the file)
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse(handle.read())
            handle.close()
            raise LockedError(self._message(holder)) from None
        if not _is_at(handle, self.path):
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self._holder()))
        handle.flush()
        self._handle = handle
        return True

    def _lock_object(self) -> None:
        fs = self.store.fs
        mine = json.dumps(self._holder()).encode()
        # one read, not a look and then a read: a lock released between the two read as nothing,
        # taken for stale, was written over a job's that created it meanwhile, and both held it
        holder = self._read_holder()
        if holder is not None:
            if not self._stale(holder):
                raise LockedError(self._message(holder))
        elif set(protocols_of(fs)) & EXCLUSIVE_CREATE and self._create(mine):
            if self._create_refused(mine):
                self._start_heartbeat()
                return
            self._last_writer_wins()  # the store ignored the condition
            return
        fs.pipe_file(self.path, mine)
        self._last_writer_wins()

    def _create(self, mine: bytes) -> bool:
        """Create the lock where none is: LockedError where another job's is (made since the look
        before), False where the store does not take the condition (it is then written as on
        any other store); a store's other errors are raised."""
        try:
            self.store.fs.pipe_file(self.path, mine, mode="create")
        except OSError as exc:
            if _unsupported(exc):
                return False
            if not _exists_error(exc):
                raise
            holder = self._read_holder() or {}
            if holder.get("run_id") != self.run_id:  # (not this job's own create, retried after it went through)
                raise LockedError(self._message(holder)) from None
        return True

    def _create_refused(self, mine: bytes) -> bool:
        """Whether the store refuses to create the lock now that it exists (AWS S3, GCS, Azure):
        then no other job's create succeeded beside this one's. An S3-compatible server that
        ignores the condition creates it again (overwriting it with the same holder)."""
        try:
            self.store.fs.pipe_file(self.path, mine, mode="create")
        except OSError as exc:
            return _exists_error(exc)
        return False

    def _last_writer_wins(self) -> None:
        """The lock written without a condition (a stale lock taken over, a store without
        exclusive creates): re-read after a pause, the last writer holds it."""
        time.sleep(0.5)
        holder = self._read_holder() or {}
        if holder.get("run_id") != self.run_id:
            raise LockedError(self._message(holder))
        self._start_heartbeat()

    def _read_holder(self) -> dict[str, Any] | None:
        """The lock's holder as the lock object says ({} where it says nothing readable); None
        where there is no lock object."""
        try:
            return _parse(self.store.fs.cat_file(self.path).decode())
        except FileNotFoundError:
            return None

    def _start_heartbeat(self) -> None:
        self.store.publish_guard = self.check
        self._thread = threading.Thread(target=self._beat, daemon=True, name="vidlens-lock-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read_holder()
                if holder is not None and holder.get("run_id") != self.run_id:
                    # written over, it would be held by both jobs
                    self._taken_by = holder
                    log.error("%s", self._taken_message())
                    return
                self.store.fs.pipe_file(self.path, json.dumps(self._holder()).encode())
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; the timeout is generous
                pass

    def check(self) -> None:
        """LockedError where another job has taken this one's lock (see the module)."""
        if self._taken_by is not None:
            raise LockedError(self._taken_message())

    def _taken_message(self) -> str:
        holder = self._taken_by or {}
        return (f"{self.store.out}: the lock of {_job(self.run_id)[0]} {self.run_id} was taken over by "
                f"{_job(holder.get('run_id'))[0]} {holder.get('run_id', '?')} (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}), which found no heartbeat of it for {self.stale_after_s:.0f} s (was "
                "this job paused, or cut off from the bucket?): this job publishes nothing more. What it published "
                f"stands; once the other job is done, {_job(self.run_id)[1]}.")

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        # a pid names a process on this host only in this boot and pid namespace: two containers
        # of one host name (host networking) were each other's dead pids, a live job's lock taken
        if (holder.get("host") == platform.node() and holder.get("pids") == pid_space()
                and not pid_alive(int(holder.get("pid", 0)))):
            return True
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def _message(self, holder: dict[str, Any]) -> str:
        who = describe_job(holder) if holder else "another vidlens job"
        return (f"{self.store.out} is locked by {who}: two jobs must not write the same output at once. "
                f"Wait for it to finish (or stop it); a killed job's lock is released "
                f"{'at once' if self.store.is_local else f'after {self.stale_after_s:.0f} s without heartbeat'}, "
                f"then {_job(self.run_id)[1]}.")

    def release(self) -> None:
        """Give the lock back (idempotent); at a stop, a bucket's within the time its cleanup has
        (`pipeline.stop_deadline`), else left as a killed job's."""
        if self._handle is not None:
            import fcntl

            if self._made and not self.store.has_ledger():
                self._unmake()  # a run that failed before its first write leaves no output behind
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
        if self._thread is not None:
            self._stop.set()
            heartbeat, self._thread = self._thread, None
            self.store.publish_guard = None
            left = (f"its lock {self.store.url(posixpath.join(META, 'lock'))}, which the next job on the output takes "
                    f"over at once on this host (its pid gone), from another host after {self.stale_after_s:.0f} s "
                    "without heartbeat")
            try:
                if not stop_deadline.waited(lambda: self._remove_object(heartbeat), left):
                    # a step the stop's cleanup left running may reach the store long after, where the
                    # process goes on (a program that called `pipeline.cli.main`): by then another job
                    # may hold the output, this one's heartbeat ended
                    self.store.publish_guard = self._left_at_a_stop
            except Exception:  # noqa: BLE001 - at a stop, left as a killed job's (`LEFT` says so); else raised
                if stop_deadline.time_left() is None:
                    raise

    def _left_at_a_stop(self) -> None:
        """LockedError: this job left its lock at a stop (`pipeline.stop_deadline`), and publishes nothing more."""
        raise LockedError(f"{self.store.out}: {_job(self.run_id)[0]} {self.run_id} left its lock at a stop, its "
                          "cleanup's time on the store spent: it publishes nothing more")

    def _remove_object(self, heartbeat: threading.Thread) -> None:
        """Remove the lock object where this job's is there, once its heartbeat has ended."""
        heartbeat.join(timeout=5)
        try:
            if (self._read_holder() or {}).get("run_id") == self.run_id:
                self.store.fs.rm(self.path)
        except FileNotFoundError:  # (gone between the read and the delete)
            pass

    def _unmake(self) -> None:
        """Remove the lock file (still held: a job waiting on it was refused) and the folders
        taking it made, where they hold nothing else. Not an error where it cannot: the run is
        failing already, and that error, not this one, is the user's (an output made read-only
        had the run say only "Permission denied: .../_vidlens/lock")."""
        try:
            os.remove(self.path)
        except OSError as exc:
            log.warning("%s: the lock file of a run that wrote nothing cannot be removed (%s); remove it and "
                        "its folder %s", self.path, exc.strerror or type(exc).__name__, self._made[0])
            return
        for folder in reversed(self._made):
            try:
                os.rmdir(folder)
            except OSError:
                return  # something else is in it


def job_holding(store: Store) -> dict[str, Any] | None:
    """The holder of `store`'s lock (host, pid, run_id) where a job holds it now, else None: a
    reader's look, for its messages, that takes nothing. A local lock's holder on this host holds
    it while its process lives (its heartbeat is never refreshed: the flock is the lock);
    elsewhere a lock holds as a job taking it would judge it (`OutputLock._stale`)."""
    look = OutputLock(store, "")
    try:
        holder = look._read_holder()
    except Exception:  # noqa: BLE001 - not readable: nothing to say (the caller's own message stands)
        return None
    if not holder:
        return None
    if store.is_local and holder.get("host") == platform.node() and holder.get("pids") == pid_space():
        return holder if pid_alive(int(holder.get("pid", 0))) else None
    return None if look._stale(holder) else holder


def describe_job(holder: dict[str, Any]) -> str:
    """A lock's holder as messages name it: `run ID (host H, pid P)`, or a compaction or forget."""
    return (f"{_job(holder.get('run_id'))[0]} {holder.get('run_id', '?')} (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')})")


def _job(job_id: Any) -> tuple[str, str]:
    """What the job of this id is called, and what its command is told to do once the lock is free."""
    return _JOBS.get(str(job_id).rpartition("-")[2], _RUN)


def _is_at(handle: Any, path: str) -> bool:
    """Whether an open file is the one at `path` now (not one removed since it was opened)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _exists_error(exc: OSError) -> bool:
    """Whether a create was refused because the object exists: FileExistsError, or (s3fs makes
    that of AWS's answer only) an S3-compatible server's 412 PreconditionFailed (SeaweedFS's),
    or S3's 409 ConditionalRequestConflict (another create of it under way at the same time)."""
    if isinstance(exc, FileExistsError):
        return True
    code, status = _s3_answer(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _unsupported(exc: OSError) -> bool:
    """Whether a server refused a conditional create as something it does not do (501)."""
    code, status = _s3_answer(exc)
    return code == "NotImplemented" or status == 501


def _s3_answer(exc: OSError) -> tuple[str | None, int | None]:
    """The error code and HTTP status of the S3 answer behind an s3fs error, if one is."""
    answer = getattr(exc.__cause__, "response", None)
    if not isinstance(answer, dict):
        return None, None
    return answer.get("Error", {}).get("Code"), answer.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _parse(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}
