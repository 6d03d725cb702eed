"""One run of the pipeline: compare the listing with the ledger, process what is new, publish in batches.

The job holds the output's lock, finishes what a killed run left (`Store.recover`), then
streams the listing: each video is skipped, or run in full, or run with only the stages of
the output units whose settings changed (`pipeline.ledger.decide`). Finished videos are
published every `output.commit_every_videos` videos or `output.commit_every_s` seconds, so
a killed run loses at most the batches being published (up to three, each on a thread of its
own) and the one filling, and the next run redoes exactly what is missing.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline import local as local_executor
from pipeline import plan as plan_module
from pipeline import ray_cluster, ray_executor, recording, run_listing, stop_deadline, stops
from pipeline.failpoints import failpoint
from pipeline.ledger import (Decision, accepted_fingerprints, given_up_advice, missing_entry, returned_entry,
                             unit_fingerprints)
from pipeline.lock import OutputLock
from pipeline.log_relay import above_progress_bar
from pipeline.output_checks import check_run_date
from pipeline.preflight import preflight, recorded_model_id
from pipeline.publisher import Publisher
from pipeline.records import RunIdentity
from pipeline.sources import is_remote
from workers.storage import storage_options as resolve_storage
from pipeline.store import META, Store, time_ordered_id
from pipeline.summary import RunSummary, counted, named_uris, progress_line
from schemas.config import ResourcesConfig, RunConfig
from schemas.tables import TABLES
from workers.stage import DeviceLostError
from workers.task import StageError, VideoTask

log = logging.getLogger(__name__)

def new_run_id(after: str = "") -> str:
    """Sortable, unique run id: UTC time to the microsecond plus a random suffix; after `after`
    (see `time_ordered_id`)."""
    return time_ordered_id(uuid.uuid4().hex[:6], after)


def run_job(
    source: str,
    out: str,
    config: RunConfig,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    full: bool = False,
    run_date: str | None = None,
    finish_through_stops: bool = False,
    retry_failed: bool = False,
) -> RunSummary:
    """Process the new, changed and unfinished videos under `source` into `out` (all of them if `full`).

    A video whose file failed it in `incremental.give_up_after` runs in a row is given up on
    (`pipeline.ledger.decide`), unless `retry_failed`.

    With `finish_through_stops` (`vidlens run`, which reports the run as it ended), a stop from
    the command line's handler that comes once the run is at its end, its videos done, is not
    raised: the run goes on to its end (`pipeline.stops.ending`).

    Raises `pipeline.lock.LockedError` when another job holds the output's lock.
    """
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    run_date = check_run_date(run_date or started.date().isoformat())
    # without explicit fsspec options, buckets are reached as the config's storage section says
    store = Store(out, storage_options if storage_options is not None else resolve_storage(out, config.storage))
    run_id = new_run_id(after=store.newest_manifest())
    summary = RunSummary(run_id=run_id, source=source, output=out, run_date=run_date)
    from workers.models import processors_shared  # (torch: not for the commands that load no model)

    try:
        # (the publisher closed first: no batch is still being published once the lock is given back;
        # the processors the preflight loads serve the local executor's model stages too)
        with (OutputLock(store, run_id), contextlib.closing(Publisher(store, run_id, run_date, config)) as publisher,
              processors_shared()):
            store.recover()
            failpoint("locked")
            _run_locked(store, publisher, source, config, storage_options, progress, full, summary, started, clock,
                        finish_through_stops, _give_up_after(config, retry_failed))
    except BaseException as exc:
        summary.wall_seconds = time.perf_counter() - clock
        if summary.status == "running":  # (ended before its last batch said how: a Python caller reads it)
            summary.status = "stopped" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "error"
        _warn_given_up(summary, _give_up_after(config, retry_failed))  # (those its listing reached)
        recording.warn_over_shot_bound(summary, config)
        if not any(name.startswith(f"{run_id}-") for name in store.written):
            summary.run_id = ""  # nothing published: the runs table has no row of it for the summary to name
        exc.run_summary = summary  # what it did up to its end (`vidlens run --summary-json` writes it)
        raise
    return summary


@dataclass
class DryRun:
    """What `vidlens run` would do now, with nothing run or written (`dry_run`)."""

    #: its listing: the counts of videos listed, per decision (`reasons`), and newly missing; its warnings
    summary: RunSummary
    #: (decision, URI) of each video it would process, in the order it would take them
    videos: list[tuple[str, str]] = field(default_factory=list)


def dry_run(source: str, out: str, config: RunConfig, storage_options: dict[str, Any] | None = None,
            full: bool = False, retry_failed: bool = False) -> DryRun:
    """What `run_job` would do with the same arguments, as the output stands: the source listed
    and each video judged against the ledger, as a run does, and the videos gone from the source
    found; no lock taken, no model loaded, nothing written. Refused as the run would refuse it:
    an output bucket that does not exist, a local model folder the run would load not there, a
    setting of `resources` its plan refuses (whether or not a video is to process: the next run
    that has one would fail on it)."""
    plan_module.check_resources(config)
    store = Store(out, storage_options if storage_options is not None else resolve_storage(out, config.storage))
    ledger = store.ledger_entries()
    if not ledger:
        store.require_bucket()  # as the run's lock does: a mistyped output bucket is refused, not planned into
    storage = storage_options if storage_options is not None else config.storage  # the source's
    planned = DryRun(RunSummary(run_id="", source=source, output=out))
    summary, listing, seen = planned.summary, {"complete": False}, set()
    give_up_after = _give_up_after(config, retry_failed)

    def tasks():
        for ref, decision, previous, _ in run_listing.decided(source, storage, ledger, unit_fingerprints(config),
                                                   accepted_fingerprints(config), full, summary, listing, seen,
                                                   give_up_after):
            if decision.reason == "missing" and previous.get("status") != "missing":
                summary.missing.append(ref.uri)
            if not decision.skip:
                planned.videos.append((decision.label, ref.uri))
                yield VideoTask(ref=ref, stages=decision.stages)

    stream = tasks()
    _, stages = run_listing.read_ahead(stream)  # the stages the run would start
    for _ in stream:
        pass
    if listing["complete"]:
        summary.missing += run_listing.gone(source, storage, ledger, seen)
    run_listing.count_missing(source, summary, listing)
    _warn_given_up(summary, give_up_after)
    if planned.videos:  # the run would stop at its start, before any video: a model folder not there
        from workers.model_sources import missing_model_folder
        from workers.models import ModelLoadError

        for role, model_id in (("embed", config.models.embed), ("captions", config.models.captions)):
            wrong = config.runs(role, stages) and missing_model_folder(model_id, role)
            if wrong:
                raise ModelLoadError(wrong)
    return planned


def _run_locked(store: Store, publisher: Publisher, source: str, config: RunConfig,
                storage_options: dict[str, Any] | None, progress: bool, full: bool, summary: RunSummary,
                started: datetime, clock: float, finish_through_stops: bool, give_up_after: int) -> None:
    run_id = summary.run_id
    ledger = store.ledger_entries()
    fingerprints = unit_fingerprints(config)
    accepted = accepted_fingerprints(config)
    #: video_id -> (ref, decision, previous ledger entry) of the videos listed and not yet finished
    planned: dict[str, tuple[Any, Decision, dict[str, Any] | None]] = {}
    seen: set[str] = set()  # every URI listed, to find the videos gone from the source
    listing = {"complete": False}
    storage = storage_options if storage_options is not None else config.storage  # the source's

    def tasks():
        for ref, decision, previous, alone in run_listing.decided(source, storage, ledger, fingerprints, accepted, full,
                                                       summary, listing, seen, give_up_after):
            if decision.reason == "returned":
                publisher.entries.append(returned_entry(previous))
            elif decision.reason == "given up" and previous.get("status") == "missing":
                publisher.entries.append(returned_entry(previous, given_up=True))
            elif decision.reason == "missing" and previous.get("status") != "missing":
                summary.missing.append(ref.uri)
                publisher.entries.append(missing_entry(previous))
            if not decision.skip:
                planned[ref.video_id] = (ref, decision, previous)
                yield VideoTask(ref=ref, stages=decision.stages, alone=alone)

    stream = tasks()
    # models and Ray started only when there is work, and only those it needs
    ahead, stages = run_listing.read_ahead(stream)
    model_records: list[dict[str, Any]] = []
    ran_on: dict[str, set[tuple[str, str]]] = {}  # stage -> the (device, dtype) its workers reported
    identity = RunIdentity(run_id, config.fingerprint(), recorded_model_id(config.models.captions))

    def final_row() -> dict[str, Any]:
        return recording.run_row(summary, config, identity, started, model_records, publisher, ran_on)

    def at_the_end() -> None:
        if finish_through_stops:
            stops.at_the_end()

    if ahead:
        model_records, preparers, specs = _start(config, stages, remote=any(is_remote(t.ref.uri) for t in ahead))
        on_ray = config.resources.executor == "ray"
        described = plan_module.describe(specs) if on_ray else local_executor.describe(specs, config)
        print("plan:\n" + described, file=sys.stderr)
        runner = ray_executor.run_ray if on_ray else local_executor.run_local
        publisher.opening_row = lambda: recording.run_row(summary, config, identity, started,
                                                          copy.deepcopy(model_records), publisher, ran_on,
                                                          final=False)
        bar = None  # drawn from the first result: Ray's start-up lines come before it, not across it
        failed: list[Exception] = []

        def delivered() -> Iterator[VideoTask]:
            """The runner's finished videos; where it fails (Ray lost a node it cannot go on without, the
            source's store stops answering), the failure kept for after those it delivered are recorded."""
            try:
                yield from runner(itertools.chain(ahead, stream), specs, config, preparers=preparers)
            except DeviceLostError:
                raise
            except Exception as exc:  # noqa: BLE001 - raised again once what was delivered is published
                failed.append(exc)

        with above_progress_bar(progress and sys.stderr.isatty()) as console:
            try:
                try:
                    for task in delivered():
                        plan = planned.pop(task.ref.video_id, None)
                        if plan is None:
                            continue  # a retried batch delivered this video twice: keep the first
                        for stage, used in task.ran_on.items():  # (before the first publish, which records them)
                            ran_on.setdefault(stage, set()).add(used)
                        recording.record(task, plan, identity, config, publisher, summary, fingerprints)
                        failpoint("video")
                        if bar is None:
                            bar = _progress_bar(progress, console)
                        bar.update(1)
                        bar.set_description_str(progress_line(bar.n, summary.counts["frames_sampled"],
                                                              time.perf_counter() - clock))
                except DeviceLostError as exc:  # (a local run: on Ray, the model actor is replaced)
                    at_the_end()  # (the run ends here, publishing what it did: a stop would change nothing)
                    recording.record_device_lost(exc, planned, identity, config, publisher, summary, fingerprints)
                    summary.status, summary.wall_seconds = "error", time.perf_counter() - clock
                    _publish_end(store, publisher, summary, final_row)
                    raise
                if failed:
                    if summary.counts["videos_total"]:  # (else nothing to keep: it fails as before, nothing written)
                        at_the_end()
                        _publish_last(store, publisher, summary, final_row, clock, "error")
                    raise failed[0]
                # every video done: a stop from here is let go (`pipeline.stops`); raised in the last batch's
                # publishing, it left runs saying succeeded (or running) and the command saying stopped
                at_the_end()
            except (KeyboardInterrupt, SystemExit):  # (a stop before the run was at its end)
                if stops.handled.is_set():  # (the queue is whole: `pipeline.stops`)
                    _publish_last(store, publisher, summary, final_row, clock, "stopped")
                raise
        if bar is not None:
            bar.close()
        for plan in planned.values():
            # never silently lost: a video whose worker died for good still gets a row
            recording.record_lost(plan, StageError(
                "worker", "WorkerLost", "the worker processing this video was lost (it died, or its task raised "
                "outside the stages' own handling: the run's log has the error)"),
                identity, config, publisher, summary, fingerprints)
    else:
        for _ in stream:
            pass
        at_the_end()
    # the batches in flight folded into the ledger first: a publish adds entries to the dict
    # being walked below (it is the store's own, not a copy)
    publisher.wait()
    if listing["complete"]:
        for uri in run_listing.gone(source, storage, ledger, seen):
            publisher.entries.append(missing_entry(ledger[uri]))
            summary.missing.append(uri)
    run_listing.count_missing(source, summary, listing)
    _warn_given_up(summary, give_up_after)
    recording.warn_over_shot_bound(summary, config)
    summary.wall_seconds = time.perf_counter() - clock
    c = summary.counts
    if c["videos_failed"] == 0 and c["videos_partial"] == 0:
        summary.status = "succeeded"
    elif c["videos_total"] and c["videos_failed"] == c["videos_total"]:
        summary.status = "failed"
    else:
        summary.status = "partial"
    _publish_end(store, publisher, summary, final_row)


