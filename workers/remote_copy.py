"""A local copy of a bucket's video, for the decoders, which read local files.

A remote URI (s3://, gs://, memory://, ...) is downloaded through fsspec to a temp file named
by `tempfile` and a sanitised extension. A process keeps its last copy of a listed version, so
the decode and the sample stage, which run one after the other in the same worker, read one
download; a Ray decode task can hand its copy on to the node's sample task (`hand_on_download`).
"""

from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from schemas.config import StorageConfig
from workers.storage import is_remote

log = logging.getLogger(__name__)


#: the last remote video this process downloaded: {"key": (uri, version, storage), "path": local copy}.
_LAST_DOWNLOAD: dict = {}
#: the temp folder's subfolder where a Ray decode task leaves a bucket video's copy for the
#: sample task after the shot detector (`hand_on_download`), shared by a node's workers
HANDED_FOLDER = "vidlens-handed"
#: a copy handed on longer ago than this is one no sample task came for on this node (it ran on
#: another, or the video was lost): the next copy handed on deletes it
HANDED_MAX_AGE_S = 3600.0
#: a download of a process that no longer runs (killed outright: SIGKILL, the OOM killer, a
#: supervisor's stop timeout), untouched this long, is deleted by another's first download
ORPHAN_MIN_AGE_S = 3600.0
#: a download's name in the temp folder: the process that made it and its pid namespace's tag
#: (`_space_tag`), then tempfile's random part
_DOWNLOAD_NAME = re.compile(r"vidlens-(\d+)-([0-9a-f]{8})-[a-z0-9_]+(\.[A-Za-z0-9]+)?$")
#: whether this process has deleted the downloads killed processes left (`_delete_orphans`)
_ORPHANS_DELETED: list[bool] = []


@contextmanager
def local_copy(uri: str, storage: "StorageConfig | dict | None" = None, version: tuple | None = None,
               ready: str | None = None) -> Iterator[str]:
    """Yield a local path for `uri`: local paths as they are, remote ones downloaded to a temp file.

    Remote URIs (s3://, gs://, memory://, ...) go through fsspec, reached as the run's
    `StorageConfig` says (credentials from the environment unless it names them), and a
    transient error (timeout, throttling) is retried with backoff. The temp file keeps the
    URI's extension (some demuxers guess the format from it).

    Without `version` the copy is deleted when the context exits. With one (the listed size,
    modification time and etag), the copy is kept until this process downloads another video
    or exits, and a second call for the same version of the same object reuses it: the decode
    and the sample stage each read the video, and they run one after the other in the same
    worker, so a bucket's video crosses the network once instead of twice. A copy of another
    version than the one listed is refused (`download`).

    `ready`: a copy downloaded already (`VideoTask.local_path`), used while it exists.
    """
    if ready is not None and os.path.isfile(ready):
        yield ready
        return
    if not is_remote(uri):
        from fsspec.implementations.local import LocalFileSystem

        yield LocalFileSystem._strip_protocol(uri) if uri.startswith("file://") else uri
        return
    key = (uri, version, repr(storage))
    kept = _LAST_DOWNLOAD.get("path")
    if version is not None and _LAST_DOWNLOAD.get("key") == key and kept and Path(kept).is_file():
        yield kept
        return
    local_path = download(uri, storage, version)
    if version is None:
        try:
            yield local_path
        finally:
            Path(local_path).unlink(missing_ok=True)
        return
    drop_download()
    _LAST_DOWNLOAD.update(key=key, path=local_path)
    yield local_path


def adopt_download(uri: str, storage: "StorageConfig | dict | None", version: tuple, path: str) -> None:
    """Keep `path`, a copy of `uri` downloaded ahead, as this process's last download: the next
    `local_copy` of the same version reads it (the decode and the sample stage of a Ray task),
    and it is deleted as a download of its own would be."""
    drop_download()
    _LAST_DOWNLOAD.update(key=(uri, version, repr(storage)), path=path)


def hand_on_download(uri: str, storage: "StorageConfig | dict | None", version: tuple,
                     max_bytes: int) -> str | None:
    """This process's kept copy of `uri` (the version listed), moved to the node's
    `HANDED_FOLDER` for a later task to read (`VideoTask.local_path`) and delete; None where
    there is none, or the copies handed on there already take `max_bytes`.

    With shot detection a Ray run decodes a video in one task and samples it in another after
    the shot detector, on whichever worker Ray picks: each downloaded the bucket's video, so it
    crossed the network twice. A sample task on the same node now reads this copy; one on
    another node finds no file at the path and downloads the video itself, as before.
    """
    kept = _LAST_DOWNLOAD.get("path")
    if _LAST_DOWNLOAD.get("key") != (uri, version, repr(storage)) or not kept or not os.path.isfile(kept):
        return None
    folder = Path(tempfile.gettempdir()) / HANDED_FOLDER
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        _check_own_folder(folder)
        held, now = 0, time.time()
        for entry in os.scandir(folder):
            try:
                info = entry.stat()
                if now - info.st_mtime > HANDED_MAX_AGE_S:
                    os.unlink(entry.path)
                else:
                    held += info.st_size
            except OSError:  # (taken by its sample task meanwhile)
                continue
        if held and held + os.path.getsize(kept) > max_bytes:
            return None
        handed = str(folder / os.path.basename(kept))
        os.utime(kept)  # its age counts from now, not from its download (a long decode since)
        os.replace(kept, handed)  # (the same file system: both in the temp folder)
    except OSError as exc:  # (another user's folder, say): the sample task downloads the video
        log.debug("%s: copy not left for the sample task (%s)", uri, exc)
        return None
    _LAST_DOWNLOAD.clear()
    return handed


