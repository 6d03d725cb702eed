"""The local executor: CPU stages in a pool of worker processes, model stages on threads, batches overlapping."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import cpu_pool, local, pool_worker
from pipeline.job import run_job
from pipeline.cpu_pool import CpuPool
from pipeline.local import Segment, run_pipelined, split_plan
from pipeline.plan import build_plan
from schemas.config import RunConfig
from workers import sampling
from workers.guard import fork_available
from workers.sampling import DecodeStage
from workers.stage import Stage
from workers.task import VideoRef, VideoTask

CPU_SECONDS = 0.2
MODEL_SECONDS = 0.3


class SlowCpuStage(Stage):
    """Stands in for decoding: sleeps, and notes when it ran on which process."""

    name = "slow_cpu"

    def __init__(self, config):
        pass

    def process(self, tasks):
        import os

        for task in tasks:
            start = time.time()
            time.sleep(CPU_SECONDS)
            task.timings.update(cpu_start=start, cpu_end=time.time(), cpu_pid=float(os.getpid()))


class SlowModelStage(Stage):
    """Stands in for a model: sleeps once per batch, and notes when."""

    name = "slow_model"

    def process(self, tasks):
        start = time.time()
        time.sleep(MODEL_SECONDS)
        for task in tasks:
            task.timings.update(model_start=start, model_end=time.time(), model_batch=float(len(tasks)))


def _tasks(count: int) -> list[VideoTask]:
    return [VideoTask(ref=VideoRef(uri=f"/videos/{i:02d}.mp4", size_bytes=1, mtime_ns=0, etag=None, video_id=f"v{i:02d}"))
            for i in range(count)]


def _segments() -> list[Segment]:
    return [Segment("slow_cpu", cpu=0), Segment("slow_model", stage=SlowModelStage())]


@pytest.mark.parametrize("method", ["fork", "forkserver", "thread"] if fork_available() else ["thread"])
def test_decoding_overlaps_inference_and_videos_decode_at_once(method):
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=4, start_method=method)
    tasks = list(run_pipelined(iter(_tasks(16)), _segments(), pool, batch_size=4))

    assert [t.ref.uri for t in tasks] == [t.ref.uri for t in _tasks(16)]  # every video, in order
    assert all(t.timings["model_batch"] == 4 for t in tasks)
    batches = [tasks[i : i + 4] for i in range(0, 16, 4)]
    # the videos of a batch decode at the same time, on several workers
    assert any(a.timings["cpu_start"] < b.timings["cpu_end"] and b.timings["cpu_start"] < a.timings["cpu_end"]
               for batch in batches for a in batch for b in batch if a is not b)
    if method != "thread":
        assert len({t.timings["cpu_pid"] for t in tasks}) > 1
    # while the model works on one batch, a later batch is decoding
    overlaps = [
        later.timings["cpu_start"] < batch[0].timings["model_end"]
        and later.timings["cpu_end"] > batch[0].timings["model_start"]
        for batch, next_batch in zip(batches, batches[1:]) for later in next_batch
    ]
    assert any(overlaps)


def test_a_failing_listing_reaches_the_caller_and_stops_the_pipeline():
    def listing():
        yield from _tasks(5)
        raise OSError("the bucket went away")

    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="thread")
    seen = []
    with pytest.raises(OSError, match="the bucket went away"):
        for task in run_pipelined(listing(), _segments(), pool, batch_size=2):
            seen.append(task)
    assert len(seen) <= 5


def test_a_batch_decoded_goes_on_without_waiting_for_the_next_to_come():
    """A CPU stage passes a batch on once it is decoded, not when the next comes: after shot detection
    that was a whole model batch later (and from a listing that pauses, the listing's next page)."""
    more = threading.Event()

    def listing():
        yield from _tasks(2)
        # (the listing pauses until the first batch is out; it came out only with the next batch)
        if not more.wait(timeout=30):
            raise TimeoutError("the first batch did not come out while the listing paused")
        yield from _tasks(4)[2:]

    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="thread")
    seen = []
    for task in run_pipelined(listing(), _segments(), pool, batch_size=2):
        seen.append((task.ref.video_id, more.is_set()))
        if len(seen) == 2:
            more.set()
    assert seen == [("v00", False), ("v01", False), ("v02", True), ("v03", True)]


#: per video, set as the gated CPU stage starts it and as it ends it
_DECODE_STARTED: dict[str, threading.Event] = {}
_DECODED: dict[str, threading.Event] = {}


class GatedCpuStage(Stage):
    """Stands in for decoding: v00 ends only once v02 has started (30 s at most), and notes whether it had."""

    name = "gated_cpu"

    def __init__(self, config):
        pass

    def process(self, tasks):
        for task in tasks:
            _DECODE_STARTED[task.ref.video_id].set()
            if task.ref.video_id == "v00":
                task.timings["v02_started_meanwhile"] = float(_DECODE_STARTED["v02"].wait(timeout=30))
            _DECODED[task.ref.video_id].set()


def test_a_cpu_stage_takes_the_next_batch_while_a_video_of_its_batch_decodes():
    """(mutation review) While a batch decodes, the next one that comes is taken and decoded beside it: a
    worker that ended its video does not wait for the batch's slowest, with a listing that is slow too (the
    stage gave up taking when one video of its batch was done, or took the next only once the batch was)."""
    for video_id in ("v00", "v01", "v02", "v03"):
        _DECODE_STARTED[video_id], _DECODED[video_id] = threading.Event(), threading.Event()

    def listing():
        yield from _tasks(2)
        # (the next batch comes after the stage has polled the listing empty, v01 decoded and v00 not)
        if not _DECODED["v01"].wait(timeout=30):
            raise TimeoutError("v01 was not decoded")
        time.sleep(3 * local._POLL_S)
        yield from _tasks(4)[2:]

    pool = CpuPool(RunConfig(), [(f"{__name__}:GatedCpuStage",)], workers=2, start_method="thread")
    tasks = {task.ref.video_id: task for task in run_pipelined(listing(), [Segment("gated_cpu", cpu=0)], pool,
                                                                batch_size=2)}
    assert sorted(tasks) == ["v00", "v01", "v02", "v03"]
    assert tasks["v00"].timings["v02_started_meanwhile"] == 1.0


def test_a_video_to_run_alone_gets_a_batch_of_its_own():
    """A video marked `alone` (it failed as a whole last time, maybe breaking the GPU) goes
    through the pipeline in a batch of its own: the batch being filled before it is sent short,
    and the videos after it start a new one, so no batch mate fails with it either way."""
    import queue

    tasks = _tasks(5)
    tasks[1].alone = True
    out: queue.Queue = queue.Queue()
    local._feed(iter(tasks), 3, out, threading.Event())
    batches = []
    while not isinstance(item := out.get_nowait(), local._End):
        batches.append([task.ref.video_id for task in item])
    assert batches == [["v00"], ["v01"], ["v02", "v03", "v04"]]


