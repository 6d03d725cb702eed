"""A corpus of bad and unusual inputs, made at test time (nothing is committed).

`make_corpus(folder)` writes one file (or link) per case into `folder` and returns what each
case is expected to produce, so the tests read as a table: name -> expected outcome. Videos
are encoded with PyAV (libx264 and friends through `workers.synthetic`); there is no ffmpeg
binary. Cases that need the job's cooperation (a file deleted between listing and reading,
a decoder that hangs) are named here and set up by the tests.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from workers.synthetic import indexed_frames, scene_frames, write_video

#: presentation times (ms) of the variable-rate clip: bursts and pauses, as in a screen recording.
VFR_TIMES_MS = (0, 40, 80, 200, 240, 600, 640, 680, 1000, 1040, 1080, 1500)
#: the frames of corrupt_frame.mp4 (48 frames, a keyframe every 12) that cannot be decoded: its
#: frame 18, whose bytes are zeroed, and those decoded from it up to the next keyframe.
CORRUPT_FRAMES = tuple(range(18, 24))


@dataclass(frozen=True)
class Case:
    """One corpus entry: its file name and what the pipeline must make of it."""

    name: str
    #: "ok": a videos row and no errors row; "error": exactly one errors row (stage, reason);
    #: "absent": neither (not listed).
    outcome: str
    stage: str | None = None
    #: a piece of the error message (case-insensitive), when outcome is "error".
    reason: str | None = None
    #: when outcome is "error": the file's own bytes fail it, as they will in every run, which
    #: gives up on it after `incremental.give_up_after` runs (not a file gone or that cannot be read)
    bad_file: bool = False


CASES = (
    Case("zero_byte.mp4", "error", "decode", "empty file (0 bytes)", bad_file=True),
    Case("truncated_index_at_end.mp4", "error", "decode", "not a media file", bad_file=True),
    Case("truncated_index_first.mp4", "ok"),
    Case("random_bytes.mp4", "error", "decode", "not a media file", bad_file=True),
    Case("audio_only.mp4", "error", "decode", "no video stream", bad_file=True),
    Case("single_frame.mp4", "ok"),
    Case("eight_k.mp4", "ok"),
    Case("odd_dimensions.mp4", "ok"),
    Case("vfr.mkv", "ok"),
    Case("rotated.mp4", "ok"),
    Case("ten_bit.mkv", "ok"),
    Case("corrupt_frame.mp4", "ok"),
    Case("unknown_codec.mkv", "error", "decode", "codec is not supported", bad_file=True),
    Case("index_claims_80m_frames.mp4", "error", "decode", "index claims 80,000,000 frames or samples",
         bad_file=True),
    Case("deleted.mp4", "error", "decode", "the file was removed after it was listed (deleted or moved)"),
    Case("unreadable.mp4", "error", "decode", "permission denied"),
    Case("with space.mp4", "ok"),
    Case("unicodé 日本.mp4", "ok"),
    Case("new\nline.mp4", "ok"),
    Case("loop", "absent"),
    Case("self_loop.mp4", "absent"),
)
BY_NAME = {case.name: case for case in CASES}


def make_corpus(folder: str | Path) -> dict[str, Case]:
    """Write every case into `folder` (created); returns name -> Case."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    small = indexed_frames(24, 64, 36)

    (folder / "zero_byte.mp4").write_bytes(b"")
    # PyAV writes the MP4 index (moov) after the media: cut in half, the index is gone
    whole = write_video(folder / ".whole.mp4", small, fps=24, pix_fmt="yuv420p")
    payload = whole.read_bytes()
    whole.unlink()
    (folder / "truncated_index_at_end.mp4").write_bytes(payload[: len(payload) // 2])
    # with the index first ("faststart") the frames before the cut remain readable
    (folder / "truncated_index_first.mp4").write_bytes(_faststart(folder / ".fast.mp4", 96))
    (folder / "random_bytes.mp4").write_bytes(np.random.default_rng(7).bytes(50_000))
    audio_only(folder / "audio_only.mp4")
    write_video(folder / "single_frame.mp4", small[:1], fps=25)
    write_video(folder / "eight_k.mp4", [np.full((4320, 7680, 3), 90, np.uint8)] * 2, fps=25)
    _odd_dimensions(folder / "odd_dimensions.mp4", 161, 97)
    _variable_rate(folder / "vfr.mkv")
    _rotated(folder / "rotated.mp4")
    write_video(folder / "ten_bit.mkv", small, fps=24, pix_fmt="yuv420p10le")
    zero_frame(write_video(folder / "corrupt_frame.mp4", indexed_frames(48, 64, 36), fps=24, gop=12), 18)
    _unknown_codec(folder / "unknown_codec.mkv", small)
    claiming_frames(write_video(folder / "index_claims_80m_frames.mp4", small[:4], fps=24), 80_000_000)
    write_video(folder / "deleted.mp4", small, fps=24)  # the test deletes it after listing
    write_video(folder / "unreadable.mp4", small, fps=24)
    os.chmod(folder / "unreadable.mp4", 0)
    for name in ("with space.mp4", "unicodé 日本.mp4", "new\nline.mp4"):
        write_video(folder / name, scene_frames([12], 24, 64, 48), fps=24)
    os.symlink(".", folder / "loop")  # a folder that contains itself
    os.symlink("self_loop.mp4", folder / "self_loop.mp4")  # a link to itself
    return dict(BY_NAME)


def zero_frame(path: Path, index: int) -> Path:
    """Zero the bytes of the video's frame `index` (in display order), as a bad sector or a
    damaged download leaves them: the decoder rejects it, and the frames decoded from it up to
    the next keyframe are damaged. Returns the path."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((packet.pts, packet.pos, packet.size) for packet in container.demux(stream) if packet.size)
    _, position, size = packets[index]
    with open(path, "r+b") as file:
        file.seek(position)
        file.write(bytes(size))
    return path


def decord_counts_fewer(path: Path) -> Path:
    """A 30-frame H.264 FLV (a keyframe every 8 frames) damaged so that decord counts 28 frames
    and PyAV 29, and decord fails midway: the 16 bytes before frame 20's tag start zeroed (the
    end of frame 19's payload, the tag size before frame 20 and its tag header), which FFmpeg
    4.1's FLV demuxer (decord's) gets past one packet later than FFmpeg 8's (PyAV's); and frame
    11's picture zeroed, which decord refuses to decode. Returns the path."""
    write_video(path, indexed_frames(30, 64, 36), fps=25, gop=8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tags = sorted((packet.pts, packet.pos, packet.size) for packet in container.demux(stream) if packet.size)
    data = bytearray(path.read_bytes())
    tag = tags[20][1]  # (a packet's position is its FLV tag's start)
    data[tag - 12:tag + 4] = bytes(16)
    _, tag, size = tags[11]
    data[tag + 16:tag + 16 + size] = bytes(size)  # (after its 11-byte tag header and 5-byte video header)
    path.write_bytes(data)
    return path


def claiming_frames(path: Path, count: int) -> Path:
    """Rewrite the index of an MP4 of one video track in one chunk (as `write_video` makes a
    short clip) to claim `count` frames, as a forged or damaged file may: each of one size
    (`stsz`), `count` shown alike (`stts`), all in its chunk (`stsc`). Opening a file of 1.8 KB
    so rewritten to claim 80 million, FFmpeg took 4.8 GB. Box sizes are kept (the table of
    sample sizes, 2 or more, becomes a `free` box). Returns the path."""
    data = bytearray(path.read_bytes())
    moov = top_level_box(data, b"moov")
    stsz = data.index(b"stsz", moov) - 4
    (size,) = struct.unpack(">I", data[stsz:stsz + 4])
    data[stsz:stsz + size] = (struct.pack(">I4sIII", 20, b"stsz", 0, 100, count)
                              + struct.pack(">I4s", size - 20, b"free") + bytes(size - 28))
    stts = data.index(b"stts", moov) - 4
    data[stts + 16:stts + 20] = struct.pack(">I", count)  # its first entry's count
    stsc = data.index(b"stsc", moov) - 4
    data[stsc + 20:stsc + 24] = struct.pack(">I", count)  # its first entry's samples a chunk
    path.write_bytes(data)
    return path


def top_level_box(data: bytes, kind: bytes) -> int:
    """Where the first top-level box of type `kind` of an MP4 starts."""
    at = 0
    while at + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[at:at + 8])
        if name == kind:
            return at
        at += struct.unpack(">Q", data[at + 8:at + 16])[0] if size == 1 else size or len(data)
    raise ValueError(f"no {kind!r} box")