def _check_own_folder(folder: Path) -> None:
    """PermissionError unless `folder` is a folder of this user's (not a link to one), made
    private to the user here if it was not.

    Its name is fixed, in a temp folder every user shares: one that another user made (or a
    link they made to a folder of this user's elsewhere) must not receive the copies, whose
    content the sample stage trusts, nor have its old files deleted by `hand_on_download`.
    """
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(errno.EPERM, "not a folder of this user's", str(folder))
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(folder, 0o700)


def drop_download() -> None:
    """Delete the kept copy of the last remote video, if any (also done at exit)."""
    kept = _LAST_DOWNLOAD.pop("path", None)
    _LAST_DOWNLOAD.pop("key", None)
    if kept:
        Path(kept).unlink(missing_ok=True)


atexit.register(drop_download)


def download(uri: str, storage: "StorageConfig | dict | None", version: tuple | None = None) -> str:
    """Download a remote object to a new temp file; its path (the file is removed on failure).

    `version`: the listed (size, modification time, etag). The object is looked up once more when
    the copy is made, and a copy of another version is deleted with a StorageError naming `uri`:
    s3fs reads an object over 50 MiB as concurrent ranged GETs that no version pins, so an object
    replaced meanwhile left a copy part old, part new, without an error.
    """
    from workers.redaction import redact
    from workers.storage import StorageError, UnknownProtocol, open_filesystem
    from workers.storage_retries import with_retries

    retry = storage if isinstance(storage, StorageConfig) else None
    if not _ORPHANS_DELETED:
        _ORPHANS_DELETED.append(True)
        if pid_space():  # (unknown, as in some sandboxes: every container's tag would be the same)
            _delete_orphans(tempfile.gettempdir())
    fd, local_path = tempfile.mkstemp(suffix=safe_extension(uri), prefix=f"vidlens-{os.getpid()}-{_space_tag()}-")
    os.close(fd)
    try:
        fs, remote_path = open_filesystem(uri, storage)
        with_retries(lambda: fs.get_file(remote_path, local_path), f"download {uri}", retry)
        changed = _checks_version(version) and _another_version(version, fs, remote_path, uri, retry)
    except FileNotFoundError:
        Path(local_path).unlink(missing_ok=True)
        raise FileNotFoundError(f"{uri} does not exist (or was deleted after it was listed)") from None
    except UnknownProtocol:  # its message names the URI and the schemes there are
        Path(local_path).unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - any store error becomes one clear, secret-free line
        Path(local_path).unlink(missing_ok=True)
        raise StorageError(f"cannot download {uri}: {redact(f'{type(exc).__name__}: {exc}', storage)}") from None
    except BaseException:
        Path(local_path).unlink(missing_ok=True)
        raise
    if changed:
        Path(local_path).unlink(missing_ok=True)
        raise StorageError(f"{uri} changed while it was downloaded: the next run processes the new version")
    return local_path


def _delete_orphans(folder: str) -> None:
    """Delete the downloads in `folder` that processes killed outright left (a nightly run the OOM
    killer ended left up to `resources.download_ahead_bytes` a night): this user's, made in this
    boot and pid namespace (a container sharing the folder has its own: its pids read as dead
    here), whose process no longer runs, untouched for `ORPHAN_MIN_AGE_S`."""
    now, tag = time.time(), _space_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _DOWNLOAD_NAME.match(entry.name)
        if match is None or match[2] != tag:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
                    and now - info.st_mtime > ORPHAN_MIN_AGE_S and not pid_alive(int(match[1]))):
                os.unlink(entry.path)
        except OSError:  # (deleted meanwhile, or not ours to delete)
            continue


@functools.cache
def _space_tag() -> str:
    """A short tag of this process's boot and pid namespace (`pid_space`), for file names."""
    return hashlib.sha256(pid_space().encode()).hexdigest()[:8]


def pid_space() -> str:
    """This machine's boot and this process's pid namespace, where Linux says ("" elsewhere): a
    pid names a process only within them."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs (in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _checks_version(version: tuple | None) -> bool:
    """Whether a listed version is the store's own, to compare the object with after its download.

    A manifest's `etag` (or `version`) column may be any string, and it comes without a
    modification time: only a version with both (a listing's, or a lookup's) is the store's.
    """
    return version is not None and version[1] is not None and version[2] is not None


def _another_version(version: tuple, fs: Any, remote_path: str, uri: str, retry: StorageConfig | None) -> bool:
    """Whether the object is now another size or etag than the `version` listed (one lookup).

    Not the modification time: a listing and a lookup may give it at different precisions (S3
    lists it to the millisecond, a HEAD request's Last-Modified to the second); the etag changes
    with the content.
    """
    from workers.storage import size_and_etag
    from workers.storage_retries import with_retries

    fs.invalidate_cache(remote_path)  # the listing's entry may be cached: ask the store
    size, etag = size_and_etag(with_retries(lambda: fs.info(remote_path), f"look up {uri}", retry))
    return (size, str(etag).strip('"') if etag else None) != (version[0], version[2])


def safe_extension(name: str) -> str:
    """The extension of a file or object name if it is plain (a dot and 1-8 letters or digits), else "".

    Temp copies of remote videos are named by `tempfile` alone plus this extension, so an
    object key such as `../../etc/x.mp4` or one holding a newline never shapes a local path.
    """
    suffix = PurePosixPath(name.replace("\\", "/")).suffix
    return suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
