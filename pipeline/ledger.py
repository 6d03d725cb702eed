"""The ledger: what the output already holds for each source video, and what a new run must redo.

One entry per source URI: the version of the video last seen (size, modification time or
etag, and the `video_id` they give), its status (and the error type of a video that failed as
a whole), how many runs in a row that version failed as a whole for its file's own bytes (a
run gives up on it after `incremental.give_up_after`: `decide`), the run that last touched
it, and for each output unit the fingerprint of the
configuration that produced its current rows and the run that wrote them. An output unit is
a group of tables that can be recomputed alone:

- `core`: videos, segments, frames (and any table not listed below, such as thumbnails),
  from decoding, shots, sampling and embeddings; when it changes everything reruns;
- `labels` (objects and scenes) and `matches` (query scores): the embed stage reruns;
- `captions`: the captions stage reruns;
- `texts`: the OCR stage reruns.

Decoding, shot detection and sampling always run (they are deterministic, so segment and
frame indices line up with the rows already written); only the changed units' tables are
written for such a video.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from pipeline.records import storable_ns
from schemas.config import NOT_RESULTS, RunConfig, model_location
from workers.task import VideoRef, VideoTask

UNITS = ("core", "labels", "matches", "captions", "texts")
#: tables of the units other than core; every other table that holds per-video rows is core.
_UNIT_TABLES = {"labels": "labels", "matches": "matches", "captions": "captions", "texts": "texts"}
#: tables whose current rows are chosen otherwise (errors: the last attempt; runs: all of them).
RUN_TABLES = ("errors", "runs")
#: stages that every rerun needs, whatever unit it recomputes.
BASE_STAGES = frozenset({"decode", "shots", "sample"})
_UNIT_STAGES = {"labels": {"embed"}, "matches": {"embed"}, "captions": {"captions"}, "texts": {"ocr"}}
#: the units a failure in a stage leaves without a result.
_STAGE_UNITS = {"embed": ("core", "labels", "matches"), "captions": ("captions",), "ocr": ("texts",)}

#: ledger statuses: processed fully; processed with some stage failing; not processed; gone from the source.
STATUSES = ("ok", "partial", "failed", "missing")

LEDGER_SCHEMA = pa.schema(
    [pa.field("uri", pa.string(), nullable=False), pa.field("video_id", pa.string()),
     pa.field("size_bytes", pa.int64()), pa.field("mtime_ns", pa.int64()), pa.field("etag", pa.string()),
     pa.field("status", pa.string()), pa.field("failure", pa.string()), pa.field("bad_file_runs", pa.int64()),
     pa.field("last_run_id", pa.string())]
    + [pa.field(f"{unit}_{part}", pa.string()) for unit in UNITS for part in ("fingerprint", "run_id")]
)


#: the store's record of the units each run recomputed for each video it processed, whether they
#: gave rows or not: a table's history shows, per video and run date, the rows of the latest run of
#: that date that recomputed its unit, and none where that run found none (`pipeline.views`).
#: Internal, under the store's META folder: no reader needs it but the history views.
ATTEMPTS = "attempts"
ATTEMPTS_SCHEMA = pa.schema(
    [pa.field("video_id", pa.string(), nullable=False), pa.field("run_id", pa.string(), nullable=False),
     pa.field("units", pa.list_(pa.string()), nullable=False)]
)


def unit_of(table: str) -> str | None:
    """The output unit a table belongs to; None for the errors and runs tables."""
    if table in RUN_TABLES:
        return None
    return _UNIT_TABLES.get(table, "core")


#: output settings that change how rows are batched into files, not the rows.
_NOT_RESULTS = tuple(name.split(".")[1] for name in NOT_RESULTS if name.startswith("output."))


def unit_fingerprints(config: RunConfig, queries_path: bool = False, models_as_written: bool = False,
                      unread_too: bool = False) -> dict[str, str | None]:
    """Per unit, the hash of the settings its rows depend on; None where the unit is switched off.
    (`queries_path`: hashed with the queries file's path, as before 2026-12-04; `models_as_written`:
    with the model folders as written, ./m or /abs/m/, as before 2026-12-05; `unread_too`: with
    the settings the configuration does not read as they are, as before 2026-12-06, `_as_read`.)"""
    queries = list(config.all_queries()) if config.enabled("match") else []  # (read once: it reads a file)
    config = _as_read(config, queries, unread_too)
    embed_runs = config.runs("embed")

    def fingerprint(stage: str) -> str:
        return config.stage_fingerprint(stage, queries_path, models_as_written)

    def on(stage: str) -> str | None:
        return fingerprint(stage) if config.enabled(stage) else None

    # the embed stage writes the core tables' embeddings whenever it runs, for objects, scenes or
    # match too: its model is a core setting then (core ignored it without `embed` listed)
    embed = fingerprint("embed") if embed_runs else None
    core = _hash({"shots": config.stage_fingerprint("shots"), "embed": embed,
                  "embed_runs": embed_runs, "shots_on": config.enabled("shots"),
                  "output": {k: v for k, v in config.to_dict()["output"].items() if k not in _NOT_RESULTS}})
    labels = None
    if config.enabled("objects") or config.enabled("scenes"):
        labels = _hash({"objects": on("objects"), "scenes": on("scenes")})
    matches = None
    if config.enabled("match"):
        # the queries file is named in the config; its lines are what change the rows
        matches = _hash({"match": on("match"), "queries": queries})
    return {"core": core, "labels": labels, "matches": matches, "captions": on("captions"), "texts": on("ocr")}


#: stages that, switched off, leave the rows they made current: each is part of a unit that
#: other stages also make (a unit switched off as a whole has no fingerprint and is not judged).
#: Not shots: the segments it made are what every unit's rows are per, and a later rerun of one
#: unit without it would write rows per whole video beside segments per shot.
_PART_STAGES = ("embed", "objects", "scenes", "match")


#: output settings that, switched off, leave the rows made with them current: thumbnails (a
#: table of their own) and frame embeddings (a column of frames), both of the core unit.
_PART_OUTPUTS = ("thumbnails", "frame_embeddings")


#: per sampling mode, the sampling settings it does not read
_UNREAD_BY_MODE = {"uniform": ("fps", "frames_per_shot"), "fps": ("num_frames", "frames_per_shot"),
                   "keyframes": ("num_frames", "fps")}


def _as_read(config: RunConfig, queries: list[str], shots_only: bool = False) -> RunConfig:
    """`config` with the settings that change no row under it at their defaults, as fingerprints
    hash them: changed, they reran every video for the same rows (a night's decoding and
    embedding). Those of a stage switched off (shots; objects' or scenes' own vocabulary and
    templates), of another sampling mode, the thumbnails' while there are none, frame
    embeddings kept where no embedding is made, the match template where there is no query,
    and `captions.frames_per_caption`, which no captioner reads (GIT reads the frames its
    temporal embeddings fix, an image captioner one). `queries`: the run's (`all_queries`, where
    match runs). With `shots_only`, shots' alone, as before 2026-12-06."""
    shots = config.shots if config.enabled("shots") else type(config.shots)()
    if shots_only:
        return replace(config, shots=shots)

    def defaults(section: Any, names: tuple[str, ...]) -> Any:
        blank = type(section)()
        return replace(section, **{name: getattr(blank, name) for name in names})

    labels = config.labels
    if not config.enabled("objects"):
        labels = defaults(labels, ("objects", "object_templates"))
    if not config.enabled("scenes"):
        labels = defaults(labels, ("scenes", "scene_templates"))
    output = config.output
    if not output.thumbnails:
        output = defaults(output, ("thumbnail_width", "thumbnail_quality", "thumbnails_per_video"))
    if not config.runs("embed"):
        output = defaults(output, ("frame_embeddings",))
    return replace(
        config, labels=labels, output=output, shots=shots,
        sampling=defaults(config.sampling, _UNREAD_BY_MODE.get(config.sampling.mode, ())),
        captions=defaults(config.captions, ("frames_per_caption",)),
        match=config.match if queries else defaults(config.match, ("template",)))


