"""Preparing sampled frames for the model, and the decode side of a video, step by step.

    python -m bench.preparation            # 320x240 to 1920x1080, CLIP's processor
    python -m bench.preparation --quick    # tiny clips, one round: checks the plumbing

Part 1 prepares the 9 frames the default sampling decodes (8 uniform + the keyframe) at four
frame sizes three ways: the image processor itself (CLIP's: resize the short side to 224
bicubic, centre-crop 224), and the two direct ways of `workers.preparation` (PIL's resize of
the crop's box; torch's uint8 antialiased resize, on x86), with how far their pixels are
from the processor's.

Part 2 times a video's whole decode side as the pipeline runs it (the decode stage, then
the sample stage with its decode child, thumbnails on, shots off), per clip, with the
changes of December 2026 added one at a time. The earlier data flows are emulated in the
same run: "earlier" reads the frames in a fresh open of the video, brings them whole out of
the decode child and prepares them with the processor; "+ direct ways" prepares them with
`FramePreparer` instead; "+ one open" reads them from the decode stage's kept source; "now"
is the sample stage itself, which also prepares the frames and makes the thumbnails in the
child, so only model-size frames leave it.

Part 3 times the same decode side on 4K clips (H.264 read by decord and by PyAV, and 10-bit
HEVC HLG, tone mapped by PyAV's source) with the sampled frames decoded at full size and
scaled to `workers.sampling.FRAME_SIDE` (1920) as they are converted, as now.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np

from bench.clips import clip
from bench.common import Report, arguments, interleaved_medians
from bench.sampling import sample_vidlens

#: frame sizes of part 1 and the clips of part 2 (width, height, seconds).
SIZES = [(320, 240, 8), (640, 360, 8), (1280, 720, 8), (1920, 1080, 4)]
QUICK_SIZES = [(160, 90, 2), (320, 180, 2)]
FRAMES = 9
#: part 3's clips: (name, width, height, seconds, HLG, decoder)
LARGE = [("4K H.264", 3840, 2160, 2, False, "decord"), ("4K H.264", 3840, 2160, 2, False, "pyav"),
         ("4K HEVC HLG", 3840, 2160, 2, True, "pyav")]
QUICK_LARGE = [("H.264", 320, 180, 1, False, "decord"), ("HEVC HLG", 320, 180, 1, True, "pyav")]


def clip_preparer():
    """A FramePreparer with the image processor of openai/clip-vit-base-patch32 (the default
    embedding model): CLIP's defaults are that checkpoint's settings."""
    from transformers import CLIPImageProcessorPil

    from workers.preparation import FramePreparer

    return FramePreparer(CLIPImageProcessorPil(), "embed")


def preparation_rows(sizes: list[tuple[int, int, int]], repeats: int) -> list[list[object]]:
    """Part 1: milliseconds to prepare FRAMES decoded frames each way, and the pixel differences."""
    from workers.preparation import ResizePlan

    preparer, rows = clip_preparer(), []
    for width, height, seconds in sizes:
        frames = sample_vidlens(clip(seconds, width, height), FRAMES)
        preparer.prepare(frames)  # learns the plan for this size
        plan = preparer.plans[(height, width)]
        ways = {"processor": lambda: preparer.with_processor(frames)}
        for way in ("pil", "torch"):
            if way in preparer._ways:
                direct = ResizePlan(way, plan.resized, plan.crop, plan.resample)
                ways[way] = functools.partial(direct.apply, frames)
        medians = interleaved_medians(ways, repeats)
        reference = preparer.with_processor(frames).astype(np.int16)
        for way, seconds_taken in medians.items():
            diff = np.abs(ways[way]().astype(np.int16) - reference)
            rows.append([f"{width}x{height}", way, seconds_taken * 1e3, medians["processor"] / seconds_taken,
                         int(diff.max()), f"{100 * (diff > 0).mean():.3f}%",
                         "yes" if way == (plan.way if plan else "processor") else ""])
    return rows


def _read_fresh(path, meta, segments, sampling):
    """The sample stage's read before the kept source: the video opened again."""
    from workers.kept_source import KeptSource
    from workers.frame_reading import read_frames

    KeptSource.drop()
    return read_frames(path, meta, segments, sampling)


def _earlier_sample(task, config, read, prepare) -> None:
    """The sample stage as it ran before: frames read in the child, prepared out of it."""
    from workers.guard import run_guarded
    from workers.frame_selection import segment_of
    from workers.thumbnails import make_thumbnails

    meta, output = task.meta, config.output
    frames, times, indices, _ = run_guarded(
        functools.partial(read, task.ref.uri, meta, task.segments, config.sampling),
        config.resources.decode_timeout_s, task.ref.uri)
    segment_index = segment_of(indices, task.segments)
    make_thumbnails(frames, indices, times[:len(indices)], segment_index, task.segments,
                    output.thumbnail_width, output.thumbnail_quality, output.thumbnails_per_video)
    prepare(frames)


