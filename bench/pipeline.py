"""Benchmarks 2 and 3: the pipeline against its ceilings, and against a naive sequential loop.

    python -m bench.pipeline                  # 200 clips, full-size CLIP ViT-B/32 (random weights)
    python -m bench.pipeline --stages shots,embed,objects,scenes   # with TransNetV2 shot detection
    python -m bench.pipeline --captions 4     # also GIT-base captions on 4 clips
    python -m bench.pipeline --repeats 2      # each end-to-end run twice, the means reported
    python -m bench.pipeline --quick          # 4 tiny clips, tiny models: a plumbing check

On the same clips, in one process, one after the other:
- decode ceiling: the decode and sample stages alone (probe, 48x27 thumbnails for shots,
  the sampled frames resized for the model), in the local executor's pool of workers;
- model ceiling: the model stages (shots, embed, ...) alone on those already decoded frames;
- `vidlens run` end to end with the Ray executor and with the local executor;
- the naive loop (`bench.naive`): decord + the same models, video after video.
The ceiling's model stages and the naive loop run on a thread of their own, as the local
executor runs each model stage (`bench.common.on_thread`: torch's speed depends on the thread).
Ceilings exclude model loading; the runs include it (Ray start-up too: each run starts its own
instance, as each `vidlens run` does), so they are also reported from their first finished
video on ("steady"). Neither includes starting Python and importing torch, transformers and
pandas, which this process has done before, and a `vidlens run` from the shell pays too. (pandas:
pyarrow imports it in a run's first conversion of rows to a table, 1.2 s on 2 cores; until
2026-12-06 it was imported with the naive loop, after the first round of runs, so each series'
first run paid for it and the loop never did.) Each run encodes the label
vocabularies, as the naive loop does (`models.text_cache: off`): the ceiling pass before it
would otherwise have left them on disk, and the naive loop alone would pay for them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import naive  # (and pandas, which pyarrow imports in a run's first conversion: see the text above)
from bench.clips import clip_folder, real_folder
from bench.common import CACHE, GpuUtilisation, Report, arguments, on_thread, verdict
from bench.runs import timed_run
from schemas.config import RunConfig

#: TransNetV2 reads every frame and dominates the CPU cost: add "shots," with --stages to include it.
DEFAULT_STAGES = "embed,objects,scenes"


#: where the models run: "auto" is CUDA when visible (bf16), else CPU (fp32); set by --device.
DEVICE = {"name": "auto"}


def bench_config(embed: str, captions: str, stages: tuple[str, ...], num_frames: int, executor: str,
                 videos_per_batch: int, frames_per_batch: int = 64, decoder: str = "decord",
                 text_cache: str = "auto") -> RunConfig:
    """The configuration every variant shares (`text_cache`: `models.text_cache`)."""
    return RunConfig.from_dict({
        "stages": list(stages),
        "models": {"embed": embed, "captions": captions, "device": DEVICE["name"], "text_cache": text_cache},
        "sampling": {"mode": "uniform", "num_frames": num_frames},
        "resources": {"executor": executor, "videos_per_batch": videos_per_batch,
                      "frames_per_batch": frames_per_batch, "decoder": decoder},
    })


def stage_ceilings(config: RunConfig, source: Path, chunk: int = 128) -> dict[str, float]:
    """Seconds the CPU stages (decode, sample) and the model stages (shots, embed, captions) take alone.

    The CPU stages run in the local executor's pool of worker processes (one per core unless
    `resources.decode_concurrency`), `chunk` videos at a time, so the decode ceiling is what
    this machine's cores can decode; the model stages then run on the same videos, batch by
    batch, each on a thread of its own, as in a run. Nothing overlaps: each side is timed alone.
    """
    from pipeline.cpu_pool import CpuPool, decode_workers
    from pipeline.local import split_plan
    from pipeline.plan import build_plan
    from pipeline.sources import list_videos
    from workers.task import VideoTask

    groups, segments = split_plan(build_plan(config))
    pool = CpuPool(config, groups, decode_workers(config.resources.decode_concurrency))  # before models
    try:
        models = {s.name: s.spec.load_class()(config) for s in segments if s.spec is not None}
        refs = list(list_videos(str(source)))
        _stage_pass(segments, models, pool, [VideoTask(ref=ref) for ref in refs[:2]], 2)  # one-off costs
        seconds = {"decode": 0.0, "model": 0.0}
        frames = failed = 0
        for first in range(0, len(refs), chunk):
            tasks = [VideoTask(ref=ref) for ref in refs[first : first + chunk]]
            for side, spent in _stage_pass(segments, models, pool, tasks, config.resources.videos_per_batch).items():
                seconds[side] += spent
            frames += sum(len(t.frames.frame_index) for t in tasks if t.frames is not None)
            failed += sum(1 for t in tasks if t.errors)
    finally:
        pool.close()
    return {**seconds, "videos": len(refs), "frames": frames, "failed": failed}


def _stage_pass(segments, models, pool, tasks, batch_size: int) -> dict[str, float]:
    """Run every segment over `tasks` (CPU ones all at once on the pool); seconds spent per side."""
    seconds = {"decode": 0.0, "model": 0.0}
    for segment in segments:
        start = time.perf_counter()
        if segment.cpu is not None:
            tasks[:] = [future.result() for future in [pool.submit(segment.cpu, task) for task in tasks]]
            seconds["decode"] += time.perf_counter() - start
        else:
            def batches(stage=models[segment.name]) -> None:
                for first in range(0, len(tasks), batch_size):
                    stage.run(tasks[first : first + batch_size])

            on_thread(batches)  # as the local executor runs a model stage
            seconds["model"] += time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Run benchmarks 2 and 3, print the tables and append them to docs/benchmarks.md."""
    parser = arguments(__doc__, "4 tiny clips and tiny models: a plumbing check")
    parser.add_argument("--clips", type=int, default=200, help="clips of 2-4 s (default 200)")
    parser.add_argument("--size", default="320x240", help="the clips' width x height (default 320x240)")
    parser.add_argument("--frames", type=int, default=1,
                        help="uniform frames per video, plus one keyframe per shot (default 1: CPU time is scarce)")
    parser.add_argument("--videos-per-batch", type=int, default=32, help="videos per model batch")
    parser.add_argument("--frames-per-batch", type=int, default=64, help="frames per forward pass (default 64)")
    parser.add_argument("--ceiling-passes", type=int, default=2, choices=(1, 2),
                        help="measure the ceilings before the runs, or before and after them (default 2)")
    parser.add_argument("--no-naive", action="store_true", help="leave out benchmark 3 (the naive loop)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="rounds of end-to-end runs (and naive loop), each followed by a ceiling pass; "
                             "their means are reported (default 1)")
    parser.add_argument("--captions", type=int, default=0, metavar="N",
                        help="also time GIT-base captions (model alone and end to end, local executor) on N clips")
    parser.add_argument("--executors", default="ray,local", help="which executors to run end to end")
    parser.add_argument("--stages", default=None,
                        help=f"stages to run (default {DEFAULT_STAGES})")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda, cuda:N")
    parser.add_argument("--real", action="store_true",
                        help="copies of the real H.264 clips in ../shared/videos instead of generated clips "
                             "(--size is then theirs)")
    parser.add_argument("--decoder", default="decord", choices=("decord", "pyav"),
                        help="resources.decoder for the ceilings and the runs (the naive loop uses decord)")
    parser.add_argument("--dump-after", type=float, default=0, metavar="S",
                        help="print every thread's stack after S seconds (a run that hangs can then be read)")
    args = parser.parse_args(argv)
    if args.dump_after > 0:
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(args.dump_after, file=sys.stderr)
    DEVICE["name"] = args.device

    if args.quick:
        from workers.tiny_captions import build_tiny_git
        from workers.tiny_models import build_tiny_clip

        embed = str(build_tiny_clip(CACHE / "models" / "tiny-clip"))
        captions = str(build_tiny_git(CACHE / "models" / "tiny-git"))
        source = clip_folder("pipeline-quick", 4, (1, 2), 96, 64, distinct=2)
        description = "4 clips of 1-2 s at 96x64, tiny random CLIP"
    else:
        from bench.models import fullsize_clip, fullsize_git

        width, height = (int(side) for side in args.size.lower().split("x"))
        with_captions = args.captions or "captions" in (args.stages or DEFAULT_STAGES).split(",")
        embed, captions = str(fullsize_clip()), str(fullsize_git()) if with_captions else ""
        if args.real:
            source = real_folder(args.clips)
            clips = f"{args.clips} copies of the real H.264 clips in ../shared/videos (B-frames, 204x360 to 576x1024)"
        else:
            source = clip_folder("pipeline" if args.size == "320x240" else f"pipeline_{args.size}", args.clips,
                                 (2, 4), width, height)
            clips = f"{args.clips} clips of 2-4 s at {width}x{height} 25 fps (H.264, keyframe every 2 s)"
        description = (f"{clips}, read with {args.decoder}, "
                       "CLIP ViT-B/32" + (" and GIT-base" if with_captions else "")
                       + " at full size with random weights")
    executors = [e for e in args.executors.split(",") if e]
    stages = tuple((args.stages or DEFAULT_STAGES).split(","))
    report = Report("Benchmarks 2 and 3: pipeline against its ceilings and a naive loop", args.quick, args.doc)
    resources = (args.videos_per_batch, args.frames_per_batch, args.decoder)
    config = bench_config(embed, captions or embed, stages, args.frames, "local", *resources)

    # ceilings are measured before the runs and after each round of them (averaged), and the
    # rounds repeated with --repeats: the machine's load drifts
    passes = [_logged("ceilings", lambda: stage_ceilings(config, source))]
    timings: dict[str, list] = {executor: [] for executor in executors}
    busy: dict[str, list] = {executor: [] for executor in executors}
    naive_times: list[float] = []
    for _ in range(args.repeats):
        for executor in executors:
            with GpuUtilisation() as gpu:
                # (label vocabularies encoded in the run, as the naive loop encodes them: see the module's text)
                timings[executor].append(_logged(f"vidlens run ({executor})", lambda: timed_run(source, bench_config(
                    embed, captions or embed, stages, args.frames, executor, *resources, text_cache="off"))))
            busy[executor].append(gpu.mean())
        if not args.no_naive:
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                _logged("naive loop", lambda: on_thread(lambda: naive.run_naive(
                    sorted(source.glob("*.mp4")), config, Path(folder) / "naive.parquet")))
                naive_times.append(time.perf_counter() - start)
        if not args.quick and args.ceiling_passes == 2:
            passes.append(_logged("ceilings again", lambda: stage_ceilings(config, source)))
    ceilings = {key: sum(p[key] for p in passes) / len(passes) for key in passes[0]}
    runs = {executor: RunSeries(series) for executor, series in timings.items()}
    gpu_busy = {executor: None if None in values else _mean(values) for executor, values in busy.items()}
    naive_s = _mean(naive_times) if naive_times else float("nan")

    videos, frames = ceilings["videos"], ceilings["frames"]
    decode_rate, model_rate = videos / ceilings["decode"], videos / ceilings["model"]
    slower = min(decode_rate, model_rate)
    serial = videos / (ceilings["decode"] + ceilings["model"])  # both on the same cores, one after the other
    rows = [
        ["decode ceiling (decode + sample stages alone)", decode_rate, decode_rate * frames / videos, "", ""],
        ["model ceiling (model stages alone, on decoded frames)", model_rate, model_rate * frames / videos, "", ""],
        ["both one after the other on the same cores", serial, serial * frames / videos, serial / slower, ""],
    ]
    spread = (lambda values: "" if len(values) < 2 else
              f" (mean of {len(values)} runs: {min(values):.3g}-{max(values):.3g})")
    for executor, run in runs.items():
        for label, rate, rates in (("whole run", run.videos_per_s, run.whole_rates),
                                   ("steady, after the first batch", run.steady_videos_per_s, run.steady_rates)):
            rows.append([f"`vidlens run` ({executor} executor), {label}{spread(rates)}", rate,
                         rate * frames / videos, rate / slower, rate / serial])
    naive_rate = videos / naive_s
    if not args.no_naive:
        rows.append([f"naive loop (bench/naive.py), whole run{spread([videos / s for s in naive_times])}", naive_rate,
                     naive_rate * frames / videos, naive_rate / slower, naive_rate / serial])
    pass_seconds = "; ".join(f"{p['decode']:.0f} s decoding, {p['model']:.0f} s in models" for p in passes)
    report.add_table(
        ["variant", "videos/s", "sampled frames/s", "/ slower ceiling", "/ serial bound"], rows,
        caption=f"{description}; stages {', '.join(stages)}; sampling uniform {args.frames} frame(s) "
                f"(+ each segment's keyframe; without shots the whole video is one segment): {frames / videos:.2f} frames/video; {args.videos_per_batch} videos per model batch, "
                f"{args.frames_per_batch} frames per forward pass; {_device_words()}; the runs and the naive loop "
                f"encode the label vocabularies (none read from disk); every variant runs its models off the main "
                f"thread, as the local executor does. Ceilings: mean of {len(passes)} pass(es) "
                f"({pass_seconds}); "
                f"{ceilings['failed']:.0f} videos failed.",
    )
    best = max(runs.values(), key=lambda r: r.videos_per_s) if runs else None
    targets = []
    if best is not None:
        best_name = next(name for name, run in runs.items() if run is best)
        steady = best.steady_videos_per_s
        targets.append([f"end to end ({best_name}, steady after the first batch) at least 0.9x the slower ceiling",
                        f"{steady / slower:.2f}x" if steady == steady else "n/a (under 3 batches)",
                        verdict(steady >= 0.9 * slower) if steady == steady else ""])
        targets.append([f"end to end ({best_name}, whole run, start-up included) at least 0.9x the slower ceiling",
                        f"{best.videos_per_s / slower:.2f}x", verdict(best.videos_per_s >= 0.9 * slower)])
        if not args.no_naive:
            targets.append([f"end to end ({best_name}, whole run) at least 1.5x the naive loop",
                            f"{best.videos_per_s / naive_rate:.2f}x", verdict(best.videos_per_s >= 1.5 * naive_rate)])
        for name, run in runs.items():
            targets.append([f"time to first result ({name})", f"{run.first_result_s:.1f} s", ""])
            targets.append([f"videos/hour ({name}, whole run)", f"{3600 * run.videos_per_s:,.0f}", ""])
            if gpu_busy[name] is not None:
                targets.append([f"GPU utilisation ({name}, mean over the run)", f"{gpu_busy[name]:.0f}%", ""])
    report.add_table(["target", "measured", "verdict"], targets)
    if args.captions:
        report.add_table(*caption_rows(embed, captions, source, args.captions, args.frames))
    report.publish()
    return 0


