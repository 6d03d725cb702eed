"""Scale-out: `vidlens submit` to a two-node Ray cluster on this machine, and a model worker killed mid-run.

The cluster is real (`ray start --head` plus `ray start --address`, both with one CPU), on
loopback, with its own temp folder and token auth, and is torn down by stopping exactly
the processes this test started.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.s3server import free_ports, wait_for_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EMBED_WORKER = "ray::MapWorker(MapBatches(EmbedStage))"


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop the `ray start --block` processes we started, then anything left in their sessions."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # --block: ray start stops its node's processes
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    sessions = {process.pid for process in processes}
    for pid in _pids():
        try:
            if os.getsid(pid) in sessions:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


@pytest.fixture  # (one test uses it: held for the module, its two nodes ran beside every later test)
def ray_cluster():
    """A head node (dashboard and job server on 127.0.0.1) and a second node, one CPU each."""
    if shutil.which("ray", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("the `ray` command (ray[default]) is not installed next to this Python")
    # short: Ray puts Unix sockets under it; its own, so no other Ray on this machine is joined by mistake
    temp_dir = Path(tempfile.mkdtemp(prefix="vlr", dir="/tmp"))
    # all picked at once: ports picked one by one can come back equal
    gcs_port, dashboard_port, client_port, *agent_ports = free_ports(7)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, RAY_USAGE_STATS_ENABLED="0",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    env.pop("RAY_ADDRESS", None)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]

    def own_ports(node: int) -> list[str]:
        # the dashboard agent's HTTP port is fixed (52365) by default: another Ray on this machine
        # holding it leaves a node with no job agent, and every submission waits for one in vain
        agent, metrics = agent_ports[2 * node:2 * node + 2]
        return [f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}"]

    processes = []
    try:
        head_log = temp_dir / "head.log"
        processes.append(subprocess.Popen(
            [ray, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
             f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}", *own_ports(0), *common],
            env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        ))
        wait_for_port(dashboard_port, processes[0], 120, str(head_log), what="ray start")
        node_log = temp_dir / "node.log"
        # its own temp folder: two nodes sharing one would share (and garbage-collect) the job's files
        (temp_dir / "n2").mkdir()
        processes.append(subprocess.Popen(
            [ray, "start", f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={temp_dir / 'n2'}", *own_ports(1),
             *common],
            env=env, stdout=node_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        ))
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        _stop(processes)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _vidlens(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
def test_submit_runs_on_two_nodes_and_a_resubmit_is_the_same_job(ray_cluster, tmp_path, synthetic_clips,
                                                                tiny_models):
    address, env = ray_cluster
    videos = tmp_path / "videos"
    shutil.copytree(synthetic_clips, videos)
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
        "sampling": {"num_frames": 4}, "output": {"thumbnails": False},
        "resources": {"videos_per_batch": 1},
    }))
    args = ["submit", str(videos), "--out", str(out), "--address", address, "--config", str(config)]

    first = _vidlens(args, env)
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = next(w for w in first.stderr.split() if w.startswith("vidlens-"))
    assert f"submitted job {job_id}" in first.stderr
    assert "plan:" in first.stdout  # the job's own log, streamed back
    videos_table = pd.read_parquet(out / "videos")
    assert sorted(Path(uri).name for uri in videos_table.uri) == ["cuts.mp4", "order.mkv", "text.mp4"]

    again = _vidlens(args, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"job {job_id} was already submitted for this batch and is SUCCEEDED" in again.stderr
    assert "submitted job" not in again.stderr
    assert len(pd.read_parquet(out / "videos")) == 3  # nothing ran twice

    status = _vidlens(["status", job_id, "--address", address], env)
    assert status.returncode == 0 and f"job {job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr


# --- a model worker killed while a job runs ------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for child in _pids():
        try:
            with open(f"/proc/{child}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(child)
        except (OSError, IndexError, ValueError):
            pass
    return found


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _embed_workers(raylet_pid: int) -> list[int]:
    """Embed actor processes of *our* Ray instance: children of its raylet, found by their title."""
    return [pid for pid in _children(raylet_pid) if _process_name(pid).startswith(EMBED_WORKER)]


@pytest.fixture(scope="module")
def local_ray():
    """An in-process local Ray instance with two CPUs, shared by the tests below."""
    import ray

    assert not ray.is_initialized()
    # "local": a new instance, never a cluster that RAY_ADDRESS or a `ray start` on this machine names
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()


def _embed_config(tiny_models, num_frames: int):
    from schemas.config import RunConfig

    return RunConfig.from_dict({
        "stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
        "sampling": {"num_frames": num_frames}, "output": {"thumbnails": False},
        "resources": {"executor": "ray", "videos_per_batch": 1},
    })


@pytest.mark.ray
def test_a_ray_run_checks_its_models_while_ray_starts_and_reports_a_missing_one(local_ray, synthetic_clips, tmp_path):
    """The models are checked on a thread while Ray starts or is joined; a missing model is still
    the run's error, before any video is processed or any output written."""
    from pipeline.job import run_job
    from schemas.config import RunConfig
    from workers.models import ModelLoadError

    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": str(tmp_path / "no-such-model")},
                                  "resources": {"executor": "ray"}})
    with pytest.raises(ModelLoadError, match="cannot load the embed model"):
        run_job(str(synthetic_clips), str(tmp_path / "out"), config, progress=False)
    assert not list((tmp_path / "out").rglob("*.parquet"))


@pytest.mark.ray
def test_a_ray_run_with_shots_from_a_bucket_downloads_ahead_and_leaves_nothing_behind(
        local_ray, synthetic_clips, tiny_models, tmp_path, capfd):
    """The cluster's main path: Ray, a bucket (a real S3 server), shot detection. The decode
    tasks take a video each; the sample tasks after the shot detector up to 4, downloading the
    next while they sample one (as Ray Data groups them); both two a CPU share. The tables are
    whole and the workers leave no copy behind."""
    from pipeline import plan
    from pipeline.job import run_job
    from schemas.config import RunConfig
    from tests.s3server import s3_server

    def copies() -> set[str]:  # (and those a decode task left on the node for its sample task)
        return {p.name for p in [*Path(tempfile.gettempdir()).glob("vidlens-*"),
                                 *Path(tempfile.gettempdir()).glob("vidlens-handed/*")] if p.suffix in (".mp4", ".mkv")}

    before = copies()
    with s3_server() as s3:
        fs = s3.filesystem()
        for clip in ("cuts.mp4", "text.mp4", "sub/order.mkv"):
            fs.put_file(str(synthetic_clips / clip), f"{s3.bucket}/videos/{Path(clip).name}")
        config = RunConfig.from_dict({
            "stages": ["shots", "embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
            "sampling": {"num_frames": 4}, "output": {"thumbnails": False},
            "resources": {"executor": "ray", "videos_per_batch": 2},
            "storage": {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret},
        })
        summary = run_job(f"s3://{s3.bucket}/videos", str(tmp_path / "out"), config, progress=False)
    assert summary.status == "succeeded" and summary.counts["videos_ok"] == 3, summary.render()
    segments = pd.read_parquet(tmp_path / "out" / "segments")
    assert segments.groupby("video_id").size().sort_values().tolist() == [1, 1, 3]  # cuts.mp4's three shots
    assert pd.read_parquet(tmp_path / "out" / "frames").video_id.nunique() == 3
    assert copies() - before == set()
    shares = {s.name: s.num_cpus for s in plan.build_plan(config, remote=True) if s.kind == "task"}
    assert shares["decode"] < plan.build_plan(config)[0].num_cpus
    printed = capfd.readouterr().err
    for name in ("decode", "sample"):
        assert f"{name:<9} CPU tasks, {shares[name]:.2g} CPU" in printed


@pytest.mark.ray
def test_a_ray_workers_log_lines_are_printed_as_the_command_lines_one_line_without_secrets(
        local_ray, synthetic_clips, tiny_models, tmp_path, capfd):
    """(security review) A Ray worker's log records reached Python's last-resort handler, and Ray printed
    them on the driver's terminal as they were: no level nor logger, a file name's terminal escape raw
    (ESC[31m coloured the rest of the log), its newline a line of its own, a credential whole."""
    from pipeline.job import run_job
    from schemas.config import RunConfig

    source = tmp_path / "videos"
    source.mkdir()
    shutil.copy(synthetic_clips / "cuts.mp4", source / "cuts.mp4")
    secret = "w0rker-s3cret-value"
    (source / f"bad-{secret}\x1b[31m\nFORGED.mp4").write_bytes(b"not a video at all")
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
                                  "sampling": {"num_frames": 2}, "output": {"thumbnails": False},
                                  "resources": {"executor": "ray"}, "storage": {"secret": secret}})
    summary = run_job(str(source), str(tmp_path / "out"), config, progress=False)
    assert summary.counts["videos_ok"] == 1 and summary.counts["videos_failed"] == 1, summary.render()
    printed = ""
    for _ in range(40):  # (Ray's log monitor relays a worker's lines a moment later)
        printed += capfd.readouterr().err
        if "WARNING workers.stage: stage decode failed on" in printed:
            break
        time.sleep(0.25)
    [line] = [line for line in printed.splitlines() if "workers.stage" in line]
    assert "pid=" in line and "WARNING workers.stage: stage decode failed on " in line, printed
    assert "bad-***\\x1b[31m\\nFORGED.mp4" in line, line
    assert "\x1b[31m" not in printed and secret not in printed
    assert all("\\nFORGED" in text for text in printed.splitlines() if "FORGED" in text), printed


def test_a_ray_worker_process_logs_as_the_command_line_once_whatever_the_runs_it_serves():
    """(mutation review) What `log_like_the_command_line` sets up in a Ray worker process, without Ray:
    its level and logger, the message on one line, the run's credential as `***`; called again for the
    next run the worker serves, it adds no second handler (each line printed twice)."""
    script = """
import logging
from pipeline.log_relay import log_like_the_command_line
from schemas.config import StorageConfig

for _ in range(2):
    log_like_the_command_line(StorageConfig(secret="w0rker-s3cret-value"))
logging.getLogger("workers.stage").warning("stage decode failed on %s: not a media file",
                                           "/up/bad-w0rker-s3cret-value\\x1b[31m\\nFORGED.mp4")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout) == (0, ""), done
    assert done.stderr == ("WARNING workers.stage: stage decode failed on /up/bad-***\\x1b[31m\\nFORGED.mp4: "
                           "not a media file\n"), done.stderr


def test_a_model_actor_logs_as_the_command_line_before_its_stage_is_built(monkeypatch):
    """(mutation review) A model stage runs in a Ray actor (`_on_ray`), not in `_run_task_stages`: its
    process's log lines are set up as the command line's with the run's credentials, before the stage's
    own constructor logs a word (a model's load warnings), and the class keeps its name for Ray."""
    from pipeline import ray_executor
    from schemas.config import RunConfig
    from workers.stage import Stage

    done = []

    class Captions(Stage):
        name = "captions"

        def __init__(self, config, **kwargs):
            done.append(("built", kwargs))

    monkeypatch.setattr(ray_executor, "log_like_the_command_line", lambda storage: done.append(("logs", storage)))
    config = RunConfig.from_dict({"storage": {"secret": "act0r-s3cret"}})
    for emits in (False, True):
        done.clear()
        actor = ray_executor._on_ray(Captions, emits_groups=emits)
        stage = actor(config, preparers=None)
        assert done == [("logs", config.storage), ("built", {"preparers": None})]
        assert actor.__name__ == "Captions" and stage.emits_groups is emits


@pytest.mark.ray
def test_the_runs_row_records_the_precision_the_workers_ran_not_the_drivers_guess(
        local_ray, synthetic_clips, tiny_models, tmp_path, monkeypatch):
    """A Ray worker resolves `models.dtype: auto` on its own node: a driver on a CPU-only head node
    of a GPU cluster, or on a CPU without bf16 instructions, would describe another precision."""
    import pandas as pd

    from pipeline.job import run_job
    from workers import models

    on_workers = "bfloat16" if models.cpu_computes_bf16() else "float32"
    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: on_workers == "float32")  # the driver's guess differs
    run_job(str(synthetic_clips), str(tmp_path / "out"), _embed_config(tiny_models, num_frames=2), progress=False)
    (row,) = pd.read_parquet(tmp_path / "out" / "runs").to_dict("records")
    (embed,) = [model for model in row["models"] if model["role"] == "embed"]
    assert (embed["device"], embed["dtype"]) == ("cpu", on_workers)


@pytest.mark.ray
def test_videos_are_processed_while_the_listing_is_still_running(local_ray, synthetic_clips, tiny_models):
    from pipeline import plan, ray_executor
    from pipeline.sources import list_videos
    from workers.task import VideoTask

    # up to 4 videos a decode task (the default), yet the first one is not held back for three more
    config = _embed_config(tiny_models, num_frames=2)
    assert plan.build_plan(config)[0].batch_size == 4
    refs = list(list_videos(str(synthetic_clips)))
    first_result = threading.Event()

    def listing():
        yield VideoTask(ref=refs[0])
        # the rest of the "bucket" is listed only once a video has come out the other end
        assert first_result.wait(180), "no video finished before the listing ended"
        for ref in refs[1:]:
            yield VideoTask(ref=ref)

    finished = []
    for task in ray_executor.run_ray(listing(), plan.build_plan(config), config):
        first_result.set()
        finished.append(task)
    assert sorted(t.ref.uri for t in finished) == sorted(r.uri for r in refs)
    assert all(t.frame_embeddings is not None and not t.errors for t in finished)


@pytest.mark.ray
def test_a_long_listing_runs_as_successive_ray_data_executions(local_ray, synthetic_clips, tiny_models,
                                                               monkeypatch):
    import dataclasses

    import pipeline.feed
    from pipeline import plan, ray_executor
    from pipeline.sources import list_videos
    from workers.task import VideoTask

    # Ray Data keeps each block's statistics until its execution ends: a listing of 3 videos with
    # 2 a dataset runs as two executions, and every video comes out once, with its results
    config = _embed_config(tiny_models, num_frames=2)
    config = dataclasses.replace(config, resources=dataclasses.replace(config.resources, videos_per_dataset=2))
    feeds = []

    class CountedFeed(pipeline.feed.TaskFeed):
        def __init__(self, tasks, *args, **kwargs):
            feeds.append(self)
            super().__init__(tasks, *args, **kwargs)

    monkeypatch.setattr(pipeline.feed, "TaskFeed", CountedFeed)
    refs = list(list_videos(str(synthetic_clips)))
    assert len(refs) == 3
    finished = list(ray_executor.run_ray((VideoTask(ref=ref) for ref in refs), plan.build_plan(config), config))
    assert len(feeds) == 2 and [feed.fed for feed in feeds] == [2, 1]
    assert sorted(t.ref.uri for t in finished) == sorted(r.uri for r in refs)
    assert all(t.frame_embeddings is not None and not t.errors for t in finished)


