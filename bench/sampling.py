"""Benchmark 1: the cost of sampling N uniform frames against the length of the video.

    python -m bench.sampling            # 10 s and 10 min clips at 720p, 8 and 32 frames
    python -m bench.sampling --quick    # tiny clips: checks the plumbing in seconds

Each method returns the same N frames (uniform: the middle of N equal spans) as RGB uint8:
- vidlens: `workers.decode.probe` + `open_video(...)`, every frame's time, `get_frames`: what the sample stage runs
  (decord; "decoder pyav": with `resources.decoder: pyav`, vidlens' PyAV source);
- decord: `VideoReader.get_batch` (seeks to the keyframe before each frame);
- PyAV: seek to the keyframe before each wanted frame, decode forward to it;
- OpenCV: `CAP_PROP_POS_FRAMES` then `read()` per frame;
- decode everything: every frame decoded and converted, the wanted ones kept, as
  `ray.data.read_videos` does (decord `VideoReader` iterated frame by frame, `asnumpy()`).

The figure that matters is a ratio: the cost on the long clip over the cost on the short
one (a seeking sampler pays per keyframe interval, not per minute of video), and the cost of
decoding everything over ours.

A second table reads 8 and 32 uniform frames of each real H.264 clip in ../shared/videos
(B-frames, as cameras and encoders write them) on one decoder thread, through vidlens' two
frame sources: decord, and PyAV leaving out the frames no other frame refers to (what it
does now), against PyAV decoding every frame. The generated clips above have no B-frames.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from bench.clips import DEFAULT_GOP, clip
from bench.common import SHARED_VIDEOS, Report, arguments, interleaved_medians, timed, verdict
from workers.frame_selection import uneven_interval, uniform_indices
from workers.pyav_source import SCALER_OPTIONS


def sample_vidlens(path: Path, count: int, decoder: str = "decord") -> np.ndarray:
    """Our sampler, as the sample stage calls it (`decoder`: `resources.decoder`)."""
    from workers.decode import open_video, probe

    meta = probe(path)
    with open_video(path, meta, decoder=decoder) as source:
        # as the sample stage: every frame's time, to sample a variable-rate video by time
        if uneven_interval(source.frame_times(np.arange(source.frame_count))):
            raise AssertionError(f"{path}: a variable-rate clip, not what this benchmark generates")
        return source.get_frames(uniform_indices(source.frame_count, count))


def sample_vidlens_pyav(path: Path, count: int) -> np.ndarray:
    """Our sampler with `resources.decoder: pyav`."""
    return sample_vidlens(path, count, decoder="pyav")


def sample_vidlens_snapped(path: Path, count: int) -> np.ndarray:
    """Our sampler with `sampling.snap_to_keyframes`: each frame moved to a keyframe nearby."""
    from workers.decode import open_video, probe
    from workers.frame_selection import snap_to_keyframes

    meta = probe(path)
    with open_video(path, meta) as source:
        # no segments: nothing is pinned, as for the uniform frames of a video without shot detection
        indices = snap_to_keyframes(uniform_indices(source.frame_count, count), source.keyframe_indices(), [])
        return source.get_frames(indices)


def sample_decord(path: Path, count: int) -> np.ndarray:
    """decord's random access."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return reader.get_batch(uniform_indices(len(reader), count).tolist()).asnumpy()


def sample_pyav(path: Path, count: int) -> np.ndarray:
    """PyAV: seek backwards to a keyframe, decode forward to each wanted frame."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return seek_uniform(container, stream, count)


def seek_uniform(container, stream, count: int) -> np.ndarray:
    """`count` uniform frames of an open PyAV stream as RGB: for each, seek backwards to a
    keyframe and decode forward to it."""
    frames = []
    total = stream.frames or int(float(stream.duration * stream.time_base) * float(stream.average_rate))
    rate = Fraction(stream.average_rate)
    for index in uniform_indices(total, count):
        target = int(Fraction(int(index)) / rate / stream.time_base) + (stream.start_time or 0)
        container.seek(target, stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= target:
                frames.append(frame.to_ndarray(format="rgb24", **SCALER_OPTIONS))
                break
    return np.stack(frames)


def sample_opencv(path: Path, count: int) -> np.ndarray:
    """OpenCV: set the frame position, read one frame."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for index in uniform_indices(total, count):
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(index))
        ok, frame = capture.read()
        if not ok:
            raise RuntimeError(f"OpenCV could not read frame {index} of {path}")
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack(frames)