def caption_rows(embed: str, captions: str, source: Path, count: int, num_frames: int) -> tuple:
    """GIT captions on `count` clips: the caption stage alone against `vidlens run` (local executor)."""
    import shutil

    subset = Path(tempfile.mkdtemp(prefix="vidlens-captions-"))
    clips = sorted(source.glob("*.mp4"))[:count]  # (fewer where the folder has fewer: the rates are of these)
    count = len(clips)
    try:
        for path in clips:
            shutil.copyfile(path, subset / path.name)
        config = bench_config(embed, captions, ("captions",), max(num_frames, 6), "local", 32)
        ceilings = stage_ceilings(config, subset)
        run = timed_run(subset, config)
    finally:
        shutil.rmtree(subset, ignore_errors=True)
    model_rate, decode_rate = count / ceilings["model"], count / ceilings["decode"]
    rows = [["caption stage alone (decoded frames)", model_rate, ""],
            ["decode + sample alone", decode_rate, ""],
            ["`vidlens run` captions only (local), whole run", run.videos_per_s, run.videos_per_s / min(model_rate, decode_rate)]]
    return (["variant", "videos/s", "/ slower ceiling"], rows,
            f"Captions: {'a tiny GIT (--quick)' if 'tiny' in captions else 'GIT-base (VATEX) at full size'}, 6 frames, "
            f"random weights, {count} clips, up to 30 new tokens.")


