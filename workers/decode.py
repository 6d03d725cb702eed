"""Reading videos: container facts, and opening a frame source on a local file.

Frame indices are 0-based and in display order. A frame source (`workers.frame_sources`)
returns frames as uint8 RGB, turned upright when the container carries a rotation, and
knows each frame's presentation time (`frame_times`), which differs from `i / fps` in
variable-rate videos.

Two decoders sit behind one `FrameSource` interface: decord (fast random access) first, and
PyAV when decord cannot open a file or fails while reading it. A file that no decoder can
read raises `VideoDecodeError`, whose message names the file and what is wrong with it
(missing, empty, unreadable, not a media file, no video stream, unsupported codec, ...).
A bucket's video is read from a local copy (`workers.remote_copy`).
"""

from __future__ import annotations

import errno
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from schemas.config import SamplingConfig
from workers.hdr import TRANSFERS
from workers.mp4_index import implausible_claim
from workers.task import VideoMeta

if TYPE_CHECKING:
    from workers.frame_sources import FrameSource

#: how a video's tags that are not UTF-8 are read (an old AVI's Latin-1 title): PyAV's default,
#: "strict", failed the whole file with UnicodeDecodeError.
METADATA_ERRORS = "replace"
#: the default bound on decoded pixels per request, as in the run configuration.
DEFAULT_MAX_PIXELS = SamplingConfig().max_pixels_per_video
#: the default bound on one frame's pixels, as in the run configuration.
DEFAULT_MAX_FRAME_PIXELS = SamplingConfig().max_frame_pixels
#: what decord reads: the codecs and containers where its random access returned the frames asked
#: for (`tests/test_formats.py` reads every format by seeking, against decoding in order). PyAV
#: reads the rest, AV1 too (decord 0.6 has no AV1 decoder). decord returned other frames, without
#: an error, for AVI now and then (dmlc/decord#195), ASF and MXF; after a seek, for H.264 with
#: B-frames in MPEG-TS (a keyframe interval off), HEVC anywhere (dmlc/decord#325) and MPEG-1/2/4
#: Part 2 with B-frames anywhere. `DecordSource` itself refuses a trimmed MP4/MOV (an edit list)
#: and a stream cut mid keyframe group.
_DECORD_CODECS = frozenset({"h264", "vp8", "vp9", "prores"})
_DECORD_CONTAINERS = frozenset({"mp4", "mov", "3gp", "3g2", "matroska", "webm", "flv"})


class VideoDecodeError(ValueError):
    """A file is not a readable video; the message names the file and the reason.

    `bad_file`: the file's own bytes are what fails (empty, cut short, not a media file, no
    video stream, a codec no decoder has), so the same file fails alike in every run: runs give
    up on it after `incremental.give_up_after` of them (`pipeline.ledger`). False where a later
    run may read it, or the cause is not known: a file gone or that cannot be read (permissions,
    I/O), a limit of the configuration, a timeout.
    """

    def __init__(self, message: str, bad_file: bool = False) -> None:
        super().__init__(message)
        self.bad_file = bad_file  # (pickled with the exception: the decode child sends it back)


