"""Frame sampling: the index functions, and the decode and sample stages end to end."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from schemas.config import ConfigError, RunConfig, SamplingConfig
from workers.frame_selection import (
    fps_indices,
    keyframes_in_time,
    sample_indices,
    segment_of,
    shot_keyframe_indices,
    snap_to_keyframes,
    uneven_interval,
    uniform_indices,
    whole_video_segment,
)
from workers import sampling
from workers.sampling import DecodeStage, SampleStage, as_displayed
from workers.decode import VideoDecodeError, open_video, probe
from workers.frame_reading import read_decodable
from workers.frame_sources import FrameSource, RequestTooLarge
from workers.synthetic import SCENE_COLOURS, indexed_frames, mux_frames, scene_frames, write_video
from workers.task import Segment, VideoMeta, VideoRef, VideoTask
from tests.corpus import zero_frame
from tests.decoded import every_frame

CUTS, TOTAL, FPS = (20, 45), 60, 25.0


def segment(index: int, start: int, end: int, fps: float = FPS) -> Segment:
    return Segment(
        index=index, start_frame=start, end_frame=end, start_s=start / fps, end_s=(end + 1) / fps,
        confidence=0.9, source="transnetv2", keyframe_index=(start + end) // 2,
    )


def shots(bounds: list[int]) -> list[Segment]:
    """Segments between the given cut positions (the last bound is the frame count)."""
    edges = [0, *bounds]
    return [segment(k, a, b - 1) for k, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


# --- index functions ----------------------------------------------------------------------


def test_uniform_indices_are_centred_in_equal_spans():
    assert uniform_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert uniform_indices(3, 8).tolist() == [0, 1, 2]
    assert uniform_indices(1, 5).tolist() == [0]
    assert uniform_indices(0, 5).tolist() == [] and uniform_indices(10, 0).tolist() == []
    many = uniform_indices(1000, 64)
    assert len(many) == 64 and (np.diff(many) > 0).all() and many[0] >= 0 and many[-1] < 1000


def test_fps_indices():
    assert fps_indices(300, 30.0, 1.0, 64).tolist() == list(range(15, 300, 30))
    assert fps_indices(10, 25.0, 50.0, 64).tolist() == list(range(10))  # faster than the video: all
    assert fps_indices(1, 30.0, 1.0, 64).tolist() == [0]  # shorter than one interval: its middle
    assert fps_indices(12, 30.0, 1.0, 64).tolist() == [6]
    capped = fps_indices(30_000, 30.0, 2.0, 16)
    assert capped.tolist() == uniform_indices(30_000, 16).tolist()
    assert fps_indices(0, 30.0, 1.0, 64).tolist() == []
    with pytest.raises(ValueError):
        fps_indices(100, 0.0, 1.0, 10)


def test_shot_keyframe_indices():
    segments = shots([10, 40, 41])
    assert shot_keyframe_indices(segments, 1).tolist() == [s.keyframe_index for s in segments]
    for per_shot in (2, 3):  # that many frames a shot, its keyframe one of them
        spread = shot_keyframe_indices(segments, per_shot)
        for s in segments:
            inside = spread[(spread >= s.start_frame) & (spread <= s.end_frame)]
            assert s.keyframe_index in inside and len(inside) == min(per_shot, s.end_frame - s.start_frame + 1)
        assert len(spread) == per_shot + per_shot + 1  # the one-frame shot has one frame
    assert shot_keyframe_indices([], 2).tolist() == []
    empty = dataclasses.replace(segments[0], end_frame=segments[0].start_frame - 1)  # a detector's odd shot
    assert shot_keyframe_indices([empty], 2).tolist() == [empty.keyframe_index]


def test_sample_indices_give_every_segment_a_frame():
    segments = shots([5, 6, 50, 100])
    chosen = sample_indices(SamplingConfig(mode="uniform", num_frames=4), 100, FPS, segments)
    assert (np.diff(chosen) > 0).all()
    assert set(uniform_indices(100, 4).tolist()) <= set(chosen.tolist())
    assert set(segment_of(chosen, segments).tolist()) == {0, 1, 2, 3}


def test_sample_indices_keep_the_longest_segments_keyframes_when_capped():
    segments = shots([2, 4, 30, 34, 100])  # lengths 2, 2, 26, 4, 66
    config = SamplingConfig(mode="uniform", num_frames=50, max_frames=3)
    assert sample_indices(config, 100, FPS, segments).tolist() == sorted(
        [segments[4].keyframe_index, segments[2].keyframe_index, segments[3].keyframe_index]
    )
    roomy = sample_indices(SamplingConfig(mode="uniform", num_frames=50, max_frames=8), 100, FPS, segments)
    assert len(roomy) == 8
    assert {s.keyframe_index for s in segments} <= set(roomy.tolist())


def test_sample_indices_modes_and_edge_cases():
    segments = shots([40, 100])
    fps_mode = sample_indices(SamplingConfig(mode="fps", fps=1.0, max_frames=64), 100, 25.0, segments)
    assert set(fps_indices(100, 25.0, 1.0, 64).tolist()) <= set(fps_mode.tolist())
    per_shot = sample_indices(SamplingConfig(mode="keyframes", frames_per_shot=2), 100, 25.0, segments)
    assert per_shot.tolist() == [19, 30, 69, 85]  # two a shot: its keyframe, and one of two spread
    one_frame = [segment(0, 0, 0)]
    assert sample_indices(SamplingConfig(), 1, 25.0, one_frame).tolist() == [0]
    assert sample_indices(SamplingConfig(), 0, 25.0, []).tolist() == []
    assert sample_indices(SamplingConfig(num_frames=3), 9, 25.0, []).tolist() == [1, 4, 7]


#: a screen recording's frame times (s): 40 frames in its first second, 4 frames shown 2 s each
#: while nothing moves, 40 frames in its last second
SCREEN_TIMES = np.concatenate([np.arange(40) / 40, 1 + 2 * np.arange(4), 9 + np.arange(40) / 40])
PAUSE = [40, 41, 42, 43]


def test_a_variable_rate_video_is_sampled_by_time():
    count = len(SCREEN_TIMES)
    assert uneven_interval(SCREEN_TIMES) == pytest.approx(SCREEN_TIMES[-1] / (count - 1))
    uniform = SamplingConfig(num_frames=8)
    # by index, 7 of 8 frames fall in the two bursts (2 s of 10): of the pause, only the whole
    # video's keyframe (its middle frame) is seen
    assert set(sample_indices(uniform, count, 8.4, [])) & set(PAUSE) == {41}
    # by time, a frame every 1.25 s: each frame of the pause once, and one in each burst
    assert sample_indices(uniform, count, 8.4, [], SCREEN_TIMES).tolist() == [24, *PAUSE, 58]
    # one a second: the pause's frames, and the bursts' frames near 0.5 s and 9.5 s
    per_second = sample_indices(SamplingConfig(mode="fps", fps=1.0), count, 8.4, [], SCREEN_TIMES)
    assert per_second.tolist() == [19, *PAUSE, 63]
    # keyframes mode: 4 a shot, by time: the pause's frames, where by count the second shot's
    # fell in the closing burst (45, 67, 78 and its keyframe 61); the even first shot is as by count
    shot_config = SamplingConfig(mode="keyframes", frames_per_shot=4)
    both_shots = [segment(0, 0, 39), segment(1, 40, 83)]
    assert set(sample_indices(shot_config, count, 8.4, both_shots)) >= {45, 61, 67, 78}
    assert sample_indices(shot_config, count, 8.4, both_shots, SCREEN_TIMES).tolist() == [
        5, 19, 25, 35, 40, 41, 42, 61]  # with the shots' keyframes as given, 19 and 61
    # segments' keyframes are kept as given (the stage places them in time first: keyframes_in_time);
    # a frame list of another length is not used
    shot_frames = sample_indices(uniform, count, 8.4, [segment(0, 0, 39), segment(1, 40, 83)], SCREEN_TIMES)
    assert {19, 61} <= set(shot_frames.tolist())
    assert sample_indices(uniform, count, 8.4, [], SCREEN_TIMES[:-1]).tolist() == \
        sample_indices(uniform, count, 8.4, []).tolist()


def test_a_variable_rate_videos_keyframes_are_the_frames_halfway_through_in_time():
    # the first shot is the opening burst (0-1 s), the second the pause and the closing burst (1-10.1 s)
    shots_of_it = [segment(0, 0, 39), segment(1, 40, 83)]
    assert [s.keyframe_index for s in shots_of_it] == [19, 61]  # by count: 61 is in the closing burst
    placed = keyframes_in_time(shots_of_it, SCREEN_TIMES)
    assert [s.keyframe_index for s in placed] == [20, 42]  # shown at 0.5 s, and from 5 s to 7 s
    assert [(s.start_frame, s.end_frame) for s in placed] == [(0, 39), (40, 83)]
    (whole,) = keyframes_in_time([segment(0, 0, 83)], SCREEN_TIMES)
    assert whole.keyframe_index == 42
    # even-rate and jittery videos keep their keyframes
    jitter = np.arange(100) / 25 + np.random.default_rng(1).uniform(-0.016, 0.016, 100)
    assert keyframes_in_time(shots([40, 100]), jitter) == shots([40, 100])


def test_an_even_rate_video_is_sampled_by_index():
    even = np.arange(100) / 25
    jitter = even + np.random.default_rng(0).uniform(-0.016, 0.016, 100)  # within half a frame
    for times in (even, jitter, np.zeros(100), even[:2]):
        assert uneven_interval(times) is None
    for config in (SamplingConfig(num_frames=8), SamplingConfig(mode="fps", fps=2.0),
                   SamplingConfig(mode="keyframes", frames_per_shot=3)):
        assert sample_indices(config, 100, 25.0, [], jitter).tolist() == sample_indices(config, 100, 25.0, []).tolist()


def test_snapping_moves_samples_to_nearby_keyframes_of_their_own_segment():
    segments = shots([50, 100])  # keyframes (middles) 24 and 74
    keyframes = np.array([0, 10, 20, 30, 40, 50, 60, 70, 80, 90])
    indices = np.array([6, 24, 31, 49, 57, 74, 93])
    # 6 -> 10; 24 is a shot keyframe and stays; 31 -> 30; 49 -> 50 would cross into the next
    # shot, 40 is out of reach (half the gap to 57 is 4): stays; 57 -> 60; 93 -> 90
    assert snap_to_keyframes(indices, keyframes, segments).tolist() == [10, 24, 30, 49, 60, 74, 90]
    # a video with one keyframe: samples far from it stay exact; unknown keyframes change nothing
    assert snap_to_keyframes(np.array([3, 40, 80]), np.array([0]), shots([100])).tolist() == [0, 40, 80]
    assert snap_to_keyframes(indices, None, segments) is indices
    # 1 fps of 30 fps video with a keyframe every 2 s: a keyframe lies halfway between two samples,
    # each within reach of it; the second keeps its frame instead of the pair becoming one
    sampled = np.arange(15, 300, 30)
    snapped = snap_to_keyframes(sampled, np.arange(0, 300, 60), shots([300]))
    assert snapped.tolist() == [0, 60, 75, 120, 135, 180, 195, 240, 255, 285]


def test_segment_of_maps_frames_to_segment_indices():
    segments = shots([10, 20, 30])[::-1]  # order must not matter
    mapped = segment_of(np.array([0, 9, 10, 19, 25, 29]), segments)
    assert mapped.dtype == np.int32 and mapped.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        segment_of([1], [])


def test_whole_video_segment():
    meta = VideoMeta(4.0, 25.0, 100, 64, 36, "h264", 0, False, "mp4", "decord")
    whole = whole_video_segment(meta)
    assert (whole.start_frame, whole.end_frame, whole.keyframe_index) == (0, 99, 49)
    assert (whole.start_s, whole.end_s, whole.source, whole.confidence) == (0.0, 4.0, "whole_video", 1.0)


# --- stages -------------------------------------------------------------------------------


class ResizeTo32:
    """A stand-in for a model's frame preparer: resize to 32x32, channels first."""

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8
        resized = np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in frames])
        return resized.transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module")
