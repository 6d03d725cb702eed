"""The output store without models: ledger decisions, publishing, views, recovery, lock, compaction, schedule."""

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.compact import compact
from pipeline.ledger import decide, entry_after, unit_fingerprints
from pipeline.lock import LockedError, OutputLock
from pipeline.schedule import Schedule
from pipeline.store import Store
from pipeline.writer import BatchWriter
from schemas.config import RunConfig
from workers.task import StageError, VideoMeta, VideoRef, VideoTask

CONFIG = RunConfig(stages=("embed", "captions"))
FINGERPRINTS = unit_fingerprints(CONFIG)


def _ref(name: str, version: int = 1) -> VideoRef:
    return VideoRef(uri=f"/videos/{name}", size_bytes=100, mtime_ns=version, etag=None, video_id=f"{name}-v{version}")


def _meta() -> VideoMeta:
    return VideoMeta(1.0, 10.0, 10, 64, 48, "h264", 0, False, "mp4", "pyav")


def _entry(ref: VideoRef, run_id: str, units=frozenset({"core", "labels", "matches", "captions", "texts"}),
           previous=None, errors=()) -> dict:
    task = VideoTask(ref=ref, meta=_meta(), errors=list(errors))
    return entry_after(task, previous, units, run_id, FINGERPRINTS)


def _publish(store: Store, run_id: str, run_date: str, videos: dict, batch: int = 0, move: bool = True,
             found: bool = True) -> dict:
    """Publish one batch: for each video a videos row and a captions row saying which run wrote it
    (no caption where `found` is False), and the units it recomputed."""
    writer = BatchWriter(store, run_id, run_date)
    entries = []
    for ref, (units, previous) in videos.items():
        keys = {"video_id": ref.video_id, "run_id": run_id, "config_fingerprint": "f"}
        if "core" in units:
            writer.add("videos", [{**keys, "uri": ref.uri, "status": "ok", "processed_at": _now()}])
        if found:
            writer.add("captions", [{**keys, "level": "video", "caption": f"{ref.video_id} by {run_id}"}])
        writer.attempted(ref.video_id, units)
        entries.append(_entry(ref, run_id, units, previous))
    manifest = {"kind": "batch", "run_id": run_id, "batch": batch, "run_date": run_date,
                "files": writer.stage(batch), "ledger": entries}
    name = f"{run_id}-{batch:05d}.json"
    if move:
        store.publish(manifest, name)
    else:  # as if the driver died right after the manifest was written
        store.makedirs(store.path("_vidlens", "commits"))
        store.fs.pipe_file(store.path("_vidlens", "commits", name), json.dumps({"format": 1, **manifest}).encode())
    return manifest


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _add_video(publisher, name: str, run_id: str) -> VideoRef:
    """Video `name`'s videos row and ledger entry given to `publisher` (a batch once it is full)."""
    ref = _ref(name)
    row = {"video_id": ref.video_id, "run_id": run_id, "config_fingerprint": "f", "uri": ref.uri, "status": "ok",
           "processed_at": _now()}
    publisher.queue(publisher.writer.converted({"videos": [row]}), _entry(ref, run_id), frozenset(FINGERPRINTS))
    publisher.publish_if_due()
    return ref


def _views(store: Store) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    store.register_duckdb(con)
    return con


def test_decisions_follow_the_ledger():
    ref = _ref("a.mp4")
    assert decide(ref, None, FINGERPRINTS).reason == "new"
    entry = _entry(ref, "r1")
    assert decide(ref, entry, FINGERPRINTS).skip
    assert decide(ref, entry, FINGERPRINTS, full=True).units == frozenset(FINGERPRINTS)
    assert decide(_ref("a.mp4", 2), entry, FINGERPRINTS).reason == "changed"
    captions = unit_fingerprints(CONFIG.with_overrides({"captions.max_new_tokens": 5}))
    decision = decide(ref, entry, captions)
    assert decision.units == {"captions"} and decision.stages == {"decode", "shots", "sample", "captions"}
    assert decision.label == "config changed: captions"
    # a new embedding model, with only shots and embed on: everything is recomputed, and the
    # summary names what changed, not the stages that are off
    embed_only = CONFIG.with_overrides({"models.embed": "another/clip", "stages": ["shots", "embed"]})
    decision = decide(ref, entry, unit_fingerprints(embed_only))
    assert decision.units == frozenset(FINGERPRINTS) and decision.label == "config changed: core"
    failed = _entry(ref, "r1", errors=[StageError("captions", "RuntimeError", "out of memory")])
    assert failed["status"] == "partial" and failed["captions_fingerprint"] is None
    retry = decide(ref, failed, FINGERPRINTS)
    assert retry.reason == "failed" and retry.units == {"captions"}
    # a failed unit among units whose settings changed (here every unit): said as a retry
    both = decide(ref, failed, unit_fingerprints(CONFIG.with_overrides({"sampling.num_frames": 4})))
    assert both.reason == "failed" and both.units == frozenset(FINGERPRINTS)
    assert decide(ref, {**entry, "status": "missing"}, FINGERPRINTS).label == "returned"
    sampling = unit_fingerprints(CONFIG.with_overrides({"sampling.num_frames": 4}))
    assert decide(ref, entry, sampling).stages is None  # core changed: everything reruns


def test_a_partial_video_back_after_being_missing_is_retried_as_failed():
    # partial (its captions failed), gone from the source, then back unchanged: it was said to be
    # "config changed: captions", its settings unchanged (marked missing, it had lost its status)
    from pipeline.ledger import missing_entry

    ref = _ref("a.mp4")
    partial = _entry(ref, "r1", errors=[StageError("captions", "RuntimeError", "CUDA out of memory")])
    assert (partial["status"], partial["failure"]) == ("partial", "RuntimeError")
    back = decide(ref, missing_entry(partial), FINGERPRINTS)
    assert back.label == "previously failed" and back.units == {"captions"}
    # made with captions off, then gone: captions switched on since are a change of settings
    without = entry_after(VideoTask(ref=ref, meta=_meta()), None, frozenset(FINGERPRINTS), "r1",
                          unit_fingerprints(CONFIG.with_overrides({"stages": ["embed"]})))
    assert (without["status"], without["captions_fingerprint"]) == ("ok", None)
    assert decide(ref, missing_entry(without), FINGERPRINTS).label == "config changed: captions"
    # its captions made by a retry: back, it only needs its status
    retried = _entry(ref, "r2", frozenset({"captions"}), previous=partial)
    assert (retried["status"], retried["failure"]) == ("ok", None)
    assert decide(ref, missing_entry(retried), FINGERPRINTS).label == "returned"
    # (mutation review) the failure is the last errors row's, of the stage that failed last
    two = _entry(ref, "r1", errors=[StageError("captions", "RuntimeError", "CUDA out of memory"),
                                    StageError("ocr", "ValueError", "no text model")])
    assert (two["status"], two["failure"]) == ("partial", "ValueError")
    # an entry written before partial videos kept their failure: a whole failure is told by its empty core
    failed = entry_after(VideoTask(ref=ref, errors=[StageError("decode", "VideoDecodeError", "moov atom not found")]),
                         None, frozenset(FINGERPRINTS), "r1", FINGERPRINTS)
    assert (failed["status"], failed["core_fingerprint"]) == ("failed", None)
    assert decide(ref, {**missing_entry(failed), "failure": None}, FINGERPRINTS).label == "previously failed"
    # partial, its failed stage switched off since, gone and back: "ok" again, with no failure left
    from pipeline.ledger import returned_entry

    no_captions = unit_fingerprints(CONFIG.with_overrides({"stages": ["embed"]}))
    assert decide(ref, missing_entry(partial), no_captions).label == "returned"
    assert (returned_entry(missing_entry(partial))["status"], returned_entry(missing_entry(partial))["failure"]) \
        == ("ok", None)


def _failed(ref: VideoRef, run_id: str, previous: dict | None, error_type: str = "VideoDecodeError",
            bad_file: bool = True, stage: str = "decode") -> dict:
    """The entry after a run in which `ref` failed as a whole (no meta) with one errors row."""
    task = VideoTask(ref=ref, errors=[StageError(stage, error_type, "not a media file", bad_file=bad_file)])
    return entry_after(task, previous, frozenset(FINGERPRINTS), run_id, FINGERPRINTS)


def test_a_file_that_fails_alike_run_after_run_is_given_up_until_it_changes():
    """The ledger counts the runs in a row a video's unchanged file failed it as a whole for its
    own bytes; at `give_up_after` of them the video is skipped as `given up` (0: never)."""
    from pipeline.ledger import bad_file_runs, missing_entry, returned_entry

    ref = _ref("bad.mp4")
    first = _failed(ref, "r1", None)
    second = _failed(ref, "r2", first)
    assert (first["bad_file_runs"], second["bad_file_runs"]) == (1, 2)
    assert decide(ref, first, FINGERPRINTS, give_up_after=2).label == "previously failed"
    given_up = decide(ref, second, FINGERPRINTS, give_up_after=2)
    assert (given_up.label, given_up.skip) == ("given up", True)
    assert decide(ref, second, FINGERPRINTS, give_up_after=0).label == "previously failed"  # never
    assert decide(ref, second, FINGERPRINTS, give_up_after=3).label == "previously failed"
    assert decide(ref, second, FINGERPRINTS, full=True, give_up_after=2).label == "full"
    # another version of the file (replaced, touched) is another video: run, and counted anew
    assert decide(_ref("bad.mp4", 2), second, FINGERPRINTS, give_up_after=2).label == "changed"
    assert _failed(_ref("bad.mp4", 2), "r3", second)["bad_file_runs"] == 1
    # gone from the source and back unchanged, it is the same bad file
    gone = missing_entry(second)
    assert bad_file_runs(gone) == 2 and decide(ref, gone, FINGERPRINTS, give_up_after=2).label == "given up"
    assert returned_entry(gone, given_up=True)["status"] == "failed"
    assert bad_file_runs(returned_entry(gone, given_up=True)) == 2
    # a failure that may pass (a timeout, a bucket refusing, a lost worker, a limit of the
    # configuration, a file removed since listed) is no bad file's, and breaks the run of them
    for error_type in ("DecodeTimeout", "StorageError", "WorkerLost", "DeviceLostError", "MemoryError",
                       "VideoDecodeError"):
        transient = _failed(ref, "r3", second, error_type, bad_file=False)
        assert (transient["status"], transient["bad_file_runs"]) == ("failed", 0), error_type
        assert decide(ref, transient, FINGERPRINTS, give_up_after=1).label == "previously failed"
    # as is a stage's failure on a video decoded (partial), or a processed video
    partial = _entry(ref, "r3", previous=second, errors=[StageError("captions", "RuntimeError", "out of memory")])
    assert (partial["status"], partial["bad_file_runs"]) == ("partial", 0)
    assert _entry(ref, "r3", previous=second)["bad_file_runs"] == 0
    # a video decoded none of whose sampled frames decodes has no core rows either: a bad file
    task = VideoTask(ref=ref, meta=_meta(), errors=[StageError("sample", "VideoDecodeError", "frames [0] of 9 could "
                                                               "not be decoded", bad_file=True)])
    sampled = entry_after(task, second, frozenset(FINGERPRINTS), "r3", FINGERPRINTS)
    assert (sampled["status"], sampled["bad_file_runs"]) == ("partial", 3)
    # (mutation review) the file's bytes and something else beside them (its rows that do not fit a
    # table), or only the rows the job writes itself (a worker lost, as `_record_lost` makes them): no bad file
    for errors in ([StageError("sample", "VideoDecodeError", "no frame could be decoded", bad_file=True),
                    StageError("output", "ArrowInvalid", "its videos rows do not fit the table's declared types")],
                   [StageError("worker", "WorkerLost", "the worker processing this video was lost")]):
        task = VideoTask(ref=ref, errors=errors)
        assert entry_after(task, second, frozenset(FINGERPRINTS), "r3", FINGERPRINTS)["bad_file_runs"] == 0, errors


def test_an_entry_written_before_bad_files_were_counted_counts_a_whole_failure_once():
    from pipeline.ledger import LEDGER_SCHEMA, bad_file_runs, missing_entry

    ref = _ref("bad.mp4")
    old = {**_failed(ref, "r1", None), "bad_file_runs": None}  # (as an old manifest or snapshot is read)
    assert "bad_file_runs" in LEDGER_SCHEMA.names and bad_file_runs(old) == 1
    assert bad_file_runs(missing_entry(old)) == 1
    assert decide(ref, old, FINGERPRINTS, give_up_after=1).label == "given up"
    assert decide(ref, old, FINGERPRINTS, give_up_after=2).label == "previously failed"
    assert _failed(ref, "r2", old)["bad_file_runs"] == 2
    for error_type in ("EmptyVideoStream", "DecoderCrashed"):  # (mutation review) a bad file's too
        assert bad_file_runs({**_failed(ref, "r1", None, error_type), "bad_file_runs": None}) == 1, error_type
    # not a failure a bad file gives, nor a processed video's
    assert bad_file_runs({**_failed(ref, "r1", None, "StorageError", False), "bad_file_runs": None}) == 0
    assert bad_file_runs({**_entry(ref, "r1"), "bad_file_runs": None}) == 0
    without = {k: v for k, v in old.items() if k != "bad_file_runs"}
    assert bad_file_runs(without) == 1


def test_switching_a_stage_off_reruns_no_video_and_keeps_its_rows_current():
    from pipeline.ledger import accepted_fingerprints

    everything = RunConfig(stages=("shots", "embed", "objects", "scenes", "captions", "match"),
                           match=CONFIG.match.__class__(queries=("a dog",)))
    ref = _ref("a.mp4")
    entry = entry_after(VideoTask(ref=ref, meta=_meta()), None, frozenset(FINGERPRINTS), "r1",
                        unit_fingerprints(everything))
    for off in (["objects"], ["embed"], ["embed", "objects", "scenes", "match"]):
        fewer = everything.with_overrides({"stages": [s for s in everything.stages if s not in off]})
        # it once reran every video (`embed` off beside objects: the same core rows, the same fingerprints)
        assert off == ["embed"] or unit_fingerprints(fewer) != unit_fingerprints(everything)
        decision = decide(ref, entry, unit_fingerprints(fewer), accepted=accepted_fingerprints(fewer))
        assert decision.reason == "unchanged", off
        # and on again: the rows are those it would make
        assert decide(ref, entry, unit_fingerprints(everything), accepted=accepted_fingerprints(everything)).skip
    # not shots: every unit's rows are per its segments, which a rerun without it would not line up with
    no_shots = everything.with_overrides({"stages": [s for s in everything.stages if s != "shots"]})
    assert decide(ref, entry, unit_fingerprints(no_shots), accepted=accepted_fingerprints(no_shots)).stages is None
    # a video made while a stage was off is redone for it when it is switched on
    no_objects = everything.with_overrides({"stages": ["shots", "embed", "scenes", "captions", "match"]})
    made_without = entry_after(VideoTask(ref=ref, meta=_meta()), None, frozenset(FINGERPRINTS), "r1",
                               unit_fingerprints(no_objects))
    decision = decide(ref, made_without, unit_fingerprints(everything), accepted=accepted_fingerprints(everything))
    assert decision.label == "config changed: labels"
    # switched off, and another setting of its unit changed: the unit is redone
    changed = no_objects.with_overrides({"labels.scenes": ["a beach"]})
    assert decide(ref, entry, unit_fingerprints(changed), accepted=accepted_fingerprints(changed)).units == {"labels"}


