"""The embed stage: frame, segment and video embeddings, zero-shot labels and query matches.

One video-text model serves four configurable outputs ("embed", "objects", "scenes",
"match"): the embeddings are always computed, because labels and matches are scored from
them; which tables are written is the writer's choice.

Frames from every video of a batch are embedded together, in model batches of
`resources.frames_per_batch`, so short videos still fill the accelerator. A clip (the
whole video, or one segment) is then embedded as `VideoTextModel.embed_clips` describes.

Where a label holds (`Label.time_ranges`): each sampled frame stands for the part of its
segment nearer to it than to the segment's other sampled frames (from the midpoint with
the previous frame to the midpoint with the next; the first frame from the segment's start,
the last to its end). A label holds on a frame where it is among that frame's top_k labels
with probability at least `labels.min_score`; the spans of those frames, merged where they
touch, are its time ranges. Frames are scored against the texts as read for the clip being
labelled (for X-CLIP, conditioned on that clip), on the same probability scale as the clip.

A segment with no sampled frame (a shot beyond `sampling.max_frames`, whose keyframe the cap
left out, or one none of whose frames decoded) gets no clip: its row of `segment_embeddings`
is NaN (null in the segments table) and it has no labels or matches; the video and its other
segments get theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from schemas.config import RunConfig
from workers.embedding import ClipEmbeddings, TextBank, VideoTextModel
from workers.models import precision_of
from workers.stage import Stage
from workers.task import Label, Match, Segment, VideoTask

#: the Label.kind of each zero-shot vocabulary, and the stage that enables it.
_VOCABULARY_STAGES = {"object": "objects", "scene": "scenes"}


@dataclass
class _VideoLayout:
    """Where one task's frames and clips sit in the batch-wide arrays."""

    task: VideoTask
    #: rows of this video's frames in the batch's frame arrays.
    frames: slice
    #: row of this video's whole-video clip; its segments' clips follow it, in order.
    first_clip: int
    #: the segments that have sampled frames, in the order of their clips; the others (beyond
    #: `sampling.max_frames`, or none of whose frames decoded) get no clip, labels or matches.
    segments: list[Segment]
    #: where those segments sit in `task.segments` (their rows of `task.segment_embeddings`).
    segment_rows: list[int]
    #: per segment with a clip, the positions of its frames within this video.
    segment_frames: list[np.ndarray]
    #: float64 [N, 2]: the (start_s, end_s) each sampled frame stands for.
    frame_spans: np.ndarray
    duration_s: float
    #: spans closer than this (half a frame) are one range when merged.
    tolerance_s: float