def scene_clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "scenes.mp4"
    return write_video(path, scene_frames(list(CUTS), TOTAL, 128, 96), fps=FPS)


def task_for(path: Path) -> VideoTask:
    size = path.stat().st_size
    ref = VideoRef(uri=str(path), size_bytes=size, mtime_ns=None, etag=None, video_id=path.stem)
    return VideoTask(ref=ref)


class AsGiven:
    """A frame preparer that hands the frames on at the size it was given them (channels first)."""

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        return frames.transpose(0, 3, 1, 2).copy()


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_frames_are_decoded_no_larger_than_the_consumers_need(scene_clip, monkeypatch, decoder):
    # 128x96 frames with a bound of 64: the models, OCR and the thumbnails get them at 64x48,
    # unless OCR asks for more
    monkeypatch.setattr(sampling, "FRAME_SIDE", 64)
    for ocr_side, expected in ((32, (64, 48)), (100, (100, 75)), (200, (128, 96))):
        config = RunConfig.from_dict({"stages": ["embed", "ocr"], "ocr": {"max_side": ocr_side},
                                      "sampling": {"num_frames": 2}, "resources": {"decoder": decoder}})
        assert sampling.frame_side(config) == max(64, ocr_side)
        task = task_for(scene_clip)
        DecodeStage(config).run([task])
        SampleStage(config, preparers={"embed": AsGiven()}).run([task])
        assert not task.errors and task.frames.prepared["embed"].shape[2:] == expected[::-1]
        assert max(next(iter(task.frames.keyframes.values())).shape[:2]) == min(ocr_side, max(expected))
        assert (task.frames.thumbnails[0].width, task.frames.thumbnails[0].height) == expected
    no_ocr = RunConfig.from_dict({"stages": ["embed"], "ocr": {"max_side": 4000}})
    assert sampling.frame_side(no_ocr) == 64


