"""Shared fixtures: tiny random models saved with save_pretrained, and synthetic clips."""

import faulthandler
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


def pytest_configure(config):
    global _STDERR
    _STDERR = os.dup(sys.stderr.fileno())  # the terminal's, not a test's captured output
    _check_xdist_groups(config)


def _check_xdist_groups(config) -> None:
    """pytest-xdist groups the tests (`--dist loadgroup`) by a suffix it adds to each test's id.
    pytest 9.2 keeps the id where xdist 3.8 does not add it: every test is then given out alone,
    its file's module fixtures built on both workers, the in-process Ray tests among the others.
    Refused, rather than run on a schedule that pytest_collection_modifyitems does not describe."""
    if getattr(config.option, "dist", "no") != "loadgroup" or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from importlib.metadata import version

    def release(package: str) -> tuple:
        return tuple(int(part) for part in version(package).split(".")[:2] if part.isdigit())

    if release("pytest") >= (9, 2) and release("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} does not "
                                "group the tests by file: pip install -e '.[test]' (pytest below 9.2), or add -n 0")


def _worker_temp_dir() -> None:
    """Under pytest-xdist (`-n 2`), each worker's temp folder is one of its own: Ray keeps its
    sessions there and joins the cluster a `ray start` there left running, and some tests check
    that no temp copy is left behind. Both stay apart from another worker's tests."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    folder = os.path.join(tempfile.gettempdir(), f"vidlens-{worker}")  # (short: Ray's sockets are under it)
    os.makedirs(folder, exist_ok=True)
    os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = tempfile.tempdir = folder


_worker_temp_dir()


@pytest.hookimpl(tryfirst=True)  # (before pytest-xdist's, which groups the tests by their mark)
def pytest_collection_modifyitems(items):
    """The tests on an in-process Ray instance (test_cluster's `local_ray`) run last: its shutdown
    leaves Ray's native threads (gRPC's, its GCS client's) in pytest's process, and later tests
    fork decode children and pool workers from it.

    Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml's addopts), a worker runs a test
    file's tests together, so that its module fixtures are built once. The `local_ray` tests are
    given out last, as two groups, every other one in each: both workers end on a Ray instance
    of their own, neither waiting alone for the other's."""
    items.sort(key=lambda item: "local_ray" in getattr(item, "fixturenames", ()))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        on_ray = 0
        for item in items:
            if "local_ray" in getattr(item, "fixturenames", ()):
                group, on_ray = f"local_ray_{on_ray % 2}", on_ray + 1
            else:
                group = item.path.name
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def fault_handler():
    """Python's fault handler armed again after each test. Ray's driver takes over the fatal
    signals and its shutdown sets them back to their defaults: without this, a native crash in
    any later test (a decoder, Ray's own threads) would end pytest with no word of where."""
    yield
    faulthandler.disable()
    faulthandler.enable(file=_STDERR, all_threads=True)


@pytest.fixture(autouse=True)
def no_ray_connection_noted():
    """A test's note that its command connected Ray (`ray_cluster.ensure_ray` called with a stand-in
    `ray.init`, or `note_connected`) forgotten after it: a later test's command would take that Ray for
    its own and shut it down."""
    yield
    ray_cluster = sys.modules.get("pipeline.ray_cluster")
    if ray_cluster is not None:
        ray_cluster.disconnected()


@pytest.fixture(scope="session", autouse=True)
def text_cache(tmp_path_factory):
    """Encoded label vocabularies go to a folder of the session's, not the user's ~/.cache."""
    previous = os.environ.get("VIDLENS_CACHE_DIR")
    os.environ["VIDLENS_CACHE_DIR"] = str(tmp_path_factory.mktemp("vidlens-cache"))
    yield Path(os.environ["VIDLENS_CACHE_DIR"])
    if previous is None:
        os.environ.pop("VIDLENS_CACHE_DIR", None)
    else:
        os.environ["VIDLENS_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def fresh_decode_children():
    """Each test's decoding starts in a child forked after its own monkeypatching, not an earlier test's."""
    yield
    from workers.guard import stop_children

    stop_children()


@pytest.fixture(scope="module")
def miscounted_flv(tmp_path_factory) -> Path:
    """A damaged FLV that decord counts 28 frames of and fails midway in; PyAV counts 29 (`tests.corpus.
    decord_counts_fewer`): a failover from decord to PyAV where the two number the frames differently."""
    from tests.corpus import decord_counts_fewer
    from workers.decode import probe
    from workers.frame_sources import DecordSource
    from workers.pyav_source import PyAVSource

    path = decord_counts_fewer(tmp_path_factory.mktemp("clips") / "miscounted.flv")
    with DecordSource(path, probe(path)) as decord_source, PyAVSource(path, probe(path)) as pyav_source:
        assert (decord_source.frame_count, pyav_source.frame_count) == (28, 29)  # (the file as these tests need it)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders of a tiny CLIP and a tiny GIT, loaded by the product through from_pretrained."""
    from workers.tiny_captions import build_tiny_git
    from workers.tiny_models import build_tiny_clip

    root = tmp_path_factory.mktemp("models")
    return {"embed": str(build_tiny_clip(root / "clip")), "captions": str(build_tiny_git(root / "git"))}


@pytest.fixture(scope="session")
def synthetic_clips(tmp_path_factory):
    """A folder of synthetic clips with known content: cuts at 30 and 60, text, frame indices."""
    from workers.synthetic import indexed_frames, scene_frames, text_frames, write_video

    folder = tmp_path_factory.mktemp("clips")
    write_video(folder / "cuts.mp4", scene_frames([30, 60], 90, 160, 96), fps=25)
    write_video(folder / "text.mp4", text_frames("HELLO VIDLENS", 30, 480, 200, 1.5), fps=15, with_audio=True)
    (folder / "sub").mkdir()
    write_video(folder / "sub" / "order.mkv", indexed_frames(40), fps=20)
    return folder


@pytest.fixture(scope="session")
def shared_videos():
    """The real clips in ../shared/videos (read-only; copy before changing one)."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"{SHARED_VIDEOS} is not present")
    return SHARED_VIDEOS


@pytest.fixture
def clip_folder(tmp_path, synthetic_clips):
    """A private copy of the synthetic clips that a test may add to or break."""
    target = tmp_path / "videos"
    shutil.copytree(synthetic_clips, target)
    return target