class EmptyVideoStream(VideoDecodeError):
    """The video stream holds no frame (a recording whose video failed): no decoder can read one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, bad_file=True)


def check_readable(path: str | Path) -> int:
    """The size of a local video file; raises VideoDecodeError saying why it cannot be read.

    Tells apart what a nightly job meets: a file deleted after listing, a folder, an empty
    file and a file this process may not read, each of which FFmpeg reports vaguely.
    """
    try:
        size = os.stat(path).st_size
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder")
        with open(path, "rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        raise VideoDecodeError(
            f"{path}: no such video file (it no longer exists: deleted or moved after it was listed, or a "
            "manifest names a file that never existed?)"
        ) from None
    except IsADirectoryError:
        raise VideoDecodeError(f"{path}: is a folder, not a video file") from None
    except PermissionError:
        raise VideoDecodeError(
            f"{path}: cannot be read (permission denied): give the job's user read access"
        ) from None
    except OSError as exc:
        raise VideoDecodeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes), not a video; was its upload cut short?", bad_file=True)
    return size


def probe(path: str | Path, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
          max_frames: int | None = None) -> VideoMeta:
    """Container and stream facts read from the headers (and the first frame, for rotation).

    `frame_count` is the header's count (or duration x fps); a `FrameSource` knows the exact
    one. `rotation` is in clockwise degrees (0, 90, 180, 270) that turn the coded frame
    upright, as the legacy `rotate` tag had it. `decoder` is left empty for the reader to fill.

    Refuses, before FFmpeg opens it, an MP4/MOV whose index claims more samples than its bytes
    can hold, or, given `max_frames` (`sampling.max_video_frames`), more frames in a video track
    than that (`workers.mp4_index`); and, before a frame is decoded, a stream whose frames have
    more than `max_frame_pixels` pixels (`sampling.max_frame_pixels`).
    """
    size = check_readable(path)
    claim = implausible_claim(path, size, max_frames)  # (FFmpeg would reserve memory for each sample as it opens it)
    if claim is not None:  # (more frames than the setting: not the file's fault, as read_video's own refusal)
        raise VideoDecodeError(f"{path}: {claim.refusal(size, max_frames)}", bad_file=claim.samples > size)
    try:
        # FFmpeg decodes a frame or more as it opens a file, to learn the stream's format: its
        # decoder's own bound keeps it from decoding one larger than ours (the header still gives
        # the size, refused below). A 16000x16000 frame took 580 MB to open without it, 80 with.
        container = av.open(str(path), metadata_errors=METADATA_ERRORS,
                            options={"max_pixels": str(max_frame_pixels)})
    except (av.FFmpegError, OSError) as exc:
        bad_file = _bad_file(exc)
        if not bad_file:  # (memory, open files, I/O: the guesses below at the file's damage would mislead)
            raise VideoDecodeError(f"{path}: FFmpeg cannot open it ({getattr(exc, 'strerror', None) or exc})") from None
        if _is_iso_media(path):
            raise VideoDecodeError(
                f"{path}: not a media file FFmpeg can open: an MP4/MOV whose index (moov atom) is "
                "missing or damaged, as in a truncated upload or a recording never finalised", bad_file
            ) from None
        # FFmpeg's words, without its errno and the path again: "[Errno 1094995529] Invalid data ...: '/a.mp4'"
        said = getattr(exc, "strerror", None) or exc
        raise VideoDecodeError(f"{path}: not a media file or unsupported container ({said})", bad_file) from None
    with container:
        stream = video_stream(container)
        if stream is None:
            raise VideoDecodeError(f"{path}: no video stream (an audio-only file, or not a video)", bad_file=True)
        context = stream.codec_context
        if context is None or context.codec is None:
            raise VideoDecodeError(
                f"{path}: the video codec is not supported: no decoder for it in this FFmpeg "
                f"build (PyAV {av.__version__}); convert the file, e.g. to H.264", bad_file=True
            )
        if not context.width or not context.height:
            raise VideoDecodeError(f"{path}: the video stream has no frame size", bad_file=True)
        if context.width * context.height > max_frame_pixels:
            raise VideoDecodeError(
                f"{path}: one {context.width}x{context.height} frame ({context.width * context.height:,} pixels) "
                f"exceeds the limit of {max_frame_pixels:,} pixels a frame (sampling.max_frame_pixels), refused "
                "before decoding: raise the setting where such frames are expected and the decode workers have "
                "the memory, or re-encode the video smaller"
            )
        rate = frame_rate(stream)
        duration_s = _duration_s(container, stream)
        fps = float(rate) if rate else (stream.frames / duration_s if stream.frames and duration_s else 0.0)
        if fps <= 0:
            raise VideoDecodeError(f"{path}: the video stream has no frame rate", bad_file=True)
        frame_count = stream.frames or int(round(duration_s * fps))
        tag = stream.metadata.get("rotate")
        return VideoMeta(
            duration_s=duration_s or frame_count / fps,
            fps=fps,
            frame_count=frame_count,
            width=context.width,
            height=context.height,
            codec=context.codec.canonical_name,  # "av1", not the decoder's name ("libdav1d")
            rotation=clockwise_rotation(_first_frame_rotation(container, stream), tag),
            has_audio=bool(container.streams.audio),
            container=_container_name(container.format.name, str(path)),
            decoder="",
            video_streams=sum(1 for other in container.streams.video if not _attached_picture(other)),
            pixel_aspect=_pixel_aspect(stream),
            transfer=TRANSFERS.get(context.color_trc, ""),
            frames_stated=bool(stream.frames),
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
    if not math.isfinite(degrees):  # (a tag "nan" or "inf", kept as written by NUT or Matroska: round() raised)
        degrees = 0.0
    return int(round(degrees / 90.0)) % 4 * 90


def upright(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Turn frames ([H,W,3] or [N,H,W,3]) clockwise by `rotation` degrees (see `probe`)."""
    if rotation % 360 == 0:
        return frames
    axes = (0, 1) if frames.ndim == 3 else (1, 2)
    # np.rot90 turns counter-clockwise for positive k.
    return np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=axes))