def test_decode_then_sample_end_to_end(scene_clip):
    config = RunConfig.from_dict({"sampling": {"num_frames": 6}, "ocr": {"max_side": 64}})
    task = task_for(scene_clip)
    DecodeStage(config).run([task])
    assert not task.errors
    assert task.meta.frame_count == TOTAL and task.meta.decoder == "decord"
    assert (task.meta.width, task.meta.height, task.meta.codec) == (128, 96, "h264")
    assert task.shot_frames.shape == (TOTAL, 27, 48, 3) and task.segments == []

    task.segments = shots([*CUTS, TOTAL])  # what shot detection would find
    SampleStage(config, preparers={"embed": ResizeTo32(), "captions": ResizeTo32()}).run([task])
    assert not task.errors and task.shot_frames is None
    frames = task.frames
    assert frames.frame_index.dtype == np.int64 and (np.diff(frames.frame_index) > 0).all()
    assert {s.keyframe_index for s in task.segments} <= set(frames.frame_index.tolist())
    np.testing.assert_allclose(frames.timestamp_s, frames.frame_index / FPS)
    expected_segments = np.searchsorted(CUTS, frames.frame_index, side="right")
    assert frames.segment_index.tolist() == expected_segments.tolist()
    for role in ("embed", "captions"):
        assert frames.prepared[role].shape == (len(frames.frame_index), 3, 32, 32)
    # colours survive decoding and preparing in RGB order: each frame shows its scene's colour
    corner = frames.prepared["embed"][:, :, 2:6, 2:6].mean(axis=(2, 3))
    for colour, scene in zip(corner, frames.segment_index):
        assert np.abs(colour - SCENE_COLOURS[scene]).max() < 50
    # OCR keyframes: one per segment, at its keyframe's position, no side above max_side
    assert len(frames.keyframes) == len(task.segments)
    for position, image in frames.keyframes.items():
        assert frames.frame_index[position] in {s.keyframe_index for s in task.segments}
        assert image.shape == (48, 64, 3)


def test_a_rerun_of_some_units_samples_only_what_their_stages_read(scene_clip):
    # a texts-only rerun (OCR settings changed) wants OCR's keyframes, not the models' frames nor
    # thumbnails; a captions-only one the captions model's frames alone; the same frames either way
    config = RunConfig.from_dict({"sampling": {"num_frames": 6}, "ocr": {"max_side": 64},
                                  "output": {"thumbnails": True}})
    preparers = {"embed": ResizeTo32(), "captions": ResizeTo32()}
    sampled = {}
    for stages in (None, {"decode", "shots", "sample", "ocr"}, {"decode", "shots", "sample", "captions"}):
        task = task_for(scene_clip)
        task.stages = None if stages is None else frozenset(stages)
        DecodeStage(config).run([task])
        task.segments = shots([*CUTS, TOTAL])
        SampleStage(config, preparers=preparers).run([task])
        assert not task.errors
        sampled[None if stages is None else next(iter(stages - {"decode", "shots", "sample"}))] = task.frames
    full, texts, captions = sampled[None], sampled["ocr"], sampled["captions"]
    assert set(full.prepared) == {"embed", "captions"} and full.keyframes and full.thumbnails
    assert texts.prepared == {} and not texts.thumbnails
    assert texts.keyframes.keys() == full.keyframes.keys()
    for position, image in texts.keyframes.items():
        np.testing.assert_array_equal(image, full.keyframes[position])
    assert set(captions.prepared) == {"captions"} and not captions.keyframes and not captions.thumbnails
    np.testing.assert_array_equal(captions.prepared["captions"], full.prepared["captions"])
    for frames in (texts, captions):
        assert frames.frame_index.tolist() == full.frame_index.tolist()


