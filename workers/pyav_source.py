"""PyAV's frame source: seeks to the keyframe before each wanted frame and decodes forward.

It reads every format decord does not (see `workers.decode.open_video`), and where a decord
read fails. At open it reads the packet headers; a read leaves out, where that is safe, the
frames no other frame refers to (FFmpeg's `skip_frame`), so that every frame it returns is the
one a decode in order gives. Frames of a corrupt stretch of the file, from a packet the decoder
rejects to the next keyframe, are damaged: a read leaves them out (`_frames_from`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from workers.decode import (DEFAULT_MAX_FRAME_PIXELS, METADATA_ERRORS, EmptyVideoStream, VideoDecodeError, frame_rate,
                            probe, upright, video_stream)
from workers.exhaustion import memory_limit_note
from workers.frame_sources import FrameSource, decode_threads
from workers.hdr import to_sdr
from workers.task import VideoMeta

log = logging.getLogger(__name__)

#: containers where a packet's timestamp may belong to another frame (AVI's packed B-frames).
_PACKET_TIMESTAMPS_UNRELIABLE = frozenset({"avi"})
#: codecs whose "non-reference" frames (those FFmpeg's skip_frame NONREF leaves out) no frame
#: refers to. HEVC's are non-reference within their temporal sub-layer only (see `_skippable`).
_NONREF_UNREFERENCED_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4"})


def _skippable(stream) -> bool:
    """Whether leaving out the stream's non-reference frames leaves every other frame exact.

    In H.264 and MPEG-1/2/4 no frame refers to them. In HEVC a picture of a higher temporal
    sub-layer may refer to a sub-layer non-reference picture, which FFmpeg would leave out:
    only a stream whose configuration record (hvcC, in MP4 and Matroska) says it has one
    temporal sub-layer qualifies.
    """
    context = stream.codec_context
    if context.name in _NONREF_UNREFERENCED_CODECS:
        return True
    if context.name == "hevc":
        record = context.extradata or b""
        return len(record) > 21 and record[0] == 1 and (record[21] >> 3) & 7 == 1  # numTemporalLayers
    return False


def _shown(packets: list[tuple[int | None, bool, bool]]) -> list[tuple[int | None, bool]]:
    """(timestamp, keyframe) of the packets whose frames are shown, of (timestamp, keyframe,
    cut by an edit list) in file order.

    A stream cut mid keyframe group (a recording's or a segment's start) begins with frames
    that refer to frames it lacks, and so do an open keyframe group's first B-frames, shown
    before its keyframe: FFmpeg returns none of them. The frames an MP4/MOV edit list cuts (a
    trimmed video) are decoded where needed, never shown. Only the first group is looked at:
    later timestamps may start again (a recording's discontinuity).
    """
    keys = [i for i, (_, key, _) in enumerate(packets) if key]
    first = keys[0] if keys else 0
    first_time = packets[first][0] if keys else None
    group_end = keys[1] if len(keys) > 1 else len(packets)

    def leading(i: int, time: int | None) -> bool:
        return i < group_end and None not in (time, first_time) and time < first_time

    return [(time, key) for i, (time, key, cut) in enumerate(packets)
            if i >= first and not cut and not leading(i, time)]


#: threads FFmpeg converts and scales a frame with. PyAV 17 and later scale on a pool of a thread a
#: core by default (FFmpeg's slice threads): with av 18.1.1 a decode child hung freeing such a pool
#: as it converted a frame (`pthread_cond_destroy` in `avpriv_slicethread_free`), or crashed in it,
#: and its video timed out (seen in CI, 2026-12-07). One thread makes no pool; the decode workers are
#: a process a core already. (PyAV before 17 scaled on one thread, and takes no such option.)
SCALER_OPTIONS = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


class _TimestampsUnreliable(Exception):
    """Decoded frames came out of presentation-timestamp order; count frames instead."""


class PyAVSource(FrameSource):
    """Frames through PyAV: seeks to the keyframe before each wanted frame and decodes forward.

    At open it reads the packet headers (no decoding) to learn each frame's timestamp and
    where the keyframes are; frame i is the frame with the i-th smallest timestamp among those
    shown: from the first keyframe on, less any an edit list cuts. Where timestamps are missing
    or out of order (some AVI files), frames are counted from the start.
    """

    decoder = "pyav"

    def __init__(self, path: str | Path, meta: VideoMeta | None = None,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        super().__init__(path, meta or probe(path), max_frame_pixels)
        self._container = None
        stream = self._open()
        packets = _shown([(p.pts, p.is_keyframe, p.is_discard) for p in self._container.demux(stream) if p.size])
        timestamps = [pts for pts, _ in packets]
        self._by_timestamps = None not in timestamps and len(set(timestamps)) == len(timestamps)
        self._timestamps = sorted(timestamps) if self._by_timestamps else []
        self._index_of = {pts: i for i, pts in enumerate(self._timestamps)}
        self._seeks = True  # until a seek misses its keyframe
        self._damage = 0  # packets rejected and frames left out as damaged, so far (`_frames_from`)
        # packets out of presentation order carry B-frames, each with its frame's timestamp:
        # reads can then leave out the frames nothing refers to (`_frames_from`). In order, there
        # are none to leave out. AVI's packed B-frames give a packet's timestamp to another frame.
        self._skips = (self._by_timestamps and timestamps != self._timestamps
                       and self.meta.container not in _PACKET_TIMESTAMPS_UNRELIABLE and _skippable(stream))
        keyframes = {self._index_of[pts] for pts, key in packets if key} if self._by_timestamps else set()
        self._keyframes = sorted(keyframes | {0})
        self.frame_count = len(packets)
        rate = frame_rate(stream)
        self.fps = float(rate) if rate else self.meta.fps
        # as a fraction: ticks x numerator / denominator gives 1.88 where x float(1/12800) gave 1.8800000000000001
        self._time_base = stream.time_base.as_integer_ratio() if stream.time_base else None
        if self.frame_count < 1 and self.meta.frames_stated:  # (an MP4 cut just after its index)
            raise EmptyVideoStream(f"{self.path}: the file holds none of the {self.meta.frame_count} frames its "
                                   "index states (a truncated upload or copy?)")
        if self.frame_count < 1:
            raise EmptyVideoStream(f"{self.path}: the video stream holds no frames (a recording whose video "
                                   "failed, or an audio file with an empty video track?)")

    def _open(self):
        """(Re)open the file at its start; returns the video stream."""
        self.close()
        self._container = av.open(self.path, metadata_errors=METADATA_ERRORS)
        stream = video_stream(self._container)
        if stream is None:
            raise VideoDecodeError(f"{self.path}: no video stream", bad_file=True)
        stream.thread_type = "AUTO"
        if decode_threads():
            stream.thread_count = decode_threads()
        return stream

    def keyframe_indices(self) -> np.ndarray | None:
        """The keyframes found in the packet headers; unknown when frames are counted instead."""
        return np.asarray(self._keyframes, dtype=np.int64) if self._by_timestamps else None

    def _times(self, indices: np.ndarray) -> np.ndarray:
        if not self._by_timestamps or not self._time_base:
            return indices / self.fps  # no reliable timestamps (some AVI files): count frames
        timestamps = np.asarray(self._timestamps, dtype=np.int64)
        numerator, denominator = self._time_base
        return (timestamps[indices] - timestamps[0]) * numerator / denominator

    def _read(self, wanted: list[int], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        if self._by_timestamps:
            try:
                return self._read_by_timestamps(wanted, size)
            except _TimestampsUnreliable:
                log.info("%s: frame timestamps out of order; counting frames instead", self.path)
                self._by_timestamps = False
        return self._read_counting(wanted, size)

    def _read_by_timestamps(self, wanted: list[int], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        if self._skips:
            frames, decoded = self._decode_forward(wanted, size)
            if len(decoded) == len(wanted):
                return frames, decoded
            # the decoder left out a frame asked for: from now on, decode every frame
            log.info("%s: frames %s were not decoded; reading again without skipping frames",
                     self.path, sorted(set(wanted) - set(decoded))[:10])
            self._skips = False
        return self._decode_forward(wanted, size)

    def _decode_forward(self, wanted: list[int], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        found: dict[int, np.ndarray] = {}
        frames: Iterator[av.VideoFrame] | None = None
        start, position = 0, -1  # the keyframe `frames` started from, the last frame it decoded
        ended = None  # a keyframe from which decoding ran out before a wanted frame
        wanted_set = set(wanted)
        keep = {self._timestamps[i] for i in wanted} if self._skips else None
        for target in wanted:
            if target in found:
                continue  # decoded on the way to an earlier wanted frame, which is damaged
            keyframe = self._keyframes[bisect.bisect_right(self._keyframes, target) - 1] if self._seeks else 0
            if keyframe == ended:
                continue  # decoding from it runs out before this frame too (a truncated file)
            # seek only when a keyframe lies between here and the target; else decode on
            seeked = frames is None or keyframe > position
            if seeked:
                frames, start, position = self._frames_from(keyframe, keep), keyframe, -1
            position, frame, first = self._advance(frames, target, position)
            # (a seek that decoded frames before the target, then passed it, found it damaged)
            if position != target and seeked and keyframe > 0 and (first is None or first > target):
                # the seek landed past the keyframe it aimed at, or past the end (MPEG-TS seeks
                # to a byte offset it guesses): decode from the start, now and from now on
                self._seeks = False
                frames, start = self._frames_from(0, keep), 0
                position, frame, _ = self._advance(frames, target, -1)
            if frame is None:
                ended, frames = start, None
            elif position in wanted_set:  # the target; or, the target damaged, a later one
                found[position] = self._rgb(frame, size)
        return self._complete(wanted, found, size)

    def _advance(self, frames: Iterator, target: int, position: int):
        """Decode forward to `target` or the first frame after it (where the target is damaged):
        (new position, the frame there or None where decoding ran out, the index of the first
        frame decoded or None)."""
        first = None
        for frame in frames:
            index = self._index_of.get(frame.pts)
            if index is None or index <= position:
                raise _TimestampsUnreliable
            position, first = index, index if first is None else first
            if index >= target:
                return position, frame, first
        return position, None, first

    def _read_counting(self, wanted: list[int], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        wanted_set, found = set(wanted), {}
        for index, frame in self._counted():
            if index in wanted_set:
                found[index] = self._rgb(frame, size)
            if index >= wanted[-1]:
                break
        return self._complete(wanted, found, size)

    def _counted(self) -> Iterator[tuple[int, av.VideoFrame]]:
        """(index, frame) of each frame decoded from the start, counted. After frames were lost
        (`_frames_from`), counting no longer tells which frame a later one is: it goes on from the
        next keyframe placed by its timestamp, where that is one of the keyframes' after the frames
        counted (a keyframe decodes alone: its own), and the frames before it are passed over.
        (It stopped at the first frame lost: an AVI lost every frame after its first damage.)"""
        keyframes = set(self._keyframes)  # (with no timestamps at open, the first alone)
        index, damage, lost = -1, self._damage, False
        for frame in self._frames_from(0):
            if self._damage != damage:
                damage, lost = self._damage, True
            if lost:
                if self._keyframes[-1] <= index:
                    return  # no keyframe left to go on from
                resumed = self._index_of.get(frame.pts)
                if not frame.key_frame or resumed not in keyframes or resumed <= index:
                    continue
                index, lost = resumed, False
            else:
                index += 1
            yield index, frame

    def _frames_from(self, keyframe: int, keep: set[int] | None = None) -> Iterator[av.VideoFrame]:
        """Decoded frames from a keyframe on, skipping packets the decoder rejects.

        With `keep` (timestamps), frames that no other frame is decoded from are not decoded
        unless kept (FFmpeg's `skip_frame` NONREF, set packet by packet; only where `_skippable`):
        every frame that is decoded is exact, and in a typical H.264 or HEVC stream with
        B-frames, a third to a half of the frames are left out.

        After a packet the decoder rejects (a corrupt stretch of the file), the frames it
        returns until a keyframe are decoded from references it lacks: FFmpeg returns them
        damaged (in a test clip, 45 levels off on average) and some out of order, without saying
        so. They are left out, as decord refuses them, and so is any frame FFmpeg marks corrupt.
        (With the decoder's threads, a rejection is reported packets after the one at fault, but
        before any frame decoded from it is returned; a whole frame that B-frame reordering holds
        back past the rejection is left out with them.)

        A frame of more than `max_frame_pixels` pixels (a stream that grows past the size it starts
        with, which `probe` checked) ends the read with VideoDecodeError: decoding on at that size
        would cost that much memory a frame.
        """
        if keyframe == 0 or self._container is None:
            stream = self._open()  # reopening is cheaper and surer than seeking to the start
        else:
            stream = video_stream(self._container)
            self._container.seek(self._timestamps[keyframe], stream=stream, backward=True)
        context = stream.codec_context
        context.skip_frame = "DEFAULT"
        damaged = False  # from a rejected packet until a keyframe is returned
        for packet in self._container.demux(stream):
            if keep is not None:
                context.skip_frame = "DEFAULT" if packet.pts in keep else "NONREF"
            try:
                decoded = packet.decode()
            except av.FFmpegError as exc:
                if isinstance(exc, (OSError, MemoryError)):
                    # the machine's (no memory, no thread: avcodec_open2's EAGAIN), not the packet's:
                    # every frame skipped made it "no frame could be decoded", a bad file's row
                    raise VideoDecodeError(f"{self.path}: the decoder failed, not on the file's data ({exc})") from exc
                log.debug("%s: skipping a packet the decoder rejects: %s", self.path, exc)
                damaged, self._damage = True, self._damage + 1
                continue
            for frame in decoded:
                damaged = damaged and not frame.key_frame  # it decodes alone, the frames after it from it
                if damaged or frame.is_corrupt:
                    self._damage += 1
                    continue
                if frame.width * frame.height > self.max_frame_pixels:
                    raise self._too_large(frame)
                yield frame

    def _too_large(self, frame: av.VideoFrame) -> VideoDecodeError:
        """The refusal of a frame larger than `max_frame_pixels`, in the words of `probe`'s."""
        return VideoDecodeError(
            f"{self.path}: a {frame.width}x{frame.height} frame ({frame.width * frame.height:,} pixels), after "
            f"frames of {self.meta.width}x{self.meta.height}, exceeds the limit of {self.max_frame_pixels:,} pixels "
            "a frame (sampling.max_frame_pixels): the stream grows midway; its reading stopped there. Raise the "
            "setting where such frames are expected and the decode workers have the memory, or re-encode the "
            "video smaller"
        )

    def _rgb(self, frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
        """The frame upright at `size` (width, height, upright): FFmpeg scales it as it converts it."""
        # scaled in the coded orientation; a stream whose size changes midway (a browser's or a
        # video call's recording) is scaled to the size it starts with, as decord does
        coded = size[::-1] if self.meta.rotation in (90, 270) else size
        if (frame.width, frame.height) == coded:
            scale = {}
        elif coded == (self.meta.width, self.meta.height):
            scale = {"width": coded[0], "height": coded[1]}
        else:  # smaller than the video (`get_frames`' max_side)
            scale = {"width": coded[0], "height": coded[1], "interpolation": "AREA"}
        return upright(self._as_sdr(frame, **scale), self.meta.rotation)

    def _as_sdr(self, frame: av.VideoFrame, **scale: int | str) -> np.ndarray:
        """The frame as 8-bit RGB, an HDR one tone mapped as an SDR screen shows it (`workers.hdr`)."""
        if not self.meta.transfer:
            return frame.to_ndarray(format="rgb24", **SCALER_OPTIONS, **scale)
        return to_sdr(frame.to_ndarray(format="rgb48le", **SCALER_OPTIONS, **scale), self.meta.transfer)

    def _complete(self, wanted: list[int], found: dict[int, np.ndarray],
                  size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        """(the frames found, their indices), in the order of `wanted`."""
        decoded = [i for i in wanted if i in found]
        if not decoded:
            return np.empty((0, size[1], size[0], 3), dtype=np.uint8), decoded
        return np.stack([found[i] for i in decoded]), decoded

    def all_frames_small(self, width: int = 48, height: int = 27, max_frames: int = 0) -> np.ndarray | None:
        """Every frame, scaled by FFmpeg as it is decoded; ends at the last decodable frame. None,
        nothing decoded, where the packet headers count more than `max_frames` (0: no bound).

        Frames are placed by timestamp (where reliable), so a frame the decoder rejects or that
        is damaged (`_frames_from`) in the middle repeats the one before it and indices stay
        those of `get_frames`. Counting frames instead (`_counted`), the same, where counting
        goes on from the keyframe after them; where it cannot, every frame from the first such
        one on repeats the last frame before it.
        """
        if self._past(max_frames):
            return None
        if self._by_timestamps:
            try:
                return self._small(width, height)
            except _TimestampsUnreliable:
                self._by_timestamps = False
        return self._small(width, height)

    def _small(self, width: int, height: int) -> np.ndarray:
        # scale in the coded orientation, so that turning upright gives height x width
        size = (height, width) if self.meta.rotation in (90, 270) else (width, height)
        out = np.zeros((self.frame_count, height, width, 3), dtype=np.uint8)
        last, damage = -1, self._damage
        placed = (((self._index_of.get(frame.pts), frame) for frame in self._frames_from(0)) if self._by_timestamps
                  else self._counted())
        for index, frame in placed:
            if index is None or index <= last:
                raise _TimestampsUnreliable
            if index >= self.frame_count:
                break
            out[index] = upright(self._as_sdr(frame, width=size[0], height=size[1]), self.meta.rotation)
            out[last + 1 : index] = out[last] if last >= 0 else out[index]
            last = index
        if last < 0:
            note = memory_limit_note()
            raise VideoDecodeError(f"{self.path}: no frame could be decoded{note}", bad_file=not note)
        if not self._by_timestamps and self._damage != damage:
            # frames were lost, and no keyframe after them placed the rest (`_counted`): those hold
            # the last whole one, as a lost stretch does where timestamps place frames, and the
            # video keeps its length (its sampled frames there are left out, with a warning);
            # ending here read as the video's end
            out[last + 1:] = out[last]
            last = self.frame_count - 1
        return out[: last + 1]

    def close(self) -> None:
        """Close the container."""
        if self._container is not None:
            self._container.close()
            self._container = None