def test_switching_thumbnails_or_frame_embeddings_off_reruns_no_video():
    """`--set output.thumbnails=false` (the README's advice for huge batches) on an output made
    with them reran every video in full: the rows made with them stay current. Switched on, a
    video made without them is redone."""
    from pipeline.ledger import accepted_fingerprints

    ref, on = _ref("a.mp4"), RunConfig(stages=("shots", "embed", "objects"))
    entry = entry_after(VideoTask(ref=ref, meta=_meta()), None, frozenset(FINGERPRINTS), "r1", unit_fingerprints(on))
    for off in ({"output.thumbnails": False}, {"output.frame_embeddings": False},
                {"output.thumbnails": False, "output.frame_embeddings": False}):
        fewer = on.with_overrides(off)
        assert unit_fingerprints(fewer)["core"] != unit_fingerprints(on)["core"]
        assert decide(ref, entry, unit_fingerprints(fewer), accepted=accepted_fingerprints(fewer)).skip, off
        made_without = entry_after(VideoTask(ref=ref, meta=_meta()), None, frozenset(FINGERPRINTS), "r1",
                                   unit_fingerprints(fewer))
        again = decide(ref, made_without, unit_fingerprints(on), accepted=accepted_fingerprints(on))
        assert again.label == "config changed: core" and again.stages is None, off
    # off, and the sampling changed too: redone
    changed = on.with_overrides({"output.thumbnails": False, "sampling.num_frames": 4})
    assert decide(ref, entry, unit_fingerprints(changed), accepted=accepted_fingerprints(changed)).stages is None


def test_a_queries_file_is_fingerprinted_by_its_lines_not_its_path(tmp_path):
    from pipeline.ledger import accepted_fingerprints

    for name in ("q1.txt", "q2.txt"):
        (tmp_path / name).write_text("a red car\n")
    first, moved = (RunConfig(stages=("embed", "match"), match=CONFIG.match.__class__(queries_file=str(tmp_path / n)))
                    for n in ("q1.txt", "q2.txt"))
    assert unit_fingerprints(first) == unit_fingerprints(moved)
    ref = _ref("a.mp4")
    # an output made before: its fingerprints hashed the path, and are still current
    before = entry_after(VideoTask(ref=ref, meta=_meta()), None, frozenset(FINGERPRINTS), "r1",
                         unit_fingerprints(first, queries_path=True))
    assert before["matches_fingerprint"] != unit_fingerprints(first)["matches"]
    assert decide(ref, before, unit_fingerprints(first), accepted=accepted_fingerprints(first)).skip
    (tmp_path / "q2.txt").write_text("a red car\na blue car\n")
    assert decide(ref, before, unit_fingerprints(moved), accepted=accepted_fingerprints(moved)).units == {"matches"}


def test_a_model_folder_written_differently_reruns_no_video(tmp_path, monkeypatch):
    # ./m, /abs/m and /abs/m/ were three fingerprints: `vidlens submit` (absolute) after `run` reran every video
    from pipeline.ledger import accepted_fingerprints

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    written = [RunConfig(stages=("embed", "objects", "captions"), models=CONFIG.models.__class__(embed=m, captions=m))
               for m in ("./m", "m", str(tmp_path / "m"), f"{tmp_path / 'm'}/")]
    assert len({json.dumps(unit_fingerprints(config), sort_keys=True) for config in written}) == 1
    assert len({config.fingerprint() for config in written}) == 1
    hub = RunConfig(stages=("embed", "objects", "captions"))  # a hub id is hashed as written, as ever
    assert unit_fingerprints(hub) == unit_fingerprints(hub, models_as_written=True)
    # an output made before with ./m: its fingerprints hashed "./m" (these values), and are still current
    made = {"core": "bafe17363bf20d03", "labels": "d0a973436ce33e22", "matches": None,
            "captions": "cb18da0dfc719d60", "texts": None}
    assert unit_fingerprints(written[0], models_as_written=True) == made
    ref = _ref("a.mp4")
    before = entry_after(VideoTask(ref=ref, meta=_meta()), None, frozenset(FINGERPRINTS), "r1", made)
    assert before["core_fingerprint"] != unit_fingerprints(written[0])["core"]
    assert decide(ref, before, unit_fingerprints(written[0]), accepted=accepted_fingerprints(written[0])).skip
    # written otherwise now (absolute), it reruns once: its old form is not known
    assert decide(ref, before, unit_fingerprints(written[2]), accepted=accepted_fingerprints(written[2])).units \
        == {"core", "labels", "matches", "captions", "texts"}


def test_a_failed_video_that_went_missing_and_came_back_is_retried_as_failed():
    from pipeline.ledger import missing_entry

    ref = _ref("a.mp4")
    failed = entry_after(VideoTask(ref=ref, errors=[StageError("decode", "VideoDecodeError", "truncated")]),
                         None, frozenset(FINGERPRINTS), "r1", FINGERPRINTS)
    assert failed["status"] == "failed"
    assert decide(ref, missing_entry(failed), FINGERPRINTS).label == "previously failed"
    # a manifest naming a file that is not there: missing where the output holds its rows, else
    # failed again (a mistyped name must not go quiet after one night)
    absent = VideoRef(ref.uri, 0, None, None, "gone", absent=True)
    assert decide(absent, _entry(ref, "r1"), FINGERPRINTS).reason == "missing"
    assert decide(absent, failed, FINGERPRINTS).label == "changed"
    assert decide(absent, None, FINGERPRINTS).reason == "new"


def test_latest_and_history_views_and_same_date_rerun_replaces(tmp_path):
    store = Store(str(tmp_path / "out"))
    a, b = _ref("a.mp4"), _ref("b.mp4")
    every = frozenset(FINGERPRINTS)
    first = _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {a: (every, None), b: (every, None)})
    ledger = store.ledger_entries()
    # next day: only captions of a rerun
    _publish(store, "20240102T000000000000Z-bbbbbb", "2024-01-02",
             {a: (frozenset({"captions"}), ledger[a.uri])})
    con = _views(store)
    assert con.execute("select count(*), count(distinct video_id) from videos").fetchone() == (2, 2)
    columns = [row[0] for row in con.execute("describe captions").fetchall()]
    assert columns.count("run_date") == 1 and not any(c.startswith("run_date_") for c in columns)
    captions = dict(con.execute("select video_id, caption from captions").fetchall())
    assert captions[a.video_id].endswith("bbbbbb") and captions[b.video_id].endswith("aaaaaa")
    assert con.execute("select count(*) from captions_history").fetchone()[0] == 3
    # the same date again: replaces that date's rows instead of adding a second copy
    ledger = store.ledger_entries()
    _publish(store, "20240102T010000000000Z-cccccc", "2024-01-02", {a: (frozenset({"captions"}), ledger[a.uri])})
    con = _views(store)
    history = con.execute("select run_date::varchar, caption from captions_history where video_id = ? "
                          "order by run_date", [a.video_id]).fetchall()
    assert [d for d, _ in history] == ["2024-01-01", "2024-01-02"] and history[1][1].endswith("cccccc")
    assert con.execute("select count(*) from captions").fetchone()[0] == 2
    assert set(store.committed_files("videos")) == {store.url(f["path"]) for f in first["files"]
                                                      if f["table"] == "videos"}
    assert all("/run_date=2024-01-01/" in f for f in store.committed_files("videos"))


def test_recovery_rolls_committed_batches_forward_and_drops_unpublished_staging(tmp_path):
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    manifest = _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (every, None)},
                        move=False)
    # a reader sees the published batch although its files are still in staging
    assert _views(store).execute("select count(*) from videos").fetchone()[0] == 1
    # a batch that was staged but never published
    writer = BatchWriter(store, "20240101T000000000000Z-aaaaaa", "2024-01-01")
    writer.add("errors", [{"video_id": "x", "run_id": "r", "config_fingerprint": "f", "uri": "/x", "stage": "decode",
                           "occurred_at": _now()}])
    writer.stage(1)
    done = store.recover()
    assert done["files_moved"] == len(manifest["files"]) and done["staging_removed"] == 1
    assert store.fs.ls(store.path("_vidlens", "staging")) == []
    assert all(os.path.exists(f) and "_vidlens" not in f for f in store.committed_files("videos"))
    con = _views(store)
    assert con.execute("select count(*) from videos").fetchone()[0] == 1
    assert con.execute("select count(*) from errors_history").fetchone()[0] == 0


def test_snapshot_gives_the_same_ledger_and_files(tmp_path):
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (every, None)})
    store.write_snapshot()
    _publish(store, "20240102T000000000000Z-bbbbbb", "2024-01-02", {_ref("b.mp4"): (every, None)})
    fresh = Store(str(tmp_path / "out"))
    assert fresh.ledger().equals(store.ledger()) and fresh.ledger().num_rows == 2
    assert sorted(fresh.committed_files("videos")) == sorted(store.committed_files("videos"))


def test_a_local_batch_is_on_disk_before_its_manifest_and_the_manifest_with_its_name(tmp_path, monkeypatch):
    # only the manifest was fsynced: after a power cut it could name 0-byte files, and every query
    # of their table failed while the ledger said their videos were done
    from pipeline import store as store_module

    synced, fsync = [], os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or fsync(fd))
    store = Store(str(tmp_path / "out"))
    manifest = _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01",
                        {_ref("a.mp4"): (frozenset(FINGERPRINTS), None)})
    staged = [store.path(record["staged"]) for record in manifest["files"]]
    commits = store.path("_vidlens", "commits")
    assert len(staged) == 3 and synced[:3] == staged  # videos, captions, the attempts record
    assert synced[3].startswith(commits + "/.tmp-") and synced[4:] == [commits]


def test_a_snapshot_that_cannot_be_read_gives_way_to_the_manifests(tmp_path, caplog):
    # a snapshot cut to 0 bytes (a full disk, a power cut) stopped every command, queries too:
    # "Parquet file size is 0 bytes", naming no file
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (every, None)})
    _publish(store, "20240102T000000000000Z-bbbbbb", "2024-01-02", {_ref("b.mp4"): (every, None)})
    name = store.write_snapshot()
    snapshot = tmp_path / "out" / "_vidlens" / "snapshots" / name
    for damage in (b"", b"PAR1 not a parquet file"):
        snapshot.write_bytes(damage)
        fresh = Store(str(tmp_path / "out"))
        assert fresh.ledger().equals(store.ledger()) and fresh.ledger().num_rows == 2
        assert sorted(fresh.committed_files("videos")) == sorted(store.committed_files("videos"))
        assert _views(fresh).execute("select count(*) from videos").fetchone()[0] == 2
        assert f"{snapshot}: the ledger snapshot cannot be read" in caplog.text


def test_compaction_keeps_what_the_latest_and_history_views_return(tmp_path):
    store = Store(str(tmp_path / "out"))
    every, captions = frozenset(FINGERPRINTS), frozenset({"captions"})
    refs = [_ref(f"{i}.mp4") for i in range(4)]
    for batch, ref in enumerate(refs):
        _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {ref: (every, None)}, batch=batch)
    for run_id, ref, found in (("20240101T010000000000Z-bbbbbb", refs[0], True),
                               ("20240101T020000000000Z-cccccc", refs[0], True),
                               ("20240101T030000000000Z-dddddd", refs[1], False)):  # a rerun that found none
        _publish(store, run_id, "2024-01-01", {ref: (captions, store.ledger_entries()[ref.uri])}, found=found)
    views = ("videos", "videos_history", "captions", "captions_history", "errors_history")
    query = "select * from {} order by all"
    before = {t: _views(store).execute(query.format(t)).fetchall() for t in views}
    shown = {(v, r[-6:]) for v, r in _views(store).execute("select video_id, run_id from captions_history").fetchall()}
    assert shown == {(refs[0].video_id, "cccccc"), (refs[2].video_id, "aaaaaa"), (refs[3].video_id, "aaaaaa")}
    files_before = len(store.committed_files("captions"))
    counts = compact(str(tmp_path / "out"))
    store = Store(str(tmp_path / "out"))
    after = {t: _views(store).execute(query.format(t)).fetchall() for t in views}
    assert after == before
    assert files_before == 6 and len(store.committed_files("captions")) == 1
    assert len(store.committed_files("attempts")) == 1
    # the captions of 0.mp4 its reruns replaced (2), and that of 1.mp4 its rerun found none in place of;
    # apart, the attempt of 0.mp4's first rerun, which the second one's supersedes
    assert counts["rows_before"] - counts["rows_after"] == 3
    assert counts["attempts_rows_before"] - counts["attempts_rows_after"] == 1


def test_a_date_compacted_into_files_its_rows_do_not_fill_is_left_as_it_is_after(tmp_path):
    # 5 rows at 2 a file are 3 files: taken for too many, a date was rewritten by every compaction
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    for batch in range(5):
        _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref(f"{batch}.mp4"): (every, None)}, batch=batch)
    assert compact(str(tmp_path / "out"), rows_per_file=2)["files_after"] == 3 + 3  # videos and captions
    again = compact(str(tmp_path / "out"), rows_per_file=2)
    assert "files_before" not in again and again["files_left"] == 3 + 3


