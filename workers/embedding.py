"""The video-text embedding model: CLIP, SigLIP (and fixed-resolution SigLIP 2) or X-CLIP.

`VideoTextModel` puts frames, clips (a video or a segment) and texts into one embedding
space, L2-normalised, and turns cosine similarities into the model's own calibrated
probabilities. Frames arrive as uint8 [N, 3, h, w], already resized by the model's image
processor on the CPU (`FramePreparer.prepare`); they are normalised here, on the device.

How a clip is embedded depends on the model:
- CLIP and SigLIP are image models: a clip is the normalised mean of its frame embeddings.
- X-CLIP is natively video: a clip is `get_video_features` over exactly
  `vision_config.num_frames` of its frames, chosen evenly (repeated when the clip has fewer).
  Its text embeddings are conditioned on each clip by the model's prompt generator, as in
  `XCLIPModel.forward`, so clip-level similarities are the model's own `logits_per_video`
  divided by its logit scale. A single frame is encoded as a still clip (see `_frame_messages`);
  frames are scored against the texts as conditioned on the clip they belong to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from schemas.config import ModelsConfig
from workers.model_sources import model_revision
from workers.models import (
    FramePreparer,
    ModelLoadError,
    int8_applies,
    load_image_processor,
    load_pretrained,
    optimise_for_inference,
    resolve_device,
    resolve_dtype,
    to_device,
)
from workers.text_cache import TextBankCache, cache_folder, model_fingerprint

log = logging.getLogger(__name__)

#: model_type in a checkpoint's config.json -> the kind of model this module drives.
_KINDS = {"clip": "clip", "siglip": "siglip", "xclip": "xclip"}
#: texts tokenised and encoded per forward pass.
_TEXTS_PER_BATCH = 256
#: clips whose texts are conditioned at once (X-CLIP): bounds [clips, texts, D] on the device.
_CLIPS_PER_CONDITIONING = 16


@dataclass
class TextBank:
    """Encoded texts, ready to score: one row per name, each the ensemble of its templates."""

    names: tuple[str, ...]
    templates: tuple[str, ...]
    #: float32 [M, D], L2-normalised mean of the normalised template embeddings.
    embeddings: np.ndarray
    #: X-CLIP only: the projected, unnormalised text features [M * K, D] on the device,
    #: ordered name-major, which the prompt generator conditions on each clip.
    raw: torch.Tensor | None = None


@dataclass
class ClipEmbeddings:
    """Embeddings of clips (a whole video or a segment), one row per clip."""

    #: float32 [C, D], L2-normalised.
    embeddings: np.ndarray
    #: X-CLIP only: the clip's visual tokens for the prompt generator, [C, P, D] on the device.
    visual_tokens: torch.Tensor | None = None


class VideoTextModel:
    """A Hugging Face CLIP, SigLIP or X-CLIP model, loaded once, on the configured device.

    Attributes: `kind` ("clip" | "siglip" | "xclip"), `dim` (embedding size), `model_id`,
    `revision` (hub commit, None for a local folder), `device`, `dtype`, `preparer`
    (the `FramePreparer` that makes its uint8 input frames).
    """

    def __init__(self, models_config: ModelsConfig):
        from transformers import AutoModel

        self.model_id = models_config.embed
        self.device = resolve_device(models_config.device)
        self.dtype = resolve_dtype(models_config, self.device)
        revision = models_config.embed_revision
        self.processor = load_image_processor(self.model_id, models_config, "embed", revision)
        # in float32, then cast: the logit scale and bias are read as the checkpoint holds them (cast
        # to bf16 first, CLIP's exp(scale) of 100 read 98.86, shifting every probability)
        model = load_pretrained(
            AutoModel, self.model_id, models_config, "embed", revision=revision, dtype=torch.float32
        )
        model_type = getattr(model.config, "model_type", "")
        if model_type not in _KINDS:
            raise ModelLoadError(
                f"cannot use {self.model_id!r} as the embed model: it is a {model_type or type(model).__name__} "
                "model; models.embed must be a CLIP, SigLIP (or fixed-resolution SigLIP 2) or X-CLIP checkpoint"
            )
        self.kind = _KINDS[model_type]
        self.revision = model_revision(model.config, self.model_id, revision, models_config.cache_dir)
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.logit_bias = float(model.logit_bias.detach().float()) if model_type == "siglip" else 0.0
        self.model = optimise_for_inference(
            model.to(self.dtype).to(self.device).eval(), models_config, self.device, self.dtype, "embed",
            compile_parts=("vision_model", "text_model"),
        )
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ModelLoadError(f"the embed model {self.model_id!r} has no tokenizer saved with its processor")
        self.preparer = FramePreparer(self.processor, "embed")
        self.dim = self._embedding_size()
        self.text_length = int(model.config.text_config.max_position_embeddings)
        #: frames per clip for X-CLIP's video encoder; None for image models.
        self.clip_frames = int(model.config.vision_config.num_frames) if self.kind == "xclip" else None
        self._banks: dict[tuple[tuple[str, ...], tuple[str, ...]], TextBank] = {}
        #: texts whose length was checked (`_say_if_cut`): each is warned about once.
        self._measured: set[str] = set()
        self._text_cache = TextBankCache(cache_folder(models_config.text_cache), self._identity(models_config))

    def _identity(self, models_config: ModelsConfig) -> dict | None:
        """What makes this model's text embeddings what they are (the text cache's key); None
        when the weights' version is unknown."""
        import transformers

        weights = model_fingerprint(self.model_id, self.revision)
        if weights is None:
            return None
        local = Path(self.model_id)
        return {"model": str(local.resolve()) if local.is_dir() else self.model_id, "weights": weights,
                "kind": self.kind, "device": self.device.type, "dtype": str(self.dtype),
                "quantize": "int8" if int8_applies(models_config, self.device) else "none",
                "text_length": self.text_length, "transformers": transformers.__version__}

    # --- frames and clips ------------------------------------------------------------------

    @torch.inference_mode()
    def embed_frames(self, prepared: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 frames [N, 3, h, w] -> float32 [N, D] L2-normalised image embeddings.

        For X-CLIP a frame's embedding is the vision tower's class token and the visual
        projection (what `XCLIPModel` feeds its multi-frame transformer), with the frame
        seen as a still clip, so it does not depend on its neighbours or on batching.
        """
        _check_frames(prepared)
        rows = []
        for start in range(0, len(prepared), batch_size):
            pixels = self.preparer.normalise(self._to_device(prepared[start : start + batch_size]), self.dtype)
            rows.append(F.normalize(self._frame_features(pixels).float(), dim=-1))
        return torch.cat(rows).cpu().numpy()

    def embed_video(self, prepared: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 frames of one clip [N, 3, h, w] -> float32 [D], the clip's L2-normalised embedding.

        CLIP/SigLIP: the normalised mean of the frame embeddings. X-CLIP: its native video
        embedding over `clip_frames` frames chosen evenly from the N given.
        """
        frames = self.embed_frames(prepared, batch_size) if self.kind != "xclip" else None
        clips = self.embed_clips(prepared, frames, [np.arange(len(prepared))], batch_size)
        return clips.embeddings[0]

    def embed_clips(
        self,
        prepared: np.ndarray,
        frame_embeddings: np.ndarray | None,
        clips: Sequence[np.ndarray],
        batch_size: int = 64,
    ) -> ClipEmbeddings:
        """Embed clips given as arrays of frame positions into `prepared` (all frames of a batch).

        CLIP/SigLIP pool `frame_embeddings` (no forward pass); X-CLIP runs its video encoder
        on `clip_frames` frames per clip, batching clips from different videos together.
        """
        if any(len(positions) == 0 for positions in clips):
            raise ValueError("a clip has no sampled frame")
        if self.kind != "xclip":
            if frame_embeddings is None:
                raise ValueError(f"{self.kind} clips are pooled from frame embeddings; none were given")
            pooled = np.stack([frame_embeddings[positions].mean(axis=0) for positions in clips])
            return ClipEmbeddings(_normalised(pooled))
        return self._xclip_clips(prepared, clips, batch_size)

    @torch.inference_mode()
    def _xclip_clips(self, prepared: np.ndarray, clips: Sequence[np.ndarray], batch_size: int) -> ClipEmbeddings:
        _check_frames(prepared)
        count = self.clip_frames
        chosen = np.stack([np.asarray(positions)[even_positions(len(positions), count)] for positions in clips])
        per_batch = max(1, batch_size // count)
        embeddings, tokens = [], []
        for start in range(0, len(chosen), per_batch):
            positions = chosen[start : start + per_batch]
            pixels = self.preparer.normalise(self._to_device(prepared[positions.reshape(-1)]), self.dtype)
            video, visual = self._xclip_video(pixels, len(positions))
            embeddings.append(F.normalize(video.float(), dim=-1))
            tokens.append(visual)
        return ClipEmbeddings(torch.cat(embeddings).cpu().numpy(), torch.cat(tokens))

    def _xclip_video(self, pixels: torch.Tensor, clips: int) -> tuple[torch.Tensor, torch.Tensor]:
        """X-CLIP's video embedding and prompt-generator tokens, as in `XCLIPModel.forward`."""
        model = self.model
        vision = model.vision_model(pixel_values=pixels)
        frames = model.visual_projection(vision.pooler_output).view(clips, self.clip_frames, -1)
        video = model.mit(frames).pooler_output
        visual = model.prompts_visual_layernorm(vision.last_hidden_state[:, 1:, :])
        visual = (visual @ model.prompts_visual_projection).view(clips, self.clip_frames, -1, video.shape[-1])
        return video, visual.mean(dim=1)

    def _frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "xclip":
            with _frame_messages(self.model, 1):
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return self.model.visual_projection(pooled)
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    # --- texts -----------------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [M, D] L2-normalised text embeddings (for X-CLIP: not clip-conditioned)."""
        self._say_if_cut(texts)
        raw = self._text_features(list(texts))
        return F.normalize(raw.float(), dim=-1).cpu().numpy()

    def text_prompt_embeddings(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Prompt ensembling: per name, the renormalised mean of its templates' embeddings [len(names), D]."""
        return self.text_bank(names, templates).embeddings

    def text_bank(self, names: Sequence[str], templates: Sequence[str]) -> TextBank:
        """Encode every name in every template ("{}" is the name), kept per (names, templates)
        for this model's life and on disk between runs (`workers.text_cache`)."""
        key = (tuple(names), tuple(templates) or ("{}",))
        if key not in self._banks:
            prompts = [template.replace("{}", name) for name in key[0] for template in key[1]]
            self._say_if_cut(prompts)  # (before the cache: a bank read from disk was cut all the same)
            if not prompts:
                self._banks[key] = TextBank(key[0], key[1], np.zeros((0, self.dim), np.float32))
                return self._banks[key]
            stored = self._text_cache.load(*key)
            # a stored bank whose rows do not fit its names (a file of another layout) is encoded again
            if stored is not None and _bank_fits(stored, len(key[0]), len(prompts), self.kind == "xclip"):
                raw = stored.get("raw")
                raw = None if raw is None else torch.from_numpy(raw).to(self.device, self.dtype)
                self._banks[key] = TextBank(key[0], key[1], stored["embeddings"], raw)
                return self._banks[key]
            raw = self._text_features(prompts)
            per_name = F.normalize(raw.float(), dim=-1).view(len(key[0]), len(key[1]), -1)
            embeddings = F.normalize(per_name.mean(dim=1), dim=-1).cpu().numpy()
            xclip = self.kind == "xclip"
            self._banks[key] = TextBank(key[0], key[1], embeddings, raw if xclip else None)
            self._text_cache.store(*key, {"embeddings": embeddings,
                                          **({"raw": raw.float().cpu().numpy()} if xclip else {})})
        return self._banks[key]

    def _say_if_cut(self, texts: Sequence[str]) -> None:
        """Warn, once per text, of each text longer than the model reads: it is encoded cut to its
        first `text_length` tokens (special ones included), so it scores as that shorter text."""
        new = [text for text in dict.fromkeys(texts) if text not in self._measured]
        if not new:
            return
        self._measured.update(new)
        # (verbose=False: untruncated, the tokenizer would warn of indexing errors the encoding never meets)
        for text, ids in zip(new, self.tokenizer(new, verbose=False)["input_ids"]):
            if len(ids) > self.text_length:
                log.warning("the text %r has %d tokens and the embed model %s reads at most %d: it is encoded "
                            "cut to its first %d, and scored as that shorter text",
                            _shortened(text), len(ids), self.model_id, self.text_length, self.text_length)

    @torch.inference_mode()
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        # SigLIP was trained on texts padded to its full length (it pools the last position)
        padding = "max_length" if self.kind == "siglip" else True
        rows = []
        for start in range(0, len(texts), _TEXTS_PER_BATCH):
            tokens = self.tokenizer(
                texts[start : start + _TEXTS_PER_BATCH],
                padding=padding,
                truncation=True,
                max_length=self.text_length,
                return_tensors="pt",
            )
            # SigLIP attends to its padding, as trained (big_vision passes no mask): drop the tokenizer's
            keep = ("input_ids",) if self.kind == "siglip" else ("input_ids", "attention_mask")
            inputs = {k: v.to(self.device) for k, v in tokens.items() if k in keep}
            rows.append(_pooled(self.model.get_text_features(**inputs)))
        return torch.cat(rows)

    # --- scores ----------------------------------------------------------------------------

    def clip_text_embeddings(self, clips: ClipEmbeddings, bank: TextBank) -> np.ndarray:
        """The bank's text embeddings as the model reads them for each clip: float32 [C, M, D].

        CLIP/SigLIP texts do not depend on the clip (a read-only broadcast of the bank). For
        X-CLIP each template's text is conditioned on the clip's visual tokens by the prompt
        generator, normalised, averaged over templates and renormalised; with one template,
        a clip's cosine to it is exactly `XCLIPModel`'s `logits_per_video / logit_scale`.
        """
        count, names = len(clips.embeddings), len(bank.names)
        if self.kind != "xclip" or not names or not count:
            return np.broadcast_to(bank.embeddings, (count, names, bank.embeddings.shape[-1]))
        return self._conditioned_texts(clips.visual_tokens, bank)

    def clip_similarity(self, clips: ClipEmbeddings, bank: TextBank) -> np.ndarray:
        """Cosine similarity [C, M] of clips to a text bank, as the model itself scores them."""
        return np.einsum("cd,cmd->cm", clips.embeddings, self.clip_text_embeddings(clips, bank))

    @torch.inference_mode()
    def _conditioned_texts(self, visual_tokens: torch.Tensor, bank: TextBank) -> np.ndarray:
        rows = []
        names, templates = len(bank.names), len(bank.templates)
        for start in range(0, len(visual_tokens), _CLIPS_PER_CONDITIONING):
            visual = visual_tokens[start : start + _CLIPS_PER_CONDITIONING]
            text = bank.raw.unsqueeze(0).expand(len(visual), -1, -1)
            text = F.normalize((text + self.model.prompts_generator(text, visual)).float(), dim=-1)
            rows.append(F.normalize(text.view(len(visual), names, templates, -1).mean(dim=2), dim=-1))
        return torch.cat(rows).cpu().numpy()

    def probabilities(self, similarity: np.ndarray) -> np.ndarray:
        """The model's calibrated probabilities for cosine similarities [..., M] to M texts.

        SigLIP scores each (image, text) pair on its own, as trained:
        sigmoid(exp(logit_scale) * cos + logit_bias). CLIP and X-CLIP were trained with a
        softmax over the texts: softmax over the last axis of exp(logit_scale) * cos, so
        those probabilities sum to 1 over the M texts (and are 1.0 when M is 1).
        """
        logits = self.logit_scale * np.asarray(similarity, dtype=np.float64)
        if self.kind == "siglip":
            return (1.0 / (1.0 + np.exp(-(logits + self.logit_bias)))).astype(np.float32)
        if logits.shape[-1] == 0:
            return logits.astype(np.float32)
        logits = logits - logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits)
        return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)

    # --- helpers ---------------------------------------------------------------------------

    def _to_device(self, frames: np.ndarray) -> torch.Tensor:
        return to_device(frames, self.device)

    def _embedding_size(self) -> int:
        config = self.model.config
        if self.kind == "siglip":
            return int(config.vision_config.hidden_size)
        return int(config.projection_dim)


def even_positions(available: int, wanted: int) -> np.ndarray:
    """Indices of `wanted` items spread evenly over `available` (the centre of each equal bin).

    Fewer available than wanted repeats items as evenly as possible, in order.
    """
    return ((np.arange(wanted) + 0.5) * available / wanted).astype(np.int64).clip(0, available - 1)


@contextlib.contextmanager
def _frame_messages(model: torch.nn.Module, frames: int) -> Iterator[None]:
    """Temporarily set how many frames X-CLIP's cross-frame message tokens attend across.

    With 1, each frame exchanges messages with itself only, which equals encoding a still
    clip of identical frames (attention over identical tokens is the token itself), at
    1/num_frames of the cost. Not thread-safe; a model actor runs one batch at a time.
    """
    layers = [layer for layer in model.vision_model.modules() if hasattr(layer, "message_attn")]
    if not layers or not all(hasattr(layer, "num_frames") for layer in layers):
        raise ModelLoadError("this X-CLIP implementation has no per-layer num_frames; cannot encode single frames")
    saved = [layer.num_frames for layer in layers]
    try:
        for layer in layers:
            layer.num_frames = frames
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.num_frames = value


def _pooled(output: object) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _shortened(text: str, keep: int = 40) -> str:
    """`text` as a warning shows it: its start and end where it is long."""
    return text if len(text) <= 2 * keep + 5 else f"{text[:keep]} ... {text[-keep:]}"


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _check_frames(prepared: np.ndarray) -> None:
    if prepared.dtype != np.uint8 or prepared.ndim != 4 or prepared.shape[1] != 3:
        raise ValueError(f"expected uint8 frames [N, 3, h, w], got {prepared.dtype} {tuple(prepared.shape)}")
    if len(prepared) == 0:
        raise ValueError("no frames to embed")


def _bank_fits(stored: dict[str, np.ndarray], names: int, prompts: int, xclip: bool) -> bool:
    """Whether a stored bank has a row per name (and, for X-CLIP, raw features per prompt)."""
    embeddings, raw = stored.get("embeddings"), stored.get("raw")
    if embeddings is None or embeddings.ndim != 2 or len(embeddings) != names:
        return False
    return not xclip or (raw is not None and raw.ndim == 2 and len(raw) == prompts)
