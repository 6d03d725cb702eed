"""On-screen text: RapidOCR reads known text, boxes land on it in original-frame pixels."""

import re

import numpy as np
import pytest

from schemas.config import RunConfig
from workers.ocr import OcrStage, TextLine, TextReader, reading_order, scale_corners, upright_size
from workers.synthetic import text_frames
from workers.task import SampledFrames, VideoMeta, VideoRef, VideoTask


@pytest.fixture(scope="module")
def stage():
    """One OcrStage for the module: loading three ONNX sessions is the slow part."""
    return OcrStage(RunConfig.from_dict({"stages": ["ocr"]}), num_threads=2)


def normalise(text):
    return " ".join(text.upper().split())


def ink_bounds(frame):
    """(x0, y0, x1, y1) of the dark pixels: where the drawn text is."""
    ys, xs = np.nonzero(frame.min(axis=2) < 128)
    return xs.min(), ys.min(), xs.max(), ys.max()


def box_bounds(box):
    xs, ys = box[0::2], box[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def assert_box_around(box, ink, slack, inside=3):
    bx0, by0, bx1, by1 = box_bounds(box)
    ix0, iy0, ix1, iy1 = ink
    # the box holds the text (give or take its anti-aliased edge), and is not much larger than it
    assert bx0 <= ix0 + inside and by0 <= iy0 + inside and bx1 >= ix1 - inside and by1 >= iy1 - inside
    assert bx0 >= ix0 - slack and by0 >= iy0 - slack and bx1 <= ix1 + slack and by1 <= iy1 + slack


def make_task(keyframes, frame_index, width, height, rotation=0):
    ref = VideoRef(uri="/videos/text.mp4", size_bytes=1, mtime_ns=0, etag=None, video_id="text")
    meta = VideoMeta(duration_s=4.0, fps=25.0, frame_count=100, width=width, height=height, codec="h264",
                     rotation=rotation, has_audio=False, container="mp4", decoder="pyav")
    count = len(frame_index)
    frames = SampledFrames(
        frame_index=np.array(frame_index, dtype=np.int64),
        timestamp_s=np.array(frame_index, dtype=np.float64) / 25.0,
        segment_index=np.arange(count, dtype=np.int32),
        keyframes=keyframes,
    )
    return VideoTask(ref=ref, meta=meta, frames=frames)


@pytest.mark.parametrize("text", ["VIDLENS 2026", "HELLO WORLD"])
def test_reads_known_text_with_a_box_around_it(stage, text):
    frame = text_frames(text, count=1)[0]

    lines = stage.reader.read(frame)

    assert [normalise(line.text) for line in lines] == [text]
    assert lines[0].confidence >= 0.5
    assert_box_around(tuple(lines[0].corners.reshape(-1)), ink_bounds(frame), slack=25)


def test_blank_frame_has_no_text(stage):
    assert stage.reader.read(np.full((360, 640, 3), 255, dtype=np.uint8)) == []
    assert stage.reader.read(np.zeros((200, 300, 3), dtype=np.uint8)) == []


def test_stage_scales_boxes_back_to_the_rotated_original_frame(stage):
    # a portrait phone video stored as 1280x720 with rotation 90, its keyframes downscaled by 2
    frame = text_frames("VIDLENS", count=1, width=360, height=640, scale=1.5)[0]
    blank = np.full_like(frame, 255)
    task = make_task({0: blank, 2: frame}, frame_index=[5, 40, 75], width=1280, height=720, rotation=90)

    stage.run([task])

    assert not task.errors
    assert [normalise(t.text) for t in task.texts] == ["VIDLENS"]
    found = task.texts[0]
    assert (found.frame_index, found.timestamp_s, found.segment_index) == (75, 3.0, 2)
    assert len(found.box) == 8 and all(isinstance(v, float) for v in found.box)
    ink = tuple(2 * v for v in ink_bounds(frame))
    assert_box_around(found.box, ink, slack=50, inside=6)


@pytest.mark.parametrize("frames, read", [("keyframes", {"HELLO"}), ("sampled", {"HELLO", "WORLD"})])
def test_text_that_changes_within_a_shot_is_read_on_every_sampled_frame(stage, tmp_path, frames, read):
    """A subtitle changes within a shot: the shot's keyframe shows one line, the sampled frames all."""
    from workers.sampling import DecodeStage, SampleStage
    from workers.synthetic import write_video

    path = write_video(tmp_path / "two.mp4", text_frames("HELLO", 25) + text_frames("WORLD", 25), fps=25)
    config = RunConfig.from_dict({"stages": ["ocr"], "sampling": {"num_frames": 4}, "ocr": {"frames": frames}})
    task = VideoTask(ref=VideoRef(uri=str(path), size_bytes=path.stat().st_size, mtime_ns=None, etag=None,
                                  video_id="two"))
    DecodeStage(config).run([task])
    SampleStage(config, preparers={}).run([task])  # one shot (no shot detection): its keyframe is frame 24
    stage.run([task])
    assert not task.errors and {normalise(t.text) for t in task.texts} == read
    shown = {t.frame_index: normalise(t.text) for t in task.texts}
    assert all(text == ("HELLO" if index < 25 else "WORLD") for index, text in shown.items())
    assert len(shown) == (1 if frames == "keyframes" else len(task.frames.frame_index))


def test_task_without_keyframes_gets_no_texts(stage):
    task = make_task({}, frame_index=[0], width=640, height=360)
    stage.run([task])
    assert task.texts == [] and not task.errors


def test_reader_keeps_confident_lines_and_converts_rgb_to_bgr():
    reader = TextReader.__new__(TextReader)  # no models: the engine is replaced below
    reader.min_confidence = 0.8
    seen = []

    def engine(image):
        seen.append(image.copy())
        square = [[1, 2], [30, 2], [30, 9], [1, 9]]
        return [[square, " SURE ", 0.95], [square, "UNSURE", 0.6], [square, "", 0.99]], [0.1, 0.1, 0.1]

    reader.engine = engine
    red = np.zeros((10, 40, 3), dtype=np.uint8)
    red[..., 0] = 255

    lines = reader.read(red)

    assert [(line.text, line.confidence) for line in lines] == [("SURE", 0.95)]
    assert lines[0].corners.shape == (4, 2)
    assert seen[0][0, 0].tolist() == [0, 0, 255]  # red arrives as OpenCV's BGR
    with pytest.raises(ValueError):
        reader.read(np.zeros((10, 40), dtype=np.uint8))


def box(x0, y0, x1, y1):
    """The four corners of an upright box, clockwise from top-left."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_a_frames_lines_are_in_reading_order():
    """Lines come top to bottom; those whose heights mostly overlap are one row, left to right.
    RapidOCR's own order put a small word after the big one to its right on the same baseline."""
    boxes = {
        "TODAY": box(200, 240, 390, 280),
        "LIVE": box(380, 56, 570, 126),  # big, its top 38 px above NEWS's: first in RapidOCR's order
        "NEWS": box(30, 94, 130, 123),
        "AT NINE": box(300, 300, 460, 330),
        "SECOND LINE": box(20, 322, 220, 350),  # 8 of its 28 px beside AT NINE: the row below, though left
        "10:45": box(600, 10, 630, 20),
    }
    lines = [TextLine(np.array(corners, dtype=np.float32), text, 0.9) for text, corners in boxes.items()]
    expected = ["10:45", "NEWS", "LIVE", "TODAY", "AT NINE", "SECOND LINE"]
    assert [line.text for line in reading_order(lines)] == expected
    assert [line.text for line in reading_order(lines[::-1])] == expected
    assert reading_order([]) == []

    reader = TextReader.__new__(TextReader)  # what the reader returns, whatever RapidOCR's order
    reader.min_confidence = 0.5
    reader.engine = lambda image: ([[corners, text, 0.9] for text, corners in boxes.items()], [0.1, 0.1, 0.1])
    assert [line.text for line in reader.read(np.zeros((360, 640, 3), dtype=np.uint8))] == expected


def test_tilted_lines_and_a_vertical_watermark_keep_the_reading_order():
    """Rows were grouped by the lines' upright boxes, each growing its row: a sign's tilted lines
    (whose upright boxes span their neighbours) came out reversed, and a watermark up the frame's
    edge joined every line beside it into one row, ordered left to right."""
    import math

    def turned(x, y, width, height, degrees):  # a box turned about its top left corner
        corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
        a = math.radians(degrees)
        turn = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=np.float32)
        return corners @ turn.T + np.array([x, y], dtype=np.float32)

    for degrees in (10, -10):  # three lines of a sign, 30 px apart, 300 px long and 20 high
        a = math.radians(degrees)
        sign = [TextLine(turned(200 - i * 30 * math.sin(a), 100 + i * 30 * math.cos(a), 300, 20, degrees), text, 0.9)
                for i, text in enumerate(["OPEN", "MONDAY TO FRIDAY", "9AM - 5PM"])]
        assert [line.text for line in reading_order(sign[::-1])] == ["OPEN", "MONDAY TO FRIDAY", "9AM - 5PM"]
    frame = [TextLine(turned(220, 600, 200, 30, 0), "first line", 0.9),
             TextLine(turned(180, 640, 280, 30, 0), "second, longer line", 0.9),
             TextLine(turned(600, 100, 30, 600, 0), "@watermark", 0.9),  # where its middle is
             TextLine(turned(50, 150, 200, 30, 0), "title at the top", 0.9)]
    assert [line.text for line in reading_order(frame)] == [
        "title at the top", "@watermark", "first line", "second, longer line"]


