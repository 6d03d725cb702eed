"""What the `videos` table records of a video from the decoder that reads its frames: how many
frames it has, that decoder, and how long it runs (`frame_count`, `decoder`, `duration_s`).

The decode stage records them (`workers.sampling.read_video`); the sample stage records them
again where decord fails over to PyAV in its read, as PyAV numbers the frames from then on
(`workers.frame_reading.read_decodable`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from workers.task import VideoMeta

if TYPE_CHECKING:
    from workers.frame_sources import FrameSource


def recorded_facts(probed: VideoMeta, source: FrameSource, frame_count: int) -> VideoMeta:
    """`probed` (the container's facts, from `workers.decode.probe`) with the frame count given,
    the decoder `source` reads with, and the duration: where the container states no duration or
    no frame count, or the file holds fewer frames than it states, or its stated duration ends
    before its last frame is shown, from the first frame to the end of the last."""
    # a live recording (a browser's WebM) states no duration, and a file cut short (an upload
    # that stopped) holds fewer frames than its index states: either ends when its last frame does
    last_shown = float(source.frame_times([frame_count - 1])[0])
    shown_end = frame_end(last_shown, source.fps)
    cut_short = probed.frames_stated and frame_count < probed.frame_count and shown_end < probed.duration_s
    # FFmpeg's MP4 muxer states a variable-rate video's length from its decode times: with
    # B-frames and a slower rate at its end, a length that ends before its last frame is shown
    ends_early = last_shown >= probed.duration_s
    # a container stating no frame count (Matroska, WebM, MPEG-TS) estimates its duration,
    # Matroska's from the file's time 0 rather than from its first frame: the frames say it
    duration_s = (shown_end if cut_short or ends_early or not probed.duration_s or not probed.frames_stated
                  else probed.duration_s)
    return dataclasses.replace(probed, duration_s=duration_s, frame_count=frame_count, decoder=source.decoder)


def frame_end(time_s: float, fps: float) -> float:
    """When a frame shown at `time_s` ends: 0.4, where the sum of 0.36666666666666664 and
    1 / 30 is 0.39999999999999997 (to the nanosecond, far below any frame's length)."""
    return round(time_s + 1 / fps, 9)
