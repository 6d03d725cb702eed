"""Listing the input videos: a folder (recursive), a single file, a local glob, a bucket prefix, or a manifest.

Listing is a generator all the way down, so a large bucket starts processing before it
ends and never holds every object's metadata at once: S3 prefixes are read one page
(1,000 keys) at a time, other stores one folder at a time, manifests (CSV or Parquet
files with a `uri` column) one chunk at a time; a local folder, file or glob by
`pipeline.local_listing`. Each video gets a stable `video_id` from
its URI, size and modification time (or etag), so a rerun over the same files gives the
same ids and a changed file gets a new one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from schemas.config import StorageConfig
from workers.storage import (azure_account_host, is_remote, listed_protocol, open_filesystem, size_and_etag,
                             store_of)
from workers.storage_retries import bucket_looked_up, file_info, with_retries
from workers.task import VideoRef

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts",
    ".3gp", ".3g2", ".flv", ".f4v", ".wmv", ".asf", ".mxf", ".vob", ".dv",
})
#: a source with one of these suffixes is a list of videos, not a video.
MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")
#: keys per S3 listing page (the API's maximum).
_PAGE_KEYS = 1000
#: stores whose listing gives an object's ETag in quotes, as HTTP does (s3fs, adlfs); gcsfs gives it bare.
_QUOTED_ETAG_STORES = frozenset({"s3", "az"})
#: stores whose listing of a prefix in a bucket that does not exist is empty (gcsfs, adlfs); S3's is NoSuchBucket.
_MISSING_BUCKET_LISTED_EMPTY = frozenset({"gs", "az"})

Storage = StorageConfig | dict[str, Any] | None

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source cannot be listed; the message names it and says what to do."""


class SourceMissing(SourceError):
    """The source folder or bucket prefix does not exist: mistyped, or emptied (a bucket prefix
    with no objects left is gone)."""


