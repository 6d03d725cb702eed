"""An output location's files, on a local folder or a bucket: where they are, and how they are
written, copied and deleted.

`OutputFiles` is what differs between the two kinds of output and nothing of what the files
mean: a local folder is written one file after another and has folders to make; a bucket has
no folders and no rename (a move is a copy, then a delete), and each of its requests waits a
round trip, so its files are handled up to `FILES_AT_ONCE` at once. It is apart from
`pipeline.store` (the published tables: staging, manifests, the ledger), which builds on it,
so that either can be read without the other.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from pipeline.output_checks import check_folder_path
from workers.storage_retries import bucket_seen

#: files a bucket store writes, moves or deletes at once (each request waits a round trip of
#: tens of milliseconds: a batch's dozen files one after another cost a run's driver seconds)
FILES_AT_ONCE = 16


class OutputFiles:
    """One output location's files, read and written through fsspec (see `pipeline.store.Store`)."""

    def __init__(self, out: str, storage_options: dict | None = None):
        from workers.storage import url_to_fs

        self.out = out
        self.storage_options = storage_options or {}
        self.fs, root = url_to_fs(out, self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.is_local = "file" in protocols_of(self.fs)
        if self.is_local:
            check_folder_path(out if "://" not in out else self.root, f"output {out!r}")
        elif pattern := re.search(r"[*?[]", self.root):
            # fsspec's deletes and DuckDB's reads of a bucket match such a path as a pattern, which
            # finds none of its files: a run stopped at its first batch, and no query could read it
            raise ValueError(f"output {out!r} has {pattern.group()!r} in its path, which fsspec and DuckDB "
                             f"read as a pattern on a bucket: give a prefix without * ? or [")

    # --- paths -----------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """A path inside the output location (as the filesystem names it)."""
        return posixpath.join(self.root, *parts)

    def url(self, relative: str) -> str:
        """The path DuckDB and people use for a file: plain for local files, with protocol otherwise."""
        full = self.path(relative)
        return full if self.is_local else self.fs.unstrip_protocol(full)

    def makedirs(self, folder: str) -> None:
        """Make a local folder and its parents. A bucket has no folders: s3fs's makedirs costs
        two requests, and where checking the bucket is refused, creates the bucket."""
        if self.is_local:
            self.fs.makedirs(folder, exist_ok=True)

    def require_bucket(self) -> None:
        """FileNotFoundError where the output's bucket does not exist, before anything is written
        (s3fs's makedirs, which `makedirs` leaves out on buckets, created it, a mistyped name too)."""
        if not set(protocols_of(self.fs)) & {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}:
            return
        if not bucket_seen(self.fs, self.root.split("/", 1)[0]):
            # looking was refused; a listing's refusal says why (the run lists the output anyway)
            try:
                self.fs.ls(self.root, refresh=True)
            except FileNotFoundError:
                pass  # a new output
            finally:
                self.fs.invalidate_cache(self.root)

    # --- many files at once ----------------------------------------------------------------

    def each(self, function: Callable[[Any], Any], items: Iterable[Any],
              after_first: Callable[[], None] | None = None) -> list[Any]:
        """`function(item)` of each item, its results in order: up to FILES_AT_ONCE at once on a
        bucket, one after another on a local folder; `after_first` is called once the first
        (to finish, on a bucket) has."""
        items = list(items)
        if self.is_local or len(items) < 2:
            results = []
            for item in items:
                results.append(function(item))
                if after_first is not None and len(results) == 1:
                    after_first()
            return results
        with ThreadPoolExecutor(min(len(items), FILES_AT_ONCE), thread_name_prefix="vidlens-store") as pool:
            futures = [pool.submit(function, item) for item in items]
            for done, future in enumerate(as_completed(futures)):
                future.result()  # (the first error raised; the others' calls are finished first)
                if done == 0 and after_first is not None:
                    after_first()
            return [future.result() for future in futures]

    def delete_present(self, relatives: list[str]) -> int:
        """Delete those of these files that are there (a bucket's delete of a missing key succeeds,
        a local folder's fails); returns how many were."""
        present = self._there(relatives)
        if self.is_local:
            for relative in present:
                self.fs.rm(self.path(relative))
        else:
            self.remove([self.path(relative) for relative in present])
        return len(present)

    def _there(self, relatives: list[str]) -> list[str]:
        """Those of these files that are there now, in order (looked up at once on a bucket)."""
        return [r for r, there in zip(relatives, self.each(lambda r: self.fs.exists(self.path(r)), relatives))
                if there]

    def remove(self, paths: list[str]) -> None:
        """Delete these objects of a bucket: in up to FILES_AT_ONCE lists at once (s3fs deletes a
        list in one request a thousand, gcsfs a hundred; adlfs one after another)."""
        self.each(self.fs.rm, [paths[i::FILES_AT_ONCE] for i in range(min(FILES_AT_ONCE, len(paths)))])

    def _copy(self, source: str, target: str) -> None:
        """Copy an object of the bucket to another name. On S3 one CopyObject request: s3fs's
        `cp_file` first asks for the object's size (a round trip more a file) to copy one over
        5 GB in parts, which a copy refused falls back to."""
        if "s3" in protocols_of(self.fs) and hasattr(self.fs, "_copy_basic"):
            from fsspec.asyn import sync

            try:
                return sync(self.fs.loop, self.fs._copy_basic, source, target)
            except (OSError, ValueError):  # (over 5 GB; or the error cp_file raises, as before)
                pass
        self.fs.cp_file(source, target)


def forget_listings(fs: Any, folder: str) -> None:
    """Drop what `fs` remembers of the listings of `folder` and of every folder under it.

    s3fs' `invalidate_cache(folder)` drops the folder's listing and its parents', not those
    of the folders under it, and a `find` keeps a listing it already holds of one of those: a
    reader in a long-lived process (a notebook registering the views again after a run, as it
    should) then had DuckDB look a file up in that stale listing of its run date's folder and
    fail with "No files found that match the pattern" for every file a later run published
    there (filesystems are shared by their options within a process).
    """
    fs.invalidate_cache(folder)
    cache = getattr(fs, "dircache", None)
    if cache is None:
        return
    under = folder.rstrip("/") + "/"
    for key in [key for key in list(cache) if isinstance(key, str) and key.startswith(under)]:
        cache.pop(key, None)


def protocols_of(fs: Any) -> tuple[str, ...]:
    """The protocols a filesystem answers to ("file", "local"; "s3", "s3a"), as a tuple."""
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
