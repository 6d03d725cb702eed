"""The sections of the run configuration (`schemas.config.RunConfig`): one frozen dataclass each,
with its defaults, what each setting means, and the range of every numeric one (`BOUNDS`)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from schemas.secrets import redacted_url
from schemas.vocabularies import COCO_OBJECTS, OBJECT_TEMPLATES, PLACES_SCENES, SCENE_TEMPLATES

#: every stage, in the order the pipeline runs them.
ALL_STAGES = ("shots", "embed", "objects", "scenes", "captions", "match", "ocr")
SAMPLING_MODES = ("uniform", "fps", "keyframes")
#: the frames OCR reads: each shot's keyframe, or every sampled frame.
OCR_FRAMES = ("keyframes", "sampled")
QUANTIZE_MODES = ("none", "int8")
#: the models' precisions (`workers.models.resolve_dtype`).
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_EMBED_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_CAPTION_MODEL = "microsoft/git-base-vatex"



class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""



@dataclass(frozen=True)
class SamplingConfig:
    """Which frames are taken from each video for the models."""

    #: "uniform": num_frames evenly spaced in time; "fps": `fps` frames a second; "keyframes": per shot.
    #: In every mode each shot's keyframe is sampled too (8 uniform frames: 9 for a video of one shot).
    mode: str = "uniform"
    num_frames: int = 8
    fps: float = 1.0
    #: upper bound on frames sampled per video in any mode (keyframes of shots included): with more
    #: shots than this, the longest keep their keyframe and the others get no frame, so no results.
    max_frames: int = 64
    #: frames per shot in "keyframes" mode, spread over the shot.
    frames_per_shot: int = 1
    #: bound on decoded pixels per video (frames x width x height), against decompression bombs.
    max_pixels_per_video: int = 64 * 3840 * 2160
    #: move each sampled frame to the nearest keyframe within half its sampling interval (shot
    #: keyframes stay): one decoded frame per sample instead of up to a keyframe interval, so
    #: sampling a long video costs about what a short one does; frames are less evenly spaced.
    snap_to_keyframes: bool = False
    #: bound on frames per video: shot detection decodes every frame (48x27, ~4 KB each), so a
    #: longer video is refused with an errors row (about 5 hours at 30 fps, 2 GB of thumbnails);
    #: an MP4/MOV whose index claims more for a video track, before FFmpeg opens it.
    max_video_frames: int = 540_000
    #: bound on one frame's coded size (width x height), checked from the stream's header before a
    #: frame is decoded, and by PyAV on each frame it decodes (a stream may grow midway): 16384x8192,
    #: a 16K 360 video's, twice a 12K 360 rig's (11520x5760); a 16000x16000 frame took 1.5 GB to
    #: decode (docs/robustness.md).
    max_frame_pixels: int = 16384 * 8192


@dataclass(frozen=True)
class ModelsConfig:
    """Which Hugging Face models to use (hub id or local folder) and where to run them."""

    embed: str = DEFAULT_EMBED_MODEL
    captions: str = DEFAULT_CAPTION_MODEL
    embed_revision: str | None = None
    captions_revision: str | None = None
    #: never run code shipped with a model unless explicitly allowed.
    trust_remote_code: bool = False
    #: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    #: "auto" (bf16 on CUDA with bf16 support, else fp16 on CUDA; on a CPU bf16 where it has bf16
    #: instructions, else fp32: `workers.models.resolve_dtype`), "float32", "float16", "bfloat16".
    dtype: str = "auto"
    #: a folder where downloaded models are cached (defaults to the Hugging Face cache).
    cache_dir: str | None = None
    #: run the models' encoders through torch.compile (slower start, faster steady state).
    compile: bool = False
    #: "int8": dynamic int8 quantisation of Linear layers on CPU (ignored on GPU); "none" keeps the weights.
    quantize: str = "none"
    #: where encoded label vocabularies are kept between runs (`workers.text_cache`): "auto"
    #: ($VIDLENS_CACHE_DIR, else $XDG_CACHE_HOME/vidlens or ~/.cache/vidlens), a folder, or "off".
    text_cache: str = "auto"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"models.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        # (an empty text_cache was the current folder, filled with a file a vocabulary; an empty
        # model is refused where its stage runs: `RunConfig`)
        if not self.text_cache.strip():
            raise ConfigError("models.text_cache: empty: give a folder, auto or off")
        if self.cache_dir is not None and not self.cache_dir.strip():  # (Hugging Face's: the current folder)
            raise ConfigError("models.cache_dir: empty: give a folder, or leave it out for the Hugging Face cache")


@dataclass(frozen=True)
class ShotsConfig:
    """TransNetV2 shot detection."""

    threshold: float = 0.5
    #: windows of 100 frames processed together; 0 picks by device (`workers.shots`): 1 on a CPU,
    #: where one window's activations stay in cache, 8 on a GPU, where more run faster.
    batch_windows: int = 0
    #: a video of more frames than this gets no shot detection: one segment, as with shots off
    #: (`segments.source` "over_shots_max_frames"), and the run's summary names it; its 48x27 frames
    #: are never gathered. A count, not a time, so results do not depend on the machine. 324,000 is
    #: 3 hours at 30 fps (3 h 45 at 24, 1 h 30 at 60): a feature film gets its shots, a recording or a
    #: livestream of hours does not. TransNetV2 reads 120-370 frames a second on 2 CPU cores (float32
    #: to bf16: 15-45 minutes for such a video), and the frames take 3,888 bytes each (1.26 GB, held
    #: by the decode child and the worker alike). 0: no bound (`sampling.max_video_frames` still holds).
    max_frames: int = 324_000


@dataclass(frozen=True)
class LabelsConfig:
    """Zero-shot object and scene vocabularies, scored against the same embeddings."""

    objects: tuple[str, ...] = COCO_OBJECTS
    scenes: tuple[str, ...] = PLACES_SCENES
    object_templates: tuple[str, ...] = OBJECT_TEMPLATES
    scene_templates: tuple[str, ...] = SCENE_TEMPLATES
    top_k: int = 5
    #: a label "holds" on a frame where it is among the frame's top_k with at least this score.
    min_score: float = 0.05


@dataclass(frozen=True)
class CaptionsConfig:
    """Caption generation settings."""

    per_segment: bool = True
    max_new_tokens: int = 30
    num_beams: int = 1
    #: read by no captioner: GIT reads the frames its temporal embeddings fix (6, as GIT-VATEX was
    #: trained on), an image captioner one; a run says so where it is set to another count.
    frames_per_caption: int = 6
    #: at most this many segments are captioned per video (the longest ones).
    max_segments: int = 32


@dataclass(frozen=True)
class MatchConfig:
    """Text queries scored against every video and segment."""

    queries: tuple[str, ...] = ()
    #: a text file with one query per line, added to `queries` (lines starting with "#" are comments).
    queries_file: str | None = None
    #: prompt template applied to each query before encoding ("{}" is the query).
    template: str = "{}"


@dataclass(frozen=True)
class OcrConfig:
    """On-screen text on keyframes (or every sampled frame) with RapidOCR."""

    min_confidence: float = 0.5
    #: frames are downscaled so their longer side is at most this many pixels.
    max_side: int = 1280
    #: "keyframes": each shot's keyframe; "sampled": every sampled frame, for text that changes
    #: within a shot (subtitles, a scoreboard), at the cost of OCR on each of them.
    frames: str = "keyframes"


@dataclass(frozen=True)
class OutputConfig:
    """What is written, beyond the tables every run writes."""

    frame_embeddings: bool = True
    #: small JPEGs of sampled frames (keyframes first) in the thumbnails table, for `vidlens report`;
    #: about 5 KB each: turn off for huge batches that will never be looked at.
    thumbnails: bool = True
    thumbnail_width: int = 160
    thumbnail_quality: int = 75
    thumbnails_per_video: int = 24
    #: at most this many rows of a table in one Parquet file: a published batch's rows of a table
    #: beyond it go to more files (`vidlens compact` merges files to its own --rows-per-file).
    rows_per_file: int = 50_000
    #: finished videos are published in batches of this many videos or this many seconds,
    #: whichever comes first: a killed run loses at most the batches being published (up to
    #: three, `pipeline.publisher.BATCHES_AT_ONCE`) and the one filling.
    commit_every_videos: int = 32
    commit_every_s: float = 60.0


@dataclass(frozen=True)
class ResourcesConfig:
    """How the job is spread over Ray: none of this changes a result, so none of it is fingerprinted."""

    #: "ray" runs the Ray Data plan; "local" runs the same stages in this process (debugging, tests).
    executor: str = "ray"
    #: Ray address; None starts a local Ray instance (or joins the one RAY_ADDRESS names).
    ray_address: str | None = None
    #: GPUs per model actor (fractions share a GPU). None: 1 where the cluster has a GPU for each
    #: GPU model stage's actors, else the GPUs shared equally (one GPU, three stages: 0.33 each,
    #: so that every stage's actor can start); 0 without a GPU.
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float = 1.0
    #: bytes of memory each model actor declares to Ray's scheduler; with the tasks', scaled down
    #: alike where every actor and two decode tasks would not fit in what the cluster has.
    actor_memory_bytes: int = 2 * 1024**3
    min_actors: int = 1
    max_actors: int = 1
    #: videos decoded at once: Ray decode tasks (None lets Ray decide), or the local executor's
    #: decoding worker processes (None: one per core).
    decode_concurrency: int | None = None
    #: remote videos downloaded ahead, on threads, while earlier ones decode: by the local
    #: executor's driver for its workers (None: as many as decoding workers), and by each Ray
    #: decode or sample task of several videos, the next while it reads one (None: 1). 0: every
    #: video is downloaded where it is decoded when its turn comes.
    download_ahead: int | None = None
    #: at most this many bytes of those copies (by the listed sizes) in the temp folder
    #: ($TMPDIR) or downloading at once; past it the next videos are left to their workers.
    download_ahead_bytes: int = 2 * 1024**3
    #: videos per batch handed to a model actor; frames are batched across them.
    videos_per_batch: int = 4
    #: frames per forward pass in the embedding model.
    frames_per_batch: int = 64
    #: per stage overrides of the knobs above, e.g. {"captions": {"num_gpus": 0.5,
    #: "videos_per_batch": 2, "max_actors": 4, "memory_bytes": 8e9}}. Model stages ("shots",
    #: "embed", "captions", "ocr") take all six; CPU stages ("decode", "sample") take num_cpus (by
    #: default the plan's share of the CPUs, half of it for a bucket's videos: two tasks a share),
    #: memory_bytes and videos_per_batch (videos per Ray task: up to 4 by default; decode 1 when shots run).
    per_stage: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Ray Data read tasks that take listed videos off the driver's queue (they only wait: no CPU declared).
    #: Each holds a worker process (~110 MiB) for the whole run and takes a group of videos a call;
    #: one passes 380-500 videos/s on 2 cores with nothing downstream: raise it only past that.
    feed_readers: int = 1
    #: listed videos in the pipeline at once (queued, decoding, in a model stage); the listing
    #: pauses at this many. None: enough for every decode task the cluster can run at once to hold
    #: a full task with the next one waiting, at least 256 (`pipeline.plan.videos_in_flight`).
    max_videos_in_flight: int | None = None
    #: bytes of memory each decode/sample task declares to Ray's scheduler (None: none declared).
    task_memory_bytes: int | None = 512 * 1024**2

    def __hash__(self) -> int:  # `per_stage` is a dict: hash its stable text
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))
    #: "decord": decord reads the formats it reads exactly (`workers.decode._DECORD_CODECS`), PyAV
    #: the rest and those decord cannot open; "pyav": PyAV reads every video. Both return the same
    #: frames. On the real H.264 clips with B-frames PyAV read 8 or 32 frames 1.3-1.9x faster, as
    #: it leaves out the frames nothing refers to; without B-frames they were within 0.8-1.3x
    #: (bench.sampling).
    decoder: str = "decord"
    #: seconds after which decoding one video is abandoned (an errors row). Each video is
    #: decoded in a forked child process that is killed at the deadline; 0 decodes in-process.
    decode_timeout_s: float = 300.0
    #: decode and sample task workers are replaced after about this many videos (Ray
    #: `max_calls`), so memory leaked in a worker cannot pile up; 0 keeps them for the whole run.
    #: A backstop only: the decoders themselves run in guard children replaced far more often,
    #: and a new worker costs a second or two of imports.
    max_videos_per_worker: int = 1000
    #: videos per Ray Data execution: a longer listing runs as successive executions of this many.
    #: Ray Data keeps statistics for every block until its execution ends (the driver about 3 KiB
    #: a video, its stats actor about 6), and gives them back for the next one to reuse; each new
    #: execution restarts the model actors (seconds). 0: the whole listing in one execution.
    videos_per_dataset: int = 50_000


@dataclass(frozen=True)
class IncrementalConfig:
    """What a run does with the videos earlier runs failed on: none of it changes a result, so none
    of it is fingerprinted."""

    #: a video that failed as a whole for its file's own bytes (empty, truncated, not a video, a
    #: codec no decoder has: `workers.decode.VideoDecodeError.bad_file`), or that a manifest names
    #: and is not there, in this many runs in a row, unchanged, is skipped as `given up` until the
    #: file changes or a run has --retry-failed: its errors row stays, and the run's exit code no
    #: longer says it failed. 0 retries it every run.
    give_up_after: int = 3


#: the range of each numeric setting: (lowest, highest or None, whether the lowest itself is
#: refused). Checked when a configuration is built, so that a value no stage can work with
#: stops the run before any video rather than failing every video alike.
BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    **{f"sampling.{k}": (1, None, False) for k in ("num_frames", "max_frames", "frames_per_shot",
                                                   "max_pixels_per_video", "max_video_frames",
                                                   "max_frame_pixels")},
    "sampling.fps": (0, None, True),
    "shots.threshold": (0, 1, False),
    "shots.batch_windows": (0, None, False),
    "shots.max_frames": (0, None, False),
    "labels.top_k": (1, None, False),
    "labels.min_score": (0, 1, False),
    **{f"captions.{k}": (1, None, False) for k in ("max_new_tokens", "num_beams", "frames_per_caption")},
    "captions.max_segments": (0, None, False),
    "ocr.min_confidence": (0, 1, False),
    "ocr.max_side": (32, None, False),
    "output.thumbnail_width": (1, None, False),
    "output.thumbnail_quality": (1, 100, False),
    "output.thumbnails_per_video": (0, None, False),
    **{f"output.{k}": (1, None, False) for k in ("rows_per_file", "commit_every_videos")},
    "output.commit_every_s": (0, None, True),
    "storage.retries": (0, None, False),
    "resources.download_ahead": (0, None, False),
    "resources.download_ahead_bytes": (1, None, False),
    "storage.retry_backoff_s": (0, None, False),
    "incremental.give_up_after": (0, None, False),
    **{f"resources.{k}": (1, None, False) for k in ("actor_memory_bytes", "task_memory_bytes")},
    **{f"resources.{k}": (1, None, False) for k in ("min_actors", "max_actors", "decode_concurrency",
                                                    "videos_per_batch", "frames_per_batch", "feed_readers",
                                                    "max_videos_in_flight")},
    **{f"resources.{k}": (0, None, False) for k in ("num_gpus_per_actor", "num_cpus_per_actor", "decode_timeout_s",
                                                    "max_videos_per_worker", "videos_per_dataset")},
}


@dataclass(frozen=True)
class StorageConfig:
    """How buckets (s3://, gs://, az://) are reached; none of it changes a result.

    Leave `key`, `secret` and `token` empty and let the usual environment provide them
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, GOOGLE_APPLICATION_CREDENTIALS,
    AZURE_STORAGE_*, ~/.aws/credentials): set here, they are still never stored or printed.
    """

    #: an S3-compatible store's URL (MinIO, SeaweedFS, R2, ...; else AWS_ENDPOINT_URL or the
    #: default), a GCS emulator's, or an Azure Blob endpoint (Azurite, Azure Stack).
    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    #: anonymous access to public buckets.
    anon: bool = False
    #: any other fsspec option of the filesystem (s3fs, gcsfs, adlfs), passed as it is.
    options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: attempts at each read, write or listing call before a transient error (timeout, 5xx) wins.
    retries: int = 5
    #: seconds before the first retry; doubled for each next one.
    retry_backoff_s: float = 0.5

    def __hash__(self) -> int:  # `options` is a dict: hash what identifies the store
        return hash((self.endpoint_url, self.region, self.key, self.anon))

    def __repr__(self) -> str:  # (the dataclass's, an endpoint's password shown as `***`)
        shown = ", ".join(f"{f.name}={redacted_url(getattr(self, f.name))!r}"
                          for f in dataclasses.fields(self) if f.repr)
        return f"{type(self).__name__}({shown})"
