"""`vidlens doctor`: check an installation offline, end to end, with tiny random models.

It checks each piece a run needs (decoders, Ray, GPU visibility, model loading), then runs
the whole pipeline on a few synthetic clips with tiny models built on the spot, and checks
the tables it wrote. Nothing is downloaded, so it passes on a machine with no network.
"""

from __future__ import annotations

import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.output_checks import check_folder_path, make_folder
from schemas.config import RunConfig

_OK, _WARN, _FAIL = "ok", "warn", "FAIL"


def run_doctor(config_path: str | None = None, keep: str | None = None, executor: str = "ray") -> int:
    """Run every check, print a line each; returns 0 when nothing failed, 1 otherwise."""
    # a configuration that does not load is said now, not after the checks
    configured = RunConfig.from_file(config_path) if config_path else None
    if configured is not None:
        from pipeline.plan import PlanError, build_plan

        try:
            build_plan(configured, gpus_visible=0)  # resources.per_stage, checked as a run checks it
        except PlanError as exc:
            raise PlanError(f"--config {config_path}: {exc}") from None
    if keep:
        check_folder_path(keep, f"--keep {keep!r}", bucket_ok=False, made_by="vidlens doctor")
    with tempfile.TemporaryDirectory(prefix="vidlens-doctor-") as scratch:
        root = make_folder(keep or scratch, f"--keep {keep!r}")
        checks: list[tuple[str, Callable[[], str]]] = [
            ("decoders", lambda: _check_decoders(root)),
            ("gpu", _check_gpu),
            ("shot model", _check_shot_model),
            ("ocr engine", _check_ocr),
            ("tiny models", lambda: _check_tiny_models(root)),
            ("ray", lambda: _check_ray(executor)),
            ("pipeline", lambda: _check_pipeline(root, executor)),
        ]
        if configured is not None:
            checks.append(("configured models", lambda: _check_configured_models(configured)))
        failed = warned = 0
        for name, check in checks:
            status, detail = _attempt(check)
            failed += status == _FAIL
            warned += status == _WARN
            print(f"[{status:>4}] {name:<18} {detail}", flush=True)
        if failed:
            print(f"doctor: {failed} check(s) failed")
        else:
            print("doctor: all checks passed" + (f", {warned} with a warning" if warned else ""))
        return 0 if not failed else 1


def _attempt(check: Callable[[], str]) -> tuple[str, str]:
    try:
        detail = check()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then the next check runs
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return _FAIL, f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:{last.lineno})"
    if detail.startswith("warning:"):
        return _WARN, detail[len("warning:"):].strip()
    return _OK, detail