def accepted_fingerprints(config: RunConfig) -> dict[str, frozenset[str]]:
    """Per unit, the fingerprints of rows that are current under `config`: its own, and those
    made with any of the stages it switches off on (`_PART_STAGES`), or the outputs
    (`_PART_OUTPUTS`), so that switching a stage or the thumbnails off does not make every
    video rerun, and drop the rows it made. The fingerprints that
    outputs made before 2026-12-04 carry (the queries file's path hashed) are accepted too, as
    are those of outputs made before 2026-12-05 with a model folder written as it is now (./m),
    and before 2026-12-06 with a setting the configuration does not read away from its default."""
    off = [s for s in _PART_STAGES if not config.enabled(s)]
    off += [f"output.{name}" for name in _PART_OUTPUTS if not getattr(config.output, name)]
    written = any(model_location(m) != m for m in (config.models.embed, config.models.captions))
    accepted: dict[str, set[str]] = {unit: set() for unit in UNITS}
    for mask in range(2 ** len(off)):
        on = [s for i, s in enumerate(off) if mask >> i & 1]
        outputs = {name.removeprefix("output."): True for name in on if name.startswith("output.")}
        variant = replace(config, stages=(*config.stages, *(s for s in on if not s.startswith("output."))),
                          output=replace(config.output, **outputs))
        if not config.enabled("match"):  # (its unit is not judged: a queries file deleted since is not read)
            variant = replace(variant, match=replace(variant.match, queries_file=None))
        for queries_path in (False, True) if config.match.queries_file else (False,):
            for models_as_written in (False, True) if written else (False,):
                for unread_too in (False, True):
                    fingerprints = unit_fingerprints(variant, queries_path, models_as_written, unread_too)
                    for unit, fingerprint in fingerprints.items():
                        if fingerprint is not None:
                            accepted[unit].add(fingerprint)
    return {unit: frozenset(fingerprints) for unit, fingerprints in accepted.items()}


