"""A bucket's video copied to a local file: downloads, the copy kept for the next stage, and
the copy a Ray decode task hands on to its node's sample task."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import fsspec
import pytest

from workers import remote_copy
from workers.decode import probe
from workers.remote_copy import drop_download, local_copy
from workers.synthetic import indexed_frames, write_video

COUNT = 30  # frames in the clip


@pytest.fixture(scope="module")
def indexed_clip(tmp_path_factory) -> Path:
    """A small H.264 clip to copy."""
    return write_video(tmp_path_factory.mktemp("clips") / "indexed.mp4", indexed_frames(COUNT, 64, 36), fps=25, gop=8)


def test_local_paths_are_used_as_they_are(indexed_clip):
    with local_copy(str(indexed_clip)) as path:
        assert path == str(indexed_clip)
    with local_copy(f"file://{indexed_clip}") as path:
        assert path == str(indexed_clip)


def test_remote_uris_are_downloaded_to_a_temporary_file(indexed_clip):
    memory = fsspec.filesystem("memory")
    with memory.open("/vidlens-test/clip.mp4", "wb") as remote:
        remote.write(indexed_clip.read_bytes())
    try:
        with local_copy("memory://vidlens-test/clip.mp4") as path:
            assert path.endswith(".mp4") and Path(path).read_bytes() == indexed_clip.read_bytes()
            assert probe(path).frame_count == COUNT
        assert not Path(path).exists()
    finally:
        memory.rm("/vidlens-test", recursive=True)


def test_a_first_download_deletes_those_of_processes_killed_outright(tmp_path, monkeypatch):
    """A nightly run killed with SIGKILL (the OOM killer, a supervisor's stop timeout) left its
    downloads in the temp folder for good: up to `download_ahead_bytes` a night."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    old = time.time() - remote_copy.ORPHAN_MIN_AGE_S - 60
    tag = remote_copy._space_tag()
    names = {"orphan": f"vidlens-{dead}-{tag}-ab3_xyz9.mp4", "orphan_no_extension": f"vidlens-{dead}-{tag}-q1w2e3r4",
             "recent": f"vidlens-{dead}-{tag}-recent12.mp4", "running": f"vidlens-{os.getpid()}-{tag}-mine1234.mp4",
             # a container's sharing the folder: its pids are another namespace's
             "elsewhere": f"vidlens-{dead}-0badc0de-x1y2z3w4.mp4", "other": "vidlens-notes.mp4"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key != "recent":
            os.utime(tmp_path / name, (old, old))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(remote_copy, "_ORPHANS_DELETED", [])
    memory = fsspec.filesystem("memory")
    memory.pipe("/vidlens-orphans/a.mp4", b"video")
    try:
        path = remote_copy.download("memory://vidlens-orphans/a.mp4", None)
    finally:
        memory.rm("/vidlens-orphans", recursive=True)
    assert Path(path).parent == tmp_path and Path(path).name.startswith(f"vidlens-{os.getpid()}-{tag}-")
    left = {p.name for p in tmp_path.iterdir()} - {Path(path).name}
    assert left == {names["recent"], names["running"], names["elsewhere"], names["other"]}
    # where the boot and pid namespace cannot be told (some sandboxes), every container's tag is
    # the same: nothing is swept
    (tmp_path / names["orphan"]).write_bytes(b"x")
    os.utime(tmp_path / names["orphan"], (old, old))
    monkeypatch.setattr(remote_copy, "_ORPHANS_DELETED", [])
    monkeypatch.setattr(remote_copy, "pid_space", lambda: "")
    memory.pipe("/vidlens-orphans/a.mp4", b"video")
    try:
        remote_copy.download("memory://vidlens-orphans/a.mp4", None)
    finally:
        memory.rm("/vidlens-orphans", recursive=True)
    assert (tmp_path / names["orphan"]).exists()


def test_a_remote_video_is_downloaded_once_for_both_stages_that_read_it(indexed_clip):
    """The decode and the sample stage each read a video, one after the other in one worker."""
    memory = fsspec.filesystem("memory")
    memory.pipe("/vidlens-kept/a.mp4", indexed_clip.read_bytes())
    memory.pipe("/vidlens-kept/b.mp4", indexed_clip.read_bytes())
    version = (indexed_clip.stat().st_size, None, "etag-1")
    try:
        with local_copy("memory://vidlens-kept/a.mp4", None, version) as first:
            assert Path(first).read_bytes() == indexed_clip.read_bytes()
        assert Path(first).exists()  # kept for the next stage
        memory.rm("/vidlens-kept/a.mp4")  # so a second download would fail
        with local_copy("memory://vidlens-kept/a.mp4", None, version) as again:
            assert again == first and probe(again).frame_count == COUNT
        # another version of the same object is downloaded again, never the kept copy
        with pytest.raises(FileNotFoundError, match="vidlens-kept/a.mp4 does not exist"):
            with local_copy("memory://vidlens-kept/a.mp4", None, (1, None, "etag-2")):
                pass
        # the next video's download replaces the kept copy: one video's copy per process at most
        with local_copy("memory://vidlens-kept/b.mp4", None, version) as second:
            assert second != first and Path(second).exists()
        assert not Path(first).exists()
        drop_download()
        assert not Path(second).exists()
    finally:
        drop_download()
        memory.rm("/vidlens-kept", recursive=True)


def test_a_kept_copy_handed_on_stays_within_its_budget_and_age(indexed_clip, tmp_path, monkeypatch):
    """A Ray decode task hands its copy on for the sample task after the shot detector
    (`hand_on_download`): the node's handed-on copies stay within the bytes given, and one left
    longer than `HANDED_MAX_AGE_S` (its sample task ran on another node) is deleted."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    memory = fsspec.filesystem("memory")
    for name in ("a", "b", "c"):
        memory.pipe(f"/vidlens-handed-test/{name}.mp4", indexed_clip.read_bytes())
    size = indexed_clip.stat().st_size
    version = (size, None, "etag-1")

    def kept(name: str) -> str:
        with local_copy(f"memory://vidlens-handed-test/{name}.mp4", None, version) as path:
            return path

    try:
        first = kept("a")
        assert remote_copy.hand_on_download("memory://vidlens-handed-test/a.mp4", None, (1, None, "etag-2"), 10**9) is None
        assert remote_copy.hand_on_download("memory://vidlens-handed-test/b.mp4", None, version, 10**9) is None
        handed = remote_copy.hand_on_download("memory://vidlens-handed-test/a.mp4", None, version, 1)  # the first: always
        assert handed == str(tmp_path / remote_copy.HANDED_FOLDER / Path(first).name) and not Path(first).exists()
        assert probe(handed).frame_count == COUNT and not remote_copy._LAST_DOWNLOAD  # no longer this process's to delete
        second = kept("b")
        assert remote_copy.hand_on_download("memory://vidlens-handed-test/b.mp4", None, version, 2 * size - 1) is None
        assert Path(second).exists() and remote_copy._LAST_DOWNLOAD["path"] == second  # deleted as a download of its own
        handed_b = remote_copy.hand_on_download("memory://vidlens-handed-test/b.mp4", None, version, 2 * size)
        assert Path(handed).exists() and Path(handed_b).exists()
        old = time.time() - remote_copy.HANDED_MAX_AGE_S - 60
        os.utime(handed, (old, old))
        kept("c")
        handed_c = remote_copy.hand_on_download("memory://vidlens-handed-test/c.mp4", None, version, 2 * size)
        assert handed_c is not None and not Path(handed).exists() and Path(handed_b).exists()
        # a folder it cannot use (another user's, say): the copy stays this process's, the video decodes on
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / remote_copy.HANDED_FOLDER).write_text("not a folder")
        monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
        kept_a = kept("a")
        assert remote_copy.hand_on_download("memory://vidlens-handed-test/a.mp4", None, version, 2 * size) is None
        assert remote_copy._LAST_DOWNLOAD["path"] == kept_a and Path(kept_a).exists()
    finally:
        drop_download()
        memory.rm("/vidlens-handed-test", recursive=True)


def test_a_copy_handed_on_ages_from_its_hand_on_and_only_in_a_private_folder_of_the_users(tmp_path, monkeypatch):
    """A copy's hour counted from its download (the file's time), so one whose decode took long
    (shot detection reads every frame) was deleted by the next copy handed on, before its
    sample task came. And the folder's name is fixed in the shared temp folder: a link another
    user made there to a folder of this user's had every file there older than an hour deleted."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    memory = fsspec.filesystem("memory")
    for name in ("a", "b", "c"):
        memory.pipe(f"/vidlens-handed-age/{name}.mp4", b"0" * 100)
    version = (100, None, "etag")

    def handed_on(name: str, age_s: float = 0.0) -> str | None:
        with local_copy(f"memory://vidlens-handed-age/{name}.mp4", None, version) as path:
            then = time.time() - age_s
            os.utime(path, (then, then))
        return remote_copy.hand_on_download(f"memory://vidlens-handed-age/{name}.mp4", None, version, 10**6)

    try:
        slow = handed_on("a", age_s=2 * remote_copy.HANDED_MAX_AGE_S)  # downloaded 2 hours ago, handed on now
        assert handed_on("b") is not None and Path(slow).exists()
        # a link in the temp folder to a folder elsewhere: not used, and nothing deleted there
        for path in (temp / remote_copy.HANDED_FOLDER).iterdir():
            path.unlink()
        (temp / remote_copy.HANDED_FOLDER).rmdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "notes.txt").write_text("kept")
        old = time.time() - 2 * remote_copy.HANDED_MAX_AGE_S
        os.utime(elsewhere / "notes.txt", (old, old))
        (temp / remote_copy.HANDED_FOLDER).symlink_to(elsewhere)
        assert handed_on("c") is None and (elsewhere / "notes.txt").exists()
        assert remote_copy._LAST_DOWNLOAD and Path(remote_copy._LAST_DOWNLOAD["path"]).exists()  # deleted as its own
        # one of the user's that others may write to is made private first
        (temp / remote_copy.HANDED_FOLDER).unlink()
        (temp / remote_copy.HANDED_FOLDER).mkdir()
        os.chmod(temp / remote_copy.HANDED_FOLDER, 0o777)
        assert handed_on("c") is not None and (os.stat(temp / remote_copy.HANDED_FOLDER).st_mode & 0o777) == 0o700
    finally:
        drop_download()
        memory.rm("/vidlens-handed-age", recursive=True)


