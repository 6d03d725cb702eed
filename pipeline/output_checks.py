"""What a run date and a local output folder must be, checked where the user gives them.

A run date names a `run_date=` partition: one that is no calendar day would stop DuckDB reading
the output. An output or report folder that is a file (or lies inside one) would fail later
with a bare "Not a directory"; a file to write (a summary, a query's result) under a file, or at a
URL, with DuckDB's "IO Error: Cannot open file", as if the query were wrong.
"""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path

from pipeline.sources import local_path

#: a URL's scheme and its "://" (s3://, gs://, file://), where a local path is wanted
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def check_run_date(text: str) -> str:
    """`text` if it is a real calendar date written YYYY-MM-DD (a `run_date=` partition); else ValueError.

    2024-13-40 has the pattern but no such day: its folders would stop DuckDB reading the output.
    """
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(f"run date {text!r} is not a date like 2024-05-31 (YYYY-MM-DD)")
    try:
        date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"run date {text!r} is not a calendar date: give a real day as YYYY-MM-DD, "
                         f"e.g. 2024-05-31") from None
    return text


def check_folder_path(path: str, what: str, bucket_ok: bool = True, made_by: str = "a run") -> None:
    """ValueError naming `what` when `path` is empty, when local `path`, or the nearest existing folder
    above it, is a file; or, unless `bucket_ok`, when `path` is a URL. `made_by` is what makes the
    folder where it is missing (an output's: a run, whichever command reads it)."""
    if not path:  # (an unset variable: it was the current folder, whose videos/ and thumbs/ a report prunes)
        raise ValueError(f"{what} is empty: name a folder" + (" or a bucket URL" if bucket_ok else ""))
    if not bucket_ok and _URL.match(path):
        raise ValueError(f"{what} is a URL: give a local folder, then copy it where it is served from "
                         "(for a bucket: aws s3 sync FOLDER s3://bucket/prefix, or gsutil rsync)")
    path = local_path(path)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:/(?!/)", path) and not os.path.lexists(path.split("/", 1)[0]):
        raise ValueError(f"{what} looks like a URL with one slash after its scheme: write "
                         f"{path.split(':/', 1)[0]}://{path.split(':/', 1)[1]} (a local folder named "
                         f"{path.split('/', 1)[0]!r} would be made)")
    current = _nearest_existing(path)
    if os.path.lexists(current) and not os.path.isdir(current):
        where = "is a file" if current == os.path.abspath(path) else f"is inside {current}, which is a file"
        raise ValueError(f"{what} {where}, not a folder: name a folder ({made_by} makes it if missing)"
                         + (" or a bucket URL such as s3://bucket/prefix" if bucket_ok else ""))


def check_writable_folder(path: str, what: str) -> None:
    """ValueError naming `what` where this user cannot write local folder `path`, or make it (the
    nearest existing folder above it is not writable): for the commands that hand it on to later
    runs (`vidlens schedule`), whose every night would fail on it. Root may write anywhere here."""
    folder = os.path.abspath(local_path(path))
    current = _nearest_existing(folder)
    if os.path.isdir(current) and not os.access(current, os.W_OK | os.X_OK):
        held = "" if current == folder else f" ({current}, where it would be made)"
        raise ValueError(f"{what} cannot be written by this user{held}: name a folder this user can write, or "
                         "give this user write access to it")


def _nearest_existing(path: str) -> str:
    """The absolute local `path`, or the nearest folder above it that exists (where it would be made)."""
    current = os.path.abspath(path)
    while not os.path.lexists(current) and os.path.dirname(current) != current:
        current = os.path.dirname(current)
    return current


def make_folder(path: str | Path, what: str) -> Path:
    """Make local folder `path` and the folders above it; ValueError naming `what` where it cannot
    be made (a place this user may not write, a system folder), where a bare errno line named neither
    the option nor what to do."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} cannot be made ({exc.strerror or exc}): name a folder this user can write") from None
    return Path(path)


def check_file_path(path: str, flag: str = "--summary-json", example: str = "summary.json") -> None:
    """ValueError naming `flag` where its file cannot be written (its folder is made)."""
    if not path:  # (an unset variable: DuckDB's COPY TO '' wrote data_0.csv into the current folder)
        raise ValueError(f"{flag} is empty: name a file, e.g. {example}")
    if _URL.match(path):  # (its folder was made here: ./s3:/bucket)
        raise ValueError(f"{flag} {path} is a URL: give a local file, then copy it where it goes "
                         "(for a bucket: aws s3 cp FILE s3://bucket/key, or gsutil cp)")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"{flag} {path} is a folder: name a file, e.g. {os.path.join(path, example)}")
    above = folder
    while not os.path.lexists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"{flag} {path}: {above} is a file, not a folder: name a file in a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: its folder cannot be made ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: its folder {folder} is not writable")
