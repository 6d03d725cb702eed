"""Running the plan on Ray: Ray Data's streaming executor over the plan's stages (connecting to
or starting the Ray cluster is `pipeline.ray_cluster`'s).

CPU stages run as Ray tasks, a few videos each, and model stages as pools of actors, with the
resources `pipeline.plan.build_plan` chose. The local executor (`pipeline.local`) runs the same
plan without Ray.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.log_relay import log_like_the_command_line
from pipeline.plan import TASK_VIDEO_BYTES, StageSpec, lost_blocks_allowed, videos_in_flight
from pipeline.ray_cluster import quiet_ray_logs
from schemas.config import RunConfig
from workers.stage import TASK_COLUMN, Stage, build_stage, pack, unpack
from workers.task import VideoTask

log = logging.getLogger(__name__)

#: times Ray runs again a decode task, or a model actor's batch, whose worker process died
RETRIES = 3


_STAGE_CACHE: dict[tuple[str, str], Stage] = {}


def _run_task_stages(batch: dict[str, np.ndarray], targets: tuple[str, ...], config: RunConfig,
                     threads: int = 0, chain: tuple[str, ...] = (),
                     preparers: dict | None = None, emits_groups: bool = False) -> dict[str, np.ndarray]:
    """Consecutive stateless CPU stages as one Ray task, video by video; the stage objects are
    kept per worker process. `emits_groups`: the videos leave as one group row (`Stage.emits_groups`).

    Each video goes through every stage before the next one starts, as in the local
    executor's workers: what a stage keeps for the next (the decode stage's open source, a
    bucket's download) is kept for one video, so it serves every video of a task of several.
    The first call in a worker builds every task stage of the plan (`chain`): the sample stage
    loads the models' processors (seconds of importing transformers), and a decode child
    forked by the decode stage before that would import them once more on the first video,
    on the critical path of a run's start. With the driver's `preparers` (detached from their
    processors), the sample stage needs no transformers at all.
    """
    settings = config.to_json()
    if (targets[0], settings) not in _STAGE_CACHE:
        log_like_the_command_line(config.storage)
        if threads:
            from workers.frame_sources import share_threads

            share_threads(threads)
        for name in dict.fromkeys((*chain, *targets)):
            if (name, settings) not in _STAGE_CACHE:
                _STAGE_CACHE[(name, settings)] = build_stage(name, config, preparers)
    stages = [_STAGE_CACHE[(target, settings)] for target in targets]
    # with shots, decode and sample are tasks of their own: a bucket video's copy is left on the
    # node for the sample task, which downloads the video only where it runs on another node
    here = {stage.name for stage in stages}
    later = {_STAGE_CACHE[(target, settings)].name for target in chain} - here
    for stage in stages:
        if stage.name == "decode":
            stage.hands_on_copies = "sample" in later
        elif stage.name == "sample":
            stage.drops_handed_copies = "decode" not in here
    payloads = unpack(batch)
    ahead = _downloads_ahead(config, stages, len(payloads))
    from workers.remote_copy import drop_download

    try:
        if len(stages) == 1 and not ahead:
            done = stages[0]({TASK_COLUMN: payloads})[TASK_COLUMN]
        else:
            videos = []
            for row in _downloaded_ahead(payloads, config, ahead):
                video = {TASK_COLUMN: payloads[row:row + 1]}
                for stage in stages:
                    video = stage(video)
                videos.append(video[TASK_COLUMN])
            done = np.concatenate(videos)
    finally:
        # the task's last video's download, kept for a next stage of the same task: none comes
        # (nor after a task that failed). A Ray worker is killed without `atexit`, so a kept one
        # stayed in its temp folder (a video a worker, every run); a sample task that lands on
        # the decode task's worker downloads again
        drop_download()
    return pack(done) if emits_groups else {TASK_COLUMN: done}


def _downloads_ahead(config: RunConfig, stages: list[Stage], videos: int) -> int:
    """Videos a decode (or sample) task downloads ahead of the one it decodes
    (`resources.download_ahead`, by default 1): none in a task of one video."""
    if videos < 2 or stages[0].name not in ("decode", "sample"):
        return 0
    ahead = config.resources.download_ahead
    return min(videos - 1, 1 if ahead is None else ahead)


def _downloaded_ahead(payloads: np.ndarray, config: RunConfig, ahead: int) -> Iterator[int]:
    """The rows of `payloads` in order, each once its video's download ahead has ended.

    A decode task downloading each of its videos before decoding it leaves its core idle for
    the store's latency and the transfer (60 real clips from a store answering after 40 ms:
    0.90x the speed from local files on 2 cores, 0.96x with this: `bench.latency --ray`).
    Here the next `ahead` of the task's videos download on threads while it decodes one, and
    each copy becomes this process's kept download (`workers.remote_copy.adopt_download`), read by
    the task's decode and sample stages and deleted as their own download would be.
    """
    if not ahead:
        yield from range(len(payloads))
        return
    from pipeline.downloads import DownloadAhead
    from workers.remote_copy import adopt_download
    from workers.sampling import listed_version

    downloads = DownloadAhead(config, ahead, keep=0, max_bytes=config.resources.download_ahead_bytes)
    try:
        tasks = (VideoTask.from_bytes(payload) for payload in payloads)
        for row, task in enumerate(downloads.tasks(tasks)):
            path = downloads.hand_over(task)
            if path is not None:
                adopt_download(task.ref.uri, config.storage, listed_version(task), path)
            yield row
    finally:
        downloads.close()


def _ray_steps(specs: list[StageSpec]) -> list[list[StageSpec]]:
    """The plan as Ray Data steps: each model stage alone, and consecutive CPU stages that
    declare the same resources together, as one task (which Ray Data would fuse anyway)."""
    steps: list[list[StageSpec]] = []
    for spec in specs:
        last = steps[-1][-1] if steps else None
        if (spec.kind == "task" and last is not None and last.kind == "task"
                and (spec.num_cpus, spec.memory, spec.threads) == (last.num_cpus, last.memory, last.threads)):
            steps[-1].append(spec)
        else:
            steps.append([spec])
    return steps


def ray_dataset(payloads: Any, specs: list[StageSpec], config: RunConfig, grouped: bool = False,
                preparers: dict | None = None, emits_groups: bool = False) -> Any:
    """The Ray Data plan over a dataset of pickled tasks: CPU tasks and model actor pools.

    `grouped`: `payloads` are the feed's rows, each a group of videos for one task of the first
    step (see `pipeline.feed`), rather than one row per video. `preparers`: the frame preparers
    for the CPU tasks, detached from their processors here (loaded here if None).
    `emits_groups`: the last step emits each of its batches as one group row (read them with
    `workers.stage.unpack`), rather than a row a video.
    """
    import ray.data

    ds = payloads
    chain = tuple(spec.target for spec in specs if spec.kind == "task")
    preparers = stage_preparers(specs, config, preparers)
    steps = _ray_steps(specs)
    with warnings.catch_warnings():
        # restarts and retries have no named parameter in Ray Data: it warns at every stage that
        # it will stop taking them in 2.64, which pyproject.toml pins below. Not the user's concern
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        for index, step in enumerate(steps):
            spec, last = step[0], emits_groups and index == len(steps) - 1
            if spec.kind == "task":
                videos_per_task = max(s.batch_size for s in step)
                ds = ds.map_batches(
                    _run_task_stages,
                    fn_kwargs={"targets": tuple(s.target for s in step), "config": config, "threads": spec.threads,
                               "chain": chain, "preparers": preparers, "emits_groups": last},
                    batch_size=1 if grouped and index == 0 else videos_per_task,
                    batch_format="numpy",
                    num_cpus=spec.num_cpus,
                    memory=spec.memory,
                    concurrency=config.resources.decode_concurrency,
                    max_retries=RETRIES,
                    # a fresh worker process after about max_videos_per_worker videos (tasks only;
                    # Ray has no such option for actors, which a crash or max_restarts replaces)
                    max_calls=_max_calls(config.resources.max_videos_per_worker, videos_per_task),
                )
            else:
                settings = _actor_environment(spec, config)
                environment = {"runtime_env": {"env_vars": settings}} if settings else {}
                ds = ds.map_batches(
                    _on_ray(spec.load_class(), emits_groups=last),
                    fn_constructor_kwargs={"config": config},
                    batch_size=spec.batch_size,
                    batch_format="numpy",
                    num_cpus=spec.num_cpus,
                    num_gpus=spec.num_gpus,
                    memory=spec.memory,
                    compute=ray.data.ActorPoolStrategy(min_size=spec.min_actors, max_size=spec.max_actors,
                                                       max_tasks_in_flight_per_actor=spec.batches_an_actor or None),
                    # an actor restarted however often it dies (Ray Data's default): one dead for good
                    # stayed in its pool, counted but given nothing, and the run waited for ever;
                    # a batch that kills its actor every time is given up on after 3 retries
                    max_restarts=-1,
                    max_task_retries=RETRIES,
                    **environment,
                )
    return ds


def _actor_environment(spec: StageSpec, config: RunConfig) -> dict[str, str]:
    """Environment variables of a model stage's actors: the CPU threads of one without a GPU
    (`StageSpec.threads`), and no GPU to see where it reserves none and `models.device` is
    auto. Ray sets CUDA_VISIBLE_DEVICES only for an actor given GPUs (no longer to "" for one
    given none: ray-project/ray#54868): such an actor saw every GPU of its node, took "auto"
    for the first, and ran there beside the actors Ray had given it to, unaccounted for."""
    settings = {"OMP_NUM_THREADS": str(spec.threads)} if spec.threads else {}
    if spec.num_gpus == 0 and not config.models.device.startswith("cuda"):
        settings["CUDA_VISIBLE_DEVICES"] = ""
    return settings


def _on_ray(stage_class: type[Stage], emits_groups: bool) -> type[Stage]:
    """`stage_class` as a Ray actor builds it, under the same name (Ray's actor and process names): its
    worker's log lines printed as the command line's (`log_like_the_command_line`), and `emits_groups`."""
    def __init__(self: Stage, config: RunConfig, **kwargs: Any) -> None:
        log_like_the_command_line(config.storage)
        stage_class.__init__(self, config, **kwargs)

    return type(stage_class.__name__, (stage_class,),
                {"emits_groups": emits_groups, "__init__": __init__, "__qualname__": stage_class.__qualname__,
                 "__module__": stage_class.__module__})


def stage_preparers(specs: list[StageSpec], config: RunConfig, preparers: dict | None = None) -> dict | None:
    """The frame preparers for the plan's CPU stages in new worker processes: `preparers` (loaded
    here, on the driver, if None) detached from their processors; None when no CPU stage takes
    preparers."""
    if not any(spec.load_class().takes_preparers for spec in specs if spec.kind == "task"):
        return None
    from workers.models import detached_preparers, load_frame_preparers

    return detached_preparers(preparers if preparers is not None else load_frame_preparers(config))


def _max_calls(max_videos: int, batch_size: int) -> int | None:
    return max(1, max_videos // max(1, batch_size)) if max_videos > 0 else None


def run_ray(tasks: Iterable[VideoTask], specs: list[StageSpec], config: RunConfig,
            preparers: dict | None = None) -> Iterator[VideoTask]:
    """Run the plan on Ray Data's streaming executor and yield finished tasks as they arrive.

    `tasks` is consumed lazily, on a driver thread, while the workers process the first ones:
    a listing of a huge bucket is never held whole (see `pipeline.feed`). A listing longer than
    `resources.videos_per_dataset` runs as successive Ray Data executions of that many videos:
    Ray Data keeps every block's statistics until its execution ends. `preparers`: the frame
    preparers for the CPU tasks (`preflight` returns them; loaded here if None), which the tasks
    get detached from their processors.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.verbose_stats_logs = False
    quiet_ray_logs()
    per_dataset = config.resources.videos_per_dataset
    listing = iter(tasks)
    executions = 0
    lost: dict[str, VideoTask] = {}
    while (first := next(listing, None)) is not None:
        rest = itertools.islice(listing, per_dataset - 1) if per_dataset > 0 else listing
        if executions:
            log.info("starting Ray Data execution %d (resources.videos_per_dataset: %d)", executions + 1, per_dataset)
        yield from _run_ray_execution(itertools.chain([first], rest), specs, config, preparers, lost)
        executions += 1
    if lost:
        # a lost block takes every video of its task or model batch with it: only one of them
        # need have killed the worker at each of Ray's retries. One video a task and a batch,
        # each is lost alone or finished. (A listing reader is never retried, and its queue not
        # restarted: their videos in flight are lost at once, with no video at fault.)
        log.warning("%d video%s lost with the Ray worker processes that held them (a task or a model batch that "
                    "killed its worker at every retry, or the listing's queue or reader lost): running them again, "
                    "one to a task and a batch",
                    len(lost), "" if len(lost) == 1 else "s")
        # one batch at a time on each actor: none queued behind the one that kills it, to be lost with it;
        # no more actors than videos (Ray Data warns of a pool whose min_size is more than the inputs it got)
        alone = [replace(spec, batch_size=1, batches_an_actor=1, min_actors=min(spec.min_actors, len(lost)),
                         max_actors=min(spec.max_actors, len(lost))) for spec in specs]
        # room for all of them in flight, and to lose each again (a failure that is no one video's
        # loses them all): the rest of each comes back as an errors row from the job
        again: dict[str, VideoTask] = {}
        yield from _run_ray_execution(iter(list(lost.values())), alone, config, preparers, again, room=len(lost))
        if len(again) > 1 and len(again) == len(lost):
            # each alone, a video that kills its worker is lost by itself and the others finish: every one
            # lost again is the cluster's doing, such as this execution's queue placed on a node lost moments
            # before and not yet known dead (soak of Ray on S3 with both worker nodes killed, 2026-12-07: every
            # video, broken files too, got a WorkerLost row). Once more, on the cluster as it is by then
            log.warning("the %d videos run again were all lost again, none by itself: running them once more",
                        len(again))
            yield from _run_ray_execution(iter(list(again.values())), alone, config, preparers, {}, room=len(again))


def _run_ray_execution(tasks: Iterable[VideoTask], specs: list[StageSpec], config: RunConfig,
                       preparers: dict | None, lost: dict[str, VideoTask], room: int = 0) -> Iterator[VideoTask]:
    """One Ray Data execution of the plan over `tasks` (see `run_ray`); the tasks it took and
    never gave back (their blocks lost) are added to `lost`, by video id. `room`: videos in
    flight, and lost blocks allowed, beyond the plan's."""
    from pipeline.feed import TaskFeed

    res = config.resources
    taken: dict[str, VideoTask] = {}  # the videos fed and not yet back: the in-flight ones

    def fed() -> Iterator[VideoTask]:
        for task in tasks:
            taken[task.ref.video_id] = task
            yield task

    in_flight = videos_in_flight(specs, config) + room
    # the feed's rows are the first step's tasks (the decode stage's, with the sample stage's
    # when they share resources): groups of videos as the listing has them queued
    first = max(spec.batch_size for spec in _ray_steps(specs)[0])
    with TaskFeed(fed(), readers=res.feed_readers, in_flight=in_flight, videos_per_group=first,
                  group_bytes=TASK_VIDEO_BYTES) as feed, _losing_blocks(lost_blocks_allowed(specs, config, in_flight)):
        # prefetch_batches=0: with prefetching, Ray Data holds a finished video back until the
        # next one arrives, which the listing may be waiting for. batch_size=None: each block
        # as the last stage made it, none held back to fill a batch, and no per-video slicing
        # on the driver. emits_groups: that block is the stage's whole batch of videos in one
        # row, not a block a video: Ray Data's executor and iterator threads on the driver
        # handle each block, and with a block a video they cost it about 1 ms of CPU a video
        # more (2.2-2.4 against 1.2-1.3 ms, the feed and two stages that do nothing, 2 cores)
        finished = ray_dataset(feed.dataset(), specs, config, grouped=True, preparers=preparers,
                               emits_groups=True).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
        for batch in finished:
            for payload in unpack(batch):
                feed.finished()
                done = VideoTask.from_bytes(payload)
                taken.pop(done.ref.video_id, None)
                yield done
        feed.check()
    lost.update(taken)


@contextlib.contextmanager
def _losing_blocks(allowed: int) -> Iterator[None]:
    """Ray Data's executions started here go on past up to `allowed` lost blocks (by default, the
    first one failed the whole execution: one video that killed its worker every time ended the run)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before, context.max_errored_blocks = context.max_errored_blocks, allowed
    try:
        yield
    finally:
        context.max_errored_blocks = before
