"""The sample counts an MP4/MOV file's index claims, read before FFmpeg opens the file.

FFmpeg's MP4 demuxer sizes its index by the counts the file's boxes state as it opens the file
(`stsz`/`stz2` and the `stts`/`ctts` tables of each track in the `moov`, `trun` in each
fragment), before it reads a frame: a 1.8 KB MP4 whose index claimed 80 million frames made
opening it take 4.8 GB with PyAV and 3.2 GB with decord. No FFmpeg option bounds it (the format's
`max_index_size` is not read by this demuxer). `workers.decode.probe` refuses such a file, reading
box headers and those counts only: a sample needs at least a byte of the file, so a claim of
more samples than the file has bytes cannot be true. A fragmented MP4's fragments are summed
track by track: FFmpeg grows a track's index by each `trun`'s count, and 100 of them each
claiming 1 million samples, in a file of 1 MB, took 3.2 GB. A video track's count is its
frames: one of more than `sampling.max_video_frames`, a video refused for its length anyway, is
refused before FFmpeg reserves memory for them (10 million, in a file of 10 MB: 786 MB and 8 s).

What is read is bounded: at most `MAX_BOXES` box headers, `MAX_DEPTH` boxes inside one another,
and `MAX_TABLE_BYTES` of each `stts`/`ctts` table. A file that starts otherwise than an MP4/MOV does is not read at all.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
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
    (1 for the first), 0 for a fragment's `trun`; `box` "truns" sums the track's fragments.
    `handler` is the track's kind ("vide", "soun", ...; "" where the index does not say)."""

    track: int
    box: str
    samples: int
    handler: str = field(default="", compare=False)

    def refusal(self, size: int, max_frames: int | None = None) -> str:
        """Why a file of `size` bytes that makes this claim is not opened (for its errors row): it
        cannot hold the samples, or (within `size`) they are more frames than `max_frames`."""
        if self.box == "tracks":
            where = "all its tracks together"
        elif self.box == "truns":
            where = f"track {self.track}'s fragments, in all" if self.track else "fragments of no track, in all"
        else:
            where = f"track {self.track}'s {self.box}" if self.track else "a fragment's trun"
        if self.samples <= size and max_frames is not None:
            return (f"its MP4/MOV index claims {self.samples:,} frames for its video ({where}), more than the "
                    f"limit of {max_frames:,} frames per video (sampling.max_video_frames): refused before it is "
                    "opened (FFmpeg would reserve memory for every one of them); raise the setting where videos "
                    "that long are expected, or split the video")
        return (f"its MP4/MOV index claims {self.samples:,} frames or samples ({where}), more than a file of "
                f"{size:,} bytes can hold: a damaged or forged index, not opened (FFmpeg would reserve memory "
                "for every one of them)")


def implausible_claim(path: str | Path, size: int, max_frames: int | None = None) -> SampleClaim | None:
    """The first claim of the file's index to more samples than its `size` bytes can hold, else
    (given `max_frames`) the first of a video track to more frames than that; or None (also for a
    file that is no MP4/MOV, or cannot be read: opening it says why). Sound and other tracks count
    samples that are not frames (AAC's 47 a second), bounded by the bytes only."""
    try:
        claims = sample_claims(path)
    except OSError:
        return None
    return (next((claim for claim in claims if claim.samples > size), None)
            or next((claim for claim in claims if max_frames is not None and claim.handler == "vide"
                     and claim.samples > max_frames), None))


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
    found = walk.found + [SampleClaim(track, "truns", total) for track, total in walk.fragment_samples.items()]
    found = [dataclasses.replace(claim, handler=_handler(walk.handlers.get(claim.track), claim.handler))
             for claim in found if claim.track not in chunked or claim.box not in ("stsz", "stz2", "stts")]
    # each track's samples are bytes of their own: many tracks each claiming the file's size add up
    most: dict[int, int] = {}
    for claim in found:
        if claim.track and claim.box != "truns":
            most[claim.track] = max(most.get(claim.track, 0), claim.samples)
    total = sum(most.values()) + sum(walk.fragment_samples.values())
    return found + [SampleClaim(0, "tracks", total)] if len(set(most) | set(walk.fragment_samples)) > 1 else found


def _handler(handler: bytes | None, known: str) -> str:
    """A track's handler type as text ("vide"); `known` where the track is not one of the `moov`'s."""
    return handler.decode("latin-1") if handler is not None else known


class _Walk:
    """One walk over a file's boxes, counting the headers it reads against `MAX_BOXES`."""

    def __init__(self, handle: BinaryIO, end: int) -> None:
        self.handle, self.end, self.boxes, self.tracks = handle, end, 0, 0
        self.found: list[SampleClaim] = []
        #: each track's handler type (b"vide", b"soun", ...), and its `stts` durations where it has one entry
        self.handlers: dict[int, bytes] = {}
        self.durations: dict[int, tuple[int, ...]] = {}
        #: each track's place by its `tkhd` ID, which a fragment's `tfhd` names; the samples of each
        #: track's fragments so far (0: a fragment of no known track), and the track of the fragment read
        self.track_places: dict[int, int] = {}
        self.fragment_samples: dict[int, int] = {}
        self.fragment_track = 0

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
                if kind == b"traf":
                    self.fragment_track = 0  # (until its tfhd names one)
                self.visit(body, box_end, track, kind, depth + 1)
            elif kind == b"tkhd" and parent == b"trak":  # (its ID after the version, flags and two times)
                self.handle.seek(body)
                version = self.handle.read(1)
                self.track_places.setdefault(self._uint32(body + (20 if version == b"\x01" else 12)), track)
            elif kind == b"tfhd" and parent == b"traf":
                self.fragment_track = self.track_places.get(self._uint32(body + 4), 0)
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
                samples = self._uint32(body + 4)
                handler = _handler(self.handlers.get(self.fragment_track), "")
                self.found.append(SampleClaim(0, "trun", samples, handler))
                totals = self.fragment_samples
                totals[self.fragment_track] = totals.get(self.fragment_track, 0) + samples

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
