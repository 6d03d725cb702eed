"""Frame sources: an open video that returns upright RGB frames by display index.

Two decoders sit behind one `FrameSource` interface: `DecordSource` here (fast random access,
falls back to PyAV when a read fails) and `workers.pyav_source.PyAVSource` (seeks to the
keyframe before each wanted frame and decodes forward). `workers.decode.open_video` picks
one. The bound on pixels per request is checked here before anything is decoded; the bound
on frames per video is the decode stage's (`workers.sampling.read_video`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from workers.decode import (DEFAULT_MAX_FRAME_PIXELS, DEFAULT_MAX_PIXELS, VideoDecodeError, decoder_reason, probe,
                            upright)
from workers.exhaustion import memory_limit_note
from workers.task import VideoMeta

if TYPE_CHECKING:
    from workers.pyav_source import PyAVSource

log = logging.getLogger(__name__)

#: frames decoded per decord call when reading a whole video at thumbnail size.
_SMALL_CHUNK = 256

#: threads each decoder runs: 0 lets FFmpeg choose, one per core. Processes that decode side by
#: side set their share with `set_decode_threads`: N decoders left at 0 run N threads a core.
_DECODE_THREADS = [0]


def set_decode_threads(count: int) -> None:
    """Let each decoder this process opens from now on run `count` threads (0: one per core)."""
    _DECODE_THREADS[0] = max(0, int(count))


def decode_threads() -> int:
    """The threads each decoder this process opens runs (0: FFmpeg's choice, one per core)."""
    return _DECODE_THREADS[0]


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


def fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so the longer side is at most `max_side`
    (as it is when it fits, or `max_side` is 0)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resized(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames [N,H,W,3] scaled to `size` (width, height) with an area filter; as they are when that size."""
    if frames.shape[1:3] == (size[1], size[0]):
        return frames
    return np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])


class RequestTooLarge(VideoDecodeError):
    """A read asking for more decoded pixels than its limit (`sampling.max_pixels_per_video`), refused
    before any frame is decoded."""


class FrameSource:
    """An open video that returns frames by display index; close it (or use `with`) when done."""

    #: "decord" or "pyav": the decoder that read the frames.
    decoder: str = ""
    #: frames in the video as the decoder that reads them counts them (PyAV's, once a `DecordSource`
    #: has fallen back to it); valid indices are 0..frame_count-1.
    frame_count: int = 0
    fps: float = 0.0

    def __init__(self, path: str | Path, meta: VideoMeta, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        self.path = str(path)
        self.meta = meta
        #: `sampling.max_frame_pixels`, which `probe` holds the stream's first size to: a decoder that
        #: sees each frame's size (PyAV's) holds every frame to it, as a stream may grow midway
        self.max_frame_pixels = max_frame_pixels

    def get_frames(self, indices: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_side: int = 0) -> np.ndarray:
        """Upright RGB frames uint8 [N,H,W,3], in the order of `indices` (duplicates allowed).

        With `max_side`, frames whose longer side exceeds it are scaled down to it (aspect kept,
        area filter) as the decoder's pixels are converted to RGB, never held at full size.
        Raises VideoDecodeError when N x H x W exceeds `max_pixels` (a guard against
        decompression bombs) or when a requested frame cannot be decoded (`get_decodable_frames`
        leaves such frames out instead).
        """
        wanted, frames, decoded = self._decode(indices, max_pixels, max_side)
        if len(decoded) < len(wanted):
            raise self._undecodable(wanted, decoded)
        if len(indices) == len(wanted) and all(int(i) == w for i, w in zip(indices, wanted)):
            return frames  # asked in order, each once: no copy
        return frames[np.searchsorted(wanted, np.asarray(indices, dtype=np.int64))]

    def get_decodable_frames(self, indices: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                             max_side: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(frames, their display indices int64 [M]): the frames of `indices` (sorted, each once)
        that can be decoded, as `get_frames` gives them.

        A frame that cannot be decoded (in a corrupt stretch of the file, or past where a
        truncated file ends) is left out rather than failing the others. Raises VideoDecodeError
        as `get_frames` does when none of them can be decoded, or the request is too large.
        """
        wanted, frames, decoded = self._decode(indices, max_pixels, max_side)
        if wanted and not decoded:
            raise self._undecodable(wanted, decoded)
        return frames, np.asarray(decoded, dtype=np.int64)

    def _decode(self, indices: Sequence[int], max_pixels: int, max_side: int):
        """(the sorted, unique indices asked for, the frames of those decoded, their indices)."""
        height, width = self._upright_size()
        size = fitted_size(width, height, max_side)
        wanted = self._check_request(indices, max_pixels, size)
        if not wanted:
            return wanted, np.empty((0, size[1], size[0], 3), dtype=np.uint8), []
        frames, decoded = self._read(wanted, size)
        return wanted, frames, decoded

    def _undecodable(self, wanted: list[int], decoded: list[int]) -> VideoDecodeError:
        missing = sorted(set(wanted) - set(decoded))
        note = memory_limit_note()
        return VideoDecodeError(
            f"{self.path}: frames {missing[:10]} of {self.frame_count} could not be decoded "
            f"(truncated or corrupt file?){note}", bad_file=not note
        )

    def all_frames_small(self, width: int = 48, height: int = 27, max_frames: int = 0) -> np.ndarray | None:
        """Every frame, upright and resized while decoding, uint8 [T,height,width,3] RGB; None,
        with none gathered, where the video has more than `max_frames` frames (0: no bound)."""
        raise NotImplementedError

    def _past(self, max_frames: int) -> bool:
        """Whether this decoder counts more than `max_frames` frames (0: no bound). Both count
        before decoding any: decord from the container's index, PyAV from the packet headers."""
        return 0 < max_frames < self.frame_count

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

    def _read(self, wanted: list[int], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        """Decode sorted, unique indices: (upright RGB frames at `size` (width, height), the
        indices they are): those of `wanted` that can be decoded, in its order."""
        raise NotImplementedError

    def _upright_size(self) -> tuple[int, int]:
        height, width = self.meta.height, self.meta.width
        return (width, height) if self.meta.rotation in (90, 270) else (height, width)

    def _check_request(self, indices: Sequence[int], max_pixels: int, size: tuple[int, int]) -> list[int]:
        width, height = size
        if len(indices) * height * width > max_pixels:
            raise RequestTooLarge(
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


@functools.cache
def _quiet_decord_ffmpeg() -> None:
    """decord's FFmpeg writes its complaints about a damaged file ("[mov,mp4,...] partial file")
    straight to stderr, lines in a nightly log that the errors table says better; PyAV's is
    quiet already. With logging at DEBUG they are kept."""
    import decord

    if not log.isEnabledFor(logging.DEBUG):
        decord.logging.set_level(decord.logging.QUIET)


class DecordSource(FrameSource):
    """Frames through decord's VideoReader on the CPU; falls back to PyAV if a read fails."""

    decoder = "decord"

    def __init__(self, path: str | Path, meta: VideoMeta | None = None,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        import decord

        _quiet_decord_ffmpeg()
        super().__init__(path, meta or probe(path), max_frame_pixels)
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
        self._keyframes = np.asarray(self._reader.get_key_indices(), dtype=np.int64)
        if len(self._keyframes) and self._keyframes[0] != 0:
            raise VideoDecodeError(f"{self.path}: the video starts before its first keyframe")
        # an MP4/MOV edit list that ends before the last frame (a trimmed video) is shown to that
        # end only; decord reads every frame the file holds, and more than that from a trimmed
        # start (whose frames before the cut have negative times, refused above)
        if self.meta.duration_s and stamps[-1, 1] - stamps[0, 0] > self.meta.duration_s + 2 / self.fps:
            raise VideoDecodeError(f"{self.path}: decord reads past the video's end (an edit list trims it)")
        starts = stamps[:, 0].astype(np.float64)
        starts -= starts[0]
        # decord gives float32 seconds (frame 32 at 30 fps: 1.0666667223): a frame that is where
        # the stream's rate puts it, to that precision, is shown at exactly i / fps; one elsewhere
        # (a variable rate) to the microsecond, not with float32's noise (2.2666666507720947)
        even = np.arange(len(starts)) / self.fps
        starts = np.where(np.abs(starts - even) <= 1e-6 * np.maximum(starts, 1.0), even, np.round(starts, 6))
        # no times in decord's index (zeros, or FFmpeg's no-timestamp value: an H.264 Matroska file
        # of 7 frames or fewer): counting frames made up the times of a variable-rate video, and its
        # duration (6 frames over 20 s read as 0.2 s). PyAV reads the packets' own times
        if not (np.diff(starts) > 0).all():
            raise VideoDecodeError(f"{self.path}: decord's frame index has no times")
        self._starts = starts  # when each frame is shown, from the first
        self._fallback: PyAVSource | None = None
        self._scaled = None  # (size, a reader that scales frames to it as it converts them)

    def keyframe_indices(self) -> np.ndarray | None:
        """decord's keyframe index (from the container's index: nothing is decoded); PyAV's, by
        its own frame indices, once PyAV reads the video."""
        return self._keyframes if self._fallback is None else self._fallback.keyframe_indices()

    def _read(self, wanted: list[int], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
        # decord reads every frame asked for or raises (as on a corrupt stretch of the file):
        # PyAV then reads them, and leaves out those that cannot be decoded
        def read() -> tuple[np.ndarray, list[int]]:
            if size != self._upright_size()[::-1]:
                return self._read_scaled(wanted, size), wanted
            return self._read_full(wanted), wanted

        def read_pyav(source: "PyAVSource") -> tuple[np.ndarray, list[int]]:
            # (frames past PyAV's count, where it counts fewer than decord, are frames it cannot read)
            within = [index for index in wanted if index < source.frame_count]
            return source._read(within, size) if within else (np.empty((0, size[1], size[0], 3), np.uint8), [])

        return self._with_fallback(read, read_pyav)

    def _read_full(self, wanted: list[int]) -> np.ndarray:
        batch = self._reader.get_batch(wanted).asnumpy()
        # decord applies the container's rotation itself; turn only what it left coded.
        if batch.shape[1:3] == (self.meta.height, self.meta.width) != self._upright_size():
            batch = upright(batch, self.meta.rotation)
        return batch

    def _read_scaled(self, wanted: list[int], size: tuple[int, int]) -> np.ndarray:
        """Frames scaled by decord as it converts them (a reader opened at `size`, upright);
        where it cannot, read at full size one at a time and scaled here."""
        import decord

        if self._scaled is None or self._scaled[0] != size:
            self._scaled = (size, decord.VideoReader(self.path, ctx=decord.cpu(0), width=size[0], height=size[1],
                                                     num_threads=_DECODE_THREADS[0]))
        try:
            batch = self._scaled[1].get_batch(wanted).asnumpy()
            if batch.shape[1:] == (size[1], size[0], 3):
                return batch
        except decord.DECORDError as exc:
            log.debug("%s: decord cannot scale to %s (%s); scaling each frame", self.path, size, exc)
        return np.concatenate([resized(self._read_full([index]), size) for index in wanted])

    def _times(self, indices: np.ndarray) -> np.ndarray:
        return self._with_fallback(lambda: self._starts[indices], lambda source: source._times(indices))

    def all_frames_small(self, width: int = 48, height: int = 27, max_frames: int = 0) -> np.ndarray | None:
        """Every frame, resized by decord's scaler (at 2x then averaged where decord balks); None
        past `max_frames`. Where decord fails midway, what it gathered is dropped and PyAV reads
        the video, held to the bound by its own count, which is then the source's (`frame_count`)."""
        if self._past(max_frames):
            return None
        return self._with_fallback(
            lambda: self._small(width, height), lambda source: source.all_frames_small(width, height, max_frames)
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
            reader = None  # (its decoder let go before the next opens)
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
                # info, not a warning: PyAV reads it, `videos.decoder` says so, and where frames
                # are lost the sample stage warns of those
                log.info("decord could not read %s (%s); reading it with PyAV", self.path, decoder_reason(exc))
                from workers.pyav_source import PyAVSource  # it builds on this module

                self._fallback = PyAVSource(self.path, self.meta, self.max_frame_pixels)
                self.decoder = "pyav"
                # PyAV reads every frame from here on, by its own indices: its count is the video's.
                # decord's index may hold fewer (its FFmpeg 4.1 loses a packet past a damaged FLV
                # tag that PyAV's FFmpeg finds), and an index past it failed in `frame_times`; its
                # rate, which ends the last frame (`workers.video_facts`), is PyAV's too
                self.frame_count, self.fps = self._fallback.frame_count, self._fallback.fps
        return read_pyav(self._fallback)

    def close(self) -> None:
        """Drop the decord reader (it closes its file) and any PyAV fallback."""
        self._reader = self._scaled = None
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