@pytest.mark.ray
def test_the_listing_waits_while_the_pipeline_is_full(local_ray):
    from pipeline.feed import TaskFeed
    from workers.stage import unpack
    from workers.task import VideoRef, VideoTask

    listed = []

    def listing():
        for i in range(12):
            listed.append(i)
            yield VideoTask(ref=VideoRef(f"s3://b/{i}.mp4", i, None, None, f"v{i}"))

    consumed = 0
    context = local_ray.data.DataContext.get_current()
    stream_buffer = context._max_num_blocks_in_streaming_gen_buffer
    with TaskFeed(listing(), readers=1, in_flight=3) as feed:
        # one block per video, and no stage pauses on its unread blocks before the videos in flight do
        assert (context.target_max_block_size, context._max_num_blocks_in_streaming_gen_buffer) == (1, 3)
        for batch in feed.dataset().iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            consumed += len(unpack(batch))
            time.sleep(0.2)  # a slow consumer: the listing must not run ahead of it
            assert len(listed) - consumed <= 3 + 1, (len(listed), consumed)
            feed.finished()
        feed.check()
    assert consumed == 12
    assert context._max_num_blocks_in_streaming_gen_buffer == stream_buffer


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the reader's process by its environment in /proc")
def test_the_listing_queue_lives_on_the_drivers_node(monkeypatch):
    """Placed by Ray on any node, the queue was lost with a worker node that died (killed, preempted)
    and the job failed with its ActorDiedError traceback (tried on a 2-node cluster: its process
    killed mid-listing), where the tasks and actors lost with that node are retried."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.feed import TaskFeed

    made = []

    class Remote:
        def options(self, **options):
            made.append(options)
            return self

        def remote(self):
            return "queue"

    class Context:
        def get_node_id(self):
            return "ab" * 28

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    assert TaskFeed(iter([])).queue == "queue"
    (options,) = made
    strategy = options["scheduling_strategy"]
    assert options["num_cpus"] == 0 and isinstance(strategy, NodeAffinitySchedulingStrategy)
    assert strategy.node_id == "ab" * 28
    # soft, a queue asking for no resources went to a random node all the same (6 of 10 on 3 nodes)
    assert strategy.soft is False


@pytest.mark.ray
def test_a_listing_queue_lost_as_the_listing_ends_is_no_traceback_of_the_feed_thread(monkeypatch, caplog):
    """The queue lost with its node once every video was listed (soak of Ray on S3: both worker nodes
    killed) raised from the feed thread's last waits: Python printed "Exception in thread vidlens-feed"
    and its traceback on the console. Its readers fail and their videos are lost blocks, as before."""
    import logging

    import ray
    import ray.exceptions

    from pipeline.feed import TaskFeed

    class Put:
        def remote(self, payload):
            return "put"

    class Queue:
        put = Put()

    class Remote:
        def options(self, **options):
            return self

        def remote(self):
            return Queue()

    class Context:
        def get_node_id(self):
            return "ab" * 28

    def lost(refs, *args, **kwargs):
        raise ray.exceptions.RayActorError()

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setattr(ray, "get", lost)
    feed = TaskFeed(iter([]), readers=2)
    with caplog.at_level(logging.WARNING, logger="pipeline.feed"):
        feed._feed()  # (the thread's body)
    assert "the listing's queue was lost after 0 videos were listed" in caplog.text, caplog.text


def test_the_listing_reader_is_never_retried(local_ray):
    # Ray retried a read task whose worker died (max_retries -1): the retry took the queue's next
    # groups, and Ray dropped as many of its first outputs as the dead reader had given (replays, it
    # assumes). Those videos were lost holding their places in flight, and the run waited a day
    # for the reader's idle timeout; a read not retried loses its block, and its videos run again
    from pipeline.feed import TaskFeed

    with TaskFeed(iter([]), readers=1, in_flight=2) as feed:
        read = feed.dataset()._logical_plan.dag
        assert read.ray_remote_args.get("max_retries") == 0, read.ray_remote_args


def test_the_listing_reader_has_a_worker_process_of_its_own(local_ray):
    """Ray gives a task any idle worker of the same runtime env: the reader's own env keeps the
    CPU stages out of its process (which would build them and, once a long listing ended, hold
    them idle beside the working decode worker)."""
    import numpy as np

    from pipeline.feed import READER_RUNTIME_ENV, TaskFeed
    from workers.stage import unpack
    from workers.task import VideoRef, VideoTask

    (name, role), = READER_RUNTIME_ENV["env_vars"].items()
    readers: set[int] = set()

    def listing():
        for i in range(8):
            if i == 4:  # videos have come out already: the reader is running
                readers.update(_processes_with_env(name, role))
            yield VideoTask(ref=VideoRef(f"s3://b/{i}.mp4", i, None, None, f"v{i}"))

    def where(batch):
        return {"pid": np.full(len(unpack(batch)), os.getpid())}

    pids = []
    with TaskFeed(listing(), readers=1, in_flight=2) as feed:
        stage = feed.dataset().map_batches(where, batch_size=1, batch_format="numpy", num_cpus=0.5)
        for batch in stage.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for pid in batch["pid"]:
                pids.append(int(pid))
                feed.finished()
        feed.check()
    # (an earlier test's reader may still be alive, idle: Ray keeps workers a while)
    assert readers and len(pids) == 8
    assert not readers & set(pids)


def _processes_with_env(name: str, value: str) -> set[int]:
    """This user's processes whose environment sets `name` to `value`."""
    wanted, found = f"{name}={value}".encode(), set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _groups_taken(waves, videos, group_bytes, linger_s):
    """The groups one reader takes from a `ListingQueue` while `waves` of items arrive: each
    (seconds after the previous wave, items). Runs the queue in this thread's own event loop."""
    import asyncio

    from pipeline.feed_queue import ListingQueue

    async def scenario():
        queue = ListingQueue()

        async def listing():
            for delay, items in waves:
                await asyncio.sleep(delay)
                await queue.put(items)

        arrivals = asyncio.create_task(listing())
        groups = []
        while not groups or groups[-1][-1:] != [None]:
            group = await queue.take(videos, group_bytes, linger_s, 30.0)
            groups.append([item if item is None else item[1] for item in group])
        await arrivals
        return groups

    return asyncio.run(scenario())


def test_a_reader_takes_groups_by_count_and_bytes_and_waits_only_briefly_to_fill_one():
    small, large = 300_000, 9 * 2**20
    # (a gap of 0.05 s within a linger of 2 s, and a trickle 1 s beyond it: a loaded machine's
    # stalled event loop overtook a linger of 0.5 s)
    waves = [
        (0, [(small, "a")]),
        (3.0, [(small, "b"), (small, "c")]),  # a trickling listing: "a" is not held back for them
        (0.05, [(small, "d"), (small, "e"), (small, "f"), (large, "g"), (small, "h")]),  # soon enough
        (3.0, [(large, "i"), (small, "j")]),
        (0.05, [(small, "k"), None]),
    ]
    # 4 videos at most; the video that reaches the bytes ends its group; a large one first is
    # alone; the sentinel ends the last group
    assert _groups_taken(waves, 4, 8 * 2**20, 2.0) == [
        ["a"], ["b", "c", "d", "e"], ["f", "g"], ["h"], ["i"], ["j", "k", None]]
    queued = [(0, [(large, "a"), (large, "b"), (large, "c"), None])]
    assert _groups_taken(queued, 1, 8 * 2**20, 0.5) == [["a"], ["b"], ["c"], [None]]
    # no bytes limit: large videos group too
    assert _groups_taken(queued, 2, None, 0.5) == [["a", "b"], ["c", None]]


def test_a_reader_makes_a_block_of_each_group_and_ends_at_its_sentinel():
    from pipeline.feed import _drain
    from workers.stage import unpack

    groups = iter([[(1, b"a"), (1, b"b")], [(1, b"c"), None], [(1, b"never read")]])
    blocks = [list(unpack(table.to_pydict())) for table in _drain(lambda: next(groups))]
    assert blocks == [[b"a", b"b"], [b"c"]]
    assert [list(unpack(t.to_pydict())) for t in _drain(iter([[None]]).__next__)] == []
    with pytest.raises(TimeoutError, match="no word from the driver"):
        list(_drain(lambda: []))


@pytest.mark.ray
def test_a_killed_model_worker_is_replaced_and_every_video_is_accounted_for(local_ray, tmp_path, synthetic_clips,
                                                                           tiny_models):
    ray = local_ray
    from pipeline.job import run_job

    videos = tmp_path / "videos"
    videos.mkdir()
    sources = sorted(p for p in synthetic_clips.rglob("*") if p.is_file())
    for copy in range(2):  # six videos
        for source in sources:
            shutil.copy(source, videos / f"{copy}-{source.name}")
    config = _embed_config(tiny_models, num_frames=16)
    killed: list[int] = []
    running = threading.Event()

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    # (an earlier test's embed worker may still be ending: under load, it was found, and gone a
    # second later, and this run's never killed)
    earlier = set(_embed_workers(raylet))

    def kill_the_first_embed_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and running.is_set():
            workers = [pid for pid in _embed_workers(raylet) if pid not in earlier]
            if workers:
                time.sleep(1.0)  # let it take its first batch
                try:
                    os.kill(workers[0], signal.SIGKILL)
                except ProcessLookupError:  # (ended meanwhile: the next one is looked for)
                    earlier.add(workers[0])
                    continue
                killed.append(workers[0])
                return
            time.sleep(0.1)

    running.set()
    killer = threading.Thread(target=kill_the_first_embed_worker, daemon=True)
    killer.start()
    try:
        summary = run_job(str(videos), str(tmp_path / "out"), config, progress=False)
    finally:
        running.clear()
        killer.join(timeout=5)

    assert killed, "the embed worker was never found while the job ran"
    rows = pd.read_parquet(tmp_path / "out" / "videos")
    errors = pd.read_parquet(tmp_path / "out" / "errors")
    names = [Path(uri).name for uri in rows.uri]
    # every video has exactly one row: the worker was replaced and its batch retried, or the video says why not
    assert sorted(names) == sorted(p.name for p in videos.iterdir()), (names, summary.render())
    assert summary.counts["videos_total"] == 6, summary.render()
    print(f"killed embed worker {killed[0]}; {rows.embedding.notna().sum()} of 6 videos embedded, "
          f"{len(errors)} errors rows")
    for uri, embedding in zip(rows.uri, rows.embedding):
        assert embedding is not None or uri in set(errors.uri), (uri, errors.to_dict("records"))


# --- submission logic, without a cluster ------------------------------------------------------


class _FakeJobs:
    """Just enough of `JobSubmissionClient` for the idempotency rules."""

    def __init__(self, statuses, exit_codes=None):
        self.statuses = dict(statuses)
        self.exit_codes = dict(exit_codes or {})
        self.submitted = []

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        code = self.exit_codes.get(job_id)
        message = f"Job entrypoint command failed with exit code {code}, last available logs (truncated to 20,000 " \
                  "chars):\nline one\nline two" if code else ""
        return SimpleNamespace(driver_exit_code=code, message=message, metadata={})

    def get_job_logs(self, job_id):
        return "line one\nline two\n"

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        if job_id not in self.statuses:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return JobStatus(self.statuses[job_id])

    def submit_job(self, **request):
        self.submitted.append(request)
        self.statuses[request["submission_id"]] = "PENDING"
        return request["submission_id"]


