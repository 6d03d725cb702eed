"""Reading videos: a local copy of any URI, container facts, and frames by index.

Frame indices are 0-based and in display order; frame i is shown at `i / fps` seconds
(the pipeline's timestamps are defined that way, also for variable-rate videos). Frames come
back as uint8 RGB, turned upright when the container carries a rotation.

Two decoders sit behind one `FrameSource` interface: decord (fast random access) first, and
PyAV when decord cannot open a file or fails while reading it. A file that no decoder can
read raises `VideoDecodeError`, whose message names the file and what is wrong with it.
"""

from __future__ import annotations

import bisect
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import av
import numpy as np

from schemas.config import SamplingConfig
from workers.task import VideoMeta

log = logging.getLogger(__name__)

#: the default bound on decoded pixels per request, as in the run configuration.
DEFAULT_MAX_PIXELS = SamplingConfig().max_pixels_per_video
#: frames decoded per decord call when reading a whole video at thumbnail size.
_SMALL_CHUNK = 256
#: containers where decord's random access now and then returns a wrong frame (dmlc/decord#195).
_DECORD_UNRELIABLE_CONTAINERS = frozenset({"avi"})


class VideoDecodeError(ValueError):
    """A file is not a readable video; the message names the file and the reason."""


@contextmanager
def local_copy(uri: str, storage_options: dict | None = None) -> Iterator[str]:
    """Yield a local path for `uri`: local paths as they are, remote ones downloaded to a temp file.

    Remote URIs (s3://, gs://, memory://, ...) go through fsspec, which takes credentials
    from its usual config and environment unless `storage_options` are given. The temp
    file keeps the URI's extension (some demuxers guess the format from it) and is deleted
    when the context exits.
    """
    if "://" not in uri or uri.startswith("file://"):
        from fsspec.implementations.local import LocalFileSystem

        yield LocalFileSystem._strip_protocol(uri) if uri.startswith("file://") else uri
        return
    import fsspec

    fs, remote_path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fd, local_path = tempfile.mkstemp(suffix=PurePosixPath(remote_path).suffix, prefix="vidlens-")
    os.close(fd)
    try:
        fs.get_file(remote_path, local_path)
        yield local_path
    finally:
        Path(local_path).unlink(missing_ok=True)


def probe(path: str | Path) -> VideoMeta:
    """Container and stream facts read from the headers (and the first frame, for rotation).

    `frame_count` is the header's count (or duration x fps); a `FrameSource` knows the exact
    one. `rotation` is in clockwise degrees (0, 90, 180, 270) that turn the coded frame
    upright, as the legacy `rotate` tag had it. `decoder` is left empty for the reader to fill.
    """
    try:
        container = av.open(str(path))
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise VideoDecodeError(f"{path}: no such video file ({exc.strerror})") from None
    except (av.FFmpegError, OSError) as exc:
        raise VideoDecodeError(f"{path}: not a media file or unsupported container ({exc})") from None
    with container:
        stream = _video_stream(container)
        if stream is None:
            raise VideoDecodeError(f"{path}: no video stream")
        context = stream.codec_context
        if not context.width or not context.height:
            raise VideoDecodeError(f"{path}: the video stream has no frame size")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        duration_s = _duration_s(container, stream)
        fps = float(rate) if rate else (stream.frames / duration_s if stream.frames and duration_s else 0.0)
        if fps <= 0:
            raise VideoDecodeError(f"{path}: the video stream has no frame rate")
        frame_count = stream.frames or int(round(duration_s * fps))
        tag = stream.metadata.get("rotate")
        return VideoMeta(
            duration_s=duration_s or frame_count / fps,
            fps=fps,
            frame_count=frame_count,
            width=context.width,
            height=context.height,
            codec=context.name,
            rotation=clockwise_rotation(_first_frame_rotation(container, stream), tag),
            has_audio=bool(container.streams.audio),
            container=_container_name(container.format.name, str(path)),
            decoder="",
        )


