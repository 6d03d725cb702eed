"""The sample counts an MP4/MOV's index claims, and the refusal of a claim its bytes cannot hold."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import av
import numpy as np
import pytest

from tests.corpus import claiming_frames, top_level_box
from workers import mp4_index
from workers.decode import VideoDecodeError, probe
from workers.mp4_index import SampleClaim, implausible_claim, sample_claims
from workers.synthetic import indexed_frames, write_video

FRAMES = 12


def _written(path: Path, movflags: str | None = None, audio_codec: str | None = None) -> Path:
    """A 64x36 H.264 clip of `FRAMES` frames, a keyframe every 4; with `movflags` as FFmpeg's MP4
    muxer takes them, and beside 0.2 s of sound in `audio_codec`."""
    with av.open(str(path), "w", options={"movflags": movflags} if movflags else {}) as container:
        video = container.add_stream("libx264", rate=24)
        video.width, video.height, video.gop_size, video.options = 64, 36, 4, {"preset": "ultrafast"}
        sound = container.add_stream(audio_codec, rate=48000, layout="mono") if audio_codec else None
        for index, frame in enumerate(indexed_frames(FRAMES, 64, 36)):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = index
            container.mux(video.encode(picture))
        container.mux(video.encode())
        if sound is not None:
            for start in range(0, 9600, 960):
                samples = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), format="s16", layout="mono")
                samples.sample_rate, samples.pts = 48000, start
                container.mux(sound.encode(samples))
            container.mux(sound.encode())
    return path


def _with_64_bit_mdat(path: Path) -> Path:
    """The clip with its `mdat` sized in 64 bits, in the 8 bytes of the `free` box FFmpeg leaves
    before it for that: its frames stay where they are."""
    data = path.read_bytes()
    free = top_level_box(data, b"free")
    assert data[free:free + 4] == struct.pack(">I", 8) and data[free + 12:free + 16] == b"mdat"
    (size,) = struct.unpack(">I", data[free + 8:free + 12])
    path.write_bytes(data[:free] + struct.pack(">I4sQ", 1, b"mdat", size + 8) + data[free + 16:])
    return path


def test_an_index_claiming_more_frames_than_the_file_has_bytes_is_refused_before_ffmpeg_opens_it(
        tmp_path, monkeypatch):
    # a 1.8 KB MP4 claiming 80 million frames: opening it took 4.8 GB with PyAV, 3.2 GB with
    # decord, and the decode stage 26 s, which then read the video as 1 frame
    path = claiming_frames(write_video(tmp_path / "claims.mp4", indexed_frames(4, 64, 36), fps=24), 80_000_000)
    monkeypatch.setattr(av, "open", lambda *_, **__: pytest.fail("FFmpeg opened the file"))
    with pytest.raises(VideoDecodeError, match=r"claims\.mp4: its MP4/MOV index claims 80,000,000 frames or "
                                               r"samples \(track 1's st..\), more than a file of [\d,]+ bytes "
                                               r"can hold: a damaged or forged index, not opened") as refused:
        probe(path)
    assert refused.value.bad_file  # its own bytes: runs give up on it


@pytest.mark.parametrize("layout", ["index last", "index first", "64-bit mdat", "fragmented"])
def test_the_claims_are_read_wherever_the_index_is(tmp_path, layout):
    path = tmp_path / "clip.mp4"
    if layout == "index first":
        _written(path, "faststart")
    elif layout == "fragmented":  # an empty moov, then a moof and mdat a keyframe group
        _written(path, "frag_keyframe+empty_moov")
    else:
        _written(path)
    if layout == "64-bit mdat":
        _with_64_bit_mdat(path)
    size = path.stat().st_size
    claims = sample_claims(path)
    if layout == "fragmented":
        assert [claim.samples for claim in claims if claim.box == "trun"] == [4, 4, 4]
    else:
        assert {(claim.track, claim.samples) for claim in claims if claim.box in ("stsz", "stts")} == {(1, FRAMES)}
    assert implausible_claim(path, size) is None and probe(path).frame_count == FRAMES
    # the same claim, forged: a fragment's trun (no per-sample fields needed) or the track's tables
    data = bytearray(path.read_bytes())
    box = b"trun" if layout == "fragmented" else b"stsz"
    at = data.index(box, top_level_box(data, b"moof" if layout == "fragmented" else b"moov")) + 4
    count_at = at + (4 if layout == "fragmented" else 8)  # (after the version and flags, and stsz's sample size)
    data[count_at:count_at + 4] = struct.pack(">I", size + 1)
    path.write_bytes(data)
    expected = SampleClaim(0, "trun", size + 1) if layout == "fragmented" else SampleClaim(1, "stsz", size + 1)
    assert implausible_claim(path, size) == expected
    with pytest.raises(VideoDecodeError, match=f"claims {size + 1:,} frames or samples"):
        probe(path)


def test_a_sound_track_indexed_by_chunk_may_count_more_samples_than_bytes(tmp_path):
    # QuickTime's PCM and IMA4 count audio samples, one a time unit (stts: one entry of duration
    # 1): more than the bytes in IMA4 (64 in 34). FFmpeg indexes such a track by chunk, and its
    # count sizes nothing (80 million claimed: 41 MB to open, as for a small file)
    path = _written(tmp_path / "ima4.mov", audio_codec="adpcm_ima_qt")
    data = bytearray(path.read_bytes())
    moov = top_level_box(data, b"moov")
    sound = data.index(b"soun", moov)
    stts, stsz = data.index(b"stts", sound) - 4, data.index(b"stsz", sound) - 4
    data[stts + 16:stts + 24] = struct.pack(">II", 80_000_000, 1)
    data[stsz + 12:stsz + 20] = struct.pack(">II", 1, 80_000_000)
    path.write_bytes(data)
    assert sorted(claim.track for claim in sample_claims(path)) == [1, 1]  # the video's only
    assert probe(path).frame_count == FRAMES
    # the same counts in a track of another kind are refused
    data[sound:sound + 4] = b"vide"
    path.write_bytes(data)
    assert implausible_claim(path, len(data)) == SampleClaim(2, "stts", 80_000_000)


def test_what_is_read_is_bounded(tmp_path, monkeypatch):
    path = claiming_frames(write_video(tmp_path / "claims.mp4", indexed_frames(4, 64, 36), fps=24), 80_000_000)
    assert implausible_claim(path, path.stat().st_size) is not None
    # nothing beyond MAX_DEPTH boxes inside one another: 3,000 nested moov boxes ran out of Python's recursion
    nested = tmp_path / "nested.mp4"
    nested.write_bytes(struct.pack(">I4s8x", 16, b"ftyp")
                       + b"".join(struct.pack(">I4s", 8 * (3000 - level), b"moov") for level in range(3000)))
    assert sample_claims(nested) == []
    # beyond MAX_BOXES headers (here the ftyp, free and mdat before the moov) nothing is checked
    monkeypatch.setattr(mp4_index, "MAX_BOXES", 3)
    assert sample_claims(path) == []
    # a file that does not start as an MP4/MOV is not read
    other = tmp_path / "clip.mkv"
    other.write_bytes(b"\x1a\x45\xdf\xa3" + path.read_bytes())
    assert sample_claims(other) == []


def _box(kind: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, body: bytes) -> bytes:
    """A full box: version 0 and no flags before `body`."""
    return _box(kind, bytes(4) + body)


def _track(handler: bytes, stts: list[tuple[int, int]], stsz: int, ctts: int | None = None) -> bytes:
    """A `trak` of `handler` (b"vide", b"soun") whose `stts` has the entries (count, duration), whose
    `stsz` claims `stsz` samples and, given `ctts`, whose `ctts` has one entry of that count."""
    tables = [_full_box(b"stts", struct.pack(">I", len(stts)) + b"".join(struct.pack(">II", *e) for e in stts)),
              _full_box(b"stsz", struct.pack(">II", 0, stsz))]
    if ctts is not None:
        tables.append(_full_box(b"ctts", struct.pack(">III", 1, ctts, 0)))
    hdlr = _full_box(b"hdlr", bytes(4) + handler + bytes(13))
    return _box(b"trak", _box(b"mdia", hdlr + _box(b"minf", _box(b"stbl", b"".join(tables)))))


_FTYP = _box(b"ftyp", b"isom" + bytes(4) + b"isom")


def test_a_claim_of_as_many_samples_as_the_file_has_bytes_is_not_refused(tmp_path):
    """(mutation review) A sample needs at least a byte: a claim of exactly the file's size can be true,
    one more cannot (`implausible_claim` compares with >, not >=)."""
    path = tmp_path / "claims.mp4"
    size = len(_FTYP + _box(b"moov", _track(b"vide", [(1, 1)], 0)))
    for count, refused in ((size, None), (size + 1, SampleClaim(1, "stsz", size + 1))):
        path.write_bytes(_FTYP + _box(b"moov", _track(b"vide", [(1, 1)], count)))
        assert path.stat().st_size == size and implausible_claim(path, size) == refused


def test_a_sound_track_indexed_by_chunk_keeps_its_ctts_claim_and_one_of_other_durations_all(tmp_path):
    """(mutation review) Only a sound track of one `stts` entry of duration 1 (QuickTime's PCM, IMA4) has
    its `stsz` and `stts` counts left out, never its `ctts`, which FFmpeg sizes by its count; a sound track
    of other durations (AAC's 1024) is counted whole."""
    path = tmp_path / "sound.mov"
    big = 80_000_000
    path.write_bytes(_FTYP + _box(b"moov", _track(b"vide", [(4, 1)], 4)
                                  + _track(b"soun", [(big, 1)], big, ctts=big)))
    assert [(c.track, c.box, c.samples) for c in sample_claims(path) if c.track == 2] == [(2, "ctts", big)]
    path.write_bytes(_FTYP + _box(b"moov", _track(b"vide", [(4, 1)], 4) + _track(b"soun", [(big, 1024)], big)))
    assert {(c.box, c.samples) for c in sample_claims(path) if c.track == 2} == {("stts", big), ("stsz", big)}
    assert implausible_claim(path, path.stat().st_size) == SampleClaim(2, "stts", big)


def test_a_last_box_of_size_zero_runs_to_the_files_end_and_is_read(tmp_path):
    """(mutation review) A box of size 0 runs to the end of the file (ISO/IEC 14496-12), as a `moov`
    written last may: its claims are read, not taken for a broken size that ends the walk."""
    path = tmp_path / "open_ended.mp4"
    moov = _box(b"moov", _track(b"vide", [(1, 1)], 80_000_000))
    path.write_bytes(_FTYP + struct.pack(">I", 0) + moov[4:])
    assert implausible_claim(path, path.stat().st_size) == SampleClaim(1, "stsz", 80_000_000)


def test_a_file_that_starts_with_no_mp4_box_is_not_walked(tmp_path):
    """(mutation review) Its first box names what a file is: one that starts with another (an unknown
    type here, before boxes that would claim 80 million frames) is left to FFmpeg, unread."""
    path = tmp_path / "other.bin"
    moov = _box(b"moov", _track(b"vide", [(1, 1)], 80_000_000))
    path.write_bytes(_FTYP + moov)
    assert sample_claims(path)  # (as an MP4 it would be refused)
    path.write_bytes(_box(b"abcd", b"isom" + bytes(4) + b"isom") + moov)
    assert sample_claims(path) == [] and implausible_claim(path, path.stat().st_size) is None


def test_the_entries_of_a_table_summed_are_bounded(tmp_path, monkeypatch):
    """(mutation review) At most MAX_TABLE_BYTES of a `stts` table are read: the entries beyond are not
    summed (here 2 entries of 8 bytes, of 3)."""
    path = tmp_path / "table.mp4"
    path.write_bytes(_FTYP + _box(b"moov", _track(b"vide", [(5, 1), (7, 1), (1000, 1)], 12)))
    assert [(c.box, c.samples) for c in sample_claims(path)] == [("stts", 1012), ("stsz", 12)]
    monkeypatch.setattr(mp4_index, "MAX_TABLE_BYTES", 16)
    assert [(c.box, c.samples) for c in sample_claims(path)] == [("stts", 12), ("stsz", 12)]


def _padded(path: Path, data: bytes, size: int) -> Path:
    """`data` then a `free` box, `size` bytes in all: room for the samples a test's index claims."""
    path.write_bytes(data + _box(b"free", bytes(size - len(data) - 8)))
    return path


def test_a_video_track_claiming_more_frames_than_max_video_frames_is_refused_before_ffmpeg_opens_it(
        tmp_path, monkeypatch):
    """A claim the file's bytes could hold, of more frames than `sampling.max_video_frames`: FFmpeg took 786 MB
    and 8 s to open a 10 MB file claiming 10 million, which was then refused for its length. A sound track's
    samples are not frames (AAC has 47 a second): its claim is bounded by the bytes only."""
    path = _padded(tmp_path / "long.mp4", _FTYP + _box(b"moov", _track(b"vide", [(5000, 1)], 5000)), 6000)
    assert implausible_claim(path, 6000) is None and implausible_claim(path, 6000, max_frames=5000) is None
    assert implausible_claim(path, 6000, max_frames=4999) == SampleClaim(1, "stts", 5000)
    monkeypatch.setattr(av, "open", lambda *_, **__: pytest.fail("FFmpeg opened the file"))
    with pytest.raises(VideoDecodeError, match=r"long\.mp4: its MP4/MOV index claims 5,000 frames for its video "
                                               r"\(track 1's stts\), more than the limit of 4,999 frames per video "
                                               r"\(sampling\.max_video_frames\): refused before it is opened .*"
                                               r"raise the setting") as refused:
        probe(path, max_frames=4999)
    assert not refused.value.bad_file  # the setting's: raised, the video runs again
    _padded(path, _FTYP + _box(b"moov", _track(b"vide", [(4, 1)], 4) + _track(b"soun", [(5000, 1024)], 5000)), 6000)
    assert implausible_claim(path, 6000, max_frames=4999) is None


def test_a_fragmented_mp4s_truns_are_summed_track_by_track(tmp_path):
    """FFmpeg grows a track's index by every trun's count: 100 truns each claiming 1 million samples, in a
    file of 1 MB (each within its bytes), took 3.2 GB to open. Their sum per track is held to the bytes, and
    a video track's to `sampling.max_video_frames`."""
    path = _written(tmp_path / "fragments.mp4", "frag_keyframe+empty_moov")
    size = path.stat().st_size
    assert [(c.track, c.samples, c.handler) for c in sample_claims(path) if c.box == "truns"] == [(1, FRAMES, "vide")]
    assert implausible_claim(path, size, max_frames=FRAMES) is None
    assert implausible_claim(path, size, max_frames=FRAMES - 1) == SampleClaim(1, "truns", FRAMES)
    # each trun claiming a third of the file's bytes and one more: each could be true, not the three
    data = bytearray(path.read_bytes())
    for trun in re.finditer(b"trun", bytes(data)):
        data[trun.end() + 4:trun.end() + 8] = struct.pack(">I", size // 3 + 1)  # (after its version and flags)
    path.write_bytes(data)
    assert implausible_claim(path, size) == SampleClaim(1, "truns", 3 * (size // 3 + 1))
    with pytest.raises(VideoDecodeError, match=r"claims [\d,]+ frames or samples \(track 1's fragments, in all\)"):
        probe(path)


def test_tracks_claiming_more_samples_together_than_the_file_has_bytes_are_refused(tmp_path):
    """Each track's samples are bytes of their own: 20 video tracks each claiming 500,000 frames, in a file
    of 1 MB, took 561 MB and 4 s to open."""
    tracks = _track(b"vide", [(600, 1)], 600) + _track(b"soun", [(600, 1024)], 600)
    path = _padded(tmp_path / "tracks.mp4", _FTYP + _box(b"moov", tracks), 1000)
    assert implausible_claim(path, 1200) is None
    assert implausible_claim(path, 1199) == SampleClaim(0, "tracks", 1200)
    with pytest.raises(VideoDecodeError, match=r"claims 1,200 frames or samples \(all its tracks together\), "
                                               r"more than a file of 1,000 bytes can hold"):
        probe(path)


def test_fragments_are_summed_under_the_track_their_tfhd_names_by_its_tkhd_id(tmp_path):
    """(mutation review) A fragment's `tfhd` names its track by the ID in the track's `tkhd` (after 8-byte
    times in a version 1 `tkhd`, 4-byte ones in version 0), not by its place; each `traf` is of no track
    until its `tfhd` names one; a sound track's fragments count toward the bytes, never the frames, even
    where its samples are indexed by chunk (FFmpeg grows its index by each trun all the same)."""

    def trak(handler: bytes, track_id: int, version: int, stbl: bytes = b"") -> bytes:
        times = bytes(16) if version else bytes(8)  # (creation and modification times)
        tkhd = _box(b"tkhd", bytes([version, 0, 0, 0]) + times + struct.pack(">I", track_id) + bytes(60))
        hdlr = _full_box(b"hdlr", bytes(4) + handler + bytes(13))
        return _box(b"trak", tkhd + _box(b"mdia", hdlr + _box(b"minf", stbl)))

    def moof(track_id: int | None, samples: int) -> bytes:
        tfhd = _full_box(b"tfhd", struct.pack(">I", track_id)) if track_id is not None else b""
        return _box(b"moof", _box(b"traf", tfhd + _full_box(b"trun", struct.pack(">I", samples))))

    # the sound track's one stts entry of duration 1: indexed by chunk (QuickTime's PCM, IMA4)
    sound_stbl = _box(b"stbl", _full_box(b"stts", struct.pack(">III", 1, 1, 1))
                      + _full_box(b"stsz", struct.pack(">II", 0, 1)))
    for version in (0, 1):
        moov = _box(b"moov", trak(b"soun", 7, version, sound_stbl) + trak(b"vide", 3, version))
        fragments = moof(3, 300) + moof(7, 1000) + moof(None, 5) + moof(3, 300)
        path = _padded(tmp_path / f"tkhd_v{version}.mp4", _FTYP + moov + fragments, 2000)
        claims = sample_claims(path)
        assert [(c.track, c.samples, c.handler) for c in claims if c.box == "truns"] == \
            [(2, 600, "vide"), (1, 1000, "soun"), (0, 5, "")], version
        assert implausible_claim(path, 2000, max_frames=600) is None  # (the sound's 1,000 are no frames)
        assert implausible_claim(path, 2000, max_frames=599) == SampleClaim(2, "truns", 600)
        # each track's fragments within the bytes, not all of them together (600 + 1,000 + 5)
        assert implausible_claim(path, 1605) is None
        assert implausible_claim(path, 1604) == SampleClaim(0, "tracks", 1605)
