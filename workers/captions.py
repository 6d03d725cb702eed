"""Captions for every video and its segments, from a Hugging Face image- or video-captioning model.

`Captioner` wraps the model: it takes clips of frames already resized and cropped for it
(`SampledFrames.prepared["captions"]`), normalises them on its device and generates all
captions of a batch in one `generate` call. A video-native model (GIT-VATEX) sees a fixed
number of frames spread over the clip; an image-only model (BLIP, GIT-COCO) sees the clip's
middle frame. `CaptionStage` builds the clips (one per video, one per longer segment) across
the videos of a batch and turns the texts into `Caption` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from schemas.config import CaptionsConfig, ModelsConfig, RunConfig
from workers.model_sources import model_revision
from workers.models import (
    FramePreparer,
    ModelLoadError,
    load_image_processor,
    load_pretrained,
    optimise_for_inference,
    precision_of,
    resolve_device,
    resolve_dtype,
    to_device,
)
from workers.stage import Stage
from workers.task import Caption, Segment, VideoTask

log = logging.getLogger(__name__)


class Captioner:
    """A captioning model loaded once: clips of prepared uint8 frames in, one caption per clip out.

    `model_id` is a hub id or a local folder. Both GIT (`GitForCausalLM`) and BLIP
    (`BlipForConditionalGeneration`) are reached through `AutoModelForImageTextToText`.
    """

    def __init__(self, models: ModelsConfig, captions: CaptionsConfig):
        from transformers import AutoModelForImageTextToText

        self.model_id = models.captions
        self.device = resolve_device(models.device)
        self.dtype = resolve_dtype(models, self.device)
        self.max_new_tokens = captions.max_new_tokens
        self.num_beams = captions.num_beams
        self.processor = load_image_processor(self.model_id, models, "captions", models.captions_revision)
        model = load_pretrained(
            AutoModelForImageTextToText, self.model_id, models, "captions",
            revision=models.captions_revision, dtype=self.dtype,
        )
        _check_caption_length(model.config, self.max_new_tokens, self.model_id)
        # GIT's image encoder, BLIP's vision model: the part that sees every frame
        self.model = optimise_for_inference(
            model.to(self.device).eval(), models, self.device, self.dtype, "captions",
            compile_parts=("git.image_encoder", "vision_model"),
        )
        self.revision = (model_revision(self.model.config, self.model_id, models.captions_revision, models.cache_dir)
                         or models.captions_revision)
        self.preparer = FramePreparer(self.processor, "captions")
        temporal = _temporal_frames(self.model.config, captions)
        #: True when the model reads a clip as frames [F, 3, h, w], False when it sees one image.
        self.video_native = temporal is not None
        self.frames_per_clip = temporal or 1

    def caption(self, clips: list[np.ndarray]) -> list[str]:
        """Caption each clip (uint8 [F, 3, h, w], prepared for this model) in one batched generate call."""
        if not clips:
            return []
        pixels = np.stack([self.select_frames(clip) for clip in clips])
        values = self.preparer.normalise(to_device(pixels, self.device), self.dtype)
        with torch.inference_mode():
            token_ids = self.model.generate(
                pixel_values=values,
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
            )
        texts = self.processor.batch_decode(token_ids, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def select_frames(self, clip: np.ndarray) -> np.ndarray:
        """The model's input from one clip: [frames_per_clip, 3, h, w] for a video model, else the middle frame."""
        if clip.ndim != 4 or len(clip) == 0:
            raise ValueError(f"a clip must be uint8 [F, 3, h, w] with F >= 1, got shape {clip.shape}")
        if not self.video_native:
            return clip[len(clip) // 2]
        return clip[spread_indices(len(clip), self.frames_per_clip)]


def _check_caption_length(model_config, max_new_tokens: int, model_id: str) -> None:
    """ModelLoadError where `max_new_tokens` and the prompt's first token exceed the text positions
    the model has: each caption that ran that long failed its video with "index out of range in
    self", and again at every rerun."""
    text_config = getattr(model_config, "text_config", None) or model_config
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_new_tokens >= positions:
        raise ModelLoadError(
            f"captions.max_new_tokens is {max_new_tokens}, but the captions model {model_id!r} has {positions} "
            f"text positions, its prompt's first token among them: give captions.max_new_tokens at most "
            f"{positions - 1}")


def spread_indices(available: int, wanted: int) -> np.ndarray:
    """`wanted` positions spread evenly over `available` frames (bin centres; repeats when too few)."""
    return ((np.arange(wanted) + 0.5) * available / wanted).astype(np.int64)


def _temporal_frames(model_config, captions: CaptionsConfig) -> int | None:
    """Frames a video-native model reads per clip (GIT's temporal embeddings fix it); None for image models."""
    temporal = getattr(model_config, "num_image_with_embedding", None)
    if captions.frames_per_caption not in (temporal or 1, type(captions)().frames_per_caption):
        # GIT cannot read any other count: it has exactly one temporal embedding per frame slot
        log.warning("the captions model reads %d frame%s a caption; captions.frames_per_caption=%d is ignored",
                    temporal or 1, "s" if temporal else "", captions.frames_per_caption)
    return int(temporal) if temporal else None


@dataclass
class _ClipRequest:
    """One clip waiting for its caption, and the row it will become."""

    task: VideoTask
    caption: Caption
    frames: np.ndarray


class CaptionStage(Stage):
    """Captions each video as a whole and, when it has several segments, each of its longest segments."""

    name = "captions"
    reads = ("frames", "segments", "meta")
    writes = ("captions",)

    def __init__(self, config: RunConfig):
        self.config = config.captions
        self.captioner = Captioner(config.models, config.captions)
        # bound the frames in one generate call the same way the embedding model's batches are
        frames_per_clip = self.captioner.frames_per_clip
        self.clips_per_batch = max(1, config.resources.frames_per_batch // frames_per_clip)

    def ran_on(self) -> tuple[str, str]:
        """The captioner's device type and dtype."""
        return precision_of(self.captioner)

    def process(self, tasks: list[VideoTask]) -> None:
        """Append video and segment captions to every task, batching clips across videos."""
        requests = [request for task in tasks for request in self.clip_requests(task)]
        for start in range(0, len(requests), self.clips_per_batch):
            chunk = requests[start : start + self.clips_per_batch]
            texts = self.captioner.caption([request.frames for request in chunk])
            for request, text in zip(chunk, texts):
                request.caption.text = text
        # rows are appended only once every caption of the batch exists, so a retry starts clean
        for request in requests:
            request.task.captions.append(request.caption)

    def release(self, task: VideoTask) -> None:
        """The frames prepared for the captioner: no later stage reads them."""
        if task.frames is not None:
            task.frames.prepared.pop("captions", None)

    def clip_requests(self, task: VideoTask) -> list[_ClipRequest]:
        """The clips of one video: the whole video, then (if several segments) each chosen segment."""
        if task.frames is None or "captions" not in task.frames.prepared:
            raise ValueError("no frames prepared for the captions model (the decode stage did not run it)")
        prepared = task.frames.prepared["captions"]
        whole = Caption(level="video", segment_index=None, start_s=0.0, end_s=task.meta.duration_s, text="")
        requests = [_ClipRequest(task, whole, prepared)]
        if not self.config.per_segment or len(task.segments) < 2:
            # a single segment is the whole video: its caption would repeat the video caption
            return requests
        for segment in self.chosen_segments(task):
            frames = prepared[task.frames.segment_index == segment.index]
            row = Caption(level="segment", segment_index=segment.index, start_s=segment.start_s,
                          end_s=segment.end_s, text="")
            requests.append(_ClipRequest(task, row, frames))
        return requests

    def chosen_segments(self, task: VideoTask) -> list[Segment]:
        """The longest `max_segments` segments that have sampled frames, in video order.

        A segment with no sampled frame (a shot shorter than the sampling step) has nothing
        of its own to caption, so it gets no caption rather than a neighbour's.
        """
        sampled = set(np.unique(task.frames.segment_index).tolist())
        candidates = [s for s in task.segments if s.index in sampled]
        longest = sorted(candidates, key=lambda s: (-(s.end_s - s.start_s), s.index))
        return sorted(longest[: self.config.max_segments], key=lambda s: s.index)
