"""On-screen text (titles, subtitles, signs) read from keyframes with RapidOCR.

RapidOCR runs PP-OCR detection, angle classification and recognition as ONNX models on the
CPU. It reads each shot's keyframe, or with `ocr.frames: sampled` every sampled frame (text
that changes within a shot). They reach this stage possibly downscaled (longer side at most
`ocr.max_side`); boxes are scaled back to the pixel coordinates of the upright original
frame, so they can be drawn on the video as it plays. A frame's lines come in reading order:
top to bottom, and left to right within a row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from schemas.config import RunConfig
from workers.guard import usable_cpus
from workers.stage import Stage
from workers.task import TextBox, VideoMeta, VideoTask


#: the longest side RapidOCR's text detection is handed, in units of the shortest, and the
#: shortest side: it scales the shorter side to 736 px, so an 8x720 frame grew to 736x66,240
#: (65 s and 6 GB for one keyframe) and a 2x600 one to 24 GB, where the kernel killed it.
#: A frame beyond them is padded (right and bottom: the boxes keep their coordinates).
MAX_ASPECT = 4
MIN_SIDE = 32
#: two lines are one row when their heights overlap by more than this share of the shorter
#: one's: a small word on a big one's baseline is beside it, two subtitle lines are not.
ROW_OVERLAP = 0.5
#: a line more than this many times as tall as the frame's median line (vertical text, a
#: watermark along the frame's edge) is a row of its own, where its middle is: it joins none.
TALL = 3.0


@dataclass(frozen=True)
class TextLine:
    """One line of text found in an image: its four corners (x, y) in that image's pixels."""

    corners: np.ndarray  # float32 [4, 2], clockwise from top-left
    text: str
    confidence: float


class TextReader:
    """RapidOCR with a bounded thread count, reading RGB images."""

    def __init__(self, min_confidence: float = 0.5, num_threads: int = 1) -> None:
        """Load the detection, angle and recognition models; `num_threads` bounds each ONNX session."""
        from rapidocr_onnxruntime import RapidOCR

        # RapidOCR ignores a count above the machine's cores and would then take them all
        threads = max(1, min(int(num_threads), usable_cpus()))
        self.min_confidence = min_confidence
        self.engine = RapidOCR(
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            # its own filter (default 0.5) must not be stricter than ours
            text_score=min_confidence,
        )

    def read(self, image_rgb: np.ndarray) -> list[TextLine]:
        """Text lines in an RGB uint8 image (H, W, 3), in reading order, at or above min_confidence."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(
                f"expected an RGB uint8 image (H, W, 3), got {image_rgb.shape} {image_rgb.dtype}"
            )
        # RapidOCR takes numpy images as OpenCV's BGR
        image_bgr = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
        result, _elapsed = self.engine(_padded(image_bgr))
        lines = []
        for corners, text, score in result or []:
            text = str(text).strip()
            if text and float(score) >= self.min_confidence:
                corners = np.asarray(corners, dtype=np.float32).reshape(4, 2)
                lines.append(TextLine(corners, text, float(score)))
        return reading_order(lines)


def reading_order(lines: list[TextLine]) -> list[TextLine]:
    """`lines` top to bottom, and left to right within a row (lines whose heights overlap by more
    than `ROW_OVERLAP` of the shorter one's, each compared with its row's first line).

    A line's height is its own, along its box's sides (`_extent`): the upright box of a tilted
    line spans the lines above and below it. RapidOCR sorts its boxes by their top-left corners,
    putting one before another to its right only where their tops are within 10 px: a small word
    left of a big one on the same baseline came after it.
    """
    if not lines:
        return []
    extents = [_extent(line) for line in lines]
    typical = float(np.median([bottom - top for top, bottom in extents]))
    placed = []  # (where it comes: a line's top, a tall one's middle; its left; the line, top, bottom, joinable)
    for line, (top, bottom) in zip(lines, extents):
        joinable = bottom - top <= TALL * typical
        placed.append((top if joinable else (top + bottom) / 2, float(line.corners[:, 0].min()),
                       line, top, bottom, joinable))
    rows: list[tuple[float, float, bool, list[TextLine]]] = []  # first line's top and bottom, joinable, lines
    for *_, line, top, bottom, joinable in sorted(placed, key=lambda place: place[:2]):
        anchor = next((row for row in reversed(rows) if row[2]), None) if joinable else None
        if anchor is not None:
            row_top, row_bottom, _, row = anchor
            if min(bottom, row_bottom) - max(top, row_top) > ROW_OVERLAP * min(bottom - top, row_bottom - row_top):
                row.append(line)
                continue
        rows.append((top, bottom, joinable, [line]))
    return [line for *_, row in rows for line in sorted(row, key=lambda line: line.corners[:, 0].min())]


def _extent(line: TextLine) -> tuple[float, float]:
    """The line's top and bottom: its middle, less and plus half its own height (the mean length
    of its box's left and right sides; corners clockwise from the top left, as RapidOCR gives them)."""
    corners = line.corners
    height = float(np.linalg.norm(corners[3] - corners[0]) + np.linalg.norm(corners[2] - corners[1])) / 2
    middle = float(corners[:, 1].mean())
    return middle - height / 2, middle + height / 2