def test_a_download_that_fills_the_temp_folder_says_so_and_leaves_no_copy(indexed_clip, tmp_path, monkeypatch):
    """A bucket's video whose copy meets a full temp folder: its errors row says what ran out and
    where to free space, first (it read "cannot download ...: OSError: [Errno 28] ..." alone), it is
    no bad file's (runs never give up on it for that), and its part copy is deleted."""
    import errno

    from fsspec.implementations.memory import MemoryFileSystem

    from schemas.config import RunConfig
    from workers.sampling import DecodeStage
    from workers.task import VideoRef, VideoTask

    memory = fsspec.filesystem("memory")
    memory.pipe("/vidlens-full/a.mp4", indexed_clip.read_bytes())

    def disk_full(self, remote, local, **kwargs):
        with open(local, "wb") as copy:
            copy.write(b"part of it")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(MemoryFileSystem, "get_file", disk_full)
    task = VideoTask(ref=VideoRef("memory://vidlens-full/a.mp4", indexed_clip.stat().st_size, None, "etag-1", "a"))
    try:
        DecodeStage(RunConfig()).run([task])
    finally:
        drop_download()
        memory.rm("/vidlens-full", recursive=True)
    [error] = task.errors
    assert (error.stage, error.error_type, error.bad_file) == ("decode", "StorageError", False)
    assert error.message.startswith(f"no space left on device: free space in the temp folder ({tmp_path}, set by "
                                    "TMPDIR) or the output's folder: cannot download memory://vidlens-full/a.mp4")
    assert list(tmp_path.iterdir()) == []
