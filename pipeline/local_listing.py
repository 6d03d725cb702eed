"""Listing the videos of a local source: a folder (walked recursively), a file, or a glob.

A walk or a glob leaves out what it cannot read with a warning that names it, never silently,
and never follows a linked folder (two links to a folder above it made a listing without end).
Each file is looked at once, so a folder of a million files costs a million stats, not two.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import logging
import os
import stat
from collections.abc import Callable, Iterator

from pipeline.sources import SourceError, SourceMissing, as_listed, is_video_name, local_path, video_id_for
from workers.task import VideoRef

log = logging.getLogger(__name__)


def list_local(source: str) -> Iterator[VideoRef]:
    """Yield a `VideoRef` for every video a local `source` names: a folder (recursive, sorted per folder),
    a file, or a glob."""
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


def local_scope(source: str) -> Callable[[str], bool]:
    """`pipeline.sources.source_scope` of a local folder, file or glob."""
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