def sample_decode_everything(path: Path, count: int) -> np.ndarray:
    """Every frame decoded to RGB (as ray.data.read_videos does), the wanted ones kept."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    wanted = set(uniform_indices(len(reader), count).tolist())
    kept = []
    for index, frame in enumerate(reader):
        pixels = frame.asnumpy()
        if index in wanted:
            kept.append(pixels)
    return np.stack(kept)


METHODS = {
    "vidlens": sample_vidlens,
    "vidlens, snap_to_keyframes": sample_vidlens_snapped,
    "vidlens, decoder pyav": sample_vidlens_pyav,
    "decord": sample_decord,
    "PyAV": sample_pyav,
    "OpenCV": sample_opencv,
    "decode everything": sample_decode_everything,
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its table and append it to docs/benchmarks.md."""
    parser = arguments(__doc__, "tiny clips, one repeat: a plumbing check",
                       repeats=3, rounds="interleaved repeats of each seeking method")
    args = parser.parse_args(argv)

    if args.quick:
        short, long = clip(2, 160, 90, gop=25), clip(20, 160, 90, gop=25)
        sizes, repeats, resolution = ("2 s", "20 s"), 1, "160x90, keyframe every 25 frames"
    else:
        short, long = clip(10, 1280, 720), clip(600, 1280, 720)
        sizes, repeats, resolution = ("10 s", "10 min"), args.repeats, f"1280x720 25 fps, keyframe every {DEFAULT_GOP} frames"
    report = Report("Benchmark 1: sampling cost against video length", args.quick, args.doc)
    rows, seconds, everything_long = [], {}, None
    for count in (8, 32):
        variants = {}
        for method, sample in METHODS.items():
            for label, path in zip(sizes, (short, long)):
                if method == "decode everything" and path == long:
                    continue  # minutes per call: timed once below
                variants[(method, label)] = (lambda s=sample, p=path: _checked(s(p, count), count))
        medians = interleaved_medians(variants, repeats)
        if everything_long is None:  # the same work whatever N is: timed once, used for both
            everything_long, _ = timed(lambda: _checked(sample_decode_everything(long, count), count))
        medians[("decode everything", sizes[1])] = everything_long
        for method in METHODS:
            short_s, long_s = medians[(method, sizes[0])], medians[(method, sizes[1])]
            seconds[(method, count)] = (short_s, long_s)
            everything = medians[("decode everything", sizes[1])]
            rows.append([method, count, short_s, long_s, long_s / short_s, everything / long_s])
    report.add_table(
        ["method", "frames", f"{sizes[0]} clip, s", f"{sizes[1]} clip, s", f"{sizes[1]} / {sizes[0]}",
         f"decode-everything / method ({sizes[1]})"],
        rows, caption=f"Median seconds to sample N uniform frames ({resolution}; {repeats} interleaved "
                      "repeats; decode-everything on the long clip timed once, as it does the same work for any N).",
    )
    everything = seconds[("decode everything", 8)][1]
    targets = []
    for method in ("vidlens", "vidlens, snap_to_keyframes", "vidlens, decoder pyav"):
        short_s, long_s = seconds[(method, 8)]
        targets += [
            [f"{method}: 8 frames, long clip at most 2x the short clip", f"{long_s / short_s:.2f}x",
             verdict(long_s <= 2 * short_s)],
            [f"{method}: 8 frames from the long clip at least 20x less than decoding everything",
             f"{everything / long_s:.1f}x", verdict(everything >= 20 * long_s)],
        ]
    report.add_table(["target", "measured", "verdict"], targets)
    real_clips(report, repeats, args.quick)
    report.publish()
    return 0


def read_source(source_class: type, path: Path, count: int, skips: bool = True) -> np.ndarray:
    """N uniform frames through one of vidlens' frame sources; `skips=False` makes PyAV decode
    every frame it passes."""
    with source_class(path) as source:
        if not skips:
            source._skips = False
        return source.get_frames(uniform_indices(source.frame_count, count))


def real_clips(report: Report, repeats: int, quick: bool) -> None:
    """The second table: decord and PyAV on the real H.264 clips, one decoder thread."""
    from workers.decode import probe
    from workers.frame_sources import DecordSource, set_decode_threads
    from workers.pyav_source import PyAVSource

    clips = sorted(SHARED_VIDEOS.glob("*.mp4"))[: 1 if quick else None]
    if not clips:
        report.note(f"The real clips were not found in {SHARED_VIDEOS}: no second table.")
        return
    set_decode_threads(1)
    rows = []
    for path in clips:
        meta = probe(path)
        for count in (8,) if quick else (8, 32):
            variants = {
                "decord": lambda p=path, n=count: read_source(DecordSource, p, n),
                "pyav": lambda p=path, n=count: read_source(PyAVSource, p, n),
                "pyav, every frame": lambda p=path, n=count: read_source(PyAVSource, p, n, skips=False),
            }
            same = all(np.array_equal(variants["pyav"](), run()) for run in variants.values())
            medians = interleaved_medians(variants, repeats)
            rows.append([path.name, f"{meta.codec} {meta.width}x{meta.height}, {meta.frame_count} frames", count,
                         *(medians[name] * 1000 for name in variants),
                         medians["pyav, every frame"] / medians["pyav"], medians["decord"] / medians["pyav"],
                         "yes" if same else "**no**"])
    set_decode_threads(0)
    report.add_table(
        ["clip", "stream", "frames", "decord ms", "PyAV ms", "PyAV decoding every frame ms",
         "every frame / PyAV", "decord / PyAV", "same frames"],
        rows, caption=f"Median milliseconds to read N uniform frames of the real clips ({repeats} interleaved "
                      "repeats, one decoder thread, opening the file included): vidlens' decord source, its PyAV "
                      "source (leaving out the frames no other frame refers to), and that source decoding every frame.",
    )


def _checked(frames: np.ndarray, count: int) -> np.ndarray:
    if frames.ndim != 4 or len(frames) != count or frames.dtype != np.uint8:
        raise AssertionError(f"expected {count} uint8 frames, got {frames.dtype} {frames.shape}")
    return frames


if __name__ == "__main__":
    raise SystemExit(main())