def _check_decoders(root: Path) -> str:
    from workers.decode import DecordSource, PyAVSource
    from workers.synthetic import index_level, indexed_frames, write_video

    clip = write_video(root / "order.mp4", indexed_frames(30), fps=25)
    wanted = [3, 17, 29]
    for source_cls in (DecordSource, PyAVSource):
        source = source_cls(str(clip))
        try:
            frames = source.get_frames(wanted)
        finally:
            source.close()
        levels = [int(f[:, : f.shape[1] // 2, 0].mean()) for f in frames]
        expected = [index_level(i, 30) for i in wanted]
        if any(abs(a - b) > 6 for a, b in zip(levels, expected)) or frames[0][:, -1, 2].mean() < 200:
            raise RuntimeError(f"{source_cls.__name__} returned wrong frames: levels {levels}, expected {expected}")
    return "decord and PyAV read frames in order, as RGB"


def _check_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "warning: no CUDA device visible; models run on the CPU (fine, slower)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    from workers.models import cuda_computes_bf16

    bf16 = [cuda_computes_bf16(torch.device("cuda", i)) for i in range(len(names))]
    said = "yes" if all(bf16) else "no (fp16 used)" if not any(bf16) else "on " + ", ".join(
        str(i) for i, native in enumerate(bf16) if native) + " (fp16 on the others)"
    return f"{len(names)} CUDA device(s): {', '.join(names)}; bf16 {said}"


def _check_shot_model() -> str:
    import numpy as np

    from workers.shots import ShotDetector
    from workers.models import resolve_device

    detector = ShotDetector(resolve_device("auto"))
    predictions = detector.predict(np.zeros((60, 27, 48, 3), dtype=np.uint8))
    return f"TransNetV2 weights loaded, {len(predictions)} predictions for 60 frames"


def _check_ocr() -> str:
    from workers.ocr import OcrStage

    OcrStage(RunConfig(stages=("ocr",)))
    return "RapidOCR models loaded"


def _tiny_config(root: Path, executor: str) -> RunConfig:
    from workers.models import quiet_weight_bars
    from workers.tiny_captions import build_tiny_git
    from workers.tiny_models import build_tiny_clip

    quiet_weight_bars()  # saving the tiny models would print transformers' progress bars
    embed = root / "tiny-clip"
    captions = root / "tiny-git"
    if not (embed / "config.json").exists():
        build_tiny_clip(embed)
    if not (captions / "config.json").exists():
        build_tiny_git(captions)
    return RunConfig.from_dict({
        "models": {"embed": str(embed), "captions": str(captions)},
        "match": {"queries": ["a red scene", "white text"]},
        "captions": {"max_new_tokens": 5},
        "resources": {"executor": executor, "videos_per_batch": 2},
    })


def _check_tiny_models(root: Path) -> str:
    from workers.captions import Captioner
    from workers.embedding import VideoTextModel

    config = _tiny_config(root, "local")
    embed = VideoTextModel(config.models)
    Captioner(config.models, config.captions)
    return f"tiny CLIP ({embed.dim}-d) and GIT loaded through from_pretrained on {embed.device}"


def _check_ray(executor: str) -> str:
    if executor != "ray":
        return "warning: skipped (--executor local)"
    import ray

    from pipeline.ray_cluster import ensure_ray

    ensure_ray(None)
    resources = ray.cluster_resources()
    return f"Ray {ray.__version__} up: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"


def _check_pipeline(root: Path, executor: str) -> str:
    from pipeline import results
    from pipeline.job import run_job
    from schemas.tables import TABLES
    from workers.synthetic import make_demo_clips

    clips = make_demo_clips(root / "clips", count=3)
    out = root / "out"
    # full: a kept doctor folder from an earlier check must not make this run skip everything
    summary = run_job(str(root / "clips"), str(out), _tiny_config(root, executor), progress=False, full=True)
    if summary.counts["videos_ok"] != len(clips):
        raise RuntimeError(f"expected {len(clips)} videos processed, got: {summary.render()}")
    # the latest views: a kept folder's earlier checks left their rows too (6 shots in cuts.mp4)
    with results.open(str(out)) as r:
        tables: dict[str, Any] = {t: r.df(t) for t in TABLES}
    cuts = tables["segments"][tables["segments"].video_id.isin(
        tables["videos"][tables["videos"].uri.str.endswith("cuts.mp4")].video_id)]
    if len(cuts) != 3:
        raise RuntimeError(f"expected 3 shots in cuts.mp4, found {len(cuts)}")
    texts = " ".join(tables["texts"].text).upper()
    if "VIDLENS" not in texts.replace(" ", ""):
        raise RuntimeError(f"OCR did not read 'VIDLENS' in text.mp4 (read: {texts!r})")
    counts = ", ".join(f"{t} {len(tables[t])}" for t in TABLES)
    return f"{len(clips)} synthetic clips in {summary.wall_seconds:.1f} s; rows: {counts}"


def _check_configured_models(config: RunConfig) -> str:
    """The models `config` names load, as `vidlens run` loads them: a run with that
    configuration stops (exit 2) where this check fails."""
    import numpy as np

    from pipeline.preflight import preflight
    from workers.captions import Captioner
    from workers.embedding import VideoTextModel

    records, _ = preflight(config)
    if config.enabled("match"):
        config.all_queries()  # a match.queries_file that is not there stops the run before any video
    # and their weights, as the workers load them (preflight reads each model's config and
    # processor only: a folder without its weights file passed, and every run with it stopped).
    # On this machine's CPU: the doctor may run where the workers' GPUs are not (a head node)
    on_cpu = config.with_overrides({"models.device": "cpu"})
    roles = {record["role"] for record in records}
    # and one forward pass each, through models.compile and models.quantize as configured: a
    # compile without a C++ compiler passed here, then failed every video at its first batch
    frames = np.zeros((1, 224, 224, 3), dtype=np.uint8)
    if "embed" in roles:
        model = VideoTextModel(on_cpu.models)
        _forward(config, "embed", lambda: (model.embed_frames(model.preparer.prepare(frames)),
                                           model.embed_texts(["a test"])))
    if "captions" in roles:
        captioner = Captioner(on_cpu.models, on_cpu.captions)
        _forward(config, "captions", lambda: captioner.caption([captioner.preparer.prepare(frames)]))
    compiled = " and compiled" if config.models.compile else ""
    return "; ".join(f"{r['role']}: {r['model_id']}" for r in records) + f" (weights loaded{compiled}, one forward pass)"


def _forward(config: RunConfig, role: str, work: Callable[[], Any]) -> None:
    """Run `work`, one forward pass of the `role` model; a compiled one that fails says what to do."""
    try:
        work()
    except Exception as exc:
        if not config.models.compile:
            raise
        raise RuntimeError(f"the {role} model's forward pass failed with models.compile: true (every video would "
                           f"fail): {str(exc).splitlines()[0]}; install a C++ compiler (g++) on the workers, or "
                           "set models.compile: false") from exc
