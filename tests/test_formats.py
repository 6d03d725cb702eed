"""Other codecs and containers than the shared clips: each is probed, read in order and run end to end.

A new user's bucket holds VP8/VP9 WebM, HEVC and ProRes MOV, MPEG-2 program streams, MPEG-TS,
M4V, AV1 in Matroska, MJPEG AVI, MPEG-4 Part 2, 3GP, FLV, WMV, MXF and DVD VOB. Every clip is made here with PyAV from
frames that carry their own index, so the frame order and the colour order are checked too.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest

from tests.decoded import every_frame
from workers.decode import VideoDecodeError, open_video, probe
from workers.sampling import read_video
from workers.synthetic import index_level, indexed_frames, write_video

FRAMES, FPS = 40, 25
#: (file name, encoder, pixel format, codec name the probe reports)
FORMATS = [
    ("vp9.webm", "libvpx-vp9", "yuv420p", "vp9"),
    ("vp8.webm", "libvpx", "yuv420p", "vp8"),
    ("hevc.mov", "libx265", "yuv420p", "hevc"),
    ("prores.mov", "prores", "yuv422p10le", "prores"),
    ("mpeg2.mpg", "mpeg2video", "yuv420p", "mpeg2video"),
    ("h264.ts", "libx264", "yuv420p", "h264"),
    ("h264.m4v", "libx264", "yuv420p", "h264"),
    ("av1.mkv", "libsvtav1", "yuv420p", "av1"),
    ("mjpeg.avi", "mjpeg", "yuvj420p", "mjpeg"),
    ("mpeg4.mp4", "mpeg4", "yuv420p", "mpeg4"),
    ("h264.3gp", "libx264", "yuv420p", "h264"),
    ("flv1.flv", "flv", "yuv420p", "flv1"),
    ("wmv2.wmv", "wmv2", "yuv420p", "wmv2"),
    ("mpeg2.mxf", "mpeg2video", "yuv420p", "mpeg2video"),
    ("mpeg2.vob", "mpeg2video", "yuv420p", "mpeg2video"),
]
NAMES = [name for name, *_ in FORMATS]
#: encoders' own settings as cameras and encoders at their defaults use them: B-frames
B_FRAMES = {"libx264": {"preset": "medium"}, "libx265": {"preset": "medium", "x265-params": "log-level=error"},
            "mpeg2video": {"bf": "2"}, "mpeg4": {"bf": "2"}}
#: encoders' settings for the clips whose frames are told by their level: SVT-AV1 4.3 (in av 18.1.1's
#: wheels) at its defaults left some frames 7-8 levels off their own, nearer the frame before; lossless,
#: every frame is within 2, as earlier builds' were at their defaults
EXACT = {"libsvtav1": {"svtav1-params": "lossless=1"}}


def write_indexed(path: Path, count: int, width: int = 256, height: int = 144, **encoding) -> Path:
    """`write_video(path, indexed_frames(count, width, height), **encoding)`; VP8 and VP9 in a fresh
    Python: once decord is imported in a process, the libvpx bundled with it answers PyAV's
    VP8/VP9 encoder, which then fails to open (EINVAL). Reading them is unaffected."""
    if not encoding.get("codec", "").startswith("libvpx"):
        return write_video(path, indexed_frames(count, width, height), **encoding)
    script = ("import json, sys; from workers.synthetic import indexed_frames, write_video; "
              "a = json.loads(sys.argv[1]); "
              "write_video(a['path'], indexed_frames(a['count'], a['width'], a['height']), **a['encoding'])")
    arguments = {"path": str(path), "count": count, "width": width, "height": height, "encoding": encoding}
    subprocess.run([sys.executable, "-c", script, json.dumps(arguments)], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    return path


@pytest.fixture(scope="module")
def format_folder(tmp_path_factory):
    """One clip per format, 40 frames of 256x144 that carry their index."""
    folder = tmp_path_factory.mktemp("formats")
    for name, encoder, pix_fmt, _ in FORMATS:
        write_indexed(folder / name, FRAMES, fps=FPS, codec=encoder, pix_fmt=pix_fmt, options=EXACT.get(encoder))
    return folder


@pytest.mark.parametrize("name,encoder,pix_fmt,codec", FORMATS, ids=NAMES)
def test_each_format_is_probed_and_read_in_display_order(format_folder, name, encoder, pix_fmt, codec):
    path = format_folder / name
    meta = probe(path)
    assert meta.codec == codec
    assert (meta.width, meta.height) == (256, 144)
    assert meta.fps == pytest.approx(FPS, rel=1e-3)
    wanted = [0, 7, 19, 33, FRAMES - 1]
    with open_video(path, meta) as source:
        # the header's count is an estimate for some containers (MPEG-PS); the reader's is exact
        assert source.frame_count == FRAMES
        frames = source.get_frames(wanted)
    assert frames.shape == (len(wanted), 144, 256, 3)
    for frame, index in zip(frames, wanted):
        red = float(np.median(frame[:, :100, 0]))
        assert abs(red - index_level(index, FRAMES)) <= 4, f"{name}: frame {index} has red {red}"
        assert float(np.median(frame[:, 160:, 2])) > 200, f"{name}: blue half is not blue (RGB order)"


def test_every_format_goes_through_the_pipeline(tmp_path, format_folder, tiny_models):
    from pipeline.job import run_job
    from schemas.config import RunConfig

    config = RunConfig.from_dict({
        "stages": ["shots", "embed", "objects"],
        "models": tiny_models,
        "resources": {"executor": "local", "videos_per_batch": 4},
    })
    summary = run_job(str(format_folder), str(tmp_path / "out"), config, progress=False)
    assert summary.counts["videos_ok"] == len(FORMATS), summary.render()
    videos = pd.read_parquet(tmp_path / "out" / "videos")
    assert sorted(Path(uri).name for uri in videos.uri) == sorted(NAMES)
    assert (videos.frame_count == FRAMES).all()
    assert (videos.num_sampled_frames == 9).all()  # 8 uniform frames plus the shot's keyframe (frame 20)
    segments = pd.read_parquet(tmp_path / "out" / "segments")
    # one shot per clip: its frames change smoothly, never cut
    assert segments.groupby("video_id").size().eq(1).all()


#: formats the seeking test reads besides FORMATS: decord returned other frames for each
MORE_FORMATS = [("hevc.mkv", "libx265", "yuv420p", "hevc"), ("h264.mxf", "libx264", "yuv420p", "h264"),
                ("mpeg2.mkv", "mpeg2video", "yuv420p", "mpeg2video")]


@pytest.mark.parametrize("name,encoder,pix_fmt,codec", [*FORMATS, *MORE_FORMATS],
                         ids=[*NAMES, *(name for name, *_ in MORE_FORMATS)])
def test_frames_read_by_seeking_are_those_decoded_in_order(tmp_path, name, encoder, pix_fmt, codec):
    # a keyframe every 10 frames and B-frames where the encoder has them: reads seek and reorder.
    # decord returned other frames than these for HEVC (one frame to a keyframe interval off),
    # H.264 with B-frames in MPEG-TS (a keyframe interval off) and MXF, MPEG-2 and MPEG-4 Part 2
    # with B-frames in any container, and WMV: those go to PyAV (`workers.decode._DECORD_CODECS`).
    path = write_indexed(tmp_path / name, 60, 128, 72, fps=FPS, codec=encoder, pix_fmt=pix_fmt, gop=10,
                         options=B_FRAMES.get(encoder))
    expected = every_frame(path)
    rng = np.random.default_rng(0)
    for wanted in ([0, 8, 17, 25, 34, 42, 51, 59], *(rng.choice(60, 10, replace=False) for _ in range(4))):
        with open_video(path) as source:
            frames = source.get_frames(wanted)
            decoder = source.decoder
        wrong = [int(index) for frame, index in zip(frames, wanted) if not np.array_equal(frame, expected[index])]
        assert not wrong, f"{name}: {decoder} returned other frames for {wrong}"


def copy_packets(path: Path, *parts: Path, skip: int = 0, shift: int = 0, options: dict | None = None,
                 rotation_ccw: int | None = None) -> Path:
    """Write the video packets of `parts` into `path` one part after the other, without
    re-encoding: the first part without its first `skip` packets (in file order) and with its
    times moved by `shift` (in its time base); each later part's times after the one before.
    `options` are the muxer's; `rotation_ccw`, a display matrix (a template stream lacks one)."""
    with av.open(str(path), "w", options=options or {}) as joined:
        copy, offset = None, shift
        for number, part in enumerate(parts):
            with av.open(str(part)) as original:
                stream = original.streams.video[0]
                if copy is None:
                    copy = joined.add_stream_from_template(stream)
                    if rotation_ccw is not None:
                        copy.set_display_rotation(rotation_ccw)
                packets = [packet for packet in original.demux(stream) if packet.size][skip if number == 0 else 0 :]
                if number:
                    offset -= min(packet.dts for packet in packets)
                for packet in packets:
                    packet.pts, packet.dts, packet.stream = packet.pts + offset, packet.dts + offset, copy
                    joined.mux(packet)
                offset = max(packet.pts + packet.duration for packet in packets)
    return path