class EmbedStage(Stage):
    """Embeds frames, segments and videos, and scores them against labels and queries."""

    name = "embed"
    reads = ("frames", "segments")
    writes = ("frame_embeddings", "segment_embeddings", "video_embedding", "labels", "matches")

    def __init__(self, config: RunConfig):
        self.config = config
        self.model = VideoTextModel(config.models)
        labels = config.labels
        vocabularies = {
            "object": (labels.objects, labels.object_templates),
            "scene": (labels.scenes, labels.scene_templates),
        }
        #: text banks encoded once per worker: Label.kind -> its vocabulary.
        self.vocabularies: dict[str, TextBank] = {
            kind: self.model.text_bank(names, templates)
            for kind, (names, templates) in vocabularies.items()
            if config.enabled(_VOCABULARY_STAGES[kind]) and names
        }
        queries = config.all_queries() if config.enabled("match") else ()
        self.queries: TextBank | None = (
            self.model.text_bank(queries, (config.match.template,)) if queries else None
        )

    def ran_on(self) -> tuple[str, str]:
        """The embedding model's device type and dtype."""
        return precision_of(self.model)

    def process(self, tasks: list[VideoTask]) -> None:
        """Fill embeddings, labels and matches of every task (all or nothing per batch)."""
        layouts, clips = self._layout(tasks)
        prepared = np.concatenate([task.frames.prepared["embed"] for task in tasks])
        batch_size = self.config.resources.frames_per_batch
        frame_embeddings = self.model.embed_frames(prepared, batch_size)
        pooled = self.model.embed_clips(prepared, frame_embeddings, clips, batch_size)
        # per vocabulary, its texts as read for each clip [C, M, D] (clip-conditioned for X-CLIP)
        label_texts = {
            kind: self.model.clip_text_embeddings(pooled, bank) for kind, bank in self.vocabularies.items()
        }
        query_scores = self.model.clip_similarity(pooled, self.queries) if self.queries else None
        # results are assigned only once every video's are computed, so a retry starts clean
        results = [
            self._results(layout, frame_embeddings, pooled, label_texts, query_scores) for layout in layouts
        ]
        for layout, (frames, segments, video, labels, matches) in zip(layouts, results):
            task = layout.task
            task.frame_embeddings, task.segment_embeddings, task.video_embedding = frames, segments, video
            task.labels, task.matches = labels, matches

    def release(self, task: VideoTask) -> None:
        """The frames prepared for the embedding model: no later stage reads them."""
        if task.frames is not None:
            task.frames.prepared.pop("embed", None)

    # --- layout ----------------------------------------------------------------------------

    def _layout(self, tasks: list[VideoTask]) -> tuple[list[_VideoLayout], list[np.ndarray]]:
        layouts, clips, offset = [], [], 0
        for task in tasks:
            frames = task.frames
            if frames is None or "embed" not in frames.prepared:
                raise ValueError("no frames prepared for the embed model (frames.prepared['embed'] is unset)")
            count = len(frames.prepared["embed"])
            if count == 0 or count != len(frames.timestamp_s):
                raise ValueError(f"{count} prepared frames for {len(frames.timestamp_s)} sampled timestamps")
            framed, rows, segment_frames = [], [], []
            for row, segment in enumerate(task.segments):
                positions = np.flatnonzero(frames.segment_index == segment.index)
                # a shot beyond the max_frames cap has no frame: it gets no clip, the others still do
                if len(positions):
                    framed.append(segment)
                    rows.append(row)
                    segment_frames.append(positions)
            duration = _duration(task)
            fps = task.meta.fps if task.meta is not None and task.meta.fps > 0 else 1000.0
            layouts.append(
                _VideoLayout(task, slice(offset, offset + count), len(clips), framed, rows, segment_frames,
                             frame_spans(frames.timestamp_s, frames.segment_index, task.segments, duration),
                             duration, 0.5 / fps)
            )
            clips.append(np.arange(offset, offset + count))
            clips += [offset + positions for positions in segment_frames]
            offset += count
        return layouts, clips

    # --- per video -------------------------------------------------------------------------

    def _results(self, layout: _VideoLayout, frame_embeddings: np.ndarray, pooled: ClipEmbeddings,
                 label_texts: dict[str, np.ndarray], query_scores: np.ndarray | None) -> tuple:
        clip_rows = slice(layout.first_clip, layout.first_clip + 1 + len(layout.segments))
        clips, frames = pooled.embeddings[clip_rows], frame_embeddings[layout.frames]
        labels: list[Label] = []
        for kind, texts in label_texts.items():
            labels += self._labels(kind, layout, frames, clips, texts[clip_rows])
        matches = self._matches(layout, query_scores[clip_rows]) if query_scores is not None else []
        # a segment without frames keeps a NaN row: it has no embedding (null in the segments table)
        segments = np.full((len(layout.task.segments), clips.shape[1]), np.nan, dtype=clips.dtype)
        segments[layout.segment_rows] = clips[1:]
        # copies, so each task owns its arrays rather than views of the whole batch's
        return frames.copy(), segments, clips[0].copy(), labels, matches

    def _labels(self, kind: str, layout: _VideoLayout, frames: np.ndarray, clips: np.ndarray,
                texts: np.ndarray) -> list[Label]:
        """Top-k labels of the video and of each segment, with the time ranges where each holds.

        `clips` are the video's clip embeddings (the video, then its segments) and `texts` the
        vocabulary as read for each of them; a clip's frames are scored against its texts.
        """
        names = self.vocabularies[kind].names
        top_k = min(self.config.labels.top_k, len(names))
        levels = [("video", None, np.arange(len(frames)))] + [
            ("segment", segment.index, positions)
            for segment, positions in zip(layout.segments, layout.segment_frames)
        ]
        labels = []
        for row, (level, segment_index, positions) in enumerate(levels):
            similarity = texts[row] @ clips[row]
            probabilities = self.model.probabilities(similarity)
            frame_probabilities = self.model.probabilities(frames[positions] @ texts[row].T)
            holds = _frame_holds(frame_probabilities, top_k, self.config.labels.min_score)
            for rank, label in enumerate(np.argsort(-probabilities, kind="stable")[:top_k], start=1):
                spans = layout.frame_spans[positions[holds[:, label]]]
                labels.append(Label(
                    kind=kind, level=level, segment_index=segment_index, label=names[label], rank=rank,
                    score=float(probabilities[label]), similarity=float(similarity[label]),
                    time_ranges=merge_spans(spans, layout.tolerance_s),
                ))
        return labels

    def _matches(self, layout: _VideoLayout, similarity: np.ndarray) -> list[Match]:
        """One row per query for the video and for each of its segments."""
        probabilities = self.model.probabilities(similarity)
        bounds = [("video", None, 0.0, layout.duration_s)] + [
            ("segment", s.index, s.start_s, s.end_s) for s in layout.segments
        ]
        return [
            Match(query=query, level=level, segment_index=segment_index, start_s=float(start), end_s=float(end),
                  similarity=float(similarity[row, q]), probability=float(probabilities[row, q]))
            for row, (level, segment_index, start, end) in enumerate(bounds)
            for q, query in enumerate(self.queries.names)
        ]