def test_resources_decoder_pyav_reads_every_video_with_pyav_and_the_same_frames(tmp_path):
    # B-frames and a keyframe every 10 frames: PyAV seeks and leaves frames out, decord seeks
    path = write_video(tmp_path / "b_frames.mp4", scene_frames(list(CUTS), TOTAL, 128, 96), fps=FPS, gop=10,
                       options={"preset": "medium"})
    frames, thumbnails = {}, {}
    for decoder in ("decord", "pyav"):
        config = RunConfig.from_dict({"sampling": {"num_frames": 7}, "resources": {"decoder": decoder}})
        task = task_for(path)
        DecodeStage(config).run([task])
        assert task.meta.decoder == decoder
        thumbnails[decoder] = task.shot_frames
        task.segments = shots([*CUTS, TOTAL])
        SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
        assert not task.errors
        frames[decoder] = task.frames
    assert frames["pyav"].frame_index.tolist() == frames["decord"].frame_index.tolist()
    np.testing.assert_array_equal(frames["pyav"].prepared["embed"], frames["decord"].prepared["embed"])
    np.testing.assert_allclose(frames["pyav"].timestamp_s, frames["decord"].timestamp_s)
    # the 48x27 thumbnails for shot detection: each decoder's own scaler, so alike, not equal
    assert thumbnails["pyav"].shape == thumbnails["decord"].shape == (TOTAL, 27, 48, 3)
    colours = {decoder: small.mean(axis=(1, 2)) for decoder, small in thumbnails.items()}
    assert np.abs(colours["pyav"] - colours["decord"]).max() < 3
    with pytest.raises(ConfigError, match="resources.decoder: 'ffmpeg'"):
        RunConfig.from_dict({"resources": {"decoder": "ffmpeg"}})


def test_without_shots_the_whole_video_is_one_segment_and_no_ocr_keyframes(scene_clip):
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"mode": "fps", "fps": 2.0}})
    stage = DecodeStage(config)
    task = task_for(scene_clip)
    stage.run([task])
    assert task.shot_frames is None
    assert [(s.start_frame, s.end_frame, s.source) for s in task.segments] == [(0, TOTAL - 1, "whole_video")]
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors
    # two a second (each mid-interval) plus the whole video's keyframe
    assert task.frames.frame_index.tolist() == [6, 18, 29, 31, 43, 56]
    assert set(task.frames.segment_index.tolist()) == {0}
    assert task.frames.keyframes == {}


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_snapped_samples_are_the_keyframes_themselves(tmp_path, decoder):
    from workers.synthetic import index_level, indexed_frames

    path = write_video(tmp_path / "gop10.mp4", indexed_frames(100), fps=25, gop=10)
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"num_frames": 5, "snap_to_keyframes": True}})
    task = task_for(path)
    DecodeStage(config).run([task])
    task.meta.decoder = decoder
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors
    # uniform 10, 30, 50, 70, 90 are keyframes already; the whole video's keyframe 49 stays exact
    assert task.frames.frame_index.tolist() == [10, 30, 49, 50, 70, 90]
    red = task.frames.prepared["embed"][:, 0, :, :12].mean(axis=(1, 2))
    expected = [index_level(i, 100) for i in task.frames.frame_index]
    assert np.abs(red - expected).max() < 4  # the frames read are the indexed ones
    config = config.with_overrides({"sampling.num_frames": 4})  # 12, 37, 62, 87 -> 10, 40, 60, 90
    task = task_for(path)
    DecodeStage(config).run([task])
    task.meta.decoder = decoder
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert task.frames.frame_index.tolist() == [10, 40, 49, 60, 90]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_segments_end_when_their_last_frame_does_without_float_noise(tmp_path, decoder):
    path = write_video(tmp_path / "twelve.mp4", indexed_frames(12), fps=30)
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"num_frames": 4}})
    task = task_for(path)
    DecodeStage(config).run([task])
    task.meta.decoder = decoder
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors
    # the last frame is shown at 11/30 s for 1/30 s: the sum is 0.39999999999999997 in floats
    assert [(s.start_s, s.end_s) for s in task.segments] == [(0.0, 0.4)]
    # a container whose stated duration ends within the last frame (36.301 s against 1090 frames
    # at 30 fps, in a real clip): the last shot ends with the video, as its rows say it does
    task.meta = dataclasses.replace(task.meta, duration_s=0.39)
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert [(s.start_s, s.end_s) for s in task.segments] == [(0.0, 0.39)]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_a_screen_recording_is_sampled_by_time_end_to_end(tmp_path, decoder):
    from workers.synthetic import index_level, indexed_frames

    count = len(SCREEN_TIMES)
    times_ms = np.round(SCREEN_TIMES * 1000).astype(int)
    path = write_video(tmp_path / "screen.mkv", indexed_frames(count, 64, 36), times_ms=times_ms)
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"num_frames": 8}})
    task = task_for(path)
    DecodeStage(config).run([task])
    task.meta.decoder = decoder
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors and task.frames is not None
    assert task.frames.frame_index.tolist() == [24, *PAUSE, 58]
    assert task.segments[0].keyframe_index == 42  # halfway through the video's time, not its count (41)
    np.testing.assert_allclose(task.frames.timestamp_s, SCREEN_TIMES[task.frames.frame_index], atol=1e-3)
    red = task.frames.prepared["embed"][:, 0, :, :12].mean(axis=(1, 2))
    assert np.abs(red - [index_level(i, count) for i in task.frames.frame_index]).max() < 4
    # with shots, OCR reads each shot's frame halfway through in time: the pause's, not the burst's
    config = config.with_overrides({"stages": ["embed", "ocr"], "sampling.num_frames": 2})
    task = task_for(path)
    DecodeStage(config).run([task])
    task.meta.decoder = decoder
    task.segments = [segment(0, 0, 39), segment(1, 40, 83)]  # what shot detection would find
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors
    assert [s.keyframe_index for s in task.segments] == [20, 42]
    read_by_ocr = sorted(int(task.frames.frame_index[position]) for position in task.frames.keyframes)
    assert read_by_ocr == [20, 42]
    for position, image in task.frames.keyframes.items():
        level = image[:, :12, 0].mean()
        assert abs(level - index_level(int(task.frames.frame_index[position]), count)) < 4


