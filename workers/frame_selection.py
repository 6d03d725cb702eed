"""Which frames of a video the models see: pure functions of frame counts, frame times and
segments, which return sorted, unique 0-based frame indices in display order.

The sample stage (`workers.sampling`) calls them once the video is open, where every frame's
presentation time is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from schemas.config import SamplingConfig
from workers.task import Segment, VideoMeta


def uniform_indices(frame_count: int, n: int) -> np.ndarray:
    """`n` frames evenly spaced, each the middle of one of n equal spans; all frames if fewer."""
    if frame_count <= 0 or n <= 0:
        return np.empty(0, dtype=np.int64)
    if n >= frame_count:
        return np.arange(frame_count, dtype=np.int64)
    return np.unique(((np.arange(n) + 0.5) * frame_count / n).astype(np.int64))


def fps_indices(frame_count: int, video_fps: float, target_fps: float, max_frames: int) -> np.ndarray:
    """Frames `target_fps` times a second (each in the middle of its interval), at most `max_frames`.

    When the cap bites, `max_frames` frames are spread evenly over the video instead; a video
    shorter than one interval gets its middle frame.
    """
    if video_fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be positive, got video {video_fps} and target {target_fps}")
    if frame_count <= 0 or max_frames <= 0:
        return np.empty(0, dtype=np.int64)
    step = max(1.0, video_fps / target_fps)  # frames between samples; never more than every frame
    count = int(np.ceil(frame_count / step - 0.5))
    if count > max_frames:
        return uniform_indices(frame_count, max_frames)
    if count < 1:
        return uniform_indices(frame_count, 1)
    indices = ((np.arange(count) + 0.5) * step).astype(np.int64)
    return np.unique(indices[indices < frame_count])


def shot_keyframe_indices(segments: Sequence[Segment], frames_per_shot: int,
                          frame_times: np.ndarray | None = None, interval: float | None = None) -> np.ndarray:
    """`frames_per_shot` frames spread within each segment; one per shot is its keyframe.

    With the `frame_times` of a variable-rate video and its mean `interval` (see
    `uneven_interval`), they are spread over each segment's time, not its frames.
    """
    picked = []
    for segment in segments:
        if frames_per_shot == 1:
            picked.append([segment.keyframe_index])
            continue
        if interval:
            shares = (np.arange(frames_per_shot) + 0.5) / frames_per_shot
            spread = np.asarray(_shown_within(segment, frame_times, interval, shares), dtype=np.int64)
        else:
            length = segment.end_frame - segment.start_frame + 1
            spread = segment.start_frame + uniform_indices(length, frames_per_shot)
        # the keyframe in place of the spread frame nearest it: `frames_per_shot` in all (the
        # keyframe beside them made one more, with two frames side by side)
        if len(spread):
            spread[np.argmin(np.abs(spread - segment.keyframe_index))] = segment.keyframe_index
        picked.append(spread if len(spread) else [segment.keyframe_index])
    if not picked:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.concatenate(picked).astype(np.int64))


def sample_indices(
    config: SamplingConfig, frame_count: int, fps: float, segments: Sequence[Segment],
    frame_times: np.ndarray | None = None,
) -> np.ndarray:
    """The sampling mode's frames plus every segment's keyframe, sorted, unique, at most max_frames.

    Every segment gets at least one frame (its keyframe) as long as the cap allows: when it
    bites, keyframes of the longest segments are kept first, then mode frames spread evenly.
    With `frame_times` (when each of the `frame_count` frames is shown, see
    `FrameSource.frame_times`), every mode spaces its frames by time in a variable-rate video
    (see `uneven_interval`), not by frame count.
    """
    if frame_count <= 0:
        return np.empty(0, dtype=np.int64)
    segments = list(segments) or [_whole_segment(frame_count, fps)]
    usable = frame_times is not None and len(frame_times) == frame_count
    interval = uneven_interval(frame_times) if usable else None
    if config.mode == "uniform":
        mode_frames = uniform_indices(frame_count, config.num_frames)
    elif config.mode == "fps":
        mode_frames = fps_indices(frame_count, 1 / interval if interval else fps, config.fps, config.max_frames)
    elif config.mode == "keyframes":
        mode_frames = shot_keyframe_indices(segments, config.frames_per_shot, frame_times, interval)
    else:
        raise ValueError(f"unknown sampling mode {config.mode!r}")
    if interval and config.mode != "keyframes":
        # the frame on screen at the time each index would have at an even rate
        shown = np.searchsorted(frame_times, frame_times[0] + mode_frames * interval, side="right") - 1
        mode_frames = np.unique(np.clip(shown, 0, frame_count - 1))
    mode_frames = mode_frames[(mode_frames >= 0) & (mode_frames < frame_count)]
    longest_first = sorted(segments, key=lambda s: (s.start_frame - s.end_frame, s.start_frame))
    keyframes = [int(np.clip(s.keyframe_index, 0, frame_count - 1)) for s in longest_first]
    keyframes = list(dict.fromkeys(keyframes))  # segments may share a keyframe; keep the order
    chosen = np.union1d(keyframes, mode_frames).astype(np.int64)
    if len(chosen) <= config.max_frames:
        return chosen
    kept = keyframes[: config.max_frames]
    others = np.setdiff1d(mode_frames, kept)
    room = config.max_frames - len(kept)
    if room > 0 and len(others):
        kept += others[uniform_indices(len(others), room)].tolist()
    return np.unique(np.asarray(kept, dtype=np.int64))


def uneven_interval(frame_times: np.ndarray) -> float | None:
    """The mean interval between frames (s) of a variable-rate video; None for an even-rate one.

    A video is variable-rate when some frame is shown more than a mean interval away from
    where an even rate would place it: a screen recording's bursts and pauses, a phone video
    that slows in the dark. Jitter within a frame (most phone videos) leaves sampling by index,
    whose frames are then within a frame of those sampling by time would choose.
    """
    if len(frame_times) < 3:
        return None
    interval = float(frame_times[-1] - frame_times[0]) / (len(frame_times) - 1)
    if interval <= 0:
        return None
    even = frame_times[0] + np.arange(len(frame_times)) * interval
    return interval if float(np.max(np.abs(frame_times - even))) > interval else None


def keyframes_in_time(segments: Sequence[Segment], frame_times: np.ndarray) -> list[Segment]:
    """The segments, each keyframe the frame on screen halfway through its segment's time, in a
    variable-rate video (see `uneven_interval`); as they are in an even-rate one, where the
    middle frame by count is that frame.

    By count, a screen recording's shot of a burst and a long pause had its keyframe (what OCR
    reads, its thumbnail) in the burst, often mid-scroll; by time it is a frame of the pause.
    """
    interval = uneven_interval(frame_times)
    if interval is None:
        return list(segments)
    return [dataclasses.replace(s, keyframe_index=int(_shown_within(s, frame_times, interval, np.array([0.5]))[0]))
            for s in segments]


def _shown_within(segment: Segment, frame_times: np.ndarray, interval: float, shares: np.ndarray) -> np.ndarray:
    """The frames of `segment` on screen at `shares` (0..1) of its time, from when its first
    frame is shown to when the frame after it is (the video's last frame: an interval on)."""
    count = len(frame_times)
    first = int(np.clip(segment.start_frame, 0, count - 1))
    last = int(np.clip(segment.end_frame, first, count - 1))
    end = frame_times[last + 1] if last + 1 < count else frame_times[last] + interval
    times = frame_times[first] + shares * (end - frame_times[first])
    return np.clip(np.searchsorted(frame_times, times, side="right") - 1, first, last).astype(np.int64)


def snap_to_keyframes(indices: np.ndarray, keyframes: np.ndarray | None,
                      segments: Sequence[Segment]) -> np.ndarray:
    """Each sampled frame moved to the nearest keyframe in its segment, if that is within half the
    distance to its neighbouring samples; segment keyframes stay. Sorted and unique, like the input.

    A keyframe decodes alone, while an arbitrary frame costs decoding from the keyframe before
    it: on a long video with keyframes every few seconds this makes sampling nearly free.
    """
    if keyframes is None or len(keyframes) == 0 or len(indices) == 0:
        return indices
    keyframes = np.unique(np.asarray(keyframes, dtype=np.int64))
    fixed = {s.keyframe_index for s in segments}
    spans = {s.index: (s.start_frame, s.end_frame) for s in segments}
    owners = segment_of(indices, segments) if segments else np.zeros(len(indices), dtype=np.int32)
    gaps = np.diff(indices)
    snapped = []
    for i, frame in enumerate(indices.tolist()):
        # half the distance to the nearer neighbour: samples keep their order and their spread
        reach = min(gaps[i - 1] if i > 0 else np.inf, gaps[i] if i < len(gaps) else np.inf) / 2
        position = int(np.searchsorted(keyframes, frame))
        nearby = keyframes[max(0, position - 1): position + 1]
        nearest = int(nearby[np.argmin(np.abs(nearby - frame))])
        start, end = spans.get(int(owners[i]), (0, np.inf))
        # (two samples each halfway to the keyframe between them: the second keeps its frame)
        taken = bool(snapped) and snapped[-1] == nearest
        moves = frame not in fixed and abs(nearest - frame) <= reach and start <= nearest <= end and not taken
        snapped.append(nearest if moves else frame)
    return np.unique(np.asarray(snapped, dtype=np.int64))


def segment_of(frame_indices: Sequence[int] | np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
    """The `index` of the segment holding each frame (int32); a frame in a gap goes to the one before."""
    if not segments:
        raise ValueError("no segments to map frames to")
    ordered = sorted(segments, key=lambda s: s.start_frame)
    starts = np.array([s.start_frame for s in ordered])
    position = np.searchsorted(starts, np.asarray(frame_indices), side="right") - 1
    labels = np.array([s.index for s in ordered], dtype=np.int32)
    return labels[np.clip(position, 0, len(ordered) - 1)]


#: `Segment.source` (`segments.source`) of the one segment of a video without shot detection: in
#: a run with shots off, and in one with shots on, of a video of more frames than `shots.max_frames`.
WHOLE_VIDEO = "whole_video"
OVER_SHOTS_MAX_FRAMES = "over_shots_max_frames"


def whole_video_segment(meta: VideoMeta, source: str = WHOLE_VIDEO) -> Segment:
    """One segment spanning the whole video, for runs without shot detection (`source`: why)."""
    return _whole_segment(meta.frame_count, meta.fps, source)


def _whole_segment(frame_count: int, fps: float, source: str = WHOLE_VIDEO) -> Segment:
    last = max(frame_count - 1, 0)
    return Segment(
        index=0, start_frame=0, end_frame=last, start_s=0.0, end_s=(last + 1) / fps,
        confidence=1.0, source=source, keyframe_index=last // 2,
    )


def renumbered(segments: Sequence[Segment], old_times: np.ndarray, new_times: np.ndarray) -> list[Segment]:
    """The segments, numbered by another decoder's frames (shown at `new_times`) rather than by
    those shown at `old_times` (when each frame is shown, from the first, as `FrameSource.frame_times`
    gives them): each from its first frame's time to the next segment's (the last to the video's
    end), its keyframe the frame on screen at its keyframe's time. A segment left without a frame
    (the new numbering lacks them all, or it starts past the frames `old_times` has) is left out,
    and the others are numbered on.

    Where decord fails over to PyAV in the sample stage, PyAV's count may differ from decord's,
    and its numbering, from the first frame decord loses or PyAV does, with it.
    """
    # (a shot of decord's past PyAV's count, where PyAV read from the start, took the last frame of
    # the shot before it, as a shot of one frame of its own)
    segments = [s for s in segments if s.start_frame < len(old_times)]
    starts = [float(old_times[s.start_frame]) for s in segments]
    firsts = np.searchsorted(new_times, starts, side="left")
    lasts = [*(firsts[1:] - 1), len(new_times) - 1]
    placed = []
    for segment, first, last in zip(segments, firsts.tolist(), lasts):
        if first > last:
            continue
        shown = float(old_times[min(segment.keyframe_index, len(old_times) - 1)])
        keyframe = int(np.clip(np.searchsorted(new_times, shown, side="right") - 1, first, last))
        placed.append(dataclasses.replace(segment, index=len(placed), start_frame=first, end_frame=int(last),
                                          keyframe_index=keyframe))
    return placed
