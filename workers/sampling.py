"""The two stages that decode a video: `DecodeStage` reads container facts and, for shot
detection, every frame as a 48x27 thumbnail; `SampleStage` decodes the frames the models see
(chosen by `workers.frame_selection`) once, with their presentation times, and prepares them
for each model.

Both stages decode each video in a forked child process (`workers.guard`) that is killed
after `resources.decode_timeout_s`, so a file that hangs or crashes a native decoder costs
one errors row, never a worker. A sampled frame that cannot be decoded (a corrupt stretch of
the file) is left out, with a warning; only a video none of whose sampled frames decodes is
an errors row (`workers.frame_reading.read_frames`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from schemas.config import RunConfig, SamplingConfig
from workers.decode import VideoDecodeError, open_video, probe
from workers.frame_reading import read_decodable
from workers.frame_sources import fitted_size
from workers.frame_selection import OVER_SHOTS_MAX_FRAMES, WHOLE_VIDEO, segment_of, whole_video_segment
from workers.guard import describe_failure, run_guarded
from workers.kept_source import KeptSource
from workers.remote_copy import hand_on_download, local_copy
from workers.stage import Stage
from workers.task import SampledFrames, Segment, VideoMeta, VideoRef, VideoTask
from workers.thumbnails import make_thumbnails
from workers.video_facts import frame_end, recorded_facts

log = logging.getLogger(__name__)

#: the longer side sampled frames are decoded at, at most (more where OCR asks for more: `frame_side`).
#: The models take 224-384 pixels, the thumbnails 320 and OCR 1280 by default; frames of 4K and
#: 8K video at full size cost 4-16 times the memory, and HDR's tone mapping 4-16 times the time.
FRAME_SIDE = 1920


#: the errors row of a local file gone since it was listed: said alone, without the decoder's
#: words, which only guess it ("no such video file (... deleted or moved after it was listed,
#: or a manifest names a file that never existed?)")
REMOVED = "the file was removed after it was listed (deleted or moved)"


def changed_since_listed(ref: VideoRef) -> str | None:
    """Why decoding a local file failed where it changed after it was listed (replaced or
    rewritten while the run went on: its frames are not those the listing counted), or
    `REMOVED`; None else. (A bucket object changed while it was downloaded fails its download:
    `workers.remote_copy.download`.)"""
    if ref.mtime_ns is None or "://" in ref.uri:
        return None
    try:
        now = os.stat(ref.uri)
    except OSError:
        return REMOVED
    if (now.st_size, now.st_mtime_ns) == (ref.size_bytes, ref.mtime_ns):
        return None
    return "the file changed after it was listed (the next run processes it again)"


class _ReadingStage(Stage):
    """A stage that reads the video file (decode, sample)."""

    def _record_read_failure(self, task: VideoTask, exc: Exception) -> None:
        """The errors row of a video this stage could not read: the decoder's words, after what
        changed since the listing where something did; a file gone since, that alone. Either is
        no bad file: what failed is not the listed file (`StageError.bad_file`)."""
        cause = changed_since_listed(task.ref)
        if cause == REMOVED:
            self._record_failure(task, exc, REMOVED, bad_file=False)
        else:
            self._record_failure(task, exc, describe_failure(exc), cause, bad_file=False if cause else None)


class DecodeStage(_ReadingStage):
    """Reads container facts (`meta`) and, when shots run, every frame at 48x27 (`shot_frames`).

    Without shot detection, or for a video of more frames than `shots.max_frames` (whose 48x27
    frames are not gathered), it also sets the whole video as the one segment.
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
        #: set by a Ray task whose videos are sampled in a later task (after the shot detector):
        #: a bucket video's copy is left on this node for it (`workers.remote_copy.hand_on_download`)
        self.hands_on_copies = False

    def process(self, tasks: list[VideoTask]) -> None:
        """Probe and (for shots) thumbnail each video; raises on a file no decoder can read."""
        for task in tasks:
            try:
                self._decode(task)
            except Exception as exc:  # noqa: BLE001 - one video's errors row; the others go on
                # recorded here, not by Stage.run's retry of each video alone: that would decode
                # the good videos twice and wait for a hung one twice. The row says where the
                # decoder child failed, not where it was re-raised
                self._record_read_failure(task, exc)

    def _decode(self, task: VideoTask) -> None:
        shots, sampling = self.config.enabled("shots"), self.config.sampling
        with local_copy(task.ref.uri, self.config.storage, listed_version(task), task.local_path) as path, _named(path, task.ref.uri):
            meta, shot_frames = run_guarded(
                functools.partial(read_video, path, shots, sampling.max_video_frames, sampling.max_pixels_per_video,
                                  self.config.resources.decoder, max_frame_pixels=sampling.max_frame_pixels,
                                  max_shot_frames=self.config.shots.max_frames),
                self.config.resources.decode_timeout_s, task.ref.uri,
            )
        task.meta = meta
        if self.hands_on_copies and task.local_path is None:
            task.local_path = hand_on_download(task.ref.uri, self.config.storage, listed_version(task),
                                               self.config.resources.download_ahead_bytes)
        if shot_frames is None:  # (with shots on: past their bound, which the run's summary names)
            task.segments = [whole_video_segment(meta, OVER_SHOTS_MAX_FRAMES if shots else WHOLE_VIDEO)]
        else:
            task.shot_frames = shot_frames