def open_video(path: str | Path, meta: VideoMeta | None = None, decoder: str | None = None,
               max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> "FrameSource":
    """Open a video for frame reads: decord first, PyAV when decord cannot open it.

    decord reads only the codecs and containers where its random access returns the frames asked
    for (`_DECORD_CODECS` in `_DECORD_CONTAINERS`: H.264, VP8/VP9 and ProRes in MP4, MOV, 3GP,
    Matroska, WebM and FLV), in a file of one video stream, not HDR; PyAV reads the rest. Pass `meta`
    from `probe` to avoid probing twice; `decoder="pyav"` skips decord (`resources.decoder`, or
    the decoder that an earlier stage ended up using); None or "decord" is decord first.
    `max_frame_pixels` (`sampling.max_frame_pixels`) bounds each frame PyAV decodes (a stream may
    grow midway); decord's frames are not seen at their size. Raises VideoDecodeError naming the
    file and each decoder's reason when neither can open it.
    """
    from workers.frame_sources import DecordSource
    from workers.pyav_source import PyAVSource

    meta = meta or probe(path)
    reasons = []
    # decord reads the stream FFmpeg deems best, which may not be the first: one stream only. Its
    # 8-bit RGB of an HDR stream cannot be tone mapped: PyAV gives 16 bits
    if (decoder != "pyav" and meta.codec in _DECORD_CODECS and meta.container in _DECORD_CONTAINERS
            and meta.video_streams == 1 and not meta.transfer and _length_plausible(path, meta)):
        try:
            return DecordSource(path, meta, max_frame_pixels)
        except Exception as exc:  # noqa: BLE001 - decord raises its own error types; PyAV next
            reasons.append(f"decord: {decoder_reason(exc)}")
    try:
        return PyAVSource(path, meta, max_frame_pixels)
    except EmptyVideoStream:
        raise  # (decord's failure on it, in its own words, would only obscure that)
    except Exception as exc:  # noqa: BLE001 - reported with decord's reason below
        reasons.append(f"pyav: {decoder_reason(exc)}")
        bad_file = _bad_file(exc)  # (PyAV's: decord's failure alone gives way to it)
    raise VideoDecodeError(f"{path}: cannot decode video ({'; '.join(reasons)})", bad_file)


def _bad_file(exc: BaseException) -> bool:
    """Whether a decoder's `exc` says the file's bytes are wrong (FFmpeg's invalid data, an end
    where more was stated), so that it fails alike in every run (`VideoDecodeError.bad_file`):
    not an I/O error, permissions or memory, which another run may not meet, nor an error of
    another kind (a bug, which a later version may mend)."""
    if isinstance(exc, VideoDecodeError):
        return exc.bad_file
    return isinstance(exc, av.FFmpegError) and not isinstance(exc, (OSError, MemoryError))


#: the most frames decord is asked to index where the container states no count (46 h at 60 fps)
_DECORD_UNSTATED_FRAMES = 10_000_000


def _length_plausible(path: str | Path, meta: VideoMeta) -> bool:
    """Whether the frames a container's stated duration makes (Matroska states no count) are
    plausible for decord, which sizes its index by them: at most `_DECORD_UNSTATED_FRAMES`, and
    100 bytes of the file each. A Matroska file whose header said 1e12 ms made it allocate for
    2e10 frames and abort the process (std::bad_alloc); PyAV counts the frames the file holds."""
    try:
        return meta.frames_stated or meta.frame_count <= min(_DECORD_UNSTATED_FRAMES, os.path.getsize(path) // 100)
    except OSError:
        return True  # (decord's own error names it)


def video_stream(container):
    """The first real video stream (cover art attached to audio files does not count)."""
    return next((stream for stream in container.streams.video if not _attached_picture(stream)), None)


def frame_rate(stream):
    """The stream's frames per second as a Fraction (its average, else FFmpeg's guess, else its
    base rate), or None when it states none."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if stream.time_base and rate == 1 / stream.time_base and stream.guessed_rate:
        rate = stream.guessed_rate  # raw DV gives its time base (1/60000 s) as its average rate
    return rate


def _pixel_aspect(stream) -> float:
    """A coded pixel's width to its height: the container's ratio, else the stream's; 1 when
    unset or beyond 1/4..4 (a bogus header, which would multiply the stretched frames' memory)."""
    ratio = float(stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or 1)
    return ratio if 0.25 <= ratio <= 4 else 1.0


def _attached_picture(stream) -> bool:
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _duration_s(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else 0.0


def _first_frame_rotation(container, stream, max_packets: int = 64) -> float | None:
    """The display-matrix angle of the first decoded frame (PyAV exposes it on frames only).

    Packets an MP4/MOV edit list cuts (a trim without re-encoding: from the keyframe before
    the cut) are decoded but never shown: they do not count towards `max_packets`."""
    count = 0
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                return frame.rotation
            count += not packet.is_discard
            if count > max_packets:
                break
    except av.FFmpegError:
        pass  # undecodable frames are the reader's business; rotation falls back to the tag
    return None


def _is_iso_media(path: str | Path) -> bool:
    """Whether a file starts like an MP4/MOV (an `ftyp` box first)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8)[4:8] == b"ftyp"
    except OSError:
        return False


def _container_name(format_name: str, path: str) -> str:
    """One name for FFmpeg's demuxer ("mov,mp4,m4a,..." -> "mp4" for a .mp4 file)."""
    names = format_name.split(",")
    extension = Path(path).suffix.lower().lstrip(".")
    return extension if extension in names else names[0]


#: the C++ log prefix decord puts before what went wrong, once per frame of its call stack
_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def decoder_reason(exc: BaseException) -> str:
    """What went wrong in a decoder, in one line of at most 300 characters; decord's "[01:00:14]
    /github/workspace/src/video/ffmpeg/threaded_decoder.cc:292: " prefixes taken out, and its
    failure to decode a packet said in words."""
    text = _DECORD_LOG_PREFIX.sub("", str(exc)).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if "avcodec_send_packet" in line:
        return "the decoder rejected a packet: a damaged stretch of the file?"
    return line[:300]


def __getattr__(name: str):
    # the frame sources moved to workers.frame_sources and workers.pyav_source;
    # `from workers.decode import ...` still works
    if name in ("FrameSource", "DecordSource"):
        from workers import frame_sources

        return getattr(frame_sources, name)
    if name == "PyAVSource":
        from workers.pyav_source import PyAVSource

        return PyAVSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
