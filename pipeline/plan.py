"""The plan: which stages run, in what order, with what resources.

This is the one place where resources (GPUs, CPUs, memory, pool sizes, batch sizes) are
attached to stages; `pipeline.ray_executor` runs the plan on Ray Data, `pipeline.local`
without Ray. `build_plan` checks that every task field a stage reads is written by
an earlier stage, so a miswired pipeline fails when it is built, not hours into a run; the
resource settings it applies are checked first (`pipeline.resource_settings`).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pipeline.resource_settings import ACTOR_STAGES, PlanError, check_resources, with_stage_overrides
from schemas.config import RunConfig
from workers.guard import usable_cpus
from workers.stage import Stage, load_stage_class
from workers.task import INITIAL_FIELDS

log = logging.getLogger(__name__)


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
    #: batches sent to each of its model actors at once (0: Ray Data's default, 2 an actor, so
    #: the next is there when one ends). A batch queued on an actor that dies is retried with
    #: the one that killed it, and lost with it once their retries are used up.
    batches_an_actor: int = 0

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
#: videos in flight in a Ray run, at least, unless `resources.max_videos_in_flight` says (`videos_in_flight`).
MIN_VIDEOS_IN_FLIGHT = 256
#: decode/sample Ray tasks that share each CPU share when the videos come from a bucket (`remote`).
TASKS_A_SHARE_FROM_A_BUCKET = 2


def build_plan(config: RunConfig, gpus_visible: int | None = None,
               stages: frozenset[str] | None = None, remote: bool = False) -> list[StageSpec]:
    """The stages this configuration runs, in order, with resources chosen for this cluster;
    with `stages`, only those of them (a run whose every video reruns some output units).
    `remote`: the videos are downloaded from a bucket, so the decode and sample tasks share
    their CPUs two a share (`TASKS_A_SHARE_FROM_A_BUCKET`)."""
    res = config.resources
    check_resources(config)
    gpus = _visible_gpus() if gpus_visible is None else gpus_visible
    actor_stages = [s for s in ACTOR_STAGES if config.runs(s, stages)]
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
    # with `models.device: cpu` (or mps) no model runs on a GPU: its actors reserve none, left
    # idle for the run on a GPU cluster, and take the CPU threads a cluster without one gives
    on_gpus = config.models.device == "auto" or config.models.device.startswith("cuda")
    num_gpus = res.num_gpus_per_actor if res.num_gpus_per_actor is not None else _gpu_share(
        gpus if on_gpus else 0, sum(min_actors[s] for s in torch_stages))
    cpu_share = max(0.01, math.floor(100 * _cpu_count() / (sum(min_actors.values()) + 2)) / 100)
    actor_cpus = min(res.num_cpus_per_actor, cpu_share)
    task_cpus = min(1.0, cpu_share)
    # A task downloads each of a bucket's videos before it reads it, and its CPU waits meanwhile.
    # A task of several videos downloads the next while it decodes one (`pipeline.ray_executor`),
    # but not its first, and a video over `TASK_VIDEO_BYTES` is a task of its own: with two
    # tasks a share, one decodes while the other downloads. 96 videos of 11 MB from a store
    # answering after 40 ms at 100 MB/s, 2 cores: 0.74x the speed from local files with a task
    # a share, 1.00x with two; 30 s 720p clips of 15.6 MB, 0.77x and 0.99x (`bench.latency
    # --ray`). The cost: a worker process a task more.
    if remote:
        task_cpus = max(0.01, math.floor(100 * task_cpus / TASKS_A_SHARE_FROM_A_BUCKET) / 100)
    # The memory actors and tasks declare, likewise: Ray gives a machine of 8 GiB about 5.4 GiB,
    # less than four actors of 2 GiB, and the third would never start. Scaled down to fit (it is
    # what Ray's scheduler counts, not a limit on what a process may use).
    actor_memory, task_memory = _fitting_memory(
        res.actor_memory_bytes, res.task_memory_bytes, sum(min_actors.values()), _cluster_memory())
    # Ray runs a process on one thread per CPU it reserves, at least one. A decode task keeps
    # to that (left alone, FFmpeg starts a thread per core in each). A model actor with no GPU
    # reserves a fraction of a core, so that decode tasks fit beside it, yet it is where a
    # CPU-only run spends its time: its torch shares the node's cores with the other models.
    # OCR's ONNX sessions run on the CPUs its actors reserve (`per_stage.ocr.num_cpus`).
    model_threads = max(1, int(_node_cpus() // max(1, len(torch_stages))))

    def actor(name: str, target: str, gpu: bool = True) -> StageSpec:
        spec = StageSpec(
            name=name, target=target, kind="actor", num_cpus=actor_cpus,
            num_gpus=num_gpus if gpu else 0.0, memory=actor_memory,
            batch_size=res.videos_per_batch, min_actors=res.min_actors, max_actors=res.max_actors,
        )
        spec = with_stage_overrides(spec, res.per_stage.get(name, {}))
        if name == "ocr":
            return replace(spec, threads=max(1, int(spec.num_cpus)))
        return replace(spec, threads=model_threads) if spec.num_gpus == 0 and name in torch_stages else spec

    # Ray spends tens of milliseconds of CPU on each task, more than decoding a short clip's
    # sampled frames: several videos share a task (and a task downloads the next of a bucket's
    # videos while it decodes one). Not a decode task when shots run, as decoding then reads
    # every frame, and a task's videos would decode one after another while other cores wait;
    # the sample task after the shot detector reads only the sampled frames, as without shots.
    def videos_per_task(name: str) -> int:
        return 1 if name == "decode" and config.runs("shots", stages) else DEFAULT_VIDEOS_PER_TASK

    def task(name: str, target: str) -> StageSpec:
        spec = StageSpec(name, target, "task", num_cpus=task_cpus, memory=task_memory,
                         batch_size=videos_per_task(name))
        spec = with_stage_overrides(spec, res.per_stage.get(name, {}))
        return replace(spec, threads=max(1, int(spec.num_cpus)))

    specs = [task("decode", "workers.sampling:DecodeStage")]
    if config.runs("shots", stages):
        specs.append(actor("shots", "workers.shots:ShotStage"))
    specs.append(task("sample", "workers.sampling:SampleStage"))
    if config.runs("embed", stages):
        specs.append(actor("embed", "workers.embed:EmbedStage"))
    if config.runs("captions", stages):
        specs.append(actor("captions", "workers.captions:CaptionStage"))
    if config.runs("ocr", stages):
        specs.append(actor("ocr", "workers.ocr:OcrStage", gpu=False))
    check_chain([spec.load_class() for spec in specs])
    return specs


def videos_in_flight(specs: list[StageSpec], config: RunConfig) -> int:
    """Videos between the listing and the end of a Ray run at once (the listing pauses there).

    Never fewer than every stage's batch: each may hold one while it waits for the next videos.
    `resources.max_videos_in_flight` where set; by default enough for every decode task the
    cluster can run at once (its CPUs over a task's share, or `decode_concurrency`) to hold a
    full task and have the next waiting, at least `MIN_VIDEOS_IN_FLIGHT`. A fixed 256 let a
    cluster of 128 CPUs run at most 64 decode tasks of 4 small clips, a quarter of its 256
    task slots from a bucket. The cluster is read as it is now (each Ray Data execution
    starts with this): nodes an autoscaler adds later are not counted.
    """
    res = config.resources
    least = _least_in_flight(specs, config)
    if res.max_videos_in_flight is not None:
        return max(res.max_videos_in_flight, least)
    tasks = [spec for spec in specs if spec.kind == "task"]
    at_once = int(_cpu_count() / min(spec.num_cpus for spec in tasks) + 1e-6)
    if res.decode_concurrency:
        at_once = min(at_once, res.decode_concurrency)
    return max(MIN_VIDEOS_IN_FLIGHT, least + 2 * at_once * max(spec.batch_size for spec in tasks))


def lost_blocks_allowed(specs: list[StageSpec], config: RunConfig, in_flight: int) -> int:
    """Ray tasks or actor calls whose worker died for good (after Ray's retries) that a Ray run
    of `in_flight` videos goes on without: their videos never come out, and the job gives each
    a `WorkerLost` errors row. Each keeps its videos' places in flight (the driver cannot tell
    which they were), so no more than leave every stage room for a batch: past them the run
    fails rather than waits for ever."""
    spare = in_flight - _least_in_flight(specs, config)
    return max(0, spare // max(spec.batch_size for spec in specs))


def _least_in_flight(specs: list[StageSpec], config: RunConfig) -> int:
    """Videos in flight that let every stage hold a batch while it waits for the next videos."""
    return sum(spec.batch_size for spec in specs) + config.resources.feed_readers + 1


def warn_if_unfit(specs: list[StageSpec], gpus: int | None = None, device: str = "auto") -> None:
    """Warn where settings asked for (the plan's own shares always fit) leave a stage's actors,
    or any decode task beside them, no room in the Ray cluster as it is now (`gpus`: its GPUs,
    read from it if None): a stall unless it grows; and where `device` (`models.device`) asks
    for CUDA of a cluster without a GPU. For a plan about to run on Ray."""
    gpus = _visible_gpus() if gpus is None else gpus
    needed = gpus_needed(specs)
    if device.startswith("cuda") and not gpus and not needed:
        # (asked for anyway, an instance that cannot grow, the one a run starts, waited for ever)
        log.warning(
            "models.device is %r but the Ray cluster has no GPU now: the model stages reserve none, and an "
            "actor that sees no GPU fails to load its model. On a cluster that adds GPU nodes when asked (an "
            "autoscaler's GPU group scaled to none), ask for them: resources.num_gpus_per_actor (e.g. 1)", device)
    if needed > gpus:  # (a cluster without a GPU too: Ray Data waits for one for ever, saying little)
        log.warning(
            "the model stages' actors need %d GPUs at once (%s) but the cluster has %d: unless it "
            "grows (an autoscaler adds nodes for them), a stage whose actor cannot start will stall the run. "
            "Share GPUs between the stages: resources.num_gpus_per_actor (e.g. %g), or num_gpus in "
            "resources.per_stage",
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
    nodes = _node_memories() or []
    unplaced = _unplaced(sorted(((s.memory or 0) for s in specs if s.kind == "actor" for _ in range(s.min_actors)),
                                reverse=True), nodes)
    if unplaced:  # (Ray places each actor on one node: totals that fit can leave one no node with room)
        log.warning(
            "%d of the model stages' actors (%s) fit on no node of the cluster, whose nodes Ray gives %s GiB of "
            "memory: unless it grows, a stage whose actor cannot start will stall the run. Lower "
            "actor_memory_bytes, or memory_bytes in resources.per_stage",
            unplaced, ", ".join(f"{s.name} {s.min_actors}x{(s.memory or 0) / 2**30:.3g} GiB" for s in specs
                                if s.kind == "actor" and s.memory),
            ", ".join(f"{memory / 2**30:.3g}" for memory in sorted(nodes, reverse=True)))


def _unplaced(demands: list[float], nodes: list[float]) -> int:
    """How many of `demands` (largest first) find no room on `nodes`, each placed on the first
    node with room for it (none where there are not several nodes: the totals say it then)."""
    if len(nodes) < 2:
        return 0
    free, left = sorted(nodes, reverse=True), 0
    for demand in demands:
        for index, room in enumerate(free):
            if demand <= room * 1.0001:
                free[index] = room - demand
                break
        else:
            left += 1
    return left


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
            threads = f" ({s.threads} thread{'s' if s.threads > 1 else ''} on Ray)" if s.threads else ""
            lines.append(
                f"  {s.name:<9} actors {s.min_actors}-{s.max_actors}, {s.num_gpus:g} GPU, "
                f"{s.num_cpus:.2g} CPU{threads}, {(s.memory or 0) / 2**30:.1f} GiB each, "
                f"{s.batch_size} video{'' if s.batch_size == 1 else 's'}/batch"
            )
        else:
            memory = f", {s.memory / 2**30:.1f} GiB" if s.memory else ""
            videos = f"up to {s.batch_size} videos/task" if s.batch_size > 1 else "1 video/task"
            lines.append(f"  {s.name:<9} CPU tasks, {s.num_cpus:.2g} CPU{memory} each, {videos}")
    return "\n".join(lines)


# --- what the cluster has --------------------------------------------------------------------


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


def _node_memories() -> list[float] | None:
    """Memory that Ray schedules by on each live node (None without a Ray instance)."""
    return _from_ray(lambda ray: [float(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")],
                     lambda: None)


def _node_cpus() -> float:
    """CPUs of the largest node (this machine without Ray)."""
    return _from_ray(lambda ray: max(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")),
                     _local_cpus)


def _cpu_count() -> float:
    """CPUs of the whole cluster (this machine without Ray)."""
    return _from_ray(lambda ray: float(ray.cluster_resources()["CPU"]), _local_cpus)


def _local_cpus() -> float:
    """The cores this process may run on: a container's cpuset or taskset, not the host's."""
    return float(usable_cpus())


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
