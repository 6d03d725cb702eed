"""Listing the input videos: a folder (recursive), a single file, a glob, or a bucket prefix.

Listing is a generator, so a large bucket starts processing before it ends. Each video gets
a stable `video_id` from its URI, size and modification time (or etag), so a rerun over the
same files gives the same ids and a changed file gets a new one.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.task import VideoRef

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts"}
)


class SourceError(ValueError):
    """The source cannot be listed; the message names it and says what to do."""


def is_video_name(name: str) -> bool:
    """Whether a file name has one of the video extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def video_id_for(uri: str, size_bytes: int, version: str) -> str:
    """Stable id of one version of one video: same file, same id; changed file, new id."""
    return hashlib.sha256(f"{uri}\n{size_bytes}\n{version}".encode()).hexdigest()[:20]


def is_remote(uri: str) -> bool:
    """True for fsspec URLs other than local files (s3://, gs://, az://, memory://, ...)."""
    return "://" in uri and not uri.startswith("file://")


def list_videos(source: str, storage_options: dict[str, Any] | None = None) -> Iterator[VideoRef]:
    """Yield a `VideoRef` for every video under `source`, in a stable (sorted) order per folder."""
    if is_remote(source):
        yield from _list_remote(source, storage_options or {})
        return
    path = source[len("file://"):] if source.startswith("file://") else source
    if glob.has_magic(path):
        matches = sorted(glob.iglob(path, recursive=True))
        for match in matches:
            if os.path.isfile(match) and is_video_name(match):
                yield _local_ref(match)
        return
    if os.path.isfile(path):
        # a file named explicitly is taken whatever its extension: the user asked for it
        yield _local_ref(path)
        return
    if not os.path.isdir(path):
        raise SourceError(
            f"source {source!r} does not exist: give a folder, a video file, a glob such as "
            f"'videos/**/*.mp4', or a bucket URL such as s3://bucket/prefix/"
        )
    yield from _walk_local(path)


def _walk_local(root: str) -> Iterator[VideoRef]:
    # followlinks=False: a symlink loop in the source folder cannot make the walk endless
    for folder, subfolders, files in os.walk(root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not is_video_name(name):
                continue
            full = os.path.join(folder, name)
            if os.path.isfile(full):  # skips broken symlinks
                yield _local_ref(full)


def _local_ref(path: str) -> VideoRef:
    absolute = str(Path(path).absolute())
    stat = os.stat(absolute)
    return VideoRef(
        uri=absolute,
        size_bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        etag=None,
        video_id=video_id_for(absolute, stat.st_size, str(stat.st_mtime_ns)),
    )


def _list_remote(source: str, storage_options: dict[str, Any]) -> Iterator[VideoRef]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(source, **storage_options)
    protocol = source.split("://", 1)[0]
    for info in _remote_entries(fs, root):
        name = info["name"]
        if info.get("type", "file") != "file" or not is_video_name(name):
            continue
        uri = f"{protocol}://{name}"
        size = int(info.get("size") or 0)
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
        mtime_ns = _to_ns(mtime)
        yield VideoRef(
            uri=uri,
            size_bytes=size,
            mtime_ns=mtime_ns,
            etag=str(etag).strip('"') if etag else None,
            video_id=video_id_for(uri, size, str(etag or mtime_ns)),
        )


def _remote_entries(fs: Any, root: str) -> Iterator[dict[str, Any]]:
    if fs.isfile(root):
        yield fs.info(root)
        return
    # walk() lists one folder at a time, so videos flow before the whole listing is done
    for _, _, files in fs.walk(root, detail=True):
        for name in sorted(files):
            yield files[name]


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