def write_trimmed(source: Path, path: Path, first: int, count: int, fps: float = FPS,
                  rotation_ccw: int | None = None) -> Path:
    """Copy an MP4 without re-encoding so that it shows frames first..first+count-1 only, as a
    trim by a phone, QuickTime or `ffmpeg -ss -c copy` does: the packets from the keyframe
    before `first` on, and an edit list (elst) whose start skips to `first` and whose length
    ends after `count` frames. The frames it cuts stay in the file."""
    with av.open(str(source)) as original:
        packets = [packet for packet in original.demux(original.streams.video[0]) if packet.size]
    cut = sorted(packet.pts for packet in packets)[first]
    keyframe = max(packet.pts for packet in packets if packet.is_keyframe and packet.pts <= cut)
    # before the cut, negative times: the muxer writes an edit list that starts at the cut
    copy_packets(path, source, skip=[packet.pts for packet in packets].index(keyframe), shift=-cut,
                 rotation_ccw=rotation_ccw)
    data = bytearray(path.read_bytes())
    movie_header, edit_list = data.find(b"mvhd"), data.find(b"elst")
    assert data[movie_header + 4] == 0 and data[edit_list + 4] == 0, "version 0 boxes expected"
    timescale = struct.unpack(">I", data[movie_header + 16 : movie_header + 20])[0]
    data[edit_list + 12 : edit_list + 16] = struct.pack(">I", round(count * timescale / fps))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("first", [0, 45], ids=["end-trimmed", "both-ends-trimmed"])
