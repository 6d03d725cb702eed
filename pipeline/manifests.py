"""Manifests: a CSV or Parquet file that lists the videos to process, one URI a row.

Columns: `uri` (required; a path, a path relative to the manifest's folder (in a bucket: to its
prefix), or a bucket URL), and optionally `size` (bytes) and `etag` (or `version`, any string that changes when
the video does). With `size` and `etag` the listing costs nothing per video; without them
each video is looked up once (a stat, or a HEAD request on a bucket) so its `video_id`
still changes when the file does. The manifest is read in chunks, never whole.

A bucket's lookups are made `LOOKUPS_AT_ONCE` at a time, the videos still coming out in the
manifest's order: one at a time, a lookup's latency (20-50 ms on a cloud store) capped the
whole job at the rate the listing could feed it (23 videos/s at 40 ms), below what one GPU
runs (118 videos/s, docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any

from pipeline.lookahead import in_order_ahead
from schemas.config import StorageConfig
from workers.storage import UnknownProtocol, open_filesystem, protocol_of, store_of
from workers.storage_retries import bucket_looked_up, file_info, with_retries
from workers.task import VideoRef

log = logging.getLogger(__name__)

#: rows per chunk read from a manifest.
_CHUNK_ROWS = 10_000
#: lookups of a bucket's videos (rows without size and etag) in flight at once.
LOOKUPS_AT_ONCE = 32
_VERSION_COLUMNS = ("etag", "version")
#: rows whose size is no number each said in a warning; the others are counted in one
_BAD_SIZES_SAID = 5


def read_manifest(manifest: str, storage: StorageConfig | dict[str, Any] | None = None,
                  lookups: int = LOOKUPS_AT_ONCE) -> Iterator[VideoRef]:
    """Yield a `VideoRef` per row of a .csv or .parquet manifest, in the manifest's order,
    with at most `lookups` of a bucket's videos looked up at once."""
    yield from _in_order(_rows(manifest, storage), storage, lookups)


def _require_bucket(fs: Any, path: str, manifest: str, retry: StorageConfig | None) -> None:
    """FileNotFoundError in the store's words where a bucket manifest's bucket does not exist (a
    missing object's HEAD says only "not found"), which the command line names as such; where
    looking is refused (a policy that allows a prefix only), the manifest is said not to exist."""
    if store_of(manifest) in ("s3", "gs", "az"):
        bucket_looked_up(fs, path, retry)


def _rows(manifest: str, storage: StorageConfig | dict[str, Any] | None) -> Iterator[tuple[str, int | None, Any]]:
    """(uri, size, version) of each row of the manifest, blank rows left out."""
    from pipeline.sources import SourceError, local_path

    # a file: URL as the path it names (percent-decoded, as a folder's and a row's are)
    fs, path = open_filesystem(local_path(manifest), storage)
    retry = storage if isinstance(storage, StorageConfig) else None
    if file_info(fs, path, f"look up {manifest}", retry) is None:
        _require_bucket(fs, path, manifest, retry)
        raise SourceError(f"manifest {manifest!r} does not exist: give a .csv or .parquet file "
                          f"with a 'uri' column")
    # a relative row is beside the manifest: in its folder, or under its prefix in the bucket
    base = os.path.dirname(os.path.abspath(path)) if protocol_of(manifest) == "file" else manifest.rsplit("/", 1)[0]
    bad_sizes = 0
    with fs.open(path, "rb") as handle:
        for columns in _chunks(manifest, handle):
            if "uri" not in columns:
                raise SourceError(f"manifest {manifest!r} has no 'uri' column (columns: "
                                  f"{', '.join(columns) or 'none'}); add one with a video path or URL a row")
            sizes = columns.get("size") or columns.get("size_bytes") or [None] * len(columns["uri"])
            versions = next((columns[c] for c in _VERSION_COLUMNS if c in columns), [None] * len(sizes))
            for uri, size, version in zip(columns["uri"], sizes, versions, strict=True):
                if not uri or not str(uri).strip():
                    continue  # a blank line is not a video
                uri = _absolute(str(uri).strip(), base)
                try:
                    size = _size(size)
                except ValueError:
                    # looked up, as a row without a size is: it failed the run, at this row, every
                    # night until the manifest was mended
                    bad_sizes += 1
                    if bad_sizes <= _BAD_SIZES_SAID:
                        log.warning("manifest %s, row for %s: size %r is not a whole number of bytes; the video is "
                                    "looked up instead (mend the row, or leave its size empty)", manifest, uri, size)
                    size = None
                yield uri, size, version
    if bad_sizes > _BAD_SIZES_SAID:
        log.warning("manifest %s: %d more rows whose size is not a whole number of bytes; their videos were looked "
                    "up too", manifest, bad_sizes - _BAD_SIZES_SAID)


def _size(size: Any) -> int | None:
    """A row's size in bytes, None where it has none (an empty cell, a Parquet column's NaN);
    ValueError where it is no whole number of bytes a file can have ("12kB", -1, 2**64)."""
    if size is None or isinstance(size, str) and not size.strip() or isinstance(size, float) and math.isnan(size):
        return None
    try:  # (through Decimal: "1234.0", as pandas writes an int column with gaps, is a whole number)
        number = Decimal(str(size).strip())
    except InvalidOperation:
        raise ValueError(size) from None
    if not number.is_finite() or number != number.to_integral_value() or not 0 <= number < 2**63:
        raise ValueError(size)
    return int(number)


