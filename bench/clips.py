"""Generated H.264 clips for the benchmarks, cached under bench/.cache (never committed).

The content is simple but moving (a textured background that scrolls, a square that
crosses the frame, a cut every `cut_every_s` seconds), so the encoder produces realistic
P-frames between keyframes placed every `gop` frames, as a camera or an editor would.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from bench.common import CACHE, SHARED_VIDEOS
from workers.synthetic import SCENE_COLOURS, write_video

#: a realistic keyframe interval: 10 s at 25 fps, x264's default.
DEFAULT_GOP = 250


def moving_frames(count: int, width: int, height: int, fps: float, cut_every_s: float = 4.0,
                  seed: int = 0) -> Iterator[np.ndarray]:
    """`count` RGB frames of scrolling texture and a moving square, with a hard cut every few seconds."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 48, size=(height, width * 2, 1), dtype=np.int16)
    scene_frames = max(1, int(round(cut_every_s * fps)))
    backgrounds: dict[int, np.ndarray] = {}  # per scene colour, built once: frames are slices of it
    side = max(8, height // 5)
    for i in range(count):
        scene = (i // scene_frames + seed) % len(SCENE_COLOURS)
        if scene not in backgrounds:
            colour = np.array(SCENE_COLOURS[scene], dtype=np.int16)
            backgrounds[scene] = np.clip(colour - texture, 0, 255).astype(np.uint8)
        shift = (2 * i) % width
        frame = np.ascontiguousarray(backgrounds[scene][:, shift : shift + width])
        x = (5 * i) % max(1, width - side)
        y = (height - side) // 2 + int(height / 6 * np.sin(i / 15))
        shade = tuple(255 - c for c in SCENE_COLOURS[scene])
        cv2.rectangle(frame, (x, y), (x + side, y + side), shade, -1)
        yield frame


#: how an iPhone codes its default video: 10-bit HEVC, BT.2020, HLG (x265's tags)
HLG = {"codec": "libx265", "pix_fmt": "yuv420p10le", "options": {
    "preset": "ultrafast", "x265-params": "log-level=error:colorprim=bt2020:transfer=arib-std-b67:colormatrix=bt2020nc"}}


def clip(seconds: float, width: int, height: int, fps: float = 25.0, gop: int = DEFAULT_GOP,
         seed: int = 0, folder: Path | None = None, hlg: bool = False) -> Path:
    """The cached clip with these properties, encoded (libx264 ultrafast, or with `hlg` as
    `HLG` says) on first use."""
    folder = folder or CACHE / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"moving_{seconds:g}s_{width}x{height}_{fps:g}fps_g{gop}_s{seed}{'_hlg' if hlg else ''}.mp4"
    if not path.exists():
        partial = path.with_suffix(".partial.mp4")
        start = time.perf_counter()
        count = int(round(seconds * fps))
        write_video(partial, moving_frames(count, width, height, fps, seed=seed), fps=fps, gop=gop,
                    **(HLG if hlg else {}))
        partial.rename(path)
        print(f"generated {path.name} ({count} frames) in {time.perf_counter() - start:.1f} s")
    return path


def clip_folder(name: str, count: int, seconds_range: tuple[float, float], width: int, height: int,
                distinct: int = 20, fps: float = 25.0) -> Path:
    """A folder of `count` clips of varying length, copies of `distinct` generated ones.

    Copies are distinct videos to the pipeline (a video's id includes its path), and copying
    is far cheaper than encoding 1,000 clips.
    """
    def generated() -> list[Path]:
        low, high = seconds_range
        kinds = min(distinct, count)
        return [clip(round(low + (high - low) * k / max(1, kinds - 1), 1), width, height, fps, gop=int(fps * 2),
                     seed=k) for k in range(kinds)]

    return _copies(CACHE / "sets" / f"{name}_{count}", count, generated)


def real_folder(count: int) -> Path:
    """A folder of `count` copies of the real H.264 clips in ../shared/videos, in turn: footage as
    cameras and encoders write it (B-frames, 204x360 to 576x1024, 9-36 s), which generated
    clips are not."""
    def real() -> list[Path]:
        clips = sorted(SHARED_VIDEOS.glob("*.mp4"))
        if not clips:
            raise SystemExit(f"no real clips in {SHARED_VIDEOS} (set VIDLENS_SHARED_VIDEOS to their folder)")
        return clips

    return _copies(CACHE / "sets" / f"real_{count}", count, real)


def _copies(folder: Path, count: int, sources: Callable[[], list[Path]]) -> Path:
    """`folder`, holding `count` copies of the files `sources()` gives, in turn (called only when
    the folder is not already complete)."""
    if folder.is_dir() and len(list(folder.glob("*.mp4"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    originals = sources()
    for i in range(count):
        shutil.copyfile(originals[i % len(originals)], folder / f"clip_{i:05d}.mp4")
    return folder