def test_a_variable_rate_segment_ends_when_the_frame_after_its_last_is_shown(tmp_path):
    # the pause's first frame (40, at 1 s) is shown for 2 s: the first shot ends at 3 s, when
    # frame 41, the second shot's first, is shown; not at 1 s plus one frame at the average rate
    times_ms = np.round(SCREEN_TIMES * 1000).astype(int)
    path = write_video(tmp_path / "screen.mkv", indexed_frames(len(SCREEN_TIMES), 64, 36), times_ms=times_ms)
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"num_frames": 4}})
    task = task_for(path)
    DecodeStage(config).run([task])
    task.segments = [segment(0, 0, 40), segment(1, 41, 83)]
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors
    assert [(s.start_s, s.end_s) for s in task.segments] == [
        (0.0, pytest.approx(3.0, abs=1e-3)), (pytest.approx(3.0, abs=1e-3), task.meta.duration_s)]


def _sampled(path, sampling=None):
    """A video's facts and its sampled frames' times, as the decode and sample stages give them."""
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": sampling or {"num_frames": 8}})
    task = task_for(path)
    DecodeStage(config).run([task])
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors, task.errors
    return task


def test_a_few_frames_of_variable_rate_matroska_keep_their_times(tmp_path):
    # decord's index of an H.264 Matroska file of 7 frames or fewer holds no times (FFmpeg's
    # no-timestamp value): the frames were counted at the average rate, 6 frames over 20 s read as 0.2 s
    times_ms = [0, 40, 80, 5000, 12000, 20000]
    path = write_video(tmp_path / "static.mkv", indexed_frames(6, 64, 36), fps=30, times_ms=times_ms)
    task = _sampled(path)
    assert task.meta.decoder == "pyav" and task.meta.duration_s == pytest.approx(20.0 + 1 / 30, abs=0.01)
    np.testing.assert_allclose(task.frames.timestamp_s, np.array(times_ms)[task.frames.frame_index] / 1000, atol=1e-3)


def test_no_frame_is_shown_after_the_videos_end_where_the_container_states_it_short(tmp_path):
    # FFmpeg's MP4 muxer stated this video's length from decode times: with B-frames and a slower
    # rate at its end, 13.92 s, and the last frame (shown at 14.2 s) lay after it and its segment
    times_ms = [i * 40 if i < 60 else 2400 + (i - 60) * 200 for i in range(120)]
    path = write_video(tmp_path / "slower_at_its_end.mp4", indexed_frames(120, 64, 36), fps=25, gop=12,
                       times_ms=times_ms, options={"preset": "medium", "bf": "3"})
    task = _sampled(path, {"mode": "fps", "fps": 2.0})
    assert task.frames.timestamp_s.max() == pytest.approx(14.2, abs=1e-3)
    assert task.frames.timestamp_s.max() < task.meta.duration_s == task.segments[-1].end_s


def test_a_bad_video_becomes_an_error_and_the_others_go_on(scene_clip, tmp_path, caplog):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    tasks = [task_for(junk), task_for(scene_clip)]
    with caplog.at_level(logging.WARNING, logger="workers"):
        DecodeStage(RunConfig()).run(tasks)
    assert tasks[0].failed and tasks[0].errors[0].error_type == "VideoDecodeError"
    assert "junk.mp4" not in tasks[0].errors[0].message  # (the errors row's uri names it)
    assert caplog.text.count(str(junk)) == 1  # the warning names the file once, not "...junk.mp4: ...junk.mp4: "
    assert tasks[1].meta is not None and not tasks[1].errors


def test_a_file_replaced_after_it_was_listed_fails_saying_so(scene_clip, tmp_path, caplog):
    path = tmp_path / "replaced.mp4"
    shutil.copy(scene_clip, path)
    stat = path.stat()
    task = VideoTask(ref=VideoRef(str(path), stat.st_size, stat.st_mtime_ns, None, "id"))
    DecodeStage(RunConfig()).run([task])
    task.segments = shots([*CUTS, TOTAL])
    write_video(tmp_path / "short.mp4", scene_frames([], 20, 128, 96), fps=FPS)
    os.replace(tmp_path / "short.mp4", path)  # a shorter video under its name, mid-run
    with caplog.at_level(logging.WARNING, logger="workers"):
        SampleStage(RunConfig(), preparers={"embed": ResizeTo32()}).run([task])
    (error,) = task.errors
    assert error.stage == "sample" and error.message.startswith(
        "the file changed after it was listed (the next run processes it again): ")
    assert "the file changed after it was listed" in caplog.text