def test_compaction_drops_the_errors_of_a_same_date_run_a_later_attempt_replaced_and_keeps_the_schema(tmp_path):
    # the latest attempt of a video at all (whatever its units) hides a date's earlier errors: kept, they
    # were dead rows; and a group left with no row keeps one empty file, so a reader of the folder finds the table
    store = Store(str(tmp_path / "out"))
    every, captions = frozenset(FINGERPRINTS), frozenset({"captions"})
    failed_run, retry = "20240101T000000000000Z-aaaaaa", "20240101T010000000000Z-bbbbbb"
    refs = [_ref("a.mp4"), _ref("b.mp4")]
    for batch, ref in enumerate(refs):  # an errors file a batch: a group of two files
        writer = BatchWriter(store, failed_run, "2024-01-01")
        keys = {"video_id": ref.video_id, "run_id": failed_run, "config_fingerprint": "f"}
        writer.add("videos", [{**keys, "uri": ref.uri, "status": "partial", "processed_at": _now()}])
        writer.add("errors", [{**keys, "uri": ref.uri, "stage": "captions", "occurred_at": _now()}])
        writer.attempted(ref.video_id, every)
        entry = _entry(ref, failed_run, errors=[StageError("captions", "RuntimeError", "out of memory")])
        store.publish({"kind": "batch", "run_id": failed_run, "batch": batch, "run_date": "2024-01-01",
                       "files": writer.stage(batch), "ledger": [entry]}, f"{failed_run}-{batch:05d}.json")
    ledger = store.ledger_entries()
    _publish(store, retry, "2024-01-01", {ref: (captions, ledger[ref.uri]) for ref in refs})
    views = ("errors", "errors_history", "captions_history", "videos")
    before = {v: _views(store).execute(f"select * from {v} order by all").fetchall() for v in views}
    assert before["errors_history"] == [] and len(store.committed_files("errors")) == 2
    compact(str(tmp_path / "out"))
    store = Store(str(tmp_path / "out"))
    assert {v: _views(store).execute(f"select * from {v} order by all").fetchall() for v in views} == before
    [errors] = store.committed_files("errors")
    kept = pq.read_table(errors)
    assert kept.num_rows == 0 and "stage" in kept.column_names


def test_a_compacted_file_has_the_declared_column_order_over_files_written_before_a_column(tmp_path):
    # the group's schema unified as its first file had it: a file written before videos.hdr and
    # pixel_aspect gave a compacted file with them last, which no run's writer would write
    from schemas.tables import table_schema

    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    for batch in range(2):
        _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref(f"{batch}.mp4"): (every, None)}, batch=batch)
    first = sorted((tmp_path / "out" / "videos").rglob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).drop_columns(["hdr", "pixel_aspect"]), first)  # as version 1 wrote it
    compact(str(tmp_path / "out"))
    [videos] = Store(str(tmp_path / "out")).committed_files("videos")
    assert pq.read_schema(videos).names == table_schema("videos").names


def test_a_compacted_files_embedding_comes_after_the_declared_columns(tmp_path):
    """(mutation review) A column the table does not declare (the embedding, sized by the model) comes
    after the declared ones in a compacted file, as a run's writer writes it, over a file written
    before a column."""
    import numpy as np

    from schemas.tables import table_schema

    store, run_id, every = Store(str(tmp_path / "out")), "20240101T000000000000Z-aaaaaa", frozenset(FINGERPRINTS)
    for batch in range(2):
        ref, writer = _ref(f"{batch}.mp4"), BatchWriter(store, run_id, "2024-01-01")
        writer.embedding_dim = 4
        writer.add("videos", [{"video_id": ref.video_id, "run_id": run_id, "config_fingerprint": "f", "uri": ref.uri,
                               "status": "ok", "processed_at": _now(), "embedding": np.ones(4, np.float32)}])
        writer.attempted(ref.video_id, every)
        store.publish({"kind": "batch", "run_id": run_id, "batch": batch, "run_date": "2024-01-01",
                       "files": writer.stage(batch), "ledger": [_entry(ref, run_id, every)]},
                      f"{run_id}-{batch:05d}.json")
    first = sorted((tmp_path / "out" / "videos").rglob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).drop_columns(["hdr", "pixel_aspect"]), first)  # as version 1 wrote it
    compact(str(tmp_path / "out"))
    [videos] = Store(str(tmp_path / "out")).committed_files("videos")
    assert pq.read_schema(videos).names == [*table_schema("videos").names, "embedding"]


def test_compaction_keeps_the_history_of_runs_that_recorded_no_attempts(tmp_path, monkeypatch):
    # an output of a vidlens from before attempts were recorded: a date's history is its latest run's rows
    store = Store(str(tmp_path / "out"))
    ref, captions = _ref("a.mp4"), frozenset({"captions"})
    monkeypatch.setattr(BatchWriter, "attempted", lambda self, video_id, units: None)
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {ref: (frozenset(FINGERPRINTS), None)})
    for run_id, date in (("20240101T010000000000Z-bbbbbb", "2024-01-01"),
                         ("20240102T000000000000Z-cccccc", "2024-01-02")):  # the current captions: another date's
        _publish(store, run_id, date, {ref: (captions, store.ledger_entries()[ref.uri])})
    monkeypatch.undo()
    query = "select run_date::varchar, caption from captions_history order by all"
    before = _views(store).execute(query).fetchall()
    assert [(d, c[-6:]) for d, c in before] == [("2024-01-01", "bbbbbb"), ("2024-01-02", "cccccc")]
    counts = compact(str(tmp_path / "out"))
    assert _views(Store(str(tmp_path / "out"))).execute(query).fetchall() == before
    assert counts["rows_before"] - counts["rows_after"] == 1  # the first run's caption, its date's rerun replaced


def test_compaction_drops_the_records_of_a_date_whose_files_were_all_deleted(tmp_path, caplog):
    # readers skip a published file that is not there, with a warning; compaction raised ArrowInvalid
    # (no schema to unify) on a table and date none of whose files was, and so never ran again
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    for batch in range(2):
        _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref(f"{batch}.mp4"): (every, None)}, batch=batch)
    for url in store.committed_files("captions"):
        os.remove(url)
    counts = compact(str(tmp_path / "out"))
    assert counts["files_before"] == 2 * 2 and "none of its 2 published files is there" in caplog.text
    store = Store(str(tmp_path / "out"))
    assert store.committed_files("captions") == [] and len(store.committed_files("videos")) == 1
    caplog.clear()
    assert _views(store).execute("select count(*) from videos").fetchone() == (2,)
    assert "missing" not in caplog.text  # the records gone with their files


def test_a_compaction_on_a_host_whose_clock_is_behind_folds_after_what_it_compacted(tmp_path, monkeypatch, caplog):
    # its id came from the clock alone: its manifests sorted before the run's it compacted, whose
    # folding after them brought back the files they had replaced (gone: "missing" on every read)
    import datetime as real

    from pipeline import store as store_module

    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (every, None)})
    store.write_snapshot()
    _publish(store, "20240101T020000000000Z-bbbbbb", "2024-01-01", {_ref("b.mp4"): (every, None)})

    class HourBehind(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2024, 1, 1, 1, tzinfo=real.timezone.utc)

    monkeypatch.setattr(store_module, "datetime", HourBehind)
    compact(str(tmp_path / "out"))
    monkeypatch.undo()
    store = Store(str(tmp_path / "out"))
    assert all(name > "20240101T020000000000Z" for name in store.manifests()[-3:])
    caplog.clear()
    assert _views(store).execute("select uri, count(*) from videos group by 1 order by 1").fetchall() == [
        ("/videos/a.mp4", 1), ("/videos/b.mp4", 1)]
    assert len(store.committed_files("videos")) == 1 and "missing" not in caplog.text


def test_recovery_deletes_what_a_compaction_killed_in_its_deletes_replaced_with_no_staging_left(tmp_path,
                                                                                               monkeypatch):
    # on a bucket the emptied staging folder is gone, so recovery found nothing to finish and the old files stayed
    from fsspec.implementations.local import LocalFileSystem

    out = tmp_path / "out"
    store = Store(str(out))
    every = frozenset(FINGERPRINTS)
    for batch in range(3):
        _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref(f"{batch}.mp4"): (every, None)}, batch)
    store.write_snapshot()
    rm, deleted = LocalFileSystem.rm, []

    def killed_after_one_delete(fs, path, *args, **kwargs):
        if str(path).endswith(".parquet") and "_vidlens" not in str(path):
            if deleted:
                raise KeyboardInterrupt  # killed midway through the deletes
            deleted.append(path)
        return rm(fs, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "rm", killed_after_one_delete)
    with pytest.raises(KeyboardInterrupt):
        compact(str(out))
    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    shutil.rmtree(out / "_vidlens" / "staging")  # a bucket keeps no empty folder
    fresh = Store(str(out))
    assert fresh.recover() == {"replaced_deleted": 2}
    live = {r["path"] for r in fresh.state().files.values()}
    assert {str(p.relative_to(out)) for p in out.rglob("*.parquet")
            if "_vidlens" not in p.parts or "attempts" in p.parts} == live
    assert Store(str(out)).recover() == {}  # and nothing more: deleting again is no work


def test_the_runs_view_shows_each_run_once_and_a_run_that_never_finished_as_running_then_interrupted(tmp_path):
    store = Store(str(tmp_path / "out"))

    def run_row(run_id: str, batch: int, status: str | None) -> None:
        writer = BatchWriter(store, run_id, "2024-01-01")
        writer.add("runs", [{"run_id": run_id, "config_fingerprint": "f", "started_at": _now(),
                             "finished_at": _now() if status else None, "status": status or "running"}])
        store.publish({"kind": "batch", "run_id": run_id, "batch": batch, "run_date": "2024-01-01",
                       "files": writer.stage(batch), "ledger": []}, f"{run_id}-{batch:05d}.json")

    killed, later = "20240101T000000000000Z-aaaaaa", "20240101T010000000000Z-bbbbbb"
    run_row(killed, 0, None)  # the row a run opens with, published with its first batch
    query = "select run_id, status from runs order by run_id"
    assert _views(store).execute(query).fetchall() == [(killed, "running")]
    run_row(later, 0, None)
    run_row(later, 1, "partial")  # and its final row
    expected = [(killed, "interrupted"), (later, "partial")]
    assert _views(store).execute(query).fetchall() == expected
    assert _views(store).execute(query.replace("runs", "runs_history")).fetchall() == expected
    counts = compact(str(tmp_path / "out"))
    assert (counts["rows_before"], counts["rows_after"]) == (3, 2)  # the later run's opening row is gone
    assert _views(Store(str(tmp_path / "out"))).execute(query).fetchall() == expected


def test_an_output_url_with_one_slash_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="one slash after its scheme: write s3://bucket/out"):
        Store("s3:/bucket/out")
    assert list(tmp_path.iterdir()) == []
    for url in (f"file:{tmp_path}/out", f"file://{tmp_path}/out"):  # a file URL is a local folder
        assert Store(url).path() == str(tmp_path / "out")


def test_compacting_a_path_that_holds_no_output_is_refused_and_makes_nothing(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["compact", str(tmp_path / "mistyped")]) == 2
    assert "holds no vidlens outputs" in capsys.readouterr().err
    assert not (tmp_path / "mistyped").exists()


def test_views_over_a_bucket_through_fsspec():
    store = Store("memory://vidlens-test-bucket/out")
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (frozenset(FINGERPRINTS), None)})
    assert store.committed_files("videos")[0].startswith("memory://")
    from pipeline.views import REMOTE_THREADS

    con = _views(store)
    # each file's footer, read as its view is made, waits a round trip: a thread each, however few the cores
    assert int(con.sql("SELECT current_setting('threads')").fetchall()[0][0]) >= REMOTE_THREADS
    assert con.execute("select count(*) from videos").fetchone()[0] == 1


def test_the_views_of_an_output_whose_path_holds_a_quote(tmp_path):
    # the files are named in the views' SQL: "/data/bob's videos/out" must not end the string there
    store = Store(str(tmp_path / "bob's videos" / "out"))
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (frozenset(FINGERPRINTS), None)})
    con = _views(store)
    assert con.execute("select count(*) from videos join captions using (video_id)").fetchone()[0] == 1
    assert con.execute("select count(*) from captions_history").fetchone()[0] == 1


def test_views_over_a_bucket_read_each_file_once(monkeypatch):
    """DuckDB cannot tell whether a file read through fsspec changed, so it read every file again
    for each view naming it (each history view names the attempts) and for each query: opening
    the views of 450 files on S3 took 2,037 requests and a first query 490 more, against 468
    and none now (an output's files never change once published)."""
    from collections import Counter

    from tests.s3server import s3_server

    with s3_server() as s3:
        store = Store(f"s3://{s3.bucket}/out", s3.storage_options)
        for batch in range(3):
            _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01",
                     {_ref(f"{batch}.mp4"): (frozenset(FINGERPRINTS), None)}, batch)
        gets, call = Counter(), type(store.fs)._call_s3

        async def counted(self, method, *args, **kwargs):
            if method == "get_object":
                gets[kwargs["Key"]] += 1
            return await call(self, method, *args, **kwargs)

        monkeypatch.setattr(type(store.fs), "_call_s3", counted)
        con = _views(Store(f"s3://{s3.bucket}/out", s3.storage_options))
        for _ in range(2):
            assert con.execute("select count(*) from captions join videos using (video_id)").fetchone()[0] == 3
            assert con.execute("select count(*) from videos_history").fetchone()[0] == 3
    parquet = {key: n for key, n in gets.items() if key.endswith(".parquet")}
    assert len(parquet) == 9 and set(parquet.values()) == {1}, gets  # videos, captions, attempts: 3 batches


def test_a_second_lock_is_refused_with_the_holder_named(tmp_path):
    store = Store(str(tmp_path / "out"))
    with OutputLock(store, "run-one"):
        with pytest.raises(LockedError) as refused:
            OutputLock(Store(str(tmp_path / "out")), "run-two").__enter__()
        message = str(refused.value)
        assert str(tmp_path / "out") in message and "run-one" in message and f"pid {os.getpid()}" in message
    with OutputLock(store, "run-three"):  # released on exit
        pass


def test_a_locked_output_tells_each_command_what_to_do_once_it_is_free(tmp_path):
    """The message told every command to "run the same command again to finish its work", a
    run's words: a compact or forget refused had begun nothing; and it called a compaction a run."""
    from pipeline.forget import forget
    from pipeline.store import time_ordered_id

    out = str(tmp_path / "out")
    store = Store(out)
    store.publish({"kind": "batch", "files": [], "ledger": []}, "earlier-00000.json")  # (an output: compact takes it)
    for holder, called in ((time_ordered_id("compact"), "compaction"), (time_ordered_id("forget"), "forget"),
                           (time_ordered_id("a1b2c3"), "run")):
        with OutputLock(store, holder):
            for refused, again in ((lambda: compact(out), "run the same vidlens compact again"),
                                   (lambda: forget(out, missing=True), "run the same vidlens forget again"),
                                   (lambda: OutputLock(Store(out), time_ordered_id("d4e5f6")).__enter__(),
                                    "run the same command again to finish its work")):
                with pytest.raises(LockedError) as locked:
                    refused()
                message = str(locked.value)
                assert message.startswith(f"{out} is locked by {called} {holder} (host ")
                assert message.endswith(f"a killed job's lock is released at once, then {again}.")


