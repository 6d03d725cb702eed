"""Listing the input videos: a folder (recursive), a single file, a local glob, a bucket prefix, or a manifest.

Listing is a generator all the way down, so a large bucket starts processing before it
ends and never holds every object's metadata at once: S3 prefixes are read one page
(1,000 keys) at a time, other stores one folder at a time, manifests (CSV or Parquet
files with a `uri` column) one chunk at a time. Each video gets a stable `video_id` from
its URI, size and modification time (or etag), so a rerun over the same files gives the
same ids and a changed file gets a new one.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import itertools
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
from workers.storage import (azure_account_host, bucket_looked_up, file_info, is_remote, listed_protocol,
                             open_filesystem, size_and_etag, store_of, with_retries)
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
    path = local_path(source)
    if _is_glob(path):
        root, pattern = _glob_split(path)
        if not stat.S_ISDIR(_mode(source, root)):
            raise SourceMissing(f"source {source!r}: the folder {root!r} it matches in does not exist")
        # (glob matches nothing in a folder it cannot list or enter, without a word)
        try:
            _check_readable(root)
        except OSError as exc:
            raise _unreadable(source, exc) from exc
        _say_unreadable_folders(pattern)
        matches = sorted(_glob_unlinked(pattern))
        for match in matches:
            if os.path.isfile(match) and is_video_name(match) and _named_in_utf8(match):
                yield _local_ref(match)
        return
    mode = _mode(source, path)
    if stat.S_ISREG(mode):
        # a file named explicitly is taken whatever its extension: the user asked for it
        if not _named_in_utf8(path, warn=False):
            raise SourceError(f"source {_shown(path)}: {_NOT_UTF8}")
        yield _local_ref(path)
        return
    if not stat.S_ISDIR(mode):
        raise SourceMissing(
            f"source {source!r} does not exist: give a folder, a video file, a glob such as "
            f"'videos/**/*.mp4', a bucket URL such as s3://bucket/prefix/, or a manifest (.csv/.parquet)"
        )
    yield from _walk_local(path)


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


def _mode(source: str, path: str) -> int:
    """The mode of a local source's file or folder, 0 where there is none; SourceError where it
    cannot be looked at (not "does not exist": the output's videos from it would be taken for
    deleted)."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return 0
    except OSError as exc:
        raise _unreadable(source, exc) from exc


def _unreadable(source: str, exc: OSError) -> SourceError:
    return SourceError(f"source {source!r} cannot be read ({exc.strerror or type(exc).__name__}): "
                       "give this job read access to it, or fix the mount")


def _check_readable(folder: str) -> None:
    """OSError where `folder` cannot be listed, or listed but not entered (chmod 644)."""
    os.scandir(folder).close()
    if not os.access(folder, os.X_OK):
        raise PermissionError(13, "Permission denied", folder)


def _left_out(folder: str, exc: OSError) -> None:
    # a walk or a glob leaves out a folder it cannot read, silently: its videos were neither listed
    # nor processed (their rows are kept: `still_there`)
    log.warning("%s: left out, with every video under it: the folder cannot be read (%s); "
                "give this job read access to it", folder, exc.strerror or type(exc).__name__)


def _say_unreadable_folders(pattern: str) -> None:
    """Warn of each folder a glob looks in or passes through that cannot be read: those each
    wildcard of its folder part matches ("b" for "in/*/sub/*.mp4", then every "in/*/sub"), and
    every one under a `**` of its last part."""
    folder, name = os.path.split(pattern)
    parts = folder.split(os.sep)
    looked = [os.sep.join(parts[:i + 1]) for i, part in enumerate(parts) if glob.has_magic(part)]
    said = set()
    for where in [*looked, os.path.join(folder, "**" if "**" in name else "")]:
        for match in _glob_unlinked(os.path.join(where, "")):
            if match in said:
                continue
            said.add(match)
            try:
                _check_readable(match)
            except OSError as exc:
                _left_out(match.rstrip(os.sep) or match, exc)


def _glob_unlinked(pattern: str) -> Iterator[str]:
    """What `glob.iglob(pattern, recursive=True)` matches, but a "**" does not go into a linked
    folder, as a folder's walk does not: glob's does, and two links to a folder above it (loop -> ..)
    made a listing without end."""
    parts = pattern.split(os.sep)
    return _glob_parts(os.sep, parts[1:]) if pattern.startswith(os.sep) else _glob_parts("", parts)


def _glob_parts(folder: str, parts: list[str]) -> Iterator[str]:
    part, rest = parts[0], parts[1:]
    if not glob.has_magic(part):
        path = os.path.join(folder, part)
        if rest and os.path.isdir(path):
            yield from _glob_parts(path, rest)
        elif not rest and os.path.lexists(path):
            yield path
        return
    if part == "**" and rest:
        yield from _glob_parts(folder, rest)  # "**/" matches no folder too
    try:
        with os.scandir(folder or os.curdir) as entries:
            named = sorted(entries, key=lambda entry: entry.name)
    except OSError:
        return  # (said by `_say_unreadable_folders`)
    for entry in named:
        if entry.name.startswith(".") and not part.startswith("."):
            continue  # hidden, as glob leaves it out
        path = os.path.join(folder, entry.name)
        if part == "**":
            if not rest:
                yield path
            if entry.is_dir(follow_symlinks=False):
                yield from _glob_parts(path, parts)
        elif fnmatch.fnmatchcase(entry.name, part):
            if not rest:
                yield path
            elif entry.is_dir():
                yield from _glob_parts(path, rest)