def _padded(image: np.ndarray) -> np.ndarray:
    """`image` padded on the right and bottom to a shape within `MAX_ASPECT` and `MIN_SIDE`, in
    its mean colour (no edge of its own for the detector to find); unchanged where it is within them."""
    height, width = image.shape[:2]
    to_height = max(height, MIN_SIDE, -(-width // MAX_ASPECT))
    to_width = max(width, MIN_SIDE, -(-height // MAX_ASPECT))
    if (to_height, to_width) == (height, width):
        return image
    colour = [float(v) for v in image.reshape(-1, image.shape[2]).mean(axis=0)]
    return cv2.copyMakeBorder(image, 0, to_height - height, 0, to_width - width, cv2.BORDER_CONSTANT, value=colour)


def upright_size(meta: VideoMeta, image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) of the upright original frame in coded pixels, matching the keyframe's orientation.

    A 90 or 270 degree rotation swaps the coded width and height. The keyframe is shaped as
    displayed (non-square pixels stretched, `workers.sampling.as_displayed`), so its orientation
    is checked against the displayed shape; when it still disagrees (a decoder that did not
    apply the rotation), the keyframe wins.
    """
    width, height = meta.width, meta.height
    # a DVD's 352x576 coded frame shows as 768x576: landscape, though its coded size is portrait
    shown_width, shown_height = width * meta.pixel_aspect, float(height)
    if meta.rotation % 180 == 90:
        width, height = height, width
        shown_width, shown_height = shown_height, shown_width
    image_h, image_w = image_shape[:2]
    if shown_width != shown_height and image_w != image_h and (shown_width > shown_height) != (image_w > image_h):
        width, height = height, width
    return width, height


def scale_corners(
    corners: np.ndarray, image_shape: tuple[int, ...], size: tuple[int, int]
) -> tuple[float, ...]:
    """Corners found in a (downscaled) image as 8 floats x0, y0, ..., x3, y3 in a frame of `size`."""
    image_h, image_w = image_shape[:2]
    scale = np.array([size[0] / image_w, size[1] / image_h], dtype=np.float64)
    return tuple(float(v) for v in (corners.astype(np.float64) * scale).reshape(-1))


class OcrStage(Stage):
    """Reads on-screen text on each video's keyframes (`SampledFrames.keyframes`: the frames
    the sample stage kept for it, every sampled one with `ocr.frames: sampled`)."""

    name = "ocr"
    reads = ("meta", "frames")
    writes = ("texts",)

    def __init__(self, config: RunConfig, num_threads: int | None = None) -> None:
        """Load RapidOCR once; threads default to OMP_NUM_THREADS, which a Ray actor is given from
        the CPUs it reserves (`StageSpec.threads`), else every core (the local executor's model
        stages take turns on them). Not `resources.num_cpus_per_actor`: the local executor, which
        says it does not read it, did, and a Ray actor's `per_stage.ocr.num_cpus` was not."""
        if num_threads is None:
            given = os.environ.get("OMP_NUM_THREADS", "")
            num_threads = int(given) if given.isdigit() and int(given) > 0 else usable_cpus()
        self.reader = TextReader(config.ocr.min_confidence, num_threads)

    def process(self, tasks: list[VideoTask]) -> None:
        """Set `texts` on every task from its keyframes (none when it has no keyframes)."""
        for task in tasks:
            task.texts = self._read_video(task)

    def release(self, task: VideoTask) -> None:
        """The full-resolution keyframes: no later stage reads them."""
        if task.frames is not None:
            task.frames.keyframes = {}

    def _read_video(self, task: VideoTask) -> list[TextBox]:
        frames = task.frames
        if frames is None:
            return []
        texts = []
        for position in sorted(frames.keyframes):
            image = frames.keyframes[position]
            if task.meta is None:
                size = (image.shape[1], image.shape[0])
            else:
                size = upright_size(task.meta, image.shape)
            for line_index, line in enumerate(self.reader.read(image)):
                texts.append(
                    TextBox(
                        frame_index=int(frames.frame_index[position]),
                        timestamp_s=float(frames.timestamp_s[position]),
                        segment_index=int(frames.segment_index[position]),
                        text=line.text,
                        confidence=line.confidence,
                        box=scale_corners(line.corners, image.shape, size),
                        line_index=line_index,
                    )
                )
        return texts
