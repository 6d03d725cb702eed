"""Shot detection on a CPU: TransNetV2 as upstream ships it against the product's fast path.

    python -m bench.shots                # every frame (48x27) of the real clips in ../shared/videos
    python -m bench.shots --repeats 5    # more interleaved rounds (default 3)
    python -m bench.shots --quick        # the first 150 frames of one clip, one round: a plumbing check

The clips are decoded once, as the decode stage decodes them for shot detection
(`workers.sampling.read_video`). Then, in float32 and in bfloat16 (autocast, what
`models.dtype: auto` gives on a CPU with bf16 instructions), each variant runs
`ShotDetector.predict_many` over all of them, on a thread of its own as the local executor
runs the shot stage, the variants interleaved: the upstream model (`cpu_fast_path=False`) and
the fast path (`workers.shots.faster_on_cpu`), each with 8 windows of 100 frames a forward
pass (the default before 2026-12-07) and with `CPU_BATCH_WINDOWS`. Speeds are against the
upstream model with 8 windows at the same precision, and against float32's; the differences
are against that baseline's probabilities, and the cuts are `segments_from_predictions`' at 0.5.
"""

from __future__ import annotations

import functools

import numpy as np

from bench.common import SHARED_VIDEOS, Report, arguments, interleaved_medians, on_thread

#: (name, fast path, windows a forward pass) of each variant; the first is the baseline.
VARIANTS = (("upstream model, 8 windows a pass", False, 8), ("upstream model, 1 window a pass", False, 1),
            ("fast path, 8 windows a pass", True, 8), ("fast path, 1 window a pass", True, 1))
#: float32, and bf16 under autocast: what `models.dtype: auto` gives on a CPU with bf16 instructions.
PRECISIONS = ("float32", "bfloat16")


def shot_frames(quick: bool) -> dict[str, tuple[np.ndarray, float]]:
    """(frames at 48x27, fps) of each real clip, as the decode stage reads them; `quick`: one short."""
    from workers.sampling import read_video

    clips = sorted(path for path in SHARED_VIDEOS.glob("*") if path.suffix in (".mp4", ".avi"))
    if not clips:
        raise SystemExit(f"no real clips in {SHARED_VIDEOS} (set VIDLENS_SHARED_VIDEOS to their folder)")
    decoded = {}
    for path in clips[:1] if quick else clips:
        meta, frames = read_video(str(path), shots=True, max_frames=1_000_000)
        decoded[path.name] = (frames[:150] if quick else frames, meta.fps)
    return decoded


def cuts(probabilities: np.ndarray, fps: float) -> list[int]:
    """The first frame of every shot after the first."""
    from workers.shots import segments_from_predictions

    return [segment.start_frame for segment in segments_from_predictions(probabilities, fps)[1:]]


def variant_rows(clips: dict[str, tuple[np.ndarray, float]], repeats: int) -> list[list[object]]:
    """A row per variant and precision, all of them interleaved in the same rounds."""
    import torch

    from workers.shots import ShotDetector

    videos = [frames for frames, _ in clips.values()]
    detectors = {(dtype, name): ShotDetector("cpu", dtype=getattr(torch, dtype), cpu_fast_path=fast,
                                             batch_windows=windows)
                 for dtype in PRECISIONS for name, fast, windows in VARIANTS}
    outputs: dict[tuple[str, str], list[np.ndarray]] = {}

    def run(key: tuple[str, str]) -> None:
        outputs[key] = detectors[key].predict_many(videos)

    for detector in detectors.values():
        on_thread(functools.partial(detector.predict, videos[0][:100]))  # one-off costs (oneDNN's kernels)
    seconds = interleaved_medians({key: functools.partial(on_thread, functools.partial(run, key))
                                   for key in detectors}, repeats)
    frames = sum(len(video) for video in videos)
    float32 = seconds["float32", VARIANTS[0][0]]
    rows = []
    for (dtype, name), predictions in outputs.items():
        baseline = (dtype, VARIANTS[0][0])
        difference = max(float(np.abs(ours - base).max()) for ours, base in zip(predictions, outputs[baseline]))
        found = {clip: cuts(ours, fps) for (clip, (_, fps)), ours in zip(clips.items(), predictions)}
        same = sum(found[clip] == cuts(base, fps) for (clip, (_, fps)), base in zip(clips.items(), outputs[baseline]))
        spent = seconds[dtype, name]
        rows.append([dtype, name, spent, frames / spent, seconds[baseline] / spent, float32 / spent,
                     f"{difference:.2g}", f"{same}/{len(clips)}", _named_cuts(found)])
    return rows


def _named_cuts(found: dict[str, list[int]]) -> str:
    return "; ".join(f"{clip.split('.')[0]} {found[clip]}" for clip in found if found[clip]) or "none"


def main(argv: list[str] | None = None) -> int:
    """Time each variant at each precision, print the table and append it to docs/benchmarks.md."""
    parser = arguments(__doc__, "the first 150 frames of one real clip, one round: a plumbing check",
                       repeats=3, rounds="interleaved rounds")
    args = parser.parse_args(argv)
    from workers.models import cpu_computes_bf16
    from workers.shots import CPU_BATCH_WINDOWS

    repeats = 1 if args.quick else args.repeats
    clips = shot_frames(args.quick)
    report = Report("Shot detection on the CPU: upstream TransNetV2 against the fast path", args.quick, args.doc)
    rows = variant_rows(clips, repeats)
    frames = sum(len(frames) for frames, _ in clips.values())
    native = "native (AVX512-BF16 or AMX)" if cpu_computes_bf16() else "emulated (no bf16 instructions)"
    report.add_table(
        ["precision", "variant", "seconds (median)", "frames/s", "speed vs upstream, 8 windows, same precision",
         "speed vs upstream float32, 8 windows", "largest probability difference from that baseline",
         "clips cut at the same frames", "cuts (first frame of each shot after the first)"],
        rows,
        f"TransNetV2 with its trained weights on every frame (48x27) of {len(clips)} real clip(s), {frames} frames, "
        f"`ShotDetector.predict_many` over all at once on a thread of its own, median of {repeats} interleaved "
        f"rounds (all eight variants in each); bf16 on this CPU is {native}. The product's CPU default: the fast path, "
        f"{CPU_BATCH_WINDOWS} window(s) a pass.",
    )
    report.publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
