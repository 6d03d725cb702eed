"""The sample counts an MP4/MOV file's index claims, read before FFmpeg opens the file.

FFmpeg's MP4 demuxer sizes its index by the counts the file's boxes state as it opens the file
(`stsz`/`stz2` and the `stts`/`ctts` tables of each track in the `moov`, `trun` in each
fragment), before it reads a frame: a 1.8 KB MP4 whose index claimed 80 million frames made
opening it take 4.8 GB with PyAV and 3.2 GB with decord. No FFmpeg option bounds it (the format's
`max_index_size` is not read by this demuxer). `workers.decode.probe` refuses such a file, reading
box headers and those counts only: a sample needs at least a byte of the file, so a claim of
more samples than the file has bytes cannot be true.

What is read is bounded: at most `MAX_BOXES` box headers, `MAX_DEPTH` boxes inside one another,
and `MAX_TABLE_BYTES` of each `stts`/`ctts` table. A file that starts otherwise than an MP4/MOV does is not read at all.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

#: the boxes an MP4, MOV, 3GP or fragmented MP4 file may start with (FFmpeg's MOV probe takes
#: these); a file that starts with any other is left to FFmpeg.
_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp",
                          b"sidx", b"moof", b"uuid", b"pdin", b"junk"})
#: the boxes walked into: the tracks of the `moov` and the track fragments of each `moof`.
_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"})
#: box headers read at most (a 10-hour fragmented MP4 of 1-second fragments has about 250,000):
#: beyond them the rest of the file is not checked.
MAX_BOXES = 1_000_000
#: boxes inside one another walked into at most (a fragment's `trun` is 3 deep, a track's `stsz` 6):
#: a file of `moov` boxes each inside the last ran Python out of its recursion depth.
MAX_DEPTH = 16
#: bytes of one `stts`/`ctts` table read at most (2 million entries; a table has one entry a run
#: of equal durations, so a constant-rate video's has one): the entries beyond are not summed.
MAX_TABLE_BYTES = 16 << 20


@dataclass(frozen=True)
class SampleClaim:
    """The most samples one box of the index claims: `track` is the track's place in the `moov`
    (1 for the first), 0 for a fragment's `trun`."""

    track: int
    box: str
    samples: int

    def refusal(self, size: int) -> str:
        """Why a file of `size` bytes that makes this claim is not opened (for its errors row)."""
        where = f"track {self.track}'s {self.box}" if self.track else "a fragment's trun"
        return (f"its MP4/MOV index claims {self.samples:,} frames or samples ({where}), more than a file of "
                f"{size:,} bytes can hold: a damaged or forged index, not opened (FFmpeg would reserve memory "
                "for every one of them)")


def implausible_claim(path: str | Path, size: int) -> SampleClaim | None:
    """The first claim of the file's index to more samples than its `size` bytes can hold, or
    None (also for a file that is no MP4/MOV, or cannot be read: opening it says why)."""
    try:
        return next((claim for claim in sample_claims(path) if claim.samples > size), None)
    except OSError:
        return None


def sample_claims(path: str | Path) -> list[SampleClaim]:
    """Every sample count the file's MP4/MOV index states (empty for a file that is not one).

    A sound track that FFmpeg indexes by chunk (one `stts` entry of duration 1: QuickTime's PCM
    and IMA4, whose counts are audio samples, more than the bytes in IMA4) is left out: its
    `stsz` and `stts` counts size no allocation."""
    with open(path, "rb") as handle:
        end = handle.seek(0, 2)
        handle.seek(0)
        if handle.read(8)[4:8] not in _FIRST_BOXES:
            return []
        walk = _Walk(handle, end)
        walk.visit(0, end, track=0, parent=b"", depth=0)
    chunked = {track for track, handler in walk.handlers.items()
               if handler == b"soun" and walk.durations.get(track) == (1,)}
    return [claim for claim in walk.found if claim.track not in chunked or claim.box == "ctts"]


class _Walk:
    """One walk over a file's boxes, counting the headers it reads against `MAX_BOXES`."""

    def __init__(self, handle: BinaryIO, end: int) -> None:
        self.handle, self.end, self.boxes, self.tracks = handle, end, 0, 0
        self.found: list[SampleClaim] = []
        #: each track's handler type (b"vide", b"soun", ...), and its `stts` durations where it has one entry
        self.handlers: dict[int, bytes] = {}
        self.durations: dict[int, tuple[int, ...]] = {}

    def visit(self, start: int, end: int, track: int, parent: bytes, depth: int) -> None:
        """Note the claims of the boxes between `start` and `end`, and of those inside them, `depth`
        boxes deep."""
        for kind, body, box_end in self._boxes(start, end):
            if kind in _CONTAINERS and depth >= MAX_DEPTH:
                continue
            if kind == b"trak":
                self.tracks += 1
                self.visit(body, box_end, self.tracks, kind, depth + 1)
            elif kind in _CONTAINERS:
                self.visit(body, box_end, track, kind, depth + 1)
            elif kind == b"hdlr" and parent == b"mdia":  # (a QuickTime minf's hdlr names a data handler)
                self.handle.seek(body + 8)
                self.handlers.setdefault(track, self.handle.read(4))
            elif kind in (b"stsz", b"stz2"):
                self.found.append(SampleClaim(track, kind.decode(), self._uint32(body + 8)))
            elif kind in (b"stts", b"ctts"):
                total, single = self._table_total(body)
                if kind == b"stts" and single is not None:
                    self.durations.setdefault(track, single)
                self.found.append(SampleClaim(track, kind.decode(), total))
            elif kind == b"trun":
                self.found.append(SampleClaim(0, "trun", self._uint32(body + 4)))

    def _boxes(self, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
        """(type, where its body starts, where it ends) of each box from `start` to `end`; a box
        stated to run past `end` ends there, a size of 0 runs to `end`, a broken size ends the walk."""
        at = start
        while at + 8 <= end and self.boxes < MAX_BOXES:
            self.boxes += 1
            self.handle.seek(at)
            head = self.handle.read(16)
            if len(head) < 8:  # (the file shrank since its size was read)
                return
            size, kind = struct.unpack(">I4s", head[:8])
            body = at + 8
            if size == 1 and len(head) == 16:  # a 64-bit size follows
                size, body = struct.unpack(">Q", head[8:16])[0], at + 16
            elif size == 0:
                size = end - at
            if size < body - at:
                return
            box_end = min(at + size, end)
            yield kind, body, box_end
            at = box_end

    def _uint32(self, at: int) -> int:
        self.handle.seek(at)
        data = self.handle.read(4)
        return struct.unpack(">I", data)[0] if len(data) == 4 else 0

    def _table_total(self, body: int) -> tuple[int, tuple[int, ...] | None]:
        """The sum of the counts of a `stts`/`ctts` table, and its one entry's duration where it
        has one entry. Entries are read up to the file's end, as FFmpeg reads them, not the box's."""
        entries = self._uint32(body + 4)
        self.handle.seek(body + 8)
        data = self.handle.read(max(0, min(entries * 8, MAX_TABLE_BYTES, self.end - body - 8)))
        pairs = struct.unpack(f">{len(data) // 8 * 2}I", data[: len(data) // 8 * 8])
        return sum(pairs[0::2]), (pairs[1:2] if len(pairs) == 2 else None)