def test_the_first_batch_goes_in_pieces_each_twice_the_last():
    """With `first`, the first batch's videos go in pieces of `first`, then each twice the last, the last
    piece what is left: the first results come out after a small batch's models, not a full one's (a full
    batch of shot detection is seconds on a CPU), and the batches after hold the videos they would have
    held. A video to run alone still gets a batch of its own, the pieces going on after it."""
    import queue

    def batches(tasks, first):
        out: queue.Queue = queue.Queue()
        local._feed(iter(tasks), 8, out, threading.Event(), first)
        sent = []
        while not isinstance(item := out.get_nowait(), local._End):
            sent.append([task.ref.video_id for task in item])
        return sent

    assert [len(batch) for batch in batches(_tasks(30), 2)] == [2, 4, 2, 8, 8, 6]
    assert [len(batch) for batch in batches(_tasks(30), 3)] == [3, 5, 8, 8, 6]
    assert [len(batch) for batch in batches(_tasks(30), 1)] == [1, 2, 4, 1, 8, 8, 6]
    assert [len(batch) for batch in batches(_tasks(12), None)] == [8, 4]  # (no pieces: the batch size from the first)
    assert [len(batch) for batch in batches(_tasks(12), 20)] == [8, 4]
    assert [len(batch) for batch in batches(_tasks(5), 2)] == [2, 3]
    tasks = _tasks(12)
    tasks[3].alone = True
    assert batches(tasks, 2) == [["v00", "v01"], ["v02"], ["v03"], ["v04", "v05", "v06", "v07"],
                                 ["v08", "v09", "v10", "v11"]]


def test_the_first_batchs_pieces_lose_no_video_send_no_empty_batch_and_leave_the_batches_after_as_before():
    """(mutation review) Random runs of videos, some to run alone, against the batches of the code before
    the pieces: every video once and in order, no batch empty (a video to run alone first, or two in a
    row, sent an empty batch where the batch being filled was not checked), each alone in a batch of its
    own, none over the batch size; the first `batch_size` videos in pieces of `first`, then each twice the
    last (where none runs alone), and the batches after them those the code before sent for them."""
    import queue
    import random

    def batches(tasks, batch_size, first=None):
        out: queue.Queue = queue.Queue()
        local._feed(iter(tasks), batch_size, out, threading.Event(), first)
        sent = []
        while not isinstance(item := out.get_nowait(), local._End):
            sent.append(item)
        return sent

    def before(tasks, batch_size):  # (the code before the pieces)
        sent, batch = [], []
        for task in tasks:
            if task.alone and batch:
                sent, batch = [*sent, batch], []
            batch.append(task)
            if len(batch) >= batch_size or task.alone:
                sent, batch = [*sent, batch], []
        return sent + [batch] if batch else sent

    def pieces(count, first, batch_size):
        sizes, left, size = [], min(count, batch_size), first
        while left:
            sizes.append(min(size, left))
            left, size = left - sizes[-1], 2 * size
        return sizes

    def ids(sent):
        return [[task.ref.video_id for task in batch] for batch in sent]

    chance = random.Random(20261208)
    for _ in range(400):
        tasks, batch_size = _tasks(chance.randrange(0, 26)), chance.randrange(1, 10)
        first = chance.choice([None, 0, *range(1, batch_size + 2)])
        for task in tasks:
            task.alone = chance.random() < 0.2
        sent = batches(tasks, batch_size, first)
        case = (batch_size, first, [task.alone for task in tasks], ids(sent))
        assert [task for batch in sent for task in batch] == tasks, case
        assert all(0 < len(batch) <= batch_size for batch in sent), case
        assert all(len(batch) == 1 for batch in sent for task in batch if task.alone), case
        if not first or first >= batch_size:
            assert ids(sent) == ids(before(tasks, batch_size)), case
            continue
        head = 0
        while head < len(sent) and sum(map(len, sent[:head])) < min(len(tasks), batch_size):
            head += 1
        assert sum(map(len, sent[:head])) == min(len(tasks), batch_size), case  # (no piece past the first batch)
        assert ids(sent[head:]) == ids(before(tasks[batch_size:], batch_size)), case
        if not any(task.alone for task in tasks[:batch_size]):
            assert [len(batch) for batch in sent[:head]] == pieces(len(tasks), first, batch_size), case


def test_a_local_run_starts_with_one_video_per_decode_worker(monkeypatch, tiny_models, clip_folder, tmp_path):
    """`run_local` sends its first batch in pieces from the pool's size up: with 2 decode workers and
    batches of 8, the model stage sees 2 videos, then 4, then the first batch's last 2, then the rest."""
    import shutil

    for copy in range(7):
        shutil.copy(clip_folder / "cuts.mp4", clip_folder / f"cuts{copy}.mp4")
    sizes, run_pipelined = [], local.run_pipelined

    def noting(*args, load, **kwargs):
        def loaded(spec):
            stage = load(spec)
            run = stage.run
            stage.run = lambda tasks: (sizes.append(len(tasks)), run(tasks))[1]
            return stage
        return run_pipelined(*args, load=loaded, **kwargs)

    monkeypatch.setattr(local, "run_pipelined", noting)
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]},
                                  "resources": {"executor": "local", "decode_concurrency": 2, "videos_per_batch": 8}})
    summary = run_job(str(clip_folder), str(tmp_path / "out"), config, progress=False)
    assert summary.counts["videos_ok"] == 10 and sizes == [2, 4, 2, 2], (sizes, summary.render())


def test_split_plan_groups_consecutive_cpu_stages_around_the_models(tiny_models):
    config = RunConfig.from_dict({"stages": ["shots", "embed", "objects", "captions"],
                                  "models": {"embed": tiny_models["embed"], "captions": tiny_models["captions"]}})
    groups, segments = split_plan(build_plan(config, gpus_visible=0))
    assert groups == [("workers.sampling:DecodeStage",), ("workers.sampling:SampleStage",)]
    assert [(s.name, s.cpu) for s in segments] == [("decode", 0), ("shots", None), ("sample", 1),
                                                   ("embed", None), ("captions", None)]

    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]}})
    groups, segments = split_plan(build_plan(config, gpus_visible=0))
    assert groups == [("workers.sampling:DecodeStage", "workers.sampling:SampleStage")]
    assert [s.name for s in segments] == ["decode+sample", "embed"]


def test_the_plan_printed_for_a_local_run_is_the_local_executors():
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"device": "cpu"},
                                  "resources": {"executor": "local", "decode_concurrency": 3, "videos_per_batch": 5}})
    described = local.describe(build_plan(config, gpus_visible=0), config)
    # not the Ray resources the plan also carries (CPU shares, actors, memory)
    assert described.splitlines() == [
        "  decode    3 worker processes, a video at a time each",
        "  sample    3 worker processes, a video at a time each",
        "  embed     a thread of its own, 5 videos/batch",
        "  (on the CPU the model stages take turns, each using every core)",
    ]


