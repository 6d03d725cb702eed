"""Preparing decoded frames for a model: its processor's resize and centre crop, made fast.

`FramePreparer.prepare` turns RGB uint8 frames into uint8 pixels at the model's input size;
`normalise` then rescales and normalises them on the model's device. The reference is the
model's own image processor, run with rescaling and normalisation off.

Running that processor costs a PIL round trip per frame, on the full-size frame, which
was most of a sampled video's CPU time after decoding. For the processors that only
resize then centre-crop (transformers' PIL backend: CLIP, GIT, SigLIP), each frame size
gets a `ResizePlan`, learnt once from the processor itself on a frame of noise: the size it
resizes to and the box it crops. The plan then runs one of two direct ways:

- "torch": torch's uint8 antialiased resize (PIL's bilinear and bicubic filters), all of a
  video's frames in one call. Only on x86, where torch has a vectorised uint8 kernel.
- "pil": PIL resamples only the crop's box of each frame, straight to the crop's size.

A way is kept only if no pixel value of its output on the noise frame is more than
`TOLERANCE` levels from the processor's; otherwise, and for any other processor (X-CLIP's
VideoMAE, padding crops, overridden steps), the processor runs as before.

A decode worker started afresh (Ray's, a forkserver's) then needs neither the processor nor
transformers (2 s of importing and about 100 MB in each): the driver hands it
`FramePreparer.detached()` copies, which plan a frame size from the processor's resize and
crop as arithmetic (`SizeRule`) and learn their way against PIL's resize of the whole frame,
the processor's own step ("full"). `detached` keeps the processor where either differs from
it on frames of `CHECK_SIZES`.
"""

from __future__ import annotations

import copy
import logging
import platform
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: the most a direct way's pixel value may differ from the processor's (of 255) to be used.
TOLERANCE = 2

#: learnt plans, per preparer (its token) and frame size. Module-level so that the copies of a
#: preparer pickled into the same process (one per video, into the decode child) share them.
_PLANS: dict[str, dict[tuple[int, int], "ResizePlan | None"]] = {}

#: frame sizes (height, width) on which `FramePreparer.detached` checks its arithmetic and PIL's
#: resize against the processor: up- and downscaling, odd sides, portrait, square.
CHECK_SIZES = ((64, 96), (101, 203), (240, 320), (360, 640), (640, 360), (480, 480), (720, 1280), (1080, 1920))


@dataclass(frozen=True)
class ResizePlan:
    """Resize a (height, width) frame to `resized`, then keep `crop` (top, left, height, width)."""

    way: str  # "torch" | "pil" | "full" (the PIL backend's own steps)
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    resample: int  # a PIL filter (2 bilinear, 3 bicubic)
    #: the largest difference from the processor's output on the noise frame it was learnt on
    max_diff: int = 0

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """RGB uint8 [N, H, W, 3] -> uint8 [N, 3, h, w]."""
        top, left, height, width = self.crop
        if self.way == "torch":
            pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # channels-last
            mode = "bicubic" if self.resample == 3 else "bilinear"
            resized = torch.nn.functional.interpolate(pixels, size=self.resized, mode=mode,
                                                      antialias=True, align_corners=False)
            return np.ascontiguousarray(resized[:, :, top:top + height, left:left + width].numpy())
        from PIL import Image

        out = np.empty((len(frames), 3, height, width), dtype=np.uint8)
        if self.way == "full":  # as the PIL backend does: the whole frame resized, then cropped
            for i, frame in enumerate(frames):
                image = Image.fromarray(np.ascontiguousarray(frame)).resize(self.resized[::-1], self.resample)
                out[i] = np.asarray(image)[top:top + height, left:left + width].transpose(2, 0, 1)
            return out
        scale_y, scale_x = frames.shape[1] / self.resized[0], frames.shape[2] / self.resized[1]
        box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
        for i, frame in enumerate(frames):
            image = Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), self.resample, box=box)
            out[i] = np.asarray(image).transpose(2, 0, 1)
        return out


