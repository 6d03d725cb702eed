"""Encoded label vocabularies kept on disk, so a run does not encode the same prompts again.

The zero-shot labels score every frame against every prompt of the object and scene
vocabularies (hundreds of prompts). Encoding them is the largest part of a run's start-up
on a CPU (12 of 16 s for CLIP ViT-B/32 on 2 cores), and a nightly batch would pay it every
night for the same texts. A bank is stored once per model, weights, precision and texts:

    <cache folder>/<sha256 of the key>.npz      (embeddings, and X-CLIP's raw text features)

The key names the model's hub commit (or, for a local folder, the path, size and
modification time of each file in it and in its subfolders, hidden ones such as .git left
out), the device type, dtype, quantisation, the transformers version, every name and every
template (not only the prompts they make: 1 name in 2 templates and 2 names in 1 template
can make the same prompts, whose banks differ, [1, D] and [2, D]). Anything that changes
the numbers changes the file name, so a stale bank is never read. `models.text_cache`
chooses the folder: "auto" ($VIDLENS_CACHE_DIR, else $XDG_CACHE_HOME/vidlens, else
~/.cache/vidlens, each with `text-banks/` below it), a folder, or "off". A file that cannot
be read or written is skipped with a warning: the cache never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: bump when what a bank file holds, or what its key names, changes (2: names and templates,
#: not the prompts they make; files of 1 are no longer found and are encoded again).
_FORMAT = 2


def cache_folder(setting: str) -> Path | None:
    """The folder `models.text_cache` names ("auto", a path, or "off": None)."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    base = os.environ.get("VIDLENS_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "vidlens"
    return Path(base) / "text-banks"


def model_fingerprint(model_id: str, revision: str | None) -> str | None:
    """What identifies the weights: the hub commit, or a local folder's files; None if unknown."""
    folder = Path(model_id)
    if folder.is_dir():
        # subfolders' files too (a tokenizer or weights saved in one), named by their path in the folder
        files = {}
        for parent, subfolders, names in os.walk(folder):
            # not a clone's .git or `hf download`'s .cache: bookkeeping, which `git status` alone rewrites
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            for name in names:
                path = Path(parent, name)
                if path.is_file():
                    files[path.relative_to(folder).as_posix()] = path.stat()
        return json.dumps([[name, stat.st_size, stat.st_mtime_ns] for name, stat in sorted(files.items())])
    return revision  # a hub id: its commit hash when transformers reported one


class TextBankCache:
    """Reads and writes encoded prompt banks for one loaded model (see the module's text)."""

    def __init__(self, folder: Path | None, identity: dict[str, Any] | None) -> None:
        """`identity` holds everything about the model that changes its text embeddings; with
        no folder or no identity (weights of unknown version) nothing is cached."""
        self.folder = folder if identity is not None else None
        self.identity = identity

    def path(self, names: Sequence[str], templates: Sequence[str]) -> Path | None:
        """The file of the bank of `names` in `templates`, or None when nothing is cached."""
        if self.folder is None:
            return None
        texts = {"names": list(names), "templates": list(templates)}
        key = json.dumps({"format": _FORMAT, "model": self.identity, **texts}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"

    def load(self, names: Sequence[str], templates: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The stored arrays of the bank of `names` in `templates`, or None."""
        path = self.path(names, templates)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                return {name: stored[name] for name in stored.files}
        except Exception as exc:  # noqa: BLE001 - any damaged file (empty: EOFError; cut: BadZipFile) is encoded again
            log.warning("ignoring the unreadable text bank %s (%s); encoding the prompts again", path, exc)
            return None

    def store(self, names: Sequence[str], templates: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        """Write the bank of `names` in `templates` (atomically: readers see the whole file or none)."""
        path = self.path(names, templates)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())  # (renamed unwritten, a crash could leave an empty file)
            os.replace(handle.name, path)
        except OSError as exc:
            log.warning("cannot keep the text bank in %s (%s); it will be encoded again next run", path.parent, exc)
            try:
                os.unlink(handle.name)
            except (OSError, NameError):
                pass