@pytest.mark.parametrize("gone_before", ["decode", "sample"])
def test_a_file_removed_after_it_was_listed_fails_saying_so_once(gone_before, scene_clip, tmp_path):
    # its errors row said it twice, the second time as a guess: "the file was removed after it was
    # listed: no such video file (it no longer exists: deleted or moved after it was listed, or a
    # manifest names a file that never existed?)"
    path = tmp_path / "gone.mp4"
    shutil.copy(scene_clip, path)
    stat = path.stat()
    task = VideoTask(ref=VideoRef(str(path), stat.st_size, stat.st_mtime_ns, None, "id"))
    if gone_before == "sample":
        DecodeStage(RunConfig()).run([task])
        task.segments = shots([*CUTS, TOTAL])
    path.unlink()
    stage = DecodeStage(RunConfig()) if gone_before == "decode" else SampleStage(RunConfig(),
                                                                                  preparers={"embed": ResizeTo32()})
    stage.run([task])
    (error,) = task.errors
    assert (error.stage, error.message) == (gone_before, "the file was removed after it was listed (deleted or moved)")
    # a manifest's row names no size or time: the decoder's words say what may have happened
    unlisted = VideoTask(ref=VideoRef(str(path), None, None, None, "id"))
    DecodeStage(RunConfig()).run([unlisted])
    assert "no such video file" in unlisted.errors[0].message and "manifest" in unlisted.errors[0].message


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_a_corrupt_stretch_costs_the_sampled_frames_in_it_not_the_video(tmp_path, decoder, caplog):
    # a keyframe every 10 frames, frame 21 zeroed: frames 21-29 cannot be decoded, and with them
    # every frame sampled in the segment 20-29 (24, its keyframe, and 25)
    path = write_video(tmp_path / "corrupt.mp4", indexed_frames(TOTAL, 64, 36), fps=FPS, gop=10)
    intact = every_frame(path)
    zero_frame(path, 21)
    config = RunConfig.from_dict({"stages": ["embed", "ocr"], "sampling": {"num_frames": 6},
                                  "resources": {"decoder": decoder}})
    task = task_for(path)
    DecodeStage(config).run([task])
    task.segments = shots([20, 30, TOTAL])
    with caplog.at_level(logging.INFO, logger="workers"):
        SampleStage(config, preparers={"embed": AsGiven()}).run([task])
    assert not task.errors
    frames = task.frames
    assert frames.undecodable.tolist() == [24, 25]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "corrupt.mp4: sampled frames [24, 25] could not be decoded" in warnings[0]
    # the segment keeps a frame of its own that decodes, which its embedding needs, and its
    # keyframe (what OCR reads) moves there
    assert frames.frame_index.tolist() == [5, 9, 15, 20, 35, 44, 45, 55]
    assert frames.segment_index.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    np.testing.assert_allclose(frames.timestamp_s, frames.frame_index / FPS)
    shown = frames.prepared["embed"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(shown, np.stack([intact[index] for index in frames.frame_index]))
    assert [s.keyframe_index for s in task.segments] == [9, 20, 44]
    assert sorted(frames.frame_index[list(frames.keyframes)].tolist()) == [9, 20, 44]
    if decoder == "decord":  # decord gives up at the damage and PyAV reads on: said in words, at info
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="workers"), open_video(str(path), task.meta) as source:
            assert source.get_decodable_frames(np.array([5, 24, 35]))[1].tolist() == [5, 35]
        assert "corrupt.mp4 (the decoder rejected a packet: a damaged stretch of the file?); reading it " \
               "with PyAV" in caplog.text and ".cc:" not in caplog.text  # not decord's C++ source lines
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _corrupt(tmp_path, zeroed: list[int]) -> Path:
    """A clip with a keyframe every 10 frames, each of the `zeroed` frames zeroed: it and the
    frames after it up to the next keyframe cannot be decoded."""
    path = write_video(tmp_path / "corrupt.mp4", indexed_frames(TOTAL, 64, 36), fps=FPS, gop=10)
    for index in zeroed:
        zero_frame(path, index)
    return path


def _sampled_with_ocr(path: Path, segments: list[Segment]) -> VideoTask:
    config = RunConfig.from_dict({"stages": ["embed", "ocr"], "sampling": {"num_frames": 6}})
    task = task_for(path)
    DecodeStage(config).run([task])
    task.segments = segments
    SampleStage(config, preparers={"embed": AsGiven()}).run([task])
    assert not task.errors, task.errors
    return task


def test_a_lost_keyframe_gives_way_to_the_decoded_frame_nearest_it(tmp_path):
    # frames 21-29 lost: the first shot's keyframe 24 with them; of its decoded frames (5, 15,
    # 35, 45), 15 is the nearest (9 frames away; 35 is 11), which OCR reads in its place
    task = _sampled_with_ocr(_corrupt(tmp_path, [21]), shots([50, TOTAL]))
    assert task.frames.undecodable.tolist() == [24, 25]
    assert [s.keyframe_index for s in task.segments] == [15, 54]
    assert sorted(task.frames.frame_index[list(task.frames.keyframes)].tolist()) == [15, 54]


def test_ocr_reads_no_keyframe_for_a_shot_none_of_whose_frames_decodes(tmp_path):
    # shots 21-29 and 51-59 lost whole (no stand-in decodes either): OCR reads the other shots'
    # keyframes only, not the next frame decoded after a lost keyframe (35, the third shot's),
    # nor past the last frame decoded
    task = _sampled_with_ocr(_corrupt(tmp_path, [21, 51]), shots([21, 30, 51, TOTAL]))
    assert task.frames.frame_index.tolist() == [5, 10, 15, 35, 40, 45]
    assert [s.keyframe_index for s in task.segments] == [10, 25, 40, 55]
    assert sorted(task.frames.frame_index[list(task.frames.keyframes)].tolist()) == [10, 40]