def test_a_trimmed_mp4_is_read_as_shown(tmp_path, first):
    # decord read the frames an edit list cuts as if shown (past a trimmed end), and with a
    # trimmed start returned other frames than asked; PyAV counted the cut frames, which the
    # decoder never returns, and failed the video. Players, and FFmpeg, show only the edit.
    source = write_indexed(tmp_path / "whole.mp4", 120, 128, 72, fps=FPS, gop=30, options=B_FRAMES["libx264"])
    path = write_trimmed(source, tmp_path / "trimmed.mp4", first, count=50)
    shown = every_frame(path)
    assert len(shown) == 50 and np.array_equal(shown[0], every_frame(source)[first])
    meta, small = read_video(str(path), shots=True, max_frames=1000)
    assert meta.frame_count == 50 and len(small) == 50
    wanted = [0, 1, 14, 15, 16, 29, 30, 49]
    with open_video(path, meta, decoder=meta.decoder) as reader:
        frames = reader.get_frames(wanted)
        times = reader.frame_times([0, 49])
    assert all(np.array_equal(frame, shown[index]) for frame, index in zip(frames, wanted))
    assert times.tolist() == pytest.approx([0.0, 49 / FPS])


def test_a_portrait_video_trimmed_deep_into_a_keyframe_group_is_read_upright(tmp_path):
    # a trim keeps the packets from the keyframe before the cut, decoded and never shown: the
    # probe gave up its search for the first shown frame's rotation after 64 of them, and a
    # phone's portrait video trimmed 70 frames into a group was read sideways
    source = copy_packets(tmp_path / "portrait.mp4", write_indexed(tmp_path / "coded.mp4", 150, 128, 72, fps=FPS,
                          gop=120), rotation_ccw=-90)
    assert probe(source).rotation == 90
    path = write_trimmed(source, tmp_path / "trimmed.mp4", first=70, count=40, rotation_ccw=-90)
    meta, _ = read_video(str(path), shots=False, max_frames=1000)
    assert meta.rotation == 90 and meta.frame_count == 40
    with open_video(path, meta, decoder=meta.decoder) as reader:
        assert reader.get_frames([0]).shape[1:3] == (128, 72)


def test_a_matroska_video_starting_after_time_zero_lasts_as_long_as_its_frames(tmp_path):
    # Matroska states its duration up to the end of its last frame from time 0; the frames'
    # and segments' times run from the first frame, and so must the video's duration
    times_ms = [2000 + 40 * i for i in range(50)]
    for name in ("offset.mkv", "offset.mp4"):
        path = write_video(tmp_path / name, indexed_frames(50, 64, 36), fps=FPS, times_ms=times_ms)
        meta, _ = read_video(str(path), shots=False, max_frames=1000)
        assert meta.frame_count == 50 and meta.duration_s == pytest.approx(2.0), name