def is_video_name(name: str) -> bool:
    """Whether a file name has one of the video extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def is_manifest(source: str) -> bool:
    """Whether `source` names a manifest (a .csv or .parquet list of video URIs)."""
    return source.lower().endswith(MANIFEST_EXTENSIONS)


def video_id_for(uri: str, size_bytes: int, version: str) -> str:
    """Stable id of one version of one video: same file, same id; changed file, new id."""
    return hashlib.sha256(f"{uri}\n{size_bytes}\n{version}".encode()).hexdigest()[:20]


def local_path(uri: str) -> str:
    """The path of a local file or folder, given as a path or as a file URL (file:///x, file:/x or
    file://localhost/x; percent-encoded, as `Path.as_uri()` writes "a b.mp4": file:///a%20b.mp4)."""
    if not uri.startswith("file:/"):
        return uri
    parts = urlsplit(uri, allow_fragments=False)
    # a "?" in a file URL typed by hand is part of the file's name, not a query
    path = url2pathname(parts.path + (f"?{parts.query}" if "?" in uri else ""))
    # file://videos/a.mp4 was read as the relative path videos/a.mp4, and still is
    return path if parts.netloc in ("", "localhost") else parts.netloc + path


def listed_etag(uri: str, etag: str) -> str:
    """An object's ETag as its store's listing gives it, and `remote_ref` hashes into its video_id:
    in quotes on S3 and Azure, bare elsewhere (a manifest's etag column holds it either way)."""
    bare = etag.strip('"')
    return f'"{bare}"' if is_remote(uri) and store_of(uri) in _QUOTED_ETAG_STORES else bare


def list_videos(source: str, storage: Storage = None) -> Iterator[VideoRef]:
    """Yield a `VideoRef` for every video under `source`, in a stable (sorted) order per folder.

    `storage` says how to reach a bucket (a `StorageConfig`, or ready-made fsspec options).
    """
    if is_manifest(source):
        from pipeline.manifests import read_manifest

        yield from read_manifest(source, storage)
        return
    if is_remote(source):
        yield from _list_remote(source, storage)
        return
    from pipeline.local_listing import list_local

    yield from list_local(source)


def check_local_source(source: str) -> None:
    """SourceMissing, as listing it would raise, where a local source is not there (a folder, a
    file, a glob's folder, a manifest file); a bucket's is left to the run, which may reach it
    with credentials that this shell has not."""
    if is_remote(source):
        return
    if is_manifest(source):
        if not os.path.isfile(local_path(source)):
            raise SourceMissing(f"source {source!r}: no such manifest file")
        return
    next(iter(list_videos(source)), None)


def source_scope(source: str) -> Callable[[str], bool]:
    """Whether a video URI is one `source` would list: under its folder or bucket prefix,
    matched by its glob, the file or object itself. A video out of scope is never taken for deleted
    because this source did not list it (an output fed from a folder, then run over one of its
    sub-folders, or one file). A manifest names what to process: none beyond it is in scope.
    (Nor is a video in scope missing while its file is there: `still_there`.)"""
    if is_manifest(source):
        return lambda uri: False
    if is_remote(source):
        itself = _listed_uri(source)  # a source that is one object lists it under this URI
        prefix = itself + "/"
        def in_scope(uri: str) -> bool:
            # (an output's videos listed under another alias, s3a://, are in scope: marked missing, listed anew)
            listed = as_listed(uri)
            return listed == itself or listed.startswith(prefix)
        return in_scope
    from pipeline.local_listing import local_scope

    return local_scope(source)


def still_there(uri: str, storage: Storage = None) -> bool:
    """Whether a video a complete listing of its folder or prefix left out is there all the same,
    under the name a listing gives it: then it is not deleted, so not missing. A folder's walk
    leaves out hidden folders, other extensions and linked folders (a file processed alone, or from
    a manifest, once); a prefix's listing only hidden keys and other extensions, so only those are
    looked up (a lookup that fails says there: only one not found is gone). (A local URI in an older
    form, with "..", is not the listing's name: it is marked missing, and listed anew.) Nor is a
    local file that cannot be looked at (its folder unreadable, an I/O error)."""
    if is_remote(uri):
        if not looked_up(uri):
            return False  # (one the listing lists, and did not)
        try:
            fs, path = open_filesystem(uri, storage)
            return file_info(fs, path, f"look up {uri}", storage if isinstance(storage, StorageConfig) else None) \
                is not None
        except Exception:  # noqa: BLE001 - not known to be gone: kept as it is
            return True
    if as_listed(uri) != uri:
        return False
    try:
        return stat.S_ISREG(os.stat(uri).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def looked_up(uri: str) -> bool:
    """Whether `still_there` asks a bucket about `uri`: a hidden key or another extension, which a
    prefix's listing leaves out."""
    return is_remote(uri) and (not is_video_name(uri)
                               or any(part.startswith(".") for part in uri.split("://", 1)[-1].split("/")))


def as_listed(uri: str) -> str:
    """A URI as the listing names it: a local path or file: URL as its absolute path with no ".."
    (symlinks kept), a bucket's URI under its protocol as listed (`listed_protocol`: s3a://b/x as s3://b/x)."""
    if is_remote(uri):
        return f"{listed_protocol(uri)}://{uri.split('://', 1)[1]}"
    return os.path.abspath(local_path(uri))


def _listed_uri(source: str) -> str:
    """The URI a bucket listing gives the object `source` names (`_uri_maker`): its protocol in
    lower case, no trailing "/", an Azure account kept after the container."""
    container, _, key = source.split("://", 1)[1].strip("/").partition("/")
    if azure_account_host(source) is not None:
        container = container.split("@", 1)[0]
    return _uri_maker(source)(f"{container}/{key}" if key else container)


def remote_ref(uri: str, info: dict[str, Any]) -> VideoRef:
    """A `VideoRef` from an fsspec info dict (size, ETag or md5Hash, LastModified or mtime)."""
    size, etag = size_and_etag(info)
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("last_modified")
    mtime_ns = _to_ns(mtime)
    return VideoRef(
        uri=uri,
        size_bytes=size,
        mtime_ns=mtime_ns,
        etag=str(etag).strip('"') if etag else None,
        video_id=video_id_for(uri, size, str(etag or mtime_ns)),
    )


def _list_remote(source: str, storage: Storage) -> Iterator[VideoRef]:
    fs, root = open_filesystem(source, storage)
    uri_of = _uri_maker(source)
    retry = storage if isinstance(storage, StorageConfig) else None
    single = file_info(fs, root, f"look up {source}", retry)
    if single is not None:
        # (gcsfs keeps the "/" of gs://b/x/a.mp4/, whose download then looks for the key "x/a.mp4/")
        yield remote_ref(uri_of(root.rstrip("/")), single)
        return
    entries = _s3_pages(fs, root, retry) if hasattr(fs, "call_s3") else _walk_folders(fs, root, retry)
    found = False
    for info in entries:
        name = info["name"]
        if info.get("type", "file") == "file" and is_video_name(name) and not _hidden(name, root):
            found = True
            yield remote_ref(uri_of(name), info)
    if not found and not with_retries(lambda: fs.exists(root), f"look up {source}", retry):
        if store_of(source) in _MISSING_BUCKET_LISTED_EMPTY:  # a missing bucket is named as one, as S3's
            bucket_looked_up(fs, root, retry)
        magic = re.search(r"[*?[]", source)
        if magic:  # (a prefix with such characters that exists is listed as the prefix it is)
            folder = source[:source.rfind("/", 0, magic.start()) + 1]
            raise SourceMissing(f"source {source!r} does not exist, and globs are matched only on local files: "
                                f"give a bucket prefix ({folder}) or a manifest (.csv/.parquet) listing the videos")
        raise SourceMissing(f"source {source!r} does not exist: check the bucket and prefix, and the "
                          f"storage endpoint and credentials")


def _uri_maker(source: str) -> Callable[[str], str]:
    """How a name the store lists ("bucket/key") becomes a video's URI: under the source's
    protocol, and for an Azure URL naming its account (abfs://container@account.dfs.core.windows.net/...)
    with the account kept after the container, as the source wrote it. adlfs's names drop it,
    and a video's URI is what a worker opens (without AZURE_STORAGE_ACCOUNT_NAME it could not
    tell the account) and what `source_scope` matches against the source."""
    protocol = listed_protocol(source)
    host = azure_account_host(source)
    if host is None:
        return lambda name: f"{protocol}://{name}"

    def uri_of(name: str) -> str:
        container, _, key = name.partition("/")
        return f"{protocol}://{container}@{host}/{key}"
    return uri_of


def _s3_pages(fs: Any, root: str, retry: StorageConfig | None) -> Iterator[dict[str, Any]]:
    """Every object under an S3 prefix, one listing page at a time (keys come sorted)."""
    bucket, _, prefix = root.strip("/").partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "MaxKeys": _PAGE_KEYS}
    while True:
        page = with_retries(lambda: fs.call_s3("list_objects_v2", **request),
                            f"list s3://{bucket}/{request['Prefix']}", retry)
        for item in page.get("Contents", []):
            yield {"name": f"{bucket}/{item['Key']}", "type": "file", "size": item.get("Size"),
                   "ETag": item.get("ETag"), "LastModified": item.get("LastModified")}
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _walk_folders(fs: Any, root: str, retry: StorageConfig | None) -> Iterator[dict[str, Any]]:
    """Every file under `root`, one folder listing at a time, depth first, sorted by name."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = with_retries(lambda: fs.ls(folder, detail=True), f"list {folder}", retry)
        except FileNotFoundError:  # gcsfs and adlfs: nothing under it (the caller says so for the root)
            continue
        subfolders = []
        for info in sorted(entries, key=lambda entry: entry["name"]):
            if info.get("type") == "directory":
                if info["name"].rstrip("/") != folder.rstrip("/"):
                    subfolders.append(info["name"])
            else:
                yield info
        folders.extend(reversed(subfolders))


def _hidden(name: str, root: str) -> bool:
    relative = posixpath.relpath(name, root.rstrip("/") or "/") if name.startswith(root) else name
    return any(part.startswith(".") for part in relative.split("/"))


def _to_ns(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    try:
        from datetime import datetime

        return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return None
