"""Frame sources: an open video that returns upright RGB frames by display index.

Two decoders sit behind one `FrameSource` interface: `DecordSource` (fast random access,
falls back to PyAV when a read fails) and `PyAVSource` (seeks to the keyframe before each
wanted frame and decodes forward). `workers.decode.open_video` picks one. The bound on
pixels per request is checked here before anything is decoded; the bound on frames per
video is the decode stage's (`workers.sampling.read_video`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import av
import numpy as np

from workers.decode import DEFAULT_MAX_PIXELS, VideoDecodeError, probe, upright, video_stream
from workers.task import VideoMeta

log = logging.getLogger(__name__)

#: frames decoded per decord call when reading a whole video at thumbnail size.
_SMALL_CHUNK = 256

#: containers where a packet's timestamp may belong to another frame (AVI's packed B-frames).
_PACKET_TIMESTAMPS_UNRELIABLE = frozenset({"avi"})
#: codecs whose "non-reference" frames (those FFmpeg's skip_frame NONREF leaves out) no frame
#: refers to. HEVC's are non-reference within their temporal sub-layer only (see `_skippable`).
_NONREF_UNREFERENCED_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4"})

#: threads each decoder runs: 0 lets FFmpeg choose, one per core. Processes that decode side by
#: side set their share with `set_decode_threads`: N decoders left at 0 run N threads a core.
_DECODE_THREADS = [0]


def set_decode_threads(count: int) -> None:
    """Let each decoder this process opens from now on run `count` threads (0: one per core)."""
    _DECODE_THREADS[0] = max(0, int(count))


def share_threads(threads: int, opencv: bool = True) -> None:
    """Bound the threads this process's decoders (decord, PyAV), torch and, with `opencv`,
    OpenCV run to `threads`: its share of the cores when several processes decode side by side.

    Leave `opencv` off in a forked process: cv2.setNumThreads there waits forever on the
    thread pool it inherited (pthread_cond_destroy) once the parent has used OpenCV's pool.
    OpenCV's functions themselves work in such a process.
    """
    import torch

    set_decode_threads(threads)
    torch.set_num_threads(threads)
    if opencv:
        import cv2

        cv2.setNumThreads(threads)


def shared_threads() -> dict[str, int]:
    """The threads this process's decoders (0: FFmpeg's choice), OpenCV and torch run now."""
    import cv2
    import torch

    return {"decoders": _DECODE_THREADS[0], "cv2": cv2.getNumThreads(), "torch": torch.get_num_threads()}


class FrameSource:
    """An open video that returns frames by display index; close it (or use `with`) when done."""

    #: "decord" or "pyav": the decoder that read the frames.
    decoder: str = ""
    #: frames in the video as this decoder counts them; valid indices are 0..frame_count-1.
    frame_count: int = 0
    fps: float = 0.0

    def __init__(self, path: str | Path, meta: VideoMeta) -> None:
        self.path = str(path)
        self.meta = meta

    def get_frames(self, indices: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Upright RGB frames uint8 [N,H,W,3], in the order of `indices` (duplicates allowed).

        Raises VideoDecodeError when N x H x W exceeds `max_pixels` (a guard against
        decompression bombs) or when a requested frame cannot be decoded.
        """
        wanted = self._check_request(indices, max_pixels)
        if not wanted:
            height, width = self._upright_size()
            return np.empty((0, height, width, 3), dtype=np.uint8)
        frames = self._read(wanted)
        if len(indices) == len(wanted) and all(int(i) == w for i, w in zip(indices, wanted)):
            return frames  # asked in order, each once (as the sample stage asks): no copy
        return frames[np.searchsorted(wanted, np.asarray(indices, dtype=np.int64))]

    def all_frames_small(self, width: int = 48, height: int = 27) -> np.ndarray:
        """Every frame, upright and resized while decoding, uint8 [T,height,width,3] RGB."""
        raise NotImplementedError

    def keyframe_indices(self) -> np.ndarray | None:
        """Display indices of the keyframes (frames that decode alone), or None when unknown."""
        return None

    def frame_times(self, indices: Sequence[int]) -> np.ndarray:
        """When each frame is shown, in seconds from the first frame (float64 [N]).

        `i / fps` in a constant-rate video; the container's presentation times in a
        variable-rate one (a screen recording, a phone video), where `i / fps` drifts.
        """
        wanted = np.asarray(indices, dtype=np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= self.frame_count):
            raise IndexError(f"{self.path}: frame index out of range 0..{self.frame_count - 1}")
        return self._times(wanted)

    def _times(self, indices: np.ndarray) -> np.ndarray:
        return indices / self.fps

    def close(self) -> None:
        """Release the decoder and its file."""

    def _read(self, wanted: list[int]) -> np.ndarray:
        """Decode sorted, unique indices: their upright RGB frames, in that order."""
        raise NotImplementedError

    def _upright_size(self) -> tuple[int, int]:
        height, width = self.meta.height, self.meta.width
        return (width, height) if self.meta.rotation in (90, 270) else (height, width)

    def _check_request(self, indices: Sequence[int], max_pixels: int) -> list[int]:
        height, width = self._upright_size()
        if len(indices) * height * width > max_pixels:
            raise VideoDecodeError(
                f"{self.path}: {len(indices)} frames of {width}x{height} exceed the limit of "
                f"{max_pixels} decoded pixels"
            )
        wanted = sorted({int(i) for i in indices})
        if wanted and (wanted[0] < 0 or wanted[-1] >= self.frame_count):
            raise IndexError(f"{self.path}: frame index out of range 0..{self.frame_count - 1}: {wanted}")
        return wanted

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DecordSource(FrameSource):
    """Frames through decord's VideoReader on the CPU; falls back to PyAV if a read fails."""

    decoder = "decord"

    def __init__(self, path: str | Path, meta: VideoMeta | None = None) -> None:
        import decord

        super().__init__(path, meta or probe(path))
        self._reader = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=_DECODE_THREADS[0])
        self.frame_count = len(self._reader)
        self.fps = float(self._reader.get_avg_fps()) or self.meta.fps
        if self.frame_count < 1:
            raise VideoDecodeError(f"{self.path}: decord finds no frames")
        # decord seeks by its frame index; where that index is broken (MPEG program streams give
        # negative, shuffled times) it returns the wrong frames without an error: let PyAV read
        stamps = self._reader.get_frame_timestamp(range(self.frame_count))
        if stamps[:, 0].min() < -1e-3 or (np.diff(stamps[:, 0]) < -1e-6).any():
            raise VideoDecodeError(f"{self.path}: decord's frame index is out of order")
        # a stream cut mid keyframe group: decord counts, and returns, frames that cannot be decoded
        keys = self._reader.get_key_indices()
        if len(keys) and keys[0] != 0:
            raise VideoDecodeError(f"{self.path}: the video starts before its first keyframe")
        # an MP4/MOV edit list that ends before the last frame (a trimmed video) is shown to that
        # end only; decord reads every frame the file holds, and more than that from a trimmed
        # start (whose frames before the cut have negative times, refused above)
        if self.meta.duration_s and stamps[-1, 1] - stamps[0, 0] > self.meta.duration_s + 2 / self.fps:
            raise VideoDecodeError(f"{self.path}: decord reads past the video's end (an edit list trims it)")
        self._fallback: PyAVSource | None = None

    def keyframe_indices(self) -> np.ndarray | None:
        """decord's keyframe index (from the container's index: nothing is decoded)."""
        return np.asarray(self._reader.get_key_indices(), dtype=np.int64)

    def _read(self, wanted: list[int]) -> np.ndarray:
        def read() -> np.ndarray:
            batch = self._reader.get_batch(wanted).asnumpy()
            # decord applies the container's rotation itself; turn only what it left coded.
            if batch.shape[1:3] == (self.meta.height, self.meta.width) != self._upright_size():
                batch = upright(batch, self.meta.rotation)
            return batch

        return self._with_fallback(read, lambda source: source._read(wanted))

    def _times(self, indices: np.ndarray) -> np.ndarray:
        def read() -> np.ndarray:
            ordered = np.unique(np.concatenate([[0], indices]))
            starts = self._reader.get_frame_timestamp(ordered.tolist())[:, 0].astype(np.float64)
            if np.any(np.diff(starts) <= 0):
                return indices / self.fps  # no usable timestamps (decord gives zeros): count frames
            return (starts - starts[0])[np.searchsorted(ordered, indices)]

        return self._with_fallback(read, lambda source: source._times(indices))

    def all_frames_small(self, width: int = 48, height: int = 27) -> np.ndarray:
        """Every frame, resized by decord's scaler (at 2x then averaged where decord balks)."""
        return self._with_fallback(
            lambda: self._small(width, height), lambda source: source.all_frames_small(width, height)
        )

    def _small(self, width: int, height: int) -> np.ndarray:
        import decord

        # decord 0.6 returns mis-strided rows for some widths (16, 24, 48, 72, ...): decode
        # at twice the size there and average 2x2 blocks, which is what an area scaler does.
        for scale in (1, 2):
            reader = decord.VideoReader(
                self.path, ctx=decord.cpu(0), width=width * scale, height=height * scale,
                num_threads=_DECODE_THREADS[0],
            )
            try:
                first = reader.get_batch([0]).asnumpy()
            except decord.DECORDError:
                first = None
            if first is not None and first.shape[1:] == (height * scale, width * scale, 3):
                break
            del reader
        else:
            raise VideoDecodeError(f"{self.path}: decord cannot scale frames to {width}x{height}")
        out = np.empty((len(reader), height, width, 3), dtype=np.uint8)
        for start in range(0, len(out), _SMALL_CHUNK):
            stop = min(len(out), start + _SMALL_CHUNK)
            batch = reader.get_batch(list(range(start, stop))).asnumpy()
            if scale > 1:
                blocks = batch.reshape(stop - start, height, scale, width, scale, 3)
                batch = (blocks.mean(axis=(2, 4)) + 0.5).astype(np.uint8)
            out[start:stop] = batch
        return out

    def _with_fallback(self, read: Callable[[], object], read_pyav: Callable[["PyAVSource"], object]):
        if self._fallback is None:
            try:
                return read()
            except Exception as exc:  # noqa: BLE001 - any decord failure is retried with PyAV
                log.warning("decord failed on %s (%s); reading with PyAV", self.path, exc)
                self._fallback = PyAVSource(self.path, self.meta)
                self.decoder = "pyav"
        return read_pyav(self._fallback)

    def close(self) -> None:
        """Drop the decord reader (it closes its file) and any PyAV fallback."""
        self._reader = None
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None


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

    def __init__(self, path: str | Path, meta: VideoMeta | None = None) -> None:
        super().__init__(path, meta or probe(path))
        self._container = None
        stream = self._open()
        packets = _shown([(p.pts, p.is_keyframe, p.is_discard) for p in self._container.demux(stream) if p.size])
        timestamps = [pts for pts, _ in packets]
        self._by_timestamps = None not in timestamps and len(set(timestamps)) == len(timestamps)
        self._timestamps = sorted(timestamps) if self._by_timestamps else []
        self._index_of = {pts: i for i, pts in enumerate(self._timestamps)}
        self._seeks = True  # until a seek misses its keyframe
        # packets out of presentation order carry B-frames, each with its frame's timestamp:
        # reads can then leave out the frames nothing refers to (`_frames_from`). In order, there
        # are none to leave out. AVI's packed B-frames give a packet's timestamp to another frame.
        self._skips = (self._by_timestamps and timestamps != self._timestamps
                       and self.meta.container not in _PACKET_TIMESTAMPS_UNRELIABLE and _skippable(stream))
        keyframes = {self._index_of[pts] for pts, key in packets if key} if self._by_timestamps else set()
        self._keyframes = sorted(keyframes | {0})
        self.frame_count = len(packets)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else self.meta.fps
        self._time_base = float(stream.time_base) if stream.time_base else 0.0
        if self.frame_count < 1:
            raise VideoDecodeError(f"{self.path}: PyAV finds no video packets")

    def _open(self):
        """(Re)open the file at its start; returns the video stream."""
        self.close()
        self._container = av.open(self.path)
        stream = video_stream(self._container)
        if stream is None:
            raise VideoDecodeError(f"{self.path}: no video stream")
        stream.thread_type = "AUTO"
        if _DECODE_THREADS[0]:
            stream.thread_count = _DECODE_THREADS[0]
        return stream

    def keyframe_indices(self) -> np.ndarray | None:
        """The keyframes found in the packet headers; unknown when frames are counted instead."""
        return np.asarray(self._keyframes, dtype=np.int64) if self._by_timestamps else None

    def _times(self, indices: np.ndarray) -> np.ndarray:
        if not self._by_timestamps or not self._time_base:
            return indices / self.fps  # no reliable timestamps (some AVI files): count frames
        timestamps = np.asarray(self._timestamps, dtype=np.int64)
        return (timestamps[indices] - timestamps[0]) * self._time_base

    def _read(self, wanted: list[int]) -> np.ndarray:
        if self._by_timestamps:
            try:
                return self._read_by_timestamps(wanted)
            except _TimestampsUnreliable:
                log.info("%s: frame timestamps out of order; counting frames instead", self.path)
                self._by_timestamps = False
        return self._read_counting(wanted)

    def _read_by_timestamps(self, wanted: list[int]) -> np.ndarray:
        if self._skips:
            try:
                return self._decode_forward(wanted)
            except VideoDecodeError as exc:
                # the decoder left out a frame asked for: from now on, decode every frame
                log.info("%s: %s; reading again without skipping frames", self.path, exc)
                self._skips = False
        return self._decode_forward(wanted)

    def _decode_forward(self, wanted: list[int]) -> np.ndarray:
        found: dict[int, np.ndarray] = {}
        frames: Iterator[av.VideoFrame] | None = None
        start, position = 0, -1  # the keyframe `frames` started from, the last frame it decoded
        ended = None  # a keyframe from which decoding ran out before a wanted frame
        keep = {self._timestamps[i] for i in wanted} if self._skips else None
        for target in wanted:
            keyframe = self._keyframes[bisect.bisect_right(self._keyframes, target) - 1] if self._seeks else 0
            if keyframe == ended:
                continue  # decoding from it runs out before this frame too (a truncated file)
            # seek only when a keyframe lies between here and the target; else decode on
            seeked = frames is None or keyframe > position
            if seeked:
                frames, start, position = self._frames_from(keyframe, keep), keyframe, -1
            position, frame, exhausted = self._advance(frames, target, position)
            if frame is None and seeked and keyframe > 0:
                # the seek landed past the keyframe it aimed at, or past the end (MPEG-TS seeks
                # to a byte offset it guesses): decode from the start, now and from now on
                self._seeks = False
                frames, start = self._frames_from(0, keep), 0
                position, frame, exhausted = self._advance(frames, target, -1)
            if frame is not None:
                found[target] = self._rgb(frame)
            if exhausted:
                ended = start if frame is None else ended
                frames = None
        return self._complete(wanted, found)

    def _advance(self, frames: Iterator, target: int, position: int):
        """Decode forward to `target`: (new position, the target frame or None, exhausted)."""
        for frame in frames:
            index = self._index_of.get(frame.pts)
            if index is None or index <= position:
                raise _TimestampsUnreliable
            position = index
            if index >= target:
                return position, (frame if index == target else None), False
        return position, None, True

    def _read_counting(self, wanted: list[int]) -> np.ndarray:
        wanted_set, found = set(wanted), {}
        for index, frame in enumerate(self._frames_from(0)):
            if index in wanted_set:
                found[index] = self._rgb(frame)
            if index >= wanted[-1]:
                break
        return self._complete(wanted, found)

    def _frames_from(self, keyframe: int, keep: set[int] | None = None) -> Iterator[av.VideoFrame]:
        """Decoded frames from a keyframe on, skipping packets the decoder rejects.

        With `keep` (timestamps), frames that no other frame is decoded from are not decoded
        unless kept (FFmpeg's `skip_frame` NONREF, set packet by packet; only where `_skippable`):
        every frame that is decoded is exact, and in a typical H.264 or HEVC stream with
        B-frames, a third to a half of the frames are left out.
        """
        if keyframe == 0 or self._container is None:
            stream = self._open()  # reopening is cheaper and surer than seeking to the start
        else:
            stream = video_stream(self._container)
            self._container.seek(self._timestamps[keyframe], stream=stream, backward=True)
        context = stream.codec_context
        context.skip_frame = "DEFAULT"
        for packet in self._container.demux(stream):
            if keep is not None:
                context.skip_frame = "DEFAULT" if packet.pts in keep else "NONREF"
            try:
                decoded = packet.decode()
            except av.FFmpegError as exc:
                log.debug("%s: skipping a packet the decoder rejects: %s", self.path, exc)
                continue
            yield from decoded

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        # a stream whose size changes midway (a browser's or a video call's recording) is scaled
        # to the size it starts with, as decord does, so that a video's frames are one size
        size = (self.meta.width, self.meta.height)
        scale = {} if (frame.width, frame.height) == size else {"width": size[0], "height": size[1]}
        return upright(frame.to_ndarray(format="rgb24", **scale), self.meta.rotation)

    def _complete(self, wanted: list[int], found: dict[int, np.ndarray]) -> np.ndarray:
        missing = [i for i in wanted if i not in found]
        if missing:
            raise VideoDecodeError(
                f"{self.path}: frames {missing[:10]} of {self.frame_count} could not be decoded "
                "(truncated or corrupt file?)"
            )
        return np.stack([found[i] for i in wanted])

    def all_frames_small(self, width: int = 48, height: int = 27) -> np.ndarray:
        """Every frame, scaled by FFmpeg as it is decoded; ends at the last decodable frame.

        Frames are placed by timestamp (where reliable), so a frame the decoder rejects in the
        middle repeats the one before it and indices stay those of `get_frames`.
        """
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
        last = -1
        for count, frame in enumerate(self._frames_from(0)):
            index = self._index_of.get(frame.pts) if self._by_timestamps else count
            if index is None or index <= last:
                raise _TimestampsUnreliable
            if index >= self.frame_count:
                break
            out[index] = upright(
                frame.to_ndarray(format="rgb24", width=size[0], height=size[1]), self.meta.rotation
            )
            out[last + 1 : index] = out[last] if last >= 0 else out[index]
            last = index
        if last < 0:
            raise VideoDecodeError(f"{self.path}: no frame could be decoded")
        return out[: last + 1]

    def close(self) -> None:
        """Close the container."""
        if self._container is not None:
            self._container.close()
            self._container = None