def test_a_lock_that_cannot_be_removed_leaves_the_runs_own_error_said(tmp_path, monkeypatch, caplog):
    # an output made read-only as a first run wrote: the run said only "Permission denied: .../_vidlens/lock"
    from pipeline import lock

    store = Store(str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="the staging folder cannot be written"):
        with OutputLock(store, "run-one"):
            monkeypatch.setattr(lock.os, "remove", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
            raise RuntimeError("the staging folder cannot be written")
    assert "the lock file of a run that wrote nothing cannot be removed (denied)" in caplog.text
    monkeypatch.undo()
    with OutputLock(store, "run-two"):  # given back all the same
        pass


def test_a_lock_file_removed_as_a_job_opens_it_is_taken_again_not_held_by_two(tmp_path, monkeypatch):
    # a first run that fails before any write removes the lock file it holds, and its folders: a
    # job that had opened the file then held a lock on a removed file, and a third one a new file's
    import fcntl

    out = str(tmp_path / "new-out")
    first = OutputLock(Store(out), "first").__enter__()
    flock = fcntl.flock

    def first_gives_up_meanwhile(handle, operation):
        if operation & fcntl.LOCK_EX and first._handle is not None:
            first.release()
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", first_gives_up_meanwhile)
    second = OutputLock(Store(out), "second").__enter__()
    monkeypatch.undo()
    try:
        assert json.loads((tmp_path / "new-out" / "_vidlens" / "lock").read_text())["run_id"] == "second"
        with pytest.raises(LockedError, match="locked by run second"):
            OutputLock(Store(out), "third").__enter__()
    finally:
        second.release()
    assert not (tmp_path / "new-out").exists()  # (nothing published: its folders go with its lock)


def test_a_bucket_lock_of_a_dead_process_is_stale():
    from workers.remote_copy import pid_space

    store = Store("memory://vidlens-lock-bucket/out")
    dead = 2**22 + 12345
    holder = {"host": platform.node(), "pid": dead, "pids": pid_space(), "run_id": "dead", "heartbeat": time.time()}
    store.fs.pipe_file(store.path("_vidlens", "lock"), json.dumps(holder).encode())
    with OutputLock(store, "alive", heartbeat_s=0.1):
        with pytest.raises(LockedError, match="alive"):
            OutputLock(store, "another").__enter__()
    assert not store.fs.exists(store.path("_vidlens", "lock"))
    # the same pid in another pid namespace (a container of the same host name) is no dead process of
    # this one's: its lock holds until its heartbeat is old
    store.fs.pipe_file(store.path("_vidlens", "lock"), json.dumps({**holder, "pids": "another container"}).encode())
    with pytest.raises(LockedError, match="locked by run dead"):
        OutputLock(store, "another").__enter__()
    store.fs.pipe_file(store.path("_vidlens", "lock"), json.dumps({**holder, "pids": "another", "heartbeat": 0}).encode())
    with OutputLock(store, "after"):
        pass


def test_a_stops_cleanup_gives_a_bucket_lock_back_unless_a_step_before_it_was_left_running(monkeypatch):
    """At a stop, the cleanup waits on the output's store a few seconds in all (`pipeline.stop_deadline`):
    after a step it left running (a batch still being published to a store that hangs), the lock is left
    as a killed job's, never given back under that batch, and what it left names it; where the store
    answers, the lock is given back as ever."""
    import threading

    from pipeline import stop_deadline

    store = Store("memory://vidlens-lock-stop/out")
    lock_path = store.path("_vidlens", "lock")
    monkeypatch.setattr(stop_deadline, "CLEANUP_S", 0.5)
    hung = threading.Event()
    try:
        with OutputLock(store, "answered", heartbeat_s=0.1):
            stop_deadline.stopping()
        assert not store.fs.exists(lock_path) and stop_deadline.LEFT == []
        stop_deadline.clear()
        with OutputLock(store, "left", heartbeat_s=0.1):
            stop_deadline.stopping()
            assert not stop_deadline.waited(hung.wait, "a batch being published")
        assert json.loads(store.fs.cat_file(lock_path))["run_id"] == "left"
        assert stop_deadline.LEFT[0] == "a batch being published" and len(stop_deadline.LEFT) == 2
        assert stop_deadline.LEFT[1].startswith("its lock ") and stop_deadline.LEFT[1].endswith(
            "/_vidlens/lock, which the next job on the output takes over at once on this host (its pid gone), from "
            "another host after 600 s without heartbeat")
    finally:
        hung.set()
        stop_deadline.clear()


def test_a_bucket_lock_is_stale_after_its_timeout_or_when_unreadable_and_held_by_the_last_writer(monkeypatch):
    """A bucket lock holds for 600 s without heartbeat (what its message says), whatever the pid
    it names where this host cannot tell (no pid namespace known); one that says nothing readable
    is stale; a job whose write over a stale lock is written over in its pause holds nothing."""
    import types

    import pipeline.lock

    store = Store("memory://vidlens-lock-stale/out")
    lock_path = store.path("_vidlens", "lock")
    dead = 2**22 + 12345
    other = {"host": "elsewhere", "pid": dead, "pids": "", "run_id": "other", "heartbeat": time.time() - 300}
    monkeypatch.setattr(pipeline.lock, "pid_space", lambda: "")  # (not Linux: no boot or pid namespace to tell)
    store.fs.pipe_file(lock_path, json.dumps(other).encode())
    with pytest.raises(LockedError, match="locked by run other .* released after 600 s without heartbeat"):
        OutputLock(store, "mine").__enter__()
    store.fs.pipe_file(lock_path, json.dumps({**other, "heartbeat": time.time() - 700}).encode())
    with OutputLock(store, "mine"):
        assert json.loads(store.fs.cat_file(lock_path))["run_id"] == "mine"
    store.fs.pipe_file(lock_path, b"\x00 not a lock")
    with OutputLock(store, "mine"):
        assert json.loads(store.fs.cat_file(lock_path))["run_id"] == "mine"
    # taken over meanwhile: another job wrote the stale lock after this one, within its pause
    store.fs.pipe_file(lock_path, json.dumps({**other, "heartbeat": 0}).encode())
    monkeypatch.setattr(pipeline.lock, "time", types.SimpleNamespace(time=time.time, sleep=lambda seconds: (
        store.fs.pipe_file(lock_path, json.dumps({**other, "run_id": "later", "heartbeat": time.time()}).encode()))))
    with pytest.raises(LockedError, match="locked by run later"):
        OutputLock(store, "mine").__enter__()


def test_a_local_lock_names_its_holder_over_a_longer_lock_file_and_is_released_at_once(tmp_path):
    lock_file = tmp_path / "out" / "_vidlens" / "lock"
    lock_file.parent.mkdir(parents=True)
    lock_file.write_text(json.dumps({"run_id": "an-earlier-run-with-a-long-id" * 20}))  # (left by a killed run)
    with OutputLock(Store(str(tmp_path / "out")), "run-one"):
        with pytest.raises(LockedError, match=r"locked by run run-one .*a killed job's lock is released at once"):
            OutputLock(Store(str(tmp_path / "out")), "run-two").__enter__()


def _s3_error(code: str, status: int) -> OSError:
    """An s3fs error as it comes from an S3 answer s3fs has no exception of its own for."""
    answer = RuntimeError(code)
    answer.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    error = OSError(5, code)
    error.__cause__ = answer
    return error


@pytest.mark.parametrize("answer, outcome", [
    # S3's answer to a create racing another job's: that job's lock, not a write over it
    (_s3_error("ConditionalRequestConflict", 409), "refused"),
    (_s3_error("NotImplemented", 501), "written, paused"),  # a server without the condition
    (_s3_error("InternalError", 500), "raised"),  # a store error is not taken for either
    (FileExistsError("retried"), "held"),  # this job's own create, retried after it went through
])
def test_a_bucket_locks_create_is_told_from_the_stores_answer(answer, outcome, monkeypatch):
    import pipeline.lock

    store = Store("memory://vidlens-lock-answers/out")
    monkeypatch.setattr(pipeline.lock, "EXCLUSIVE_CREATE", {"memory"})  # a bucket that takes conditions
    lock_path, pipe_file, creates = store.path("_vidlens", "lock"), store.fs.pipe_file, []

    def answering(path, value, mode="overwrite", **kwargs):
        if mode == "create":
            creates.append(path)
            if len(creates) == 1:  # the lock's create: another job's lock made meanwhile, or ours
                holder = {"run_id": "mine" if outcome == "held" else "other", "host": "h", "pid": 1,
                          "heartbeat": time.time()}
                pipe_file(path, json.dumps(holder).encode())
                raise answer
            raise FileExistsError(path)  # the check: refused, as a store that takes conditions does
        return pipe_file(path, value, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", answering)
    pauses = []
    monkeypatch.setattr(OutputLock, "_last_writer_wins", lambda self: pauses.append(self.run_id))
    lock = OutputLock(store, "mine")
    try:
        if outcome == "refused":
            with pytest.raises(LockedError, match="locked by run other"):
                lock.__enter__()
        elif outcome == "raised":
            with pytest.raises(OSError, match="InternalError"):
                lock.__enter__()
        else:
            lock.__enter__()
            assert pauses == (["mine"] if outcome == "written, paused" else [])
            assert json.loads(store.fs.cat_file(lock_path))["run_id"] == "mine"
    finally:
        lock.release()
        store.fs.rm(lock_path) if store.fs.exists(lock_path) else None


def test_a_schedule_keeps_the_cache_folder_its_models_were_downloaded_to(monkeypatch):
    """With XDG_CACHE_HOME set (and no HF_HOME), the hub's cache is under it: a nightly job
    started without it (cron, systemd's user units) looked in ~/.cache, and offline, failed."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/data/cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = Schedule("videos", "out").cron_entry()
    assert " HF_HUB_OFFLINE=1 " in line and " XDG_CACHE_HOME=/data/cache " in line


def test_schedule_prints_cron_and_systemd_entries(tmp_path, monkeypatch):
    schedule = Schedule(str(tmp_path / "videos"), "s3://bucket/out", at="2:05", log_dir=str(tmp_path / "logs"),
                        environment={})
    line = schedule.cron_entry()
    assert line.startswith("5 2 * * * ") and line.endswith(f"# {schedule.name}")
    assert "run --incremental" in line and "s3://bucket/out" in line and str(tmp_path / "videos") in line
    assert "summary-$(date -u +\\%FT\\%H\\%M\\%SZ).json" in line and str(tmp_path / "logs" / "vidlens.log") in line
    # a run a night, and any run by hand, keeps its own summary: named by when it starts
    monkeypatch.setattr("pipeline.schedule.vidlens_executable",
                        lambda: [sys.executable, "-c", "import sys; print(sys.argv[-1])"])
    named = subprocess.run(["/bin/sh", "-c", schedule.shell_line().split(" >> ")[0]], capture_output=True, text=True)
    assert re.fullmatch(rf"{tmp_path}/logs/summary-\d{{4}}-\d\d-\d\dT\d{{6}}Z\.json\n", named.stdout), named
    # run in the folder schedule ran in, so the configuration's relative paths (models) hold
    assert line.split(" && ")[1] == f"cd {os.getcwd()}" and os.path.isabs(line.split(" && ")[2].split()[0])
    # a submit reaches a token-authenticated job server: its mode and token file, never the token
    submits = Schedule("videos", "out", submit_address="http://head:8265",
                       environment={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/home/u/.ray/tok"})
    assert "&& RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/home/u/.ray/tok " in submits.cron_entry()
    units = Schedule("videos", "out", submit_address="http://head:8265").systemd_units()
    service, timer = [units[name] for name in sorted(units)]
    assert "submit" in service and "--address http://head:8265" in service and "Type=oneshot" in service
    assert "OnCalendar=*-*-* 02:00:00" in timer and "Persistent=true" in timer
    with pytest.raises(ValueError, match="HH:MM"):
        Schedule("v", "o", at="25:00").cron_entry()
    # what would fail every night is refused now: an output or log folder that is a file, a job server that is no URL
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    v = str(tmp_path)
    for bad, message in ((Schedule(v, str(clip)), "is a file"), (Schedule(v, "o", log_dir=str(clip)), "--log-dir"),
                         (Schedule(v, "o", log_dir="s3://bucket/logs"), "--log-dir.* is a URL"),
                         (Schedule(v, "o", submit_address="head:8265"), "the Ray job server's URL"),
                         (Schedule(f"{v}/vidoes", "o"), "vidoes' does not exist"),  # (a typo failed every night)
                         (Schedule(f"{v}/nope/**/*.mp4", "o"), "the folder .*nope' it matches in does not exist"),
                         (Schedule(f"{v}/list.csv", "o"), "no such manifest file")):
        with pytest.raises(ValueError, match=message):
            bad.check()
    Schedule(v, "o", submit_address="http://head:8265").check()
    Schedule("s3://bucket/videos", "o").check()  # (a bucket is the run's to reach, with its credentials)
    # a log or output folder this user cannot write (faked: root may write anywhere) failed every night,
    # its log going nowhere
    import pipeline.output_checks

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.output_checks.os, "access",
                      lambda path, mode: str(path) != str(locked) and access(path, mode))
        for bad, message in ((Schedule(v, "o", log_dir=str(locked / "logs")), r"log folder .*\(--log-dir\) cannot "
                              rf"be written by this user \({locked}, where it would be made\)"),
                             (Schedule(v, str(locked)), r"output .* cannot be written by this user: name a folder")):
            with pytest.raises(ValueError, match=message):
                bad.check()
    for url in (f"file://{tmp_path}/out", f"file:{tmp_path}/out"):  # the folder, not ./file:/...
        assert f" --out {tmp_path}/out " in Schedule(f"file://{tmp_path}/v", url, log_dir=str(tmp_path)).cron_entry()
    # a log folder with a space and a %: quoted, and % escaped for cron (else a newline) and systemd
    odd = Schedule("videos 50%", "out", log_dir="/var/log/vid lens 50%")
    assert " mkdir -p '/var/log/vid lens 50\\%' && " in odd.cron_entry() and " 50%" not in odd.cron_entry()
    service = odd.systemd_units()[f"{odd.name}.service"]
    assert 'ExecStartPre=/bin/mkdir -p "/var/log/vid lens 50%%"\n' in service
    assert "Description=vidlens incremental run: videos 50%% -> out\n" in service


def test_the_nightly_job_reads_from_where_schedule_checked_and_no_line_break_splits_its_cron_line(
        tmp_path, monkeypatch, capsys):
    """cron and systemd start the job without the shell's variables: a run whose models were in
    HF_HOME's cache failed every night (exit 2). Secrets are named, never written. A newline in a
    path ended the crontab's line, and the rest of it was a job of its own, every minute."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf cache"))
    monkeypatch.setenv("AWS_PROFILE", "nightly")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    (tmp_path / "videos").mkdir()
    schedule = Schedule(str(tmp_path / "videos"), str(tmp_path / "out"), log_dir=str(tmp_path / "logs"))
    schedule.check()
    assert "AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err
    for line in (schedule.cron_entry(), schedule.shell_line()):
        assert f" && AWS_PROFILE=nightly HF_HOME='{tmp_path}/hf cache' " in line and "s3cr3t" not in line
    # the line run as cron runs it, with no variables but PATH, its command one that prints HF_HOME
    monkeypatch.setattr("pipeline.schedule.vidlens_executable",
                        lambda: [sys.executable, "-c", "import os; print(os.environ['HF_HOME'])"])
    done = subprocess.run(["/bin/sh", "-c", schedule.shell_line().split(" >> ")[0]], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert done.stdout.strip() == str(tmp_path / "hf cache"), done.stderr
    crontab_split = Schedule(str(tmp_path / "v\n* * * * * touch pwned #"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"the source .* holds a line break.*--systemd"):
        crontab_split.cron_entry()
    crontab_split.systemd_units()  # (systemd's line is escaped: test_a_systemd_unit_hands_odd_paths_...)


def test_a_line_break_in_the_submit_address_adds_no_cron_job(tmp_path):
    """`--submit` is written into the crontab line too: an address holding a newline ended the
    job's line there, and the rest ("* * * * * touch pwned #") was installed as a job of its own,
    run every minute (found in a security review)."""
    schedule = Schedule(str(tmp_path / "v"), "s3://media/out",
                        submit_address="http://head:8265\n* * * * * touch pwned #")
    with pytest.raises(ValueError, match=r"--submit .* holds a line break, where cron would end the job.s line: "
                                         "give it without one$"):
        schedule.cron_entry()
    service = schedule.systemd_units()[f"{schedule.name}.service"]  # (escaped there)
    assert not any(line.startswith("*") for line in service.splitlines())


def _as_systemd_reads(word: str) -> str:
    """One double-quoted word of an `Exec*` line as systemd hands it to the program: `%`
    specifiers resolved when the unit loads (only `%%` may appear here), then the quotes and C
    escapes undone, then `$` variables replaced at start (only `$$` may appear here)."""
    assert word[0] == word[-1] == '"'
    assert "%" not in word.replace("%%", ""), "a % specifier systemd would replace"
    text, at = "", 1
    word = word.replace("%%", "%")
    while at < len(word) - 1:
        if word[at] == "\\":
            text += {"\\": "\\", '"': '"', "n": "\n", "r": "\r"}[word[at + 1]]
            at += 2
            continue
        assert word[at] != '"', "a quote systemd would end the word at"
        text += word[at]
        at += 1
    assert "$" not in text.replace("$$", ""), "a $ variable systemd would replace"
    return text.replace("$$", "$")


def test_a_systemd_unit_hands_odd_paths_to_the_shell_unchanged(tmp_path):
    """systemd undoes C escapes and replaces `$NAME`/`${NAME}` inside quotes too: a folder named
    with a backslash or a `$` reached the nightly shell line changed (the run read another folder)."""
    odd = "vid \\lens $HOME ${USER} 50% \"q\" it's"
    schedule = Schedule(str(tmp_path / odd / "videos"), str(tmp_path / odd / "out"), log_dir=str(tmp_path / odd / "logs"))
    service = schedule.systemd_units()[f"{schedule.name}.service"]
    lines = dict(line.split("=", 1) for line in service.splitlines() if line.startswith("Exec"))
    assert lines["ExecStartPre"].startswith("/bin/mkdir -p ")
    assert _as_systemd_reads(lines["ExecStartPre"][len("/bin/mkdir -p "):]) == str(tmp_path / odd / "logs")
    assert lines["ExecStart"].startswith("/bin/sh -c ")
    assert _as_systemd_reads(lines["ExecStart"][len("/bin/sh -c "):]) == schedule.shell_line()
    words = shlex.split(schedule.shell_line())  # and the shell reads the paths as they are
    assert str(tmp_path / odd / "videos") in words and str(tmp_path / odd / "out") in words
    # a newline in a path: no line of the unit begins inside it
    injected = Schedule(str(tmp_path / "v\nExecStartPost=/bin/false"), str(tmp_path / "out")).systemd_units()
    assert not any(line.startswith("ExecStartPost") for text in injected.values() for line in text.splitlines())
    if shutil.which("systemd-analyze"):  # where systemd is installed, it finds nothing to warn of
        (tmp_path / "u.service").write_text(service)
        checked = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "u.service")],
                                 capture_output=True, text=True)
        assert checked.returncode == 0 and "escape" not in checked.stderr and "quot" not in checked.stderr, checked.stderr


def test_a_carriage_return_in_a_path_adds_no_line_to_a_systemd_unit(tmp_path):
    """systemd ends a unit file's line at a carriage return as at a newline: a bucket prefix named
    "x<CR>[Service]<CR>ExecStartPost=..." gave the unit lines of its uploader's choosing (systemd 252
    refused the whole unit, its own ExecStart cut in two; found in a security review)."""
    source = "s3://bucket/x\r[Service]\rExecStartPost=/bin/touch pwned\r"
    schedule = Schedule(source, str(tmp_path / "out"), log_dir=str(tmp_path / "logs\r[Unit]"))
    service = schedule.systemd_units()[f"{schedule.name}.service"]
    lines = re.split(r"\r\n|\r|\n", service)  # as systemd reads a unit file
    assert [line for line in lines if line.startswith("[")] == ["[Unit]", "[Service]"]
    assert not any(line.startswith("ExecStartPost") for line in lines)
    execs = dict(line.split("=", 1) for line in lines if line.startswith("Exec"))
    assert _as_systemd_reads(execs["ExecStart"][len("/bin/sh -c "):]) == schedule.shell_line()  # the path unchanged
    assert source in shlex.split(schedule.shell_line())
    if shutil.which("systemd-analyze"):
        (tmp_path / "u.service").write_text(service)
        checked = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "u.service")],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_a_schedule_is_named_by_the_absolute_paths_it_runs_on(tmp_path, monkeypatch):
    """`vidlens schedule videos --out out --install` in two projects installs two jobs, and
    `videos`, `./videos` and its absolute path one: the name hashed the paths as typed."""
    # guards against a second project's relative-path schedule silently replacing the first's crontab entry
    from pipeline.schedule import install_cron

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    crontab = bin_dir / "crontab"  # a stand-in that keeps the table in a file
    crontab.write_text(f'#!/bin/sh\nT={tmp_path}/table\n'
                       'if [ "$1" = -l ]; then [ -f $T ] && cat $T || exit 1; else cat > $T; fi\n')
    crontab.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    names = {}
    for project in ("a", "b"):
        (tmp_path / project / "videos").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / project)
        names[project] = Schedule("videos", "out").name
        assert install_cron(Schedule("videos", "out")).endswith("(added)")
        for same in ("./videos", f"{tmp_path / project}/videos", f"file://{tmp_path / project}/videos/"):
            assert Schedule(same, "./out/").name == names[project]
    assert names["a"] != names["b"]
    assert [line.rsplit("# ", 1)[1] for line in (tmp_path / "table").read_text().splitlines()] == [
        names["a"], names["b"]]
    # absolute paths and URLs keep the names they had: an entry installed with them is found again
    assert Schedule("/data/videos", "s3://bucket/out").name == "vidlens-5c339b5cef"
    assert Schedule("/data/videos", "/data/out").name == "vidlens-c430eef67f"
    assert Schedule("s3://bucket/videos", "s3://bucket/out").name == "vidlens-c8ae0e93dc"


