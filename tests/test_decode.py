"""Decoding: container facts, frames by index from both decoders, fallbacks, broken files."""

from __future__ import annotations

import re
import types
from pathlib import Path

import av
import numpy as np
import pytest

from workers.decode import (
    DecordSource,
    PyAVSource,
    VideoDecodeError,
    clockwise_rotation,
    open_video,
    probe,
)
from tests.corpus import zero_frame
from tests.decoded import every_frame
from workers.synthetic import index_level, indexed_frames, write_video

COUNT = 30  # frames in the indexed clips (few enough that compression cannot blur their levels)
SOURCES = [DecordSource, PyAVSource]


@pytest.fixture(scope="module")
def indexed_clip(tmp_path_factory) -> Path:
    """H.264 with a keyframe every 8 frames, so reads must seek."""
    path = tmp_path_factory.mktemp("clips") / "indexed.mp4"
    return write_video(path, indexed_frames(COUNT, 64, 36), fps=25, gop=8)


@pytest.fixture(scope="module")
def b_frame_clip(tmp_path_factory) -> Path:
    """H.264 as encoders write it at their defaults: B-frames, some of which no frame refers to."""
    path = tmp_path_factory.mktemp("clips") / "b_frames.mp4"
    return write_video(path, indexed_frames(COUNT, 64, 36), fps=25, gop=15, options={"preset": "medium"})


