"""Benchmark 3's baseline: the plain sequential script a user would write instead of vidlens.

For each video: decode with decord (every frame at 48x27 for TransNetV2, then the sampled
frames at full size), find shots, embed the frames with CLIP through its own processor,
score the video against the same object and scene vocabularies, caption it (when captions
run) with the caption model through its own processor, append a row to a list; write one
Parquet file at the end. Same models, same frames, same sampling; no batching
across videos, no overlap of decoding with inference.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from schemas.config import RunConfig
from workers.captions import spread_indices
from workers.frame_selection import sample_indices
from workers.shots import ShotDetector, segments_from_predictions, shot_dtype


def run_naive(videos: list[Path], config: RunConfig, out: Path) -> int:
    """Process `videos` one after the other with the models `config` names; returns rows written."""
    import decord
    from transformers import CLIPModel, CLIPProcessor

    from workers.models import resolve_device, resolve_dtype

    device = resolve_device(config.models.device)
    dtype = resolve_dtype(config.models, device)
    model = CLIPModel.from_pretrained(config.models.embed, dtype=dtype).to(device).eval()
    processor = CLIPProcessor.from_pretrained(config.models.embed)
    detector = ShotDetector(device, shot_dtype(config, device)) if config.enabled("shots") else None
    captioner = _Captioner(config, device, dtype) if config.enabled("captions") else None
    labels = config.labels
    vocabularies = {"object": (labels.objects, labels.object_templates),
                    "scene": (labels.scenes, labels.scene_templates)}
    with torch.no_grad():
        texts = {kind: _text_bank(model, processor, names, templates)
                 for kind, (names, templates) in vocabularies.items()}
        scale = model.logit_scale.exp().item()
        rows = []
        for path in videos:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
            fps = reader.get_avg_fps()
            segments = []
            if detector is not None:
                # decord 0.6 cannot scale to 48x27 (its strides break): scale to 96x54, then halve
                small = decord.VideoReader(str(path), ctx=decord.cpu(0), width=96, height=54)
                thumbnails = small.get_batch(list(range(len(small)))).asnumpy()
                thumbnails = np.stack([cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in thumbnails])
                segments = segments_from_predictions(detector.predict(thumbnails), fps)
            indices = sample_indices(config.sampling, len(reader), fps, segments)
            frames = reader.get_batch(indices.tolist()).asnumpy()
            pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"].to(device, dtype)
            features = model.get_image_features(pixel_values=pixels)
            features = features if isinstance(features, torch.Tensor) else features.pooler_output
            frame_embeddings = torch.nn.functional.normalize(features.float(), dim=-1).cpu()
            video = torch.nn.functional.normalize(frame_embeddings.mean(dim=0), dim=-1)
            row = {"uri": str(path), "segments": len(segments), "frames": len(indices),
                   "embedding": video.numpy().astype(np.float32)}
            for kind, (names, bank) in texts.items():
                probabilities = (scale * bank @ video).softmax(dim=0)
                top = probabilities.topk(min(config.labels.top_k, len(names)))
                row[f"{kind}s"] = [names[i] for i in top.indices.tolist()]
                row[f"{kind}_scores"] = top.values.tolist()
            if captioner is not None:
                row["caption"] = captioner.caption(frames)
            rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out)
    return len(rows)


def _text_bank(model, processor, names, templates) -> tuple[tuple[str, ...], torch.Tensor]:
    prompts = [template.replace("{}", name) for name in names for template in templates]
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    features = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    per_name = torch.nn.functional.normalize(features.float().cpu(), dim=-1).view(len(names), len(templates), -1).mean(dim=1)
    return tuple(names), torch.nn.functional.normalize(per_name, dim=-1)


class _Captioner:
    """The caption model as a user would call it: its processor, then `generate`, one video at a time."""

    def __init__(self, config: RunConfig, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config.captions
        self.processor = AutoProcessor.from_pretrained(config.models.captions)
        self.model = AutoModelForImageTextToText.from_pretrained(config.models.captions, dtype=dtype).to(device).eval()
        self.dtype = dtype
        #: GIT-VATEX reads a fixed number of frames per clip; an image model reads the middle one
        self.frames = getattr(self.model.config, "num_image_with_embedding", None)

    def caption(self, frames: np.ndarray) -> str:
        if self.frames:
            chosen = frames[spread_indices(len(frames), self.frames)]  # the frames the caption stage picks
        else:
            chosen = frames[len(frames) // 2 : len(frames) // 2 + 1]
        pixels = self.processor(images=list(chosen), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.model.device, self.dtype)
        if self.frames:
            pixels = pixels.unsqueeze(0)  # one clip of F frames
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.config.max_new_tokens,
                                  num_beams=self.config.num_beams, do_sample=False)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