def test_a_schedules_time_of_day_is_checked_to_the_minute(tmp_path):
    # an hour 24 or a minute 60 gave a crontab line cron refuses and a timer that never fires; 23:59 is a time
    assert Schedule("v", "o", at="23:59", environment={}).hour_minute() == (23, 59)
    assert Schedule("v", "o", at="0:00", environment={}).hour_minute() == (0, 0)
    assert Schedule("v", "o", at="0:59", environment={}).cron_entry().startswith("59 0 * * * ")
    for bad in ("24:00", "12:60", "2:5", "02:005"):
        with pytest.raises(ValueError, match="HH:MM"):
            Schedule("v", "o", at=bad, environment={}).hour_minute()


def test_the_nightly_line_runs_in_a_folder_whose_name_needs_quoting_and_a_submit_writes_no_summary(
        tmp_path, monkeypatch):
    """The folder `schedule` ran in is quoted in the line's `cd` (a project folder named with a space
    or a quote failed every night); `vidlens submit` takes no --summary-json: a submit line with it
    failed every night. A carriage return in a path is refused for cron as a newline is."""
    folder = tmp_path / "my project's"
    folder.mkdir()
    monkeypatch.setattr("pipeline.schedule.vidlens_executable",
                        lambda: [sys.executable, "-c", "import os; print(os.getcwd())"])
    schedule = Schedule("videos", "out", log_dir=str(tmp_path / "logs"), folder=str(folder), environment={})
    done = subprocess.run(["/bin/sh", "-c", schedule.shell_line().split(" >> ")[0]], capture_output=True, text=True)
    assert done.stdout.strip() == str(folder), done.stderr
    submits = Schedule("videos", "out", submit_address="http://head:8265", log_dir=str(tmp_path / "logs"),
                       environment={})
    assert "--summary-json" not in submits.shell_line() and "--summary-json" not in submits.cron_entry()
    assert f" >> {tmp_path}/logs/vidlens.log 2>&1" in submits.shell_line()
    with pytest.raises(ValueError, match="holds a line break"):
        Schedule(str(tmp_path / "v\r"), "out", environment={}).cron_entry()
    with pytest.raises(ValueError, match="the Ray job server's URL"):  # (a URL with no host)
        Schedule(str(tmp_path), "out", submit_address="http:///jobs", environment={}).check()


def test_a_crontab_that_refuses_the_entry_is_said_not_taken_as_installed(tmp_path, monkeypatch):
    from pipeline.schedule import install_cron

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    crontab = bin_dir / "crontab"  # no table yet, and a write refused (as cron's own check refuses a bad line)
    crontab.write_text('#!/bin/sh\nif [ "$1" = -l ]; then exit 1; fi\necho "errors in crontab file" >&2; exit 1\n')
    crontab.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match=r"crontab refused the entry \(errors in crontab file\)"):
        install_cron(Schedule("/data/videos", "/data/out", log_dir=str(tmp_path / "logs"), environment={}))


def test_publish_recover_views_lock_and_compact_on_an_s3_server(monkeypatch, capsys):
    from pipeline.cli import main
    from tests.s3server import s3_server

    with s3_server() as s3:
        url = f"s3://{s3.bucket}/out"
        store = Store(url, s3.storage_options)
        every = frozenset(FINGERPRINTS)

        def no_folders(*args, **kwargs):  # a bucket has none: s3fs's would create a bucket it may not see
            pytest.fail(f"makedirs on a bucket: {args}")

        for name in ("makedirs", "mkdir"):
            monkeypatch.setattr(type(store.fs), name, no_folders)
        with OutputLock(store, "first", heartbeat_s=0.2):
            with pytest.raises(LockedError, match="first"):
                OutputLock(Store(url, s3.storage_options), "second").__enter__()
            for batch, name in enumerate(["a.mp4", "b.mp4"]):
                _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref(name): (every, None)}, batch)
            _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("c.mp4"): (every, None)}, 2,
                     move=False)
        reader = Store(url, s3.storage_options)
        assert sum("/_vidlens/staging/" in f for f in reader.committed_files("videos")) == 1
        assert _views(reader).execute("select count(distinct video_id) from videos").fetchone()[0] == 3
        assert reader.recover()["files_moved"] == 3  # videos, captions and the attempts
        # and nothing more to recover: SeaweedFS lists the emptied staging folder, which is no crash
        assert reader.recover() == {}
        assert "recovered" not in capsys.readouterr().err
        # through the command line, as a user reaches a bucket: keys from the environment, endpoint flag
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        assert main(["compact", url, "--endpoint-url", s3.endpoint_url]) == 0
        assert f"compacted {url}" in capsys.readouterr().out
        after = Store(url, s3.storage_options)
        assert len(after.committed_files("videos")) == 1
        assert _views(after).execute("select count(*), count(distinct video_id) from videos").fetchone() == (3, 3)


def test_a_reader_registers_the_views_of_a_bucket_again_after_another_job_published(monkeypatch):
    """(chaos soak) A long-lived reader (a notebook) registers the views again after a run, as it
    should: the bucket's filesystem, shared within the process, held the listing of the run
    date's folder from the first time, and DuckDB looked each new file up in it ("No files
    found that match the pattern")."""
    from tests.s3server import s3_server

    with s3_server() as s3:
        url = f"s3://{s3.bucket}/out"
        run_id, every = "20240101T000000000000Z-aaaaaa", frozenset(FINGERPRINTS)
        writer = Store(url, s3.storage_options)
        writer.fs = s3.filesystem()  # another process's: this one's filesystem does not see it write
        _publish(writer, run_id, "2024-01-01", {_ref("a.mp4"): (every, None)}, batch=0)
        count = "select count(*) from videos"
        assert _views(Store(url, s3.storage_options)).execute(count).fetchone()[0] == 1
        _publish(writer, run_id, "2024-01-01", {_ref("b.mp4"): (every, None)}, batch=1)
        con = _views(Store(url, s3.storage_options))
        assert con.execute(count).fetchone()[0] == 2
        assert con.execute("select count(*) from _vidlens_attempts").fetchone()[0] == 2