def _walk_local(root: str) -> Iterator[VideoRef]:
    def unreadable(exc: OSError) -> None:
        if exc.filename is None or os.path.abspath(exc.filename) == os.path.abspath(root):
            raise _unreadable(root, exc) from exc
        _left_out(exc.filename, exc)

    # followlinks=False: a symlink loop in the source folder cannot make the walk endless
    for folder, subfolders, files in os.walk(root, onerror=unreadable, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        said = False
        for name in sorted(files):
            if name.startswith(".") or not is_video_name(name):
                continue
            full = os.path.join(folder, name)
            try:
                info = os.stat(full)
                if not stat.S_ISREG(info.st_mode):
                    continue
            except FileNotFoundError:  # (a broken symlink, or deleted since)
                continue
            except PermissionError as exc:  # a folder that can be listed but not entered (chmod 644)
                exc.filename = folder
                if not said:
                    unreadable(exc)
                said = True
                continue
            except OSError as exc:  # an I/O error on one file
                log.warning("%s: left out: it cannot be looked at (%s)", full, exc.strerror or type(exc).__name__)
                continue
            if _named_in_utf8(full):
                yield _local_ref(full, info)  # (looked at once: a listing of a million files stats each once)


def _is_glob(path: str) -> bool:
    """Whether a local source is a glob: it has glob characters, and is not the name of a file
    or folder that exists ("Trip [2019]" is a folder's name, not a pattern)."""
    return glob.has_magic(path) and not os.path.exists(path)


def _glob_split(path: str) -> tuple[str, str]:
    """(the folder a glob matches in, the glob with that folder's name escaped): the folder is
    its path up to the first part with glob characters that is not a folder's own name (in
    "Trip [2019]/*.mp4", "Trip [2019]" is a folder)."""
    parts = path.split(os.sep)
    fixed = 0
    while fixed < len(parts) and (not glob.has_magic(parts[fixed])
                                  or os.path.isdir(os.sep.join(parts[:fixed + 1]))):
        fixed += 1
    root = os.sep.join(parts[:fixed]) or (os.sep if path.startswith(os.sep) else ".")
    return root, os.sep.join([glob.escape(root), *parts[fixed:]])


_NOT_UTF8 = "its name is not UTF-8 (rename it, e.g. with convmv, to process it)"


def _named_in_utf8(path: str, warn: bool = True) -> bool:
    """Whether a listed file's name can be written in the tables (UTF-8); one that cannot (bytes
    of another encoding, which Python keeps as surrogates) is left out, with a warning."""
    try:
        path.encode()
    except UnicodeEncodeError:
        if warn:
            log.warning("%s: left out: %s", _shown(path), _NOT_UTF8)
        return False
    return True


def _shown(path: str) -> str:
    """A path for a message, its bytes that are not UTF-8 written as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
    path = local_path(source)
    absolute = os.path.abspath(path)  # as `_local_ref` names the files it lists
    prefix = absolute.rstrip("/") + "/"
    if _is_glob(path):
        pattern = _glob_split(absolute)[1]
        depth = None if "**" in path else pattern.count("/")  # fnmatch's * crosses "/": glob's does not
        patterns = _with_no_folder_for_each_doublestar(pattern)
        # or the path itself, as a glob it no longer is: a folder or file whose name has glob
        # characters ("Trip [2019]"), since removed, whose videos are now missing
        return lambda uri: _in_glob(as_listed(uri), patterns, depth, absolute, prefix)
    # (outputs made before the listing dropped "..", `vidlens run ../videos`, hold their videos
    # under other URIs: in scope all the same, they are marked missing, not left as if listed)
    return lambda uri: _under(as_listed(uri), absolute, prefix)


def _under(uri: str, absolute: str, prefix: str) -> bool:
    """Whether a local URI is the file or folder `absolute` or under it."""
    return uri == absolute or uri.startswith(prefix)


def _in_glob(uri: str, patterns: tuple[str, ...], depth: int | None, absolute: str, prefix: str) -> bool:
    """Whether a local URI is one a glob matches (any of its `patterns`; no deeper than `depth`
    folders unless "**"), or under the path the glob names, as a glob it no longer is."""
    matched = any(fnmatch.fnmatchcase(uri, pattern) for pattern in patterns)
    return matched and (depth is None or uri.count("/") == depth) or _under(uri, absolute, prefix)


def _with_no_folder_for_each_doublestar(pattern: str) -> tuple[str, ...]:
    """`pattern` and its forms with each "**/" taken out in turn: glob's "**/" matches no folder
    too (videos/**/*.mp4 lists videos/a.mp4), fnmatch's at least one."""
    pieces = pattern.split("**/")
    return tuple({"".join(piece + joint for piece, joint in zip(pieces, (*joints, "")))
                  for joints in itertools.product(("**/", ""), repeat=len(pieces) - 1)})


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


def _local_ref(path: str, info: os.stat_result | None = None) -> VideoRef:
    """The reference of a local file; `info`: its `os.stat`, where the listing has it already."""
    absolute = os.path.abspath(path)  # no "..": `vidlens run ../videos` names its files as any other run does
    info = info or os.stat(absolute)
    return VideoRef(
        uri=absolute,
        size_bytes=info.st_size,
        mtime_ns=info.st_mtime_ns,
        etag=None,
        video_id=video_id_for(absolute, info.st_size, str(info.st_mtime_ns)),
    )


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