def _publish_end(store: Store, publisher: Publisher, summary: RunSummary,
                 final_row: Callable[[], dict[str, Any]]) -> None:
    """The run's last batch: its final row of the runs table, and an empty file for each table
    the output has none of yet; then its staging folder dropped and the ledger snapshot written."""
    summary.counts["batches"] = publisher.batch + 1
    publisher.writer.add("runs", [final_row()])
    publisher.wait()  # the store's state holds the batches published
    present = {r["table"] for r in store.state().files.values()} | publisher.tables_written
    publisher.publish(empty_tables=tuple(t for t in TABLES if t not in present), final=True)
    store.drop_staging(summary.run_id)
    try:
        store.write_snapshot()
    except Exception as exc:  # noqa: BLE001 - a cache of the manifests: the run's rows are published
        summary.warnings.append(f"every batch is published, but the ledger snapshot could not be written in "
                                f"{store.path(META, 'snapshots')} ({type(exc).__name__}: {exc}); the next commands "
                                "read the manifests instead (slower on a large output), and the next run writes it")


def _publish_last(store: Store, publisher: Publisher, summary: RunSummary,
                  final_row: Callable[[], dict[str, Any]], clock: float, status: str) -> None:
    """The last batch of a run that ends short, `status` `stopped` (SIGTERM, Ctrl-C) or `error` (its
    executor failed): the videos it finished, and its final row; the videos not finished have no
    ledger entry, and the next run does them. Before, a stopped run's row stayed `running` until a
    later run started, and a failed run's finished videos that its batches had not published were
    lost with it (until 2026-12-07: the Ray review), and done again. A second stop does not cut it
    short (`pipeline.command_stops`); where it cannot be published (at a stop, in the time its cleanup
    has on the store: `pipeline.stop_deadline`), the run ends as before, its opening row left."""
    summary.status, summary.wall_seconds = status, time.perf_counter() - clock
    # (those a manifest named that are not there, marked as listed: their entries go with this batch)
    summary.counts["videos_missing"] = len(summary.missing)
    try:
        stop_deadline.waited(lambda: _publish_end(store, publisher, summary, final_row),
                             "its last batch (the videos finished since the one before, and its final row): the next "
                             "run rolls it forward where its manifest was written, else clears it and does them again")
    except Exception as exc:  # noqa: BLE001 - the stop or failure is what ends the run; its batches published stay
        log.warning("the %s run's last batch and final row could not be published: %s",
                    "stopped" if status == "stopped" else "failed", exc)