def _in_order(rows: Iterable[tuple[str, Any, Any]], storage: StorageConfig | dict[str, Any] | None,
              lookups: int) -> Iterator[VideoRef]:
    """A `VideoRef` per row, in order; the rows that need a bucket's lookup run on `lookups`
    threads, at most twice that many rows ahead of the one yielded."""
    from pipeline.sources import is_remote

    def start(row: tuple[str, Any, Any]) -> Future:
        uri, size, version = row
        if is_remote(uri) and (size is None or version in (None, "")):
            return pool.submit(_manifest_ref, uri, size, version, storage)
        return _resolved(_manifest_ref, uri, size, version, storage)

    with ThreadPoolExecutor(max(1, lookups), thread_name_prefix="vidlens-lookup") as pool:
        for _, ref in in_order_ahead(rows, start, 2 * lookups):
            yield ref.result()


def _chunks(manifest: str, handle: Any) -> Iterator[dict[str, list[Any]]]:
    """The manifest as column dicts of at most `_CHUNK_ROWS` rows each."""
    from pipeline.sources import SourceError

    try:
        if manifest.lower().endswith(".csv"):
            yield from _csv_chunks(handle)
        else:
            import pyarrow.parquet as pq

            from pipeline.parquet_reading import arrow_file

            for batch in pq.ParquetFile(arrow_file(handle)).iter_batches(batch_size=_CHUNK_ROWS):
                yield _lowercase(batch.to_pydict())
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed manifest gets one clear line
        raise SourceError(f"manifest {manifest!r} cannot be read ({type(exc).__name__}: {exc}); "
                          f"give a CSV with a header row or a Parquet file with a 'uri' column") from None


def _csv_chunks(handle: Any) -> Iterator[dict[str, list[Any]]]:
    # every value stays text: sizes are parsed per row, and a URI never becomes a number
    reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8-sig", newline=""))
    rows: list[dict[str, Any]] = []
    for row in reader:
        rows.append(row)
        if len(rows) >= _CHUNK_ROWS:
            yield _columns(reader.fieldnames or [], rows)
            rows = []
    if rows or not reader.fieldnames:
        yield _columns(reader.fieldnames or [], rows)


def _columns(names: list[str], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return _lowercase({name: [row.get(name) for row in rows] for name in names})


def _lowercase(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {name.strip().lower(): values for name, values in columns.items()}


def _absolute(uri: str, base: str) -> str:
    """A row's URI, a path relative to the manifest's folder (`base`: a local folder, or the
    bucket URL of a bucket manifest's prefix) joined onto it."""
    if "://" in uri or uri.startswith("file:/") or os.path.isabs(uri):
        return uri
    if "://" in base:  # (a local path under the driver's working folder before: not the bucket's object)
        protocol, folder = base.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(folder, uri))}"
    return os.path.join(base, uri)


def _resolved(call: Any, *args: Any) -> Future:
    """`call(*args)` made here, as a finished future: its error, too, comes out in its row's turn."""
    future: Future = Future()
    try:
        future.set_result(call(*args))
    except Exception as exc:  # noqa: BLE001 - handed on as it is
        future.set_exception(exc)
    return future


def _manifest_ref(uri: str, size: int | None, version: Any, storage: StorageConfig | dict[str, Any] | None) -> VideoRef:
    from pipeline.sources import as_listed, is_remote, listed_etag, local_path, remote_ref, video_id_for

    if size is not None and version not in (None, ""):
        uri = as_listed(uri)  # as a listing, and a row without size, name it: /x/a.mp4, not file:///x/a.mp4
        # hashed as the bucket's listing hashes it: the same object version gets the same video_id
        return VideoRef(uri=uri, size_bytes=size, mtime_ns=None, etag=str(version).strip('"'),
                        video_id=video_id_for(uri, size, listed_etag(uri, str(version))))
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.isfile(path):
            return _missing(os.path.abspath(path))
        stat = os.stat(path)
        absolute = os.path.abspath(path)
        return VideoRef(uri=absolute, size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns, etag=None,
                        video_id=video_id_for(absolute, stat.st_size, str(stat.st_mtime_ns)))
    uri = as_listed(uri)
    try:
        fs, path = open_filesystem(uri, storage)
    except UnknownProtocol:
        return _missing(uri)  # a mistyped scheme fails its row (the decode stage names the schemes), not the run
    retry = storage if isinstance(storage, StorageConfig) else None
    try:
        info = with_retries(lambda: fs.info(path), f"look up {uri}", retry)
    except FileNotFoundError:
        return _missing(uri)
    return remote_ref(uri, info)


def _missing(uri: str) -> VideoRef:
    # listed but absent: the decode stage reports it as an errors row naming the URI
    from pipeline.sources import video_id_for

    return VideoRef(uri=uri, size_bytes=0, mtime_ns=None, etag=None, video_id=video_id_for(uri, 0, "missing"),
                    absent=True)
