"""decord failing over to PyAV in the sample stage, where the decode stage decoded no frame (shots
off, or a video past `shots.max_frames`) or read its shot frames fine: PyAV's numbering of the
frames is the video's from then on, and its rows are those a run with `resources.decoder: pyav`
records; and, after any failover, PyAV's rate and PyAV's count held to `sampling.max_video_frames`.
The damaged FLV of `tests.corpus.decord_counts_fewer` is one decord counts 28 frames of, PyAV 29:
decord loses the frames at 0.76 s and 0.80 s, PyAV only the one at 0.80 s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.records import RunIdentity, task_rows
from schemas.config import RunConfig
from tests.corpus import zero_frame
from tests.test_sampling import AsGiven, shots, task_for
from workers.decode import VideoDecodeError, open_video, probe
from workers.frame_sources import DecordSource
from workers.kept_source import KeptSource
from workers.pyav_source import PyAVSource
from workers.sampling import DecodeStage, SampleStage, read_video
from workers.synthetic import indexed_frames, write_video

#: the columns of each table that say which frames a video has and which were sampled
COMPARED = {
    "videos": ("frame_count", "duration_s", "decoder", "num_segments", "num_sampled_frames"),
    "segments": ("segment_index", "start_frame", "end_frame", "start_s", "end_s", "source", "keyframe_index"),
    "frames": ("frame_index", "timestamp_s", "segment_index"),
}


def _run(path: Path, settings: dict, decoder: str, reader: str = "kept", segments=None, between=None):
    """(the rows of `COMPARED`, the task) of a video through the decode and sample stages.
    `reader`: "kept", the sample stage takes the decode stage's open source; "fresh", it opens
    the video anew (as in a Ray task of its own); "child", both in the reused decode child."""
    timeout = 60 if reader == "child" else 0  # (0: in this process, where the kept source can be dropped)
    config = RunConfig.from_dict({"stages": ["embed"], **settings,
                                  "resources": {"decoder": decoder, "decode_timeout_s": timeout}})
    task = task_for(path)
    DecodeStage(config).run([task])
    assert not task.errors, task.errors
    if segments is not None:
        task.segments = segments
    if reader == "fresh":
        KeptSource.drop()
    if between is not None:
        between()
    SampleStage(config, preparers={"embed": AsGiven()}).run([task])
    assert not task.errors, task.errors
    rows = task_rows(task, RunIdentity("run", "fingerprint", "none"), config)
    return {table: [{c: row[c] for c in columns} for row in rows[table]] for table, columns in COMPARED.items()}, task


@pytest.mark.parametrize("reader", ["kept", "fresh", "child"])
@pytest.mark.parametrize("sampling", [{"mode": "uniform", "num_frames": 30}, {"mode": "uniform", "num_frames": 8},
                                      {"mode": "fps", "fps": 5}])
def test_a_failover_in_the_sample_stage_records_what_a_pyav_run_records(miscounted_flv, reader, sampling):
    """Shots off: the decode stage decodes no frame and records decord's 28. Before, the sample
    stage chose frames by decord's count and PyAV read them by its own indices: the tail frame
    (PyAV's 28, at 1.16 s) was never sampled, the one segment ended at 27, the samples were not
    a PyAV run's and `videos` said 28 frames, read by decord."""
    rows, task = _run(miscounted_flv, {"sampling": sampling}, "decord", reader)
    expected, pyav_task = _run(miscounted_flv, {"sampling": sampling}, "pyav", reader)
    assert rows == expected
    assert rows["videos"][0]["frame_count"] == 29 and rows["videos"][0]["decoder"] == "pyav"
    [segment] = rows["segments"]
    assert (segment["start_frame"], segment["end_frame"], segment["end_s"]) == (0, 28, pytest.approx(1.2))
    np.testing.assert_array_equal(task.frames.prepared["embed"], pyav_task.frames.prepared["embed"])
    np.testing.assert_array_equal(task.frames.undecodable, pyav_task.frames.undecodable)
    if sampling.get("num_frames") == 30:
        assert rows["frames"][-1]["frame_index"] == 28  # (the tail frame, PyAV's alone)


def test_a_video_past_shots_max_frames_fails_over_in_the_sample_stage_as_a_pyav_run_records_it(miscounted_flv):
    """Shots on, past `shots.max_frames` by decord's count (28 > 20): no frame is decoded in the
    decode stage, decord fails in the sample stage's read."""
    settings = {"stages": ["shots", "embed"], "shots": {"max_frames": 20}, "sampling": {"num_frames": 30}}
    rows, _ = _run(miscounted_flv, settings, "decord")
    assert rows == _run(miscounted_flv, settings, "pyav")[0]
    assert [(s["end_frame"], s["source"]) for s in rows["segments"]] == [(28, "over_shots_max_frames")]


def test_shots_found_by_decords_count_are_placed_by_time_in_pyavs(miscounted_flv):
    """Shots found on decord's frames (as where decord read the shot frames, then failed in the
    sample stage): each keeps its frames by the time they are shown, in PyAV's numbering."""
    with DecordSource(miscounted_flv, probe(miscounted_flv)) as source:
        decord_times = source.frame_times(np.arange(28))
    with PyAVSource(miscounted_flv, probe(miscounted_flv)) as source:
        pyav_times = source.frame_times(np.arange(29))
    rows, task = _run(miscounted_flv, {"sampling": {"num_frames": 30}}, "decord", segments=shots([10, 22, 28]))
    # decord's frame 22 (1.00 s) is PyAV's 23; the last shot runs to PyAV's last frame
    assert [(s.start_frame, s.end_frame) for s in task.segments] == [(0, 9), (10, 22), (23, 28)]
    assert [s["start_s"] for s in rows["segments"]] == [decord_times[0], decord_times[10], decord_times[22]]
    np.testing.assert_array_equal([r["timestamp_s"] for r in rows["frames"]],
                                  pyav_times[[r["frame_index"] for r in rows["frames"]]])
    assert rows["videos"][0]["frame_count"] == 29 and rows["frames"][-1]["frame_index"] == 28
    assert all(s.start_frame <= s.keyframe_index <= s.end_frame for s in task.segments)


def _corrupt_clip(tmp_path: Path) -> Path:
    """30 frames with B-frames (PyAV leaves out the frames nothing refers to, by their timestamps), the
    12th's picture zeroed: decord fails over to PyAV at it; both count 30 frames."""
    return zero_frame(write_video(tmp_path / "corrupt.mp4", indexed_frames(30, 64, 36), fps=25, gop=8,
                                  options={"preset": "medium"}), 11)


def _counting_five_more(opened):
    """`DecordSource.__init__` (`opened`), its count of the video's frames made 5 more than the file's."""
    def counting_more(source, *args, **kwargs):
        opened(source, *args, **kwargs)
        source._starts = np.concatenate([source._starts, source._starts[-1] + np.arange(1, 6) / source.fps])
        source.frame_count += 5

    return counting_more


def test_where_pyav_counts_fewer_frames_than_decord_the_video_is_read_by_pyavs(tmp_path, monkeypatch):
    """No real file is known where decord opens a video and PyAV counts fewer of its frames: decord's
    count is made 5 more here. Before, the sample stage asked PyAV for frames past its count, and the
    segment's last frame's time raised IndexError: the video was an errors row."""
    path = _corrupt_clip(tmp_path)

    monkeypatch.setattr(DecordSource, "__init__", _counting_five_more(DecordSource.__init__))
    settings = {"sampling": {"num_frames": 40}}
    rows, task = _run(path, settings, "decord")
    expected, _ = _run(path, settings, "pyav")
    assert rows == expected and rows["videos"][0]["frame_count"] == 30
    assert task.frames.frame_index.max() == 29 and rows["segments"][0]["end_frame"] == 29


def test_a_sample_stage_that_cannot_open_the_video_with_decord_records_what_a_pyav_run_records(miscounted_flv,
                                                                                                 monkeypatch):
    """The decode stage opened decord; the sample stage, in another process, cannot (short of
    memory, say) and opens PyAV: before, it sampled by decord's count and recorded decord's facts."""

    def refusing(*args, **kwargs):
        raise RuntimeError("decord cannot open it here")

    settings = {"sampling": {"num_frames": 30}}
    rows, _ = _run(miscounted_flv, settings, "decord", "fresh",
                   between=lambda: monkeypatch.setattr(DecordSource, "__init__", refusing))
    monkeypatch.undo()
    assert rows == _run(miscounted_flv, settings, "pyav")[0] and rows["videos"][0]["frame_count"] == 29


def test_a_sample_stage_that_opens_pyav_where_decord_counted_more_reads_pyavs_frames(tmp_path, monkeypatch):
    """The decode stage's decord counted 5 frames more than PyAV (made so, as no real file is known), and
    the sample stage could not open decord: PyAV's frames are all it reads, and it records what a PyAV
    run does."""
    path = _corrupt_clip(tmp_path)

    def refusing(*args, **kwargs):
        raise RuntimeError("decord cannot open it here")

    monkeypatch.setattr(DecordSource, "__init__", _counting_five_more(DecordSource.__init__))
    settings = {"sampling": {"num_frames": 40}}
    rows, task = _run(path, settings, "decord", "fresh",
                      between=lambda: monkeypatch.setattr(DecordSource, "__init__", refusing))
    monkeypatch.undo()
    assert rows == _run(path, settings, "pyav")[0] and rows["videos"][0]["frame_count"] == 30
    assert task.frames.frame_index.max() == 29


def test_renumbered_places_segments_by_the_time_their_frames_are_shown():
    from workers.frame_selection import renumbered

    old = np.array([0.0, 0.04, 0.08, 0.2, 0.24, 0.28])  # (0.12 and 0.16 lost)
    new = np.array([0.0, 0.04, 0.08, 0.12, 0.2, 0.24, 0.28, 0.32])  # (0.16 lost, 0.32 more)
    placed = renumbered(shots([2, 4, 6]), old, new)
    assert [(s.index, s.start_frame, s.end_frame, s.keyframe_index) for s in placed] == \
        [(0, 0, 1, 0), (1, 2, 4, 2), (2, 5, 7, 5)]
    # the same times: the same segments
    assert renumbered(shots([2, 4, 6]), old, old) == shots([2, 4, 6])
    # a segment none of whose frames the new numbering has is left out, the others numbered on
    fewer = np.array([0.0, 0.04, 0.24, 0.28])
    assert [(s.index, s.start_frame, s.end_frame) for s in renumbered(shots([2, 4, 6]), old, fewer)] == \
        [(0, 0, 1), (1, 2, 3)]


def test_renumbered_keeps_one_frame_shots_and_each_keyframe_in_its_shot():
    """A shot of one frame stays; a keyframe stays on the frame shown at its time, and within its
    shot where that frame is lost; a keyframe past the old numbering's frames (PyAV's where decord
    could not open the video: it counted fewer) is its shot's last frame there, and a shot that
    starts past them is left out."""
    import dataclasses

    from workers.frame_selection import renumbered

    def keyed(bounds, keyframes):
        return [dataclasses.replace(s, keyframe_index=k) for s, k in zip(shots(bounds), keyframes)]

    old = np.array([0.0, 0.04, 0.08, 0.12, 0.16, 0.2])
    assert renumbered(keyed([1, 4, 6], [0, 2, 5]), old, old) == keyed([1, 4, 6], [0, 2, 5])
    lost = np.array([0.0, 0.08, 0.12, 0.16, 0.2])  # (0.04, the second shot's first frame and keyframe, lost)
    assert [(s.index, s.start_frame, s.end_frame, s.keyframe_index)
            for s in renumbered(keyed([1, 4, 6], [0, 1, 5]), old, lost)] == [(0, 0, 0, 0), (1, 1, 2, 1), (2, 3, 4, 4)]
    assert [(s.index, s.start_frame, s.end_frame, s.keyframe_index)
            for s in renumbered(keyed([1, 4, 7], [0, 2, 6]), old[:5], old[:5])] == [
        (0, 0, 0, 0), (1, 1, 3, 2), (2, 4, 4, 4)]
    # a shot that starts past them has no frame there: left out, the shot before it whole
    assert [(s.index, s.start_frame, s.end_frame, s.keyframe_index)
            for s in renumbered(keyed([2, 4, 6], [0, 2, 4]), old[:4], old[:4])] == [(0, 0, 1, 0), (1, 2, 3, 2)]


def test_after_a_failover_the_sources_rate_is_pyavs(miscounted_flv):
    with open_video(miscounted_flv) as source:
        source.fps = 24.0  # (as if decord's average rate were not PyAV's: a variable-rate video's may not be)
        assert source.get_decodable_frames([0, 12])[1].tolist() == [0]  # (12 is decoded from 11, zeroed)
        assert (source.decoder, source.fps) == ("pyav", 25.0)


def test_pyavs_count_past_max_video_frames_is_refused_before_its_frames_are_gathered(miscounted_flv, monkeypatch):
    """decord's 28 frames are within `sampling.max_video_frames` 28, PyAV's 29 are not. Before, PyAV
    gathered every 48x27 frame after the failover, and the count was refused only then."""

    def gathering(*args):
        raise AssertionError("PyAV gathered the frames of a video past sampling.max_video_frames")

    monkeypatch.setattr(PyAVSource, "_small", gathering)
    with pytest.raises(VideoDecodeError, match="29 frames exceed the limit of 28 frames per video"):
        read_video(str(miscounted_flv), True, 28)


def test_a_read_after_a_failover_that_fails_for_another_reason_than_the_file_fails_the_video(miscounted_flv,
                                                                                             monkeypatch):
    """Once decord has failed over, the frames PyAV's numbering chooses anew are read; where that read
    fails for another reason than the file's bytes (PyAV short of memory), the video fails, to be run
    again, rather than be recorded without those frames, taken for undecodable, for good."""
    read = DecordSource.get_decodable_frames

    def short_of_memory_once_failed_over(source, *args, **kwargs):
        if source.decoder == "pyav":
            raise VideoDecodeError(f"{source.path}: short of memory", bad_file=False)
        return read(source, *args, **kwargs)

    monkeypatch.setattr(DecordSource, "get_decodable_frames", short_of_memory_once_failed_over)
    config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"num_frames": 30},
                                  "resources": {"decoder": "decord", "decode_timeout_s": 0}})
    task = task_for(miscounted_flv)
    DecodeStage(config).run([task])
    assert not task.errors, task.errors
    SampleStage(config, preparers={"embed": AsGiven()}).run([task])
    assert [(error.stage, error.bad_file) for error in task.errors] == [("sample", False)], task.errors
    assert "short of memory" in task.errors[0].message