def _give_up_after(config: RunConfig, retry_failed: bool) -> int:
    """The runs in a row a video's file may fail it in before a run gives up on it; 0: never."""
    return 0 if retry_failed else config.incremental.give_up_after


def _warn_given_up(summary: RunSummary, give_up_after: int) -> None:
    """The summary's warning of the videos given up on, and what brings them back."""
    given_up = summary.given_up
    if not given_up:
        return
    why = shlex.join(["vidlens", "query", summary.output, "SELECT uri, message FROM errors"])
    advice = given_up_advice(len(given_up), give_up_after, f"why: {why}", "--retry-failed")
    summary.warn(f"{counted(len(given_up), 'video')} given up, not run: {advice}: {named_uris(given_up)}")


def _start(config: RunConfig, stages: frozenset[str] | None = None, remote: bool = False
           ) -> tuple[list[dict[str, Any]], dict[str, Any], list[plan_module.StageSpec]]:
    """The models' records, the frame preparers and the plan (of `stages`, if given; `remote`:
    the first videos come from a bucket), with Ray started for a Ray run.

    Ray starts (or is joined) while the models are checked on a thread beside it: each takes
    seconds (importing torch and transformers and loading the processors; Ray's own processes),
    3.6 and 3-5 s on 2 cores, and the run's first result waited for both one after the other.
    """
    if config.resources.executor != "ray":
        _warn_ray_only(config.resources)
        return (*preflight(config, stages), plan_module.build_plan(config, stages=stages, remote=remote))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidlens-preflight") as pool:
        checked = pool.submit(preflight, config, stages)
        try:
            plan_module.build_plan(config, stages=stages)  # a plan that cannot be built fails before Ray starts
            ray_cluster.ensure_ray(config.resources.ray_address)
        finally:
            model_records, preparers = checked.result()  # its error first (a missing model), as before
    specs = plan_module.build_plan(config, stages=stages, remote=remote)  # the cluster's GPUs and CPUs known
    plan_module.warn_if_unfit(specs, device=config.models.device)
    return model_records, preparers, specs