def test_a_reader_in_one_process_reads_the_newest_snapshot_another_wrote(caplog):
    """(chaos soak) A bucket's filesystem, shared within a process, kept its listing of the
    snapshots: a long-lived reader registering the views again after later runs tried the
    snapshots they had deleted ("the ledger snapshot cannot be read", at every registration)
    and folded every manifest instead. (And a recovery in the same process finds the batch
    another process left staged.)"""
    import logging

    from tests.s3server import s3_server

    with s3_server() as s3:
        url = f"s3://{s3.bucket}/out"
        run_id, every = "20240101T000000000000Z-aaaaaa", frozenset(FINGERPRINTS)
        writer = Store(url, s3.storage_options)
        writer.fs = s3.filesystem()  # another process's
        _publish(writer, run_id, "2024-01-01", {_ref("a.mp4"): (every, None)}, batch=0)
        writer.write_snapshot()
        count = "select count(*) from videos"
        reader = Store(url, s3.storage_options)
        assert _views(reader).execute(count).fetchone()[0] == 1
        assert reader.recover() == {}  # (the staging folder, listed)
        for batch, name in enumerate(["b.mp4", "c.mp4"], start=1):  # the first snapshot deleted
            _publish(writer, run_id, "2024-01-01", {_ref(name): (every, None)}, batch=batch)
            writer.write_snapshot()
        later = "20240102T000000000000Z-bbbbbb"  # a run killed after its manifest
        _publish(writer, later, "2024-01-02", {_ref("d.mp4"): (every, None)}, batch=0, move=False)
        reader = Store(url, s3.storage_options)
        folded = []
        reader._read_json = lambda relative: folded.append(relative) or Store._read_json(reader, relative)
        with caplog.at_level(logging.WARNING):
            assert _views(reader).execute(count).fetchone()[0] == 4
        assert "cannot be read" not in caplog.text
        assert [f.rsplit("/", 1)[1] for f in folded] == [f"{later}-00000.json"]  # the newest snapshot's
        assert reader.recover()["files_moved"] == 3  # videos, captions and the attempts


def test_the_ledger_is_held_once_with_its_repeated_strings_shared(tmp_path):
    """A large output's ledger lives on the driver for the whole run: one copy, run ids shared."""
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    a, b = _ref("a.mp4"), _ref("b.mp4")
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {a: (every, None)}, batch=0)
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {b: (every, None)}, batch=1)
    store.write_snapshot()
    from_snapshot = Store(str(tmp_path / "out"))
    from_snapshot._read_json = lambda relative: pytest.fail(f"read {relative}, which the snapshot holds")
    for reader in (store, from_snapshot):  # folded from the manifests; read back from the snapshot
        ledger = reader.ledger_entries()
        assert ledger[a.uri]["core_run_id"] == "20240101T000000000000Z-aaaaaa"
        # each manifest (or snapshot row) brought its own copy of the run id and fingerprints: one is kept
        assert ledger[a.uri]["core_run_id"] is ledger[b.uri]["core_run_id"]
        assert ledger[a.uri]["core_fingerprint"] is ledger[b.uri]["core_fingerprint"]
        with pytest.raises(TypeError):
            ledger["/videos/c.mp4"] = dict(ledger[a.uri])  # the store's own entries: read-only
        assert reader.ledger_entries()[a.uri] is ledger[a.uri]  # not a copy


def test_the_ledger_holds_the_failure_of_its_failed_videos_once(tmp_path):
    """A night on which every video failed (expired credentials) leaves as many failures: one
    copy of each error type is kept, read from the manifests or from the snapshot."""
    run_id, out = "20240101T000000000000Z-aaaaaa", str(tmp_path / "out")
    for batch, name in enumerate(("a.mp4", "b.mp4")):
        task = VideoTask(ref=_ref(name), errors=[StageError("decode", "VideoDecodeError", "not a media file")])
        manifest = {"kind": "batch", "run_id": run_id, "batch": batch, "run_date": "2024-01-01",
                    "files": BatchWriter(Store(out), run_id, "2024-01-01").stage(batch),
                    "ledger": [entry_after(task, None, frozenset(FINGERPRINTS), run_id, FINGERPRINTS)]}
        Store(out).publish(manifest, f"{run_id}-{batch:05d}.json")
    from_manifests = Store(out).ledger_entries()
    Store(out).write_snapshot()
    for ledger in (from_manifests, Store(out).ledger_entries()):
        a, b = ledger[_ref("a.mp4").uri], ledger[_ref("b.mp4").uri]
        assert (a["status"], a["failure"]) == ("failed", "VideoDecodeError") and a["failure"] is b["failure"]


def test_an_output_written_before_bad_files_were_counted_loads_and_counts_a_failure_once(tmp_path, caplog):
    """Manifests and a snapshot without `bad_file_runs` (before 2026-12-06) are read as before,
    the count empty: a video failed as a whole there with a bad file's error counts once."""
    from pipeline.ledger import bad_file_runs

    run_id, out = "20240101T000000000000Z-aaaaaa", tmp_path / "out"

    def publish(batch: int, name: str) -> None:
        entry = _failed(_ref(name), run_id, None)
        del entry["bad_file_runs"]
        manifest = {"kind": "batch", "run_id": run_id, "batch": batch, "run_date": "2024-01-01",
                    "files": BatchWriter(Store(str(out)), run_id, "2024-01-01").stage(batch), "ledger": [entry]}
        Store(str(out)).publish(manifest, f"{run_id}-{batch:05d}.json")

    publish(0, "a.mp4")
    snapshot = out / "_vidlens" / "snapshots" / Store(str(out)).write_snapshot()
    pq.write_table(pq.read_table(snapshot).drop_columns(["bad_file_runs"]), snapshot)  # as older versions wrote it
    publish(1, "b.mp4")  # folded from its manifest after the snapshot
    entries = Store(str(out)).ledger_entries()
    for name in ("a.mp4", "b.mp4"):
        entry = entries[_ref(name).uri]
        assert (entry["status"], entry["bad_file_runs"], bad_file_runs(entry)) == ("failed", None, 1)
        assert decide(_ref(name), entry, FINGERPRINTS, give_up_after=2).label == "previously failed"
    ledger = Store(str(out)).ledger()  # (a reader's: the snapshot's rows as a table)
    assert ledger.column("bad_file_runs").to_pylist() == [None, None]
    assert ledger.schema.names == Store(str(out)).ledger(Store(str(out)).state()).schema.names
    assert "snapshot cannot be read" not in caplog.text  # (read, not passed over for the manifests)


def test_a_store_folds_its_own_batches_without_reading_them_back(tmp_path):
    """The end of a run reads no manifest it published (on a bucket: one GET per batch)."""
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    refs = [_ref(f"{i}.mp4") for i in range(3)]
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {refs[0]: (every, None)}, batch=0)
    ledger = store.ledger_entries()  # the state, cached
    store._read_json = lambda relative: pytest.fail(f"read {relative} back")
    for batch, ref in enumerate(refs[1:], start=1):
        _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {ref: (every, None)}, batch=batch)
    state = store.state()
    fresh = Store(str(tmp_path / "out")).state()  # what any reader folds from the files
    assert state.entries == fresh.entries and set(state.entries) == {ref.uri for ref in refs}
    assert state.files == fresh.files and state.folded == fresh.folded and state.upto == fresh.upto
    assert set(ledger) == {ref.uri for ref in refs}  # the run's ledger view follows its own batches

    # another writer's batch (not this store's) is found and folded from the file
    other = Store(str(tmp_path / "out"))
    _publish(other, "20240102T000000000000Z-bbbbbb", "2024-01-02", {_ref("x.mp4"): (every, None)})
    del store._read_json
    assert _ref("x.mp4").uri in store.state().entries


def test_recovery_deletes_the_temporary_files_killed_writes_left(tmp_path):
    # a snapshot's temporary holds the whole ledger: one a kill left before its rename stayed, with
    # the URIs of videos `vidlens forget` later took out everywhere else
    store = Store(str(tmp_path / "out"))
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (frozenset(FINGERPRINTS), None)})
    snapshot = store.write_snapshot()
    meta = tmp_path / "out" / "_vidlens"
    left = [meta / "snapshots" / f".tmp-0123abcd-{snapshot}", meta / "commits" / ".tmp-4567cdef-x.json"]
    for path in left:
        shutil.copy(meta / "snapshots" / snapshot, path)
    assert Store(str(tmp_path / "out")).recover() == {}  # (no batch, staging or file to finish)
    assert not any(path.exists() for path in left) and (meta / "snapshots" / snapshot).exists()


def test_a_snapshot_is_written_and_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    """A large ledger never sits whole in Arrow next to its entries: row groups of bounded size."""
    from pipeline import snapshot as snapshot_module

    monkeypatch.setattr(snapshot_module, "_SNAPSHOT_ROWS", 2)
    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    refs = [_ref(f"{i}.mp4") for i in range(5)]
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {ref: (every, None) for ref in refs})
    name = store.write_snapshot()
    snapshot = pq.ParquetFile(tmp_path / "out" / "_vidlens" / "snapshots" / name)
    assert snapshot.metadata.num_rows == 5 and snapshot.metadata.num_row_groups == 3
    reader = Store(str(tmp_path / "out"))
    reader._read_json = lambda relative: pytest.fail(f"read {relative}, which the snapshot holds")
    assert reader.state().entries == store.state().entries
    assert reader.state().files == store.state().files and reader.state().upto == store.state().upto
    assert reader.ledger().column("uri").to_pylist() == sorted(ref.uri for ref in refs)


def test_files_written_before_a_column_was_added_read_it_as_null(tmp_path, monkeypatch):
    import schemas.tables

    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    current = schemas.tables._COLUMNS["videos"]
    before = [f for f in current if f.name not in ("pixel_aspect", "hdr")]  # schema version 1
    monkeypatch.setitem(schemas.tables._COLUMNS, "videos", before)
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (every, None)})
    monkeypatch.setitem(schemas.tables._COLUMNS, "videos", current)
    query = "select uri, hdr, pixel_aspect from videos order by uri"
    # where no file has the column yet too (an output this version has not written to)
    assert _views(store).execute(query).fetchall() == [("/videos/a.mp4", None, None)]
    assert _views(store).execute("select typeof(pixel_aspect) from videos").fetchall() == [("DOUBLE",)]
    _publish(store, "20240101T010000000000Z-bbbbbb", "2024-01-01", {_ref("b.mp4"): (every, None)})
    rows = [("/videos/a.mp4", None, None), ("/videos/b.mp4", None, None)]
    assert _views(store).execute(query).fetchall() == rows
    counts = compact(str(tmp_path / "out"))
    assert (counts["files_after"], counts["attempts_files_after"]) == (2, 1)  # videos and captions; the attempts
    assert _views(Store(str(tmp_path / "out"))).execute(query).fetchall() == rows


def test_a_reader_takes_the_ledger_from_the_snapshot_as_a_table_not_as_entries(tmp_path, monkeypatch):
    """Made entries, a ledger of 2M videos took ~3 GB and ~30 s before a query ran; the views
    need it as a table: the snapshot's, less the videos folded (or forgotten) after it."""
    from pipeline import snapshot as snapshot_module
    from pipeline.forget import forget

    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    refs = [_ref(f"{i}.mp4") for i in range(4)]
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {ref: (every, None) for ref in refs})
    store.write_snapshot()
    ledger = store.ledger_entries()
    _publish(store, "20240102T000000000000Z-bbbbbb", "2024-01-02",  # folded after the snapshot
             {refs[0]: (frozenset({"captions"}), ledger[refs[0].uri]), _ref("new.mp4"): (every, None)})
    expected = Store(str(tmp_path / "out")).ledger()
    assert expected.num_rows == 5
    reader = Store(str(tmp_path / "out"))
    made, entry = [], snapshot_module._entry
    monkeypatch.setattr(snapshot_module, "_entry", lambda row: made.append(row["uri"]) or entry(row))
    assert reader.ledger().equals(expected) and reader.ledger().schema.equals(expected.schema)
    con = _views(reader)
    assert con.execute("select count(*) from ledger").fetchone()[0] == 5
    assert con.execute("select caption from captions where video_id = ?",
                       [refs[0].video_id]).fetchone()[0].endswith("bbbbbb")
    assert sorted(made) == sorted([refs[0].uri, _ref("new.mp4").uri])  # those of the manifest after the snapshot
    monkeypatch.undo()
    # a forget killed before its snapshot: its manifest is folded over the snapshot's rows
    monkeypatch.setattr(Store, "write_snapshot", lambda self, keep=2: None)
    forget(str(tmp_path / "out"), [refs[1].uri])
    monkeypatch.undo()
    assert Store(str(tmp_path / "out")).ledger().column("uri").to_pylist() == sorted(
        r.uri for r in [*refs, _ref("new.mp4")] if r != refs[1])


def _ids_on_disk(out) -> set:
    """The video ids of every Parquet file under `out` (the tables, the attempts, the ledger snapshots)."""
    ids = set()
    for path in out.rglob("*.parquet"):
        data = pq.read_table(path)
        if "video_id" in data.column_names:
            ids.update(data.column("video_id").to_pylist())
    return ids


def test_forgetting_a_named_video_keeps_those_gone_from_the_source_and_again_says_it_was(tmp_path):
    # without --missing, the videos the ledger marks missing are the user's to keep: a takedown of one
    # URI is not a purge; and its URI given again was forgotten already, not "not in" the output
    from pipeline.forget import forget
    from pipeline.ledger import missing_entry

    out = tmp_path / "out"
    store = Store(str(out))
    taken_down, gone = _ref("a.mp4"), _ref("b.mp4")
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01",
             {taken_down: (frozenset(FINGERPRINTS), None), gone: (frozenset(FINGERPRINTS), None)})
    listed = "20240102T000000000000Z-bbbbbb"  # the next night's listing no longer found b.mp4
    store.publish({"kind": "batch", "run_id": listed, "batch": 0, "run_date": "2024-01-02", "files": [],
                   "ledger": [missing_entry(store.ledger_entries()[gone.uri])]}, f"{listed}-00000.json")
    done = forget(str(out), [taken_down.uri])
    assert (done.videos, done.manifests_scrubbed, done.unknown, done.already) == (1, 1, [], [])
    assert Store(str(out)).ledger_entries()[gone.uri]["status"] == "missing"
    assert _ids_on_disk(out) >= {gone.video_id} and taken_down.video_id not in _ids_on_disk(out)
    again = forget(str(out), [taken_down.uri])
    assert (again.videos, again.unknown, again.already) == (0, [], [taken_down.uri])
    # back in the source, it is a new video: forgotten again, not "forgotten already"
    _publish(store, "20240103T000000000000Z-cccccc", "2024-01-03", {taken_down: (frozenset(FINGERPRINTS), None)})
    back = forget(str(out), [taken_down.uri])
    assert (back.videos, back.already) == (1, [])


def test_forgetting_the_missing_where_none_is_missing_reads_no_table_file(tmp_path, monkeypatch):
    # it read every file of the videos and errors tables to look up the ids of no URI, and the
    # pyarrow reads behind it aborted the command at its exit now and then (chaos soak, 2026-12-07)
    from pipeline.forget import forget

    out = tmp_path / "out"
    store = Store(str(out))
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01",
             {_ref("a.mp4"): (frozenset(FINGERPRINTS), None), _ref("b.mp4"): (frozenset(FINGERPRINTS), None)})
    import pyarrow as pa

    read = []

    def read_table(self, url, columns=None):
        read.append(url)
        return pa.table({"video_id": pa.array([], pa.string()), "uri": pa.array([], pa.string())})

    monkeypatch.setattr(Store, "read_table", read_table)
    done = forget(str(out), missing=True)
    assert (done.videos, done.unknown, done.already) == (0, [], [])
    assert read == []


