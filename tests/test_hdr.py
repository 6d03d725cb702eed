"""HDR video (PQ, HLG) is tone mapped to what an SDR screen shows, wherever frames are read."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from schemas.config import RunConfig
from workers.decode import open_video, probe
from workers.hdr import REFERENCE_WHITE, to_sdr
from workers.sampling import DecodeStage, SampleStage
from workers.synthetic import mux_frames
from workers.task import VideoRef, VideoTask
from tests.test_sampling import AsGiven, write_anamorphic

#: each bar's linear BT.709 light, 1.0 being HDR reference white (203 cd/m2): white, red at
#: white's level, 18% grey, and a highlight at 4x white
BARS = {"white": (1.0, 1.0, 1.0), "red": (1.0, 0.0, 0.0), "grey": (0.18, 0.18, 0.18), "highlight": (4.0, 4.0, 4.0)}
BAR_WIDTH, HEIGHT = 32, 32
BT709_TO_BT2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])
BT2020_LUMA = np.array([0.2627, 0.6780, 0.0593])


def pq_signal(nits: np.ndarray) -> np.ndarray:
    """PQ's inverse EOTF (BT.2100)."""
    m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    y = (nits / 10000) ** m1
    return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def hlg_signal(nits: np.ndarray, peak: float = 1000.0) -> np.ndarray:
    """HLG's inverse OOTF for a `peak` cd/m2 display (gamma 1.2), then its OETF (BT.2100)."""
    display_luminance = nits @ BT2020_LUMA
    scene_luminance = (display_luminance / peak) ** (1 / 1.2)
    scene = nits / (peak * scene_luminance[..., None] ** 0.2)
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * np.log(4 * a)
    return np.where(scene <= 1 / 12, np.sqrt(3 * scene), a * np.log(np.maximum(12 * scene - b, 1e-12)) + c)


def write_hdr_bars(path: Path, transfer: str, codec: str = "libx264", frames: int = 5) -> Path:
    """The bars as 10-bit BT.2020 video in `transfer` ("pq" or "hlg"), tagged as cameras tag it."""
    light = np.concatenate([np.broadcast_to(BT709_TO_BT2020 @ np.array(bar), (HEIGHT, BAR_WIDTH, 3))
                            for bar in BARS.values()], axis=1)
    nits = light * REFERENCE_WHITE
    signal = pq_signal(nits) if transfer == "pq" else hlg_signal(nits)
    # BT.2020 non-constant-luminance Y'CbCr, limited range, 10 bits
    luma = signal @ BT2020_LUMA
    planes = [64 + 876 * luma, 512 + 896 * (signal[..., 2] - luma) / (2 * (1 - BT2020_LUMA[2])),
              512 + 896 * (signal[..., 0] - luma) / (2 * (1 - BT2020_LUMA[0]))]
    planes = [planes[0], planes[1][::2, ::2], planes[2][::2, ::2]]
    trc = {"pq": "smpte2084", "hlg": "arib-std-b67"}[transfer]
    params = f"colorprim=bt2020:transfer={trc}:colormatrix=bt2020nc"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = light.shape[1], HEIGHT, "yuv420p10le"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "qp": "0", "x264-params": params}
        else:
            stream.options = {"preset": "ultrafast", "x265-params": f"lossless=1:log-level=error:{params}"}
        mux_frames(container, stream, (ten_bit_frame(planes) for _ in range(frames)))
    return path


