"""Synthetic clips with known content, for `vidlens doctor`, the tests and the benchmarks.

Each generator returns RGB uint8 frames whose content is known by construction: scenes with
hard cuts at known frames, known text drawn on frames, and frames that carry their own index
so a reader's frame order and colour order can be checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

#: distinct, saturated scene colours (RGB), far apart so every cut is a hard one.
SCENE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40), (200, 40, 200), (40, 200, 210),
    (250, 140, 30), (120, 60, 20), (250, 250, 250), (30, 30, 30),
)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float = 25.0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    gop: int | None = None,
    with_audio: bool = False,
    options: dict[str, str] | None = None,
    times_ms: Sequence[int] | None = None,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) into a video file with PyAV; returns the path.

    H.264 goes through PyAV's libx264 (OpenCV cannot write it here), by default with its
    fastest preset (no B-frames); `options` are the encoder's own, in place of that default.
    `gop` sets the keyframe interval; `with_audio` adds a silent AAC track. `times_ms`: when
    each frame is shown, for a variable-rate video (Matroska and MP4 keep them; `fps` is then
    only the stated rate); without, frame i at i / fps.
    """
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = None
        audio = container.add_stream("aac", rate=48000) if with_audio else None
        count = 0
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=rate)
                stream.width = frame.shape[1] - frame.shape[1] % 2
                stream.height = frame.shape[0] - frame.shape[0] % 2
                stream.pix_fmt = pix_fmt
                if gop:
                    stream.gop_size = gop
                if options is not None:
                    stream.options = options
                elif codec == "libx264":
                    stream.options = {"preset": "ultrafast", "crf": "18"}
                elif codec != "libsvtav1":
                    # FFmpeg's default of 200 kb/s blurs the index levels of MPEG-2/MPEG-4 frames
                    stream.bit_rate = 4_000_000
                if times_ms is not None:
                    stream.codec_context.time_base = Fraction(1, 1000)
            video_frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24"
            )
            if times_ms is not None:
                video_frame.pts, video_frame.time_base = int(times_ms[count]), Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"no frames given for {path}")
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            samples_per_frame = 1024
            seconds = count / float(fps)
            for i in range(int(seconds * 48000 / samples_per_frame) + 1):
                silence = av.AudioFrame.from_ndarray(
                    np.zeros((1, samples_per_frame), dtype=np.float32), format="fltp", layout="mono"
                )
                silence.sample_rate = 48000
                silence.pts = i * samples_per_frame
                for packet in audio.encode(silence):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path


def mux_frames(container, stream, frames: Iterable) -> None:
    """Encode PyAV `frames` into `stream`, numbered 0, 1, 2... as their pts, and mux the
    packets into `container`, the encoder's last ones included."""
    for index, frame in enumerate(frames):
        frame.pts = index
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def scene_frames(
    cuts: Sequence[int], total: int, width: int = 320, height: int = 240, seed: int = 0
) -> list[np.ndarray]:
    """Frames of coloured scenes with hard cuts at the given frame indices.

    Scene k fills frames cuts[k-1]..cuts[k]-1 with its own colour and a textured shape that
    moves a little each frame, so frames within a scene differ while scenes differ far more.
    """
    rng = np.random.default_rng(seed)
    bounds = [0, *cuts, total]
    frames = []
    for scene, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        colour = np.array(SCENE_COLOURS[scene % len(SCENE_COLOURS)], dtype=np.uint8)
        texture = rng.integers(0, 40, size=(height, width, 1), dtype=np.uint8)
        base = np.clip(colour.astype(np.int16) - texture, 0, 255).astype(np.uint8)
        for i in range(end - start):
            frame = base.copy()
            x = (10 + 3 * i) % max(1, width - 60)
            shade = tuple(int(255 - c) for c in colour)
            cv2.rectangle(frame, (x, height // 3), (x + 50, height // 3 + 50), shade, -1)
            frames.append(frame)
    return frames


def text_frames(
    text: str, count: int = 10, width: int = 640, height: int = 360, scale: float = 2.0
) -> list[np.ndarray]:
    """Frames showing `text` in large black letters on white, centred."""
    frame = np.full((height, width, 3), 255, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(2, int(scale * 2))
    (text_w, text_h), _ = cv2.getTextSize(text, font, scale, thickness)
    origin = ((width - text_w) // 2, (height + text_h) // 2)
    cv2.putText(frame, text, origin, font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return [frame.copy() for _ in range(count)]


def indexed_frames(count: int, width: int = 256, height: int = 144) -> list[np.ndarray]:
    """Frames that carry their own index: frame i has red channel level `index_level(i)`.

    The left half is a flat red level that encodes the index (robust to compression),
    the right half is pure blue, so a reader that swaps RGB/BGR is caught at once.
    """
    frames = []
    for i in range(count):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        frame[:, : width // 2, 0] = index_level(i, count)
        frame[:, width // 2 :, 2] = 255
        frames.append(frame)
    return frames


def index_level(i: int, count: int) -> int:
    """Red level that `indexed_frames` uses for frame i of count (spread over 20..235)."""
    return int(round(20 + 215 * i / max(1, count - 1)))


def make_demo_clips(folder: str | Path, count: int = 3) -> list[Path]:
    """A few small clips (with cuts, text and plain scenes) for `vidlens doctor` and smoke tests."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_video(folder / "cuts.mp4", scene_frames([30, 60], 90, 160, 96), fps=25)]
    if count > 1:
        paths.append(write_video(folder / "text.mp4", text_frames("VIDLENS", 40, 320, 180, 1.5), fps=20))
    for k in range(2, count):
        paths.append(
            write_video(folder / f"scene_{k}.mp4", scene_frames([25], 50, 128, 96, seed=k), fps=25)
        )
    return paths