class FramePreparer:
    """Resizes and crops RGB frames to a model's input size on the CPU, as uint8.

    Frames travel to the model worker at a quarter of the float32 size; `normalise` applies
    the processor's rescale and mean/std on the model's device. The result is the processor's
    own output to within `TOLERANCE` levels before normalising (see the module's text).
    """

    def __init__(self, processor: Any, role: str):
        self.role = role
        self.image_processor = getattr(processor, "image_processor", processor)
        self.rescale_factor = float(getattr(self.image_processor, "rescale_factor", 1 / 255))
        self.do_normalize = bool(getattr(self.image_processor, "do_normalize", True))
        self.image_mean = tuple(float(v) for v in self.image_processor.image_mean)
        self.image_std = tuple(float(v) for v in self.image_processor.image_std)
        self._token = uuid.uuid4().hex
        self._ways = direct_ways(self.image_processor)
        self._rule: SizeRule | None = None  # set on detached copies, which have no processor

    def detached(self) -> FramePreparer:
        """A copy without the processor, for workers that then need no transformers; itself
        where the copy would not give the processor's output (see the module's text)."""
        rule = SizeRule.of(self.image_processor) if self._ways and self.image_processor is not None else None
        if rule is None:
            return self
        for size in CHECK_SIZES:
            noise = np.random.default_rng(1).integers(0, 256, (1, *size, 3), dtype=np.uint8)
            reference = self.with_processor(noise)
            geometry = rule.geometry(size)
            if (geometry != resize_geometry(self.image_processor, size, reference.shape[-2:])
                    or not np.array_equal(ResizePlan("full", *geometry).apply(noise), reference)):
                log.info("%s preparer: the processor differs from its arithmetic or PIL's resize at %dx%d; "
                         "the workers load it", self.role, size[1], size[0])
                return self
        twin = copy.copy(self)
        twin.image_processor, twin._rule, twin._token = None, rule, uuid.uuid4().hex
        return twin

    @property
    def plans(self) -> dict[tuple[int, int], ResizePlan | None]:
        """The plans learnt in this process so far, by frame size (None: the processor's way)."""
        return _PLANS.setdefault(self._token, {})

    def prepare(self, frames: Any) -> np.ndarray:
        """RGB uint8 frames [N, H, W, 3] -> uint8 [N, 3, h, w] at the model's input size."""
        if len(frames) == 0:
            raise ValueError("no frames to prepare")
        frames = np.asarray(frames)
        size = (int(frames.shape[1]), int(frames.shape[2]))
        if size not in self.plans:
            self.plans[size] = self._learn(size)
        plan = self.plans[size]
        return plan.apply(frames) if plan is not None else self.with_processor(frames)

    def with_processor(self, frames: Any) -> np.ndarray:
        """The processor's own resize and crop (the reference the direct ways are held to)."""
        # (channels said: a frame 1 or 3 pixels high was taken for channels first, its colours mixed)
        pixels = self.image_processor(
            images=list(frames), do_rescale=False, do_normalize=False, return_tensors="np",
            input_data_format="channels_last",
        )["pixel_values"]
        # video image processors (X-CLIP checkpoints ship VideoMAE's) return one clip [1, N, 3, h, w]
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        if pixels.dtype == np.uint8:  # the PIL processors resize uint8 images and keep them so
            return np.ascontiguousarray(pixels)
        # (np.rint of uint8 gives float16, slowly: 47 ms for 9 frames, more than the resize)
        return np.clip(np.rint(pixels.astype(np.float32, copy=False)), 0, 255).astype(np.uint8)

    def _learn(self, size: tuple[int, int]) -> ResizePlan | None:
        """The first direct way that follows the processor on a noise frame of this size, if any;
        on a detached copy, "full" (the processor's steps) where none does."""
        if not self._ways:
            return None
        noise = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
        if self._rule is None:
            reference = self.with_processor(noise)
            geometry = resize_geometry(self.image_processor, size, reference.shape[-2:])
            if geometry is None:
                return None
        else:
            geometry = self._rule.geometry(size)
            reference = ResizePlan("full", *geometry).apply(noise)
        for way in self._ways:
            plan = ResizePlan(way, *geometry)
            diff = int(np.abs(plan.apply(noise).astype(np.int16) - reference).max())
            if diff <= TOLERANCE:
                return ResizePlan(way, *geometry, max_diff=diff)
            log.info("%s preparer: %s resize differs from the processor by %d levels at %dx%d; not used",
                     self.role, way, diff, size[1], size[0])
        return None if self._rule is None else ResizePlan("full", *geometry)

    def normalise(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 [..., 3, h, w] on the model's device -> normalised pixel values in `dtype`."""
        values = pixels.float() * self.rescale_factor
        if self.do_normalize:
            shape = (3, 1, 1)
            mean = torch.tensor(self.image_mean, device=values.device).view(shape)
            std = torch.tensor(self.image_std, device=values.device).view(shape)
            values = (values - mean) / std
        return values.to(dtype)


def direct_ways(image_processor: Any) -> tuple[str, ...]:
    """The direct ways that may follow this processor, fastest first; () when none can."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # transformers 4 has no backends: keep its processors
        return ()
    kind = type(image_processor)
    if not isinstance(image_processor, PilBackend) or any(
        getattr(kind, step) is not getattr(PilBackend, step) for step in ("_preprocess", "resize", "center_crop")
    ):
        return ()
    if getattr(image_processor, "do_pad", False) or not getattr(image_processor, "do_resize", False):
        return ()
    resample = _resample(image_processor)
    fast_torch = platform.machine().lower() in ("x86_64", "amd64") and resample in (2, 3)
    return ("torch", "pil") if fast_torch else ("pil",)


@dataclass(frozen=True)
class SizeRule:
    """A processor's resize and centre crop as arithmetic (transformers' own, for the two kinds
    of `size` most processors have), so that a frame size is planned without the processor."""

    shortest_edge: int  # the shorter side resized to this, the longer in proportion; 0: to `fixed`
    fixed: tuple[int, int]  # (height, width) when shortest_edge is 0
    crop: tuple[int, int] | None  # the centre crop (height, width), if any
    resample: int

    @classmethod
    def of(cls, image_processor: Any) -> SizeRule | None:
        """The processor's rule, or None for a size given otherwise or a crop that could pad."""
        size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)

        def side(of: Any, name: str) -> int:
            return int(getattr(of, name, None) or 0)

        if any(side(size, name) for name in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")):
            return None
        shortest, fixed = side(size, "shortest_edge"), (side(size, "height"), side(size, "width"))
        if not shortest and not all(fixed):
            return None
        crop_box = None
        if getattr(image_processor, "do_center_crop", False):
            crop_box = (side(crop, "height"), side(crop, "width"))
        smallest = (shortest, shortest) if shortest else fixed
        if crop_box is not None and not (0 < crop_box[0] <= smallest[0] and 0 < crop_box[1] <= smallest[1]):
            return None
        return cls(shortest, fixed, crop_box, _resample(image_processor))

    def geometry(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int], int]:
        """(resized size, crop box, PIL filter) for a frame of `size` (height, width), as `resize_geometry`."""
        height, width = size
        resized = self.fixed
        if self.shortest_edge:  # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.shortest_edge * long / short)
            resized = (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)
        return resized, _centre_crop_box(resized, self.crop or resized), self.resample


def resize_geometry(image_processor: Any, size: tuple[int, int],
                    out_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int], int] | None:
    """(resized size, crop box, PIL filter) of the processor for a frame of `size`, asking the
    processor's own `resize` for the size; None where the crop would pad."""
    resample = _resample(image_processor)
    probe = np.zeros((3, *size), dtype=np.uint8)
    resized = tuple(int(v) for v in image_processor.resize(probe, size=image_processor.size,
                                                            resample=resample).shape[-2:])
    height, width = (int(v) for v in out_size)
    if not getattr(image_processor, "do_center_crop", False):
        return (resized, (0, 0, *resized), resample) if resized == (height, width) else None
    if height > resized[0] or width > resized[1]:
        return None
    return resized, _centre_crop_box(resized, (height, width)), resample


def _centre_crop_box(resized: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a centre crop of `crop` from a frame of `resized`, as
    transformers' center_crop places it."""
    return (resized[0] - crop[0]) // 2, (resized[1] - crop[1]) // 2, *crop


def _resample(image_processor: Any) -> int:
    """The processor's PIL filter (bilinear when it names none)."""
    return int(getattr(image_processor, "resample", 2) or 2)
