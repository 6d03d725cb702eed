"""Small JPEG thumbnails of sampled frames, written at run time so a report needs no video.

The sample stage is the one place where full-resolution frames exist; it hands them here
and keeps only the JPEG bytes on the task. Which frames: every segment's keyframe first
(the longest segments first when the bound bites), then the other sampled frames spread
evenly, at most `output.thumbnails_per_video` per video.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from workers.task import Segment


@dataclass
class Thumbnail:
    """One sampled frame as a small JPEG."""

    frame_index: int
    timestamp_s: float
    segment_index: int
    #: True when this frame is a segment's keyframe.
    keyframe: bool
    width: int
    height: int
    jpeg: bytes


def thumbnail_positions(
    frame_index: np.ndarray, segments: Sequence[Segment], limit: int
) -> list[int]:
    """Positions into `frame_index` to thumbnail: keyframes of the longest segments, then an even spread."""
    if limit <= 0 or len(frame_index) == 0:
        return []
    where = {int(index): position for position, index in enumerate(frame_index)}
    longest_first = sorted(segments, key=lambda s: (s.start_frame - s.end_frame, s.start_frame))
    chosen = list(dict.fromkeys(
        where[s.keyframe_index] for s in longest_first if s.keyframe_index in where
    ))[:limit]
    taken = set(chosen)
    others = [p for p in range(len(frame_index)) if p not in taken]
    room = limit - len(chosen)
    if room > 0 and others:
        step = len(others) / min(room, len(others))
        chosen += [others[int((k + 0.5) * step)] for k in range(min(room, len(others)))]
    return sorted(chosen)


def encode_jpeg(frame: np.ndarray, width: int, quality: int) -> tuple[bytes, int, int]:
    """RGB uint8 [H, W, 3] -> (JPEG bytes, width, height), resized to `width` pixels wide (never up)."""
    height, source_width = frame.shape[:2]
    if source_width > width:
        size = (width, max(1, round(height * width / source_width)))
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    ok, buffer = cv2.imencode(
        ".jpg", cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, int(quality)],
    )
    if not ok:
        raise ValueError(f"could not encode a {frame.shape} frame as JPEG")
    return buffer.tobytes(), int(frame.shape[1]), int(frame.shape[0])


def make_thumbnails(
    frames: np.ndarray,
    frame_index: np.ndarray,
    timestamp_s: np.ndarray,
    segment_index: np.ndarray,
    segments: Sequence[Segment],
    width: int = 160,
    quality: int = 75,
    limit: int = 24,
) -> list[Thumbnail]:
    """Thumbnails of at most `limit` of the decoded frames (RGB [N, H, W, 3], aligned with the indices)."""
    keyframes = {s.keyframe_index for s in segments}
    thumbnails = []
    for position in thumbnail_positions(frame_index, segments, limit):
        jpeg, w, h = encode_jpeg(frames[position], width, quality)
        index = int(frame_index[position])
        thumbnails.append(Thumbnail(
            frame_index=index, timestamp_s=float(timestamp_s[position]),
            segment_index=int(segment_index[position]), keyframe=index in keyframes,
            width=w, height=h, jpeg=jpeg,
        ))
    return thumbnails