@pytest.fixture(scope="module")
def indexed_avi(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "indexed.avi"
    return write_video(path, indexed_frames(COUNT, 64, 36), fps=20, codec="mpeg4", gop=10)


def frame_indices_seen(frames: np.ndarray, count: int = COUNT) -> list[int]:
    """Decode each frame's own index from its red level (left half), checking RGB order on the way."""
    width = frames.shape[2]
    levels = frames[:, :, : width // 2 - 4, 0].mean(axis=(1, 2))
    right = frames[:, :, width // 2 + 4 :, :].mean(axis=(1, 2))
    assert (right[:, 2] > 230).all() and (right[:, 0] < 25).all(), "right half must be blue (RGB order)"
    table = np.array([index_level(i, count) for i in range(count)])
    return [int(np.argmin(np.abs(table - level))) for level in levels]


def write_rotated(path: Path, degrees_ccw: int, width: int = 96, height: int = 64) -> Path:
    """A clip with a display matrix and a red block in the coded frame's top-left corner."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.set_display_rotation(degrees_ccw)
        for _ in range(6):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:16, :16, 0] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def red_corner(frame: np.ndarray) -> str:
    corners = {"TL": frame[:6, :6], "TR": frame[:6, -6:], "BL": frame[-6:, :6], "BR": frame[-6:, -6:]}
    (name,) = [k for k, v in corners.items() if v[..., 0].mean() > 128]
    return name


# --- frames by index ---------------------------------------------------------------------


@pytest.mark.parametrize("source_class", SOURCES)
def test_frames_come_back_by_index_in_the_requested_order(indexed_clip, source_class):
    indices = [21, 3, 3, 29, 0, 17, 18, 16, 21]
    with source_class(indexed_clip, probe(indexed_clip)) as source:
        assert source.frame_count == COUNT and source.fps == pytest.approx(25)
        frames = source.get_frames(indices)
    assert frames.shape == (len(indices), 36, 64, 3) and frames.dtype == np.uint8
    assert frame_indices_seen(frames) == indices


def test_both_decoders_give_the_same_frames(indexed_clip):
    meta = probe(indexed_clip)
    indices = np.random.default_rng(1).integers(0, COUNT, 10).tolist()
    with DecordSource(indexed_clip, meta) as fast, PyAVSource(indexed_clip, meta) as fallback:
        difference = np.abs(fast.get_frames(indices).astype(int) - fallback.get_frames(indices))
    assert difference.mean() < 2


def test_both_decoders_agree_on_a_real_clip_with_b_frames(shared_videos):
    clip = shared_videos / "peppers_tray.mp4"
    meta = probe(clip)
    with DecordSource(clip, meta) as fast, PyAVSource(clip, meta) as fallback:
        indices = [fast.frame_count - 1, 7, 100, 3]
        difference = np.abs(fast.get_frames(indices).astype(int) - fallback.get_frames(indices))
    assert difference.mean() < 2


@pytest.mark.parametrize("clip", ["indexed_avi", "real_avi"])
def test_avi_files_are_read_with_pyav_in_display_order(clip, indexed_avi, request):
    # decord's random access in AVI now and then returns a wrong frame (dmlc/decord#195);
    # the real clip's packed B-frames also give out-of-order timestamps, so PyAV counts frames
    if clip == "indexed_avi":
        path = indexed_avi
    else:
        path = request.getfixturevalue("shared_videos") / "eye_makeup.avi"
    expected = every_frame(path)
    indices = [len(expected) - 1, 7, 25, 3, 7]
    with open_video(path) as source:
        assert source.decoder == "pyav" and source.frame_count == len(expected)
        frames = source.get_frames(indices)
        small = source.all_frames_small()
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, expected[index])
    assert len(small) == len(expected)


def test_an_avi_damaged_midway_keeps_its_length_and_its_frames_after_are_lost(shared_videos, tmp_path):
    """Where frames are counted (the real AVI's timestamps are out of order), counting stops at the
    first frame lost where no keyframe follows (this clip's one keyframe is its first): the rest
    of the video is left out, not read as its end. Before, every frame was read up to there and
    `frame_count` and `duration_s` cut to them, with no warning."""
    from workers.sampling import read_video

    data = bytearray((shared_videos / "eye_makeup.avi").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 20_000] = bytes(20_000)  # a bad sector's worth, zeroed
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))
    meta, small = read_video(str(damaged), shots=True, max_frames=10_000)
    with open_video(damaged) as source:
        assert source.decoder == "pyav" and meta.frame_count == source.frame_count > 140
        frames, decoded = source.get_decodable_frames([5, 60, meta.frame_count - 10])
    assert len(small) == meta.frame_count and meta.duration_s == pytest.approx(meta.frame_count / 25)
    assert decoded.tolist() == [5, 60] and len(frames) == 2
    np.testing.assert_array_equal(small[-1], small[100])  # (the last frame read before the stretch, held)
    assert small[-1].any()  # (held, not left black: mutation review)


def test_counting_an_avi_goes_on_from_the_keyframe_after_a_damaged_stretch(shared_videos, tmp_path):
    """An AVI whose frames are counted (packed B-frames: the real clip's, played twice, so that a
    keyframe follows the damage) lost every frame after its first damaged stretch, a long
    recording all of its samples after it; counting now goes on from the next keyframe, placed
    by its timestamp, and the frames from there on are those of the undamaged file."""
    from workers.sampling import read_video

    whole = tmp_path / "twice.avi"
    with av.open(str(shared_videos / "eye_makeup.avi")) as source, av.open(str(whole), "w") as target:
        stream = source.streams.video[0]
        copied = target.add_stream_from_template(stream)
        packets = [packet for packet in source.demux(stream) if packet.size]
        for offset in (0, len(packets)):
            for packet in packets:
                again = av.Packet(bytes(packet))
                again.is_keyframe, again.time_base, again.stream = packet.is_keyframe, packet.time_base, copied
                again.pts, again.dts = packet.pts + offset, packet.dts + offset
                target.mux(again)
    data = bytearray(whole.read_bytes())
    data[len(data) // 4:len(data) // 4 + 20_000] = bytes(20_000)  # in the first half
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))

    with open_video(whole) as clean:
        last = clean.frame_count - 1
        expected = clean.get_frames([last - 100, last])
    meta, small = read_video(str(damaged), shots=True, max_frames=10_000)
    with open_video(damaged) as source:
        frames, decoded = source.get_decodable_frames([5, meta.frame_count - 101, meta.frame_count - 1])
        assert source.decoder == "pyav" and not source._by_timestamps  # (counted)
    assert decoded.tolist() == [5, meta.frame_count - 101, meta.frame_count - 1]
    np.testing.assert_array_equal(frames[1:], expected)  # (the frames the damage took are not counted)
    assert len(small) == meta.frame_count and not np.array_equal(small[-1], small[meta.frame_count // 3])


def test_counting_goes_on_only_from_a_keyframe_placed_after_the_frames_counted():
    """(mutation review) After frames were lost, `_counted` goes on from a frame that is a keyframe
    (a frame decoded from lost ones is not its own), whose timestamp is one of the keyframes'
    and places it after the frames counted: else a frame was placed where it is not, or counted
    back (`all_frames_small` raised for an index that went back). Where no keyframe is left
    after the frames counted, it stops decoding: a long recording was decoded to its end for
    nothing."""
    import types

    source = PyAVSource.__new__(PyAVSource)  # (the counting alone, over frames made up here)
    source._container, source._damage = None, 0
    source._keyframes, source._index_of = [0, 4, 8], {100 * i: i for i in range(12)}
    pulled = []

    def stream(frames):
        def frames_from(keyframe, keep=None):
            for pts, key, lost_before in frames:
                source._damage += lost_before
                pulled.append(pts)
                yield types.SimpleNamespace(pts=pts, key_frame=key)
        return frames_from

    source._frames_from = stream([(0, True, 0), (100, False, 0), (200, False, 0),
                                  (400, False, 1),  # keyframe 4's time on a frame that is no keyframe
                                  (500, True, 0),  # a keyframe whose time is no keyframe's
                                  (0, True, 0),  # keyframe 0's, before the frames counted
                                  (800, True, 0), (900, False, 0)])
    assert [(index, frame.pts) for index, frame in source._counted()] == [(0, 0), (1, 100), (2, 200), (8, 800),
                                                                          (9, 900)]
    # lost after the last keyframe was counted: nothing more is decoded
    pulled.clear()
    source._frames_from = stream([(100 * i, i in (0, 4, 8), 0) for i in range(9)]
                                 + [(100 * i, False, int(i == 9)) for i in range(9, 12)])
    assert [index for index, _ in source._counted()] == list(range(9))
    assert pulled == [100 * i for i in range(10)]


def test_a_damaged_tail_ends_the_small_frames_where_timestamps_place_them(tmp_path):
    """(mutation review) Where timestamps place frames, a stretch the damage took at the end, with
    no keyframe after it, ends `all_frames_small` at the last frame decoded (the frames held
    through the rest of the video are only where frames are counted)."""
    path = zero_frame(write_video(tmp_path / "tail.mp4", indexed_frames(COUNT, 64, 36), fps=25, gop=8), 27)
    with PyAVSource(path, probe(path)) as source:
        small = source.all_frames_small()
        assert source._by_timestamps and source._damage
    assert frame_indices_seen(small) == list(range(27))

def counting_decoded(monkeypatch) -> list[int]:
    """The timestamps of the frames `PyAVSource` decodes from now on, in a list that grows."""
    decoded = []
    original = PyAVSource._frames_from

    def counting(self, keyframe, keep=None):
        for frame in original(self, keyframe, keep):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(PyAVSource, "_frames_from", counting)
    return decoded


def test_pyav_decodes_only_around_the_wanted_frames(tmp_path, monkeypatch):
    clip = write_video(tmp_path / "long.mp4", indexed_frames(300, 64, 36), fps=25, gop=10)
    expected = every_frame(clip)
    decoded = counting_decoded(monkeypatch)
    with PyAVSource(clip) as source:
        frames = source.get_frames([250, 5, 120])
    for frame, index in zip(frames, [250, 5, 120]):
        np.testing.assert_array_equal(frame, expected[index])
    assert len(decoded) < 60  # three GOPs at most, not 300 frames


@pytest.mark.parametrize("clip", ["b_frame_clip", "real_clip"])
def test_pyav_leaves_out_frames_nothing_refers_to_and_returns_the_same_frames(clip, monkeypatch, request):
    if clip == "b_frame_clip":
        path = request.getfixturevalue(clip)
    else:
        path = request.getfixturevalue("shared_videos") / "peppers_tray.mp4"
    expected = every_frame(path)
    indices = [len(expected) - 1, 2, 13, 14, len(expected) // 2]
    decoded = counting_decoded(monkeypatch)
    frames = {}
    for skips in (True, False):
        with PyAVSource(path) as source:
            assert source._skips  # B-frames: packets come out of presentation order
            source._skips = skips
            start = len(decoded)
            frames[skips] = source.get_frames(indices)
            frames[skips, "decoded"] = len(decoded) - start
    for skips in (True, False):
        for frame, index in zip(frames[skips], indices):
            np.testing.assert_array_equal(frame, expected[index])
    assert frames[True, "decoded"] < 0.8 * frames[False, "decoded"]


@pytest.mark.parametrize("layers,skips", [(1, True), (3, False)])
def test_hevc_leaves_frames_out_only_with_one_temporal_sub_layer(tmp_path, layers, skips):
    # a picture of a higher sub-layer may refer to a sub-layer non-reference picture of a lower one
    clip = write_video(tmp_path / f"layers{layers}.mp4", indexed_frames(COUNT, 64, 36), fps=25, codec="libx265",
                       gop=15, options={"preset": "medium", "x265-params": f"temporal-layers={layers}:log-level=error"})
    expected = every_frame(clip)
    with PyAVSource(clip) as source:
        assert source._skips is skips
        frames = source.get_frames([COUNT - 1, 3, 17])
    for frame, index in zip(frames, [COUNT - 1, 3, 17]):
        np.testing.assert_array_equal(frame, expected[index])


def test_a_read_that_leaves_out_a_wanted_frame_is_read_again_decoding_every_frame(b_frame_clip, monkeypatch):
    original = PyAVSource._frames_from

    def losing_the_last_kept(self, keyframe, keep=None):
        for frame in original(self, keyframe, keep):
            if keep is None or frame.pts != max(keep):
                yield frame

    monkeypatch.setattr(PyAVSource, "_frames_from", losing_the_last_kept)
    expected = every_frame(b_frame_clip)
    with PyAVSource(b_frame_clip) as source:
        frames = source.get_frames([20, 3])
        assert not source._skips
    for frame, index in zip(frames, [20, 3]):
        np.testing.assert_array_equal(frame, expected[index])


def test_pyav_reads_an_mpeg_ts_whose_seeks_miss_their_keyframes(tmp_path):
    # MPEG-TS seeks to a byte offset it guesses; here it lands past the end of the file
    clip = write_video(tmp_path / "broadcast.ts", indexed_frames(90, 64, 36), fps=25, codec="mpeg2video", gop=30)
    expected = every_frame(clip)
    indices = [89, 5, 45, 60]
    with PyAVSource(clip) as source:
        frames = source.get_frames(indices)
        assert not source._seeks  # it decodes from the start from then on
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, expected[index])


def test_pyav_survives_a_wrong_keyframe_index(indexed_clip):
    with PyAVSource(indexed_clip) as source:
        source._keyframes = list(range(COUNT))  # every seek now aims at a non-keyframe
        assert frame_indices_seen(source.get_frames([23, 9, 28])) == [23, 9, 28]


@pytest.mark.parametrize("source_class", SOURCES)
def test_all_frames_small_reads_every_frame_at_48x27(indexed_clip, source_class):
    with source_class(indexed_clip, probe(indexed_clip)) as source:
        small = source.all_frames_small()
    assert small.shape == (COUNT, 27, 48, 3) and small.dtype == np.uint8
    assert frame_indices_seen(small) == list(range(COUNT))


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_no_shot_frames_are_gathered_past_shots_max_frames(indexed_clip, decoder, monkeypatch):
    """A video of more frames than `shots.max_frames`: its decoder's count, known before a frame is
    decoded (decord's index, PyAV's packet headers), leaves its 48x27 frames ungathered, and the
    decode child sends none. A security review's 500,000 frames of 16x16 took the child 2.15 GB."""
    from workers.sampling import read_video

    meta, small = read_video(str(indexed_clip), True, 1000, decoder=decoder, max_shot_frames=COUNT)
    assert small.shape == (COUNT, 27, 48, 3) and meta.frame_count == COUNT  # at the bound: shots as before

    def gathered(*args, **kwargs):
        raise AssertionError("48x27 frames gathered past shots.max_frames")

    monkeypatch.setattr(DecordSource, "_small", gathered)
    monkeypatch.setattr(PyAVSource, "_small", gathered)
    meta, small = read_video(str(indexed_clip), True, 1000, decoder=decoder, max_shot_frames=COUNT - 1)
    assert small is None and meta.frame_count == COUNT and meta.decoder == decoder


def test_the_decode_stage_gives_a_video_past_shots_max_frames_one_segment_and_no_shot_frames(indexed_clip):
    from schemas.config import RunConfig
    from workers.sampling import DecodeStage
    from workers.task import VideoRef, VideoTask

    def decoded(bound: int) -> VideoTask:
        task = VideoTask(ref=VideoRef(uri=str(indexed_clip), size_bytes=indexed_clip.stat().st_size,
                                      mtime_ns=indexed_clip.stat().st_mtime_ns, etag=None, video_id="v"))
        DecodeStage(RunConfig.from_dict({"stages": ["shots", "embed"], "shots": {"max_frames": bound}})).run([task])
        assert not task.errors
        return task

    past = decoded(COUNT - 1)  # (decoded in a guard child, as a run decodes it)
    assert past.shot_frames is None and past.meta.frame_count == COUNT
    [segment] = past.segments
    assert (segment.start_frame, segment.end_frame, segment.source) == (0, COUNT - 1, "over_shots_max_frames")
    for bound in (COUNT, 0):  # at the bound, and with none: every frame, for the shot stage to find the shots
        within = decoded(bound)
        assert within.shot_frames.shape == (COUNT, 27, 48, 3) and within.segments == []


def test_a_failed_decord_read_drops_its_shot_frames_where_pyav_counts_past_the_bound(indexed_clip):
    with open_video(indexed_clip) as source:
        assert source.decoder == "decord"
        source.frame_count = COUNT - 5  # (as if decord's index held fewer frames than the file)

        def broken(width, height):
            raise RuntimeError("decord fails mid-way")

        source._small = broken
        assert source.all_frames_small(max_frames=COUNT - 1) is None
        assert source.decoder == "pyav"


def test_once_decord_has_failed_over_pyavs_count_alone_holds_the_shot_bound(indexed_clip):
    """(mutation review) A source that PyAV already reads (decord failed on an earlier read) is held to
    `shots.max_frames` by PyAV's count, the decoder that reads its frames, not by decord's index."""
    with open_video(indexed_clip) as source:
        def broken(*args):
            raise RuntimeError("decord fails")

        source._read_full = source._read_scaled = broken
        source.frame_count = COUNT + 5  # (as if decord's index held more frames than PyAV counts)
        assert len(source.get_frames([0])) == 1 and source.decoder == "pyav"
        assert source.frame_count == COUNT  # (PyAV's, from the failover on)
        small = source.all_frames_small(max_frames=COUNT)
    assert small.shape == (COUNT, 27, 48, 3) and frame_indices_seen(small) == list(range(COUNT))


def test_a_video_decord_fails_over_in_is_held_to_shots_max_frames_by_the_count_its_facts_give(miscounted_flv):
    """decord counts 28 frames, within a bound of 28, fails midway, and PyAV, which reads every frame
    from there on by its own indices, counts 29: past the bound. Before, the facts kept decord's 28
    (the tables said a video of 28 frames was past a bound of 28, its one segment ending at frame 27
    of 29); now they give PyAV's count, the one the bound was held to."""
    from schemas.config import RunConfig
    from workers.sampling import DecodeStage
    from workers.task import VideoRef, VideoTask

    stat = miscounted_flv.stat()
    task = VideoTask(ref=VideoRef(uri=str(miscounted_flv), size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns,
                                  etag=None, video_id="v"))
    DecodeStage(RunConfig.from_dict({"stages": ["shots", "embed"], "shots": {"max_frames": 28}})).run([task])
    assert not task.errors and task.shot_frames is None
    assert (task.meta.frame_count, task.meta.decoder) == (29, "pyav")
    [segment] = task.segments
    assert (segment.start_frame, segment.end_frame, segment.source) == (0, 28, "over_shots_max_frames")


def test_after_decord_fails_over_pyavs_count_places_every_frame_and_the_samples(miscounted_flv):
    """Without a bound, PyAV's 29 shot frames were timed by decord's count of 28: `frame_times`
    raised IndexError and the video failed. Now the source's count, times and keyframes are PyAV's
    from the failover on (its keyframes were decord's, by decord's indices), the sample stage reads
    the kept source by them, and `sampling.max_video_frames` holds the video by that count."""
    from schemas.config import SamplingConfig
    from workers.frame_reading import read_decodable
    from workers.frame_selection import whole_video_segment
    from workers.sampling import read_video

    with PyAVSource(miscounted_flv, probe(miscounted_flv)) as pyav_source:
        times, keyframes = pyav_source.frame_times(np.arange(29)), pyav_source.keyframe_indices()
    for bound in (0, 29):
        meta, small = read_video(str(miscounted_flv), True, 1000, max_shot_frames=bound)
        assert len(small) == meta.frame_count == 29 and meta.decoder == "pyav"
        assert meta.duration_s == pytest.approx(times[-1] + 1 / 25)
    # (the sample stage takes the source `read_video` kept: decord's, failed over)
    every = SamplingConfig(mode="uniform", num_frames=29)
    frames, read, indices, _, undecodable, _ = read_decodable(str(miscounted_flv), meta, [whole_video_segment(meta)],
                                                              every)
    # lost: frame 11's picture and those decoded from it, and the packet PyAV counts that decord does not
    assert undecodable.tolist() == [11, 12, 13, 14, 15, 19] and indices[-1] == 28
    assert frame_indices_seen(frames) == [*range(11), *range(16, 22), *range(24, 30)]
    np.testing.assert_array_equal(read[:len(indices)], times[indices])
    assert read[-1] == times[28]  # (the segment's last frame)
    with open_video(miscounted_flv) as source:
        assert source.decoder == "decord" and len(source.all_frames_small()) == 29
        assert (source.decoder, source.frame_count) == ("pyav", 29)
        np.testing.assert_array_equal(source.frame_times(np.arange(29)), times)
        np.testing.assert_array_equal(source.keyframe_indices(), keyframes)  # (decord's: [0, 8, 16, 22])
    # `sampling.max_video_frames` holds it by that count too
    with pytest.raises(VideoDecodeError, match="29 frames exceed the limit of 28 frames per video"):
        read_video(str(miscounted_flv), True, 28)


def test_out_of_range_index_and_pixel_bound(indexed_clip):
    with open_video(indexed_clip) as source:
        with pytest.raises(IndexError):
            source.get_frames([COUNT])
        with pytest.raises(VideoDecodeError, match="decoded pixels"):
            source.get_frames([0, 1, 2], max_pixels=2 * 64 * 36)
        assert source.get_frames([]).shape == (0, 36, 64, 3)


@pytest.mark.parametrize("source_class", SOURCES)
def test_frames_larger_than_max_side_are_scaled_down_as_they_are_decoded(indexed_clip, source_class):
    import cv2

    with source_class(indexed_clip, probe(indexed_clip)) as source:
        full = source.get_frames([23, 9, 28])
        scaled = source.get_frames([23, 9, 28], max_side=32)
        assert source.get_frames([23, 9, 28], max_side=64).shape == full.shape  # fits: as it is
        # the pixel bound counts the frames as they are returned
        assert source.get_frames([0, 1, 2], max_pixels=3 * 32 * 18, max_side=32).shape == (3, 18, 32, 3)
        assert source.get_frames([], max_side=32).shape == (0, 18, 32, 3)
    assert scaled.shape == (3, 18, 32, 3) and frame_indices_seen(scaled) == [23, 9, 28]
    expected = np.stack([cv2.resize(frame, (32, 18), interpolation=cv2.INTER_AREA) for frame in full])
    assert np.abs(scaled.astype(int) - expected).mean() < 4


@pytest.mark.parametrize("source_class", SOURCES)
def test_a_turned_video_is_scaled_upright(tmp_path, source_class):
    path = write_rotated(tmp_path / "turned.mp4", -90)  # coded 96x64, shown 64x96
    with source_class(path, probe(path)) as source:
        full, scaled = source.get_frames([0]), source.get_frames([0], max_side=48)
    assert full.shape == (1, 96, 64, 3) and scaled.shape == (1, 48, 32, 3)
    assert red_corner(scaled[0]) == red_corner(full[0])


@pytest.mark.parametrize("source_class", SOURCES)
def test_frame_times_are_exact_at_an_even_rate(tmp_path, source_class):
    # decord gives float32 seconds: frame 32 at 30 fps was 1.0666667222976685 in the tables
    path = write_video(tmp_path / "thirty.mp4", indexed_frames(40, 64, 36), fps=30)
    with source_class(path, probe(path)) as source:
        np.testing.assert_array_equal(source.frame_times(np.arange(40)), np.arange(40) / 30)


def test_where_decord_cannot_scale_each_frame_is_scaled_after_it(indexed_clip, monkeypatch):
    import decord

    opened = decord.VideoReader

    class Unscaling:
        def __init__(self, *args, width=-1, height=-1, **kwargs):
            self.reader = opened(*args, **kwargs)  # frames at full size: the wrong shape

        def get_batch(self, indices):
            return self.reader.get_batch(indices)

    with DecordSource(indexed_clip, probe(indexed_clip)) as source:
        monkeypatch.setattr(decord, "VideoReader", Unscaling)
        scaled = source.get_frames([23, 9, 28], max_side=32)
        assert source.decoder == "decord"
    assert scaled.shape == (3, 18, 32, 3) and frame_indices_seen(scaled) == [23, 9, 28]


# --- fallbacks ----------------------------------------------------------------------------


def test_pyav_is_used_when_decord_cannot_open(indexed_clip, monkeypatch):
    import decord

    def refuse(*args, **kwargs):
        raise RuntimeError("decord refuses")

    monkeypatch.setattr(decord, "VideoReader", refuse)
    with open_video(indexed_clip) as source:
        assert source.decoder == "pyav"
        assert frame_indices_seen(source.get_frames([10, 2])) == [10, 2]


def test_a_failed_decord_read_is_retried_with_pyav(indexed_clip):
    with open_video(indexed_clip) as source:
        assert source.decoder == "decord"

        def broken(indices):
            raise RuntimeError("decord fails mid-way")

        source._reader.get_batch = broken
        assert frame_indices_seen(source.get_frames([12, 4])) == [12, 4]
        assert source.decoder == "pyav"


def test_both_decoders_failing_names_the_file_and_both_reasons(tmp_path, indexed_clip):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(VideoDecodeError, match=r"junk\.mp4.*decord: .*pyav: "):
        open_video(junk, probe(indexed_clip))


# --- container facts ----------------------------------------------------------------------

# figures from /work/shared/videos/MANIFEST.md
REAL_CLIPS = [
    ("pool_skimming.mp4", "h264", 340, 256, 30.0, 300, False, "mp4"),
    ("eye_makeup.avi", "mpeg4", 320, 240, 25.0, 164, True, "avi"),
    ("peppers_tray.mp4", "h264", 596, 336, 23.976, 219, True, "mp4"),
    ("drummer_portrait.mp4", "h264", 204, 360, 30.0, 1090, True, "mp4"),
    ("keynote_subtitles.mp4", "h264", 576, 1024, 30.0, 524, True, "mp4"),
]


@pytest.mark.parametrize("name,codec,width,height,fps,frames,has_audio,container", REAL_CLIPS)
def test_real_clip_metadata_matches_the_manifest(
    shared_videos, name, codec, width, height, fps, frames, has_audio, container
):
    meta = probe(shared_videos / name)
    assert (meta.codec, meta.width, meta.height) == (codec, width, height)
    assert (meta.has_audio, meta.container, meta.rotation) == (has_audio, container, 0)
    assert meta.fps == pytest.approx(fps, abs=0.05)
    assert meta.duration_s == pytest.approx(frames / fps, abs=0.1)
    assert abs(meta.frame_count - frames) <= 2
    with open_video(shared_videos / name, meta) as source:
        assert abs(source.frame_count - frames) <= 2
        assert source.get_frames([0]).shape == (1, height, width, 3)


def test_a_variable_rate_clips_frame_times_are_to_the_microsecond(shared_videos):
    """decord's times are float32 seconds: a frame off the even grid was shown at 2.2666666507720947."""
    clip = shared_videos / "drummer_portrait.mp4"
    meta = probe(clip)
    with DecordSource(clip, meta) as source:
        times = source.frame_times(range(source.frame_count))
    off_grid = times[np.abs(times - np.arange(len(times)) / source.fps) > 1e-6]
    assert len(off_grid)  # (a variable rate: some frames are not where 30 fps puts them)
    assert np.array_equal(off_grid, np.round(off_grid, 6)), off_grid[:5]


def test_rotation_parser():
    assert clockwise_rotation(None, None) == 0
    assert clockwise_rotation(None, "90") == 90
    assert clockwise_rotation(None, "-90") == 270
    assert clockwise_rotation(None, "not a number") == 0
    assert clockwise_rotation(90.0) == 270  # display matrix angles are counter-clockwise
    assert clockwise_rotation(-90.0, "180") == 90  # the matrix wins over the legacy tag
    assert clockwise_rotation(-180.0) == 180 and clockwise_rotation(179.9) == 180
    for tag in ("nan", "inf", "-inf", "1e999"):  # no angle: as "not a number"
        assert clockwise_rotation(None, tag) == 0
    assert clockwise_rotation(float("nan")) == 0


def test_a_rotate_tag_that_is_no_finite_number_leaves_the_video_upright_as_coded(tmp_path):
    """A NUT or Matroska file keeps a stream's tags as written: one uploaded with `rotate` "nan"
    failed as a whole (ValueError: cannot convert float NaN to integer), a decodable video, in an
    errors row every night, never given up on as a bad file (found in a security review)."""
    path = tmp_path / "tagged.mkv"
    with av.open(str(path), "w", format="nut") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.metadata["rotate"] = "nan"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8))), *stream.encode()]:
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].metadata.get("rotate") == "nan"  # (the tag the file carries)
    meta = probe(path)
    assert (meta.rotation, meta.width, meta.height) == (0, 64, 48)


