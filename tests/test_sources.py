"""Listing inputs: folders, files, globs, buckets, and stable video ids."""

import os

import fsspec
import pytest

from pipeline.sources import SourceError, list_videos


def _touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_folder_is_listed_recursively_by_extension(tmp_path):
    videos = ["a.mp4", "sub/b.MOV", "sub/deeper/c.webm", "d.mkv", "e.avi", "f.m4v", "g.mpg", "h.mpeg", "i.ts",
              "j.m2ts", "k.MTS", "l.3gp", "m.3G2", "n.flv", "o.f4v", "p.WMV", "q.asf", "r.mxf", "s.vob", "u.dv"]
    for name in (*videos, "notes.txt", "image.jpg", ".hidden.mp4", "sub/._b.MOV", ".cache/t.mp4"):
        _touch(tmp_path / name)
    names = sorted(os.path.basename(ref.uri) for ref in list_videos(str(tmp_path)))
    assert names == sorted(os.path.basename(name) for name in videos)


def test_single_file_and_glob(tmp_path):
    clip = _touch(tmp_path / "one.mp4")
    _touch(tmp_path / "two.mov")
    assert [ref.uri for ref in list_videos(str(clip))] == [str(clip)]
    assert [os.path.basename(r.uri) for r in list_videos(str(tmp_path / "*.mov"))] == ["two.mov"]
    _touch(tmp_path / "notes.txt")  # a glob matches any file: only videos are listed
    (tmp_path / "folder.mp4").mkdir()
    assert [os.path.basename(r.uri) for r in list_videos(str(tmp_path / "*"))] == ["one.mp4", "two.mov"]


def test_video_id_is_stable_and_changes_with_the_file(tmp_path):
    clip = _touch(tmp_path / "one.mp4", b"abc")
    first = next(list_videos(str(tmp_path))).video_id
    assert next(list_videos(str(tmp_path))).video_id == first
    clip.write_bytes(b"abcd")
    os.utime(clip, ns=(1, 2_000_000_000))
    assert next(list_videos(str(tmp_path))).video_id != first


def test_missing_source_says_what_to_give(tmp_path):
    with pytest.raises(SourceError, match="does not exist.*folder"):
        list(list_videos(str(tmp_path / "nowhere")))


def test_a_path_with_glob_characters_that_exists_is_that_folder_or_file(tmp_path):
    trip = _touch(tmp_path / "Trip [2019]" / "a.mp4")
    star = _touch(tmp_path / "odd" / "*star[1].mp4")
    _touch(tmp_path / "odd" / "s.mp4")
    assert [ref.uri for ref in list_videos(str(tmp_path / "Trip [2019]"))] == [str(trip)]
    assert [ref.uri for ref in list_videos(str(star))] == [str(star)]
    assert len(list(list_videos(str(tmp_path / "odd" / "*.mp4")))) == 2  # a pattern where no such file exists
    assert [ref.uri for ref in list_videos(str(tmp_path / "Trip [2019]" / "*.mp4"))] == [str(trip)]
    # removed, such a folder's videos are still its own, to be marked missing
    from pipeline.sources import source_scope

    for source in (tmp_path / "Trip [2019]", tmp_path / "Trip [2019]" / "*.mp4"):
        assert source_scope(str(source))(str(trip)) and not source_scope(str(source))(str(tmp_path / "Trip 2.mp4"))
    os.remove(trip)
    os.rmdir(tmp_path / "Trip [2019]")
    assert source_scope(str(tmp_path / "Trip [2019]"))(str(trip))
    assert list(list_videos(str(tmp_path / "Trip [2019]"))) == []
    # a glob whose folder does not exist is a mistyped source, not an empty one
    with pytest.raises(SourceError, match="nowhere' it matches in does not exist"):
        list(list_videos(str(tmp_path / "nowhere" / "*.mp4")))


def test_a_source_with_dotdot_names_its_videos_as_any_other_run(tmp_path):
    # "videos/../videos" kept the "..": a second URI and video_id for the same file
    from pipeline.schedule import Schedule
    from pipeline.sources import source_scope

    clip = _touch(tmp_path / "videos" / "a.mp4")
    roundabout = str(tmp_path / "videos" / ".." / "videos")
    assert [(r.uri, r.video_id) for r in list_videos(roundabout)] == [
        (str(clip), r.video_id) for r in list_videos(str(tmp_path / "videos"))]
    assert [r.uri for r in list_videos(f"{roundabout}/*.mp4")] == [str(clip)]
    # an output made with "..": its videos are the source's, to be marked missing (listed anew)
    assert source_scope(str(tmp_path / "videos"))(f"{roundabout}/a.mp4")
    assert source_scope(roundabout)(str(clip)) and not source_scope(roundabout)(str(tmp_path / "other.mp4"))
    assert f" {tmp_path}/videos " in " ".join(Schedule(roundabout, str(tmp_path / "out"), at="02:00").command()) + " "


def test_a_file_whose_name_is_not_utf8_is_left_out_with_a_warning(tmp_path, caplog):
    good = _touch(tmp_path / "good.mp4")
    _touch(tmp_path / os.fsdecode(b"bad\xffname.mp4"))
    assert [ref.uri for ref in list_videos(str(tmp_path))] == [str(good)]
    assert "bad\\xffname.mp4: left out: its name is not UTF-8" in caplog.text


def test_symlink_loop_does_not_hang(tmp_path):
    _touch(tmp_path / "a.mp4")
    os.symlink(tmp_path, tmp_path / "loop")
    assert len(list(list_videos(str(tmp_path)))) == 1