def test_the_same_batch_is_one_job_and_a_failed_one_is_retried_under_a_new_id(tmp_path):
    import io

    from pipeline.submit import runtime_env, submission_id, submit
    from schemas.config import RunConfig

    # s3fs also takes its keys nested in client_kwargs: those went to the cluster as they were
    config = RunConfig.from_dict({"stages": ["embed"], "storage": {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "options": {
        "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "nested-s3cr3t"}}}})
    job = submission_id("s3://media/in/", "s3://media/out", config)
    assert job == submission_id("s3://media/in", "s3://media/out/", config.with_overrides({"resources.max_actors": 8}))
    assert job != submission_id("s3://media/in", "s3://media/out", config, run_date="2024-05-31")
    assert job != submission_id("s3://media/in", "s3://media/out", config.with_overrides({"stages": ["ocr"]}))

    log = io.StringIO()
    fresh = _FakeJobs({})
    (tmp_path / "pyproject.toml").touch()  # a source checkout: sent as the job's working folder
    assert submit(fresh, "s3://media/in", "s3://media/out", config, working_dir=str(tmp_path), stream=log).submitted
    request = fresh.submitted[0]
    assert request["submission_id"] == job
    shipped = json.dumps(request["runtime_env"]) + request["entrypoint"]
    assert "s3cr3t-value" not in shipped and "AKIAEXAMPLE" not in shipped and "nested-s3cr3t" not in shipped
    assert "eu-west-1" in shipped  # the options that are not secrets go with it
    assert request["runtime_env"]["working_dir"] == str(tmp_path) and ".venv" in request["runtime_env"]["excludes"]
    # an installed vidlens: its packages, not the site-packages folder they are in (gigabytes)
    installed = runtime_env(config, working_dir=str(tmp_path / "site-packages"))
    assert "working_dir" not in installed and installed["py_modules"] == [
        str(tmp_path / "site-packages" / package) for package in ("pipeline", "workers", "schemas")]

    for status in ("PENDING", "RUNNING", "SUCCEEDED"):
        jobs = _FakeJobs({job: status})
        again = submit(jobs, "s3://media/in", "s3://media/out", config, stream=log)
        assert (again.job_id, again.submitted, jobs.submitted) == (job, False, [])
    # --full the same night is a batch of its own: it had the night's id, found done, and reprocessed nothing
    jobs = _FakeJobs({job: "SUCCEEDED"})
    full = submit(jobs, "s3://media/in", "s3://media/out", config, full=True, working_dir=str(tmp_path), stream=log)
    assert full.submitted and full.job_id != job and jobs.submitted[0]["entrypoint"].endswith("--full")
    # so is --retry-failed (the videos given up on: `vidlens run --retry-failed`)
    jobs = _FakeJobs({job: "SUCCEEDED", full.job_id: "SUCCEEDED"})
    retried = submit(jobs, "s3://media/in", "s3://media/out", config, retry_failed=True, working_dir=str(tmp_path),
                     stream=log)
    assert retried.submitted and retried.job_id not in (job, full.job_id)
    assert jobs.submitted[0]["entrypoint"].endswith("--retry-failed")

    failed = _FakeJobs({job: "FAILED", f"{job}-retry1": "STOPPED"})
    retry = submit(failed, "s3://media/in", "s3://media/out", config, stream=log)
    assert retry.submitted and retry.job_id == f"{job}-retry2"
    assert "submitting retry 2" in log.getvalue()
    assert f"job id {job}-retry2" in log.getvalue().splitlines()  # the id submitted, said before its upload


def test_status_asks_the_job_server_for_the_jobs_status_once_before_acting(monkeypatch, capsys):
    """(mutation review) The check that the job exists and --follow's check that it is still running
    asked the job server the same question twice in a row: one answer serves both."""
    from pipeline import submit as submit_module
    from pipeline.cli import main

    jobs = _FakeJobs({"vidlens-done": "SUCCEEDED"})
    asked, get_job_status = [], jobs.get_job_status
    jobs.get_job_status = lambda job_id: asked.append(job_id) or get_job_status(job_id)
    monkeypatch.setattr(submit_module, "connect", lambda address: jobs)
    assert main(["status", "vidlens-done", "--follow"]) == 0
    assert "job vidlens-done: SUCCEEDED" in capsys.readouterr().out
    # once before acting, once for the status printed (`describe`), once for the exit code
    assert asked == ["vidlens-done"] * 3


def test_a_job_whose_run_had_videos_fail_is_done_for_the_night_with_exit_3(monkeypatch, capsys):
    """`vidlens run` exits 3 when some videos failed, which Ray calls FAILED: not to be retried
    the same night (its failed videos are, the next), and said as a local run says it."""
    from pipeline import submit as submit_module
    from pipeline.cli import main
    from pipeline.submit import submission_id
    from schemas.config import RunConfig

    config = RunConfig.from_dict({"stages": ["embed"]})
    job = submission_id("s3://media/in", "s3://media/out", config, "2024-05-31")
    jobs = _FakeJobs({job: "FAILED"}, exit_codes={job: 3})
    monkeypatch.setattr(submit_module, "connect", lambda address: jobs)
    args = ["submit", "s3://media/in", "--out", "s3://media/out", "--stages", "embed", "--run-date", "2024-05-31"]
    assert main(args) == 3 and jobs.submitted == []
    assert "is PARTIAL: not submitting it again" in capsys.readouterr().err
    assert main(["status", job]) == 3
    out = capsys.readouterr().out
    assert f"job {job}: PARTIAL: finished, some videos failed" in out and out.count("line two") == 1
    # the videos it gave up on, asked for (`vidlens run --retry-failed`): a batch of its own
    assert main([*args, "--no-follow", "--retry-failed"]) == 0
    assert jobs.submitted[0]["entrypoint"].endswith("--retry-failed") and jobs.submitted.pop(0)["submission_id"] \
        == submission_id("s3://media/in", "s3://media/out", config, "2024-05-31", retry_failed=True)
    jobs.exit_codes[job] = 2  # the run itself failed: retried, and its status says how
    assert main([*args, "--no-follow"]) == 0 and jobs.submitted[0]["submission_id"] == f"{job}-retry1"
    capsys.readouterr()
    assert main(["status", job]) == 2
    out = capsys.readouterr().out
    assert "Job entrypoint command failed with exit code 2" in out and out.count("line two") == 1
    for command in ("stop", "status"):  # (status printed it on stdout, without "vidlens: error:")
        assert main([command, "vidlens-nosuchjob"]) == 2
        said = capsys.readouterr()
        assert said.err.startswith("vidlens: error: no job vidlens-nosuchjob on this cluster") and not said.out
    # an output given for the job id (`vidlens status OUT`): said so, the job server never asked
    monkeypatch.setattr(submit_module, "connect", lambda address: pytest.fail("the job server was asked"))
    monkeypatch.chdir(Path(__file__).parent.parent)
    for command, given in (("status", "s3://media/out"), ("status", "./out"), ("status", str(Path(__file__).parent)),
                           ("status", "tests"), ("stop", "./out")):  # (tests: a folder here, named without a /)
        assert main([command, given]) == 2
        assert f"vidlens: error: {given} is not a job id: vidlens {command} takes the id vidlens submit printed " \
               f"(vidlens-...); an output's runs are in its runs table: vidlens query {given} " in capsys.readouterr().err


def test_ray_says_nothing_of_what_vidlens_chose_and_its_info_lines_wait_for_verbose(monkeypatch):
    import logging

    from pipeline.ray_cluster import quiet_ray_logs

    monkeypatch.setattr(logging.getLogger("ray.data"), "level", logging.NOTSET)
    quiet_ray_logs()
    quiet_ray_logs()  # (twice: one filter each)
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING
    progress = logging.getLogger("ray.data._internal.progress")
    assert len(progress.filters) == len(set(map(id, progress.filters)))

    def passes(name, message):
        logger = logging.getLogger(name)
        return bool(logger.filter(logger.makeRecord(name, logging.WARNING, __file__, 1, message, (), None)))

    assert not passes("ray.data._internal.progress", "Progress bars disabled. To enable, set ...")
    assert passes("ray.data._internal.progress", "Progress bars for operators disabled.")  # not chosen: kept
    auth = "ray._private.authentication.authentication_token_setup"
    assert not passes(auth, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
    assert passes(auth, "Token authentication is disabled for this Ray cluster. Anyone with network access ...")


def test_a_block_ray_data_goes_on_without_is_one_line_naming_its_cause():
    """A listing queue killed once (chaos soak on Ray, 2026-12-07) printed Ray Data's error with 60 lines of
    its internals' traceback and a setting the user never set ("Ignoring this exception with remaining
    max_errored_blocks=58"); vidlens' own warning then says what it does about it. One line now, naming
    the cause Ray wrapped; with -v, as Ray said it."""
    import logging

    from pipeline.ray_cluster import quiet_ray_logs

    name = "ray.data._internal.execution.streaming_executor_state"
    said = 'An exception was raised from a task of operator "ReadVideoListing". Ignoring this exception with ' \
           'remaining max_errored_blocks=58.'
    cause = Exception("Failed to deserialize exception. Refer to https://docs.ray.io/ for more information.\n"
                      "Original exception:\nray.exceptions.RayTaskError: ray::ReadVideoListing() (pid=23426)\n"
                      '  File "pipeline/feed.py", line 236, in take\n'
                      "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
                      "\tclass_name: ListingQueue")

    def printed() -> str:
        logger = logging.getLogger(name)
        record = logger.makeRecord(name, logging.ERROR, __file__, 1, said, (), (Exception, cause, None))
        assert logger.filter(record)
        return logging.Formatter().format(record)

    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.WARNING)
        quiet_ray_logs()
        assert printed() == ('An exception was raised from a task of operator "ReadVideoListing" (ActorDiedError: '
                             "The actor died unexpectedly before finishing this task.): the run goes on without it "
                             "(-v shows its traceback)")
        root.setLevel(logging.INFO)  # vidlens -v
        verbose = printed()
        assert verbose.startswith(said + "\n") and "class_name: ListingQueue" in verbose
    finally:
        root.setLevel(level)


#: lines a listing reader printed as its node's raylet was SIGKILLed (3 nodes on one machine, 2026-12-07):
#: the check, and the first and last of its 64 frames
_RAYLET_GONE = [
    "[2026-12-07 17:42:09,153 C 26279 26279] memory_store.cc:352:  An unexpected system state has occurred. You "
    "have likely discovered a bug in Ray. Please report this issue at https://github.com/ray-project/ray/issues and "
    "we'll work with you to fix it. Check failed: raylet_ipc_client_->NotifyWorkerBlocked() Status not OK: IOError: "
    "Broken pipe ",
    "*** StackTrace Information ***",
    "/work/main/.venv/lib/python3.11/site-packages/ray/_raylet.so(+0x1812b9a) [0x7f5f66012b9a] ray::operator<<()",
    "/work/main/.venv/lib/python3.11/site-packages/ray/_raylet.so(_ZN3ray6RayLogD1Ev+0x469) [0x7f5f660151c9] "
    "ray::RayLog::~RayLog()",
    "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0(PyObject_Vectorcall+0x33) [0x7f5f67158ba3] "
    "PyObject_Vectorcall",
    "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0(_PyRun_AnyFileObject+0x3c) [0x7f5f6729a80c] "
    "_PyRun_AnyFileObject",
    "",
]


def test_a_workers_crash_trace_as_its_raylet_went_away_is_one_warning_and_whole_with_verbose(monkeypatch, caplog):
    """A worker node killed while a task worker on it waited on its raylet (chaos soak on Ray, 2026-12-07):
    Ray relayed that worker's C++ check failure and 60 lines of stack to the driver's console, in the
    middle of a run that reruns what it lost. One warning now, naming the worker, its node and the check;
    the worker's other lines, and other workers', as Ray prints them; with -v, all of it."""
    import logging

    import ray._private.ray_logging as ray_logging

    from pipeline import ray_relayed

    def relay(verbose: bool) -> list:
        dispatcher, printed = ray_logging.WorkerStandardStreamDispatcher(), []
        dispatcher.add_handler("ray_print_logs", lambda data: printed.append((data["pid"], data["lines"])))
        monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
        ray_relayed.collapse_crash_traces()
        ray_relayed.collapse_crash_traces()  # (once: not wrapped twice)
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        reader = {"ip": "10.0.0.7", "pid": 26279, "task_name": "ReadVideoListing", "is_err": True, "job": "01"}
        decoder = dict(reader, ip="10.0.0.8", pid=31, task_name="MapBatches(_run_task_stages)")
        # (a trace may come in several batches)
        dispatcher.emit(dict(reader, lines=["WARNING workers.stage: slow store", *_RAYLET_GONE[:4]]))
        dispatcher.emit(dict(decoder, lines=["WARNING workers.stage: stage decode failed on /v/a.mp4"]))
        dispatcher.emit(dict(reader, lines=_RAYLET_GONE[4:]))
        return printed

    root = logging.getLogger()
    level = root.level
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.ray_relayed"):
            printed = relay(verbose=False)
        assert printed == [(26279, ["WARNING workers.stage: slow store"]),
                           (31, ["WARNING workers.stage: stage decode failed on /v/a.mp4"]),
                           (26279, [])]  # (Ray's handler prints none, and its deduplication goes on)
        assert [record.getMessage() for record in caplog.records] == [
            "ReadVideoListing (pid 26279, node 10.0.0.7) ended as its node's raylet went away: Check failed: "
            "raylet_ipc_client_->NotifyWorkerBlocked() Status not OK: IOError: Broken pipe "
            "(-v shows Ray's stack trace)"]
        caplog.clear()
        assert relay(verbose=True) == [(26279, ["WARNING workers.stage: slow store", *_RAYLET_GONE[:4]]),
                                       (31, ["WARNING workers.stage: stage decode failed on /v/a.mp4"]),
                                       (26279, _RAYLET_GONE[4:])]
        assert not caplog.records
        # (the other check a worker fails as its raylet goes away, seen in another run)
        unblocked = _RAYLET_GONE[0].replace("352", "383").replace("NotifyWorkerBlocked", "NotifyWorkerUnblocked")
        root.setLevel(logging.WARNING)
        # (with the report of the abort that follows the stack, in the format of Ray's signal handler)
        aborted = ["*** SIGABRT received at time=1765129329 on cpu 1 ***",
                   "PC: @     0x7f5f6801a9fc  (unknown)  pthread_kill", "    @     0x7f5f661c2ac8       1392  (unknown)"]
        collapsing = ray_relayed._Collapsing(print)
        with caplog.at_level(logging.WARNING, logger="pipeline.ray_relayed"):
            assert collapsing.rewritten({"pid": 25133, "lines": [unblocked, *aborted]})["lines"] == []
        assert "Check failed: raylet_ipc_client_->NotifyWorkerUnblocked() Status not OK: IOError: Broken pipe (" \
            in caplog.text
        # a check that fails for another reason is a bug of Ray's, not a node gone: its trace stays whole
        caplog.clear()
        other = _RAYLET_GONE[0].replace("IOError: Broken pipe", "Invalid: object already sealed")
        assert collapsing.rewritten({"pid": 26, "lines": [other, *_RAYLET_GONE[1:]]})["lines"] == [
            other, *_RAYLET_GONE[1:]]
        assert not caplog.records
    finally:
        root.setLevel(level)
    # a Ray without that handler, or without the dispatcher: its lines as Ray prints them, and no error
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", object())
    ray_relayed.collapse_crash_traces()
    ray_relayed.settle()


#: the note an agent of a node published as the node's raylet was SIGKILLed (3 nodes on one machine, 2026-12-07):
#: its first line, and the first, a middle and the last of the 20 lines of the raylet's log it quotes
_RAYLET_DIED = (
    "Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL by the user or system OOM "
    "killer, (2) Invalid memory access from Raylet causing SIGSEGV or SIGBUS, (3) Other termination signals. Last 20 "
    "lines of the Raylet logs:\n"
    "    [state-dump] \tNodeManager.ScheduleAndGrantLeases - 1 total (1 active), Execution time: mean = 0.00ms, total "
    "= 0.00ms, Queueing time: mean = 0.00ms, max = -0.00ms, min = 9223372036854.78ms, total = 0.00ms\n"
    "    [state-dump] \n"
    "    [2026-12-07 19:54:30,755 I 30089 30089] (raylet) accessor.cc:475: Received address and liveness notification "
    "for node, IsAlive = 1 node_id=ca7325d7d521a9142afdd2e0dbd6adfe3312bf5fa11075424698febc\n"
    "    [2026-12-07 19:54:35,170 I 30089 30099] (raylet) object_store.cc:37: Object store current usage 5.667e-06 / "
    "6.75394 GB.\n"
    "    [2026-12-07 19:54:36,368 I 30089 30089] (raylet) worker_pool.cc:564: Started worker process with pid 30457 "
    "worker_id=280191ccc62f16e29fc50cb8cea1bb10b02819adddc0ef07b6603271\n")
#: what Ray said of the same node once its health checks had missed it: another error, printed as Ray prints it
_NODE_MARKED_DEAD = (
    "The node with node id: f27ba052d7859ac60716761a5611331a638c4675b9b2213c644272e4 and address: 192.0.2.2 and node "
    "name: 192.0.2.2 has been marked dead because the detector has missed too many heartbeats from it. This can happen "
    "when a \t(1) raylet crashes unexpectedly (OOM, etc.) \n\t(2) raylet has lagging heartbeats due to slow network or "
    "busy workload.\n")


def test_rays_note_of_a_killed_raylet_is_one_warning_a_node_and_whole_with_verbose(monkeypatch, caplog):
    """Both worker nodes' raylets SIGKILLed in a run (3 nodes on one machine, 2026-12-07): Ray printed its note
    "Raylet is terminated ... Last 20 lines of the Raylet logs" and those lines, twice a node (each of the node's
    agents publishes it), 92 lines on the console through its error channel, which the wrap of the relayed lines
    does not see. One warning a node now, naming its raylet; Ray's other errors as Ray prints them; with -v, all."""
    import logging
    import types

    import ray._private.worker as ray_worker

    from pipeline import ray_relayed

    other_node = _RAYLET_DIED.replace("30089", "30124")

    def listened(verbose: bool) -> list:
        """What Ray's listener of the error channel has printed of the notes, as it got them in that run."""
        printed, errors = [], [_RAYLET_DIED, _RAYLET_DIED, other_node, _NODE_MARKED_DEAD, other_node]

        def rays(data: dict, ignore_prefix: bool) -> None:
            printed.append((data["pid"], data["lines"], ignore_prefix))

        monkeypatch.setattr(ray_worker, "print_to_stdstream", rays)
        ray_relayed.collapse_raylet_deaths()
        ray_relayed.collapse_raylet_deaths()  # (once: not wrapped twice)
        assert ray_worker.print_to_stdstream.wrapped is rays
        stopped = threading.Event()

        def poll() -> tuple:
            if not errors:
                stopped.set()
                return None, None
            return b"", {"job_id": None, "error_message": errors.pop(0), "type": "raylet_died"}

        worker = types.SimpleNamespace(gcs_error_subscriber=types.SimpleNamespace(subscribe=lambda: None, poll=poll),
                                       current_job_id=types.SimpleNamespace(binary=lambda: b"01"))
        monkeypatch.setattr(ray_worker, "_internal_kv_initialized", lambda: False)
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        ray_worker.listen_error_messages(worker, stopped)
        return [(pid, lines) for pid, lines, ignore_prefix in printed if lines]

    root = logging.getLogger()
    level = root.level
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.ray_relayed"):
            assert listened(verbose=False) == [("raylet", [_NODE_MARKED_DEAD])]
        said = [record.getMessage() for record in caplog.records]
        assert said == [f"a Ray node's raylet (pid {pid}) was terminated unexpectedly (killed, or out of memory): the "
                        "node is lost, and what ran there runs again elsewhere (-v shows Ray's note with the last "
                        "lines of its log; the node's Ray logs, raylet.out, have all of them)"
                        for pid in (30089, 30124)]
        caplog.clear()
        assert listened(verbose=True) == [("raylet", [note]) for note in (_RAYLET_DIED, _RAYLET_DIED, other_node,
                                                                          _NODE_MARKED_DEAD, other_node)]
        assert not caplog.records
    finally:
        root.setLevel(level)
    # a Ray whose listener prints its errors otherwise: nothing wrapped, and no error
    monkeypatch.setattr(ray_worker, "print_to_stdstream", print)
    monkeypatch.setattr(ray_worker, "listen_error_messages", lambda worker, stopped: None)
    ray_relayed.collapse_raylet_deaths()
    assert ray_worker.print_to_stdstream is print
    monkeypatch.delattr(ray_worker, "listen_error_messages")
    ray_relayed.collapse_raylet_deaths()
    ray_relayed.settle()


def test_raylets_of_two_nodes_that_share_a_pid_are_each_said(caplog):
    """(mutation review) Nodes each in a container of their own start their raylet in a fresh pid namespace,
    often with the same pid, and a node restarted in one gets it again: the notes were told apart by that
    pid, and the second node's death was left out, its note and its warning. One warning a note now (a
    node's agents send the same note), the pid named as it was."""
    import logging

    from pipeline import ray_relayed

    other_node = _RAYLET_DIED.replace("19:54:3", "19:58:1")  # (the same pid, its log's lines later)
    printed = []
    errors = ray_relayed._RayletDeaths(lambda data, ignore_prefix: printed.extend(data["lines"]))
    with caplog.at_level(logging.WARNING, logger="pipeline.ray_relayed"):
        for note in (_RAYLET_DIED, _RAYLET_DIED, other_node, other_node):
            errors({"lines": [note], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == []
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2 and all(message.startswith("a Ray node's raylet (pid 30089) was terminated unexpectedly")
                                  for message in said), said


def test_an_error_the_raylet_printer_cannot_read_is_printed_as_ray_would():
    """(mutation review) The printer runs on Ray's thread that listens for its errors, which ends at any
    exception but a lost connection: an error the wrap cannot read is printed as Ray would print it, and
    the errors after it still come."""
    from pipeline import ray_relayed

    printed = []
    errors = ray_relayed._RayletDeaths(lambda data, ignore_prefix: printed.append(data["lines"]))
    for note in (b"Raylet is terminated. Termination is unexpected.", None, _NODE_MARKED_DEAD):
        errors({"lines": [note], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == [[b"Raylet is terminated. Termination is unexpected."], [None], [_NODE_MARKED_DEAD]]


def test_the_run_collapses_crash_traces_from_the_ray_it_starts_or_finds_connected(monkeypatch):
    """Ray adds its handler of relayed lines as it connects: a run that wrapped it before ray.init, or not
    where Ray was connected already (a test's, a notebook's), printed the traces whole all the same. Ray's
    printer of its errors is wrapped either way too."""
    import logging

    import ray
    import ray._private.ray_logging as ray_logging
    import ray._private.worker as ray_worker

    from pipeline import ray_cluster, ray_relayed

    def connected() -> tuple:
        dispatcher, printed = ray_logging.WorkerStandardStreamDispatcher(), []
        monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
        return dispatcher, printed, lambda **kwargs: dispatcher.add_handler("ray_print_logs", printed.append)

    def relayed(dispatcher, printed) -> list:
        dispatcher.emit({"ip": "10.0.0.7", "pid": 26279, "task_name": "ReadVideoListing", "lines": _RAYLET_GONE})
        return [data["lines"] for data in printed]

    monkeypatch.setattr(ray_cluster, "_check_reachable", lambda address: None)  # no cluster runs here
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # (given back after)
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.WARNING)
        dispatcher, printed, init = connected()
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", init)
        ray_cluster.ensure_ray("127.0.0.1:6379")
        assert relayed(dispatcher, printed) == [[]]
        assert isinstance(ray_worker.print_to_stdstream, ray_relayed._RayletDeaths)  # (Ray's errors: the same)
        monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream.wrapped)
        dispatcher, printed, init = connected()
        init()
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        ray_cluster.ensure_ray(None)
        assert relayed(dispatcher, printed) == [[]]
        assert isinstance(ray_worker.print_to_stdstream, ray_relayed._RayletDeaths)
    finally:
        root.setLevel(level)


def test_rays_last_lines_are_waited_for_briefly_and_printed_before_the_runs_summary(monkeypatch, capsys,
                                                                                   tmp_path):
    """Ray relayed lines after the run's summary: a killed worker node's death, noticed by Ray's health
    checks after the run had ended (2 of 3 runs on a 3-node cluster with both worker nodes killed,
    2026-12-07), and a worker's lines Ray's log monitor had not yet read. The command waits until Ray
    relays nothing for half a second (a second at most), and shuts Ray down, as its exit would, before
    it prints the summary."""
    import time

    import ray
    import ray._private.ray_logging as ray_logging
    import ray._private.worker as ray_worker

    import pipeline.job
    from pipeline import cli, command_stops, ray_cluster, ray_relayed
    from pipeline.summary import RunSummary

    dispatcher, said = ray_logging.WorkerStandardStreamDispatcher(), []
    dispatcher.add_handler("ray_print_logs", lambda data: said.append("relayed"))
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
    ray_relayed.collapse_crash_traces()
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: said.append("error"))
    ray_relayed.collapse_raylet_deaths()

    clocks: list = []

    class Clock:  # (Ray's lines and the waiting on a clock of the test's own: no timing of the machine's)
        def __init__(self, lines_every_s: float | None, errors: bool = False) -> None:
            # (after the handlers' last line, as in a run: a minute after an earlier clock's too)
            self.now = self.start = time.monotonic() + 60 * len(clocks)
            clocks.append(self)
            self.lines_every_s, self.next_line = lines_every_s, self.now + (lines_every_s or 0)
            self.errors = errors  # (Ray's errors for the driver, such as a node's death, in place of lines)

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds
            if self.lines_every_s and self.now >= self.next_line - 1e-9:
                self.next_line += self.lines_every_s
                if self.errors:  # (as Ray's listener of its error channel prints one)
                    ray_worker.print_to_stdstream({"lines": ["x"], "pid": "raylet", "is_err": False}, False)
                else:
                    dispatcher.emit({"ip": "10.0.0.7", "pid": 5, "is_err": True, "lines": ["WARNING workers.stage: x"]})

    def settled(lines_every_s: float | None, errors: bool = False) -> float:
        clock = Clock(lines_every_s, errors)
        monkeypatch.setattr(ray_relayed, "time", clock)
        ray_relayed.settle()  # (as the command calls it: half a second's quiet, a second at most)
        return clock.now - clock.start

    assert 0.5 <= settled(None) < 0.6  # (nothing comes: the log monitor's reading time, and no more)
    assert 1.0 <= settled(0.1) < 1.1  # (lines keep coming: bounded)
    assert said.count("relayed") >= 9
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert 0.7 <= settled(0.3, errors=True) < 1.1 and said.count("error") >= 1  # (errors, which come too)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # (Ray shut down: its printer hears nothing more)
    assert 0.5 <= settled(0.3, errors=True) < 0.6
    monkeypatch.setattr(ray_relayed, "time", time)

    # (some videos failed: a second stop while Ray shuts down ends the command with that 3, not 0)
    summary = RunSummary(run_id="r1", source="/v", output="/o", status="partial")
    monkeypatch.setattr(pipeline.job, "run_job", lambda *args, **kwargs: ray_cluster.note_connected() or summary)
    monkeypatch.setattr(ray_relayed, "settle", lambda: said.append("settled"))
    # (the summary file written first: a second stop while Ray shuts down ends the process there)
    summary_file = tmp_path / "summary.json"

    def shut_ray_down(code: int, settle=None) -> None:  # (the Ray the run connected, once)
        if ray_cluster.connected_here():
            ray_cluster.disconnected()
            said.append(f"shut down ({code}), {summary_file.exists() and 'after the file'}")

    monkeypatch.setattr(command_stops, "shut_ray_down", shut_ray_down)
    monkeypatch.setattr(RunSummary, "render", lambda self: said.append("summary") or "run r1: partial")
    said.clear()
    assert cli.main(["run", "/v", "--out", "/o", "--executor", "ray", "--no-progress",
                     "--summary-json", str(summary_file)]) == 3
    assert said == ["settled", "shut down (3), after the file", "summary"]
    # a local run neither waits nor imports Ray for it
    script = "import sys, time, types; from pipeline import ray_relayed; slept = []; " \
             "ray_relayed.time = types.SimpleNamespace(monotonic=time.monotonic, sleep=slept.append); " \
             "ray_relayed.settle(); print(slept == [], 'ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout == "True False\n", done


def test_a_refused_token_is_said_as_one(monkeypatch):
    import ray.job_submission

    from pipeline.submit import SubmitError, connect

    class AuthenticationError(Exception):
        pass

    def refuse(address):
        raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token\n\n"
                                  "Token authentication is enabled but no authentication token was found.")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    with pytest.raises(SubmitError) as refused:
        connect("http://127.0.0.1:8277")
    message = str(refused.value)
    assert "\n" not in message and "cannot reach" not in message
    assert message.startswith("the Ray job server at http://127.0.0.1:8277 refused the request (Authentication "
                              "required: Unauthorized: Missing authentication token): set RAY_AUTH_MODE=token")


def test_an_unreachable_job_server_is_named_as_one_not_as_the_bucket(monkeypatch, capsys):
    # the connection error under the SubmitError (urllib3's NewConnectionError, a kind of
    # ConnectTimeoutError) was taken for the bucket's: "cannot use s3://b/v or s3://b/o: the
    # storage endpoint could not be reached", when the SSH tunnel to the dashboard was down
    import ray.job_submission

    from pipeline.cli import main

    class NewConnectionError(Exception):  # urllib3's, as requests raises it
        pass

    class ConnectTimeoutError(Exception):
        pass

    def unreachable(address):
        try:
            raise ConnectTimeoutError("HTTPConnection(host='127.0.0.1', port=1): Failed to establish a connection")
        except ConnectTimeoutError as exc:
            raise ConnectionError(f"Failed to connect to Ray at address: {address}.") from exc

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", unreachable)
    for command in (["submit", "s3://b/v", "--out", "s3://b/o"], ["status", "vidlens-0123456789abcdef"]):
        assert main([*command, "--address", "http://127.0.0.1:1"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("vidlens: error: cannot reach the Ray job server at http://127.0.0.1:1"), error
        assert "storage endpoint" not in error


def test_a_submit_refuses_the_run_flags_its_job_cannot_follow(monkeypatch, capsys):
    """--ray-address (vidlens run's) was dropped, and the job went to 127.0.0.1:8265; --executor
    local ran on Ray all the same. Both are refused before the cluster is reached."""
    import ray.job_submission

    from pipeline.cli import main

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient",
                        lambda address: pytest.fail(f"the job server at {address} was reached"))
    for flags, said in ((["--ray-address", "http://127.0.0.1:8266"], "--ray-address http://127.0.0.1:8266: "
                         "vidlens submit sends its job to a cluster's job server, given as --address"),
                        (["--executor", "local"], "--executor local: a submitted job runs on the cluster's Ray")):
        assert main(["submit", "s3://b/v", "--out", "s3://b/o", *flags]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"vidlens: error: {said}"), error


def test_ctrl_c_while_following_a_job_says_the_job_goes_on(monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) stops only the following; the command ended with exit 130 and not a word,
    as if the job had been stopped with it."""
    from pipeline import submit as submit_module
    from pipeline.cli import main

    jobs = _FakeJobs({})

    async def interrupted(job_id):
        raise KeyboardInterrupt
        yield  # (an async generator, as Ray's)

    jobs.tail_job_logs = interrupted
    monkeypatch.setattr(submit_module, "connect", lambda address: jobs)
    with pytest.raises(KeyboardInterrupt):  # (main's own stop handling makes it exit 130)
        main(["submit", "s3://media/in", "--out", "s3://media/out", "--stages", "embed"])
    job = jobs.submitted[0]["submission_id"]
    error = capsys.readouterr().err
    assert f"stopped following job {job}, which goes on on the cluster: `vidlens status {job} --follow` follows " \
           f"it again, `vidlens stop {job}` stops it" in error
    jobs.statuses[job] = "RUNNING"
    with pytest.raises(KeyboardInterrupt):
        main(["status", job, "--follow"])
    assert f"stopped following job {job}, which goes on" in capsys.readouterr().err


def test_sigterm_while_following_a_job_says_the_job_goes_on(monkeypatch, capsys):
    """(mutation review) A scheduler's or `timeout`'s SIGTERM (SystemExit 143 from the command's handler)
    stops only the following, as Ctrl-C does: the job goes on, and the command says so."""
    from pipeline import submit as submit_module
    from pipeline.cli import main

    jobs = _FakeJobs({"vidlens-running": "RUNNING"})

    async def terminated(job_id):
        raise SystemExit(143)
        yield  # (an async generator, as Ray's)

    jobs.tail_job_logs = terminated
    monkeypatch.setattr(submit_module, "connect", lambda address: jobs)
    with pytest.raises(SystemExit):
        main(["status", "vidlens-running", "--follow"])
    assert "stopped following job vidlens-running, which goes on on the cluster" in capsys.readouterr().err


def test_a_submitted_jobs_missing_model_folder_is_said_as_the_nodes_path(monkeypatch, tmp_path):
    """In a job `vidlens submit` sent, the working folder is Ray's copy of the project
    (.../runtime_resources/working_dir_files/_ray_pkg_...): "a relative one starts from" there said
    nothing a user could act on."""
    from schemas.config import SUBMITTED_CONFIG_ENV as CONFIG_ENV
    from workers.model_sources import missing_model_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert f"(a relative one starts from {tmp_path})" in missing_model_folder("./models/clip", "embed")
    monkeypatch.setenv(CONFIG_ENV, "{}")
    said = missing_model_folder("./models/clip", "embed")
    assert str(tmp_path) not in said
    assert "the folder ./models/clip does not exist. Fix: check the path (a job vidlens submit sent reads it on " \
           "the cluster's nodes, which must have it at that path; a relative one that did not exist where vidlens " \
           "submit ran was sent as written" in said


def test_a_submit_uploads_the_packages_not_the_checkouts_tests_and_docs(tmp_path):
    """Ray zips a job's working folder without compressing it: the checkout sent 2.8 MB, 1.7 of
    them tests/ and docs/ (docs/benchmarks.md alone 0.4), which no job reads."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from pipeline.submit import runtime_env
    from schemas.config import RunConfig

    env = runtime_env(RunConfig())
    package = tmp_path / "job.zip"
    create_package(env["working_dir"], package, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    top = {name.split("/")[0] for name in names}
    assert {"pipeline", "workers", "schemas", "pyproject.toml"} <= top and not top & {"tests", "docs", "bench"}
    assert "pipeline/report_assets" in {name.rsplit("/", 1)[0] for name in names}  # (a folder: not excluded)
    assert package.stat().st_size < 1.5e6


def _ray_run_ended_by(exc, monkeypatch, tmp_path, capsys) -> str:
    """What `vidlens run --executor ray` says on stderr where Ray fails the run with `exc` (exit 2)."""
    from pipeline import job
    from pipeline.cli import main

    def run_job(*args, **kwargs):
        raise exc

    monkeypatch.setattr(job, "run_job", run_job)
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray"]) == 2
    return capsys.readouterr().err


def test_a_run_that_ray_fails_for_a_lost_node_or_actor_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    """A worker node killed mid-job (2-node cluster) ended the job's run with Ray's NodeDiedError (or
    the listing queue's ActorDiedError) as a 100-line traceback and exit 1, a bug's; the resubmit
    that goes on from what was published was left for the user to guess."""
    import ray.exceptions

    from pipeline import job
    from pipeline.cli import main

    died = ray.exceptions.NodeDiedError(
        "Task failed because the node it was running on is dead or unavailable. Node IP: 10.0.0.2, node ID: "
        "a9c0. This can happen if the node was preempted, had a hardware failure, or its raylet crashed.")
    for exc, kind in ((died, "NodeDiedError"), (ray.exceptions.ActorDiedError(), "ActorDiedError"),
                      (ray.exceptions.WorkerCrashedError(), "WorkerCrashedError"),
                      # (the listing queue's death, as the driver got it on the cluster)
                      (ray.exceptions.UnserializableException(
                          "Original exception:\nray.exceptions.RayTaskError: ray::ReadVideoListing() (pid=1)\n  File "
                          "\"feed.py\", line 66, in _drain\nray.exceptions.ActorDiedError: The actor died unexpectedly "
                          "before finishing this task.\n\tclass_name: ListingQueue\n"), "ActorDiedError")):
        error = _ray_run_ended_by(exc, monkeypatch, tmp_path, capsys)
        assert error.startswith(f"vidlens: error: the Ray cluster lost a node, worker or actor the run could not "
                                f"go on without ({kind}: "), error
        assert "run the same command again (a job: vidlens submit it again)" in error
        assert "Traceback" not in error and error.count("\n") == 1 and "This can happen" not in error
    monkeypatch.setattr(job, "run_job", lambda *args, **kwargs: (_ for _ in ()).throw(KeyError("bug")))
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray"])


@pytest.fixture
def ctrl_c_as_a_terminals():
    """SIGINT handled as a terminal's command has it: pytest started in a script's background (`.ci/run`)
    ignores it, and a command leaves an ignored SIGINT ignored (a stop sent then would do nothing)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_run_that_fails_on_ray_says_its_error_after_rays_last_lines_and_exits_2_through_a_stop(
        monkeypatch, tmp_path, capfd, ctrl_c_as_a_terminals):
    """A run on Ray that failed (exit 2: its output made a file as both worker nodes of 3 were killed,
    2026-12-07) printed its error line, then Ray's notes of the nodes marked dead: the wait for Ray's last
    lines and its shutdown came only before a summary. They come before the error line now, the summary
    file written first; a stop meanwhile is said and waited through, the exit code still the run's 2. A
    local run that fails neither waits nor imports Ray."""
    import ray
    import ray.exceptions

    from pipeline import cli, job, ray_cluster, ray_relayed

    said, summary_file = [], tmp_path / "summary.json"

    def run_job(*args, **kwargs):
        said.append("connected")  # (the run starts Ray, or joins a cluster, as `ray_cluster.ensure_ray`)
        ray_cluster.note_connected()
        raise ray.exceptions.NodeDiedError("Task failed because the node it was running on is dead or unavailable. "
                                           "Node IP: 10.0.0.2, node ID: a9c0.")

    def settle() -> None:
        said.append(("settled", summary_file.exists(), capfd.readouterr().err))
        os.kill(os.getpid(), signal.SIGINT)  # (a Ctrl-C as Ray's last lines are waited for)

    monkeypatch.setattr(job, "run_job", run_job)
    monkeypatch.setattr(ray, "is_initialized", lambda: "connected" in said and "shut down" not in said)
    monkeypatch.setattr(ray, "shutdown", lambda: said.append("shut down"))
    monkeypatch.setattr(ray_relayed, "settle", settle)
    assert cli.main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--no-progress",
                     "--summary-json", str(summary_file)]) == 2
    assert said == ["connected", ("settled", True, ""), "shut down"]
    assert capfd.readouterr().err == (
        "vidlens: the run has ended: Ray is shutting down (stop it once more to end it at once)\n"
        "vidlens: error: the Ray cluster lost a node, worker or actor the run could not go on without (NodeDiedError: "
        "Task failed because the node it was running on is dead or unavailable. Node IP: 10.0.0.2, node ID: a9c0.); "
        "the batches it published stay: run the same command again (a job: vidlens submit it again) to go on from "
        "there\n")
    script = "import sys; from pipeline.cli import main; " \
             f"code = main(['run', {str(tmp_path / 'none')!r}, '--out', {str(tmp_path / 'out')!r}, '--executor', " \
             "'local', '--no-progress']); print(code, 'ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout == "2 False\n" and "vidlens: error: " in done.stderr, done


def test_a_second_stop_as_a_failed_run_waits_for_rays_last_lines_ends_it_with_its_2(monkeypatch, tmp_path,
                                                                                  ctrl_c_as_a_terminals):
    """(mutation review) A second stop while a failed run on Ray waits for Ray's last lines ends the process
    at once, with the run's exit code, 2: not another (3 would say some videos failed, the run done)."""
    import ray
    import ray.exceptions

    from pipeline import cli, command_stops, job, ray_cluster, ray_relayed

    class Exited(BaseException):  # (os._exit's stand-in: the test's process goes on)
        def __init__(self, code: int) -> None:
            self.code = code

    connected = []

    def run_job(*args, **kwargs):
        connected.append(True)  # (the run starts Ray, as `ray_cluster.ensure_ray`)
        ray_cluster.note_connected()
        raise ray.exceptions.NodeDiedError("Task failed because the node it was running on is dead.")

    def settle() -> None:
        for _ in range(2):  # (a Ctrl-C as Ray's last lines are waited for, and another)
            os.kill(os.getpid(), signal.SIGINT)

    def exit_at_once(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(job, "run_job", run_job)
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(connected))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_relayed, "settle", settle)
    monkeypatch.setattr(command_stops.os, "_exit", exit_at_once)
    with pytest.raises(Exited) as exited:
        cli.main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--no-progress"])
    assert exited.value.code == 2


def test_a_run_that_ray_fails_for_a_lost_object_says_so_in_one_line_without_secrets(monkeypatch, tmp_path, capsys):
    """(mutation review) An object whose every copy was lost with its node (ObjectLostError, and its kind
    whose owner died) is a lost node too, told in one line; and Ray's words, which may quote where the
    object was made, show the run's credentials as `***`, as every other error line does."""
    import ray.exceptions

    secret = "l0st-n0de-s3cret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    made_at = f"read_videos(s3://media/in, secret={secret})"
    for exc, kind in ((ray.exceptions.ObjectLostError("ab" * 14, None, made_at), "ObjectLostError"),
                      (ray.exceptions.OwnerDiedError("ab" * 14, None, made_at), "OwnerDiedError")):
        error = _ray_run_ended_by(exc, monkeypatch, tmp_path, capsys)
        assert error.startswith(f"vidlens: error: the Ray cluster lost a node, worker or actor the run could not "
                                f"go on without ({kind}: Failed to retrieve object "), error
        assert error.count("\n") == 1 and secret not in error and "secret=***)" in error, error


def test_a_submit_notes_that_an_endpoints_password_is_not_sent(monkeypatch, capsys):
    """(mutation review) An endpoint's user name and password are taken out of the configuration the job
    gets (`shipped_config`), as a key is: the submit says so, as it says of a key."""
    from pipeline import submit as submit_module
    from pipeline.cli import main

    jobs = _FakeJobs({})
    monkeypatch.setattr(submit_module, "connect", lambda address: jobs)
    args = ["submit", "s3://media/in", "--out", "s3://media/out", "--stages", "embed", "--no-follow"]
    assert main([*args, "--endpoint-url", "http://minio.internal:9000"]) == 0
    assert "note: storage credentials" not in capsys.readouterr().err
    with_password = "http://admin:n0te-pass@minio.internal:9000"
    assert main([*args, "--endpoint-url", with_password, "--run-date", "2024-05-31"]) == 0
    error = capsys.readouterr().err
    assert "note: storage credentials in the configuration (an endpoint's user name and password too) are not " \
           "sent to the cluster" in error and "n0te-pass" not in error, error


def test_a_submit_ships_its_local_relative_paths_made_absolute(tmp_path, monkeypatch):
    """The job runs in the uploaded project: './models/clip' would start there."""
    from pipeline.submit import absolute_local_paths
    from schemas.config import RunConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "clip").mkdir(parents=True)
    (tmp_path / "queries.txt").write_text("a dog\n")
    config = RunConfig.from_dict({"models": {"embed": "./models/clip"}, "match": {"queries_file": "queries.txt"}})
    shipped = absolute_local_paths(config)
    assert shipped.models.embed == str(tmp_path / "models" / "clip")
    assert shipped.match.queries_file == str(tmp_path / "queries.txt")
    assert shipped.models.captions == "microsoft/git-base-vatex"  # a hub id stays one


def test_a_submit_that_a_starting_cluster_drops_is_retried_without_submitting_twice(monkeypatch):
    import io

    import requests

    from pipeline import submit as submitting
    from schemas.config import RunConfig

    monkeypatch.setattr(submitting.time, "sleep", lambda seconds: None)

    class _Starting(_FakeJobs):
        """A cluster starting its job agent: no agent, then a dropped connection, then up."""

        def __init__(self, failures, accepted_when_dropped):
            super().__init__({})
            self.failures = list(failures)
            self.accepted_when_dropped = accepted_when_dropped

        def submit_job(self, **request):
            failure = self.failures.pop(0) if self.failures else None
            if failure == "no agent":
                raise RuntimeError("Request failed with status code 503: No available agent to submit job")
            if failure == "dropped":
                if self.accepted_when_dropped:
                    super().submit_job(**request)
                raise requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected(...))")
            return super().submit_job(**request)

    config = RunConfig.from_dict({"stages": ["embed"]})
    for accepted in (False, True):
        jobs = _Starting(["no agent", "dropped"], accepted_when_dropped=accepted)
        made = submitting.submit(jobs, "s3://media/in", "s3://media/out", config, stream=io.StringIO())
        assert made.submitted and len(jobs.submitted) == 1, (accepted, jobs.submitted)
        assert jobs.statuses == {made.job_id: "PENDING"}

    refused = _Starting([], accepted_when_dropped=False)
    refused.submit_job = lambda **request: (_ for _ in ()).throw(RuntimeError("400: bad runtime_env"))
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submitting.submit(refused, "s3://media/in", "s3://media/out", config, stream=io.StringIO())


def test_a_nightly_submit_is_one_job_per_night(monkeypatch, capsys):
    """Without --run-date the job is dated today: tomorrow's submit is a new job, not last night's."""
    from datetime import datetime, timezone

    from pipeline import submit as submit_module
    from pipeline.cli import main
    from pipeline.submit import submission_id
    from schemas.config import RunConfig

    jobs = _FakeJobs({})
    monkeypatch.setattr(submit_module, "connect", lambda address: jobs)
    args = ["submit", "s3://media/in", "--out", "s3://media/out", "--stages", "embed", "--no-follow"]
    assert main(args) == 0
    today = datetime.now(timezone.utc).date().isoformat()
    config = RunConfig.from_dict({"stages": ["embed"]})
    assert jobs.submitted[0]["submission_id"] == submission_id("s3://media/in", "s3://media/out", config, today)
    assert f"--run-date {today}" in jobs.submitted[0]["entrypoint"]
    jobs.statuses[jobs.submitted[0]["submission_id"]] = "SUCCEEDED"
    assert main([*args, "--run-date", "2099-01-01"]) == 0  # another night: a new job
    assert len(jobs.submitted) == 2


class _ThreadProbe:
    """Notes the threads its Ray process lets the decoders, OpenCV and torch run."""

    def __init__(self, config):
        pass

    def process(self, tasks):
        from workers.frame_sources import shared_threads

        for task in tasks:
            task.timings.update({f"{self.name}_{name}": float(count) for name, count in shared_threads().items()})


def _probe_class(name: str, probe: type = _ThreadProbe):
    """A stage class named `name` that does what `probe` does."""
    from workers.stage import Stage

    return type(name, (probe, Stage), {"name": name})


TaskProbe = _probe_class("task_probe")
ActorProbe = _probe_class("actor_probe")


def test_the_plan_gives_ray_tasks_one_thread_a_cpu_and_cpu_models_the_node_cores(tiny_models, monkeypatch):
    from pipeline import plan
    from schemas.config import RunConfig

    monkeypatch.setattr(plan, "_node_cpus", lambda: 8.0)
    monkeypatch.setattr(plan, "_cpu_count", lambda: 8.0)
    config = RunConfig.from_dict({"stages": ["embed", "captions", "ocr"],
                                  "models": {"embed": tiny_models["embed"], "captions": tiny_models["captions"]}})
    threads = {s.name: s.threads for s in plan.build_plan(config, gpus_visible=0)}
    # two CPU models share the node's 8 cores; OCR and tasks keep to the CPUs they reserve
    assert threads == {"decode": 1, "sample": 1, "embed": 4, "captions": 4, "ocr": 1}
    on_gpu = {s.name: s.threads for s in plan.build_plan(config, gpus_visible=1)}
    assert on_gpu == {"decode": 1, "sample": 1, "embed": 0, "captions": 0, "ocr": 1}


def test_from_a_bucket_two_decode_tasks_share_each_cpu_share_unless_per_stage_says(tiny_models, monkeypatch):
    """A task's CPU waits while it downloads a bucket's video: two tasks a share, one decoding
    while the other downloads. A share the user set is theirs."""
    from pipeline import plan
    from schemas.config import RunConfig

    cpus = [8.0]
    monkeypatch.setattr(plan, "_node_cpus", lambda: cpus[0])
    monkeypatch.setattr(plan, "_cpu_count", lambda: cpus[0])

    def tasks(remote, gpus=0, per_stage=None):
        config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]},
                                      "resources": {"per_stage": per_stage or {}}})
        return {s.name: (s.num_cpus, s.threads) for s in plan.build_plan(config, gpus, remote=remote) if s.kind == "task"}

    for gpus in (0, 1):
        assert tasks(False, gpus) == {"decode": (1.0, 1), "sample": (1.0, 1)}
        assert tasks(True, gpus) == {"decode": (0.5, 1), "sample": (0.5, 1)}
    cpus[0] = 2.0  # a third each for the model actor and two tasks, rounded down; a sixth from a bucket
    assert tasks(False) == {"decode": (0.66, 1), "sample": (0.66, 1)}
    assert tasks(True) == {"decode": (0.33, 1), "sample": (0.33, 1)}
    assert tasks(True, per_stage={"decode": {"num_cpus": 1}})["decode"] == (1.0, 1)


def test_the_videos_in_flight_keep_every_decode_task_of_a_large_cluster_busy(tiny_models, monkeypatch):
    """The listing pauses at the videos in flight: a fixed 256 left most of a large cluster's decode
    tasks without videos. A number set is kept, but never below what the stages' batches hold."""
    from pipeline import plan
    from schemas.config import RunConfig

    cpus = [2.0]
    monkeypatch.setattr(plan, "_node_cpus", lambda: 16.0)
    monkeypatch.setattr(plan, "_cpu_count", lambda: cpus[0])

    def in_flight(remote=False, **resources):
        config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]},
                                      "resources": resources})
        return plan.videos_in_flight(plan.build_plan(config, gpus_visible=8, remote=remote), config)

    assert in_flight() == in_flight(remote=True) == plan.MIN_VIDEOS_IN_FLIGHT  # a laptop: as before
    cpus[0] = 128.0  # 8 GPU nodes of 16 cores: 128 decode tasks of a CPU, 256 from a bucket, 4 videos each
    assert in_flight() >= 2 * 128 * 4 and in_flight(remote=True) >= 2 * 256 * 4
    assert in_flight(remote=True) < 2 * 256 * 4 + 32
    assert in_flight(decode_concurrency=16) == plan.MIN_VIDEOS_IN_FLIGHT  # 16 tasks at most
    assert in_flight(max_videos_in_flight=1000) == 1000
    assert in_flight(max_videos_in_flight=1) == 4 + 4 + 4 + 1 + 1  # decode's, sample's, embed's batch, reader, one


