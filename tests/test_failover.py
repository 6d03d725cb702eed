"""decord failing over to PyAV: PyAV's count and rate are the source's from then on. The damaged
FLV of `tests.corpus.decord_counts_fewer` is one decord counts 28 frames of, PyAV 29: decord
loses the frames at 0.76 s and 0.80 s, PyAV only the one at 0.80 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus import decord_counts_fewer
from workers.decode import VideoDecodeError, open_video, probe
from workers.frame_sources import DecordSource
from workers.pyav_source import PyAVSource
from workers.sampling import read_video


@pytest.fixture(scope="module")
def miscounted_flv(tmp_path_factory) -> Path:
    path = decord_counts_fewer(tmp_path_factory.mktemp("clips") / "miscounted.flv")
    with DecordSource(path, probe(path)) as decord_source, PyAVSource(path, probe(path)) as pyav_source:
        assert (decord_source.frame_count, pyav_source.frame_count) == (28, 29)  # (the file as these tests need it)
    return path


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
