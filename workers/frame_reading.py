"""Reading the frames sampling chooses from an open video (`read_frames`), and standing in for those a
corrupt stretch of the file leaves undecodable: a segment that loses every sampled frame gets one of
its own that decodes, a segment whose keyframe is lost gets its nearest decoded frame as keyframe.
Where decord fails over to PyAV here, PyAV's numbering of the frames is the video's: its facts and
segments are made again by it, and the frames chosen again (`read_decodable`).
`workers.sampling`'s sample stage calls it in its decode child.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

import numpy as np

from schemas.config import SamplingConfig
from workers.decode import VideoDecodeError, open_video, probe
from workers.frame_selection import (OVER_SHOTS_MAX_FRAMES, WHOLE_VIDEO, keyframes_in_time, renumbered, sample_indices,
                                     segment_of, snap_to_keyframes, uniform_indices, whole_video_segment)
from workers.frame_sources import FrameSource, RequestTooLarge
from workers.kept_source import KeptSource
from workers.task import Segment, VideoMeta
from workers.video_facts import recorded_facts

log = logging.getLogger(__name__)

#: frames of a segment tried, at most, for one that decodes when none of its sampled frames does.
STAND_IN_TRIES = 8


def read_frames(path: str, meta: VideoMeta, segments: Sequence[Segment], sampling: SamplingConfig,
                max_side: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Segment]]:
    """(upright RGB frames, presentation times of the frames then of each segment's first and
    last frame, frame indices read, the segments with their keyframes placed in time): the
    frames `sampling` chooses (`sample_indices`: by time in a variable-rate video, whose
    segments' keyframes move too: `keyframes_in_time`), moved to nearby keyframes of their
    segments with `sampling.snap_to_keyframes` (see `snap_to_keyframes`); with `max_side`,
    scaled down so that their longer side is at most that (`FrameSource.get_frames`).

    A sampled frame that cannot be decoded is left out (`read_decodable`); VideoDecodeError
    when none can be.
    """
    return read_decodable(path, meta, segments, sampling, max_side)[:4]


def read_decodable(path: str, meta: VideoMeta, segments: Sequence[Segment], sampling: SamplingConfig, max_side: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Segment], np.ndarray, VideoMeta]:
    """`read_frames`' result, the sampled frames left out because they cannot be decoded, and the
    video's facts: `meta`, or where decord failed over to PyAV in this read, PyAV's (`_renumbered`).

    A corrupt stretch of the file costs the frames sampled in it, not the video's others. A
    segment whose every sampled frame is lost gets a frame of its own that decodes instead
    (`_stand_ins`), which the embedding of each segment needs; a segment whose keyframe is lost
    has its keyframe (what OCR reads, its thumbnail) moved to its decoded frame nearest it.
    """
    opened = KeptSource.take(path, meta.decoder) or open_video(path, meta, decoder=meta.decoder,
                                                                max_frame_pixels=sampling.max_frame_pixels)
    with opened as source:
        shown, placed, sampled = _chosen(source, meta, segments, sampling)
        read = functools.partial(source.get_decodable_frames, max_pixels=sampling.max_pixels_per_video,
                                 max_side=max_side)
        # (PyAV opened where decord could not: its count may be short of decord's, and has no frame past it)
        frames, indices = _read_failing_over(read, sampled[sampled < source.frame_count], source, meta.decoder)
        if source.decoder != meta.decoder:
            # decord failed midway and PyAV read those frames by its own numbering, which is the
            # video's from here on (a fresh reader in another process fails over alike; one that
            # could not open decord at all reads with PyAV from the start): the frames are chosen
            # again by it, those read already kept
            meta, segments = _renumbered(path, meta, segments, shown, source, sampling)
            _, placed, chosen = _chosen(source, meta, segments, sampling)
            frames, indices = _kept_and_read(read, frames, indices, sampled, chosen)
            sampled = chosen
        segments = placed
        undecodable = np.setdiff1d(sampled, indices)
        if len(undecodable) and segments:
            frames, indices = _stand_ins(read, frames, indices, sampled, segments, source)
            segments = [_keyframe_decoded(s, indices, undecodable) for s in segments]
        bounds = _segment_bounds(segments, meta.frame_count)
        times = source.frame_times(np.concatenate([indices, bounds]))
        return frames, times, indices, list(segments), undecodable, meta


def _chosen(source: FrameSource, meta: VideoMeta, segments: Sequence[Segment],
            sampling: SamplingConfig) -> tuple[np.ndarray, list[Segment], np.ndarray]:
    """(every frame's time, the segments with their keyframes placed in time, the frames
    `sampling` chooses) of a video the source numbers as `meta` counts it."""
    # every frame's time: from the container's index, which opening the video has read
    shown = source.frame_times(np.arange(min(meta.frame_count, source.frame_count)))
    if len(shown) == meta.frame_count:
        segments = keyframes_in_time(segments, shown)
    sampled = sample_indices(sampling, meta.frame_count, meta.fps, segments, shown)
    if sampling.snap_to_keyframes:
        sampled = snap_to_keyframes(sampled, source.keyframe_indices(), segments)
    return shown, list(segments), sampled


def _read_failing_over(read: Callable, sampled: np.ndarray, source: FrameSource,
                       decoder: str) -> tuple[np.ndarray, np.ndarray]:
    """`read(sampled)`; none, where none of them decodes and the source reads with another decoder
    than the facts' `decoder` (PyAV, once decord has failed over, read them by its own numbering:
    of the frames chosen by it, some may decode)."""
    try:
        return read(sampled)
    except VideoDecodeError as exc:
        if source.decoder == decoder or not exc.bad_file:
            raise
        return np.empty((0, 0, 0, 3), dtype=np.uint8), np.empty(0, dtype=np.int64)


def _kept_and_read(read: Callable, frames: np.ndarray, indices: np.ndarray, tried: np.ndarray,
                   chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The decodable frames of `chosen` and their indices: those of `frames` (of `indices`, read
    when `tried` was) that are chosen, and the chosen ones not tried, read. Raises as `read`
    does where none of them decodes."""
    keep = np.isin(indices, chosen)
    if not keep.any():
        return read(chosen)
    frames, indices, missing = frames[keep], indices[keep], np.setdiff1d(chosen, tried)
    if not len(missing):
        return frames, indices  # (every frame chosen was read already)
    try:
        more_frames, more = read(missing)
    except VideoDecodeError as exc:
        if not exc.bad_file:
            raise
        return frames, indices  # (none of those decodes)
    merged = np.concatenate([indices, more])
    order = np.argsort(merged, kind="stable")
    return np.concatenate([frames, more_frames])[order], merged[order]


