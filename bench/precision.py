"""The models' precision on a CPU: float32 against bfloat16 and int8 dynamic quantisation.

    python -m bench.precision                # 64 clips, full-size CLIP ViT-B/32 (random weights);
                                             # TransNetV2 (its real weights) on 16
    python -m bench.precision --captions 8   # also GIT-base captions on 8 clips
    python -m bench.precision --quick        # 4 tiny clips, tiny models: a plumbing check

The clips are decoded and sampled once (1 uniform frame and the keyframe, as benchmark 2);
then each precision's embed stage (`models.dtype`, `models.quantize`) runs on the same
decoded videos, batch by batch on a thread of its own as in a run, the variants interleaved. Besides the speed
against float32 it reports how far each precision's results are from float32's: the cosine
of each video's embedding to float32's, and how often the top object and scene label of a
video is the same. With random weights the labels' scores are near ties, so that last
figure is a pessimistic one: trained weights separate labels by far more than bf16 rounding.
TransNetV2 ships its trained weights, so its figures (cut probabilities against float32's,
and whether each clip is cut at the same frames) are the real ones.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np

from bench.clips import clip_folder
from bench.common import CACHE, Report, arguments, interleaved_medians, on_thread
from bench.pipeline import bench_config
from schemas.config import RunConfig

#: (models.dtype, models.quantize) of each variant; float32 is the baseline.
PRECISIONS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("float32", "int8")}


def precision_config(embed: str, captions: str, stages: tuple[str, ...], precision: str) -> RunConfig:
    """Benchmark 2's settings (1 uniform frame, 6 for captions; 32 videos a batch) on the CPU at `precision`."""
    dtype, quantize = PRECISIONS[precision]
    config = bench_config(embed, captions, stages, 6 if "captions" in stages else 1, "local", 32)
    return config.with_overrides({"models.device": "cpu", "models.dtype": dtype, "models.quantize": quantize})


def decoded(config: RunConfig, source: Path, count: int) -> list:
    """The first `count` videos of `source` through the plan's CPU stages before its first model stage
    (in the local executor's pool): ready for that model stage."""
    from pipeline.cpu_pool import CpuPool, decode_workers
    from pipeline.local import split_plan
    from pipeline.plan import build_plan
    from pipeline.sources import list_videos
    from workers.task import VideoTask

    groups, segments = split_plan(build_plan(config))
    pool = CpuPool(config, groups, decode_workers(config.resources.decode_concurrency))
    try:
        tasks = [VideoTask(ref=ref) for ref in list(list_videos(str(source)))[:count]]
        for segment in segments:
            if segment.cpu is None:
                break
            tasks = [future.result() for future in [pool.submit(segment.cpu, task) for task in tasks]]
    finally:
        pool.close()
    return tasks


def stage_variants(stage_class, configs: dict[str, RunConfig], tasks: list, batch: int) -> tuple[dict, dict]:
    """Each precision's stage over copies of `tasks`, batch by batch on a thread of its own, as the local
    executor runs a model stage (`bench.common.on_thread`): (callables to time, their last outputs)."""
    outputs: dict[str, list] = {}

    def run(stage, name: str) -> None:
        copies = copy.deepcopy(tasks)
        for first in range(0, len(copies), batch):
            stage.process(copies[first : first + batch])
        outputs[name] = copies

    variants = {}
    for name, config in configs.items():
        stage = stage_class(config)
        on_thread(lambda stage=stage: stage.process(copy.deepcopy(tasks[:2])))  # one-off costs (oneDNN's kernels)
        variants[name] = functools.partial(on_thread, functools.partial(run, stage, name))
    return variants, outputs


def embed_rows(outputs: dict[str, list], seconds: dict[str, float]) -> list[list[object]]:
    """A row per precision: seconds, speed against float32, embeddings and top labels against float32's."""
    base = outputs["float32"]
    reference = np.stack([task.video_embedding for task in base])
    rows = []
    for name, tasks in outputs.items():
        cosine = (np.stack([task.video_embedding for task in tasks]) * reference).sum(axis=1)
        same = np.mean([_top_labels(task) == _top_labels(ref) for task, ref in zip(tasks, base)])
        rows.append([name, seconds[name], seconds["float32"] / seconds[name],
                     f"{cosine.min():.5f} / {cosine.mean():.5f}", f"{same:.2f}"])
    return rows


def _top_labels(task) -> list[tuple[str, str]]:
    return sorted((label.kind, label.label) for label in task.labels if label.level == "video" and label.rank == 1)


def caption_rows(embed: str, captions: str, source: Path, count: int, repeats: int) -> list[list[object]]:
    """The caption stage in float32 and bfloat16 on the same `count` decoded clips."""
    from workers.captions import CaptionStage

    configs = {name: precision_config(embed, captions, ("captions",), name) for name in ("float32", "bfloat16")}
    tasks = decoded(configs["float32"], source, count)
    variants, _ = stage_variants(CaptionStage, configs, tasks, count)
    seconds = interleaved_medians(variants, repeats)
    return [[name, spent, seconds["float32"] / spent] for name, spent in seconds.items()]