def _hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


#: the error types of the whole failures an entry written before `bad_file_runs` was counted is
#: read as having had once (`bad_file_runs`): those a bad file's errors row had, and may have
#: had for another cause (a file that could not be read), which the next run's count then tells
#: (`pipeline.report` counts alike, in SQL)
BAD_FILE_TYPES = frozenset({"VideoDecodeError", "EmptyVideoStream", "DecoderCrashed"})


def bad_file_runs(entry: dict[str, Any]) -> int:
    """The runs in a row that the entry's version of the video failed in as a whole for its
    file's own bytes (`workers.task.StageError.bad_file`), or for its file not being there (a
    manifest's row naming no file: `VideoRef.absent`). An entry written before they were
    counted (until 2026-12-06) that failed as a whole with an error a bad file gives counts once."""
    runs = entry.get("bad_file_runs")
    if runs is not None:
        return runs
    return int(entry.get("failure") in BAD_FILE_TYPES and entry.get("core_fingerprint") is None)


def given_up_advice(count: int, give_up_after: int, aside: str, retry: str) -> str:
    """Why `count` videos are given up on and what brings them back, as the run's warning and the
    report's index both say it: `aside` ends the parenthesis of causes, `retry` names the flag."""
    failed, files = ("its file failed it", "the file") if count == 1 else ("their files failed them", "each file")
    return (f"{failed} as a whole in {give_up_after} or more runs in a row, unchanged since (empty, cut short, not a "
            f"video, not where a manifest names it; {aside}). Fix or replace {files} (a changed file runs again, as "
            f"does one put where a manifest names it), or run once with {retry} (incremental.give_up_after: 0 never "
            "gives up)")


@dataclass(frozen=True)
class Decision:
    """What a run does with one listed video: skip it, or which units to recompute and why."""

    #: "unchanged", "returned", "missing" or "given up" (skipped), "new", "changed", "failed"
    #: (retry), "config" (settings changed), "full".
    reason: str
    units: frozenset[str]
    #: the stages to run; None runs them all.
    stages: frozenset[str] | None = None
    #: with "config": the units whose settings changed, where more are recomputed (all, when "core" did)
    changed: frozenset[str] | None = None

    @property
    def skip(self) -> bool:
        """True when nothing is to be done for this video."""
        return not self.units

    @property
    def label(self) -> str:
        """The reason as shown in the summary, e.g. "config changed: captions"."""
        if self.reason == "config":
            return "config changed: " + ",".join(u for u in UNITS if u in (self.changed or self.units))
        return {"failed": "previously failed"}.get(self.reason, self.reason)


def decide(ref: VideoRef, entry: dict[str, Any] | None, fingerprints: dict[str, str | None],
           full: bool = False, accepted: dict[str, frozenset[str]] | None = None, give_up_after: int = 0) -> Decision:
    """Compare a listed video with its ledger entry under the current configuration (its
    `fingerprints`; rows of `accepted` fingerprints are current too: `accepted_fingerprints`).

    A video whose file failed it as a whole in `give_up_after` runs in a row (`bad_file_runs`),
    unchanged since (or that a manifest named, not there, in as many), is given up: skipped, its
    entry and its last attempt's errors row kept
    (`give_up_after` 0: never; `full` runs it as every video)."""
    everything = frozenset(UNITS)
    if ref.absent and entry is not None and entry.get("core_fingerprint") is not None:
        # a manifest names a video the output holds, and it is gone: its rows stay, as for a
        # video gone from a folder (a failed attempt would replace them with an errors row);
        # one that never had any (a mistyped name) fails again, as it did
        return Decision("missing", frozenset())
    if full:
        return Decision("full", everything)
    if entry is None:
        return Decision("new", everything)
    if entry.get("video_id") != ref.video_id:
        return Decision("changed", everything)
    stale = {u for u, fp in fingerprints.items() if fp is not None and entry.get(f"{u}_fingerprint") != fp
             and entry.get(f"{u}_fingerprint") not in (accepted or {}).get(u, ())}
    status = entry.get("status")
    if not stale:
        # a video back in the source after being missing needs only its status restored
        return Decision("returned" if status == "missing" else "unchanged", frozenset())
    # a video that went missing after failing, as a whole or in a stage, has lost that status, not
    # its failure (`entry_after`; in entries written before 2026-12-06 a whole failure's, or its empty core)
    failed = status in ("failed", "partial") or status == "missing" and (
        entry.get("failure") is not None or entry.get("core_fingerprint") is None)
    reason = "failed" if failed and any(entry.get(f"{u}_fingerprint") is None for u in stale) else "config"
    if reason == "failed" and give_up_after and bad_file_runs(entry) >= give_up_after:
        # the same bytes failed alike in every one of those runs: another would only repeat its
        # errors row, and the run's exit code would say videos failed every night
        return Decision("given up", frozenset())
    if "core" in stale:
        return Decision(reason, everything, changed=frozenset(stale))
    stages = set(BASE_STAGES)
    for unit in stale:
        stages |= _UNIT_STAGES[unit]
    return Decision(reason, frozenset(stale), frozenset(stages))


