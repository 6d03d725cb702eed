"""Turning a finished `VideoTask` into rows of the output tables (as declared in `schemas.tables`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from schemas.config import RunConfig
from workers.task import VideoTask


@dataclass(frozen=True)
class RunIdentity:
    """What every row of one run carries."""

    run_id: str
    config_fingerprint: str
    caption_model: str


def task_rows(task: VideoTask, run: RunIdentity, config: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """Rows per table for one video; a video whose decoding failed yields only errors rows."""
    keys = {"video_id": task.ref.video_id, "run_id": run.run_id, "config_fingerprint": run.config_fingerprint}
    now = datetime.now(timezone.utc)
    rows: dict[str, list[dict[str, Any]]] = {
        "errors": [
            {**keys, "uri": task.ref.uri, "stage": e.stage, "error_type": e.error_type,
             "message": e.message, "occurred_at": now}
            for e in task.errors
        ]
    }
    meta = task.meta
    if meta is None:
        return rows
    frames = task.frames
    rows["videos"] = [{
        **keys,
        "uri": task.ref.uri,
        "size_bytes": task.ref.size_bytes,
        "mtime": storable_ns(task.ref.mtime_ns),  # (nanoseconds as they are: through a float, microseconds)
        "etag": task.ref.etag,
        "duration_s": meta.duration_s,
        "fps": meta.fps,
        "frame_count": meta.frame_count,
        "width": meta.width,
        "height": meta.height,
        "codec": meta.codec,
        "rotation": meta.rotation,
        "pixel_aspect": meta.pixel_aspect,
        "hdr": meta.transfer or None,
        "has_audio": meta.has_audio,
        "container": meta.container,
        "decoder": meta.decoder,
        "num_segments": len(task.segments),
        "num_sampled_frames": 0 if frames is None else len(frames.frame_index),
        "status": "partial" if task.errors else "ok",
        "processed_at": now,
        "embedding": _vector(task.video_embedding),
    }]
    rows["segments"] = [
        {**keys, "segment_index": s.index, "start_frame": s.start_frame, "end_frame": s.end_frame,
         "start_s": s.start_s, "end_s": s.end_s, "confidence": s.confidence, "source": s.source,
         "keyframe_index": s.keyframe_index,
         "embedding": _row_of(task.segment_embeddings, i)}
        for i, s in enumerate(task.segments)
    ]
    if frames is not None:
        keep_embeddings = config.output.frame_embeddings
        rows["frames"] = [
            {**keys, "frame_index": int(frames.frame_index[i]), "timestamp_s": float(frames.timestamp_s[i]),
             "segment_index": int(frames.segment_index[i]),
             "embedding": _row_of(task.frame_embeddings, i) if keep_embeddings else None}
            for i in range(len(frames.frame_index))
        ]
    spans = _spans(task)
    rows["labels"] = [
        {**keys, "kind": label.kind, "level": label.level, "segment_index": label.segment_index,
         **spans[label.segment_index], "label": label.label, "rank": label.rank,
         "score": label.score, "similarity": label.similarity,
         "time_ranges": [{"start_s": a, "end_s": b} for a, b in label.time_ranges]}
        for label in task.labels
        if config.enabled("objects" if label.kind == "object" else "scenes")
    ]
    rows["captions"] = [
        {**keys, "level": c.level, "segment_index": c.segment_index, "start_s": c.start_s,
         "end_s": c.end_s, "caption": c.text, "model": run.caption_model}
        for c in task.captions
    ]
    rows["matches"] = [
        {**keys, "query": m.query, "level": m.level, "segment_index": m.segment_index,
         "start_s": m.start_s, "end_s": m.end_s, "similarity": m.similarity, "probability": m.probability}
        for m in task.matches
    ]
    rows["thumbnails"] = [
        {**keys, "frame_index": t.frame_index, "timestamp_s": t.timestamp_s, "segment_index": t.segment_index,
         "keyframe": t.keyframe, "width": t.width, "height": t.height, "jpeg": t.jpeg}
        for t in (frames.thumbnails if frames is not None else [])
    ]
    rows["texts"] = [
        {**keys, "frame_index": t.frame_index, "timestamp_s": t.timestamp_s, "segment_index": t.segment_index,
         "line_index": t.line_index, "text": t.text, "confidence": t.confidence, "box": [float(v) for v in t.box]}
        for t in task.texts
    ]
    return rows


def embedding_dim_of(task: VideoTask) -> int | None:
    """The embedding size a task carries, or None when it has no embeddings."""
    for array in (task.video_embedding, task.frame_embeddings):
        if array is not None:
            return int(array.shape[-1])
    return None


def _spans(task: VideoTask) -> dict[int | None, dict[str, float]]:
    duration = task.meta.duration_s if task.meta else 0.0
    spans: dict[int | None, dict[str, float]] = {None: {"start_s": 0.0, "end_s": duration}}
    for s in task.segments:
        spans[s.index] = {"start_s": s.start_s, "end_s": s.end_s}
    return spans


def _vector(array: np.ndarray | None) -> np.ndarray | None:
    # kept as numpy: the writer builds the fixed-size list column without Python floats
    return None if array is None else np.asarray(array, dtype=np.float32)


def _row_of(array: np.ndarray | None, i: int) -> np.ndarray | None:
    if array is None or i >= len(array):
        return None
    row = np.asarray(array[i], dtype=np.float32)
    # a NaN row is a segment the embed stage had no frame for: no embedding, not a vector of NaN
    return None if np.isnan(row).all() else row


def storable_ns(ns: int | None) -> int | None:
    """A time in nanoseconds since 1970 (a file's modification time), None where a 64-bit count
    of nanoseconds (`timestamp[ns]`, 1677 to 2262) cannot hold it: a file dated 2300 by a wrong
    clock, or by hand, failed its whole batch's publishing (and every later run's, at that file)."""
    return ns if ns is not None and abs(ns) < 2**63 - 10**9 else None