def test_a_model_stages_videos_per_batch_in_per_stage_is_the_local_executors_too(caplog):
    # the local executor ignored resources.per_stage: captions at 1 video a batch (a GPU's memory) ran at 4, silently
    from pipeline.job import _warn_ray_only

    config = RunConfig.from_dict({"stages": ["embed", "captions"], "models": {"device": "cpu"},
                                  "resources": {"executor": "local", "decode_concurrency": 2, "videos_per_batch": 4,
                                                "num_cpus_per_actor": 2,
                                                "per_stage": {"captions": {"videos_per_batch": 1, "num_gpus": 0.5},
                                                              "decode": {"videos_per_batch": 8}}}})
    specs = build_plan(config, gpus_visible=0)
    assert local.describe(specs, config).splitlines()[2:4] == ["  embed     a thread of its own, 4 videos/batch",
                                                               "  captions  a thread of its own, 1 video/batch"]
    assert [s.batch_size for s in split_plan(specs)[1] if s.cpu is None] == [4, 1]
    more = config.with_overrides({"resources.per_stage": {"captions": {"videos_per_batch": 8}}})
    assert local.feed_batch_size(specs, config) == 4  # the pipeline's batches: the largest stage's
    assert local.feed_batch_size(build_plan(more, gpus_visible=0), more) == 8
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="thread")
    segments = [Segment("slow_cpu", cpu=0), Segment("slow_model", stage=SlowModelStage(), batch_size=1)]
    tasks = list(run_pipelined(iter(_tasks(4)), segments, pool, batch_size=2))
    assert [t.ref.uri for t in tasks] == [t.ref.uri for t in _tasks(4)]
    assert all(t.timings["model_batch"] == 1 for t in tasks)
    # what it does not use, it says so once
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        _warn_ray_only(config.resources)
    assert [r.getMessage() for r in caplog.records] == [
        "resources.num_cpus_per_actor, resources.per_stage.captions.num_gpus, "
        "resources.per_stage.decode.videos_per_batch: only the Ray executor uses them; "
        "this run uses the local executor (resources.executor: local)"]


@pytest.mark.skipif(not fork_available(), reason="forkserver needs a Unix")
def test_a_run_with_forkserver_workers_gives_the_rows_a_forked_one_does(tmp_path, clip_folder, tiny_models,
                                                                       monkeypatch):
    """The start method used once CUDA is initialised (forkserver) gives the same tables as fork."""
    import duckdb

    config = RunConfig.from_dict({
        "stages": ["embed", "objects", "scenes"], "models": {"embed": tiny_models["embed"]},
        "resources": {"executor": "local", "videos_per_batch": 2, "decode_concurrency": 2},
    })
    tables = {}
    for method in ("fork", "forkserver"):
        monkeypatch.setattr(cpu_pool, "worker_start_method", lambda method=method: method)
        out = tmp_path / method
        assert run_job(str(clip_folder), str(out), config, progress=False).status == "succeeded"
        tables[method] = duckdb.sql(
            f"select uri, frame_count, decoder from read_parquet('{Path(out) / 'videos'}/**/*.parquet') order by uri"
        ).fetchall()
    assert tables["fork"] == tables["forkserver"] and len(tables["fork"]) >= 3


def _exits_on_text(path, *args, **kwargs):
    """`read_video`, but a library's exit(0) on the clip named text."""
    import sys

    if Path(path).stem == "text":
        sys.exit(0)
    return _READ_VIDEO(path, *args, **kwargs)


_READ_VIDEO = sampling.read_video  # (as imported: the test below patches the module's name)


@pytest.mark.parametrize("timeout_s", [300, 0])  # in a decode child, and in the pool worker itself
def test_a_librarys_exit_on_one_video_is_its_errors_row_and_the_run_goes_on(timeout_s, tmp_path, clip_folder,
                                                                           tiny_models, monkeypatch):
    # the SystemExit reached the driver: the run ended with the library's code (0: "success"), no
    # summary, nothing published
    monkeypatch.setattr(sampling, "read_video", _exits_on_text)  # (the forked pool workers inherit it)
    monkeypatch.setattr(cpu_pool, "worker_start_method", lambda: "fork")
    config = RunConfig.from_dict({
        "stages": ["embed"], "models": {"embed": tiny_models["embed"]},
        "resources": {"executor": "local", "decode_concurrency": 2, "decode_timeout_s": timeout_s},
    })
    summary = run_job(str(clip_folder), str(tmp_path / "out"), config, progress=False)
    failed = [(Path(uri).name, stage, message.startswith("a library called exit(0) while this video"))
              for uri, stage, message in summary.failures]
    assert failed == [("text.mp4", "decode" if timeout_s else "worker", True)], summary.render()
    assert summary.counts["videos_ok"] == summary.counts["videos_total"] - 1 >= 2 and summary.exit_code == 3


def test_a_local_run_given_rays_settings_says_it_leaves_them_unused(tmp_path, clip_folder, tiny_models, caplog):
    """A cluster's configuration run with --executor local: told once, and the run goes on."""
    config = RunConfig.from_dict({
        "stages": ["embed"], "models": {"embed": tiny_models["embed"]},
        "resources": {"executor": "local", "ray_address": "ray://head:10001", "max_actors": 4, "decode_concurrency": 2,
                      "videos_per_batch": 2},
    })
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        assert run_job(str(clip_folder), str(tmp_path / "out"), config, progress=False).status == "succeeded"
    said = [r.getMessage() for r in caplog.records if "only the Ray executor" in r.getMessage()]
    assert said == ["resources.ray_address, resources.max_actors: only the Ray executor uses them; "
                    "this run uses the local executor (resources.executor: local)"]


def test_a_local_run_loads_each_models_processor_once_and_each_run_its_own(tmp_path, clip_folder, tiny_models,
                                                                           monkeypatch):
    """The preflight's processors serve the model stages of a local run (they loaded them again,
    0.3 s for CLIP's); a second run reads the folders again, as saved since."""
    from workers import models

    loaded = []
    load = models.load_pretrained

    def counted(loader, model_id, *args, **kwargs):
        loaded.append((loader.__name__, Path(model_id).name))
        return load(loader, model_id, *args, **kwargs)

    monkeypatch.setattr(models, "load_pretrained", counted)
    config = RunConfig.from_dict({
        "stages": ["embed", "captions"], "models": {"embed": tiny_models["embed"], "captions": tiny_models["captions"]},
        "resources": {"executor": "local", "decode_concurrency": 1, "videos_per_batch": 4},
    })
    for run in ("first", "second"):
        assert run_job(str(clip_folder), str(tmp_path / run), config, progress=False).status == "succeeded"
    processors = [name for loader, name in loaded if loader == "AutoProcessor"]
    assert processors == ["clip", "git", "clip", "git"]
    assert models._shared_processors is None  # (nothing kept once the runs ended)


