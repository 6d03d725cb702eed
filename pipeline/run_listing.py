"""What a run lists and decides: the source's videos as a run takes them (`listed`: the listing's
warnings go in the run's summary, a source emptied away lists none), each video's decision against
the ledger (`decided`), the first videos read ahead to plan only the stages they need (`read_ahead`),
and, once the listing is complete, the videos gone from the source (`gone`). `pipeline.job` runs
them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.ledger import Decision, decide
from pipeline.manifests import LOOKUPS_AT_ONCE
from pipeline.sources import (VIDEO_EXTENSIONS, SourceMissing, is_manifest, list_videos, looked_up, source_scope,
                              still_there)
from pipeline.summary import RunSummary, counted
from workers.stage import DeviceLostError
from workers.task import VideoTask

#: the loggers whose warnings while a run lists its source go in its summary
LISTING_LOGGERS = ("pipeline.sources", "pipeline.local_listing", "pipeline.manifests")


def listed(source: str, storage: Any, ledger: Any, summary: RunSummary, listing: dict) -> Iterator[Any]:
    """The source's videos. A source that no longer exists but that the ledger has videos from
    was emptied, not mistyped (a bucket prefix with no objects left is gone, and so is a file
    deleted): it lists none, and its videos are marked missing, with a warning."""
    said = _ToWarnings(summary.warnings)  # what the listing warns of (a file it leaves out) goes in the summary
    for name in LISTING_LOGGERS:
        logging.getLogger(name).addHandler(said)
    try:
        yield from list_videos(source, storage)
    except SourceMissing:
        in_scope = source_scope(source)
        known = [entry for uri, entry in ledger.items() if in_scope(uri)]
        if not known:
            raise
        listing["emptied"] = True
        now = sum(1 for entry in known if entry.get("status") != "missing")
        summary.warnings.append(f"{source} no longer exists (emptied?): " + (
            f"{counted(now, 'video')} the output has from it marked missing" if now else
            f"the output's {counted(len(known), 'video')} from it {'was' if len(known) == 1 else 'were'} "
            "marked missing before"))
    finally:
        for name in LISTING_LOGGERS:
            logging.getLogger(name).removeHandler(said)


class _ToWarnings(logging.Handler):
    """Adds each warning logged to a list (the summary's warnings)."""

    def __init__(self, warnings: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.warnings = warnings

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings.append(record.getMessage())


def no_videos_warning(source: str) -> str:
    """What a run that listed nothing says: which files count as videos."""
    if is_manifest(source):
        return f"no videos found: the manifest {source} lists none (one URI a row in its uri column)"
    extensions = " ".join(sorted(VIDEO_EXTENSIONS))
    return (f"no videos found in {source}: only files with a video extension are read ({extensions}; "
            f"hidden files and folders are skipped). Check the path, or list the videos in a manifest "
            f"(.csv/.parquet with a uri column)")


#: at most this many videos to run are read from the listing before the plan is made (`read_ahead`).
READ_AHEAD_VIDEOS = 10_000


def decided(source: str, storage: Any, ledger: Mapping[str, dict[str, Any]], fingerprints: dict[str, str | None],
             accepted: dict[str, frozenset[str]], full: bool, summary: RunSummary, listing: dict,
             seen: set[str], give_up_after: int = 0) -> Iterator[tuple[Any, Decision, dict[str, Any] | None, bool]]:
    """Each video the source lists, once, with its decision, its ledger entry and whether it runs
    alone, in the order a run takes them: the listing's, and last, the videos whose batch the GPU
    failed on (`listing["complete"]` set before them, once the listing ended). Counts each in
    `summary` (the videos given up on, `decide`'s `give_up_after`, in its `given_up` too); `seen`
    gets every URI listed."""
    held = []  # (its last run, ...) of each video whose batch the GPU failed on last time
    for ref in listed(source, storage, ledger, summary, listing):
        if ref.uri in seen:
            continue  # listed twice (a manifest naming a video twice): processed once
        seen.add(ref.uri)
        summary.counts["videos_listed"] += 1
        previous = ledger.get(ref.uri)
        decision = decide(ref, previous, fingerprints, full, accepted, give_up_after)
        summary.reasons[decision.label] += 1
        if decision.reason == "given up":
            summary.given_up.append(ref.uri)
        if decision.reason == "failed" and previous.get("failure") == DeviceLostError.__name__:
            # after the others, each alone (local executor), the oldest failure first: the GPU
            # broke on its batch (a local run stops there), and the video that breaks it would
            # otherwise stop the next run at the same place, its batch mates failing with it
            held.append((previous.get("last_run_id") or "", ref, decision, previous))
            continue
        yield ref, decision, previous, False
    listing["complete"] = True
    for _, ref, decision, previous in sorted(held, key=lambda item: item[0]):
        yield ref, decision, previous, True


def gone(source: str, storage: Any, ledger: Mapping[str, dict[str, Any]], seen: set[str]) -> list[str]:
    """The URIs of the videos the ledger has from `source`, not marked missing yet, that its
    complete listing (`seen`) left out and that are not there: what the source would list; the
    rest of the output is not its to judge."""
    in_scope = source_scope(source)
    unlisted = [uri for uri, entry in ledger.items()
                if uri not in seen and entry.get("status") != "missing" and in_scope(uri)]
    # a bucket's keys a listing leaves out are looked up, a request each: LOOKUPS_AT_ONCE at once
    asked = [uri for uri in unlisted if looked_up(uri)]
    with ThreadPoolExecutor(LOOKUPS_AT_ONCE, thread_name_prefix="vidlens-lookup") as lookups:
        there = dict(zip(asked, lookups.map(lambda uri: still_there(uri, storage), asked)))
    return [uri for uri in unlisted if not (there[uri] if uri in there else still_there(uri, storage))]


def count_missing(source: str, summary: RunSummary, listing: dict) -> None:
    """The summary's count of videos newly missing, and its warning where the source listed none."""
    summary.counts["videos_missing"] = len(summary.missing)
    if listing["complete"] and not summary.counts["videos_listed"] and not listing.get("emptied") \
            and not summary.missing:  # (a source whose videos were all deleted: they are listed as missing)
        summary.warnings.append(no_videos_warning(source))


def read_ahead(stream: Iterator[VideoTask]) -> tuple[list[VideoTask], frozenset[str] | None]:
    """The first videos to run, and the stages that every video of the run needs: where each
    reruns only some output units (the settings of one changed, as the OCR's), the plan starts
    only their stages, not models that would sit idle (on a GPU cluster, holding GPUs).

    The listing is read until a video needs every stage (at once for a new video), or for at
    most `READ_AHEAD_VIDEOS` videos to run: where it does not end by then, every stage starts.
    """
    ahead: list[VideoTask] = []
    stages: set[str] = set()
    for task in stream:
        ahead.append(task)
        if task.stages is None or len(ahead) >= READ_AHEAD_VIDEOS:
            return ahead, None
        stages |= task.stages
    return ahead, frozenset(stages) if ahead else None
