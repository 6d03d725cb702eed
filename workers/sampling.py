"""Which frames of a video the models see, and the two stages that decode them.

The index functions are pure: they take frame counts and segments and return sorted,
unique 0-based frame indices in display order. `DecodeStage` reads container facts and, for
shot detection, every frame as a 48x27 thumbnail; `SampleStage` decodes the chosen frames
once, with their presentation times, and prepares them for each model.

Both stages decode each video in a forked child process (`workers.guard`) that is killed
after `resources.decode_timeout_s`, so a file that hangs or crashes a native decoder costs
one errors row, never a worker.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import cv2
import numpy as np

from schemas.config import RunConfig, SamplingConfig
from workers.decode import KeptSource, VideoDecodeError, local_copy, open_video, probe
from workers.guard import describe_failure, run_guarded
from workers.stage import Stage
from workers.task import SampledFrames, Segment, StageError, VideoMeta, VideoTask
from workers.thumbnails import make_thumbnails

log = logging.getLogger(__name__)


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


def shot_keyframe_indices(segments: Sequence[Segment], frames_per_shot: int) -> np.ndarray:
    """`frames_per_shot` frames spread within each segment; one per shot is its keyframe."""
    picked = []
    for segment in segments:
        if frames_per_shot == 1:
            picked.append([segment.keyframe_index])
        else:
            length = segment.end_frame - segment.start_frame + 1
            picked.append(segment.start_frame + uniform_indices(length, frames_per_shot))
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
    `FrameSource.frame_times`), the uniform and fps modes space their frames by time in a
    variable-rate video (see `uneven_interval`), not by frame count.
    """
    if frame_count <= 0:
        return np.empty(0, dtype=np.int64)
    segments = list(segments) or [_whole_segment(frame_count, fps)]
    uneven = frame_times is not None and len(frame_times) == frame_count and config.mode != "keyframes"
    interval = uneven_interval(frame_times) if uneven else None
    if config.mode == "uniform":
        mode_frames = uniform_indices(frame_count, config.num_frames)
    elif config.mode == "fps":
        mode_frames = fps_indices(frame_count, 1 / interval if interval else fps, config.fps, config.max_frames)
    elif config.mode == "keyframes":
        mode_frames = shot_keyframe_indices(segments, config.frames_per_shot)
    else:
        raise ValueError(f"unknown sampling mode {config.mode!r}")
    if interval:
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
        moves = frame not in fixed and abs(nearest - frame) <= reach and start <= nearest <= end
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


def whole_video_segment(meta: VideoMeta) -> Segment:
    """One segment spanning the whole video, for runs without shot detection."""
    return _whole_segment(meta.frame_count, meta.fps)


def _whole_segment(frame_count: int, fps: float) -> Segment:
    last = max(frame_count - 1, 0)
    return Segment(
        index=0, start_frame=0, end_frame=last, start_s=0.0, end_s=(last + 1) / fps,
        confidence=1.0, source="whole_video", keyframe_index=last // 2,
    )


class DecodeStage(Stage):
    """Reads container facts (`meta`) and, when shots run, every frame at 48x27 (`shot_frames`).

    Without shot detection it also sets the whole video as the one segment.
    `meta.frame_count` is the count of the decoder that worked (the frames actually decoded
    when all were read), and `meta.decoder` names that decoder.
    """

    name = "decode"
    reads = ("ref",)
    # "segments" only when shots are off; declared here so the plan's check of the stage
    # classes holds in both configurations (with shots on, the shot stage writes them).
    writes = ("meta", "shot_frames", "segments")

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def process(self, tasks: list[VideoTask]) -> None:
        """Probe and (for shots) thumbnail each video; raises on a file no decoder can read."""
        for task in tasks:
            try:
                self._decode(task)
            except Exception as exc:  # noqa: BLE001 - one video's errors row; the others go on
                # recorded here, not by Stage.run's retry of each video alone: that would decode
                # the good videos twice and wait for a hung one twice
                _record_failure(self.name, task, exc)

    def _decode(self, task: VideoTask) -> None:
        shots, sampling = self.config.enabled("shots"), self.config.sampling
        with local_copy(task.ref.uri, self.config.storage, _version(task)) as path, _named(path, task.ref.uri):
            meta, shot_frames = run_guarded(
                functools.partial(read_video, path, shots, sampling.max_video_frames, sampling.max_pixels_per_video,
                                  self.config.resources.decoder),
                self.config.resources.decode_timeout_s, task.ref.uri,
            )
        task.meta = meta
        if shot_frames is None:
            task.segments = [whole_video_segment(meta)]
        else:
            task.shot_frames = shot_frames