def entry_after(task: VideoTask, previous: dict[str, Any] | None, units: frozenset[str], run_id: str,
                fingerprints: dict[str, str | None]) -> dict[str, Any]:
    """The ledger entry of a video once `units` were recomputed by run `run_id`.

    A unit whose stage failed on this video gets no fingerprint, so the next run retries it.
    Units not recomputed keep the fingerprint and run of their current rows.
    """
    ref = task.ref
    entry: dict[str, Any] = {"uri": ref.uri, "video_id": ref.video_id, "size_bytes": ref.size_bytes,
                             "mtime_ns": storable_ns(ref.mtime_ns), "etag": ref.etag, "last_run_id": run_id}
    failed_units: set[str] = set()
    for error in task.errors:
        failed_units.update(_STAGE_UNITS.get(error.stage, UNITS))
    if task.meta is None:
        failed_units = set(UNITS)
    for unit in UNITS:
        if unit in units:
            entry[f"{unit}_fingerprint"] = None if unit in failed_units else fingerprints[unit]
            entry[f"{unit}_run_id"] = run_id
        else:
            entry[f"{unit}_fingerprint"] = (previous or {}).get(f"{unit}_fingerprint")
            entry[f"{unit}_run_id"] = (previous or {}).get(f"{unit}_run_id")
    if task.meta is None:
        entry["status"] = "failed"
    elif any(fp is not None and entry[f"{u}_fingerprint"] is None for u, fp in fingerprints.items()):
        entry["status"] = "partial"
    else:
        entry["status"] = "ok"
    # what failed it, or a stage of it (this attempt ran every unit left without rows: `decide`):
    # a video gone from the source keeps this, not its status, and back, is retried as failed
    entry["failure"] = task.errors[-1].error_type if task.errors and entry["status"] != "ok" else None
    # failed as a whole (no core rows: not decoded, or no frame of it sampled) by its file's bytes
    # alone, or named by a manifest and not there (a mistyped name: once there, it is another
    # `video_id`, run as changed); counted on from the runs before where this same version failed
    bad_file = ("core" in units and entry["core_fingerprint"] is None and bool(task.errors)
                and (ref.absent or all(error.bad_file for error in task.errors)))
    before = bad_file_runs(previous) if previous is not None and previous.get("video_id") == ref.video_id else 0
    entry["bad_file_runs"] = before + 1 if bad_file else 0
    return entry


def missing_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry of a video gone from the source: its rows stay, its status says it is gone.

    `last_run_id` stays that of its last attempt, so the errors view keeps that attempt's errors.
    """
    return {**entry, "status": "missing"}


def returned_entry(entry: dict[str, Any], given_up: bool = False) -> dict[str, Any]:
    """The entry of a missing video listed again, unchanged, with every unit up to date (a
    stage that failed switched off since: its failure is no longer one); or `given_up` on
    (`decide`), failed still, as it was when it went missing (its failure and count kept)."""
    if given_up:
        return {**entry, "status": "failed"}
    return {**entry, "status": "ok", "failure": None}


def ledger_table(entries: dict[str, dict[str, Any]]) -> pa.Table:
    """The ledger as a pyarrow table (one row per URI, sorted by URI).

    Built a column at a time: a copy of every entry as a row dict would double the driver's
    memory at the end of a run over a large output.
    """
    rows = [entries[uri] for uri in sorted(entries)]
    return pa.table({field.name: pa.array([row.get(field.name) for row in rows], type=field.type)
                     for field in LEDGER_SCHEMA}, schema=LEDGER_SCHEMA)