@pytest.mark.parametrize("name", ["cut.mp4", "cut.ts", "cut.mkv"])
def test_a_stream_cut_before_its_first_keyframe_starts_at_it(tmp_path, name):
    # a recording or a segment that starts mid keyframe group: its first frames refer to frames
    # it lacks, and FFmpeg returns none of them. PyAV counted them and failed the video.
    source = write_indexed(tmp_path / "whole.mp4", 90, 128, 72, fps=FPS, gop=30, options=B_FRAMES["libx264"])
    path = copy_packets(tmp_path / name, source, skip=5)
    shown = every_frame(path)
    assert 0 < len(shown) < 90
    meta, small = read_video(str(path), shots=True, max_frames=1000)
    assert meta.frame_count == len(shown) == len(small)
    wanted = [0, 1, 2, len(shown) // 2, len(shown) - 1]
    with open_video(path, meta, decoder=meta.decoder) as reader:
        frames = reader.get_frames(wanted)
        assert reader.frame_times([0]).tolist() == [0.0]
    assert all(np.array_equal(frame, shown[index]) for frame, index in zip(frames, wanted))


def test_a_stream_whose_size_changes_is_read_at_its_first_size(tmp_path):
    # a browser's or a video call's recording changes size with the window or the bandwidth:
    # decord scales such frames to the first size; PyAV returned two sizes, which failed to stack
    first = write_indexed(tmp_path / "small.ts", 30, 128, 72, fps=FPS, options=B_FRAMES["libx264"])
    second = write_indexed(tmp_path / "large.ts", 30, 192, 108, fps=FPS, options=B_FRAMES["libx264"])
    path = copy_packets(tmp_path / "resized.ts", first, second)
    shown = every_frame(path)
    assert [frame.shape for frame in shown[29:31]] == [(72, 128, 3), (108, 192, 3)]
    meta, _ = read_video(str(path), shots=False, max_frames=1000)
    with open_video(path, meta, decoder=meta.decoder) as reader:
        frames = reader.get_frames([0, 29, 30, 59])
    assert frames.shape == (4, 72, 128, 3)
    for frame, index in zip(frames, [0, 29, 30, 59]):
        expected = cv2.resize(shown[index], (128, 72), interpolation=cv2.INTER_AREA)
        assert np.abs(frame.astype(int) - expected).mean() < 3, f"frame {index}"


def test_a_stream_that_grows_past_max_frame_pixels_midway_is_refused_where_it_does(tmp_path):
    # `probe` holds the stream's first size to sampling.max_frame_pixels; PyAV, which sees each frame's
    # size, stops at the first frame larger than that, rather than decode on at its size
    first = write_indexed(tmp_path / "small.ts", 30, 128, 72, fps=FPS, options=B_FRAMES["libx264"])
    second = write_indexed(tmp_path / "large.ts", 30, 192, 108, fps=FPS, options=B_FRAMES["libx264"])
    path = copy_packets(tmp_path / "grows.ts", first, second)
    refusal = (r"grows\.ts: a 192x108 frame \(20,736 pixels\), after frames of 128x72, exceeds the limit of 9,216 "
               r"pixels a frame \(sampling\.max_frame_pixels\): the stream grows midway")
    with pytest.raises(VideoDecodeError, match=refusal) as refused:
        read_video(str(path), shots=True, max_frames=1000, max_frame_pixels=128 * 72)
    assert not refused.value.bad_file  # the setting's: raised, the video runs again
    meta, _ = read_video(str(path), shots=False, max_frames=1000, max_frame_pixels=128 * 72)
    with open_video(path, meta, decoder=meta.decoder, max_frame_pixels=128 * 72) as reader:
        assert reader.get_frames([0, 29]).shape == (2, 72, 128, 3)  # the frames before it are read
        with pytest.raises(VideoDecodeError, match=refusal):
            reader.get_frames([0, 30])
    # at the default bound it is read at its first size
    meta, small = read_video(str(path), shots=True, max_frames=1000)
    assert meta.decoder == "pyav" and len(small) == 60


def _grown(tmp_path: Path, name: str) -> Path:
    """30 frames at 128x72, then 30 at 192x108, in one stream (a recording that grows midway)."""
    first = write_indexed(tmp_path / "small.ts", 30, 128, 72, fps=FPS, options=B_FRAMES["libx264"])
    second = write_indexed(tmp_path / "large.ts", 30, 192, 108, fps=FPS, options=B_FRAMES["libx264"])
    return copy_packets(tmp_path / name, first, second)


def test_the_sample_stage_stops_at_a_frame_that_grows_past_max_frame_pixels(tmp_path):
    """(mutation review) The sample stage opens the video itself (`read_frames`): its reader is given
    sampling.max_frame_pixels too, and stops at a frame that grew past it."""
    from schemas.config import SamplingConfig
    from workers.frame_reading import read_frames
    from workers.task import Segment

    path = _grown(tmp_path, "grows.ts")
    meta, _ = read_video(str(path), shots=False, max_frames=1000)  # (its reader kept: the first read takes it)
    whole = [Segment(0, 0, 59, 0.0, 60 / FPS, 1.0, "whole_video", 30)]
    assert read_frames(str(path), meta, whole, SamplingConfig(num_frames=4))[0].shape[1:] == (72, 128, 3)
    with pytest.raises(VideoDecodeError, match=r"grows\.ts: a 192x108 frame .* exceeds the limit of 9,216 pixels"):
        read_frames(str(path), meta, whole, SamplingConfig(num_frames=4, max_frame_pixels=128 * 72))


def test_decords_fallback_to_pyav_stops_at_a_frame_that_grows_past_max_frame_pixels(tmp_path):
    """(mutation review) decord does not show a frame's size; where it fails midway PyAV reads on, and
    holds each frame to the bound `open_video` was given."""
    path = _grown(tmp_path, "grows.mp4")
    meta, _ = read_video(str(path), shots=False, max_frames=1000, max_frame_pixels=128 * 72)
    with open_video(path, meta, max_frame_pixels=128 * 72) as reader:
        assert reader.decoder == "decord"

        def broken(indices):
            raise RuntimeError("decord fails midway")

        reader._reader.get_batch = broken
        with pytest.raises(VideoDecodeError, match=r"grows\.mp4: a 192x108 frame .* exceeds the limit of 9,216"):
            reader.get_frames([0, 30])
        assert reader.decoder == "pyav"


def test_of_two_video_streams_the_first_is_read(tmp_path):
    # a two-camera dashcam or a multi-angle file: `videos` describes the first stream, and
    # decord read FFmpeg's "best" one instead (here the larger), so such files go to PyAV
    path = tmp_path / "two_cameras.mp4"
    with av.open(str(path), "w") as container:
        streams = [container.add_stream("libx264", rate=FPS) for _ in range(2)]
        for stream, (width, height) in zip(streams, [(128, 72), (256, 144)]):
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, frame in enumerate(indexed_frames(20, 256, 144)):
            for stream in streams:
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]))
                picture.pts = index
                for packet in stream.encode(picture):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                container.mux(packet)
    meta = probe(path)
    assert (meta.width, meta.height, meta.video_streams) == (128, 72, 2)
    with open_video(path, meta) as reader:
        frames = reader.get_frames([0, 19])
    shown = every_frame(path)  # the first video stream
    assert np.array_equal(frames[0], shown[0]) and np.array_equal(frames[1], shown[19])