def test_forget_compact_and_the_snapshot_read_no_python_file_on_arrows_own_threads(tmp_path, monkeypatch):
    # given the Python file, pyarrow read it on its own threads and let go of it (and of the bytes
    # read) there, a moment after the read returned: as the process exited, that aborted it
    # ("terminate called without an active exception", forget in a chaos soak, 2026-12-07)
    import threading

    from fsspec.implementations.local import LocalFileSystem

    from pipeline.forget import forget

    out = tmp_path / "out"
    store = Store(str(out))
    for n, run_id in enumerate(("20240101T000000000000Z-aaaaaa", "20240101T010000000000Z-bbbbbb")):
        _publish(store, run_id, "2024-01-01", {_ref(f"{n}.mp4"): (frozenset(FINGERPRINTS), None)}, batch=n)
    store.write_snapshot()
    callers = []

    class Watched:
        """An open file that notes the thread of each call on it."""

        def __init__(self, handle):
            self._handle = handle

        def __getattr__(self, name):
            found = getattr(self._handle, name)
            if not callable(found):
                return found

            def called(*args, **kwargs):
                callers.append(threading.current_thread())
                return found(*args, **kwargs)
            return called

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self._handle.close()

    opened = LocalFileSystem.open
    monkeypatch.setattr(LocalFileSystem, "open", lambda fs, path, mode="rb", **kwargs: (
        Watched(opened(fs, path, mode, **kwargs)) if mode == "rb" else opened(fs, path, mode, **kwargs)))
    done = forget(str(out), [str(tmp_path / "gone.mp4")])
    assert (done.videos, done.unknown) == (0, [str(tmp_path / "gone.mp4")])
    counts = compact(str(out))
    assert (counts["files_before"], counts["files_after"]) == (4, 2)
    assert Store(str(out)).state().entries.keys() == {_ref("0.mp4").uri, _ref("1.mp4").uri}
    assert callers
    # (a thread Python did not start, Arrow's, is a _DummyThread to Python)
    assert [t.name for t in callers if isinstance(t, threading._DummyThread)] == []


def _changed_video(out) -> tuple[VideoRef, VideoRef]:
    """One URI published twice, by runs of two dates, the second time changed (another video id)."""
    store = Store(str(out))
    first, changed = _ref("a.mp4"), _ref("a.mp4", version=2)
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {first: (frozenset(FINGERPRINTS), None)})
    _publish(store, "20240102T000000000000Z-bbbbbb", "2024-01-02",
             {changed: (frozenset(FINGERPRINTS), store.ledger_entries()[first.uri])})
    return first, changed


def test_forgetting_a_video_that_changed_takes_out_the_rows_of_each_of_its_ids(tmp_path):
    from pipeline.forget import forget

    first, changed = _changed_video(tmp_path / "out")
    assert first.video_id != changed.video_id and {first.video_id, changed.video_id} <= _ids_on_disk(tmp_path / "out")
    assert forget(str(tmp_path / "out"), [first.uri]).videos == 1
    assert not {first.video_id, changed.video_id} & _ids_on_disk(tmp_path / "out")


def test_a_forget_killed_after_its_other_tables_finishes_the_rows_of_each_id_of_a_changed_video(tmp_path, monkeypatch):
    # the tables that give a URI's earlier ids (videos, errors) are rewritten last, and the forget that
    # finishes a killed one looks the ids up there: the ledger has only the latest
    from pipeline import forget as forgetting

    first, changed = _changed_video(tmp_path / "out")
    rewrite, calls = forgetting._rewrite_without, []

    def killed_before_the_videos(*args):
        if len(calls) == 4:  # after the two files each of the attempts and captions
            raise KeyboardInterrupt
        calls.append(args[1]["table"])
        return rewrite(*args)

    monkeypatch.setattr(forgetting, "_rewrite_without", killed_before_the_videos)
    with pytest.raises(KeyboardInterrupt):
        forgetting.forget(str(tmp_path / "out"), [first.uri])
    monkeypatch.undo()
    assert sorted(calls) == ["attempts", "attempts", "captions", "captions"]
    # finished by the next command, a nightly run too: that one forgets nothing of its own
    assert Store(str(tmp_path / "out")).recover()["forgets_finished"] == 1
    assert not {first.video_id, changed.video_id} & _ids_on_disk(tmp_path / "out")


def test_a_snapshot_of_an_output_of_many_files_is_read_back(tmp_path):
    """Its footer holds every published file's record: past pyarrow's default limit (100 MB,
    ~180k files: a first run over ~700k videos, 32 a batch) every command on the output failed
    ("Couldn't deserialize thrift"). The records are also there once, not again in base64."""
    store = Store(str(tmp_path / "out"))
    _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref("a.mp4"): (frozenset(FINGERPRINTS), None)})
    long = "x" * 2000  # ~50k records of 2 KB: a 100 MB footer without the time of 250k real ones
    files = [{"table": "frames", "path": f"frames/run_date=2024-01-01/{long}-{i}.parquet", "staged": None,
              "rows": 1, "run_id": "20240101T000000000000Z-aaaaaa", "run_date": "2024-01-01"} for i in range(52_000)]
    store.publish({"kind": "batch", "run_id": "20240101T000000000000Z-aaaaaa", "batch": 1, "run_date": "2024-01-01",
                   "files": files, "ledger": []}, "20240101T000000000000Z-aaaaaa-00001.json")
    name = store.write_snapshot()
    del files
    reader = Store(str(tmp_path / "out"))
    reader._read_json = lambda relative: pytest.fail(f"read {relative}, which the snapshot holds")
    assert len(reader.state().files) == 52_000 + 3 and reader.ledger().num_rows == 1  # (videos, runs, attempts)
    footer = pq.ParquetFile(tmp_path / "out" / "_vidlens" / "snapshots" / name, thrift_string_size_limit=2**31 - 1)
    assert footer.metadata.serialized_size > 100 * 2**20 and b"ARROW:schema" not in footer.metadata.metadata