class SampleStage(_ReadingStage):
    """Decodes the sampled frames once and prepares them for each model (and OCR keyframes).

    `preparers` maps a model role ("embed", "captions") to an object whose
    `prepare(frames uint8 [N,H,W,3] RGB) -> uint8 [N,3,h,w]` resizes and crops for that model;
    the executors hand over the driver's, in a new process detached from their processors so
    that it needs no transformers (`workers.models.detached_preparers`); without them they come
    from `workers.models.load_frame_preparers(config)`.
    """

    name = "sample"
    reads = ("ref", "meta", "segments")
    # segments get their presentation times here, where the decoder that knows them is open; the
    # facts and segments are PyAV's where decord fails over to it here (`read_decodable`)
    writes = ("frames", "segments", "meta")
    takes_preparers = True

    def __init__(self, config: RunConfig, preparers: dict | None = None) -> None:
        self.config = config
        if preparers is None:
            from workers.models import load_frame_preparers  # heavy (transformers); only when used

            preparers = load_frame_preparers(config)
        self.preparers = preparers
        #: set by a Ray task without the decode stage: a video's `local_path` is a copy a decode
        #: task handed on (`DecodeStage.hands_on_copies`), deleted once this stage is done with it
        self.drops_handed_copies = False

    def run(self, tasks: list[VideoTask]) -> list[VideoTask]:
        """`Stage.run`, then (`drops_handed_copies`) every video's handed-on copy deleted, those
        of videos it left out (a stage before failed) too."""
        try:
            return super().run(tasks)
        finally:
            if self.drops_handed_copies:
                for task in tasks:
                    if task.local_path is not None:
                        Path(task.local_path).unlink(missing_ok=True)
                        task.local_path = None

    def process(self, tasks: list[VideoTask]) -> None:
        """Fill `task.frames` for each video and drop its shot thumbnails."""
        for task in tasks:
            task.shot_frames = None  # only shot detection needed them; keep them off the wire
            try:
                task.frames = self._sample(task)
            except Exception as exc:  # noqa: BLE001 - as in DecodeStage: one row, no second try
                self._record_read_failure(task, exc)
                continue
            left_out = task.frames.undecodable
            if len(left_out):
                # no errors row: the video's results are whole for the frames it has, and a row
                # would have every later run retry a file whose damage no retry mends
                log.warning("%s: sampled frames %s%s could not be decoded (a corrupt stretch of the file?); "
                            "left out, %d sampled frames kept", task.ref.uri, left_out[:10].tolist(),
                            " ..." if len(left_out) > 10 else "", len(task.frames.frame_index))

    def _sample(self, task: VideoTask) -> SampledFrames:
        meta = task.meta
        with local_copy(task.ref.uri, self.config.storage, listed_version(task), task.local_path) as path, _named(path, task.ref.uri):
            # everything up to the model-size frames runs in the decode child: only those, OCR's
            # keyframes and the thumbnails come back, not the full-size frames
            frames, task.segments, task.meta = run_guarded(
                functools.partial(sample_video, path, meta, task.segments, self.config, self.preparers,
                                  task.stages),
                self.config.resources.decode_timeout_s, task.ref.uri,
            )
        return frames


def sample_video(path: str, meta: VideoMeta, segments: Sequence[Segment], config: RunConfig,
                 preparers: dict, stages: frozenset[str] | None = None
                 ) -> tuple[SampledFrames, list[Segment], VideoMeta]:
    """The sample stage's work on a local video: (its sampled frames prepared for each model,
    with OCR's keyframes and the thumbnails; its segments placed by presentation time; its facts,
    `meta` or, where decord failed over to PyAV as it read them, PyAV's: `read_decodable`).

    With `stages` (a rerun of some output units: `VideoTask.stages`), only what those stages
    read: the frames of their models, OCR's keyframes if OCR reruns, and no thumbnails (a core
    table, which such a rerun does not write). The frames are decoded as a full run decodes them,
    so that the rerun's results are those a full run would give.
    """
    output = config.output
    runs = (lambda stage: True) if stages is None else stages.__contains__
    frames, times, indices, segments, undecodable, meta = read_decodable(
        path, meta, segments, config.sampling, frame_side(config))
    frames = as_displayed(frames, meta)
    timestamps = times[: len(indices)]
    segments = _retimed(segments, times[len(indices):], meta)
    keyframes = {}  # the frames OCR reads (`ocr.frames`), by position in `indices`
    if config.enabled("ocr") and runs("ocr"):
        if config.ocr.frames == "sampled":
            positions = range(len(indices))
        else:
            found = np.searchsorted(indices, [segment.keyframe_index for segment in segments])
            positions = [int(p) for p, s in zip(found, segments) if p < len(indices) and indices[p] == s.keyframe_index]
        for position in positions:
            keyframes[position] = _fit_within(frames[position], config.ocr.max_side)
    segment_index = segment_of(indices, segments)
    thumbnails = make_thumbnails(
        frames, indices, timestamps, segment_index, segments,
        output.thumbnail_width, output.thumbnail_quality, output.thumbnails_per_video,
    ) if output.thumbnails and stages is None else []
    sampled = SampledFrames(
        frame_index=indices,
        timestamp_s=timestamps,
        segment_index=segment_index,
        prepared={role: preparer.prepare(frames) for role, preparer in preparers.items() if runs(role)},
        keyframes=keyframes,
        thumbnails=thumbnails,
        undecodable=undecodable,
    )
    return sampled, segments, meta