def test_per_stage_settings_reach_model_and_cpu_stages_and_bad_ones_are_refused_by_name(tiny_models, monkeypatch):
    from pipeline import plan
    from schemas.config import RunConfig

    monkeypatch.setattr(plan, "_node_cpus", lambda: 8.0)
    monkeypatch.setattr(plan, "_cpu_count", lambda: 8.0)

    def specs(per_stage):
        config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]},
                                      "resources": {"per_stage": per_stage}})
        return {s.name: s for s in plan.build_plan(config, gpus_visible=1)}

    default = specs({})
    # several short clips share a Ray task, unless every frame is decoded for shot detection
    # (the sample task after the shot detector reads the sampled frames only: several again)
    assert default["decode"].batch_size == default["sample"].batch_size == plan.DEFAULT_VIDEOS_PER_TASK > 1
    with_shots = {s.name: s for s in plan.build_plan(RunConfig.from_dict(
        {"stages": ["shots", "embed"], "models": {"embed": tiny_models["embed"]}}), gpus_visible=1)}
    assert (with_shots["decode"].batch_size, with_shots["sample"].batch_size) == (1, plan.DEFAULT_VIDEOS_PER_TASK)
    chosen = specs({"decode": {"videos_per_batch": 8, "num_cpus": 2, "memory_bytes": 2**30},
                    "sample": {"videos_per_batch": 4}, "embed": {"num_gpus": 0.5, "max_actors": 3}})
    assert (chosen["decode"].batch_size, chosen["decode"].num_cpus, chosen["decode"].memory) == (8, 2.0, 2**30)
    assert chosen["decode"].threads == 2  # a task's decoders run on the CPUs it reserves
    assert (chosen["sample"].batch_size, chosen["sample"].num_cpus) == (4, default["sample"].num_cpus)
    assert (chosen["embed"].num_gpus, chosen["embed"].max_actors) == (0.5, 3)
    assert "8 videos/task" in plan.describe(list(chosen.values()))
    for per_stage, named in [({"decoder": {"num_cpus": 2}}, "resources.per_stage.decoder: not a stage"),
                             ({"decode": {"num_gpus": 1}}, "resources.per_stage.decode.num_gpus: unknown setting"),
                             ({"sample": {"videos_per_batch": 0}}, "per_stage.sample.videos_per_batch: expected 1 or more"),
                             ({"embed": {"max_actor": 2}}, "resources.per_stage.embed.max_actor: unknown setting")]:
        with pytest.raises(plan.PlanError, match=named):
            specs(per_stage)