def test_a_video_none_of_whose_chosen_frames_decodes_fails_with_or_without_a_failover(tmp_path, miscounted_flv,
                                                                                        monkeypatch):
    """None of the frames sampling chooses decodes (`read_frames`: VideoDecodeError), whether decord read
    them or PyAV, once decord failed over, read those its numbering chooses anew: the video is an errors
    row of a bad file, not one recorded from the stand-ins of its segments."""
    read = DecordSource.get_decodable_frames

    def corrupt(source, indices, *args, **kwargs):
        frames, read_indices = read(source, indices, *args, **kwargs)  # (decord fails over to PyAV in it)
        if source.decoder == "pyav" or not reads:
            reads.append(list(indices))
            raise VideoDecodeError(f"{source.path}: frames {list(indices)[:10]} could not be decoded", bad_file=True)
        return frames, read_indices

    monkeypatch.setattr(DecordSource, "get_decodable_frames", corrupt)
    clean = write_video(tmp_path / "clean.mp4", indexed_frames(30, 64, 36), fps=25)
    for path in (clean, miscounted_flv):  # (decord reads it; decord fails over to PyAV)
        reads: list[list[int]] = []
        config = RunConfig.from_dict({"stages": ["embed"], "sampling": {"num_frames": 30},
                                      "resources": {"decoder": "decord", "decode_timeout_s": 0}})
        task = task_for(path)
        DecodeStage(config).run([task])
        assert not task.errors, task.errors
        SampleStage(config, preparers={"embed": AsGiven()}).run([task])
        assert [(error.stage, error.bad_file) for error in task.errors] == [("sample", True)], (path, task.errors)
        assert "could not be decoded" in task.errors[0].message