#: resources only the Ray executor reads
_RAY_ONLY = ("ray_address", "num_gpus_per_actor", "num_cpus_per_actor", "actor_memory_bytes", "min_actors",
             "max_actors", "feed_readers", "max_videos_in_flight", "task_memory_bytes", "max_videos_per_worker",
             "videos_per_dataset")


def _warn_ray_only(resources: ResourcesConfig) -> None:
    """Warn once about Ray's settings given to a local run (a cluster's config run locally)."""
    default = ResourcesConfig()
    unused = [f"resources.{name}" for name in _RAY_ONLY if getattr(resources, name) != getattr(default, name)]
    # of `per_stage`, the local executor reads the model stages' videos_per_batch only (`pipeline.local`)
    unused += [f"resources.per_stage.{stage}.{key}" for stage, overrides in resources.per_stage.items()
               if isinstance(overrides, dict)  # (else refused by the plan)
               for key in overrides if not (stage in plan_module.ACTOR_STAGES and key == "videos_per_batch")]
    if unused:
        log.warning("%s: only the Ray executor uses %s; this run uses the local executor (resources.executor: local)",
                    ", ".join(unused), "it" if len(unused) == 1 else "them")


def _progress_bar(enabled: bool, stream: Any) -> Any:
    from tqdm import tqdm

    # no total: the listing streams, so how many videos there are is known only at its end; off
    # where stderr is not a terminal (a nightly job's log file would get a line per update)
    return tqdm(bar_format="{desc}", disable=None if enabled else True, file=stream, dynamic_ncols=True)