def decode_side_rows(sizes: list[tuple[int, int, int]], repeats: int) -> list[list[object]]:
    """Part 2: milliseconds of one clip's decode side under each data flow."""
    from schemas.config import RunConfig
    from workers.frame_reading import read_frames
    from workers.sampling import DecodeStage, SampleStage
    from workers.task import VideoRef, VideoTask

    config = RunConfig.from_dict({"stages": ["embed"]})
    preparer = clip_preparer()
    sample = SampleStage(config, preparers={"embed": preparer})
    decode = DecodeStage(config)

    def flow(path: Path, name: str):
        def run() -> None:
            task = VideoTask(ref=VideoRef(str(path), path.stat().st_size, None, None, path.stem))
            decode.run([task])
            if name == "now":
                sample.run([task])
            else:
                read = _read_fresh if name in ("earlier", "+ direct ways") else read_frames  # takes the kept source
                prepare = preparer.with_processor if name == "earlier" else preparer.prepare
                _earlier_sample(task, config, read, prepare)
            if task.errors:
                raise AssertionError(task.errors)
        return run

    names = ["earlier", "+ direct ways", "+ one open", "now"]
    rows = []
    for width, height, seconds in sizes:
        path = clip(seconds, width, height)
        medians = interleaved_medians({name: flow(path, name) for name in names}, repeats)
        for name in names:
            rows.append([f"{width}x{height}, {seconds} s", name, medians[name] * 1e3,
                         medians["earlier"] / medians[name]])
    return rows


def _sample_at(side: int, *args):
    """The sample stage's work in its decode child, with frames decoded no larger than `side`
    (0: full size)."""
    from workers import sampling

    sampling.FRAME_SIDE = side
    return sampling.sample_video(*args)


def large_frame_rows(clips: list[tuple], repeats: int, quick: bool) -> list[list[object]]:
    """Part 3: milliseconds of one large clip's decode side, frames at full size and scaled."""
    from schemas.config import RunConfig
    from workers.guard import run_guarded
    from workers.sampling import FRAME_SIDE, DecodeStage
    from workers.task import VideoRef, VideoTask

    preparer, rows = clip_preparer(), []
    side = 160 if quick else FRAME_SIDE
    for name, width, height, seconds, hlg, decoder in clips:
        path = clip(seconds, width, height, gop=50, hlg=hlg)
        config = RunConfig.from_dict({"stages": ["embed"], "resources": {"decoder": decoder}})

        def flow(frame_side: int, path=path, config=config, hlg=hlg):
            def run() -> None:
                task = VideoTask(ref=VideoRef(str(path), path.stat().st_size, None, None, path.stem))
                DecodeStage(config).run([task])
                if task.errors or task.meta.transfer != ("hlg" if hlg else ""):
                    raise AssertionError(task.errors or f"{path} read as transfer {task.meta.transfer!r}")
                run_guarded(functools.partial(_sample_at, frame_side, str(path), task.meta, task.segments, config,
                                              {"embed": preparer}),
                            config.resources.decode_timeout_s, str(path))
            return run

        medians = interleaved_medians({"full size": flow(0), f"at most {side}": flow(side)}, repeats)
        for variant, taken in medians.items():
            rows.append([f"{name} {width}x{height}, {seconds} s", decoder, variant, taken * 1e3,
                         medians["full size"] / taken])
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run both parts, print the tables and append them to docs/benchmarks.md."""
    parser = arguments(__doc__, "tiny clips, one round: a plumbing check", repeats=9)
    args = parser.parse_args(argv)
    sizes, repeats = (QUICK_SIZES, 1) if args.quick else (SIZES, args.repeats)

    import torch

    torch.set_num_threads(1)  # as a decode task runs it: one thread per CPU it reserves
    report = Report("Preparing frames and the decode side of a video", args.quick, args.doc)
    report.add_table(
        ["frames", "way", "ms for 9 frames", "processor / way", "max diff (levels)", "values differing",
         "chosen"],
        preparation_rows(sizes, repeats),
        caption=f"Part 1: preparing {FRAMES} decoded frames for CLIP (224, bicubic, centre crop) on one "
                f"thread; medians of {repeats} interleaved rounds; {platform.machine()}. 'chosen' is the "
                "way the preparer learnt for that size.",
    )
    report.add_table(
        ["clip", "data flow", "ms per clip", "earlier / flow"],
        decode_side_rows(sizes, repeats),
        caption=f"Part 2: one clip's decode side (decode stage, then sample stage: 8 uniform frames + "
                f"the keyframe, thumbnails on, shots off, decode child as configured by default), "
                f"median of {repeats} interleaved rounds, each change added in turn (see the module's text).",
    )
    report.add_table(
        ["clip", "decoder", "frames", "ms per clip", "full size / variant"],
        large_frame_rows(QUICK_LARGE if args.quick else LARGE, repeats, args.quick),
        caption=f"Part 3: a large clip's decode side as in part 2 ('now'; keyframe every 50 frames), the "
                f"sampled frames decoded at full size against scaled as they are converted; median of "
                f"{repeats} interleaved rounds.",
    )
    report.publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