@pytest.mark.parametrize("degrees_ccw,rotation,corner", [(-90, 90, "TR"), (90, 270, "BL"), (180, 180, "BR")])
def test_rotated_clips_come_out_upright(tmp_path, degrees_ccw, rotation, corner):
    clip = write_rotated(tmp_path / "rotated.mp4", degrees_ccw)
    meta = probe(clip)
    assert (meta.rotation, meta.width, meta.height) == (rotation, 96, 64)
    upright_shape = (64, 96) if rotation == 180 else (96, 64)
    for source_class in SOURCES:
        with source_class(clip, meta) as source:
            frames = source.get_frames([0, 3])
            small = source.all_frames_small()
        assert frames.shape[1:3] == upright_shape, source_class
        assert red_corner(frames[1]) == corner, source_class
        assert small.shape[1:3] == (27, 48) and red_corner(small[0]) == corner, source_class


# --- broken files -------------------------------------------------------------------------


def broken_files(folder: Path, good: Path) -> dict[str, Path]:
    zero = folder / "zero.mp4"
    zero.write_bytes(b"")
    noise = folder / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    cut = folder / "cut.mp4"
    payload = good.read_bytes()
    cut.write_bytes(payload[: len(payload) // 2])
    audio = folder / "audio.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=48000)
        for i in range(10):
            samples = np.zeros((1, 1024), np.float32)
            silence = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            silence.sample_rate, silence.pts = 48000, i * 1024
            for packet in stream.encode(silence):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"zero": zero, "noise": noise, "cut": cut, "audio": audio, "missing": folder / "missing.mp4"}


def test_broken_inputs_raise_video_decode_error_naming_the_file(tmp_path, indexed_clip):
    reasons = {
        "zero": "empty file", "noise": "not a media file", "cut": "not a media file",
        "audio": "no video stream", "missing": "no such video file",
    }
    for kind, path in broken_files(tmp_path, indexed_clip).items():
        for read in (probe, open_video):
            with pytest.raises(VideoDecodeError, match=re.escape(str(path)) + ".*" + reasons[kind]):
                read(path)


def test_a_truncated_file_with_its_index_first_reads_up_to_the_cut(tmp_path, shared_videos):
    clip = tmp_path / "peppers_cut.mp4"
    clip.write_bytes((shared_videos / "peppers_tray.mp4").read_bytes()[:300_000])
    meta = probe(clip)  # the index at the front still promises every frame
    with open_video(clip, meta) as source:
        assert source.get_frames([0, 20]).shape[0] == 2
        small = source.all_frames_small()
        assert 50 < len(small) < meta.frame_count
        with pytest.raises(VideoDecodeError, match="peppers_cut.mp4.*could not be decoded"):
            source.get_frames([source.frame_count - 1])


def test_pyav_stops_reading_a_truncated_file_at_the_cut(tmp_path, shared_videos, monkeypatch):
    clip = tmp_path / "peppers_cut.mp4"
    clip.write_bytes((shared_videos / "peppers_tray.mp4").read_bytes()[:300_000])
    decoded = counting_decoded(monkeypatch)
    with PyAVSource(clip) as source:
        before_cut = len(source.all_frames_small())
        decoded.clear()
        last = source.frame_count - 1
        with pytest.raises(VideoDecodeError, match=r"frames \[\d+, \d+, \d+\] of \d+ could not be decoded"):
            source.get_frames([30, last - 2, last - 1, last])
    # the frames past the cut cost a few passes up to it (with and without leaving frames out),
    # not a pass for each of them
    assert len(decoded) < 3 * before_cut


#: the frames of `corrupt_clip` that cannot be decoded: frame 11, zeroed, up to the keyframe at 16.
DAMAGED = list(range(11, 16))


@pytest.fixture(scope="module")
def corrupt_clip(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """The indexed clip (a keyframe every 8 frames) with frame 11's bytes zeroed, and the
    frames it had before."""
    path = write_video(tmp_path_factory.mktemp("clips") / "corrupt.mp4", indexed_frames(COUNT, 64, 36), fps=25, gop=8)
    intact = every_frame(path)
    return zero_frame(path, 11), intact


@pytest.mark.parametrize("source_class", SOURCES)
def test_a_corrupt_frame_costs_only_the_frames_decoded_from_it(corrupt_clip, source_class):
    # decord refuses the stretch and PyAV reads instead; PyAV leaves out what FFmpeg returns of
    # it (damaged frames, some out of order): both give the same frames, each as it was
    path, intact = corrupt_clip
    with source_class(path, probe(path)) as source:
        frames, indices = source.get_decodable_frames([29, 12, 3, 11, 20, 3])
        assert indices.tolist() == [3, 20, 29] and frame_indices_seen(frames) == [3, 20, 29]
        for frame, index in zip(frames, indices):
            np.testing.assert_array_equal(frame, intact[index])
        np.testing.assert_allclose(source.frame_times(indices), indices / 25)
        _, every = source.get_decodable_frames(range(COUNT))
        assert sorted(set(range(COUNT)) - set(every.tolist())) == DAMAGED
        with pytest.raises(VideoDecodeError, match=r"corrupt.mp4: frames \[11\] of 30 could not be decoded"):
            source.get_frames([3, 11])
        with pytest.raises(VideoDecodeError, match=r"frames \[11, 12, 13, 14, 15\] of 30 could not be decoded"):
            source.get_decodable_frames(DAMAGED)
        small = source.all_frames_small()
        if source_class is PyAVSource:
            assert source._seeks  # a seek that found its target damaged is no seek that missed
    # for shot detection the frame before the stretch stands through it, and indices stay put
    assert frame_indices_seen(small) == [*range(11), *[10] * len(DAMAGED), *range(16, COUNT)]


# --- local copies -------------------------------------------------------------------------


def test_decords_ffmpeg_keeps_its_complaints_out_of_the_log(tmp_path, capfd):
    # "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x...] stream 0, offset 0xcd5: partial file" on stderr, per video
    from tests.corpus import _faststart

    path = tmp_path / "cut.mp4"
    path.write_bytes(_faststart(tmp_path / ".whole.mp4", 96))
    with open_video(path, probe(path)) as source:
        assert source.get_frames([0]).shape[0] == 1
    assert "partial file" not in capfd.readouterr().err


def _read_in_a_forked_child(path: str) -> None:
    from workers.sampling import read_video

    read_video(path, shots=True, max_frames=1000)  # keeps its source: the inherited one goes


def test_a_child_forked_after_a_read_leaves_the_parents_kept_source_alone(indexed_avi, indexed_clip):
    # a run started in a process that had read a video (a notebook, the test process) forks
    # workers: a decode child closing the PyAV source it inherited waited forever for the
    # decoder's frame threads, which a forked child does not have
    import multiprocessing

    from workers.kept_source import KeptSource
    from workers.sampling import read_video

    meta, _ = read_video(str(indexed_avi), shots=True, max_frames=1000)
    assert meta.decoder == "pyav"
    child = multiprocessing.get_context("fork").Process(target=_read_in_a_forked_child, args=(str(indexed_clip),))
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    source = KeptSource.take(indexed_avi, "pyav")  # still the parent's, and still reads
    assert source is not None and len(source.get_frames([0, COUNT - 1])) == 2
    source.close()


def test_pyav_converts_frames_on_one_thread():
    # PyAV (17 and later) converts and scales on a pool of a thread a core by default: a decode child
    # hung freeing such a pool (pthread_cond_destroy in avpriv_slicethread_free, av 18.1.1) and its
    # video timed out. One thread makes no pool, for SDR frames and HDR ones alike.
    asked = []

    class Frame:
        def to_ndarray(self, **options):
            asked.append(options)
            return np.zeros((27, 48, 3), np.uint16 if options["format"] == "rgb48le" else np.uint8)

    for transfer in (None, "pq"):
        source = PyAVSource.__new__(PyAVSource)
        source.meta = types.SimpleNamespace(transfer=transfer)
        source._as_sdr(Frame(), width=48, height=27)
    assert [options["threads"] for options in asked] == [1, 1]
    assert [options["format"] for options in asked] == ["rgb24", "rgb48le"]