class SampleStage(Stage):
    """Decodes the sampled frames once and prepares them for each model (and OCR keyframes).

    `preparers` maps a model role ("embed", "captions") to an object whose
    `prepare(frames uint8 [N,H,W,3] RGB) -> uint8 [N,3,h,w]` resizes and crops for that model;
    the executors hand over the driver's, in a new process detached from their processors so
    that it needs no transformers (`workers.models.detached_preparers`); without them they come
    from `workers.models.load_frame_preparers(config)`.
    """

    name = "sample"
    reads = ("ref", "meta", "segments")
    # segments get their presentation times here, where the decoder that knows them is open
    writes = ("frames", "segments")
    takes_preparers = True

    def __init__(self, config: RunConfig, preparers: dict | None = None) -> None:
        self.config = config
        if preparers is None:
            from workers.models import load_frame_preparers  # heavy (transformers); only when used

            preparers = load_frame_preparers(config)
        self.preparers = preparers

    def process(self, tasks: list[VideoTask]) -> None:
        """Fill `task.frames` for each video and drop its shot thumbnails."""
        for task in tasks:
            task.shot_frames = None  # only shot detection needed them; keep them off the wire
            try:
                task.frames = self._sample(task)
            except Exception as exc:  # noqa: BLE001 - as in DecodeStage: one row, no second try
                _record_failure(self.name, task, exc)

    def _sample(self, task: VideoTask) -> SampledFrames:
        meta = task.meta
        with local_copy(task.ref.uri, self.config.storage, _version(task)) as path, _named(path, task.ref.uri):
            # everything up to the model-size frames runs in the decode child: only those, OCR's
            # keyframes and the thumbnails come back, not the full-size frames
            frames, task.segments = run_guarded(
                functools.partial(sample_video, path, meta, task.segments, self.config, self.preparers),
                self.config.resources.decode_timeout_s, task.ref.uri,
            )
        return frames


def sample_video(path: str, meta: VideoMeta, segments: Sequence[Segment], config: RunConfig,
                 preparers: dict) -> tuple[SampledFrames, list[Segment]]:
    """The sample stage's work on a local video: (its sampled frames prepared for each model,
    with OCR's keyframes and the thumbnails; its segments placed by presentation time)."""
    output = config.output
    frames, times, indices = read_frames(path, meta, segments, config.sampling)
    frames = as_displayed(frames, meta)
    timestamps = times[: len(indices)]
    segments = _retimed(segments, times[len(indices):], meta)
    keyframes = {}
    if config.enabled("ocr"):
        for segment in segments:
            position = int(np.searchsorted(indices, segment.keyframe_index))
            if position < len(indices) and indices[position] == segment.keyframe_index:
                keyframes[position] = _fit_within(frames[position], config.ocr.max_side)
    segment_index = segment_of(indices, segments)
    thumbnails = make_thumbnails(
        frames, indices, timestamps, segment_index, segments,
        output.thumbnail_width, output.thumbnail_quality, output.thumbnails_per_video,
    ) if output.thumbnails else []
    sampled = SampledFrames(
        frame_index=indices,
        timestamp_s=timestamps,
        segment_index=segment_index,
        prepared={role: preparer.prepare(frames) for role, preparer in preparers.items()},
        keyframes=keyframes,
        thumbnails=thumbnails,
    )
    return sampled, segments


def read_video(path: str, shots: bool, max_frames: int, max_pixels: int = SamplingConfig().max_pixels_per_video,
               decoder: str = "decord") -> tuple[VideoMeta, np.ndarray | None]:
    """Container facts of a local video and, when `shots`, every frame at 48x27 (the decode stage's work).

    `decoder` is `resources.decoder` (see `open_video`); the facts name the decoder that read
    the video, which the sample stage reads with in turn.

    Refuses, before decoding any frame, a video of more than `max_frames` frames or whose one
    frame has more than `max_pixels` pixels. `frame_count` in the facts is the working
    decoder's count (the frames actually decoded when all were read), and `duration_s`, where
    the container states none, runs to the end of the last frame.
    """
    meta = probe(path)
    if meta.width * meta.height > max_pixels:
        raise VideoDecodeError(
            f"{path}: one {meta.width}x{meta.height} frame exceeds the limit of {max_pixels} decoded "
            "pixels (sampling.max_pixels_per_video)"
        )
    source = open_video(path, meta, decoder=decoder)
    try:
        count = max(meta.frame_count, source.frame_count)
        if count > max_frames:
            raise VideoDecodeError(
                f"{path}: {count} frames exceed the limit of {max_frames} frames per video "
                "(sampling.max_video_frames); raise it, or split the video"
            )
        shot_frames = source.all_frames_small() if shots else None
        frame_count = source.frame_count if shot_frames is None else len(shot_frames)
        # a live recording (a browser's WebM) states no duration: it ends when its last frame does
        duration_s = meta.duration_s or float(source.frame_times([frame_count - 1])[0]) + 1 / source.fps
    except BaseException:
        source.close()
        raise
    KeptSource.keep(path, source)  # the sample stage reads its frames next, usually here
    meta = dataclasses.replace(meta, duration_s=duration_s, frame_count=frame_count, decoder=source.decoder)
    return meta, shot_frames