def _faststart(scratch: Path, frames: int) -> bytes:
    with av.open(str(scratch), "w", options={"movflags": "faststart"}) as container:
        _encode(container, indexed_frames(frames, 64, 36), rate=24)
    payload = scratch.read_bytes()
    scratch.unlink()
    return payload[: len(payload) * 2 // 3]


def audio_only(path: Path, empty_video_track: bool = False) -> None:
    """A file of silence; with `empty_video_track`, beside a video track with no frame (a
    recording whose video failed)."""
    with av.open(str(path), "w") as container:
        if empty_video_track:
            video = container.add_stream("libx264", rate=24)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        stream = container.add_stream("aac", rate=48000)
        for i in range(20):
            silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            silence.sample_rate, silence.pts = 48000, i * 1024
            for packet in stream.encode(silence):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _odd_dimensions(path: Path, width: int, height: int) -> None:
    # 4:4:4 chroma allows odd sizes, which 4:2:0 cannot hold
    frames = [np.full((height, width, 3), 20 + 10 * i, np.uint8) for i in range(12)]
    with av.open(str(path), "w") as container:
        _encode(container, frames, rate=24, pix_fmt="yuv444p")


def _variable_rate(path: Path) -> None:
    write_video(path, indexed_frames(len(VFR_TIMES_MS), 64, 36), times_ms=VFR_TIMES_MS)


def _rotated(path: Path) -> None:
    """96x64 coded, shown turned 90 degrees clockwise; a red block marks the coded top-left corner."""
    frame = np.zeros((64, 96, 3), np.uint8)
    frame[:16, :16, 0] = 255
    with av.open(str(path), "w") as container:
        _encode(container, [frame] * 12, rate=24, rotation_ccw=-90)


def _unknown_codec(path: Path, frames: list[np.ndarray]) -> None:
    # a Matroska codec id no FFmpeg knows, of the same length as the H.264 one it replaces
    scratch = write_video(path.with_name(".scratch.mkv"), frames, fps=24)
    payload = scratch.read_bytes()
    scratch.unlink()
    assert payload.count(b"V_MPEG4/ISO/AVC") == 1
    path.write_bytes(payload.replace(b"V_MPEG4/ISO/AVC", b"V_VIDLENS/NONE!"))


def _encode(container, frames, rate: int, pix_fmt: str = "yuv420p", rotation_ccw: int = 0) -> None:
    stream = container.add_stream("libx264", rate=rate)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = pix_fmt
    stream.options = {"preset": "ultrafast"}
    if rotation_ccw:
        stream.set_display_rotation(rotation_ccw)
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