def test_a_doublestar_glob_does_not_follow_linked_folders(tmp_path):
    # glob's "**" went down a link to a folder above to the kernel's 40 links: a.mp4 listed 41
    # times here; two such links made 2**40 paths, a listing without end
    _touch(tmp_path / "in" / "a.mp4")
    _touch(tmp_path / "in" / "sub" / "b.mp4")
    _touch(tmp_path / "elsewhere" / "c.mp4")
    os.symlink("..", tmp_path / "in" / "sub" / "loop")
    os.symlink("../elsewhere", tmp_path / "in" / "linked")
    os.symlink("a.mp4", tmp_path / "in" / "link.mp4")  # a linked file is listed, as in a folder's walk
    listed = [ref.uri for ref in list_videos(str(tmp_path / "in" / "**" / "*.mp4"))]
    assert listed == [str(tmp_path / "in" / name) for name in ("a.mp4", "link.mp4", "sub/b.mp4")]
    assert listed == [ref.uri for ref in list_videos(str(tmp_path / "in"))]
    # a wildcard that names a linked folder goes into it, as glob does: once, never down a loop
    assert [ref.uri for ref in list_videos(str(tmp_path / "in" / "*" / "*.mp4"))] == \
        [str(tmp_path / "in" / name) for name in ("linked/c.mp4", "sub/b.mp4")]


def test_bucket_listing_through_fsspec():
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/videos/a.mp4", b"123")
    fs.pipe("/bucket/videos/sub/b.mkv", b"4567")
    fs.pipe("/bucket/videos/readme.txt", b"no")
    refs = list(list_videos("memory://bucket/videos"))
    assert [r.uri for r in refs] == ["memory:///bucket/videos/a.mp4", "memory:///bucket/videos/sub/b.mkv"]
    assert [r.size_bytes for r in refs] == [3, 4]


def test_a_local_uri_not_in_its_listed_form_is_not_still_there(tmp_path, monkeypatch):
    # an older output's URI with ".." (or relative, or a file: URL) is not the name a listing
    # gives the file: it is marked missing and listed anew under its own name, not kept as well
    from pipeline.sources import still_there

    clip = _touch(tmp_path / "videos" / "a.mp4")
    assert still_there(str(clip))
    assert not still_there(str(tmp_path / "videos" / ".." / "videos" / "a.mp4"))
    assert not still_there(clip.as_uri())
    monkeypatch.chdir(tmp_path)
    assert not still_there(os.path.join("videos", "a.mp4"))
    assert not still_there(str(tmp_path / "videos" / "gone.mp4"))


class _Bucket:
    """An S3 store as s3fs reaches it: no object at the source's own key, and `list_objects_v2`
    answering a prefix with the keys that start with it (one page); `served` holds the keys it sent."""

    def __init__(self, bucket: str, keys: list[str]):
        self.bucket, self.keys, self.served = bucket, sorted(keys), []

    def info(self, path):
        raise FileNotFoundError(path)

    def exists(self, path):
        return any(f"{self.bucket}/{key}".startswith(path) for key in self.keys)

    def call_s3(self, method, **request):
        assert method == "list_objects_v2" and request["Bucket"] == self.bucket
        keys = [key for key in self.keys if key.startswith(request["Prefix"])]
        self.served += keys
        return {"Contents": [{"Key": key, "Size": 1, "ETag": '"e"', "LastModified": None} for key in keys],
                "IsTruncated": False}


def test_a_bucket_prefix_is_listed_as_a_folder_not_as_the_start_of_a_name(monkeypatch):
    # s3://B/in is the folder in/: the store is asked for "in/", so the keys of inbox/ (a
    # sibling of any size) are neither listed nor paged through
    from pipeline import sources

    store = _Bucket("B", ["in/a.mp4", "in/sub/b.mp4", "in.mp4", "inbox/c.mp4", "inbox/d.mp4"])
    monkeypatch.setattr(sources, "open_filesystem", lambda source, storage=None: (store, source.split("://")[1]))
    for source in ("s3://B/in", "s3://B/in/"):
        store.served.clear()
        assert [ref.uri for ref in list_videos(source)] == ["s3://B/in/a.mp4", "s3://B/in/sub/b.mp4"]
        assert store.served == ["in/a.mp4", "in/sub/b.mp4"]
    # the bucket itself: every key
    assert len(list(list_videos("s3://B"))) == 5


def test_a_bucket_named_by_an_alias_lists_its_videos_under_one_uri(monkeypatch):
    # s3a:// (Spark's name for s3://) and gcs:// gave the same object another URI, so another
    # video_id: an output fed by both held its videos twice, each processed twice
    from pipeline import sources
    from pipeline.sources import as_listed, source_scope

    store = _Bucket("B", ["in/a.mp4"])
    monkeypatch.setattr(sources, "open_filesystem", lambda source, storage=None: (store, source.split("://")[1]))
    assert [(r.uri, r.video_id) for r in list_videos("S3A://B/in")] == [(r.uri, r.video_id) for r in
                                                                       list_videos("s3://B/in")]
    assert [r.uri for r in list_videos("s3a://B/in/")] == ["s3://B/in/a.mp4"]
    assert as_listed("gcs://b/x.mp4") == "gs://b/x.mp4" and as_listed("s3a://b/x.mp4") == "s3://b/x.mp4"
    # an output's videos listed under the alias before: in the scope of the source, so marked missing
    assert source_scope("s3://B/in")("s3a://B/in/a.mp4") and source_scope("gs://b")("gcs://b/x.mp4")
    assert not source_scope("s3://B/in")("s3a://B/inbox/a.mp4")