@pytest.mark.parametrize("failure, fails", [
    (VideoDecodeError("the decoder failed, not on the file's data"), True),
    (VideoDecodeError("a 7680x4320 frame ... exceeds the limit (sampling.max_frame_pixels)"), True),
    (VideoDecodeError("frames [22, 24] could not be decoded", bad_file=True), False),
    (RequestTooLarge("16 frames of 64x36 exceed the limit of decoded pixels"), False),
])
def test_a_stand_ins_read_fails_the_video_unless_the_file_is_at_fault(tmp_path, monkeypatch, failure, fails):
    # the stand-ins' read (frames 22-28 and 52-58, for the two shots that lost theirs) failing for a
    # reason other than the file's bytes was taken for "none of them decodes": the video was recorded
    # ok without those shots' frames, and no later run read it again
    path = _corrupt(tmp_path, [21, 51])
    config = RunConfig.from_dict({"stages": ["embed", "ocr"], "sampling": {"num_frames": 6}})
    task = task_for(path)
    DecodeStage(config).run([task])
    reads = []
    read = FrameSource.get_decodable_frames

    def failing_second_read(source, indices, *args, **kwargs):
        reads.append(list(indices))
        if len(reads) == 2:
            raise failure
        return read(source, indices, *args, **kwargs)

    monkeypatch.setattr(FrameSource, "get_decodable_frames", failing_second_read)
    segments = shots([21, 30, 51, TOTAL])
    if fails:
        with pytest.raises(VideoDecodeError) as raised:
            read_decodable(str(path), task.meta, segments, config.sampling)
        assert raised.value is failure
    else:
        frames, _, indices, _, undecodable, _ = read_decodable(str(path), task.meta, segments, config.sampling)
        assert indices.tolist() == [5, 10, 15, 35, 40, 45] and len(frames) == 6
        assert undecodable.tolist() == [25, 55]
    assert reads[1] == [22, 24, 26, 28, 52, 54, 56, 58]


def test_stand_ins_past_the_pixel_limit_leave_their_shots_bare_and_the_video_read(tmp_path):
    # the 4 frames sampled (a keyframe a shot) are within max_pixels_per_video, the 8 stand-ins tried
    # for the two shots that lost theirs are not: the limit's refusal is no failure of the video's
    path = _corrupt(tmp_path, [21, 51])
    config = RunConfig.from_dict({"stages": ["embed", "ocr"],
                                  "sampling": {"mode": "keyframes", "max_pixels_per_video": 4 * 64 * 36}})
    task = task_for(path)
    DecodeStage(config).run([task])
    frames, _, indices, _, undecodable, _ = read_decodable(str(path), task.meta, shots([21, 30, 51, TOTAL]),
                                                        config.sampling)
    assert indices.tolist() == [10, 40] and len(frames) == 2
    assert undecodable.tolist() == [25, 55]


def test_a_video_of_exactly_the_frame_and_pixel_limits_is_decoded(scene_clip):
    def decoded(max_frames: int, max_pixels: int) -> VideoTask:
        config = RunConfig.from_dict({"stages": ["embed"], "sampling": {
            "max_video_frames": max_frames, "max_pixels_per_video": max_pixels}})
        task = task_for(scene_clip)
        DecodeStage(config).run([task])
        return task

    assert not decoded(TOTAL, 128 * 96).errors
    # (an MP4: its index states the frames, refused before FFmpeg opens it)
    assert "index claims 60 frames for its video (track 1's stts), more than the limit of 59 frames" \
        in decoded(TOTAL - 1, 128 * 96).errors[0].message
    assert "exceeds the limit of 12287 decoded pixels" in decoded(TOTAL, 128 * 96 - 1).errors[0].message


def test_a_frame_larger_than_the_frame_bound_is_refused_from_its_header(scene_clip, monkeypatch):
    # one 16000x16000 frame (under max_pixels_per_video, which counts a request's pixels) took
    # 1.5 GB to decode; FFmpeg decoded it as it opened the file, before any check
    def decoded(max_frame_pixels: int) -> VideoTask:
        task = task_for(scene_clip)
        DecodeStage(RunConfig.from_dict({"stages": ["embed"], "sampling": {"max_frame_pixels": max_frame_pixels}}
                                        )).run([task])
        return task

    assert not decoded(128 * 96).errors
    refused = decoded(128 * 96 - 1)
    (error,) = refused.errors
    assert error.stage == "decode" and refused.meta is None
    assert error.message.startswith("one 128x96 frame (12,288 pixels) exceeds the limit of 12,287 pixels a frame "
                                    "(sampling.max_frame_pixels), refused before decoding: raise the setting")
    assert not error.bad_file  # a limit of the configuration: raised, the video runs again
    # from the stream's header: not a frame of it is decoded (probe's first frame, for its rotation)
    monkeypatch.setattr("workers.decode._first_frame_rotation", lambda *_: pytest.fail("a frame was decoded"))
    with pytest.raises(sampling.VideoDecodeError, match=r"scenes\.mp4: one 128x96 frame .*sampling\.max_frame_pixels"):
        sampling.read_video(str(scene_clip), True, TOTAL, max_frame_pixels=128 * 96 - 1)


def test_ffmpeg_opens_a_video_with_the_frame_bound_as_its_decoders_own(scene_clip, monkeypatch):
    """(mutation review) FFmpeg decodes a frame or more as it opens a file: without the bound handed to
    its decoder (`max_pixels`), a 16000x16000 frame took 580 MB to open before the header's refusal."""
    import av

    opened, av_open = [], av.open

    def spied(*args, **kwargs):
        opened.append(kwargs.get("options"))
        return av_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", spied)
    probe(scene_clip, 128 * 96)
    assert opened == [{"max_pixels": str(128 * 96)}]


def test_a_stated_duration_that_ends_as_the_last_frame_starts_is_run_to_its_end(tmp_path, monkeypatch):
    # 12 frames at 30 fps, the container stating 11/30 s: the last frame would be shown for no time
    path = write_video(tmp_path / "twelve.mp4", indexed_frames(12), fps=30)
    with open_video(str(path), probe(path)) as source:
        last_shown = float(source.frame_times([11])[0])
    monkeypatch.setattr(sampling, "probe", lambda *args: dataclasses.replace(probe(*args), duration_s=last_shown))
    meta, _ = sampling.read_video(str(path), False, 100)
    assert meta.duration_s == 0.4