def frame_spans(
    timestamps: np.ndarray, segment_of_frame: np.ndarray, segments: list[Segment], duration_s: float
) -> np.ndarray:
    """(start_s, end_s) [N, 2] each sampled frame stands for: its share of its segment.

    Within a segment, frames split the time at the midpoints between consecutive frames;
    the first reaches back to the segment's start and the last forward to its end. A frame
    outside every listed segment (no shots: one segment or none) shares the whole video.
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    spans = np.zeros((len(timestamps), 2))
    bounds = {segment.index: (segment.start_s, segment.end_s) for segment in segments}
    for index in np.unique(segment_of_frame):
        positions = np.flatnonzero(segment_of_frame == index)
        positions = positions[np.argsort(timestamps[positions], kind="stable")]
        start, end = bounds.get(int(index), (0.0, duration_s))
        times = timestamps[positions]
        middles = (times[:-1] + times[1:]) / 2
        spans[positions, 0] = np.concatenate([[min(start, times[0])], middles])
        spans[positions, 1] = np.concatenate([middles, [max(end, times[-1])]])
    return spans.clip(0.0, duration_s)


def merge_spans(spans: np.ndarray, tolerance: float = 1e-3) -> list[tuple[float, float]]:
    """Sorted, merged (start_s, end_s) ranges: spans closer than `tolerance` become one."""
    merged: list[list[float]] = []
    for start, end in sorted(map(tuple, np.asarray(spans, dtype=np.float64).reshape(-1, 2))):
        if merged and start <= merged[-1][1] + tolerance:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    # a frame squeezed to no time (a duplicate timestamp, the video's very end) covers nothing.
    # To the microsecond within the span: rounded to the millisecond, a range ended past its
    # segment (15.167 in a shot ending at 15.166667) and past the video (17.467 of 17.4666...)
    rounded = [(_microsecond(start, up=True), _microsecond(end, up=False)) for start, end in merged]
    return [(start, end) for start, end in rounded if end > start]  # (less than a microsecond: nothing)


def _microsecond(seconds: float, up: bool) -> float:
    """`seconds` rounded up or down to the microsecond; a value on one already (0.3 s, which is
    299999.99999999994 us in binary) stays where it is."""
    micro = float(seconds) * 1e6
    return round((math.ceil(micro - 1e-3) if up else math.floor(micro + 1e-3)) / 1e6, 6)


def _frame_holds(probabilities: np.ndarray, top_k: int, min_score: float) -> np.ndarray:
    """bool [N, M]: label m is among frame n's top_k with at least min_score."""
    holds = np.zeros(probabilities.shape, dtype=bool)
    if probabilities.size:
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        np.put_along_axis(holds, top, True, axis=1)
    return holds & (probabilities >= min_score)


def _duration(task: VideoTask) -> float:
    """The video's length; containers that report none fall back to the last segment or frame."""
    if task.meta is not None and task.meta.duration_s > 0:
        return float(task.meta.duration_s)
    ends = [segment.end_s for segment in task.segments] + [float(np.max(task.frames.timestamp_s))]
    return float(max(ends))