def test_compacting_again_with_fewer_rows_a_file_splits_a_dates_one_file(tmp_path, capsys):
    """A date compacted into one file per table was left as it was, whatever --rows-per-file
    (a date of thumbnails compacted with the default: ~2.5 GB a file), saying "0 files -> 0"."""
    from pipeline.cli import main

    store = Store(str(tmp_path / "out"))
    for n, run_id in enumerate(("20240101T000000000000Z-aaaaaa", "20240101T010000000000Z-bbbbbb")):
        _publish(store, run_id, "2024-01-01", {_ref(f"{n}{i}.mp4"): (frozenset(FINGERPRINTS), None) for i in range(3)})
    out = str(tmp_path / "out")
    before = _views(store).execute("select * from captions order by all").fetchall()
    assert main(["compact", out]) == 0
    assert "compacted" in capsys.readouterr().out and len(Store(out).committed_files("captions")) == 1
    assert main(["compact", out]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to compact in {out}: its 2 files are as few as their "
                                              "rows allow")  # (videos and captions)
    assert main(["compact", out, "--rows-per-file", "2"]) == 0  # 6 captions: 3 files
    assert "compacted" in capsys.readouterr().out and len(Store(out).committed_files("captions")) == 3
    # as few files as their rows allow: not rewritten every time
    assert main(["compact", out, "--rows-per-file", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to compact in {out}: its 6 files are as few as their "
                                              "rows allow, at most 2 rows a file")
    assert _views(Store(out)).execute("select * from captions order by all").fetchall() == before
    assert main(["compact", out, "--run-date", "2020-01-01"]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to compact in {out}: no files of run date 2020-01-01")


def test_compaction_holds_a_file_at_a_time_and_lists_each_table_once(tmp_path, monkeypatch):
    """A date's rows can be far more than memory (a first run's frames of 2M videos: ~64 GB): the
    rows of one input file and of one new file are held, never the date's."""
    import pyarrow as pa

    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    for day in ("2024-01-01", "2024-01-02"):
        run_id = f"{day.replace('-', '')}T000000000000Z-aaaaaa"
        for batch in range(10):
            writer = BatchWriter(store, run_id, day)
            entries = []
            for n in range(20):
                ref = _ref(f"{day}-{batch}-{n}.mp4")
                keys = {"video_id": ref.video_id, "run_id": run_id, "config_fingerprint": "f"}
                writer.add("videos", [{**keys, "uri": ref.uri, "status": "ok", "processed_at": _now()}])
                writer.add("captions", [{**keys, "level": "segment", "segment_index": i, "caption": f"{i:04d}" * 500}
                                        for i in range(10)])  # 2 KB each, 400 KB a file
                writer.attempted(ref.video_id, every)
                entries.append(_entry(ref, run_id))
            store.publish({"kind": "batch", "run_id": run_id, "batch": batch, "run_date": day,
                           "files": writer.stage(batch), "ledger": entries}, f"{run_id}-{batch:05d}.json")
    query = "select * from {} order by all"
    views = ("videos", "captions", "captions_history", "_vidlens_attempts")
    before = {v: _views(store).execute(query.format(v)).fetchall() for v in views}
    held, listed = [], []
    read_table, committed_files = pq.read_table, Store.committed_files

    def reading(*args, **kwargs):
        table = read_table(*args, **kwargs)
        held.append(pa.total_allocated_bytes())
        return table

    monkeypatch.setattr(pq, "read_table", reading)
    monkeypatch.setattr(Store, "committed_files",
                        lambda self, table, state=None: listed.append(table) or committed_files(self, table, state))
    counts = compact(str(tmp_path / "out"), rows_per_file=400)
    monkeypatch.undo()
    # a date's 10 files each of videos, captions and attempts; after, 2000 captions a date: 5 files
    assert counts["files_before"] == 2 * 2 * 10 and counts["files_after"] == 2 * (1 + 5)
    assert counts["attempts_files_before"] == 2 * 10 and counts["attempts_files_after"] == 2
    assert max(held) < 3 * 2**20  # a date's captions are 4 MB
    assert sorted(listed) == ["attempts", "captions", "videos"]
    assert {v: _views(Store(str(tmp_path / "out"))).execute(query.format(v)).fetchall() for v in views} == before


def test_read_ahead_gives_results_in_order_within_its_bounds_and_raises_in_turn():
    import threading
    import time

    from pipeline.read_ahead import read_ahead

    lock, under_way, most = threading.Lock(), set(), []

    def read(item: int) -> int:
        with lock:
            under_way.add(item)
            most.append(set(under_way))
        time.sleep(0.01)
        with lock:
            under_way.discard(item)
        if item == 13:
            raise OSError("item 13 unreadable")
        return item * 2

    assert list(read_ahead(read, range(12), at_once=4)) == [i * 2 for i in range(12)]
    assert max(map(len, most)) == 4
    most.clear()
    # 10 bytes each, 25 ahead: the one waited for and two after it
    assert list(read_ahead(read, range(12), sizes={i: 10 for i in range(12)}, bytes_ahead=25)) == [i * 2 for i in range(12)]
    assert max(map(len, most)) == 3
    most.clear()
    sizes = {i: 100 if i == 5 else 10 for i in range(12)}  # larger than all that may be ahead
    assert list(read_ahead(read, range(12), sizes=sizes, bytes_ahead=25)) == [i * 2 for i in range(12)]
    assert {5} in most and not any(5 in seen and min(seen) < 5 for seen in most)  # read once those before are
    got = []
    with pytest.raises(OSError, match="item 13"):
        for result in read_ahead(read, range(10, 20), at_once=4):
            got.append(result)
    assert got == [20, 22, 24]


def test_compaction_reads_several_files_at_once(tmp_path, monkeypatch):
    """On a bucket each file read waits a round trip: read one at a time, 60,000 files took an hour a pass."""
    import threading
    import time

    store = Store(str(tmp_path / "out"))
    every = frozenset(FINGERPRINTS)
    for batch in range(12):
        _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", {_ref(f"{batch}.mp4"): (every, None)}, batch)
    query = "select * from {} order by all"
    before = {v: _views(store).execute(query.format(v)).fetchall() for v in ("videos", "captions_history")}
    lock, under_way, most = threading.Lock(), [0], [0]
    open_url = Store.open_url

    class Slow:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            with lock:
                under_way[0] += 1
                most[0] = max(most[0], under_way[0])
            time.sleep(0.02)  # a bucket's round trip
            return self.handle.__enter__()

        def __exit__(self, *exc):
            with lock:
                under_way[0] -= 1
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(Store, "open_url", lambda self, url: Slow(open_url(self, url)))
    assert compact(str(tmp_path / "out"))["files_after"] == 2
    monkeypatch.undo()
    assert most[0] > 4
    assert {v: _views(Store(str(tmp_path / "out"))).execute(query.format(v)).fetchall()
            for v in ("videos", "captions_history")} == before


def test_a_bucket_store_stages_and_moves_a_batchs_files_at_once(monkeypatch):
    """Each request to a bucket waits a round trip: a batch's dozen files staged and moved one
    after another cost a run's driver 2.2 s a batch at 20 ms a request (`bench.outputs`)."""
    import importlib
    import threading
    import time

    from fsspec.implementations.memory import MemoryFileSystem

    lock, under_way, most = threading.Lock(), Counter(), Counter()

    def slow(kind: str, call):
        def waiting(*args, **kwargs):
            with lock:
                under_way[kind] += 1
                most[kind] = max(most[kind], under_way[kind])
            time.sleep(0.02)
            try:
                return call(*args, **kwargs)
            finally:
                with lock:
                    under_way[kind] -= 1
        return waiting

    class SlowBucket(MemoryFileSystem):  # a bucket whose writes and copies each wait 20 ms
        protocol = "slowstore"
        root_marker = ""
        store: dict = {}
        pseudo_dirs = [""]
        _open = slow("write", MemoryFileSystem._open)
        cp_file = slow("move", MemoryFileSystem.cp_file)

    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "slowstore", SlowBucket)
    store = Store("slowstore://bucket/out")
    assert not store.is_local
    videos = {_ref(f"{n}.mp4"): (frozenset(FINGERPRINTS), None) for n in range(3)}
    manifest = _publish(store, "20240101T000000000000Z-aaaaaa", "2024-01-01", videos)
    assert len(manifest["files"]) == 3 and most["write"] == most["move"] == 3  # videos, captions, attempts
    assert sorted(store.committed_files("captions")) == [store.url(r["path"]) for r in manifest["files"]
                                                          if r["table"] == "captions"]
    assert not store.fs.find(store.path("_vidlens", "staging"))


def test_a_run_publishes_its_batches_on_threads_while_the_next_fills_three_at_a_time_in_order(tmp_path, monkeypatch):
    """On a bucket a batch's publish waits tenths of a second of round trips, which the driver
    spent idle while the workers' finished videos waited for it; and the next batch's files were
    written only once its staged copies were deleted: at 60 ms a request, seven round trips in
    a row a batch, longer than a run took to fill one."""
    import threading

    from pipeline.publisher import BATCHES_AT_ONCE, Publisher

    run_id = "20240101T000000000000Z-aaaaaa"
    store = Store(str(tmp_path / "out"))
    publisher = Publisher(store, run_id, "2024-01-01", RunConfig.from_dict({"output": {"commit_every_videos": 1}}))
    release, published, publish = threading.Event(), [], Store.publish
    removing, removed, remove = threading.Event(), threading.Event(), Store.remove

    def slow(self, manifest, name, later=None):
        release.wait(10)
        published.append(name)
        if name.endswith("00003.json"):
            raise OSError("the bucket refused it")
        publish(self, manifest, name, later)

    def slow_remove(self, paths):
        if not removing.is_set():  # the first batch's staged copies: deleted while the next is published
            removing.set()
            removed.wait(10)
        remove(self, paths)

    def staged() -> list[str]:
        return sorted(p.name for p in (tmp_path / "out" / "_vidlens" / "staging").rglob("part-*.parquet"))

    def waited(until, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(Store, "publish", slow)
    monkeypatch.setattr(Store, "remove", slow_remove)
    assert BATCHES_AT_ONCE == 3
    for name in ("a.mp4", "b.mp4", "c.mp4"):  # each returns with its batch being published ...
        _add_video(publisher, name, run_id)
    waited(lambda: len(staged()) == 6)  # ... the later ones' files written meanwhile (videos and attempts)
    assert staged() == sorted(f"part-{run_id}-{batch:05d}-00.parquet" for batch in (0, 0, 1, 1, 2, 2))
    assert published == []
    adding = threading.Thread(target=_add_video, args=(publisher, "d.mp4", run_id))
    adding.start()
    adding.join(0.3)
    assert adding.is_alive() and published == []  # a fourth batch waits for the first
    release.set()
    waited(lambda: len(published) == 3)
    # the next two published once the first was in place, its staged copies being deleted
    assert removing.is_set() and published == [f"{run_id}-{n:05d}.json" for n in range(3)]
    assert adding.is_alive()  # (the fourth waits for them to be)
    removed.set()
    adding.join(10)
    with pytest.raises(OSError, match="refused"):  # its error raised with a later batch, none published after it
        for name in ("e.mp4", "f.mp4", "g.mp4"):
            _add_video(publisher, name, run_id)
    publisher.close()
    assert published == [f"{run_id}-{n:05d}.json" for n in range(4)]
    assert sorted(Store(str(tmp_path / "out")).ledger_entries()) == [f"/videos/{v}.mp4" for v in "abc"]


def test_a_batch_is_published_once_it_is_old_enough_and_the_next_one_is_timed_from_then(tmp_path, monkeypatch):
    """`output.commit_every_s`: a slow run's finished videos are published every so often however
    few they are (a run killed after an hour lost only the last minutes); the next batch's age
    counts from that publish, not from the run's start (each video then made a batch of its own)."""
    import types

    from pipeline import publisher as publishing

    clock = [1000.0]
    monkeypatch.setattr(publishing, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    run_id = "20240101T000000000000Z-aaaaaa"
    store = Store(str(tmp_path / "out"))
    config = RunConfig.from_dict({"output": {"commit_every_videos": 100, "commit_every_s": 60}})
    publisher = publishing.Publisher(store, run_id, "2024-01-01", config)
    try:
        clock[0] += 59
        _add_video(publisher, "a.mp4", run_id)
        assert publisher.batch == 0  # (young, and far from full)
        clock[0] += 1
        _add_video(publisher, "b.mp4", run_id)
        assert publisher.batch == 1
        clock[0] += 59
        _add_video(publisher, "c.mp4", run_id)  # the next batch opened 59 s ago
        assert publisher.batch == 1
        publisher.wait()
        assert sorted(Store(str(tmp_path / "out")).ledger_entries()) == ["/videos/a.mp4", "/videos/b.mp4"]
    finally:
        publisher.close()


def test_a_publisher_on_a_bucket_deletes_each_batchs_staged_copies_or_leaves_them_to_recovery(monkeypatch):
    """On a bucket a batch's staged copies are deleted while the next batch is published: none
    is left once the run is done; a run killed before it left them, and recovery copies them
    into place again and deletes them, each video once."""
    from pipeline.publisher import Publisher
    from tests.s3server import s3_server

    def run(store: Store, run_id: str, names: str) -> None:
        publisher = Publisher(store, run_id, "2024-01-01", RunConfig.from_dict({"output": {"commit_every_videos": 1}}))
        for name in names:
            _add_video(publisher, f"{name}.mp4", run_id)
        publisher.wait()
        publisher.close()

    with s3_server() as s3:
        store = Store(f"s3://{s3.bucket}/out", s3.storage_options)

        def staged() -> list[str]:  # (SeaweedFS lists an emptied folder as an object of its own)
            store.fs.invalidate_cache()
            return [path for path in store.fs.find(store.path("_vidlens", "staging")) if path.endswith(".parquet")]

        run(store, "20240101T000000000000Z-aaaaaa", "abcd")
        assert staged() == [] and len(store.committed_files("videos")) == 4
        published = store.fs._strip_protocol(store.committed_files("videos")[0])
        with monkeypatch.context() as no_lookups:  # a copy is one request: s3fs's cp_file looked the size up first
            no_lookups.setattr(type(store.fs), "_info", lambda *args, **kwargs: pytest.fail("a HEAD before the copy"))
            store._copy(published, store.path("copied.parquet"))
        assert store.fs.cat_file(store.path("copied.parquet")) == store.fs.cat_file(published)
        with pytest.raises(FileNotFoundError):
            store._copy(store.path("missing.parquet"), store.path("copied.parquet"))
        with monkeypatch.context() as killed:  # as if the driver were killed after each batch's copy
            killed.setattr(Store, "remove", lambda self, paths: None)
            run(store, "20240102T000000000000Z-bbbbbb", "e")
        assert len(staged()) == 2  # its videos and attempts
        reader = Store(f"s3://{s3.bucket}/out", s3.storage_options)
        assert reader.recover()["files_moved"] == 2
        assert staged() == []
        assert _views(reader).execute("select count(*), count(distinct video_id) from videos").fetchone() == (5, 5)


def test_recovery_reads_no_manifest_of_a_run_whose_staging_folder_is_empty(tmp_path, monkeypatch):
    """A bucket server that keeps empty folders (SeaweedFS) lists every finished run's staging
    folder: recovery read each of their manifests again, seconds of every command on a bucket."""
    run_id = "20240101T000000000000Z-aaaaaa"
    store = Store(str(tmp_path / "out"))
    for batch in range(3):
        _publish(store, run_id, "2024-01-01", {_ref(f"{batch}.mp4"): (frozenset(FINGERPRINTS), None)}, batch)
    assert (tmp_path / "out" / "_vidlens" / "staging" / run_id).is_dir()  # empty, still listed
    moved, move_into_place = [], Store.move_into_place
    monkeypatch.setattr(Store, "move_into_place", lambda self, *args, **kwargs: moved.append(args) or
                        move_into_place(self, *args, **kwargs))
    assert Store(str(tmp_path / "out")).recover() == {}
    assert moved == []
    assert not (tmp_path / "out" / "_vidlens" / "staging" / run_id).exists()


def test_a_finished_runs_empty_staging_folder_is_removed_and_only_its_own(tmp_path):
    first, second = "20240101T000000000000Z-aaaaaa", "20240102T000000000000Z-bbbbbb"
    store = Store(str(tmp_path / "out"))
    for run_id in (first, second):
        _publish(store, run_id, "2024-01-01", {_ref(f"{run_id}.mp4"): (frozenset(FINGERPRINTS), None)})
    staging = tmp_path / "out" / "_vidlens" / "staging"
    assert (staging / first).is_dir() and not any((staging / first).rglob("*.parquet"))  # moved into place
    store.drop_staging(first)
    assert sorted(p.name for p in staging.iterdir()) == [second]
    store.drop_staging(first)  # (gone already: nothing to do)
    assert _views(store).execute("select count(*) from videos").fetchone()[0] == 2


def test_read_ahead_lets_a_result_go_once_its_caller_does():
    """Compaction decodes a file's bytes and drops them before the next: a name inside read_ahead
    held them on, beside the next file's."""
    import gc
    import weakref

    from pipeline.read_ahead import read_ahead

    class Whole:  # a file's bytes (bytes themselves take no weak reference)
        def __init__(self, size: int):
            self.data = b"x" * size

    alive = []
    for whole in read_ahead(Whole, [10, 20, 30], sizes={10: 10, 20: 20, 30: 30}, bytes_ahead=25):
        alive.append(weakref.ref(whole))
        del whole
        gc.collect()
        assert alive[-1]() is None


def test_a_runs_publisher_finishes_the_batch_being_published_before_it_lets_the_run_end(tmp_path, monkeypatch):
    """The run's lock is given back once the publisher is closed: closed mid-publish by a second
    Ctrl-C or SIGTERM, another job could take the lock and recover (delete) the batch's staging
    under it, and the videos the ledger then holds had rows under neither name."""
    import signal
    import threading

    from pipeline.publisher import Publisher

    from pipeline import publisher as publishing

    run_id = "20240101T000000000000Z-aaaaaa"
    store = Store(str(tmp_path / "out"))
    publisher = Publisher(store, run_id, "2024-01-01", RunConfig.from_dict({"output": {"commit_every_videos": 1}}))
    # in turn, whatever the machine's load: the batch is being published and close() waits on it,
    # then the stop comes, then (once it was handled) the batch's publishing ends
    publishing_it, waiting, handled, release = (threading.Event() for _ in range(4))
    publish, wait = Store.publish, publishing.futures.wait

    def slow(self, manifest, name, later=None):
        publishing_it.set()
        release.wait(30)
        publish(self, manifest, name, later)

    def waits(*args, **kwargs):
        waiting.set()
        return wait(*args, **kwargs)

    def stop(signum, frame):
        handled.set()
        raise SystemExit(143)  # as the command line's SIGTERM handler does

    def stopper(main):
        if publishing_it.wait(30) and waiting.wait(30):
            signal.pthread_kill(main, signal.SIGUSR1)
            handled.wait(30)
            time.sleep(0.5)  # (a close() that did not wait on would have returned by now)
        release.set()

    monkeypatch.setattr(Store, "publish", slow)
    monkeypatch.setattr(publishing.futures, "wait", waits)
    ref = _add_video(publisher, "a.mp4", run_id)
    before = signal.signal(signal.SIGUSR1, stop)
    try:
        threading.Thread(target=stopper, args=(threading.get_ident(),), daemon=True).start()
        with pytest.raises(SystemExit):
            publisher.close()  # stopped while it waits: it waits on, then raises
        assert handled.is_set() and release.is_set()
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert list(Store(str(tmp_path / "out")).ledger_entries()) == [ref.uri]
    assert not list((tmp_path / "out" / "_vidlens" / "staging").rglob("*.parquet"))


def test_a_bucket_lock_taken_over_is_not_written_over_and_nothing_more_is_published():
    """A job paused past the stale time finds another job's lock in its place: its heartbeat
    would have written over it (both jobs held it), and its next batch published beside the
    other job's (whose recovery had deleted its staged files)."""
    store = Store("memory://vidlens-lock-taken/out")
    lock_path = store.path("_vidlens", "lock")
    other = {"host": "elsewhere", "pid": 7, "pids": "", "run_id": "other", "heartbeat": time.time()}
    with OutputLock(store, "paused", heartbeat_s=0.05) as lock:
        store.publish({"kind": "batch", "files": [], "ledger": []}, "paused-00000.json")  # held: published
        store.fs.pipe_file(lock_path, json.dumps(other).encode())  # the other job's takeover
        deadline = time.monotonic() + 20  # (a heartbeat's thread may wait for the CPU on a loaded machine)
        while time.monotonic() < deadline:
            try:
                lock.check()
            except LockedError:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # (heartbeats after it: none writes)
        assert json.loads(store.fs.cat_file(lock_path))["run_id"] == "other"
        with pytest.raises(LockedError, match=r"lock of run paused was taken over by run other \(host elsewhere"):
            store.publish({"kind": "batch", "files": [], "ledger": []}, "paused-00001.json")
    assert json.loads(store.fs.cat_file(lock_path))["run_id"] == "other"  # not removed as this job's on exit
    assert [name.rsplit("/", 1)[-1] for name in store.fs.ls(store.path("_vidlens", "commits"), detail=False)] == ["paused-00000.json"]
    store.publish({"kind": "batch", "files": [], "ledger": []}, "later-00000.json")  # no lock held: no check


def test_a_compaction_whose_lock_was_taken_over_is_told_to_run_compact_again():
    """(mutation review) A compaction paused past the stale time is called one, and told what its
    own command does once the other job is done, not a run's words."""
    from pipeline.store import time_ordered_id

    store, compaction = Store("memory://vidlens-compaction-taken/out"), time_ordered_id("compact")
    run = {"host": "elsewhere", "pid": 7, "pids": "", "run_id": time_ordered_id("a1b2c3"), "heartbeat": time.time()}
    with OutputLock(store, compaction, heartbeat_s=0.05) as lock:
        store.fs.pipe_file(store.path("_vidlens", "lock"), json.dumps(run).encode())  # the run's takeover
        # (a heartbeat's thread may wait for the CPU on a loaded machine)
        message, deadline = "(never found taken over)", time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                lock.check()
            except LockedError as taken:
                message = str(taken)
                break
            time.sleep(0.05)
    assert message.startswith(f"{store.out}: the lock of compaction {compaction} was taken over by run "
                              f"{run['run_id']} (host elsewhere, pid 7)")
    assert message.endswith("once the other job is done, run the same vidlens compact again.")


def test_an_id_made_on_a_clock_behind_sorts_after_the_newest_manifest_whatever_its_suffix():
    # the clock-behind test passed without the microsecond added, as its run's suffix sorted below "compact"
    from pipeline.store import time_ordered_id

    for newest in ("29990101T000000000000Z-ffffff-00000.json", "29990101T000000000000Z-aaaaaa-00000.json"):
        made = time_ordered_id("compact", after=newest)
        assert made > newest and made.startswith("29990101T000000000001Z-"), made