def test_a_cuda_device_other_than_the_first_is_refused_on_ray_before_it_starts(tiny_models, monkeypatch):
    """Ray shows each model actor only the GPU it gave it, as cuda:0: with `models.device: cuda:1`
    every actor failed to load its model, once Ray and the decode tasks had started."""
    from pipeline import plan
    from schemas.config import RunConfig

    monkeypatch.setattr(plan, "_node_cpus", lambda: 8.0)
    monkeypatch.setattr(plan, "_cpu_count", lambda: 8.0)

    def config(device, executor):
        return RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": device},
                                    "resources": {"executor": executor}})

    for check in (lambda c: plan.build_plan(c, gpus_visible=2), plan.check_resources):
        with pytest.raises(plan.PlanError, match=r"models.device is 'cuda:1', but on Ray .* set models.device"):
            check(config("cuda:1", "ray"))
        for device, executor in (("cuda", "ray"), ("cuda:0", "ray"), ("auto", "ray"), ("cuda:1", "local")):
            check(config(device, executor))


def test_actors_that_fit_the_clusters_memory_but_no_node_are_warned_of(tiny_models, monkeypatch, caplog):
    # two nodes of 3.5 GiB: three actors of 2 GiB and the tasks fit the 7 GiB in all, but each node
    # holds one actor: the third never started, and the run stalled without a word
    from pipeline import plan
    from schemas.config import RunConfig

    monkeypatch.setattr(plan, "_node_cpus", lambda: 8.0)
    monkeypatch.setattr(plan, "_cpu_count", lambda: 16.0)
    monkeypatch.setattr(plan, "_cluster_memory", lambda: 7 * 2**30)
    nodes = [[3.5 * 2**30, 3.5 * 2**30]]
    monkeypatch.setattr(plan, "_node_memories", lambda: nodes[0])
    config = RunConfig.from_dict({"stages": ["shots", "embed", "captions"], "models": {
        "embed": tiny_models["embed"], "captions": tiny_models["captions"]}})
    specs = plan.build_plan(config, gpus_visible=3)
    assert {s.memory for s in specs if s.kind == "actor"} == {2 * 2**30}  # (the totals fit: not scaled)
    with caplog.at_level("WARNING", logger="pipeline.plan"):
        plan.warn_if_unfit(specs, 3)
    said = [r.getMessage() for r in caplog.records if "fit on no node" in r.getMessage()]
    assert said and said[0].startswith("1 of the model stages' actors") and "3.5, 3.5 GiB" in said[0], said
    caplog.clear()
    nodes[0] = [4.5 * 2**30, 2.5 * 2**30]  # two on the larger node, one on the other
    with caplog.at_level("WARNING", logger="pipeline.plan"):
        plan.warn_if_unfit(specs, 3)
    assert not [r for r in caplog.records if "fit on no node" in r.getMessage()]


