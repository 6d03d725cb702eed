"""The open frame source a decode stage keeps for the sample stage that reads the same video next.

Opening a video costs its index (decord reads every frame's time, PyAV every packet's header);
the decode and sample stages of a video usually run in the same decode child, one after the
other, so the source the first opened serves the second.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.frame_sources import FrameSource


class KeptSource:
    """One open frame source this thread keeps from the decode stage for the sample stage.

    The decode stage opens a video (decord reads its index and every frame's time, PyAV every
    packet's header) and the sample stage reads frames from it next, usually in the same decode
    child: keeping the source saves opening the video twice. The sample stage takes it only for
    the same file, unchanged (path, device, inode, size and modification time), and the same
    decoder; anything else closes it. At most one source is kept per thread.
    """

    _state = threading.local()

    @classmethod
    def keep(cls, path: str | Path, source: FrameSource) -> None:
        """Keep `source` (open on `path`) for `take`, closing the one kept before."""
        cls.drop()
        cls._state.kept = (_file_identity(path), source)

    @classmethod
    def take(cls, path: str | Path, decoder: str) -> FrameSource | None:
        """The kept source if it is open on this same, unchanged file with `decoder`; else None
        (and the kept one, if any, is closed)."""
        kept = getattr(cls._state, "kept", None)
        cls._state.kept = None
        if kept is None:
            return None
        identity, source = kept
        if source.decoder == decoder and identity == _file_identity(path):
            return source
        source.close()
        return None

    @classmethod
    def drop(cls) -> None:
        """Close the kept source, if any."""
        kept = getattr(cls._state, "kept", None)
        cls._state.kept = None
        if kept is not None:
            kept[1].close()


#: kept sources a forked child inherited: never closed, nor freed, there (`_inherit_no_kept_source`)
_INHERITED_SOURCES: list = []


def _inherit_no_kept_source() -> None:
    """In a new child: the parent's kept source is the parent's. Closing (or freeing) it here
    waited forever: a PyAV decoder with frame threads joins threads that a forked child does
    not have (a run started in a process that had read a video with `read_video`)."""
    kept = getattr(KeptSource._state, "kept", None)
    if kept is not None:
        _INHERITED_SOURCES.append(kept)
        KeptSource._state.kept = None


os.register_at_fork(after_in_child=_inherit_no_kept_source)


def _file_identity(path: str | Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