def ten_bit_frame(planes: list[np.ndarray]) -> av.VideoFrame:
    """A yuv420p10le frame of the given Y, Cb and Cr code planes."""
    frame = av.VideoFrame(planes[0].shape[1], planes[0].shape[0], "yuv420p10le")
    for plane, values in zip(frame.planes, planes):
        rows = np.frombuffer(plane, np.uint16).reshape(-1, plane.line_size // 2)
        rows[: values.shape[0], : values.shape[1]] = np.round(values).astype(np.uint16)
    return frame


def bar_colours(picture: np.ndarray) -> dict[str, np.ndarray]:
    """The middle pixel of each bar, by name (scaled pictures: by the bar's share of the width)."""
    width = picture.shape[1]
    return {name: picture[picture.shape[0] // 2, int((k + 0.5) * width / len(BARS))].astype(int)
            for k, name in enumerate(BARS)}


def check_sdr(colours: dict[str, np.ndarray]) -> None:
    # as coded, PQ's white was 146 and HLG's 189, and the red washed out (134, 82, 55) and (169, 72, 38)
    assert (colours["white"] >= 235).all() and np.ptp(colours["white"]) <= 2
    assert colours["red"][0] >= 230 and (colours["red"][1:] <= 16).all()
    assert (np.abs(colours["grey"] - 125) <= 6).all()  # 18% of white on a gamma-2.4 screen
    assert (colours["highlight"] > colours["white"]).all() and (colours["highlight"] <= 255).all()


@pytest.mark.parametrize("transfer, codec, name", [
    ("pq", "libx264", "hdr10.mp4"),
    ("hlg", "libx264", "hlg.mkv"),
    ("hlg", "libx265", "iphone_hlg.mov"),  # as iPhones record by default: HEVC, HLG, in MOV
])
def test_hdr_frames_are_tone_mapped_as_an_sdr_screen_shows_them(tmp_path, transfer, codec, name):
    path = write_hdr_bars(tmp_path / name, transfer, codec)
    meta = probe(path)
    assert meta.transfer == transfer
    with open_video(path, meta) as source:
        assert source.decoder == "pyav"  # decord's 8-bit RGB cannot be tone mapped
        frames = source.get_frames(np.array([0, 3]))
        scaled = source.get_frames(np.array([0, 3]), max_side=64)  # what the sample stage reads of 4K
        small = source.all_frames_small()  # what shot detection sees, mapped alike
    assert scaled.shape == (2, HEIGHT // 2, len(BARS) * BAR_WIDTH // 2, 3)
    for picture in (*frames, *scaled, small[0]):
        check_sdr(bar_colours(picture))


def test_the_sample_stage_gives_the_models_and_ocr_the_mapped_frames(tmp_path):
    path = write_hdr_bars(tmp_path / "hdr10.mp4", "pq")
    config = RunConfig.from_dict({"stages": ["embed", "ocr"], "sampling": {"num_frames": 2}})
    task = VideoTask(ref=VideoRef(str(path), path.stat().st_size, None, None, "hdr10"))
    DecodeStage(config).run([task])
    assert (task.meta.transfer, task.meta.decoder) == ("pq", "pyav")
    SampleStage(config, preparers={"embed": AsGiven()}).run([task])
    assert not task.errors
    for picture in task.frames.prepared["embed"].transpose(0, 2, 3, 1):
        check_sdr(bar_colours(picture))
    (keyframe,) = task.frames.keyframes.values()
    check_sdr(bar_colours(keyframe))


@pytest.mark.parametrize("transfer", ["pq", "hlg"])
def test_highlights_are_rolled_off_not_clipped_at_white(transfer):
    ramp = np.repeat(np.arange(0, 65536, 64, dtype=np.uint16)[:, None], 3, axis=1)
    codes = to_sdr(ramp, transfer)[:, 0].astype(int)
    assert codes[0] == 0 and (np.diff(codes) >= 0).all()  # more light is never shown darker
    # greys at 1x, 2x and 4x reference white (203, 406, 812 cd/m2): each brighter, none at 255
    nits = np.array([1.0, 2.0, 4.0])[:, None] * np.full(3, REFERENCE_WHITE)
    signal = pq_signal(nits) if transfer == "pq" else hlg_signal(nits)
    levels = to_sdr(np.round(signal * 65535).astype(np.uint16), transfer)[:, 0].astype(int)
    assert (np.diff(levels) > 0).all() and levels[-1] < 255, levels


def test_the_videos_table_says_which_videos_were_hdr_and_their_pixel_shape(tmp_path, tiny_models):
    from fractions import Fraction

    from pipeline import results
    from pipeline.job import run_job

    folder = tmp_path / "videos"
    folder.mkdir()
    write_hdr_bars(folder / "hdr10.mp4", "pq")
    write_hdr_bars(folder / "hlg.mkv", "hlg")
    write_anamorphic(folder / "hdv.mp4", np.zeros((108, 144, 3), dtype=np.uint8), Fraction(4, 3))
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]},
                                  "sampling": {"num_frames": 2}, "resources": {"executor": "local"}})
    assert run_job(str(folder), str(tmp_path / "out"), config, progress=False).status == "succeeded"
    videos = results.open(str(tmp_path / "out")).df("videos")
    hdr = videos.hdr.astype(object).where(videos.hdr.notna(), None)  # SDR: null
    found = {Path(uri).name: (transfer, aspect) for uri, transfer, aspect in zip(videos.uri, hdr, videos.pixel_aspect)}
    assert found == {"hdr10.mp4": ("pq", 1.0), "hlg.mkv": ("hlg", 1.0), "hdv.mp4": (None, pytest.approx(4 / 3))}