def test_the_model_stages_share_the_gpus_cores_and_memory_when_there_are_too_few_for_their_actors(
        tiny_models, monkeypatch, caplog):
    from pipeline import plan
    from schemas.config import RunConfig

    cpus, memory = [16.0], [64 * 2**30]
    monkeypatch.setattr(plan, "_node_cpus", lambda: cpus[0])
    monkeypatch.setattr(plan, "_cpu_count", lambda: cpus[0])
    monkeypatch.setattr(plan, "_cluster_memory", lambda: memory[0])

    def planned(gpus, device="auto", **resources):
        config = RunConfig.from_dict({"stages": ["shots", "embed", "captions", "ocr"], "resources": resources,
                                      "models": {"embed": tiny_models["embed"], "captions": tiny_models["captions"],
                                                 "device": device}})
        specs = plan.build_plan(config, gpus_visible=gpus)
        plan.warn_if_unfit(specs, gpus, device)  # as a Ray run does with its plan
        return {s.name: s for s in specs}, plan.gpus_needed(specs)

    def declared(specs, field):  # what the actors and two decode tasks reserve together
        actors = sum(getattr(s, field) * s.min_actors for s in specs.values() if s.kind == "actor")
        return actors + 2 * getattr(specs["decode"], field)

    # models.device: cpu on a GPU cluster: the actors reserve no GPU (they held them idle) and
    # take the CPU threads a cluster without a GPU gives them
    cpu_only, gpu_less = planned(8, device="cpu")[0], planned(0)[0]
    assert all(spec.num_gpus == 0 for spec in cpu_only.values())
    assert {n: s.threads for n, s in cpu_only.items()} == {n: s.threads for n, s in gpu_less.items()}
    assert planned(8, device="cuda:0")[0]["embed"].num_gpus == 1.0
    # three GPU model stages (OCR runs on the CPU): a GPU each where there are three, else shared
    for gpus, share in ((1, 0.33), (2, 0.5), (3, 1.0), (8, 1.0)):
        specs, needed = planned(gpus)
        assert [specs[s].num_gpus for s in ("shots", "embed", "captions", "ocr")] == [share, share, share, 0.0]
        assert needed == min(gpus, 3)
        # a big node: a core each, and the memory as configured
        assert {(s.num_cpus, s.memory) for s in specs.values() if s.kind == "actor"} == {(1.0, 2 * 2**30)}
    assert planned(3, min_actors=2, max_actors=2)[0]["embed"].num_gpus == 0.5  # six actors, two a GPU
    # a GPU machine of 2 cores and 8 GiB (Ray schedules by about 5.4): four actors of a core and
    # 2 GiB each would leave no room to decode
    cpus[0], memory[0] = 2.0, 5.4 * 2**30
    for pools in ({}, {"min_actors": 2, "max_actors": 2}):
        specs, _ = planned(1, **pools)
        assert declared(specs, "num_cpus") <= 2 and declared(specs, "memory") <= 5.4 * 2**30
        assert specs["embed"].memory > specs["decode"].memory > 0  # scaled alike
    assert "stall" not in caplog.text  # the plan's own shares always fit
    # what is asked for is kept, with a warning when it cannot fit
    cpus[0], memory[0] = 16.0, 64 * 2**30
    with caplog.at_level("WARNING", logger="pipeline.plan"):
        specs, needed = planned(1, num_gpus_per_actor=1)
    assert specs["embed"].num_gpus == 1.0 and needed == 3
    assert "need 3 GPUs at once" in caplog.text and "num_gpus_per_actor (e.g. 0.33)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.plan"):  # GPUs asked of a cluster without one
        specs, needed = planned(0, per_stage={"embed": {"num_gpus": 1}})
    assert specs["embed"].num_gpus == 1.0 and needed == 1
    assert "need 1 GPUs at once (embed 1x1) but the cluster has 0" in caplog.text
    caplog.clear()
    # models.device: cuda on a Ray cluster of no GPU (yet: an autoscaler's): none reserved, and
    # said, with the setting that asks an autoscaler for them (asked for anyway, the instance a
    # run starts, which cannot grow, waited for ever)
    with caplog.at_level("WARNING", logger="pipeline.plan"):
        specs, needed = planned(0, device="cuda")
    assert {specs[s].num_gpus for s in ("shots", "embed", "captions", "ocr")} == {0.0} and needed == 0
    assert "models.device is 'cuda' but the Ray cluster has no GPU now" in caplog.text
    assert "resources.num_gpus_per_actor (e.g. 1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.plan"):
        planned(0, device="cuda", num_gpus_per_actor=1)
    assert "has no GPU now" not in caplog.text and "need 3 GPUs at once" in caplog.text
    caplog.clear()
    cpus[0] = 2.0
    with caplog.at_level("WARNING", logger="pipeline.plan"):
        specs, _ = planned(1, per_stage={"embed": {"num_cpus": 2}})
    assert specs["embed"].num_cpus == 2.0 and "need 3.32 CPUs at once but the cluster has 2" in caplog.text


_ONE_GPU_RUN = """
import sys
import ray
from pipeline.job import run_job
from schemas.config import RunConfig
from workers.synthetic import indexed_frames, write_video

videos, out, embed, captions = sys.argv[1:5]
for i in range(12):  # three times the videos in flight
    write_video(f"{videos}/v{i:02d}.mp4", indexed_frames(12, 64, 36), fps=12)
# a GPU Ray knows of but nothing uses (device auto: the models find no CUDA and run on the CPU;
# the actors reserve their share, as `device: cpu` would not),
# and the memory Ray schedules by on a machine of about 6 GiB
ray.init(address="local", num_cpus=2, num_gpus=1, _memory=4 * 2**30, include_dashboard=False,
         logging_level="ERROR")
config = RunConfig.from_dict({
    "stages": ["shots", "embed", "captions"], "models": {"embed": embed, "captions": captions, "device": "auto"},
    "sampling": {"num_frames": 2}, "output": {"thumbnails": False},
    "resources": {"executor": "ray", "videos_per_batch": 1, "max_videos_in_flight": 4},
})
summary = run_job(videos, out, config, progress=False)
print("videos_ok", summary.counts["videos_ok"])
"""


@pytest.mark.ray
def test_a_small_node_with_one_gpu_runs_three_gpu_model_stages_through_more_videos_than_are_in_flight(
        tmp_path, tiny_models):
    """With a GPU, a core and 2 GiB each, two of the three stages' actors could not start: their
    videos filled the pipeline, the listing waited for them, and the run never ended."""
    videos = tmp_path / "videos"
    videos.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", _ONE_GPU_RUN, str(videos), str(tmp_path / "out"), tiny_models["embed"],
         tiny_models["captions"]],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"},
    )
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the run did not end within 600 s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    assert "videos_ok 12" in output
    assert "0.33 GPU" in output  # the plan as printed: the three stages share the GPU


@pytest.mark.ray
def test_ray_tasks_and_cpu_model_actors_run_the_threads_the_plan_gives_them(local_ray):
    """Left to Ray, an actor reserving half a core runs torch on one thread, and every decode
    task lets FFmpeg and OpenCV start one thread per core."""
    import numpy as np
    from ray.util.annotations import RayDeprecationWarning

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.stage import TASK_COLUMN
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("task_probe", f"{__name__}:TaskProbe", "task", num_cpus=0.5, threads=1),
             plan.StageSpec("actor_probe", f"{__name__}:ActorProbe", "actor", num_cpus=0.5, threads=2)]
    payloads = np.empty(2, dtype=object)
    payloads[:] = [VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")).to_bytes() for i in range(2)]
    with warnings.catch_warnings():
        # what the plan asks of Ray Data prints no warning of Ray's to the user
        warnings.simplefilter("error", RayDeprecationWarning)
        dataset = ray_executor.ray_dataset(local_ray.data.from_numpy(payloads).rename_columns({"data": TASK_COLUMN}),
                                           specs, RunConfig())
    tasks = [VideoTask.from_bytes(row[TASK_COLUMN]) for row in dataset.take_all()]
    assert len(tasks) == 2
    for task in tasks:
        assert task.timings["task_probe_decoders"] == task.timings["task_probe_cv2"] == 1
        assert task.timings["task_probe_torch"] == 1
        # OMP_NUM_THREADS in the actor's runtime env (torch takes no more threads than cores)
        assert task.timings["actor_probe_torch"] == min(2, os.cpu_count())


class _SlowProbe:
    """Notes how many videos it saw running at once (`<name>_seen`). A video's path says where to
    mark it and how many to wait for (FOLDER/AT_ONCE/VIDEOS/i.mp4): each waits, up to a minute,
    until AT_ONCE are running or every video has started, then holds a moment. Counted so, not
    from when they ran: on a loaded machine Ray's workers came up late, and the first ones took
    the queued videos one after another, with room for more."""

    def __init__(self, config):
        pass

    def process(self, tasks):
        import os
        import time

        for task in tasks:
            folder, at_once, videos, _ = task.ref.uri.rsplit("/", 3)
            running = os.path.join(folder, f"running-{task.ref.video_id}")
            for mark in (running, os.path.join(folder, f"started-{task.ref.video_id}")):
                open(mark, "w").close()
            seen, waited, held = 0, time.monotonic() + 60, None
            while held is None or time.monotonic() < held:
                names = os.listdir(folder)
                now = sum(name.startswith("running-") for name in names)
                seen = max(seen, now)
                if held is None and (now >= int(at_once) or time.monotonic() > waited
                                     or sum(name.startswith("started-") for name in names) >= int(videos)):
                    held = time.monotonic() + 0.3
                time.sleep(0.02)
            os.remove(running)
            task.timings[f"{self.name}_seen"] = seen


SlowTask = _probe_class("slow_task", _SlowProbe)


@pytest.mark.ray
@pytest.mark.parametrize("remote, at_once", [(False, 2), (True, 4)], ids=["local files", "from a bucket"])
def test_two_decode_tasks_run_beside_a_cpu_model_actor_on_two_cores(local_ray, tiny_models, remote, at_once,
                                                                   tmp_path):
    """The plan divides a CPU-only node into shares for the model actor and two decode tasks, and
    Ray Data must fit them all beside the listing's reader: with shares of exactly a third of 2
    CPUs and a reader of 0.01, the second decode task never started. From a bucket two tasks
    share each task's share, so that one decodes while the other downloads: four at once."""
    from pipeline import plan, ray_executor
    from pipeline.feed import TaskFeed
    from schemas.config import RunConfig
    from workers.stage import unpack
    from workers.task import VideoRef, VideoTask

    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]}})
    chosen = {s.name: s for s in plan.build_plan(config, gpus_visible=0, remote=remote)}
    assert local_ray.cluster_resources()["CPU"] == 2
    specs = [plan.StageSpec("slow_task", f"{__name__}:SlowTask", "task", num_cpus=chosen["decode"].num_cpus),
             plan.StageSpec("actor_probe", f"{__name__}:ActorProbe", "actor", num_cpus=chosen["embed"].num_cpus)]
    videos = 2 * at_once
    listing = (VideoTask(ref=VideoRef(f"{tmp_path}/{at_once}/{videos}/{i}.mp4", 1, None, None, f"v{i}"))
               for i in range(videos))
    seen = []
    with TaskFeed(listing, readers=1, in_flight=videos) as feed:
        for batch in ray_executor.ray_dataset(feed.dataset(), specs, RunConfig(), grouped=True).iter_batches(
                batch_size=None, batch_format="numpy", prefetch_batches=0):
            for payload in unpack(batch):
                feed.finished()
                seen.append(VideoTask.from_bytes(payload).timings["slow_task_seen"])
        feed.check()
    assert len(seen) == videos and max(seen) == at_once, seen


@pytest.mark.ray
@pytest.mark.parametrize("last", ["actor", "task"])
def test_the_last_ray_step_can_hand_the_driver_each_batch_as_one_row(local_ray, last):
    """With a row a video, Ray Data's threads on the driver handle a block a video."""
    import numpy as np

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.stage import GROUP_COLUMN, TASK_COLUMN, unpack
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("task_probe", f"{__name__}:TaskProbe", "task", num_cpus=0.5, threads=1, batch_size=2)]
    if last == "actor":
        specs.append(plan.StageSpec("actor_probe", f"{__name__}:ActorProbe", "actor", num_cpus=0.5, batch_size=2))
    payloads = np.empty(4, dtype=object)
    payloads[:] = [VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")).to_bytes() for i in range(4)]
    dataset = ray_executor.ray_dataset(local_ray.data.from_numpy(payloads).rename_columns({"data": TASK_COLUMN}),
                                       specs, RunConfig(), emits_groups=True)
    rows = dataset.take_all()
    assert len(rows) == 2 and all(set(row) == {GROUP_COLUMN} for row in rows)  # a row a batch of 2 videos
    tasks = [VideoTask.from_bytes(payload) for row in rows for payload in unpack({GROUP_COLUMN: [row[GROUP_COLUMN]]})]
    assert sorted(task.ref.video_id for task in tasks) == ["v0", "v1", "v2", "v3"]
    assert all(f"{spec.name}_torch" in task.timings for task in tasks for spec in specs)


_CALLS = []  # (stage, video) in the order a Ray worker's probe stages saw them


class _BuiltProbe:
    """Notes which probe stages its Ray process had built when it ran, and when it saw each video."""

    def __init__(self, config):
        pass

    def process(self, tasks):
        from pipeline.ray_executor import _STAGE_CACHE

        built = {stage.name for stage in _STAGE_CACHE.values()}
        for task in tasks:
            task.timings.update({f"{self.name}_saw_{name}": 1.0 for name in built if name.startswith("chain_")})
            _CALLS.append((self.name, task.ref.video_id))
            task.timings[f"{self.name}_call"] = float(len(_CALLS))


ChainFirst = _probe_class("chain_first", _BuiltProbe)
ChainSecond = _probe_class("chain_second", _BuiltProbe)


@pytest.mark.ray
def test_the_first_cpu_task_in_a_ray_worker_builds_every_cpu_stage_of_the_plan(local_ray):
    """As the local executor's workers do: the decode stage forks its guarded decoder only after
    the sample stage has loaded the models' processors, so the child need not import them again."""
    import numpy as np

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.stage import TASK_COLUMN
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("chain_first", f"{__name__}:ChainFirst", "task", num_cpus=0.5, threads=1),
             plan.StageSpec("chain_second", f"{__name__}:ChainSecond", "task", num_cpus=0.5, threads=1)]
    payloads = np.empty(1, dtype=object)
    payloads[:] = [VideoTask(ref=VideoRef("/v/0.mp4", 1, None, None, "v0")).to_bytes()]
    dataset = ray_executor.ray_dataset(local_ray.data.from_numpy(payloads).rename_columns({"data": TASK_COLUMN}),
                                       specs, RunConfig())
    (row,) = dataset.take_all()
    assert VideoTask.from_bytes(row[TASK_COLUMN]).timings["chain_first_saw_chain_second"] == 1