def _renumbered(path: str, meta: VideoMeta, segments: Sequence[Segment], old_times: np.ndarray,
                source: FrameSource, sampling: SamplingConfig) -> tuple[VideoMeta, list[Segment]]:
    """The video's facts and segments by the numbering of the source decord failed over to, whose
    times and count are PyAV's: what a run with `resources.decoder: pyav` records. The whole video
    as one segment (shots off, or past `shots.max_frames`) is made anew from those facts; shots
    keep their frames by the time they are shown (`renumbered`), decord's `old_times` (PyAV's
    where decord could not open the video here: shots then keep their indices)."""
    facts = recorded_facts(probe(path, sampling.max_frame_pixels, sampling.max_video_frames), source,
                           source.frame_count)
    if facts.frame_count != meta.frame_count:
        log.info("%s: decord counted %d frames and PyAV, which reads them, %d: PyAV's numbering is the video's",
                 path, meta.frame_count, facts.frame_count)
    if len(segments) == 1 and segments[0].source in (WHOLE_VIDEO, OVER_SHOTS_MAX_FRAMES):
        return facts, [whole_video_segment(facts, segments[0].source)]
    return facts, renumbered(segments, old_times, source.frame_times(np.arange(facts.frame_count)))


def _stand_ins(read: Callable, frames: np.ndarray, indices: np.ndarray, sampled: np.ndarray,
               segments: Sequence[Segment], source: FrameSource) -> tuple[np.ndarray, np.ndarray]:
    """The frames and their indices, with a stand-in for each segment that had sampled frames
    and lost them all: of up to `STAND_IN_TRIES` of its frames (some of its keyframes, where
    decoding starts anew, and some spread over it), the one that decodes nearest its keyframe.
    A segment none of whose tries decodes stays without a frame. Where the tries fail for another
    reason than the file's bytes (the decoder short of memory, a frame past `sampling.max_frame_pixels`),
    the video fails as its sampled frames' read would: taken for undecodable, it was recorded without
    those segments' frames and never run again."""
    lost = set(segment_of(sampled, segments).tolist()) - set(segment_of(indices, segments).tolist())
    bare = [s for s in segments if s.index in lost]
    if not bare:
        return frames, indices
    keyframes = source.keyframe_indices()
    tries = np.unique(np.concatenate([_stand_in_tries(s, keyframes, sampled, source.frame_count) for s in bare]))
    try:
        extra_frames, extra = read(tries)
    except RequestTooLarge:
        return frames, indices  # (many segments lost: those stay without a frame)
    except VideoDecodeError as exc:
        if not exc.bad_file:
            raise
        return frames, indices  # none of them decodes
    chosen = [p for p in (_nearest_keyframe(s, extra) for s in bare) if p is not None]
    merged = np.concatenate([indices, extra[chosen]])
    order = np.argsort(merged, kind="stable")
    return np.concatenate([frames, extra_frames[chosen]])[order], merged[order]


def _stand_in_tries(segment: Segment, keyframes: np.ndarray | None, tried: np.ndarray,
                    frame_count: int) -> np.ndarray:
    """Frames of `segment` to try for one that decodes, those already tried left out."""
    first, last = segment.start_frame, min(segment.end_frame, frame_count - 1)
    spread = first + uniform_indices(last - first + 1, STAND_IN_TRIES // 2)
    own = np.empty(0, dtype=np.int64) if keyframes is None else keyframes[(keyframes >= first) & (keyframes <= last)]
    own = own[uniform_indices(len(own), STAND_IN_TRIES - len(spread))]
    return np.setdiff1d(np.union1d(spread, own), tried).astype(np.int64)


def _keyframe_decoded(segment: Segment, indices: np.ndarray, undecodable: np.ndarray) -> Segment:
    """The segment, its keyframe moved to its decoded frame nearest it where it was sampled
    and could not be decoded (it stands for the segment: OCR reads it, its thumbnail shows it)."""
    nearest = _nearest_keyframe(segment, indices)
    if segment.keyframe_index not in undecodable or nearest is None:
        return segment
    return dataclasses.replace(segment, keyframe_index=int(indices[nearest]))


def _nearest_keyframe(segment: Segment, indices: np.ndarray) -> int | None:
    """The position in `indices` of the segment's frame nearest its keyframe; None if it has none there."""
    own = np.flatnonzero((indices >= segment.start_frame) & (indices <= segment.end_frame))
    return int(own[np.argmin(np.abs(indices[own] - segment.keyframe_index))]) if len(own) else None


def _segment_bounds(segments: Sequence[Segment], frame_count: int) -> np.ndarray:
    """Each segment's first and last frame (clipped to the video), whose times place it."""
    bounds = [(s.start_frame, s.end_frame) for s in segments]
    return np.clip(np.asarray(bounds, dtype=np.int64).reshape(-1), 0, max(frame_count - 1, 0))