def clockwise_rotation(display_ccw: float | None, rotate_tag: str | None = None) -> int:
    """Clockwise degrees (0/90/180/270) that turn a coded frame upright.

    `display_ccw` is FFmpeg's display-matrix angle (counter-clockwise, as PyAV's
    `VideoFrame.rotation` gives it); `rotate_tag` is the legacy `rotate` metadata (already
    clockwise), used only when no display matrix was found.
    """
    if display_ccw is not None and display_ccw != 0:
        degrees = -float(display_ccw)
    else:
        try:
            degrees = float(rotate_tag) if rotate_tag else 0.0
        except ValueError:
            degrees = 0.0
    return int(round(degrees / 90.0)) % 4 * 90


def upright(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Turn frames ([H,W,3] or [N,H,W,3]) clockwise by `rotation` degrees (see `probe`)."""
    if rotation % 360 == 0:
        return frames
    axes = (0, 1) if frames.ndim == 3 else (1, 2)
    # np.rot90 turns counter-clockwise for positive k.
    return np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=axes))


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
        by_index = self._read(wanted)
        return np.stack([by_index[int(i)] for i in indices])

    def all_frames_small(self, width: int = 48, height: int = 27) -> np.ndarray:
        """Every frame, upright and resized while decoding, uint8 [T,height,width,3] RGB."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the decoder and its file."""

    def _read(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decode sorted, unique indices; returns index -> upright RGB frame."""
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
        self._reader = decord.VideoReader(self.path, ctx=decord.cpu(0))
        self.frame_count = len(self._reader)
        self.fps = float(self._reader.get_avg_fps()) or meta.fps
        if self.frame_count < 1:
            raise VideoDecodeError(f"{self.path}: decord finds no frames")
        self._fallback: PyAVSource | None = None

    def _read(self, wanted: list[int]) -> dict[int, np.ndarray]:
        def read() -> dict[int, np.ndarray]:
            batch = self._reader.get_batch(wanted).asnumpy()
            # decord applies the container's rotation itself; turn only what it left coded.
            if batch.shape[1:3] == (self.meta.height, self.meta.width) != self._upright_size():
                batch = upright(batch, self.meta.rotation)
            return dict(zip(wanted, batch))

        return self._with_fallback(read, lambda source: source._read(wanted))

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
                self.path, ctx=decord.cpu(0), width=width * scale, height=height * scale
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


class _TimestampsUnreliable(Exception):
    """Decoded frames came out of presentation-timestamp order; count frames instead."""


class PyAVSource(FrameSource):
    """Frames through PyAV: seeks to the keyframe before each wanted frame and decodes forward.

    At open it reads the packet headers (no decoding) to learn each frame's timestamp and
    where the keyframes are; frame i is the frame with the i-th smallest timestamp. Where
    timestamps are missing or out of order (some AVI files), frames are counted from the start.
    """

    decoder = "pyav"

    def __init__(self, path: str | Path, meta: VideoMeta | None = None) -> None:
        super().__init__(path, meta or probe(path))
        self._container = None
        stream = self._open()
        packets = [(p.pts, p.is_keyframe) for p in self._container.demux(stream) if p.size]
        timestamps = [pts for pts, _ in packets]
        self._by_timestamps = None not in timestamps and len(set(timestamps)) == len(timestamps)
        self._timestamps = sorted(timestamps) if self._by_timestamps else []
        self._index_of = {pts: i for i, pts in enumerate(self._timestamps)}
        keyframes = {self._index_of[pts] for pts, key in packets if key} if self._by_timestamps else set()
        self._keyframes = sorted(keyframes | {0})
        self.frame_count = len(packets)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else self.meta.fps
        if self.frame_count < 1:
            raise VideoDecodeError(f"{self.path}: PyAV finds no video packets")

    def _open(self):
        """(Re)open the file at its start; returns the video stream."""
        self.close()
        self._container = av.open(self.path)
        stream = _video_stream(self._container)
        if stream is None:
            raise VideoDecodeError(f"{self.path}: no video stream")
        stream.thread_type = "AUTO"
        return stream

    def _read(self, wanted: list[int]) -> dict[int, np.ndarray]:
        if self._by_timestamps:
            try:
                return self._read_by_timestamps(wanted)
            except _TimestampsUnreliable:
                log.info("%s: frame timestamps out of order; counting frames instead", self.path)
                self._by_timestamps = False
        return self._read_counting(wanted)

    def _read_by_timestamps(self, wanted: list[int]) -> dict[int, np.ndarray]:
        found: dict[int, np.ndarray] = {}
        frames: Iterator[av.VideoFrame] | None = None
        position = -1  # index of the last frame decoded from `frames`
        for target in wanted:
            keyframe = self._keyframes[bisect.bisect_right(self._keyframes, target) - 1]
            # seek only when a keyframe lies between here and the target; else decode on
            seeked = frames is None or keyframe > position
            if seeked:
                frames, position = self._frames_from(keyframe), -1
            position, frame, exhausted = self._advance(frames, target, position)
            if frame is None and seeked and keyframe > 0 and not exhausted:
                # the seek landed past the keyframe it aimed at: decode from the start instead
                frames = self._frames_from(0)
                position, frame, exhausted = self._advance(frames, target, -1)
            if frame is not None:
                found[target] = self._rgb(frame)
            if exhausted:
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

    def _read_counting(self, wanted: list[int]) -> dict[int, np.ndarray]:
        wanted_set, found = set(wanted), {}
        for index, frame in enumerate(self._frames_from(0)):
            if index in wanted_set:
                found[index] = self._rgb(frame)
            if index >= wanted[-1]:
                break
        return self._complete(wanted, found)

    def _frames_from(self, keyframe: int) -> Iterator[av.VideoFrame]:
        """Decoded frames from a keyframe on, skipping packets the decoder rejects."""
        if keyframe == 0 or self._container is None:
            stream = self._open()  # reopening is cheaper and surer than seeking to the start
        else:
            stream = _video_stream(self._container)
            self._container.seek(self._timestamps[keyframe], stream=stream, backward=True)
        for packet in self._container.demux(stream):
            try:
                decoded = packet.decode()
            except av.FFmpegError as exc:
                log.debug("%s: skipping a packet the decoder rejects: %s", self.path, exc)
                continue
            yield from decoded

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return upright(frame.to_ndarray(format="rgb24"), self.meta.rotation)

    def _complete(self, wanted: list[int], found: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        missing = [i for i in wanted if i not in found]
        if missing:
            raise VideoDecodeError(
                f"{self.path}: frames {missing[:10]} of {self.frame_count} could not be decoded "
                "(truncated or corrupt file?)"
            )
        return found

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


def open_video(path: str | Path, meta: VideoMeta | None = None, decoder: str | None = None) -> FrameSource:
    """Open a video for frame reads: decord first, PyAV when decord cannot open it.

    AVI files go straight to PyAV (decord's random access is unreliable there). Pass `meta`
    from `probe` to avoid probing twice; `decoder="pyav"` skips decord (to read with the
    decoder that an earlier stage ended up using). Raises VideoDecodeError naming the file
    and each decoder's reason when neither can open it.
    """
    meta = meta or probe(path)
    reasons = []
    if decoder != "pyav" and meta.container not in _DECORD_UNRELIABLE_CONTAINERS:
        try:
            return DecordSource(path, meta)
        except Exception as exc:  # noqa: BLE001 - decord raises its own error types; PyAV next
            reasons.append(f"decord: {_one_line(exc)}")
    try:
        return PyAVSource(path, meta)
    except Exception as exc:  # noqa: BLE001 - reported with decord's reason below
        reasons.append(f"pyav: {_one_line(exc)}")
    raise VideoDecodeError(f"{path}: cannot decode video ({'; '.join(reasons)})")


def _video_stream(container):
    """The first real video stream (cover art attached to audio files does not count)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _duration_s(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else 0.0


def _first_frame_rotation(container, stream, max_packets: int = 64) -> float | None:
    """The display-matrix angle of the first decoded frame (PyAV exposes it on frames only)."""
    try:
        for count, packet in enumerate(container.demux(stream)):
            for frame in packet.decode():
                return frame.rotation
            if count >= max_packets:
                break
    except av.FFmpegError:
        pass  # undecodable frames are the reader's business; rotation falls back to the tag
    return None


def _container_name(format_name: str, path: str) -> str:
    """One name for FFmpeg's demuxer ("mov,mp4,m4a,..." -> "mp4" for a .mp4 file)."""
    names = format_name.split(",")
    extension = Path(path).suffix.lower().lstrip(".")
    return extension if extension in names else names[0]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