def read_video(path: str, shots: bool, max_frames: int, max_pixels: int = SamplingConfig().max_pixels_per_video,
               decoder: str = "decord", max_frame_pixels: int = SamplingConfig().max_frame_pixels,
               max_shot_frames: int = 0) -> tuple[VideoMeta, np.ndarray | None]:
    """Container facts of a local video and, when `shots`, every frame at 48x27 (the decode stage's work),
    or None where the video has more than `max_shot_frames` frames (`shots.max_frames`; 0: no bound),
    known before any is decoded: none is gathered then.

    `decoder` is `resources.decoder` (see `open_video`); the facts name the decoder that read
    the video, which the sample stage reads with in turn.

    Refuses, before decoding any frame, a video whose one frame has more than `max_frame_pixels`
    pixels (`probe`, from the stream's header), before opening it, an MP4/MOV whose index claims
    more than `max_frames` frames for a video track (`probe`), and, before reading its frames, a
    video of more than `max_frames` frames or whose one frame has more than `max_pixels` pixels;
    PyAV stops at a frame of more than `max_frame_pixels` (a stream that grows midway).
    `frame_count` in the facts is the working decoder's count (the frames actually decoded when
    all were read), and `duration_s`, where the container states no duration or no frame count,
    or the file holds fewer frames than it states, or its stated duration ends before its last
    frame is shown, runs from the first frame to the end of the last.
    """
    meta = probe(path, max_frame_pixels, max_frames)
    if meta.width * meta.height > max_pixels:
        raise VideoDecodeError(
            f"{path}: one {meta.width}x{meta.height} frame exceeds the limit of {max_pixels} decoded "
            "pixels (sampling.max_pixels_per_video)"
        )
    source = open_video(path, meta, decoder=decoder, max_frame_pixels=max_frame_pixels)
    try:
        # the source's count, which is what decoding reads: Matroska and WebM state none, and the
        # header's duration x rate of a sparse variable-rate recording is far more
        _check_frame_count(path, source.frame_count, max_frames)
        # held to `max_frames` too: where decord fails midway, PyAV gathers the frames by its own
        # count, which may be more, and gathers none past the bound
        bound = min(max_shot_frames, max_frames) if max_shot_frames else max_frames
        shot_frames = source.all_frames_small(max_frames=bound) if shots else None
        _check_frame_count(path, source.frame_count, max_frames)  # (PyAV's, where decord failed over to it)
        facts = recorded_facts(meta, source, source.frame_count if shot_frames is None else len(shot_frames))
    except BaseException:
        source.close()
        raise
    KeptSource.keep(path, source)  # the sample stage reads its frames next, usually here
    return facts, shot_frames


def _check_frame_count(path: str, count: int, max_frames: int) -> None:
    """Refuse a video of more than `max_frames` frames (`sampling.max_video_frames`)."""
    if count > max_frames:
        raise VideoDecodeError(
            f"{path}: {count} frames exceed the limit of {max_frames} frames per video "
            "(sampling.max_video_frames); raise it, or split the video"
        )


def frame_side(config: RunConfig) -> int:
    """The longer side the sample stage decodes frames at, at most: `FRAME_SIDE`, or OCR's
    `max_side` where that is more."""
    return max(FRAME_SIDE, config.ocr.max_side if config.enabled("ocr") else 0)


def _retimed(segments: Sequence[Segment], times: np.ndarray, meta: VideoMeta) -> list[Segment]:
    """Segments starting when their first frame is shown and ending when their last one ends,
    or the video does (a container may state a duration that ends within the last frame).

    Equal to frame / fps at a constant rate; right in a variable-rate video.
    """
    starts = {s.start_frame: float(times[2 * k]) for k, s in enumerate(segments)}
    out = []
    for k, segment in enumerate(segments):
        end_s = starts.get(segment.end_frame + 1, frame_end(float(times[2 * k + 1]), meta.fps))
        if meta.duration_s > 0:
            end_s = min(end_s, meta.duration_s)
        out.append(dataclasses.replace(segment, start_s=float(times[2 * k]), end_s=end_s))
    return out


def listed_version(task: VideoTask) -> tuple:
    """The listed version of a task's video: a kept download is reused only for the same one."""
    return task.ref.size_bytes, task.ref.mtime_ns, task.ref.etag


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
    size = fitted_size(width, height, max_side)
    if size == (width, height):
        return frame.copy()  # a copy, so the full batch of frames can be freed
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