@pytest.mark.ray
def test_a_ray_task_of_several_videos_takes_each_through_its_cpu_stages_before_the_next(local_ray):
    """So what the decode stage keeps for the sample stage (its open source, a bucket's
    download: one video's) serves every video of the task, as in the local executor."""
    import numpy as np

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.stage import TASK_COLUMN
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("chain_first", f"{__name__}:ChainFirst", "task", num_cpus=0.5, threads=1, batch_size=3),
             plan.StageSpec("chain_second", f"{__name__}:ChainSecond", "task", num_cpus=0.5, threads=1,
                            batch_size=3)]
    payloads = np.empty(3, dtype=object)
    payloads[:] = [VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")).to_bytes() for i in range(3)]
    dataset = ray_executor.ray_dataset(local_ray.data.from_numpy(payloads).rename_columns({"data": TASK_COLUMN}),
                                       specs, RunConfig())
    tasks = [VideoTask.from_bytes(row[TASK_COLUMN]) for row in dataset.take_all()]
    assert sorted(task.ref.video_id for task in tasks) == ["v0", "v1", "v2"]
    calls = sorted((task.timings["chain_first_call"], task.timings["chain_second_call"]) for task in tasks)
    assert [second - first for first, second in calls] == [1, 1, 1], calls
    assert calls[-1][1] - calls[0][0] == 5  # one task, one worker: the six calls in a row


class _KillerProbe:
    """Kills its own process on the video its class names, every time (as an OOM kill would)."""

    dies_after = 0.0

    def __init__(self, config):
        pass

    def process(self, tasks):
        for task in tasks:
            if self.kills in (task.ref.video_id, "every video"):
                time.sleep(self.dies_after)  # (time for the next batches to queue on its actor)
                os.kill(os.getpid(), signal.SIGKILL)


TaskKiller = type("task_killer", (_probe_class("task_killer", _KillerProbe),), {"kills": "v1"})
ActorKiller = type("actor_killer", (_probe_class("actor_killer", _KillerProbe),), {"kills": "v2", "dies_after": 1.0})
EveryVideoKiller = type("every_video_killer", (_probe_class("every_video_killer", _KillerProbe),),
                        {"kills": "every video"})


@pytest.mark.ray
def test_a_video_whose_worker_dies_for_good_is_lost_and_the_run_goes_on(local_ray):
    """Ray Data fails a whole execution at its first task that fails for good: one video that
    killed its decode task's or its model actor's process every time ended the run, with no
    errors row for any video. Now its videos are lost (the job gives them WorkerLost rows);
    the videos of the same task or model batch, and those queued on the same actor that its
    deaths used up the retries of, were lost with it: they are run again, one a task and a
    batch, and come back."""
    from dataclasses import replace

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("task_killer", f"{__name__}:TaskKiller", "task", num_cpus=0.5, threads=1),
             plan.StageSpec("actor_killer", f"{__name__}:ActorKiller", "actor", num_cpus=0.5)]
    listing = (VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")) for i in range(8))
    batched = [replace(spec, batch_size=4) for spec in specs]  # (the killers' fellows in their task and batch)
    finished = [task.ref.video_id for task in ray_executor.run_ray(listing, batched, RunConfig())]
    assert sorted(finished) == ["v0", "v3", "v4", "v5", "v6", "v7"], finished  # each once; v1 and v2 lost
    assert local_ray.data.DataContext.get_current().max_errored_blocks == 0  # as it was, for what else runs here
    # a lost block keeps its videos' places in flight: never so many that a stage lacks room for a batch
    assert plan.lost_blocks_allowed(specs, RunConfig(), in_flight=9) == 9 - (1 + 1 + 1 + 1)
    assert plan.lost_blocks_allowed(specs, RunConfig(), in_flight=4) == 0


@pytest.mark.ray
def test_a_model_actor_given_one_batch_at_a_time_loses_none_with_the_batch_that_kills_it(local_ray):
    """Ray Data sends each actor two batches at once: the one queued behind a batch that killed
    the actor was failed with it at each death, and lost with it when its retries ran out first
    (in one run of three, and one of six, here; in CI, a video of run_ray's second go). That
    second go gives each actor one batch at a time."""
    import numpy as np

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.stage import TASK_COLUMN
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("actor_killer", f"{__name__}:ActorKiller", "actor", num_cpus=0.5, batches_an_actor=1)]
    payloads = np.empty(4, dtype=object)
    payloads[:] = [VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")).to_bytes() for i in (2, 4, 5, 6)]
    with ray_executor._losing_blocks(1):  # (a dataset takes Ray Data's settings as they are when it is made)
        rows = local_ray.data.from_numpy(payloads).rename_columns({"data": TASK_COLUMN}).repartition(4)
        batches = ray_executor.ray_dataset(rows, specs, RunConfig()).iter_batches(batch_size=None, batch_format="numpy",
                                                                                       prefetch_batches=0)
        finished = [VideoTask.from_bytes(payload).ref.video_id for batch in batches for payload in batch[TASK_COLUMN]]
    assert sorted(finished) == ["v4", "v5", "v6"]


@pytest.mark.ray
def test_videos_lost_again_when_run_one_a_task_are_lost_without_failing_the_run(local_ray, monkeypatch):
    """A failure that is no one video's (a worker that dies whatever it runs) loses every video
    again when they run one a task: each such block is allowed, and the run ends, its videos
    left to the job's WorkerLost rows."""
    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("every_video_killer", f"{__name__}:EveryVideoKiller", "task", num_cpus=0.5, threads=1,
                            batch_size=4)]
    monkeypatch.setattr(ray_executor, "RETRIES", 1)  # (each death costs seconds)
    # (two: each run alone, all lost again, they run once more, and are lost a third time)
    listing = (VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")) for i in range(2))
    assert list(ray_executor.run_ray(listing, specs, RunConfig())) == []


def test_videos_all_lost_again_when_run_alone_run_once_more_on_the_cluster_as_it_is_then(monkeypatch, caplog):
    """Run again one a task and a batch, a video that kills its worker is lost by itself: every one lost
    again is the cluster's doing (soak of Ray on S3, both worker nodes killed: that execution's queue went
    to a node lost moments before, and every video, broken files too, got a WorkerLost row). They run once
    more; one video lost alone, or some finished, is not run a third time."""
    import logging

    from pipeline import ray_executor
    from schemas.config import RunConfig
    from workers.task import VideoRef, VideoTask

    def runs(outcomes):
        """A `_run_ray_execution` whose executions each lose the videos `outcomes` names, in turn."""
        given = []

        def execution(tasks, specs, config, preparers, lost, room=0):
            tasks = list(tasks)
            given.append(sorted(task.ref.video_id for task in tasks))
            losing = outcomes[len(given) - 1]
            lost.update({task.ref.video_id: task for task in tasks if task.ref.video_id in losing})
            yield from (task for task in tasks if task.ref.video_id not in losing)
        monkeypatch.setattr(ray_executor, "_run_ray_execution", execution)
        return given

    def listing(count):
        return (VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")) for i in range(count))

    given = runs([{"v0", "v1", "v2"}, {"v0", "v1", "v2"}, set()])
    with caplog.at_level(logging.WARNING, logger="pipeline.ray_executor"):
        finished = [task.ref.video_id for task in ray_executor.run_ray(listing(4), [], RunConfig())]
    assert sorted(finished) == ["v0", "v1", "v2", "v3"]
    assert given == [["v0", "v1", "v2", "v3"], ["v0", "v1", "v2"], ["v0", "v1", "v2"]]
    assert "the 3 videos run again were all lost again, none by itself: running them once more" in caplog.text
    # some finished the second time, or one lost alone: a video's own doing, left to the job's WorkerLost rows
    for outcomes, count in (([{"v0", "v1"}, {"v0"}], 2), ([{"v0"}, {"v0"}], 1)):
        given = runs(outcomes + [set()])
        finished = [task.ref.video_id for task in ray_executor.run_ray(listing(count), [], RunConfig())]
        assert "v0" not in finished and len(given) == 2, given


class _KillerTillRunAgainProbe:
    """Kills its own process on v1 at each of its two tries (`ray_executor.RETRIES` made 1), as a node lost
    twice would: the video is lost in its execution, and finishes when run again."""

    def __init__(self, config):
        pass

    def process(self, tasks):
        for task in tasks:
            killed = len(list(Path(task.ref.uri).parent.glob(f"{task.ref.video_id}.killed*")))
            if task.ref.video_id == "v1" and killed < 2:
                Path(task.ref.uri).with_suffix(f".killed{killed}").write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)


KillerTillRunAgain = _probe_class("killer_till_run_again", _KillerTillRunAgainProbe)


@pytest.mark.ray
def test_videos_run_again_get_no_more_model_actors_than_there_are_videos(local_ray, monkeypatch, tmp_path):
    """The videos lost in an execution ran again with the plan's actor pools: a model stage of min_actors 2
    given 1 video to run again had Ray Data warn, at that execution's end, "The minimum number of concurrent
    actors for 'MapBatches(actor_probe)' is set to 2, but the operator only received 1 input(s) ... configuring
    `override_num_blocks`". Its pools now have no more actors than videos."""
    import warnings

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.task import VideoRef, VideoTask

    monkeypatch.setattr(ray_executor, "RETRIES", 1)  # (each death costs seconds)
    specs = [plan.StageSpec("killer_till_run_again", f"{__name__}:KillerTillRunAgain", "task", num_cpus=0.5,
                            threads=1),
             plan.StageSpec("actor_probe", f"{__name__}:ActorProbe", "actor", num_cpus=0.5, min_actors=2,
                            max_actors=2)]
    listing = (VideoTask(ref=VideoRef(str(tmp_path / f"v{i}.mp4"), 1, None, None, f"v{i}")) for i in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finished = sorted(task.ref.video_id for task in ray_executor.run_ray(listing, specs, RunConfig()))
    assert finished == ["v0", "v1", "v2"]
    assert len(list(tmp_path.glob("v1.killed*"))) == 2  # (lost with its first execution, finished run again)
    assert [str(w.message) for w in caught if "concurrent actors" in str(w.message)] == []


def test_ray_datas_warning_of_a_model_stage_that_got_no_input_is_left_out_unless_verbose(monkeypatch):
    """Both worker nodes killed as the listing's reader ran on one of them (3 nodes on one machine,
    2026-12-07): every video of the execution was lost before the model stages, and Ray Data warned, as it
    ended, for each of the 4 (8 lines with the source line Python shows), before vidlens said it ran them
    again. No pool size avoids it: left out, with -v kept; a pool that got fewer inputs than its min_size,
    more than none, is still said."""
    import logging
    import warnings

    from pipeline.ray_cluster import quiet_ray_logs

    said = ("The minimum number of concurrent actors for 'MapBatches(ShotStage)' is set to 1, but the operator only "
            "received 0 input(s). This means that the operator can launch at most 0 task(s), and won't fully utilize "
            "the available concurrency. You might be able to increase the number of concurrent tasks by configuring "
            "`override_num_blocks` earlier in the pipeline.")
    fewer = said.replace("set to 1", "set to 2").replace("0 input", "1 input").replace("most 0", "most 1")
    none_of_two = said.replace("set to 1", "set to 2")  # (a user's min_actors 2: none either)

    def shown(level: int) -> list[str]:
        root.setLevel(level)
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()  # (as a new process: no filter of an earlier test's)
            warnings.simplefilter("always")
            quiet_ray_logs()
            for message in (said, none_of_two, fewer):
                warnings.warn(message, UserWarning)
        return [str(warning.message) for warning in caught]

    monkeypatch.setattr(logging.getLogger("ray.data"), "level", logging.NOTSET)
    root = logging.getLogger()
    level = root.level
    try:
        assert shown(logging.WARNING) == [fewer]
        assert shown(logging.INFO) == [said, none_of_two, fewer]
    finally:
        root.setLevel(level)


class _GpuBreakerProbe:
    """Breaks "the GPU" with a sticky CUDA error on video v1, once: a file beside it says it did."""

    def __init__(self, config):
        pass

    def process(self, tasks):
        for task in tasks:
            broke = Path(task.ref.uri + ".broke")
            if task.ref.video_id == "v1" and not broke.exists():
                broke.write_text(str(os.getpid()))
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might "
                                   "be asynchronously reported at some other API call")
            task.timings["pid"] = float(os.getpid())


GpuBreaker = _probe_class("gpu_breaker", _GpuBreakerProbe)


@pytest.mark.ray
def test_a_model_actor_whose_gpu_breaks_leaves_and_another_runs_its_batch(local_ray, tmp_path):
    """After a sticky CUDA error (an illegal memory access, a device-side assert) every later
    call on the GPU fails in that process: before, the actor went on, and gave its batch's
    videos and every later one an errors row. Now it exits, and Ray runs the batch on a new one."""
    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("chain_first", f"{__name__}:ChainFirst", "task", num_cpus=0.5, threads=1),
             plan.StageSpec("gpu_breaker", f"{__name__}:GpuBreaker", "actor", num_cpus=0.5, batch_size=2)]
    listing = (VideoTask(ref=VideoRef(str(tmp_path / f"{i}.mp4"), 1, None, None, f"v{i}")) for i in range(4))
    finished = {task.ref.video_id: task for task in ray_executor.run_ray(listing, specs, RunConfig())}
    assert sorted(finished) == ["v0", "v1", "v2", "v3"]
    assert not [task.errors for task in finished.values() if task.errors]
    broken_by = int((tmp_path / "1.mp4.broke").read_text())
    assert finished["v1"].timings["pid"] != broken_by  # (run again in a new worker)


class _GpuSeerProbe:
    """Notes the GPUs its process is shown (CUDA_VISIBLE_DEVICES; None: unset, so every GPU)."""

    def __init__(self, config):
        pass

    def process(self, tasks):
        for task in tasks:
            task.ran_on[self.name] = ("CUDA_VISIBLE_DEVICES", str(os.environ.get("CUDA_VISIBLE_DEVICES")))


GpuSeer = _probe_class("gpu_seer", _GpuSeerProbe)


@pytest.mark.ray
def test_a_model_actor_that_reserves_no_gpu_is_shown_none_unless_cuda_is_asked_for(local_ray):
    """Ray leaves CUDA_VISIBLE_DEVICES unset for an actor given no GPU: a model stage set to
    `num_gpus: 0` (or on a node whose GPUs Ray does not manage) saw every GPU, and its
    `models.device: auto` took the first, beside the actors Ray had given it to."""
    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers.task import VideoRef, VideoTask

    specs = [plan.StageSpec("chain_first", f"{__name__}:ChainFirst", "task", num_cpus=0.5, threads=1),
             plan.StageSpec("gpu_seer", f"{__name__}:GpuSeer", "actor", num_cpus=0.5, threads=1)]

    def seen(device):
        config = RunConfig.from_dict({"models": {"device": device}})
        listing = [VideoTask(ref=VideoRef("/v/0.mp4", 1, None, None, "v0"))]
        (task,) = ray_executor.run_ray(listing, specs, config)
        return task.ran_on["gpu_seer"][1]

    assert seen("auto") == ""
    assert ray_executor._actor_environment(specs[1], RunConfig.from_dict({"models": {"device": "cuda"}})) == {
        "OMP_NUM_THREADS": "1"}  # asked for: left as Ray leaves it
    gpu_spec = plan.StageSpec("gpu_seer", f"{__name__}:GpuSeer", "actor", num_cpus=0.5, num_gpus=0.5)
    assert ray_executor._actor_environment(gpu_spec, RunConfig()) == {}  # Ray shows it the GPU it gave


def test_a_run_joins_the_ray_instance_ray_start_left_on_this_machine(monkeypatch):
    from ray._private import services

    from pipeline import ray_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: None)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    assert ray_cluster._starts_local_instance(None)
    assert not ray_cluster._starts_local_instance("127.0.0.1:6379")
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: "127.0.0.1:6379")
    assert not ray_cluster._starts_local_instance(None)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not ray_cluster._starts_local_instance(None)


def test_a_run_joining_a_cluster_hands_its_workers_the_settings_a_submitted_job_gets(monkeypatch):
    import ray

    from pipeline import ray_cluster, submit
    from schemas.config import RunConfig

    settings = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "https://hf.internal", "TOKENIZERS_PARALLELISM": "false",
                "HF_HOME": "/cache/hf"}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_cluster, "_check_reachable", lambda address: None)  # no cluster runs here
    ray_cluster.ensure_ray("127.0.0.1:6379")
    (joined,) = calls
    assert joined["address"] == "127.0.0.1:6379"
    workers = joined["runtime_env"]["env_vars"]
    assert {name: workers.get(name) for name in settings} == settings  # the cache too: same machines
    assert str(PROJECT_ROOT) in workers["PYTHONPATH"].split(os.pathsep)
    job = submit.runtime_env(RunConfig())["env_vars"]
    assert {name: job.get(name) for name in settings} == {**settings, "HF_HOME": None}  # another machine's path


def test_a_stop_while_ray_starts_is_the_runs_stop_not_rays_exit_15(monkeypatch):
    """ray.init sets a SIGTERM handler of its own (`sys.exit(15)`) for as long as it runs: a run stopped
    while Ray started (seconds on a busy machine) exited 15, "stopped (exit)", without its cleanup (chaos
    soak on Ray, 2026-12-07). The run's own handler stays through ray.init, and the stop is its 143."""
    import ray._private.services as services
    from pipeline import command_stops, ray_cluster

    def stopped_inside_ray_init(*args, **kwargs):  # (called by ray.init once it has set its handler)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # (the handler runs here)
        raise ConnectionError("ray.init goes no further here")

    monkeypatch.setattr(ray_cluster, "_check_reachable", lambda address: None)
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", stopped_inside_ray_init)
    with command_stops.handling_stops():
        with pytest.raises(SystemExit) as stop:
            ray_cluster.ensure_ray("127.0.0.1:6379")
        assert signal.getsignal(signal.SIGTERM) is command_stops.on_stop
    assert stop.value.code == 143 and command_stops.STOPPED == [143]