def read_frames(path: str, meta: VideoMeta, segments: Sequence[Segment],
                sampling: SamplingConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upright RGB frames, presentation times of the frames then of each segment's first and
    last frame, frame indices read): the frames `sampling` chooses (`sample_indices`: by time
    in a variable-rate video), moved to nearby keyframes of their segments with
    `sampling.snap_to_keyframes` (see `snap_to_keyframes`).
    """
    with KeptSource.take(path, meta.decoder) or open_video(path, meta, decoder=meta.decoder) as source:
        # every frame's time: from the container's index, which opening the video has read
        shown = source.frame_times(np.arange(min(meta.frame_count, source.frame_count)))
        indices = sample_indices(sampling, meta.frame_count, meta.fps, segments, shown)
        if sampling.snap_to_keyframes:
            indices = snap_to_keyframes(indices, source.keyframe_indices(), segments)
        frames = source.get_frames(indices, max_pixels=sampling.max_pixels_per_video)
        bounds = _segment_bounds(segments, meta.frame_count)
        return frames, source.frame_times(np.concatenate([indices, bounds])), indices


def _segment_bounds(segments: Sequence[Segment], frame_count: int) -> np.ndarray:
    """Each segment's first and last frame (clipped to the video), whose times place it."""
    bounds = [(s.start_frame, s.end_frame) for s in segments]
    return np.clip(np.asarray(bounds, dtype=np.int64).reshape(-1), 0, max(frame_count - 1, 0))


def _retimed(segments: Sequence[Segment], times: np.ndarray, meta: VideoMeta) -> list[Segment]:
    """Segments starting when their first frame is shown and ending when their last one ends.

    Equal to frame / fps at a constant rate; right in a variable-rate video.
    """
    frame_s = 1.0 / meta.fps
    starts = {s.start_frame: float(times[2 * k]) for k, s in enumerate(segments)}
    out = []
    for k, segment in enumerate(segments):
        end_s = starts.get(segment.end_frame + 1, float(times[2 * k + 1]) + frame_s)
        out.append(dataclasses.replace(segment, start_s=float(times[2 * k]), end_s=end_s))
    return out


def _version(task: VideoTask) -> tuple:
    """The listed version of a task's video: a kept download is reused only for the same one."""
    return task.ref.size_bytes, task.ref.mtime_ns, task.ref.etag


def _record_failure(stage: str, task: VideoTask, exc: Exception) -> None:
    """The video's errors row, located where the decoder child failed (not where it was re-raised)."""
    log.warning("stage %s failed on %s: %s", stage, task.ref.uri, exc)
    task.errors.append(StageError(stage=stage, error_type=type(exc).__name__, message=describe_failure(exc)))


@contextmanager
def _named(path: str, uri: str) -> Iterator[None]:
    """Errors that name a temporary local copy name the video's URI instead."""
    try:
        yield
    except VideoDecodeError as exc:
        if path == uri:
            raise
        renamed = type(exc)(str(exc).replace(path, uri))
        renamed.__dict__.update(exc.__dict__)  # keeps where the child failed
        raise renamed from None


def as_displayed(frames: np.ndarray, meta: VideoMeta) -> np.ndarray:
    """Upright frames [N,H,W,3] in the shape a player shows them: non-square pixels (DV, HDV's
    1440x1080, DVD) stretched along the coded width, which is the height of a turned video."""
    if abs(meta.pixel_aspect - 1) < 0.01 or not len(frames):
        return frames
    height, width = frames.shape[1:3]
    if meta.rotation in (90, 270):
        height = max(1, round(height * meta.pixel_aspect))
    else:
        width = max(1, round(width * meta.pixel_aspect))
    interpolation = cv2.INTER_AREA if meta.pixel_aspect < 1 else cv2.INTER_LINEAR
    return np.stack([cv2.resize(frame, (width, height), interpolation=interpolation) for frame in frames])


def _fit_within(frame: np.ndarray, max_side: int) -> np.ndarray:
    """The frame downscaled (area filter) so its longer side is at most max_side pixels."""
    height, width = frame.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return frame.copy()  # a copy, so the full batch of frames can be freed
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