def test_the_texts_of_a_frame_are_in_reading_order(stage):
    import cv2

    frame = np.full((360, 640, 3), 255, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(frame, "NEWS", (30, 120), font, 1.2, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(frame, "LIVE", (380, 120), font, 3, (0, 0, 0), 6, cv2.LINE_AA)  # the same baseline, taller
    cv2.putText(frame, "TODAY", (200, 280), font, 2, (0, 0, 0), 4, cv2.LINE_AA)
    task = make_task({0: frame}, frame_index=[0], width=640, height=360)
    stage.run([task])
    assert not task.errors and [normalise(t.text) for t in task.texts] == ["NEWS", "LIVE", "TODAY"]
    # numbered so: a query's rows come in no order of their own
    assert [t.line_index for t in task.texts] == [0, 1, 2]
    from pipeline.records import RunIdentity, task_rows

    rows = task_rows(task, RunIdentity("r", "f", None), RunConfig())["texts"]
    assert [(row["line_index"], normalise(row["text"])) for row in rows] == [(0, "NEWS"), (1, "LIVE"), (2, "TODAY")]


def test_upright_size_and_scaling():
    meta = VideoMeta(duration_s=1.0, fps=25.0, frame_count=25, width=1920, height=1080, codec="h264",
                     rotation=0, has_audio=False, container="mp4", decoder="pyav")
    assert upright_size(meta, (720, 1280, 3)) == (1920, 1080)
    meta.rotation = 270
    assert upright_size(meta, (1280, 720, 3)) == (1080, 1920)
    # a decoder that left the frame unrotated: trust the keyframe's orientation
    assert upright_size(meta, (720, 1280, 3)) == (1920, 1080)
    corners = np.array([[10, 20], [30, 20], [30, 40], [10, 40]], dtype=np.float32)
    assert scale_corners(corners, (720, 1280, 3), (1920, 1080)) == (15.0, 30.0, 45.0, 30.0, 45.0, 60.0, 15.0, 60.0)


def test_boxes_of_non_square_pixel_videos_are_in_coded_pixels(stage):
    # guards against a portrait coded frame shown landscape (DVD half-D1) being taken for an unapplied rotation
    import cv2

    from workers.sampling import as_displayed

    meta = VideoMeta(duration_s=1.0, fps=25.0, frame_count=25, width=352, height=576, codec="mpeg2video",
                     rotation=0, has_audio=False, container="mpeg", decoder="pyav", pixel_aspect=24 / 11)
    shown = np.full((576, 768, 3), 255, dtype=np.uint8)
    cv2.putText(shown, "HELLO", (192, 300), cv2.FONT_HERSHEY_SIMPLEX, 3, (0, 0, 0), 8)
    coded = cv2.resize(shown, (352, 576), interpolation=cv2.INTER_AREA)
    keyframe = as_displayed(coded[None], meta)[0]
    assert keyframe.shape == (576, 768, 3) and upright_size(meta, keyframe.shape) == (352, 576)
    task = make_task({0: keyframe}, frame_index=[0], width=352, height=576)
    task.meta = meta
    stage.run([task])
    assert [normalise(t.text) for t in task.texts] == ["HELLO"]
    assert_box_around(task.texts[0].box, ink_bounds(coded), slack=25)
    # the mirror case: a landscape coded frame of narrow pixels shows as portrait
    narrow = VideoMeta(duration_s=1.0, fps=25.0, frame_count=25, width=640, height=480, codec="h264",
                       rotation=0, has_audio=False, container="mp4", decoder="pyav", pixel_aspect=0.5)
    assert upright_size(narrow, as_displayed(np.zeros((1, 480, 640, 3), np.uint8), narrow)[0].shape) == (640, 480)
    # turned non-square videos: the upright coded size, whichever way the keyframe was stretched
    for rotation in (90, 270):
        meta.rotation, narrow.rotation = rotation, rotation
        upright = np.zeros((1, 352, 576, 3), np.uint8)  # the DVD frame turned: 576 wide, 352 high
        assert upright_size(meta, as_displayed(upright, meta)[0].shape) == (576, 352)
        assert upright_size(narrow, as_displayed(np.zeros((1, 640, 480, 3), np.uint8), narrow)[0].shape) == (480, 640)


def test_burnt_in_subtitles_of_a_real_clip_are_read(stage, shared_videos):
    import av

    from workers.pyav_source import SCALER_OPTIONS

    wanted = {30, 150}
    frames = {}
    with av.open(str(shared_videos / "keynote_subtitles.mp4")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24", **SCALER_OPTIONS)
            if len(frames) == len(wanted):
                break

    words = []
    for image in frames.values():
        # lower half: where the subtitles are burnt in
        words += [w for line in stage.reader.read(image) for w in re.findall(r"[A-Za-z']{2,}", line.text)
                  if line.corners[:, 1].min() > image.shape[0] / 2]
    assert len(words) >= 4, words


def test_a_tall_narrow_or_tiny_frame_is_padded_for_detection_and_its_text_still_read(stage):
    """RapidOCR scales a frame's shorter side to 736 px: an 8x720 frame became 736x66,240 (65 s
    and 6 GB for one keyframe), a 2x600 one 24 GB, and the kernel killed the run. It is handed
    the frame padded (right and bottom) to at most 4:1 and at least 32 px a side."""
    reader = TextReader.__new__(TextReader)  # (the models never see those frames here: unpadded, they
    reader.min_confidence = 0.5  # would take gigabytes, were this to break)
    seen = []
    reader.engine = lambda image: (seen.append(image.shape), (None, 0.0))[1]
    for shape in ((720, 8, 3), (2, 600, 3), (10, 12, 3), (360, 640, 3)):
        assert reader.read(np.full(shape, 255, dtype=np.uint8)) == []
    assert seen == [(720, 180, 3), (150, 600, 3), (32, 32, 3), (360, 640, 3)]
    tall = np.full((1000, 230, 3), 255, dtype=np.uint8)  # (more than 4:1) with a word at its top
    tall[40:120] = text_frames("OK", count=1, width=230, height=80)[0]
    lines = stage.reader.read(tall)
    assert [normalise(line.text) for line in lines] == ["OK"]
    assert_box_around(tuple(lines[0].corners.reshape(-1)), ink_bounds(tall), slack=25)


def test_ocr_runs_on_the_cpus_its_ray_actor_reserves_and_locally_on_every_core(monkeypatch):
    # it read resources.num_cpus_per_actor, which the local executor says it does not read, and
    # on Ray ignored per_stage.ocr.num_cpus: an actor reserving 4 CPUs ran 1 thread
    import os

    from pipeline import plan, ray_executor
    from workers import ocr

    threads = []
    monkeypatch.setattr(ocr, "TextReader", lambda confidence, count: threads.append(count))
    config = RunConfig.from_dict({"stages": ["ocr"], "resources": {"num_cpus_per_actor": 3,
                                                                   "per_stage": {"ocr": {"num_cpus": 4}}}})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    OcrStage(config)  # the local executor's
    [spec] = [s for s in plan.build_plan(config, gpus_visible=0) if s.name == "ocr"]
    assert spec.threads == 4 and ray_executor._actor_environment(spec, config)["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # as a Ray actor of that plan is given
    OcrStage(config)
    assert threads == [len(os.sched_getaffinity(0)), 4]