def test_a_raw_dv_file_is_read_at_its_frame_rate(tmp_path):
    # a tape capture: FFmpeg gives raw DV's time base (1/60000 s) as its average frame rate
    path = write_indexed(tmp_path / "tape.dv", 10, 720, 576, fps=FPS, codec="dvvideo")
    meta = probe(path)
    assert (meta.fps, meta.frame_count, meta.duration_s) == (FPS, 10, pytest.approx(10 / FPS))
    with open_video(path, meta) as reader:
        frames = reader.get_frames([0, 9])
        assert reader.fps == FPS and reader.frame_times([9]).tolist() == pytest.approx([9 / FPS])
    shown = every_frame(path)
    assert np.array_equal(frames[0], shown[0]) and np.array_equal(frames[1], shown[9])


def test_a_recording_that_states_no_duration_ends_with_its_last_frame(tmp_path):
    # a browser's recording (MediaRecorder) is a live Matroska/WebM stream: no duration, no index
    source = write_indexed(tmp_path / "clip.mkv", 50, 128, 72, fps=FPS)
    path = copy_packets(tmp_path / "recording.mkv", source, options={"live": "1"})
    assert probe(path).duration_s == 0
    meta, _ = read_video(str(path), shots=False, max_frames=1000)
    assert (meta.frame_count, meta.duration_s) == (50, pytest.approx(50 / FPS))