def test_the_videos_that_reach_the_driver_no_longer_carry_the_models_frames(synthetic_clips, tiny_models):
    """Each model stage drops the frames only it reads once it has run: on Ray every later stage
    would pickle them again and the driver unpickle them (a video's keyframes at full resolution)."""
    from pipeline.local import run_local
    from pipeline.sources import list_videos

    config = RunConfig.from_dict({
        "stages": ["embed", "objects", "captions", "ocr"], "models": tiny_models,
        "resources": {"executor": "local", "videos_per_batch": 2, "decode_concurrency": 1},
    })
    refs = list(list_videos(str(synthetic_clips)))[:2]
    done = list(run_local([VideoTask(ref=ref) for ref in refs], build_plan(config), config))
    assert len(done) == 2
    for task in done:
        assert not task.errors, task.errors
        assert task.frame_embeddings is not None and task.labels and task.captions  # the models had their frames
        assert len(task.frames.frame_index) == len(task.frame_embeddings) and task.frames.thumbnails
        assert task.frames.prepared == {} and task.frames.keyframes == {}


class ThreadShareStage(Stage):
    """Notes the threads its process lets the decoders, torch and OpenCV run."""

    name = "thread_share"

    def __init__(self, config):
        pass

    def process(self, tasks):
        from workers.frame_sources import shared_threads

        for task in tasks:
            task.timings.update({name: float(count) for name, count in shared_threads().items()})


@pytest.mark.parametrize("method", ["fork", "forkserver"] if fork_available() else [])
def test_each_pool_worker_runs_its_share_of_the_cores_threads(method, monkeypatch):
    """16 workers that each let FFmpeg start a thread per core decoded no faster than one process."""
    monkeypatch.setattr(cpu_pool, "usable_cpus", lambda: 8)  # read on this side, in the driver
    pool = CpuPool(RunConfig(), [(f"{__name__}:ThreadShareStage",)], workers=4, start_method=method)
    try:
        task = pool.submit(0, _tasks(1)[0]).result()
    finally:
        pool.close()
    assert task.timings["decoders"] == task.timings["torch"] == 2


def test_a_process_held_to_fewer_cores_sizes_its_pool_and_plan_by_them(monkeypatch):
    """In a container given 2 of a host's 64 cores (a cpuset, taskset), 64 decoders of 64 threads
    each ran on 2 cores, and a plan sized its actors by cores the job could not use."""
    import os

    from pipeline import plan

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_pool.decode_workers(None) == 2 and cpu_pool.decode_workers(5) == 5
    assert cpu_pool.threads_per_worker(1) == 2
    assert plan._local_cpus() == 2.0


class PreparerProbeStage(Stage):
    """Notes whether the preparers its pool worker was handed still hold their processors."""

    name = "preparer_probe"
    takes_preparers = True

    def __init__(self, config, preparers=None):
        self.preparers = preparers

    def process(self, tasks):
        for task in tasks:
            task.timings["with_processor"] = float(self.preparers["embed"].image_processor is not None)


@pytest.mark.parametrize("method", ["fork", "forkserver"] if fork_available() else [])
def test_pool_workers_get_the_drivers_preparers_detached_unless_forked(method):
    """A forked worker inherits the processors the driver loaded; a forkserver's worker starts
    afresh, and would import transformers to unpickle one."""
    import transformers

    from workers.preparation import FramePreparer

    preparers = {"embed": FramePreparer(transformers.CLIPImageProcessorPil(), "embed")}
    pool = CpuPool(RunConfig(), [(f"{__name__}:PreparerProbeStage",)], workers=1, start_method=method,
                   preparers=preparers)
    try:
        task = pool.submit(0, _tasks(1)[0]).result()
    finally:
        pool.close()
    assert task.timings["with_processor"] == (1.0 if method == "fork" else 0.0)


class LoggingStage(Stage):
    """Logs as a stage in a pool worker does, and from a child process of its own, as a decode child does."""

    name = "logging"

    def __init__(self, config):
        pass

    def process(self, tasks):
        import logging
        import multiprocessing

        log = logging.getLogger("workers.sampling")
        for task in tasks:
            log.warning("%s: sampled frames [106] could not be decoded", task.ref.uri)
            log.info("%s: an info line", task.ref.uri)  # below the driver's level
            log.warning("long %s", "x" * 20_000)
            try:
                raise ValueError("inside the worker")
            except ValueError:
                log.exception("%s: failed", task.ref.uri)
            child = multiprocessing.get_context("fork").Process(target=log.warning, args=("from the decode child",))
            child.start()
            child.join()


@pytest.mark.parametrize("method", ["fork", "forkserver"] if fork_available() else [])
def test_pool_workers_log_through_the_driver(method, caplog):
    """A worker's lines are the driver's records, which its handlers (and a progress bar) write."""
    import logging

    with caplog.at_level(logging.WARNING):
        pool = CpuPool(RunConfig(), [(f"{__name__}:LoggingStage",)], workers=2, start_method=method)
        try:
            pool.submit(0, _tasks(1)[0]).result()
        finally:
            pool.close()
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert records[0] == ("workers.sampling", "WARNING", "/videos/00.mp4: sampled frames [106] could not be decoded")
    assert records[1][2].startswith("long xxx") and " ... " in records[1][2] and len(records[1][2]) < 2000
    assert records[2][:2] == ("workers.sampling", "ERROR")
    assert "ValueError: inside the worker" in caplog.records[2].exc_text
    assert records[3] == ("workers.sampling", "WARNING", "from the decode child")
    assert len(records) == 4  # not the info line


def test_log_lines_written_while_the_progress_bar_runs_are_written_above_it(capsys):
    import logging
    import sys

    from tqdm import tqdm

    from pipeline.log_relay import above_progress_bar

    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger()
    logger.addHandler(handler)
    try:
        standard_error = sys.stderr
        bar = tqdm(unit=" videos", file=sys.stderr, disable=False, ncols=60)
        with above_progress_bar():
            bar.update(3)
            logging.getLogger("workers.sampling").warning("a damaged file")
            print("(a Ray worker's", end=" ", file=sys.stderr)  # Ray prints its workers' lines
            print("line)", file=sys.stderr)
        bar.close()
        assert handler.stream is sys.stderr is standard_error
    finally:
        logger.removeHandler(handler)
    pieces = capsys.readouterr().err.replace("\n", "\r").split("\r")
    # each line is written whole, on a line the bar was cleared from, and the bar is drawn again after it
    for line in ("a damaged file", "(a Ray worker's line)"):
        at = pieces.index(line)
        assert not pieces[at - 1].strip() and "3 videos" in "".join(pieces[at + 1 : at + 3])


