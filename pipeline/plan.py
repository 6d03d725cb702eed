"""The plan: which stages run, with what resources, wired into Ray Data or run in-process.

This is the one place where resources (GPUs, CPUs, memory, pool sizes, batch sizes) are
attached to stages. `build_plan` checks that every task field a stage reads is written by
an earlier stage, so a miswired pipeline fails when it is built, not hours into a run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from schemas.config import RunConfig
from workers.stage import TASK_COLUMN, Stage, build_stage, load_stage_class, pack, unpack
from workers.task import INITIAL_FIELDS, VideoTask

log = logging.getLogger(__name__)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Hugging Face settings that the Ray workers of a run take from the shell that started it, when
#: set there (never credentials); `vidlens submit` hands the same ones to its job.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "TOKENIZERS_PARALLELISM")


class PlanError(ValueError):
    """The stages do not fit together; the message names the stage and the missing field."""


@dataclass(frozen=True)
class StageSpec:
    """A stage and how it is run: as stateless CPU tasks, or in a pool of model actors."""

    name: str
    #: "module:Class" so the plan can be described without importing every model library.
    target: str
    kind: str  # "task" | "actor"
    num_cpus: float
    num_gpus: float = 0.0
    memory: int | None = None
    batch_size: int = 1
    min_actors: int = 1
    max_actors: int = 1
    #: threads its processes run on Ray: a task's decoders, OpenCV and torch, or a CPU-only model
    #: actor's torch (OMP_NUM_THREADS); 0 leaves Ray's choice (one per CPU it reserves).
    threads: int = 0

    def load_class(self) -> type[Stage]:
        """Import the stage class."""
        return load_stage_class(self.target)


#: videos per decode/sample Ray task when shot detection is off (`resources.per_stage` sets it): at
#: most, as the listing has them queued, and while their files are under `TASK_VIDEO_BYTES`.
DEFAULT_VIDEOS_PER_TASK = 4
#: the videos of a decode/sample Ray task stop at this many bytes of files: a short clip's decode
#: costs less than Ray's tens of milliseconds a task, a larger video's more, and several large
#: videos in one task would decode one after another while other cores wait.
TASK_VIDEO_BYTES = 8 * 2**20


def build_plan(config: RunConfig, gpus_visible: int | None = None) -> list[StageSpec]:
    """The stages this configuration runs, in order, with resources chosen for this cluster."""
    res = config.resources
    gpus = _visible_gpus() if gpus_visible is None else gpus_visible
    actor_stages = [s for s in ("shots", "embed", "captions", "ocr") if _runs(config, s)]
    # the stages that run torch models, on a GPU where there is one; OCR runs ONNX on the CPU
    torch_stages = [s for s in actor_stages if s != "ocr"]
    min_actors = {s: int(res.per_stage.get(s, {}).get("min_actors", res.min_actors)) for s in actor_stages}
    # Every model actor holds what it reserves for the whole run, and a stage whose actor cannot
    # start stalls the run: its videos fill the pipeline, and the listing waits for them. So the
    # GPU model stages share the GPUs when there are fewer than their actors (one GPU, three
    # stages: a third each), as do actors and tasks the CPUs when a whole core each would not
    # fit: each gets a fair share of the cluster (two decode tasks and the actors), which is
    # a whole core on any node of more than a few. Shares are rounded down to a hundredth:
    # Ray Data rounds what a node has left to 5 decimals, and exact thirds of 2 CPUs left
    # 0.66666 for a second decode task of 0.666667, which never started.
    num_gpus = res.num_gpus_per_actor if res.num_gpus_per_actor is not None else _gpu_share(
        gpus, sum(min_actors[s] for s in torch_stages))
    cpu_share = max(0.01, math.floor(100 * _cpu_count() / (sum(min_actors.values()) + 2)) / 100)
    actor_cpus = min(res.num_cpus_per_actor, cpu_share)
    task_cpus = min(1.0, cpu_share)
    # The memory actors and tasks declare, likewise: Ray gives a machine of 8 GiB about 5.4 GiB,
    # less than four actors of 2 GiB, and the third would never start. Scaled down to fit (it is
    # what Ray's scheduler counts, not a limit on what a process may use).
    actor_memory, task_memory = _fitting_memory(
        res.actor_memory_bytes, res.task_memory_bytes, sum(min_actors.values()), _cluster_memory())
    # Ray runs a process on one thread per CPU it reserves, at least one. A decode task keeps
    # to that (left alone, FFmpeg starts a thread per core in each). A model actor with no GPU
    # reserves a fraction of a core, so that decode tasks fit beside it, yet it is where a
    # CPU-only run spends its time: its torch shares the node's cores with the other models
    # (OCR sizes its own ONNX sessions).
    model_threads = max(1, int(_node_cpus() // max(1, len(torch_stages))))

    def actor(name: str, target: str, gpu: bool = True) -> StageSpec:
        spec = StageSpec(
            name=name, target=target, kind="actor", num_cpus=actor_cpus,
            num_gpus=num_gpus if gpu else 0.0, memory=actor_memory,
            batch_size=res.videos_per_batch, min_actors=res.min_actors, max_actors=res.max_actors,
        )
        spec = _with_stage_overrides(spec, res.per_stage.get(name, {}))
        return replace(spec, threads=model_threads) if spec.num_gpus == 0 and name in torch_stages else spec

    # Ray spends tens of milliseconds of CPU on each task, more than decoding a short clip's
    # sampled frames: several videos share a task. Not when shots run, as decoding then reads
    # every frame, and a task's videos would decode one after another while other cores wait.
    videos_per_task = 1 if _runs(config, "shots") else DEFAULT_VIDEOS_PER_TASK

    def task(name: str, target: str) -> StageSpec:
        spec = StageSpec(name, target, "task", num_cpus=task_cpus, memory=task_memory,
                         batch_size=videos_per_task)
        spec = _with_stage_overrides(spec, res.per_stage.get(name, {}))
        return replace(spec, threads=max(1, int(spec.num_cpus)))

    stages = ("decode", "sample", "shots", "embed", "captions", "ocr")
    unknown = sorted(set(res.per_stage) - set(stages))
    if unknown:
        raise PlanError(f"resources.per_stage.{unknown[0]}: not a stage ({', '.join(stages)})")

    specs = [task("decode", "workers.sampling:DecodeStage")]
    if _runs(config, "shots"):
        specs.append(actor("shots", "workers.shots:ShotStage"))
    specs.append(task("sample", "workers.sampling:SampleStage"))
    if _runs(config, "embed"):
        specs.append(actor("embed", "workers.embed:EmbedStage"))
    if _runs(config, "captions"):
        specs.append(actor("captions", "workers.captions:CaptionStage"))
    if _runs(config, "ocr"):
        specs.append(actor("ocr", "workers.ocr:OcrStage", gpu=False))
    check_chain([spec.load_class() for spec in specs])
    return specs


def warn_if_unfit(specs: list[StageSpec], gpus: int | None = None) -> None:
    """Warn where settings asked for (the plan's own shares always fit) leave a stage's actors,
    or any decode task beside them, no room in the Ray cluster as it is now (`gpus`: its GPUs,
    read from it if None): a stall unless it grows. For a plan about to run on Ray."""
    gpus = _visible_gpus() if gpus is None else gpus
    needed = gpus_needed(specs)
    if gpus and needed > gpus:
        log.warning(
            "the model stages' actors need %d GPUs at once (%s) but the cluster has %d: unless it "
            "grows, a stage whose actor cannot start will stall the run. Share GPUs between the "
            "stages: resources.num_gpus_per_actor (e.g. %g), or num_gpus in resources.per_stage",
            needed, ", ".join(f"{s.name} {s.min_actors}x{s.num_gpus:g}" for s in specs if s.num_gpus),
            gpus, _gpu_share(gpus, sum(s.min_actors for s in specs if s.num_gpus)))
    for what, field, available in (("CPUs", "num_cpus", _cpu_count()), ("GiB of memory", "memory", _cluster_memory())):
        actors = sum((getattr(s, field) or 0) * s.min_actors for s in specs if s.kind == "actor")
        task = max((getattr(s, field) or 0) for s in specs if s.kind == "task")
        if available and actors + task > available * 1.0001:
            scale = 2**30 if field == "memory" else 1
            log.warning(
                "the model stages' actors and a decode task need %.3g %s at once but the cluster has "
                "%.3g: unless it grows, the run will stall. Lower num_cpus_per_actor, "
                "actor_memory_bytes or the per_stage settings in resources",
                (actors + task) / scale, what, available / scale)


def _gpu_share(gpus: int, actors: int) -> float:
    """GPUs per model actor so that `actors` of them fit on `gpus` GPUs at once: 1 where there is
    a GPU for each, else an equal fraction (rounded down to a hundredth); 0 without a GPU."""
    if gpus <= 0:
        return 0.0
    per_gpu = math.ceil(max(1, actors) / gpus)
    return 1.0 if per_gpu == 1 else math.floor(100 / per_gpu) / 100


def _fitting_memory(actor_bytes: int, task_bytes: int | None, actors: int,
                    available: float | None) -> tuple[int, int | None]:
    """(actor, task) memory to declare so that `actors` actors and two tasks fit in `available`
    bytes: as configured where they do, else scaled down alike (to whole MiB)."""
    wanted = actors * actor_bytes + 2 * (task_bytes or 0)
    if not available or wanted <= available:
        return actor_bytes, task_bytes
    scale = 0.98 * available / wanted  # a margin: Ray keeps its own accounts of what is left

    def scaled(value: int) -> int:
        return max(2**20, int(value * scale) // 2**20 * 2**20)

    return scaled(actor_bytes), (scaled(task_bytes) if task_bytes else task_bytes)


def gpus_needed(specs: list[StageSpec]) -> int:
    """Whole GPUs the model stages' smallest pools take at once: an actor of 1 GPU or more takes
    whole ones, fractional actors are packed onto GPUs as Ray packs them."""
    whole, free = 0, []
    demands = sorted((s.num_gpus for s in specs for _ in range(s.min_actors) if s.num_gpus), reverse=True)
    for demand in demands:
        if demand >= 1:
            whole += math.ceil(demand)
            continue
        for i, left in enumerate(free):
            if demand <= left + 1e-9:
                free[i] = left - demand
                break
        else:
            free.append(1.0 - demand)
    return whole + len(free)


#: what `resources.per_stage.<stage>` may set, and the StageSpec field each one sets. A CPU
#: task stage (decode, sample) takes the first three: its `videos_per_batch` is videos per Ray
#: task, which spreads Ray's per-task cost over several short clips.
_STAGE_OVERRIDES = {"num_cpus": "num_cpus", "memory_bytes": "memory", "videos_per_batch": "batch_size",
                    "num_gpus": "num_gpus", "min_actors": "min_actors", "max_actors": "max_actors"}
_TASK_OVERRIDES = ("num_cpus", "memory_bytes", "videos_per_batch")


def _with_stage_overrides(spec: StageSpec, overrides: dict[str, Any]) -> StageSpec:
    known = _TASK_OVERRIDES if spec.kind == "task" else tuple(_STAGE_OVERRIDES)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise PlanError(f"resources.per_stage.{spec.name}.{unknown[0]}: unknown setting "
                        f"(known for {spec.name}: {', '.join(known)})")
    values = {_STAGE_OVERRIDES[k]: (float(v) if k in ("num_gpus", "num_cpus") else int(v))
              for k, v in overrides.items()}
    spec = replace(spec, **values)
    if spec.batch_size < 1 or spec.num_cpus <= 0:
        raise PlanError(f"resources for {spec.name}: need videos_per_batch >= 1 and num_cpus > 0, "
                        f"got {spec.batch_size} and {spec.num_cpus:g}")
    if spec.min_actors < 1 or spec.max_actors < spec.min_actors:
        raise PlanError(f"resources for {spec.name}: need 1 <= min_actors <= max_actors, "
                        f"got {spec.min_actors} and {spec.max_actors}")
    return spec


def _runs(config: RunConfig, stage: str) -> bool:
    if stage == "embed":
        # objects, scenes and match are derived from the embeddings in the same actor
        return any(config.enabled(s) for s in ("embed", "objects", "scenes", "match"))
    return config.enabled(stage)


def check_chain(stages: Iterable[type[Stage]]) -> None:
    """Raise PlanError if a stage reads a task field that no earlier stage writes."""
    available = set(INITIAL_FIELDS)
    for stage in stages:
        missing = [f for f in stage.reads if f not in available]
        if missing:
            raise PlanError(
                f"stage {stage.name!r} reads {', '.join(missing)}, which no earlier stage writes "
                f"(available: {', '.join(sorted(available))})"
            )
        available.update(stage.writes)


def describe(specs: list[StageSpec]) -> str:
    """One line per stage with the resources chosen, printed at the start of a run."""
    lines = []
    for s in specs:
        if s.kind == "actor":
            threads = f" ({s.threads} torch thread{'s' if s.threads > 1 else ''} on Ray)" if s.threads else ""
            lines.append(
                f"  {s.name:<9} actors {s.min_actors}-{s.max_actors}, {s.num_gpus:g} GPU, "
                f"{s.num_cpus:.2g} CPU{threads}, {(s.memory or 0) / 2**30:.1f} GiB each, {s.batch_size} videos/batch"
            )
        else:
            memory = f", {s.memory / 2**30:.1f} GiB" if s.memory else ""
            videos = f"up to {s.batch_size} videos/task" if s.batch_size > 1 else "1 video/task"
            lines.append(f"  {s.name:<9} CPU tasks, {s.num_cpus:.2g} CPU{memory} each, {videos}")
    return "\n".join(lines)


# --- running in-process ---------------------------------------------------------------------


def run_local(tasks: Iterable[VideoTask], specs: list[StageSpec], config: RunConfig,
              preparers: dict | None = None) -> Iterator[VideoTask]:
    """Run the stages without Ray: decoding in a pool of worker processes, each model stage on
    a thread of its own, consecutive batches overlapping (see `pipeline.local`). `preparers`:
    the frame preparers for the CPU stages (`preflight` returns them; if None, each worker
    loads its own)."""
    from pipeline.local import run_local as run_pipelined_locally

    yield from run_pipelined_locally(tasks, specs, config, preparers)


# --- running on Ray -------------------------------------------------------------------------


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
        if threads:
            from workers.frame_sources import share_threads

            share_threads(threads)
        for name in dict.fromkeys((*chain, *targets)):
            if (name, settings) not in _STAGE_CACHE:
                _STAGE_CACHE[(name, settings)] = build_stage(name, config, preparers)
    stages = [_STAGE_CACHE[(target, settings)] for target in targets]
    payloads = unpack(batch)
    if len(stages) == 1:
        done = stages[0]({TASK_COLUMN: payloads})[TASK_COLUMN]
    else:
        videos = []
        for row in range(len(payloads)):
            video = {TASK_COLUMN: payloads[row:row + 1]}
            for stage in stages:
                video = stage(video)
            videos.append(video[TASK_COLUMN])
        done = np.concatenate(videos)
    return pack(done) if emits_groups else {TASK_COLUMN: done}


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
                max_retries=3,
                # a fresh worker process after about max_videos_per_worker videos (tasks only;
                # Ray has no such option for actors, which a crash or max_restarts replaces)
                max_calls=_max_calls(config.resources.max_videos_per_worker, videos_per_task),
            )
        else:
            threads = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(spec.threads)}}} if spec.threads else {}
            ds = ds.map_batches(
                _emitting_groups(spec.load_class()) if last else spec.load_class(),
                fn_constructor_kwargs={"config": config},
                batch_size=spec.batch_size,
                batch_format="numpy",
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                memory=spec.memory,
                compute=ray.data.ActorPoolStrategy(min_size=spec.min_actors, max_size=spec.max_actors),
                max_restarts=3,
                max_task_retries=3,
                **threads,
            )
    return ds


def _emitting_groups(stage_class: type[Stage]) -> type[Stage]:
    """`stage_class` with `emits_groups` set, under the same name (Ray's actor and process names)."""
    return type(stage_class.__name__, (stage_class,),
                {"emits_groups": True, "__qualname__": stage_class.__qualname__, "__module__": stage_class.__module__})


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
    per_dataset = config.resources.videos_per_dataset
    listing = iter(tasks)
    executions = 0
    while (first := next(listing, None)) is not None:
        rest = itertools.islice(listing, per_dataset - 1) if per_dataset > 0 else listing
        if executions:
            log.info("starting Ray Data execution %d (resources.videos_per_dataset: %d)", executions + 1, per_dataset)
        yield from _run_ray_execution(itertools.chain([first], rest), specs, config, preparers)
        executions += 1


def _run_ray_execution(tasks: Iterable[VideoTask], specs: list[StageSpec], config: RunConfig,
                       preparers: dict | None) -> Iterator[VideoTask]:
    """One Ray Data execution of the plan over `tasks` (see `run_ray`)."""
    from pipeline.feed import TaskFeed

    res = config.resources
    # every stage may hold up to one batch while it waits for the next videos: fewer videos in
    # flight than that would stall the pipeline
    in_flight = max(res.max_videos_in_flight, sum(spec.batch_size for spec in specs) + res.feed_readers + 1)
    # the feed's rows are the first step's tasks (the decode stage's, with the sample stage's
    # when they share resources): groups of videos as the listing has them queued
    first = max(spec.batch_size for spec in _ray_steps(specs)[0])
    with TaskFeed(tasks, readers=res.feed_readers, in_flight=in_flight, videos_per_group=first,
                  group_bytes=TASK_VIDEO_BYTES) as feed:
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
                yield VideoTask.from_bytes(payload)
        feed.check()


def ensure_ray(address: str | None) -> None:
    """Connect to the Ray cluster at `address` (or RAY_ADDRESS), or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
    # and the model cache: a run (unlike a submitted job) starts on the cluster, usually on its
    # head node, whose cache path the other nodes are set up to share or to have alike
    for name in (*FORWARDED_ENV, "HF_HOME"):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    # inside a Ray job (vidlens submit) the job's runtime env already ships the project and its
    # settings to every worker, and Ray refuses a second one that sets the same variables
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    starts_instance = _starts_local_instance(address)
    kwargs = dict(address=address, ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=True,
                  include_dashboard=False if starts_instance else None)
    if in_job:
        ray.init(**kwargs)
    elif starts_instance:
        # the instance started here runs its workers in this process's environment: set there,
        # the settings reach the workers Ray starts ahead with the instance, which a job's
        # runtime env would turn away (each stage would then start its own, seconds on a laptop)
        with _environment(env_vars):
            ray.init(**kwargs)
    else:
        ray.init(**kwargs, runtime_env={"env_vars": env_vars})


def _starts_local_instance(address: str | None) -> bool:
    """Whether `ray.init(address)` starts a Ray instance here rather than joining a running one.

    With no address, Ray joins a cluster that `ray start` left running on this machine.
    """
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return False
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None) is None


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with `values` set, restored afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _visible_gpus() -> int:
    """GPUs of the cluster (this machine's without Ray)."""
    def local() -> int:
        import torch

        return torch.cuda.device_count()

    return _from_ray(lambda ray: int(ray.cluster_resources().get("GPU", 0)), local)


def _cluster_memory() -> float | None:
    """Memory of the whole cluster that Ray schedules by (None without a Ray instance: nothing
    declares memory then)."""
    return _from_ray(lambda ray: float(ray.cluster_resources()["memory"]), lambda: None)


def _node_cpus() -> float:
    """CPUs of the largest node (this machine without Ray)."""
    return _from_ray(lambda ray: max(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")),
                     _local_cpus)


def _cpu_count() -> float:
    """CPUs of the whole cluster (this machine without Ray)."""
    return _from_ray(lambda ray: float(ray.cluster_resources()["CPU"]), _local_cpus)


def _local_cpus() -> float:
    return float(os.cpu_count() or 1)


def _from_ray(read: Any, local: Any) -> Any:
    """`read(ray)` when a Ray instance runs in this process; `local()` without one, or when
    Ray cannot answer (no such resource, no live node).

    Never imports Ray: a run on the local executor would pay half a second for it, and its
    forked workers the memory.
    """
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return read(ray)
    except Exception:  # noqa: BLE001 - Ray cannot answer: fall back to this machine
        pass
    return local()
