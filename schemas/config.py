"""The run configuration: one frozen, typed object, loaded from YAML and overridden from the CLI.

Every section is a frozen dataclass. `RunConfig.from_dict` checks every key and type and
names the offending key in its error; `RunConfig.fingerprint()` hashes everything that can
change a result (not the resource knobs), and is stored on every output row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.vocabularies import COCO_OBJECTS, OBJECT_TEMPLATES, PLACES_SCENES, SCENE_TEMPLATES

#: settings that can change a result and came after outputs existed ("section.key": the default
#: they came with). Left at that default, one is not part of the fingerprints, so that the
#: version that adds it reruns nobody's videos (docs/incremental.md). A setting added without
#: an entry here changes every fingerprint, which a test of the default ones catches.
ADDED_SETTINGS: dict[str, Any] = {"ocr.frames": "keyframes", "sampling.max_frame_pixels": 16384 * 8192}

#: settings that change no result: where models are cached and encoded labels kept, how many shot
#: windows a forward pass takes, how rows are batched into files and published, and the bounds on
#: what a video may cost to decode (its largest frame, its frames, its sampled pixels: a video
#: one refuses has no rows, and is tried again once it is raised). No fingerprint tells
#: configurations apart by them, so that changing one reruns no video and `vidlens submit` gives
#: the batch the same job id.
NOT_RESULTS = ("models.cache_dir", "models.text_cache", "shots.batch_windows",
               "output.rows_per_file", "output.commit_every_videos", "output.commit_every_s",
               "sampling.max_frame_pixels", "sampling.max_video_frames", "sampling.max_pixels_per_video")

#: the environment variable that carries a job's configuration (JSON, without secrets) to the job
#: `vidlens submit` sends (`vidlens run --config-env`).
SUBMITTED_CONFIG_ENV = "VIDLENS_CONFIG_JSON"

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
    #: windows of 100 frames processed together (more uses more memory, runs faster on GPU).
    batch_windows: int = 8


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
_BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    **{f"sampling.{k}": (1, None, False) for k in ("num_frames", "max_frames", "frames_per_shot",
                                                   "max_pixels_per_video", "max_video_frames",
                                                   "max_frame_pixels")},
    "sampling.fps": (0, None, True),
    "shots.threshold": (0, 1, False),
    "shots.batch_windows": (1, None, False),
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

#: settings of `storage` whose values are secrets: never printed, stored or fingerprinted.
SECRET_STORAGE_KEYS = ("key", "secret", "token")
#: what a secret is replaced with wherever a configuration is shown or stored.
REDACTED = "***"
_SECRET_SETTINGS = frozenset(f"storage.{name}" for name in SECRET_STORAGE_KEYS)
#: lists of sentences, where a comma is part of the text: one given as a single text is one item
#: (the other lists, of names such as stages and labels, are split at commas)
_SENTENCE_LISTS = frozenset({"match.queries", "labels.object_templates", "labels.scene_templates"})


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


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of a run."""

    stages: tuple[str, ...] = ALL_STAGES
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    shots: ShotsConfig = field(default_factory=ShotsConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise ConfigError(
                f"stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(ALL_STAGES)}"
            )
        # keep the canonical order whatever order the user wrote
        object.__setattr__(self, "stages", tuple(s for s in ALL_STAGES if s in self.stages))
        if not self.stages:
            raise ConfigError(f"stages: none given; choose one or more of {', '.join(ALL_STAGES)}")
        for setting, templates in (("match.template", (self.match.template,)),
                                   ("labels.object_templates", self.labels.object_templates),
                                   ("labels.scene_templates", self.labels.scene_templates)):
            for template in templates:
                if "{}" not in template:  # (every query or name made the same prompt: equal scores)
                    raise ConfigError(f"{setting}: {template!r} has no {{}} where the text goes, so every text "
                                      "would be the same prompt: write it like \"a video of {}\"")
        for role in ("embed", "captions"):  # (one empty was "a folder that exists but holds no loadable model")
            if self.runs(role) and not getattr(self.models, role).strip():
                raise ConfigError(f"models.{role}: empty: give a Hugging Face model id or a local folder")
        for stage in ("objects", "scenes"):  # (no templates is each name as it is)
            if self.enabled(stage) and not getattr(self.labels, stage):
                raise ConfigError(f"labels.{stage}: none given, and the {stage} stage runs: give one or more names, "
                                  f"or leave {stage} out of stages")
        if any(not query.strip() for query in self.match.queries):
            raise ConfigError("match.queries: an empty query (--query \"\"?): each query is text to score videos against")
        self._set_texts_once()
        if self.sampling.mode not in SAMPLING_MODES:
            raise ConfigError(
                f"sampling.mode: {self.sampling.mode!r} is not one of {', '.join(SAMPLING_MODES)}"
            )
        if self.ocr.frames not in OCR_FRAMES:
            raise ConfigError(f"ocr.frames: {self.ocr.frames!r} is not one of {', '.join(OCR_FRAMES)}")
        if self.models.dtype not in DTYPES:  # (said by the model stages only: after a submit or a schedule)
            raise ConfigError(f"models.dtype: {self.models.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.models.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"models.quantize: {self.models.quantize!r} is not one of {', '.join(QUANTIZE_MODES)}"
            )
        if self.resources.executor not in ("ray", "local"):
            raise ConfigError(f"resources.executor: {self.resources.executor!r} is not 'ray' or 'local'")
        if self.resources.decoder not in ("decord", "pyav"):
            raise ConfigError(f"resources.decoder: {self.resources.decoder!r} is not 'decord' or 'pyav'")
        for name, (low, high, low_excluded) in _BOUNDS.items():
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if value is None:
                continue
            if low_excluded and value <= low:
                raise ConfigError(f"{name}: must be more than {low}, got {value}")
            if value < low or (high is not None and value > high):
                wanted = f"at least {low}" if high is None else f"between {low} and {high}"
                raise ConfigError(f"{name}: must be {wanted}, got {value}")
        if self.resources.min_actors > self.resources.max_actors:
            raise ConfigError(f"resources.min_actors ({self.resources.min_actors}) is more than "
                              f"resources.max_actors ({self.resources.max_actors})")

    def enabled(self, stage: str) -> bool:
        """Whether a stage runs in this configuration."""
        return stage in self.stages

    def runs(self, stage: str, among: frozenset[str] | None = None) -> bool:
        """Whether the pipeline stage `stage` runs (and is `among` those, if given): the embed
        stage also for objects, scenes and match, which it derives from its embeddings."""
        derived = ("embed", "objects", "scenes", "match") if stage == "embed" else (stage,)
        return any(self.enabled(s) for s in derived) and (among is None or stage in among)

    def _set_texts_once(self) -> None:
        """Each label name, template and query once, stripped (the tokenizer reads " car " as "car"):
        a name twice took part of the softmax's probability twice, lowering every other label's
        score and pushing one out of the top k, and its rows came twice; a blank name is refused."""
        labels = {}
        for setting in ("objects", "scenes", "object_templates", "scene_templates"):
            texts = [text.strip() for text in getattr(self.labels, setting)]
            if not all(texts):
                raise ConfigError(f"labels.{setting}: an empty entry: each is a name (or template) to score frames "
                                  "against")
            labels[setting] = tuple(dict.fromkeys(texts))
        object.__setattr__(self, "labels", dataclasses.replace(self.labels, **labels))
        queries = tuple(dict.fromkeys(query.strip() for query in self.match.queries))
        object.__setattr__(self, "match", dataclasses.replace(self.match, queries=queries))

    def all_queries(self) -> tuple[str, ...]:
        """Queries from the config and from `match.queries_file`, without duplicates, in order."""
        queries = list(self.match.queries)
        if self.match.queries_file:
            path = Path(self.match.queries_file)
            if not path.is_file():
                # (as a model folder's: the file at ~/q.txt was said not to exist)
                full = path.expanduser()
                tilde = f" (~ is not expanded here: write {full})" if full.is_file() and full != path else ""
                raise ConfigError(f"match.queries_file: {path} {'is a folder' if path.is_dir() else 'does not exist'}"
                                  f"{tilde}: give a text file of one query a line")
            try:
                text = path.read_text(encoding="utf-8-sig")  # as Notepad saves it, with a BOM
            except UnicodeDecodeError as exc:
                raise ConfigError(f"match.queries_file: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") \
                    from None
            lines = (line.strip() for line in text.splitlines())
            queries += [line for line in lines if line and not line.startswith("#")]  # comments
        return tuple(dict.fromkeys(queries))

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the inverse of `from_dict`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """Canonical JSON, as stored in the runs table, with storage secrets shown as `***`."""
        return json.dumps(self.redacted_dict(), sort_keys=True, separators=(",", ":"))

    def redacted_dict(self) -> dict[str, Any]:
        """`to_dict()` with every storage secret (and secret-looking option) replaced by `***`."""
        body = self.to_dict()
        storage = body["storage"]
        for name in SECRET_STORAGE_KEYS:
            if storage[name] is not None:
                storage[name] = REDACTED
        storage["endpoint_url"] = redacted_url(storage["endpoint_url"])
        storage["options"] = _redact_options(storage["options"])
        return body

    def fingerprint(self) -> str:
        """Hash of everything that can change a result (resources, storage, incremental and
        `NOT_RESULTS` excluded), with the queries file's lines, not its path."""
        body = self._fingerprinted()
        body.pop("resources")
        body.pop("storage")
        body.pop("incremental")
        body["models"].pop("text_cache")  # (never hashed: the fingerprints made since it came stay)
        if self.match.queries_file:
            try:
                body["match"]["queries"] = list(self.all_queries())
                body["match"]["queries_file"] = None
            except ConfigError:
                pass  # a file not here (one on a cluster's nodes) is known by its path alone
        return _hash(body)

    def stage_fingerprint(self, stage: str, queries_path: bool = False, models_as_written: bool = False) -> str:
        """Hash of the settings a single stage's results depend on. The queries file is left out
        (the matches unit hashes its lines), unless `queries_path`; a local model folder is hashed
        by its absolute path (`model_location`), unless `models_as_written`: as fingerprints were
        made before 2026-12-04 (the path) and 2026-12-05 (the model), which outputs still carry."""
        body = self._fingerprinted(models_as_written)
        if not queries_path:
            body["match"]["queries_file"] = None  # (a key, not removed: other fingerprints stay as they were)
        parts = {"sampling": body["sampling"], "shots": body["shots"] if self.enabled("shots") else None}
        parts.update({name: body[name] for name in _STAGE_SECTIONS.get(stage, ())})
        parts["models"] = {k: body["models"][k] for k in _STAGE_MODELS.get(stage, ())}
        return _hash({"stage": stage, **parts})

    def _fingerprinted(self, models_as_written: bool = False) -> dict[str, Any]:
        """`to_dict()` less the `ADDED_SETTINGS` left at the default they were added with, its
        model folders by their absolute paths unless `models_as_written` (./m, /abs/m and /abs/m/
        are one model: `vidlens submit` makes them absolute, and `run` after it reran every video),
        and the `NOT_RESULTS` at their defaults."""
        body = self.to_dict()
        for name in NOT_RESULTS:
            section, key = name.split(".")
            # hashed at its default, not removed: a configuration that leaves them be keeps the
            # fingerprints its rows and its `vidlens submit` job id had
            body[section][key] = getattr(type(getattr(self, section))(), key)
        if not models_as_written:
            for role in ("embed", "captions"):
                body["models"][role] = model_location(body["models"][role])
        for name, default in ADDED_SETTINGS.items():
            section, key = name.split(".")
            if body[section].get(key) == default:
                del body[section][key]
        return body

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "RunConfig":
        """Build from nested plain values (a parsed YAML file), checking every key and type."""
        return _build(cls, raw or {}, "")

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Load a configuration file: TOML where its name ends in .toml, else YAML; an unknown
        key or wrong type is an error naming the file and key."""
        path = Path(path)
        text = _config_text(path)
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # (Python 3.10: its backport, the same parser)
                import tomli as tomllib
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        else:
            import yaml

            try:
                raw = yaml.load(text, Loader=_unique_keys_loader()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from exc
            except ConfigError as exc:
                raise ConfigError(f"config file {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections at its top level")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    #: its name before it read TOML too, kept for the scripts (and tests) that call it
    from_yaml = from_file

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted keys replaced, e.g. {"sampling.num_frames": 16}."""
        body = self.to_dict()
        for dotted, value in overrides.items():
            node = body
            *parents, leaf = dotted.split(".")
            # within a mapping setting the keys are the user's (resources.per_stage.captions.num_gpus)
            within = any(dotted.startswith(f"{name}.") for name in _MAPPING_SETTINGS)
            for part in parents:
                if within and part not in node:
                    node[part] = {}
                if not isinstance(node.get(part), dict):
                    sections = ", ".join(sorted(key for key, value in node.items() if isinstance(value, dict)))
                    raise ConfigError(f"{dotted}: {part!r} is not a configuration section (sections: {sections})")
                node = node[part]
            if leaf not in node and not within:
                # (as the same typo in a YAML file is told)
                raise ConfigError(f"{dotted}: unknown setting (known: {', '.join(sorted(node))})")
            node[leaf] = value
        return RunConfig.from_dict(body)


def _config_text(path: Path) -> str:
    """A configuration file's text; ConfigError where it is not there, a folder or not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give the YAML or TOML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")  # (a byte order mark is UTF-8's too)
    except UnicodeDecodeError as exc:  # (Notepad's "Unicode" is UTF-16)
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is not UTF-8): "
                          "save it as UTF-8") from None


def _yaml_problem(exc: Any) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans four, with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


#: settings that are mappings of the user's keys: `with_overrides` sets a key within them.
_MAPPING_SETTINGS = ("resources.per_stage", "storage.options")

_STAGE_SECTIONS = {
    "shots": ("shots",),
    "embed": (),
    "objects": ("labels",),
    "scenes": ("labels",),
    "captions": ("captions",),
    "match": ("match",),
    "ocr": ("ocr",),
}
_STAGE_MODELS = {
    "embed": ("embed", "embed_revision"),
    "objects": ("embed", "embed_revision"),
    "scenes": ("embed", "embed_revision"),
    "match": ("embed", "embed_revision"),
    "captions": ("captions", "captions_revision"),
}


@functools.cache
def _unique_keys_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping: it kept the last, and a
    section written twice lost the first one's settings without a word."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # (<<: *base, whose keys the mapping's own override)
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    again = key in seen
                    seen.add(key)
                except TypeError:  # (an unhashable key, which the loader refuses itself)
                    continue
                if again:
                    raise ConfigError(f"{key} is given twice (line {key_node.start_mark.line + 1}): "
                                      "write each setting once")
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def model_location(model: str) -> str:
    """A model as outputs know it: a local folder by its absolute path, however it was written
    (./m, /abs/m/), a hub id as given."""
    return os.path.abspath(model) if Path(model).is_dir() else model


def is_secret_option(name: str) -> bool:
    """Whether an fsspec option name holds a credential (key, secret, token, password, ...; an
    Azure connection string carries the account key)."""
    lowered = name.lower()
    return any(word in lowered for word in ("key", "secret", "token", "password", "credential",
                                            "sas", "signature", "connection_string", "conn_str"))


def url_userinfo(url: Any) -> tuple[str, str | None] | None:
    """(user, password or None) of a URL that names them before its host (http://user:password@host),
    else None."""
    if not isinstance(url, str) or "://" not in url:
        return None
    authority = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" not in authority:
        return None
    user, colon, password = authority.rpartition("@")[0].partition(":")
    return user, password if colon else None


def redacted_url(url: Any) -> Any:
    """An http(s) URL with its password shown as `***` (http://user:***@host); a user name alone may be
    a token (http://TOKEN@host), and is shown so too. Anything else as it is (abfs://CONTAINER@ACCOUNT...
    names a container there)."""
    userinfo = url_userinfo(url)
    if userinfo is None or not url.lower().startswith(("http://", "https://")):
        return url
    scheme, rest = url.split("://", 1)
    user, password = userinfo
    given = user if password is None else f"{user}:{password}"
    shown = REDACTED if password is None else f"{user}:{REDACTED}"
    return f"{scheme}://{shown}{rest[len(given):]}"


def _redact_options(options: Any) -> Any:
    if isinstance(options, dict):
        return {k: REDACTED if is_secret_option(str(k)) and v is not None else _redact_options(v)
                for k, v in options.items()}
    if isinstance(options, list):
        return [_redact_options(v) for v in options]
    return redacted_url(options)  # (an endpoint_url, in s3fs' client_kwargs too)


def _hash(body: Any) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # (YAML reads a key on: or 1: as true or a number)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    # a credential's value is never echoed in an error: none is registered for redaction yet
    shown = REDACTED if key in _SECRET_SETTINGS else repr(value)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [value] if key in _SENTENCE_LISTS else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {shown}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got a {type(value).__name__}")
        return dict(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if type(value) is int and value in (0, 1):  # as the texts "0" and "1" are
            return bool(value)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {shown}")
        if hint is int and isinstance(value, str):
            try:
                value = float(value)  # YAML reads 8e9 (no dot) as text
            except ValueError:
                pass
        try:
            number = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {shown}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {shown}")
        if hint is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{key}: expected a whole number, got {shown}")
        return number
    if hint is str:
        if isinstance(value, bool) and key == "models.text_cache" and not value:
            return "off"  # YAML reads an unquoted off as false
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected text, got {shown} (YAML reads an unquoted yes/no/on/off as "
                              "true or false: quote it)")
        if isinstance(value, (int, float)):  # str() would give 1.10 as 1.1, 0123 as 83
            raise ConfigError(f"{key}: expected text, got the number {shown} (YAML reads unquoted digits as a "
                              "number, 1.10 as 1.1 and 0123 as 83: quote it)")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {shown}")
        return value
    return value


def setting_from_text(dotted: str, text: str) -> Any:
    """The value of the setting `dotted` given as `text` on a command line (`--set KEY=VALUE`):
    YAML ("16", "[a, b]", "{decode: {num_cpus: 1}}", "true"), but a text setting's text as written
    ("match.template=a video of: {}" is no mapping, "#{}" no comment) unless quoted, null as none
    and true/false as in a config file (refused for text, "off" for models.text_cache), and a list
    of texts' text as written unless it is a YAML list ("match.queries=a dog: running", "#1 trending"),
    null or nothing as none."""
    import yaml

    cls: Any = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            cls = None  # not a setting: `with_overrides` says so
            break
        cls = typing.get_type_hints(cls)[part]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        if typing.get_origin(cls) is tuple and dotted not in _SENTENCE_LISTS and text.strip().startswith("["):
            # ("[dog, cat" was split at commas into the labels "[dog" and "cat", silently)
            raise ConfigError(f"--set {dotted}: {text.strip()!r} is no YAML list: close its bracket, as in "
                              f"--set {dotted}=[a, b], or give the names split at commas, as in --set {dotted}=a,b")
        return text
    if cls is str or cls == (str | None):
        bare = text.strip()
        if bare in ("null", "~", ""):
            return text if cls is str and not bare else None
        quoted = bare[:1] in ("'", '"') and isinstance(value, str)
        return value if quoted or isinstance(value, bool) else text
    if typing.get_origin(cls) is tuple:
        if text.strip() in ("null", "~", ""):
            return []
        if not isinstance(value, (list, str)):
            return text  # (a list of names split at commas, a sentence one item)
    return value