@pytest.mark.skipif(not fork_available(), reason="needs fork")
def test_workers_start_after_the_driver_used_opencvs_thread_pool(tmp_path):
    """cv2.setNumThreads in a process forked after its parent ran OpenCV's thread pool waits
    forever; the pool workers must not call it. Run in a child so a hang fails, not stalls."""
    import subprocess
    import sys

    script = (
        "import cv2, numpy as np\n"
        "from pipeline.cpu_pool import CpuPool\n"
        "from schemas.config import RunConfig\n"
        "cv2.resize(np.zeros((1000, 1000, 3), np.uint8), (500, 500))\n"
        "pool = CpuPool(RunConfig(), [('workers.sampling:DecodeStage',)], workers=2, start_method='fork')\n"
        "pool.close()\n"
        "print('started')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-2000:]


def test_the_decoders_run_the_threads_they_are_given(monkeypatch, tmp_path):
    import decord

    from workers import frame_sources
    from workers.pyav_source import PyAVSource
    from workers.synthetic import indexed_frames, write_video

    path = write_video(tmp_path / "clip.mp4", indexed_frames(12, 64, 48))
    opened = []
    original = decord.VideoReader
    monkeypatch.setattr(decord, "VideoReader", lambda *a, **kw: opened.append(kw.get("num_threads")) or original(*a, **kw))
    monkeypatch.setattr(frame_sources, "_DECODE_THREADS", [0])
    frame_sources.set_decode_threads(3)
    with frame_sources.DecordSource(path) as source:
        source.all_frames_small()
    with PyAVSource(path) as source:
        assert source._container.streams.video[0].thread_count == 3
    assert opened and set(opened) == {3}


class OtherSlowModelStage(SlowModelStage):
    """A second model stage, noting its own times."""

    name = "other_model"

    def process(self, tasks):
        start = time.time()
        time.sleep(MODEL_SECONDS)
        for task in tasks:
            task.timings.update(other_start=start, other_end=time.time())


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_on_a_cpu_the_model_stages_take_turns(one_at_a_time):
    """Each model stage's torch uses every core: two at once would only make them compete."""
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="thread")
    segments = [*_segments(), Segment("other_model", stage=OtherSlowModelStage())]
    tasks = list(run_pipelined(iter(_tasks(12)), segments, pool, batch_size=2, models_one_at_a_time=one_at_a_time))
    assert len(tasks) == 12
    first = sorted({(t.timings["model_start"], t.timings["model_end"]) for t in tasks})
    other = sorted({(t.timings["other_start"], t.timings["other_end"]) for t in tasks})
    overlapping = [a for a in first for b in other if a[0] < b[1] - 1e-3 and b[0] < a[1] - 1e-3]
    assert (not overlapping) if one_at_a_time else overlapping


def test_a_later_model_stage_does_not_wait_while_an_earlier_one_runs_ahead():
    """On a CPU the turn goes to the waiting stage latest in the pipeline: the first model stage, whose
    next batch is always there, no longer runs ahead of the second (with a lock, shot detection ran three
    batches before the embed stage's first, and the first results came that much later)."""
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="thread")
    segments = [*_segments(), Segment("other_model", stage=OtherSlowModelStage())]
    tasks = list(run_pipelined(iter(_tasks(12)), segments, pool, batch_size=2, models_one_at_a_time=True))
    assert len(tasks) == 12
    first = sorted({t.timings["model_start"] for t in tasks})
    other = sorted({t.timings["other_start"] for t in tasks})
    assert len(first) == len(other) == 6
    # the second stage's n-th batch starts before the first stage's (n+2)-th
    assert all(b < a for b, a in zip(other, first[2:])), (first, other)


def test_of_the_stages_waiting_the_latest_in_the_pipeline_takes_the_next_turn():
    turns = local._Turns()
    order: list[int] = []

    def take(position: int) -> None:
        with turns.turn(position):
            order.append(position)

    with turns.turn(2):  # (held while the others come to wait)
        threads = [threading.Thread(target=take, args=(position,)) for position in (0, 3, 1)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(turns._waiting) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(turns._waiting) == [0, 1, 3]
        assert order == []
    for thread in threads:
        thread.join(timeout=30)
    assert order == [3, 1, 0]


def test_the_first_videos_decode_while_the_models_load():
    """Loading the models (and starting CUDA) takes the decoders no time: they start first."""
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="thread")
    loaded = []

    def load(spec):
        time.sleep(3 * CPU_SECONDS)
        loaded.append(time.time())
        return SlowModelStage()

    segments = [Segment("slow_cpu", cpu=0), Segment("slow_model", spec="the model's spec")]
    tasks = list(run_pipelined(iter(_tasks(8)), segments, pool, batch_size=2, load=load))
    assert [t.ref.uri for t in tasks] == [t.ref.uri for t in _tasks(8)]
    assert len(loaded) == 1
    assert min(t.timings["cpu_end"] for t in tasks) < loaded[0]  # a video decoded during the load
    assert min(t.timings["model_start"] for t in tasks) >= loaded[0]  # no model ran before it was loaded


def test_a_model_that_fails_to_load_stops_the_decoders_and_reaches_the_caller():
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="thread")

    def load(spec):
        time.sleep(CPU_SECONDS)
        raise OSError("no weights in /models/clip")

    segments = [Segment("slow_cpu", cpu=0), Segment("slow_model", spec="the model's spec")]
    with pytest.raises(OSError, match="no weights"):
        list(run_pipelined(iter(_tasks(40)), segments, pool, batch_size=2, load=load))
    assert not [t for t in threading.enumerate() if t.name.startswith("vidlens-pipeline-")]


def test_videos_downloaded_ahead_come_in_order_and_their_copies_go_when_no_stage_needs_them():
    """`DownloadAhead`: the driver downloads a bucket's next videos while the workers decode;
    a copy is kept past the first CPU segment (for the sample stage after the shot detector)
    while fewer than `keep` are, deleted after the last; a failed download is left to the worker."""
    import fsspec

    from pipeline.downloads import DownloadAhead

    memory = fsspec.filesystem("memory")
    for index in range(6):
        memory.pipe(f"/ahead/clip{index}.mp4", bytes([index]) * 100)
    uris = [f"memory://ahead/clip{index}.mp4" for index in range(6)] + ["memory://ahead/gone.mp4", "/local/clip.mp4"]
    tasks = [VideoTask(ref=VideoRef(uri=uri, size_bytes=100, mtime_ns=None, etag=None, video_id=str(i)))
             for i, uri in enumerate(uris)]
    tasks[5].stages = frozenset({"match"})  # an incremental rerun that decodes nothing: no download
    downloads = DownloadAhead(RunConfig(), ahead=2, keep=2, max_bytes=2**30)
    try:
        ready = list(downloads.tasks(iter(tasks)))
        assert [task.ref.uri for task in ready] == uris
        copies = [task.local_path for task in ready]
        assert [Path(copy).read_bytes() for copy in copies[:5]] == [bytes([i]) * 100 for i in range(5)]
        assert copies[5:] == [None, None, None]  # not decoded; missing (the worker reports it); local

        downloads.passed(ready[:3], last=False)  # the decode segment, with shots after it: two kept
        assert [task.local_path is not None for task in ready[:3]] == [True, True, False]
        assert not Path(copies[2]).exists()
        downloads.passed(ready[:3], last=True)  # the sample segment
        assert [task.local_path for task in ready[:3]] == [None] * 3
        assert not any(Path(copy).exists() for copy in copies[:2])
    finally:
        downloads.close()  # a run stopped midway: the rest go too
    assert not any(Path(copy).exists() for copy in copies[3:5])

    # at most max_bytes downloaded ahead (by the listed sizes): the next videos go to their workers
    tasks = [VideoTask(ref=VideoRef(uri, 100, None, None, str(i))) for i, uri in enumerate(uris[:5])]
    downloads = DownloadAhead(RunConfig(), ahead=2, keep=2, max_bytes=250)
    try:
        ready = list(downloads.tasks(iter(tasks)))
        assert [task.local_path is not None for task in ready] == [True, True, False, False, False]
        downloads.passed(ready, last=True)
        assert downloads._bytes == 0
    finally:
        downloads.close()

    # a video whose decoding failed is not downloaded for the sample stage (which skips it)
    from workers.task import StageError

    failed = VideoTask(ref=VideoRef(uris[0], 100, None, None, "f"))
    failed.errors.append(StageError(stage="decode", error_type="VideoDecodeError", message="corrupt"))
    downloads = DownloadAhead(RunConfig(), ahead=2, keep=0, max_bytes=2**30)
    try:
        assert [task.local_path for task in downloads.tasks(iter([failed]))] == [None]
    finally:
        downloads.close()