def shot_rows(embed: str, source: Path, count: int, repeats: int) -> list[list[object]]:
    """TransNetV2 in float32 and bfloat16 on the shot frames of `count` clips."""
    import torch

    from workers.shots import ShotDetector

    tasks = decoded(precision_config(embed, embed, ("shots",), "float32"), source, count)
    frames = [task.shot_frames for task in tasks]
    detectors = {name: ShotDetector("cpu", dtype=getattr(torch, name)) for name in ("float32", "bfloat16")}
    outputs: dict[str, list] = {}

    def run(name: str) -> None:
        outputs[name] = detectors[name].predict_many(frames)

    for detector in detectors.values():
        on_thread(functools.partial(detector.predict, frames[0]))  # one-off costs
    # on a thread of its own, as the local executor runs the shot stage
    seconds = interleaved_medians({name: functools.partial(on_thread, functools.partial(run, name))
                                   for name in detectors}, repeats)
    rows = []
    for name, predictions in outputs.items():
        pairs = list(zip(predictions, outputs["float32"], tasks))
        difference = max(float(np.abs(ours - base).max()) for ours, base, _ in pairs)
        same = np.mean([_cuts(ours, task.meta.fps) == _cuts(base, task.meta.fps) for ours, base, task in pairs])
        rows.append([name, seconds[name], seconds["float32"] / seconds[name], f"{difference:.4f}", f"{same:.2f}"])
    return rows


def _cuts(probabilities: np.ndarray, fps: float) -> list[int]:
    from workers.shots import segments_from_predictions

    return [segment.start_frame for segment in segments_from_predictions(probabilities, fps)]


def _auto_dtype() -> str:
    import torch

    from schemas.config import ModelsConfig
    from workers.models import dtype_name, resolve_dtype

    return dtype_name(resolve_dtype(ModelsConfig(device="cpu"), torch.device("cpu")))


def main(argv: list[str] | None = None) -> int:
    """Time each precision, print the tables and append them to docs/benchmarks.md."""
    parser = arguments(__doc__, "4 tiny clips and tiny models: a plumbing check",
                       repeats=3, rounds="interleaved rounds")
    parser.add_argument("--clips", type=int, default=64, help="clips embedded by each precision (default 64)")
    parser.add_argument("--captions", type=int, default=0, metavar="N",
                        help="also time GIT-base captions in float32 and bfloat16 on N clips")
    parser.add_argument("--shots", type=int, default=16, metavar="N",
                        help="clips whose shots TransNetV2 finds in float32 and bfloat16 (default 16; 0: none)")
    args = parser.parse_args(argv)
    from workers.embed import EmbedStage
    from workers.models import cpu_computes_bf16

    if args.quick:
        from workers.tiny_captions import build_tiny_git
        from workers.tiny_models import build_tiny_clip

        embed = str(build_tiny_clip(CACHE / "models" / "tiny-clip"))
        captions = str(build_tiny_git(CACHE / "models" / "tiny-git"))
        source, count, repeats = clip_folder("pipeline-quick", 4, (1, 2), 96, 64, distinct=2), 4, 1
        caption_count, shot_count = (2 if args.captions else 0), min(args.shots, 2)
        what = "4 clips of 1-2 s at 96x64, tiny random CLIP"
    else:
        from bench.models import fullsize_clip, fullsize_git

        embed, captions = str(fullsize_clip()), str(fullsize_git()) if args.captions else ""
        source, count, repeats = clip_folder("pipeline", 200, (2, 4), 320, 240), args.clips, args.repeats
        caption_count, shot_count = args.captions, args.shots
        what = (f"{count} of benchmark 2's clips (2-4 s at 320x240), CLIP ViT-B/32 at full size with random "
                "weights")
    report = Report("Precision on the CPU: float32, bfloat16, int8", args.quick, args.doc)
    native = "native (AVX512-BF16 or AMX)" if cpu_computes_bf16() else "emulated (no bf16 instructions)"
    configs = {name: precision_config(embed, captions or embed, ("embed", "objects", "scenes"), name)
               for name in PRECISIONS}
    tasks = decoded(configs["float32"], source, count)
    variants, outputs = stage_variants(EmbedStage, configs, tasks, 32)
    seconds = interleaved_medians(variants, repeats)
    report.add_table(
        ["precision", "seconds (median)", "float32 / this", "video embedding cosine to float32 (min / mean)",
         "top object and scene labels as float32's"],
        embed_rows(outputs, seconds),
        f"Embed stage (objects, scenes) on {what}: {sum(len(t.frames.frame_index) for t in tasks)} frames, "
        f"32 videos a batch, median of {repeats} interleaved rounds; bf16 on this CPU is {native}; "
        f"`models.dtype: auto` gives {_auto_dtype()} here.",
    )
    if shot_count:
        report.add_table(["precision", "seconds (median)", "float32 / this", "largest cut probability difference",
                          "clips cut at the same frames"],
                         shot_rows(embed, source, shot_count, repeats),
                         f"Shots: TransNetV2 with its trained weights on every frame (48x27) of {shot_count} clips, "
                         f"median of {repeats} interleaved rounds (`workers.shots.shot_dtype`: the models' "
                         "precision on a CPU).")
    if caption_count:
        report.add_table(["precision", "seconds (median)", "float32 / this"],
                         caption_rows(embed, captions, source, caption_count, repeats),
                         f"Captions: GIT-base (6 frames) {'tiny' if args.quick else 'at full size'}, random weights, "
                         f"{caption_count} clips, one `generate` for all, median of {repeats} interleaved rounds.")
    report.publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
