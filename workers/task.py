"""The unit of work that flows through the pipeline: one video and what is known of it so far.

A `VideoTask` is created from a `VideoRef` by the job, then each stage reads some of its
fields and fills others (each stage declares which, and the plan checks the chain when it
is built). Tasks travel between Ray workers as pickled bytes in a single column, so a stage
never depends on how Ray Data would convert nested, variable-shaped fields to Arrow.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np

#: Task fields that exist before any stage has run.
INITIAL_FIELDS = frozenset({"ref"})


@dataclass(frozen=True)
class VideoRef:
    """Where a video is and which version of it: enough to read it and to give it a stable id."""

    uri: str
    size_bytes: int
    #: modification time in nanoseconds since the epoch, or None where only an etag is known.
    mtime_ns: int | None
    etag: str | None
    video_id: str
    #: a manifest lists it, and it is not there (the decode stage's errors row names it; a video
    #: the output already holds is marked missing instead: `pipeline.ledger.decide`)
    absent: bool = False


@dataclass
class VideoMeta:
    """Container and stream facts of one video, as its decoder reports them."""

    duration_s: float
    fps: float
    frame_count: int
    width: int
    height: int
    codec: str
    rotation: int
    has_audio: bool
    container: str
    #: the decoder that read the frames: "decord" or "pyav".
    decoder: str
    #: video streams in the file, cover art aside; the first is the one read and described here.
    video_streams: int = 1
    #: a coded pixel's width to its height: 4/3 for HDV's 1440x1080 shown as 1920x1080, 1 mostly.
    pixel_aspect: float = 1.0
    #: the HDR transfer the stream is coded in, "pq" or "hlg" (its frames are tone mapped to SDR:
    #: `workers.hdr`); "" for SDR.
    transfer: str = ""
    #: whether the container states the frame count (MP4 and MOV do), which `frame_count` then
    #: starts as; otherwise it is estimated from the duration.
    frames_stated: bool = False


@dataclass
class Segment:
    """A shot: frames start_frame..end_frame inclusive, with the confidence of the cut that opens it."""

    index: int
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    confidence: float
    #: "transnetv2" when found by shot detection, "whole_video" when shots are disabled,
    #: "over_shots_max_frames" for a video longer than `shots.max_frames` (`workers.frame_selection`).
    source: str
    #: the frame that stands for the segment (its middle frame).
    keyframe_index: int


@dataclass
class SampledFrames:
    """The frames chosen from one video, in display order, with what each model needs of them.

    `prepared` maps a model role ("embed", "captions") to that model's input for these
    frames: uint8 RGB, already resized and cropped to the model's expected size, shape
    [N, 3, H, W]; the model normalises them on its own device.
    """

    frame_index: np.ndarray  # int64 [N]
    timestamp_s: np.ndarray  # float64 [N]
    segment_index: np.ndarray  # int32 [N]
    prepared: dict[str, np.ndarray] = field(default_factory=dict)
    #: frames kept at (bounded) full resolution for OCR: frame position in this object -> RGB HxWx3.
    keyframes: dict[int, np.ndarray] = field(default_factory=dict)
    #: small JPEGs of some of these frames for reports (`workers.thumbnails.Thumbnail`).
    thumbnails: list = field(default_factory=list)
    #: frames chosen but left out because they could not be decoded (a corrupt stretch of the
    #: file): int64 display indices, not in `frame_index`.
    undecodable: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass
class Label:
    """One zero-shot label (object or scene) for a video or a segment."""

    kind: str  # "object" | "scene"
    level: str  # "video" | "segment"
    segment_index: int | None
    label: str
    rank: int
    score: float
    similarity: float
    #: (start_s, end_s) ranges of the sampled frames where this label holds.
    time_ranges: list[tuple[float, float]]


@dataclass
class Caption:
    """A generated caption for a video or a segment."""

    level: str
    segment_index: int | None
    start_s: float
    end_s: float
    text: str


@dataclass
class Match:
    """The score of one text query against a video or a segment."""

    query: str
    level: str
    segment_index: int | None
    start_s: float
    end_s: float
    similarity: float
    probability: float


@dataclass
class TextBox:
    """On-screen text read by OCR in one frame; box is four (x, y) corners in pixels."""

    frame_index: int
    timestamp_s: float
    segment_index: int
    text: str
    confidence: float
    box: tuple[float, ...]
    #: the line's place among its frame's, in reading order (`workers.ocr.reading_order`), from 0.
    line_index: int = 0


@dataclass
class StageError:
    """Why a stage failed on this video; becomes a row in the errors table."""

    stage: str
    error_type: str
    message: str
    #: the file's own bytes are what failed (`workers.decode.VideoDecodeError.bad_file`): the
    #: ledger counts the runs such a failure fails the video in as a whole (not in the errors table)
    bad_file: bool = False


@dataclass
class VideoTask:
    """Everything the pipeline knows about one video, filled in stage by stage."""

    ref: VideoRef
    meta: VideoMeta | None = None
    #: every frame at 48x27 RGB, for shot detection only; dropped once shots are found.
    shot_frames: np.ndarray | None = None
    segments: list[Segment] = field(default_factory=list)
    frames: SampledFrames | None = None
    frame_embeddings: np.ndarray | None = None  # float32 [N, D], L2-normalised
    segment_embeddings: np.ndarray | None = None  # float32 [S, D]; NaN rows: segments without frames
    video_embedding: np.ndarray | None = None  # float32 [D]
    labels: list[Label] = field(default_factory=list)
    captions: list[Caption] = field(default_factory=list)
    matches: list[Match] = field(default_factory=list)
    texts: list[TextBox] = field(default_factory=list)
    errors: list[StageError] = field(default_factory=list)
    #: seconds spent per stage on this video.
    timings: dict[str, float] = field(default_factory=dict)
    #: (device type, dtype) each model stage ran on this video with, by stage ("embed": ("cpu",
    #: "bfloat16")): the runs table records these, as a worker resolves "auto" on its own node.
    ran_on: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: the stages to run on this video (an incremental rerun of some outputs); None runs every stage.
    stages: frozenset[str] | None = None
    #: a copy of the (remote) video on this machine, downloaded ahead by the local executor's
    #: driver while earlier videos decoded (`pipeline.downloads.DownloadAhead`): read instead of the URI.
    local_path: str | None = None
    #: the fields a stage that failed on this video was to write: a later stage that reads one
    #: skips the video, whose errors row already says why (`Stage.run`).
    unwritten: set[str] = field(default_factory=set)
    #: run in a batch of its own by the local executor: the video failed as a whole in the run
    #: before, maybe in a batch that broke the GPU (`pipeline.job`), whose other videos would
    #: fail with it again.
    alone: bool = False

    @property
    def failed(self) -> bool:
        """True once a stage has failed in a way that leaves nothing for later stages."""
        return self.meta is None and bool(self.errors)

    def to_bytes(self) -> bytes:
        """Serialise for transport between Ray workers (numpy arrays travel out-of-band-friendly)."""
        return pickle.dumps(self, protocol=5)

    @staticmethod
    def from_bytes(payload: bytes) -> "VideoTask":
        """Inverse of `to_bytes`."""
        return pickle.loads(payload)