def test_sampling_respects_the_pixel_bound(scene_clip):
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"max_pixels_per_video": 128 * 96}})
    task = task_for(scene_clip)
    DecodeStage(config).run([task])
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert task.frames is None and "decoded pixels" in task.errors[0].message


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_a_video_is_opened_once_for_decode_and_sample_and_a_replaced_file_is_read_anew(scene_clip, tmp_path,
                                                                                       monkeypatch, decoder):
    import shutil

    from workers import frame_sources, pyav_source

    opened = []
    source_class = {"decord": frame_sources.DecordSource, "pyav": pyav_source.PyAVSource}[decoder]
    original = source_class.__init__

    def counting(self, path, meta=None, *bounds):
        opened.append(str(path))
        original(self, path, meta, *bounds)

    monkeypatch.setattr(source_class, "__init__", counting)
    # in this process (no decode child), so that the opens are counted here
    config = RunConfig.from_dict({"stages": ["embed"], "resources": {"decode_timeout_s": 0, "decoder": decoder}})
    clip = Path(shutil.copy(scene_clip, tmp_path / "clip.mp4"))
    task = task_for(clip)
    DecodeStage(config).run([task])
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors and opened == [str(clip)]
    corner = task.frames.prepared["embed"][:, :, 2:6, 2:6].mean(axis=(2, 3))
    scenes = np.searchsorted(CUTS, task.frames.frame_index, side="right")
    assert np.abs(corner - np.asarray(SCENE_COLOURS)[scenes]).max() < 50

    # the file is replaced between the stages: the kept source is not used
    task = task_for(clip)
    DecodeStage(config).run([task])
    green = np.zeros((96, 128, 3), dtype=np.uint8)
    green[..., 1] = 200
    write_video(clip, [green] * TOTAL, fps=FPS)
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors and opened == [str(clip)] * 3
    assert np.abs(task.frames.prepared["embed"].mean(axis=(0, 2, 3)) - [0, 200, 0]).max() < 10


def test_one_source_is_kept_and_only_for_its_own_file(scene_clip, tmp_path):
    import shutil

    from workers.decode import open_video
    from workers.kept_source import KeptSource

    other = Path(shutil.copy(scene_clip, tmp_path / "other.mp4"))
    first, second = open_video(scene_clip), open_video(other)
    KeptSource.keep(scene_clip, first)
    KeptSource.keep(other, second)
    assert first._reader is None and second._reader is not None  # keeping one closes the one before
    assert KeptSource.take(scene_clip, "decord") is None  # another file: not taken, and closed
    assert second._reader is None
    third = open_video(other)
    KeptSource.keep(other, third)
    assert KeptSource.take(other, "pyav") is None  # another decoder
    third = open_video(other)
    KeptSource.keep(other, third)
    assert KeptSource.take(other, "decord") is third
    assert KeptSource.take(other, "decord") is None  # taken once
    third.close()


def write_anamorphic(path: Path, picture: np.ndarray, pixel_aspect: Fraction, count: int = 10) -> Path:
    """An H.264 clip of `count` copies of `picture` whose pixels are `pixel_aspect` as wide as high."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = *picture.shape[:2], "yuv420p"
        stream.codec_context.sample_aspect_ratio = pixel_aspect
        mux_frames(container, stream, (av.VideoFrame.from_ndarray(picture) for _ in range(count)))
    return path


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_non_square_pixels_are_seen_as_a_player_shows_them(tmp_path, decoder):
    # HDV's 1440x1080 is shown 1920x1080: its pixels are 4/3 as wide as high. A disc coded
    # squeezed to 3/4 of its width must reach the models, OCR and thumbnails round again.
    width, height = 144, 108
    rows, columns = np.mgrid[:height, :width]
    squeezed = ((columns - width / 2) * 4 / 3) ** 2 + (rows - height / 2) ** 2 < 40 ** 2
    picture = np.where(squeezed[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    path = write_anamorphic(tmp_path / "hdv.mp4", picture, Fraction(4, 3))
    config = RunConfig.from_dict({"stages": ["embed", "ocr"], "ocr": {"max_side": 1000},
                                  "resources": {"decoder": decoder, "decode_timeout_s": 0}})
    task = task_for(path)
    DecodeStage(config).run([task])
    assert task.meta.pixel_aspect == pytest.approx(4 / 3) and (task.meta.width, task.meta.height) == (width, height)
    SampleStage(config, preparers={"embed": ResizeTo32()}).run([task])
    assert not task.errors
    keyframe = next(iter(task.frames.keyframes.values()))
    assert keyframe.shape == (height, 192, 3)
    disc = keyframe[..., 0] > 128
    across, down = disc.any(axis=0).sum(), disc.any(axis=1).sum()
    assert abs(across - down) <= 3, f"the disc is {across} wide and {down} high"
    thumbnail = task.frames.thumbnails[0]
    assert thumbnail.width / thumbnail.height == pytest.approx(16 / 9, rel=0.02)


def test_a_turned_video_is_stretched_along_its_coded_width():
    meta = VideoMeta(1.0, 25.0, 25, 144, 108, "h264", 90, False, "mp4", "pyav", pixel_aspect=4 / 3)
    upright = np.zeros((2, 144, 108, 3), dtype=np.uint8)  # coded 144 wide, shown 144 high
    assert as_displayed(upright, meta).shape == (2, 192, 108, 3)
    square = VideoMeta(1.0, 25.0, 25, 144, 108, "h264", 0, False, "mp4", "pyav")
    assert as_displayed(upright, square) is upright


@pytest.mark.parametrize("ratio", [Fraction(20, 1), Fraction(1, 8)])
def test_a_bogus_pixel_aspect_is_ignored(tmp_path, ratio):
    # stretched 20 times, nine 1080p frames would take a gigabyte
    path = write_anamorphic(tmp_path / "bogus.mp4", np.zeros((72, 128, 3), dtype=np.uint8), ratio, 2)
    assert probe(path).pixel_aspect == 1.0