def test_a_stop_while_ray_starts_is_raised_once_ray_init_has_returned(monkeypatch):
    """Raised inside ray.init, in the middle of its core worker's start, the stop left that worker half
    made: the run said it stopped (143), then its process aborted at the exit, -6 (chaos soak on Ray,
    2026-12-07). It is raised as ray.init returns, Ray whole, which the exit then shuts down."""
    import ray

    from pipeline import command_stops, ray_cluster

    returned = []

    def init(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # (the handler runs here)
        returned.append(True)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_cluster, "_check_reachable", lambda address: None)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with command_stops.handling_stops():
        with pytest.raises(SystemExit) as stop:
            ray_cluster.ensure_ray("127.0.0.1:6379")
    assert returned == [True] and stop.value.code == 143


@pytest.mark.ray
def test_the_ray_instance_a_run_starts_gives_its_workers_the_project_and_settings(tmp_path):
    """Set in the environment the instance starts with, not in a job runtime env, so the workers
    Ray starts ahead serve the run; the run's own environment, and its stop handler, are left as
    they were."""
    script = f"""
import json, os, signal, sys
sys.path.insert(0, {str(PROJECT_ROOT)!r})
import ray
from pipeline.ray_cluster import ensure_ray

def stop(signum, frame):  # (vidlens' own: ray.init set one that exits 15, with no cleanup)
    pass

signal.signal(signal.SIGTERM, stop)
ensure_ray(None)
assert signal.getsignal(signal.SIGTERM) is stop

@ray.remote
def worker_view():
    import pipeline.plan
    return {{"hf_home": os.environ.get("HF_HOME"), "runtime_env": ray.get_runtime_context().runtime_env}}

print(json.dumps({{"worker": ray.get(worker_view.remote()), "driver_pythonpath": os.environ.get("PYTHONPATH")}}))
ray.shutdown()
"""
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "RAY_ADDRESS")}
    # a temp folder of its own (short: Ray puts Unix sockets under it), so no running Ray is joined
    ray_temp = tempfile.mkdtemp(prefix="vlr", dir="/tmp")
    env.update(HF_HOME=str(tmp_path / "hf"), RAY_TMPDIR=ray_temp, RAY_USAGE_STATS_ENABLED="0")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["worker"] == {"hf_home": str(tmp_path / "hf"), "runtime_env": {}}
    assert seen["driver_pythonpath"] is None


def test_a_cluster_address_where_nothing_answers_is_refused_at_once(monkeypatch):
    import socket

    import ray

    from pipeline.ray_cluster import _check_reachable, ensure_ray

    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(RuntimeError, match=f"Ray cluster at {re.escape(address)} .* cannot be reached"):
            _check_reachable(address)
    _check_reachable("auto")  # Ray finds a running instance itself
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(RuntimeError, match=f"Ray cluster at 127.0.0.1:{port} "):  # as pasted, with a newline
        ensure_ray(f" 127.0.0.1:{port}\n")


def test_a_run_given_the_job_servers_address_is_told_the_address_it_takes(monkeypatch):
    """`vidlens run --ray-address http://HEAD:8265` (what `submit --address` takes): Ray's own error
    said RAY_ADDRESS was set to an HTTP address, whichever way it was given."""
    import ray

    from pipeline.ray_cluster import ensure_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init was called"))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match=r"http://127.0.0.1:8265 \(--ray-address\) is a Ray job server.*HOST:6379"):
        ensure_ray("http://127.0.0.1:8265")
    # (mutation review) a scheme in any case, as pasted from a document: still a job server's address
    with pytest.raises(RuntimeError, match=r"HTTP://HEAD:8265 \(--ray-address\) is a Ray job server"):
        ensure_ray(" HTTP://HEAD:8265")
    monkeypatch.setenv("RAY_ADDRESS", "https://head:8265/")
    with pytest.raises(RuntimeError, match=r"https://head:8265/ \(RAY_ADDRESS\) is a Ray job server.*submit --address"):
        ensure_ray(None)


def test_a_run_whose_token_the_cluster_refuses_is_told_which_variables_to_set(monkeypatch):
    """Ray said only "Failed to connect to Ray cluster at HOST:PORT" (after its retries), its cause
    the authentication error."""
    import ray

    from pipeline import ray_cluster

    def refused(**kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication "
                               "token is missing or incorrect. Ensure that the token for the cluster is available")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379") from cause

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray_cluster, "_check_reachable", lambda address: None)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(RuntimeError) as raised:
        ray_cluster.ensure_ray("127.0.0.1:6379")
    said = str(raised.value)
    assert said.startswith("the Ray cluster at 127.0.0.1:6379 (--ray-address or RAY_ADDRESS) refused this run's "
                           "token (RPC error: InvalidAuthToken: Authentication token is missing or incorrect)")
    assert "RAY_AUTH_MODE=token" in said and "RAY_AUTH_TOKEN" in said and "\n" not in said

    def unreachable(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379")

    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(ConnectionError, match="Failed to connect"):  # not a token: Ray's own error
        ray_cluster.ensure_ray("127.0.0.1:6379")


def test_a_local_ray_instance_that_does_not_start_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """On a busy machine the instance a run starts timed out (chaos soak on Ray, 2026-12-07): Ray raises a
    bare Exception, which the command took for a bug, a traceback through ray.init and exit 1."""
    import ray

    from pipeline import ray_cluster
    from pipeline.cli import main

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.setattr(ray_cluster, "_starts_local_instance", lambda address: True)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(RuntimeError) as raised:
        ray_cluster.ensure_ray(None)
    said = str(raised.value)
    assert said.startswith("Ray could not start its local instance on this machine (The current node timed out "
                           "during startup.") and "--executor local" in said and "\n" not in said
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"not read: the run stops as Ray starts")
    code = main(["run", str(videos), "--out", str(tmp_path / "out"), "--stages", "ocr", "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"vidlens: error: {said}"


def test_a_ray_cpu_task_leaves_no_download_behind(synthetic_clips, tiny_models, tmp_path, monkeypatch):
    """A Ray worker is killed without `atexit`: the download it kept for a next stage stayed in
    the temp folder, a video a worker, every run. The task drops it when it ends."""
    import tempfile

    import fsspec
    import numpy as np

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers import remote_copy
    from workers.stage import TASK_COLUMN
    from workers.task import VideoRef, VideoTask

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    fsspec.filesystem("memory").pipe("/leftover/cuts.mp4", (synthetic_clips / "cuts.mp4").read_bytes())
    payloads = np.empty(1, dtype=object)
    payloads[:] = [VideoTask(ref=VideoRef("memory://leftover/cuts.mp4", 1, None, "e1", "v0")).to_bytes()]
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
                                  "output": {"thumbnails": False}})
    targets = tuple(spec.target for spec in plan.build_plan(config) if spec.kind == "task")  # decode, sample
    done = ray_executor._run_task_stages({TASK_COLUMN: payloads}, targets, config, chain=targets)
    task = VideoTask.from_bytes(done[TASK_COLUMN][0])
    assert not task.errors and task.frames is not None and len(task.frames.frame_index) >= 8
    assert list(temp.iterdir()) == [] and not remote_copy._LAST_DOWNLOAD
    # nor after a task that failed (Ray retries it, maybe on another worker)
    sample = ray_executor._STAGE_CACHE[(targets[-1], config.to_json())]

    def fails(self, batch):
        raise RuntimeError("a bug in the sample stage")

    monkeypatch.setattr(type(sample), "__call__", fails)
    with pytest.raises(RuntimeError, match="a bug"):
        ray_executor._run_task_stages({TASK_COLUMN: payloads}, targets, config, chain=targets)
    assert list(temp.iterdir()) == [] and not remote_copy._LAST_DOWNLOAD


def _clips_in_memory(synthetic_clips: Path, folder: str) -> list[str]:
    """Three synthetic clips (shots, text, a Matroska file) copied into fsspec's memory store
    under `folder`, which the tasks read as a bucket: their URIs."""
    import fsspec

    memory, uris = fsspec.filesystem("memory"), []
    for index, clip in enumerate(("cuts.mp4", "text.mp4", "sub/order.mkv")):
        name = f"{index}{Path(clip).name}"
        memory.pipe(f"/{folder}/{name}", (synthetic_clips / clip).read_bytes())
        uris.append(f"memory://{folder}/{name}")
    return uris


@pytest.mark.parametrize("ahead, split", [(None, False), (0, False), (None, True)])
def test_a_ray_decode_task_downloads_its_next_video_while_it_decodes_one(ahead, split, synthetic_clips,
                                                                         tiny_models, tmp_path, monkeypatch):
    """A decode task of several videos downloaded each before decoding it, its core idle
    meanwhile (0.90x the speed from local files, a store 40 ms away). By default the next video
    downloads on a thread while one decodes; each is downloaded once (the sample stage reads
    the decode stage's copy), in order, and none is left behind. `download_ahead: 0`: as before.
    `split`: as with shots, a decode task a video, then one sample task for them all: it reads
    the copies the decode tasks left on the node (each video downloaded twice before), and
    deletes them."""
    import tempfile
    import threading

    import numpy as np

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers import remote_copy
    from workers.stage import TASK_COLUMN
    from workers.task import VideoRef, VideoTask

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    uris = _clips_in_memory(synthetic_clips, f"ahead-{ahead}-{split}")
    uris.insert(2, str(synthetic_clips / "cuts.mp4"))  # a local file among them: nothing to download
    downloads, real_download = [], remote_copy.download

    def download(uri, storage, version=None):
        downloads.append((uri, threading.current_thread().name))
        return real_download(uri, storage, version)

    monkeypatch.setattr(remote_copy, "download", download)
    payloads = np.empty(len(uris), dtype=object)
    payloads[:] = [VideoTask(ref=VideoRef(uri, 1, None, "e1", f"v{i}")).to_bytes() for i, uri in enumerate(uris)]
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
                                  "output": {"thumbnails": False}, "resources": {"download_ahead": ahead}})
    targets = tuple(spec.target for spec in plan.build_plan(config) if spec.kind == "task")  # decode, sample
    remote = [uri for uri in uris if uri.startswith("memory://")]
    if split:
        decoded = np.concatenate([ray_executor._run_task_stages({TASK_COLUMN: payloads[row:row + 1]}, targets[:1],
                                                                config, chain=targets)[TASK_COLUMN]
                                  for row in range(len(payloads))])
        assert [uri for uri, _ in downloads] == remote and not remote_copy._LAST_DOWNLOAD  # a video a task: in turn
        handed = sorted(p.name for p in (temp / remote_copy.HANDED_FOLDER).iterdir())
        assert len(handed) == len(remote) and sorted(Path(VideoTask.from_bytes(p).local_path or "").name
                                                     for p in decoded if VideoTask.from_bytes(p).local_path) == handed
        downloads.clear()
        done = ray_executor._run_task_stages({TASK_COLUMN: decoded}, targets[1:], config, chain=targets)
        assert downloads == []  # the decode tasks' copies, not the bucket's
    else:
        done = ray_executor._run_task_stages({TASK_COLUMN: payloads}, targets, config, chain=targets)
    tasks = [VideoTask.from_bytes(payload) for payload in done[TASK_COLUMN]]
    assert [task.ref.uri for task in tasks] == uris
    assert all(not task.errors and len(task.frames.frame_index) >= 8 for task in tasks)
    assert all(task.local_path is None for task in tasks)
    if not split:
        assert [uri for uri, _ in downloads] == remote  # each once, in order
        threads = {thread.startswith("vidlens-download") for _, thread in downloads}
        assert threads == ({False} if ahead == 0 else {True})
    assert [p for p in temp.rglob("*") if p.is_file()] == [] and not remote_copy._LAST_DOWNLOAD


def test_a_copy_a_decode_task_hands_on_is_read_where_it_is_and_never_left_behind(synthetic_clips, tiny_models,
                                                                                tmp_path, monkeypatch):
    """With shots, a video's decode and sample tasks may run on different nodes. A sample task that
    finds no copy at the path it was handed (another node's) downloads the video itself; one for
    a video a stage between failed on (no sampling) still deletes the copy left for it."""
    import tempfile

    import numpy as np

    from pipeline import plan, ray_executor
    from schemas.config import RunConfig
    from workers import remote_copy
    from workers.stage import TASK_COLUMN
    from workers.task import StageError, VideoRef, VideoTask

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    uris = _clips_in_memory(synthetic_clips, "handed")
    downloads, real_download = [], remote_copy.download
    monkeypatch.setattr(remote_copy, "download", lambda uri, *args: downloads.append(uri) or real_download(uri, *args))
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
                                  "output": {"thumbnails": False}})
    targets = tuple(spec.target for spec in plan.build_plan(config) if spec.kind == "task")  # decode, sample
    decoded = []
    for index, uri in enumerate(uris):
        payloads = np.empty(1, dtype=object)
        payloads[:] = [VideoTask(ref=VideoRef(uri, 1, None, "e1", f"v{index}")).to_bytes()]
        decoded.append(VideoTask.from_bytes(
            ray_executor._run_task_stages({TASK_COLUMN: payloads}, targets[:1], config, chain=targets)[TASK_COLUMN][0]))
    elsewhere = tmp_path / "another-node"
    elsewhere.mkdir()
    Path(decoded[0].local_path).rename(elsewhere / "copy.mp4")  # the first one's copy is on another node
    decoded[1].errors.append(StageError("shots", "RuntimeError", "the shot detector failed"))
    decoded[1].unwritten.add("segments")  # as the shot stage leaves a video it failed on
    downloads.clear()
    payloads = np.empty(len(decoded), dtype=object)
    payloads[:] = [task.to_bytes() for task in decoded]
    done = [VideoTask.from_bytes(payload) for payload in
            ray_executor._run_task_stages({TASK_COLUMN: payloads}, targets[1:], config, chain=targets)[TASK_COLUMN]]
    assert downloads == [uris[0]]
    assert done[0].frames is not None and done[2].frames is not None and done[1].frames is None
    assert [p for p in temp.rglob("*") if p.is_file()] == [] and not remote_copy._LAST_DOWNLOAD


@pytest.mark.parametrize("connects", ["a local instance", "a cluster", "a job's driver", "the caller's Ray",
                                      "a stop as ray.init runs", "ray.init failing"])
def test_a_run_shuts_down_the_ray_its_own_ensure_ray_connected_and_no_other(connects, monkeypatch, tmp_path):
    """(mutation review) `vidlens run --executor ray` shuts down as it ends the Ray that `ray_cluster.ensure_ray`
    connected, whichever way it connected: a local instance it started, a cluster it joined, the job it runs in
    (`vidlens submit`'s driver), and where a stop came as `ray.init` ran (held through it, raised once it has
    returned: Ray whole, connected). It leaves alone a Ray this process was connected to before it (its caller's,
    `main` used as a library), and ends nothing where `ray.init` failed. (A stand-in `ray.init`: no Ray runs.)"""
    import ray
    import ray._private.ray_logging as ray_logging
    import ray._private.worker as ray_worker

    import pipeline.job
    from pipeline import cli, command_stops, ray_cluster, ray_relayed
    from pipeline.summary import RunSummary

    up, said = [connects == "the caller's Ray"], []

    def init(**kwargs):
        if connects == "ray.init failing":
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")
        if connects == "a stop as ray.init runs":
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(600):  # (the handler runs in one of these: the stop is held till ray.init returns)
                if command_stops.STOPPED:
                    break
                time.sleep(0.05)
        up[0] = True

    def shutdown():
        said.append("shut down")
        up[0] = False

    def run_job(source, out, config, **kwargs):
        ray_cluster.ensure_ray(config.resources.ray_address)
        return RunSummary(run_id="r1", source=source, output=out, status="succeeded")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: up[0])
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(ray_relayed, "settle", lambda: None)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # (given back after)
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", ray_logging.WorkerStandardStreamDispatcher())
    monkeypatch.setattr(ray_cluster, "_check_reachable", lambda address: None)  # no cluster runs here
    monkeypatch.setattr(ray_cluster, "_starts_local_instance", lambda address: connects == "a local instance")
    monkeypatch.setattr(pipeline.job, "run_job", run_job)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if connects == "a job's driver":
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    else:
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    address = [] if connects in ("a local instance", "a job's driver") else ["--ray-address", "127.0.0.1:6379"]
    argv = ["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--no-progress", *address]
    if connects == "a stop as ray.init runs":
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        assert stopped.value.code == 143 and said == ["shut down"] and not up[0]
    elif connects == "the caller's Ray":
        assert cli.main(argv) == 0 and said == [] and up[0]  # (connected still)
    elif connects == "ray.init failing":
        assert cli.main(argv) == 2 and said == [] and not up[0]
    else:
        assert cli.main(argv) == 0 and said == ["shut down"] and not up[0]
