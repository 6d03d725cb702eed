"""GPU video decoding (NVDEC, through PyAV's FFmpeg) against FFmpeg's software decoder.

    python -m bench.nvdec            # on a machine with an NVIDIA GPU: 1080p H.264 clips
    python -m bench.nvdec --quick    # tiny clips; without a GPU, the software rows only

On a GPU node the decode ceiling, not the GPU, bounds a run (an H200 with 16 cores: 118
videos/s decoded, the GPU 2% busy; docs/benchmarks.md, "GPU"). PyAV's wheels carry an FFmpeg
built with CUDA decoding (`av.codec.hwaccel`: "cuda" in `hwdevices_available()`), so a decode
worker could hand its H.264 and HEVC decoding to the GPU's decoder engines. vidlens does not
do that yet; this measures whether it should, with what a decode worker does:

- opening a video and decoding its first frame: each open creates a decoder on the device;
- every frame of a 10 s clip, on one stream (software on one thread, and on all cores);
- 8 uniform frames of a 60 s clip (seek to the keyframe before each, decode forward, convert
  to RGB), as the sample stage reads them;
- the same 8-frame reads of many 10 s clips by one process per core at once: the decode
  ceiling of a node, software against NVDEC.

NVDEC rows are left out, with the reason, where FFmpeg cannot open a CUDA device.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from bench.clips import clip
from bench.common import Report, arguments, interleaved_medians
from bench.sampling import seek_uniform
from workers.pyav_source import SCALER_OPTIONS

#: how each variant opens a video: (label, on the GPU, decoder threads; 0 is FFmpeg's choice)
SOFTWARE_ONE_THREAD = ("software, 1 thread", False, 1)
SOFTWARE_ALL_THREADS = ("software, all cores", False, 0)
NVDEC = ("NVDEC", True, 1)


def _open(path: Path, gpu: bool, threads: int):
    """(container, video stream) opened as a variant says; on the GPU, never falling back."""
    import av

    if gpu:
        from av.codec.hwaccel import HWAccel

        container = av.open(str(path), hwaccel=HWAccel("cuda", allow_software_fallback=False))
    else:
        container = av.open(str(path))
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    if threads:
        stream.thread_count = threads
    return container, stream


def cuda_decoding(path: Path) -> str | None:
    """None where FFmpeg decodes `path` on a CUDA device here; else why it cannot."""
    from av.codec.hwaccel import hwdevices_available

    if "cuda" not in hwdevices_available():
        return "this PyAV's FFmpeg was built without CUDA"
    try:
        container, stream = _open(path, True, 1)
        with container:
            next(container.decode(stream))
            if not stream.codec_context.is_hwaccel:
                return "FFmpeg opened the CUDA device but decoded in software"
    except Exception as exc:  # noqa: BLE001 - any reason is the answer
        return f"FFmpeg could not decode on a CUDA device ({type(exc).__name__}: {exc})"
    return None


def first_frame(path: Path, gpu: bool, threads: int) -> np.ndarray:
    """Open, decode the first frame, convert it to RGB."""
    container, stream = _open(path, gpu, threads)
    with container:
        return next(container.decode(stream)).to_ndarray(format="rgb24", **SCALER_OPTIONS)


def every_frame(path: Path, gpu: bool, threads: int) -> int:
    """Decode every frame (no conversion); the count."""
    container, stream = _open(path, gpu, threads)
    with container:
        return sum(1 for _ in container.decode(stream))


def uniform_frames(path: Path, gpu: bool, threads: int, count: int = 8) -> np.ndarray:
    """`count` uniform frames: seek to the keyframe before each, decode forward, convert to RGB."""
    container, stream = _open(path, gpu, threads)
    with container:
        return seek_uniform(container, stream, count)


def _read_one(job: tuple[str, bool]) -> int:
    path, gpu = job
    return len(uniform_frames(Path(path), gpu, 1))


def at_once(paths: list[Path], gpu: bool, processes: int) -> float:
    """Videos a second reading 8 uniform frames of each of `paths`, `processes` at a time.

    Spawned processes: each opens its own CUDA context, as a decode worker would; a forked
    one would inherit the parent's, which CUDA does not allow."""
    jobs = [(str(path), gpu) for path in paths]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_read_one, jobs[:processes])  # each process's start-up and device, not timed
        start = time.perf_counter()
        pool.map(_read_one, jobs, chunksize=1)
        return len(jobs) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its table and append it to docs/benchmarks.md."""
    parser = arguments(__doc__, "tiny clips, one repeat: a plumbing check (runs without a GPU)", repeats=3)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="processes reading at once in the last table (default: one per core)")
    args = parser.parse_args(argv)
    (width, height), seconds, repeats, copies = (((160, 96), (2, 6), 1, 4 * args.processes) if args.quick else
                                                 ((1920, 1080), (10, 60), args.repeats, 8 * args.processes))
    short = clip(seconds[0], width, height, gop=50)
    why_not = cuda_decoding(short)
    if why_not and not args.quick:
        print(f"no NVDEC here: {why_not}. This benchmark needs a machine with an NVIDIA GPU (--quick runs without).")
        return 1
    long = clip(seconds[1], width, height, gop=50)
    variants = [SOFTWARE_ONE_THREAD, SOFTWARE_ALL_THREADS] + ([] if why_not else [NVDEC])
    report = Report("NVDEC against software decoding (PyAV)", args.quick, args.doc)
    frame_count = every_frame(short, False, 0)
    timings = interleaved_medians({
        (label, work): (lambda run=run, g=gpu, t=threads: run(g, t))
        for label, gpu, threads in variants
        for work, run in (("open", lambda g, t: first_frame(short, g, t)),
                          ("every", lambda g, t: every_frame(short, g, t)),
                          ("sample", lambda g, t: uniform_frames(long, g, t)))
    }, repeats)
    baseline = timings[(SOFTWARE_ONE_THREAD[0], "every")]
    rows = [[label, timings[(label, "open")] * 1000, frame_count / timings[(label, "every")],
             baseline / timings[(label, "every")], timings[(label, "sample")] * 1000]
            for label, _, _ in variants]
    report.add_table(
        ["decoder", "open + first frame, ms", "every frame, frames/s", "every frame, x software 1 thread",
         "8 uniform frames of the long clip, ms"],
        rows, caption=f"One stream ({width}x{height} H.264 at 25 fps, keyframe every 2 s): every frame of the "
                      f"{seconds[0]} s clip ({frame_count} frames), 8 frames of the {seconds[1]} s one; medians of "
                      f"{repeats} interleaved rounds.")
    if not why_not:
        software, gpu = uniform_frames(long, False, 1), uniform_frames(long, True, 1)
        difference = np.abs(software.astype(np.int16) - gpu).astype(np.float64)
        report.note(f"The 8 frames NVDEC returned against software's: {difference.mean():.2f} levels apart on "
                    f"average, at most {difference.max():.0f} (colour conversion of the device's NV12 output).")
    paths = [short] * copies
    rates = {label: at_once(paths, gpu, args.processes) for label, gpu, _ in variants if label != SOFTWARE_ALL_THREADS[0]}
    report.add_table(
        ["decoder", "videos/s", "x software"],
        [[label, rate, rate / rates[SOFTWARE_ONE_THREAD[0]]] for label, rate in rates.items()],
        caption=f"{args.processes} processes at once, each reading 8 uniform frames of a video "
                f"({copies} reads of the {seconds[0]} s clip, after one each to start the processes).")
    if why_not:
        report.note(f"NVDEC not measured: {why_not}.")
    report.publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