class RunSeries:
    """The rounds of one executor's end-to-end runs, read as their means."""

    def __init__(self, series: list) -> None:
        self.series = series
        self.whole_rates = [run.videos_per_s for run in series]
        self.steady_rates = [rate for rate in (run.steady_videos_per_s for run in series) if rate == rate]

    @property
    def videos_per_s(self) -> float:
        return _mean(self.whole_rates)

    @property
    def steady_videos_per_s(self) -> float:
        return _mean(self.steady_rates) if self.steady_rates else float("nan")

    @property
    def first_result_s(self) -> float:
        return _mean([run.first_result_s for run in self.series])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _logged(what: str, run):
    """Run one variant, saying on stderr when it ends and how long it took (the runs are long)."""
    import sys

    start = time.perf_counter()
    result = run()
    print(f"[bench] {what}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result


def _device_words() -> str:
    import torch

    from schemas.config import ModelsConfig
    from workers.models import dtype_name, resolve_device, resolve_dtype

    device = resolve_device(DEVICE["name"])
    dtype = dtype_name(resolve_dtype(ModelsConfig(device=DEVICE["name"]), device))
    return f"GPU ({torch.cuda.get_device_name(device)}), {dtype}" if device.type == "cuda" else f"CPU, {dtype}"


if __name__ == "__main__":
    raise SystemExit(main())