_STOPPED_RUN = """
import sys
import fsspec
from pathlib import Path
memory = fsspec.filesystem("memory")
clips = sorted(p for p in Path(sys.argv[1]).rglob("*.mp4"))
for number in range(240):
    memory.pipe(f"/bucket/clip{number:03d}.mp4", clips[number % len(clips)].read_bytes())
from pipeline.cli import main
sys.exit(main(["run", "memory://bucket/", "--out", sys.argv[2], "--executor", "local", "--stages", "embed",
               "--embed-model", sys.argv[3], "--no-progress"]))
"""


@pytest.mark.skipif(not fork_available(), reason="forks its pool workers")
def test_a_run_stopped_with_sigterm_cleans_up_as_on_ctrl_c(tmp_path, synthetic_clips, tiny_models):
    # systemd, a scheduler or `timeout` stop a run with SIGTERM: the driver and its workers were
    # killed outright, and the videos downloaded from the bucket stayed in the temp folder
    import os
    import signal
    import subprocess
    import sys

    temp = tmp_path / "temp"
    temp.mkdir()
    run = subprocess.Popen([sys.executable, "-c", _STOPPED_RUN, str(synthetic_clips), str(tmp_path / "out"),
                            tiny_models["embed"]], env={**os.environ, "TMPDIR": str(temp)},
                           cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(temp.glob("vidlens-*.mp4")):  # downloads under way
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it downloaded"
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(run.pid, signal.SIGTERM)  # as systemd stops a unit: every process of it
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 143, output[-2000:]
    assert not list(temp.glob("vidlens-*")), output[-2000:]


def _send_a_large_result(results, size):
    pool_worker.stop_on_signals()  # as a pool worker does
    from concurrent.futures.process import _sendback_result

    _sendback_result(results, 7, result=b"x" * size)
    time.sleep(30)  # waiting for the next video: the stop ends the worker here


@pytest.mark.skipif(not fork_available(), reason="forks a worker")
def test_a_pool_worker_stopped_while_sending_a_result_sends_it_whole_then_ends():
    # a SIGTERM raised SystemExit inside multiprocessing's write of a result: the driver read the
    # half written result forever (or a worker kept the result queue's lock), and the run hung
    import multiprocessing
    import os
    import signal

    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    size = 8 * 2**20  # far more than a pipe holds: the worker waits inside the write
    worker = context.Process(target=_send_a_large_result, args=(results, size), daemon=True)
    worker.start()
    try:
        assert results._reader.poll(30), "the worker did not start sending"
        time.sleep(0.2)
        os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert worker.is_alive()  # not ended midway through the result
        received = []
        reader = threading.Thread(target=lambda: received.append(results.get()), daemon=True)
        reader.start()
        reader.join(30)
        assert received, "the result never arrived whole"
        assert (received[0].work_id, received[0].result) == (7, b"x" * size)
        worker.join(10)
        assert worker.exitcode == 128 + signal.SIGTERM  # ended once it was sent
    finally:
        worker.kill()


class _WaitingStage(Stage):
    """Waits, as a long decode does, in the folder its video's URI names; its cleanup notes it ran."""

    name = "waiting"

    def __init__(self, config):
        pass

    def process(self, tasks):
        folder = Path(tasks[0].ref.uri)
        try:
            (folder / "started").touch()
            time.sleep(30)
        finally:
            (folder / "cleaned up").touch()


def _waiting_task(folder: Path) -> VideoTask:
    """A video for `_WaitingStage`, waiting in `folder`."""
    return VideoTask(ref=VideoRef(uri=str(folder), size_bytes=1, mtime_ns=0, etag=None, video_id="w"))


def _wait_until_started(folder: Path) -> None:
    deadline = time.monotonic() + 30
    while not (folder / "started").exists():
        assert time.monotonic() < deadline, "the video's stage did not start"
        time.sleep(0.01)


def _run_a_stopped_video(folder):
    pool_worker.stop_on_signals()
    pool_worker._WORKER_GROUPS[:] = [(_WaitingStage(None),)]
    try:
        pool_worker.run_group(0, _waiting_task(folder))
    except BaseException:  # noqa: BLE001 - as multiprocessing's worker loop does: sent back as the result
        (folder / "sent back").touch()
    time.sleep(30)  # ... and the worker waited for the next video


def _wait_for_a_video(download, ready):
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's run (the tests may run under nohup)
    pool_worker.stop_on_signals()
    from workers import remote_copy

    remote_copy._LAST_DOWNLOAD.update(key="k", path=str(download))  # its last video's copy
    ready.set()
    time.sleep(30)


@pytest.mark.skipif(not fork_available(), reason="forks a worker")
def test_a_pool_worker_stopped_ends_after_its_videos_cleanups_or_at_once_when_idle(tmp_path):
    import multiprocessing
    import os
    import signal

    context = multiprocessing.get_context("fork")
    # within a video: the stage's cleanup runs, then the worker ends (not going on to the next video)
    worker = context.Process(target=_run_a_stopped_video, args=(tmp_path,), daemon=True)
    worker.start()
    try:
        _wait_until_started(tmp_path)
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(10)
        assert worker.exitcode == 128 + signal.SIGTERM
        assert (tmp_path / "cleaned up").exists() and not (tmp_path / "sent back").exists()
    finally:
        worker.kill()

    # waiting for a video: it ends at once (Ctrl-C too), its last download deleted
    download = tmp_path / "vidlens-copy.mp4"
    download.write_bytes(b"video")
    ready = context.Event()
    worker = context.Process(target=_wait_for_a_video, args=(download, ready), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        os.kill(worker.pid, signal.SIGINT)
        worker.join(10)
        assert worker.exitcode == 128 + signal.SIGINT
        assert not download.exists()
    finally:
        worker.kill()


def _ignoring_ctrl_c(ready):
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a script's background job starts
    pool_worker.stop_on_signals()
    ready.set()
    time.sleep(30)


@pytest.mark.skipif(not fork_available(), reason="forks a worker")
def test_a_pool_worker_of_a_run_that_ignores_ctrl_c_ignores_it_too():
    import multiprocessing
    import os
    import signal

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_ignoring_ctrl_c, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        os.kill(worker.pid, signal.SIGINT)
        worker.join(1)
        assert worker.is_alive()
        os.kill(worker.pid, signal.SIGTERM)  # (not ignored: it ends)
        worker.join(10)
        assert worker.exitcode == 128 + signal.SIGTERM
    finally:
        worker.kill()


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
def test_a_worker_killed_while_sending_a_result_ends_its_pool_rather_than_hang_it(monkeypatch):
    # the kernel's out-of-memory killer takes a worker midway through sending a video back: half
    # the result lies in the pool's pipe, and ProcessPoolExecutor read the rest forever (2 kills
    # in 3 during a 400 MB result hung it), the run and its exit with it
    import os
    import signal
    import struct

    monkeypatch.setattr(cpu_pool, "STUCK_AFTER_S", 0.5)
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=2, start_method="fork")
    try:
        executor = pool._executor
        futures = [pool.submit(0, task) for task in _tasks(4)]
        # what a worker killed midway through a 1 MiB result leaves: its length and a part of it
        os.write(executor._result_queue._writer.fileno(), struct.pack("!i", 2**20) + b"\x80\x05" + bytes(4096))
        os.kill(next(iter(executor._processes)), signal.SIGKILL)
        returned = []
        waiting = threading.Thread(target=lambda: returned.extend(pool.results(futures)), daemon=True)
        waiting.start()
        waiting.join(60)
        assert not waiting.is_alive(), "the pool hung"
        assert executor._executor_manager_thread is None or not executor._executor_manager_thread.is_alive()
        # the kill was no video's doing: each, run again alone, is finished
        assert [t.ref.uri for t in returned] == [t.ref.uri for t in _tasks(4)]
        assert all(not t.errors and "cpu_end" in t.timings for t in returned)
    finally:
        pool.close(cancel=True)


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
def test_a_forked_pool_keeps_what_its_workers_inherit_out_of_the_drivers_garbage_collections():
    # a collection writes to every object it walks, and each page written is copied: the
    # driver's collections unshared, page by page, what the workers had inherited (the driver
    # and its workers by PSS 1.22-1.26x from 100 to 3,000 videos; 1.03-1.06x frozen)
    import gc

    gc.unfreeze()  # (in case a test before left a pool open)
    pool = CpuPool(RunConfig(), [(f"{__name__}:SlowCpuStage",)], workers=1, start_method="fork")
    try:
        assert gc.get_freeze_count() > 0
        assert [t.errors for t in pool.results([pool.submit(0, task) for task in _tasks(2)])] == [[], []]
    finally:
        pool.close()
    assert gc.get_freeze_count() == 0  # collected again once the pool is gone


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
def test_a_local_run_failing_before_its_pipeline_starts_closes_its_pool(monkeypatch):
    # the pool's workers (and the driver's objects frozen for them) outlived such a failure
    import gc

    from pipeline.plan import StageSpec

    pools = []

    class Watched(CpuPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    def refused(*args, **kwargs):
        raise RuntimeError("no downloads today")

    monkeypatch.setattr(cpu_pool, "worker_start_method", lambda: "fork")
    monkeypatch.setattr(local, "CpuPool", Watched)
    monkeypatch.setattr(local, "DownloadAhead", refused)
    gc.unfreeze()  # (in case a test before left a pool open)
    specs = [StageSpec("slow_cpu", f"{__name__}:SlowCpuStage", "task", num_cpus=1)]
    with pytest.raises(RuntimeError, match="no downloads today"):
        list(local.run_local(iter(_tasks(2)), specs, RunConfig.from_dict({"resources": {"decode_concurrency": 1}})))
    (pool,) = pools
    assert pool._executor._shutdown_thread and gc.get_freeze_count() == 0


class DyingStage(Stage):
    """A worker's crash outside the guarded decoding (or the kernel's kill): on every video, or on
    those whose URI holds `poison`."""

    name = "dying"
    poison = "/"
    kill_with = "SIGKILL"

    def __init__(self, config):
        pass

    def process(self, tasks):
        import os
        import signal

        for task in tasks:
            if self.poison in task.ref.uri:
                os.kill(os.getpid(), getattr(signal, self.kill_with))
                time.sleep(30)  # (a stopped worker ends at once, its video's cleanups run)
            task.timings["ran"] = 1.0


class DyingOnThirdStage(DyingStage):
    poison = "03.mp4"


class StoppedOnThirdStage(DyingOnThirdStage):
    """A memory watchdog's SIGTERM (earlyoom's first) to the worker of one video, not to the run."""

    kill_with = "SIGTERM"


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
def test_a_video_that_kills_its_worker_gets_an_errors_row_and_the_others_are_finished(caplog):
    # a worker's death failed every video its pool had taken, and the run stopped; the same
    # video ended every run after it, so a nightly job never got past it
    pool = CpuPool(RunConfig(), [(f"{__name__}:DyingOnThirdStage",)], workers=2, start_method="fork")
    try:
        tasks = _tasks(8)
        batches = [[pool.submit(0, task) for task in tasks[:4]], [pool.submit(0, task) for task in tasks[4:]]]
        with caplog.at_level(logging.WARNING, logger="pipeline.cpu_pool"):
            done = pool.results(batches[0]) + pool.results(batches[1])
        assert [t.ref.uri for t in done] == [t.ref.uri for t in tasks]  # every video, once, in order
        culprit = done[3]
        assert [(e.stage, e.error_type) for e in culprit.errors] == [("worker", "WorkerLost")]
        assert "killed by SIGKILL" in culprit.errors[0].message and "ran" not in culprit.timings
        assert all(not t.errors and t.timings["ran"] == 1.0 for t in done if t is not culprit)
        messages = [r.getMessage() for r in caplog.records]
        assert any("a decode worker process died (killed by SIGKILL)" in m for m in messages)
        assert any(m.startswith("/videos/03.mp4 ended the decode worker process it ran in alone") for m in messages)
        # the pool goes on in new workers, the one for videos run alone let go
        assert [t.errors for t in pool.results([pool.submit(0, task) for task in _tasks(2)])] == [[], []]
        assert pool._alone is None
    finally:
        pool.close(cancel=True)


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
def test_a_sigterm_to_one_worker_is_its_videos_crash_and_a_sigterm_to_the_run_its_stop():
    # a worker's SIGTERM was taken for the run's stop whoever sent it: the run ended, and each
    # rerun again on the same video, where a SIGKILL gave that video an errors row
    pool = CpuPool(RunConfig(), [(f"{__name__}:StoppedOnThirdStage",)], workers=2, start_method="fork")
    try:
        done = pool.results([pool.submit(0, task) for task in _tasks(4)])
        assert [[(e.error_type, "stopped by SIGTERM" in e.message) for e in t.errors] for t in done] == [
            [], [], [], [("WorkerLost", True)]]
        cpu_pool.DRIVER_STOPPED.set()  # as `vidlens run`'s handler does when the run itself is stopped
        with pytest.raises(cpu_pool.WorkerDied, match="was stopped"):
            pool.results([pool.submit(0, task) for task in _tasks(4)])
    finally:
        cpu_pool.DRIVER_STOPPED.clear()
        pool.close(cancel=True)


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
def test_a_worker_found_dead_once_the_stopped_driver_closed_its_pool_starts_no_new_workers(caplog):
    # Ctrl-C to the group of a run (chaos soak, az:// output): the driver's cleanup closed the
    # pool (its exit codes gone with it) while a segment's thread found its worker dead; taken for
    # a crash ("exit code unknown"), new workers were started through a forkserver during the stop,
    # and the second Ctrl-C printed a KeyboardInterrupt traceback from that server's torch import
    pool = CpuPool(RunConfig(), [(f"{__name__}:DyingStage",)], workers=1, start_method="fork")
    try:
        from concurrent.futures import wait

        futures = [pool.submit(0, task) for task in _tasks(2)]
        wait(futures, timeout=30)
        cpu_pool.DRIVER_STOPPED.set()  # the run is stopped: `vidlens run`'s handler sets it
        pool._executor.shutdown(wait=False, cancel_futures=True)  # as the stop's `close(cancel=True)` does
        with caplog.at_level(logging.WARNING, logger="pipeline.cpu_pool"), pytest.raises(
                cpu_pool.WorkerDied, match="was stopped"):
            pool.results(futures)
        assert pool._alone is None and not caplog.records  # no new workers, no crash said
    finally:
        cpu_pool.DRIVER_STOPPED.clear()
        pool.close(cancel=True)


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
def test_workers_that_die_on_every_video_stop_the_run_with_what_to_do():
    pool = CpuPool(RunConfig(), [(f"{__name__}:DyingStage",)], workers=1, start_method="fork")
    try:
        with pytest.raises(cpu_pool.WorkerDied, match="3 videos in a row.*killed by SIGKILL.*the same command goes "
                                                      "on from there.*decode_concurrency"):
            pool.results([pool.submit(0, task) for task in _tasks(4)])
    finally:
        pool.close(cancel=True)


class PoisonedDecodeStage(DecodeStage):
    """The product's decode stage, in a worker that dies (outside the guarded decoding) on a
    video named poison, and in the first workers of a run (forked, with `transient` set by the
    test) on the one it names."""

    transient: str | None = None

    def process(self, tasks):
        import os
        import signal

        if any("poison" in task.ref.uri or (self.transient and self.transient in task.ref.uri) for task in tasks):
            os.kill(os.getpid(), signal.SIGKILL)
        super().process(tasks)


@pytest.mark.skipif(not fork_available(), reason="forks its workers")
@pytest.mark.parametrize("stages", [["embed"], ["shots", "embed"]])  # (with shots: two CPU segments, one pool)
def test_a_run_whose_worker_dies_goes_on_and_gives_each_video_its_row(tmp_path, clip_folder, tiny_models,
                                                                      monkeypatch, stages):
    import shutil

    import duckdb

    from pipeline import plan as plan_module

    shutil.copy(clip_folder / "cuts.mp4", clip_folder / "poison.mp4")
    build_plan = plan_module.build_plan

    def poisoned(*args, **kwargs):
        return [replace(spec, target=f"{__name__}:PoisonedDecodeStage") if spec.name == "decode" else spec
                for spec in build_plan(*args, **kwargs)]

    monkeypatch.setattr(plan_module, "build_plan", poisoned)
    monkeypatch.setattr(PoisonedDecodeStage, "transient", "cuts.mp4")  # (not in the workers started again)
    config = RunConfig.from_dict({
        "stages": stages, "models": {"embed": tiny_models["embed"]},
        "resources": {"executor": "local", "videos_per_batch": 2, "decode_concurrency": 2},
    })
    out = tmp_path / "out"
    summary = run_job(str(clip_folder), str(out), config, progress=False)
    assert summary.status == "partial"
    videos = duckdb.sql(f"select uri from read_parquet('{out}/videos/**/*.parquet') order by uri").fetchall()
    errors = duckdb.sql(f"select uri, stage, error_type from read_parquet('{out}/errors/**/*.parquet')").fetchall()
    names = [Path(uri).name for (uri,) in videos]
    assert sorted(names) == ["cuts.mp4", "order.mkv", "text.mp4"]  # one row each; poison's is its error
    assert [(Path(uri).name, stage, kind) for uri, stage, kind in errors] == [("poison.mp4", "worker", "WorkerLost")]
    frames = duckdb.sql(f"select count(*) from read_parquet('{out}/frames/**/*.parquet') f join "
                        f"read_parquet('{out}/videos/**/*.parquet') v using (video_id) "
                        "where v.uri like '%cuts.mp4'").fetchall()[0][0]
    assert frames > 0  # the video whose worker died in the first pool was finished in a new one


def _ends_as_stopped():
    import os
    import signal

    time.sleep(0.05)
    os._exit(128 + signal.SIGTERM)


@pytest.mark.skipif(not fork_available(), reason="forkserver needs a Unix")
def test_a_dead_worker_found_leaves_its_exit_code_to_the_thread_that_joins_it():
    # the driver looks for a dead worker (`_dead_worker`, each second) while the pool's thread
    # joins it: a forkserver's worker's exit code is read once, from a pipe, and a second reader
    # made it 255 (in 13 runs of 100 where one thread polled `exitcode` while another joined)
    import signal
    from multiprocessing import connection

    worker = cpu_pool.forkserver_context().Process(target=_ends_as_stopped)
    worker.start()
    assert connection.wait([worker.sentinel], 30), "the worker did not end"
    assert cpu_pool._ended(worker)
    assert worker._popen.returncode is None  # (not read: left to the thread that joins it)
    worker.join(10)
    assert worker.exitcode == 128 + signal.SIGTERM


@pytest.mark.skipif(not fork_available(), reason="forkserver needs a Unix")
def test_a_forkserver_and_its_workers_stopped_with_their_group_stop_as_forked_workers_do(tmp_path):
    # a SIGTERM to the group ended the forkserver at once, and every worker with it (they follow
    # the server, SIGKILL): one sending a result left it half written, the videos' downloads stayed
    import os
    import signal
    from multiprocessing import forkserver

    pool = CpuPool(RunConfig(), [(f"{__name__}:_WaitingStage",)], workers=1, start_method="forkserver")
    try:
        future = pool.submit(0, _waiting_task(tmp_path))
        _wait_until_started(tmp_path)
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGTERM)
        time.sleep(0.5)
        worker = next(iter(pool._executor._processes.values()))
        assert worker.is_alive() and not (tmp_path / "cleaned up").exists()  # still in its video
        cpu_pool.DRIVER_STOPPED.set()  # (the group's stop reaches the driver too)
        os.kill(worker.pid, signal.SIGTERM)
        # the codes as the pool's own thread read them (a second reader here could make it 255)
        assert cpu_pool._exit_codes(pool._executor) == [128 + signal.SIGTERM]
        assert (tmp_path / "cleaned up").exists()
        os.kill(forkserver._forkserver._forkserver_pid, 0)  # (the server lives on)
        with pytest.raises(cpu_pool.WorkerDied):
            pool.results([future])
    finally:
        cpu_pool.DRIVER_STOPPED.clear()
        pool.close(cancel=True)
