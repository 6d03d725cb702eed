"""Nightly incremental runs end to end with tiny models: skip, redo, rerun one stage, survive SIGKILL, lock."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.cli import main
from pipeline.job import dry_run, run_job
from pipeline.store import Store
from pipeline.summary import EXIT_FAILED
from schemas.config import RunConfig

STAGES = ["embed", "objects", "captions"]


def _config(tiny_models, **output):
    return RunConfig.from_dict({
        "models": tiny_models, "stages": STAGES, "captions": {"max_new_tokens": 3},
        "output": {"thumbnails": False, **output},
        "resources": {"executor": "local", "videos_per_batch": 2},
    })


def _latest(out: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    Store(str(out)).register_duckdb(con)
    return con


def _videos(folder: Path, count: int, source: Path) -> None:
    """`count` small videos (copies of the synthetic clips under new names)."""
    clips = sorted(p for p in source.rglob("*") if p.suffix in (".mp4", ".mkv"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        clip = clips[i % len(clips)]
        shutil.copy(clip, folder / f"clip{i:02d}{clip.suffix}")


def test_incremental_runs_do_only_what_is_new_changed_or_reconfigured(tmp_path, synthetic_clips, tiny_models,
                                                                      capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 3, synthetic_clips)
    config = _config(tiny_models, commit_every_videos=2)
    first = run_job(str(videos), str(out), config, progress=False)
    assert first.reasons == {"new": 3} and first.counts["videos_ok"] == 3

    second = run_job(str(videos), str(out), config, progress=False)
    assert second.counts["videos_total"] == 0 and second.reasons == {"unchanged": 3}
    assert second.exit_code == 0 and second.counts["batches"] == 1  # just the runs row

    _videos(tmp_path / "more", 5, synthetic_clips)
    for new in sorted((tmp_path / "more").iterdir())[3:]:
        shutil.copy(new, videos / new.name)
    touched = videos / "clip00.mp4"
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = run_job(str(videos), str(out), config, progress=False)
    assert third.counts["videos_total"] == 3
    assert third.reasons == {"new": 2, "changed": 1, "unchanged": 2}

    captions = config.with_overrides({"captions.max_new_tokens": 4})
    capsys.readouterr()
    fourth = run_job(str(videos), str(out), captions, progress=False)
    assert fourth.reasons == {"config changed: captions": 5}
    assert set(fourth.stage_seconds) == {"decode", "sample", "captions"}  # no embedding
    # every video reruns its captions alone: the embed model is neither loaded nor recorded
    plan = capsys.readouterr().err.split("plan:\n")[1]
    assert [line.split()[0] for line in plan.splitlines() if line.startswith("  ") and "(" not in line.split()[0]] \
        == ["decode", "sample", "captions"]
    # (and the store's record of what it attempted)
    assert {p.parent.parent.name for p in out.rglob(f"part-{fourth.run_id}-*")} == {"captions", "runs", "attempts"}
    con = _latest(out)
    assert con.execute("select count(*), count(distinct video_id), count(distinct uri) from videos").fetchone() \
        == (5, 5, 5)
    assert set(r for (r,) in con.execute("select distinct run_id from captions").fetchall()) == {fourth.run_id}
    assert con.execute("select count(distinct video_id) from labels").fetchone()[0] == 5
    assert fourth.run_id not in {r for (r,) in con.execute("select run_id from labels").fetchall()}
    runs = con.execute("select run_id, status, models from runs order by run_id").fetchall()
    assert [r for r, _, _ in runs] == [s.run_id for s in (first, second, third, fourth)]
    assert [m["role"] for m in runs[0][2]] == ["embed", "captions"]
    assert [m["role"] for m in runs[3][2]] == ["captions"]

    os.replace(videos / "clip01.mkv", tmp_path / "clip01.mkv")  # the clips cycle: cuts.mp4, order.mkv, text.mp4
    fifth = run_job(str(videos), str(out), captions, progress=False)
    assert fifth.counts["videos_missing"] == 1 and fifth.missing[0].endswith("clip01.mkv")
    con = _latest(out)
    assert con.execute("select status from ledger where uri like '%clip01.mkv'").fetchone()[0] == "missing"
    assert con.execute("select count(*) from videos").fetchone()[0] == 5  # its rows are kept
    assert "clip01.mkv" in fifth.render() and '"missing"' in fifth.to_json()

    os.replace(tmp_path / "clip01.mkv", videos / "clip01.mkv")  # back, unchanged
    sixth = run_job(str(videos), str(out), captions, progress=False)
    assert sixth.reasons == {"returned": 1, "unchanged": 4} and sixth.counts["videos_total"] == 0
    assert _latest(out).execute("select status from ledger where uri like '%clip01.mkv'").fetchone()[0] == "ok"


def _one_video_and_failing_captions(tmp_path: Path, synthetic_clips: Path):
    """A folder of one video, the output path, and the captions stage's `process` as it is and
    one raising on every video (as a GPU out of memory would), for `monkeypatch.setattr`."""
    import workers.captions as captions

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 1, synthetic_clips)

    def fails(self, tasks):
        raise RuntimeError("CUDA out of memory")

    return videos, out, captions.CaptionStage.process, fails


def test_a_videos_status_follows_its_stages_retried_or_rerun_alone(tmp_path, synthetic_clips, tiny_models,
                                                                   monkeypatch):
    # the videos row is written with the core unit: its status stayed "partial" after the
    # failed captions were retried alone and made, and "ok" after a captions rerun failed
    import workers.captions as captions

    videos, out, made, fails = _one_video_and_failing_captions(tmp_path, synthetic_clips)

    def statuses() -> tuple:
        return _latest(out).execute("select v.status, l.status, (select count(*) from errors), "
                                    "(select count(*) from captions) from videos v join ledger l using (video_id)").fetchone()

    monkeypatch.setattr(captions.CaptionStage, "process", fails)
    assert run_job(str(videos), str(out), _config(tiny_models), progress=False).counts["videos_partial"] == 1
    assert statuses() == ("partial", "partial", 1, 0)
    monkeypatch.setattr(captions.CaptionStage, "process", made)
    retry = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert retry.reasons == {"previously failed": 1} and retry.counts["videos_ok"] == 1
    assert statuses() == ("ok", "ok", 0, 1)
    # gone from the source, its status is still what its units' last runs gave: its core row's
    # ("partial", from the first run) was shown, as if the retry had not been
    (video,) = videos.iterdir()
    os.replace(video, tmp_path / video.name)
    assert run_job(str(videos), str(out), _config(tiny_models), progress=False).missing == [str(video)]
    assert statuses() == ("ok", "missing", 0, 1)
    os.replace(tmp_path / video.name, video)
    assert run_job(str(videos), str(out), _config(tiny_models), progress=False).reasons == {"returned": 1}
    monkeypatch.setattr(captions.CaptionStage, "process", fails)
    longer = _config(tiny_models).with_overrides({"captions.max_new_tokens": 4})
    assert run_job(str(videos), str(out), longer, progress=False).reasons == {"config changed: captions": 1}
    assert statuses() == ("partial", "partial", 1, 0)
    # ... and a video whose last attempt failed in a stage is partial gone, as its core row said
    # "ok" beside the errors of that attempt
    os.replace(video, tmp_path / video.name)
    run_job(str(videos), str(out), longer, progress=False)
    assert statuses() == ("partial", "missing", 1, 0)
    os.replace(tmp_path / video.name, video)
    monkeypatch.setattr(captions.CaptionStage, "process", made)
    # back, it is the retry of its failed captions, not a change of their settings
    assert dry_run(str(videos), str(out), longer).videos == [("previously failed", str(video))]
    back = run_job(str(videos), str(out), longer, progress=False)
    assert back.reasons == {"previously failed": 1} and back.counts["videos_ok"] == 1
    assert statuses() == ("ok", "ok", 0, 1)
    # the history keeps each run's own
    assert _latest(out).execute("select list(status order by run_id) from videos_history").fetchone()[0] == ["partial"]


def test_a_runs_status_follows_its_videos_ok_partial_or_failed(tmp_path, synthetic_clips, tiny_models, monkeypatch):
    """A run with a partial video (a stage failed) is partial, exit code 3, not succeeded; one
    video failed beside one made is partial too; every video it ran failed: failed. Its summary
    and its row of the runs table say the same."""
    import workers.captions as captions

    videos, out, made, fails = _one_video_and_failing_captions(tmp_path, synthetic_clips)

    def ran(summary) -> tuple:
        row = _latest(out).execute("select status from runs where run_id = ?", [summary.run_id]).fetchone()
        counts = summary.counts
        return (summary.status, row[0], summary.exit_code, counts["videos_ok"], counts["videos_partial"],
                counts["videos_failed"])

    monkeypatch.setattr(captions.CaptionStage, "process", fails)
    assert ran(run_job(str(videos), str(out), _config(tiny_models), progress=False)) == (
        "partial", "partial", 3, 0, 1, 0)
    monkeypatch.setattr(captions.CaptionStage, "process", made)
    (videos / "broken.mp4").write_bytes(b"not a video")
    assert ran(run_job(str(videos), str(out), _config(tiny_models), progress=False)) == (
        "partial", "partial", 3, 1, 0, 1)
    assert ran(run_job(str(videos), str(out), _config(tiny_models), progress=False)) == (
        "failed", "failed", 3, 0, 0, 1)  # (the broken video retried alone)
    (videos / "broken.mp4").unlink()
    assert ran(run_job(str(videos), str(out), _config(tiny_models), progress=False)) == (
        "succeeded", "succeeded", 0, 0, 0, 0)


def test_a_gpu_that_breaks_stops_a_local_run_and_the_same_command_goes_on(tmp_path, synthetic_clips, tiny_models,
                                                                         monkeypatch):
    """After a sticky CUDA error (an illegal memory access, a device-side assert) every later
    call on the GPU fails in the process: before, each video after it got an errors row. Now
    the run stops, saying so, with the videos it finished published and the failed batch's
    each with an errors row; the next run does the videos it left, and those again."""
    from workers.stage import DeviceLostError

    import workers.captions as captions

    videos, out, made, _ = _one_video_and_failing_captions(tmp_path, synthetic_clips)
    _videos(videos, 4, synthetic_clips)
    calls = []

    def breaks(self, tasks):
        calls.append(len(tasks))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to "
                               "enable device-side assertions.")
        made(self, tasks)

    monkeypatch.setattr(captions.CaptionStage, "process", breaks)
    config = _config(tiny_models).with_overrides({"resources.videos_per_batch": 1})
    with pytest.raises(DeviceLostError, match=r"^stage captions: the GPU failed on .*clip0.\.m.. \(CUDA error: "
                                              r"device-side assert triggered\), and CUDA cannot go on in this process: "
                                              r"the run stops\. .*the same command goes on from there") as stopped:
        run_job(str(videos), str(out), config, progress=False)
    assert calls == [1, 1]  # no video after it was tried
    assert stopped.value.run_summary.counts["videos_ok"] == stopped.value.run_summary.counts["videos_failed"] == 1
    # its final runs row says it ended on an error, with its counts (not "running", then "interrupted")
    assert _latest(out).execute("select status, finished_at is not null, counts['videos_failed'] "
                                "from runs").fetchall() == [("error", True, 1)]
    assert list((out / "_vidlens" / "staging").iterdir()) == []  # its batches all published, as at a run's end
    assert _latest(out).execute("select regexp_extract(uri, 'clip0.'), status from ledger order by 1").fetchall() == [
        ("clip00", "ok"), ("clip01", "failed")]
    assert _latest(out).execute("select stage, error_type, message from errors").fetchall() == [(
        "captions", "DeviceLostError", "the GPU failed on this video, run alone (CUDA error: device-side assert "
        "triggered), and CUDA could not go on in the run's process: the run stopped, and the next one runs this "
        "video again, alone, after the others")]
    monkeypatch.setattr(captions.CaptionStage, "process", made)
    again = run_job(str(videos), str(out), config, progress=False)
    assert again.status == "succeeded" and again.counts["videos_ok"] == 3 and again.reasons["unchanged"] == 1
    assert _latest(out).execute("select count(*), count(*) filter (status = 'ok') from videos").fetchone() == (4, 4)


def test_a_video_that_breaks_the_gpu_every_time_holds_up_no_other(tmp_path, synthetic_clips, tiny_models,
                                                                  monkeypatch):
    """A local run stops where the GPU breaks, and its batch fails. The next run does every
    other video first, then each of the failed batch alone, the oldest failures first: the
    video that breaks the GPU fails alone, and its batch mate, not reached then, is done the
    run after, before it. Each run tries it last, alone, until it no longer breaks it."""
    from workers.stage import DeviceLostError

    import workers.captions as captions

    made = captions.CaptionStage.process
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 5, synthetic_clips)
    calls = []

    def breaks_on_clip00(self, tasks):
        names = [Path(task.ref.uri).stem for task in tasks]
        calls.append(names)
        if "clip00" in names:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        made(self, tasks)

    monkeypatch.setattr(captions.CaptionStage, "process", breaks_on_clip00)
    config = _config(tiny_models)  # two videos a batch

    def statuses() -> list[tuple]:
        return _latest(out).execute("select regexp_extract(uri, 'clip0.'), status from ledger order by 1").fetchall()

    def run(expected_calls: list[list[str]]) -> None:
        calls.clear()
        with pytest.raises(DeviceLostError, match="clip00.* the run stops"):
            run_job(str(videos), str(out), config, progress=False)
        assert calls == expected_calls

    run([["clip00", "clip01"]])
    assert statuses() == [("clip00", "failed"), ("clip01", "failed")]
    assert [Path(uri).stem for _, uri in dry_run(str(videos), str(out), config).videos] == [
        "clip02", "clip03", "clip04", "clip00", "clip01"]  # (a dry run gives the run's order)
    assert "on a batch of 2 videos with this one" in _latest(out).execute("select any_value(message) from errors"
                                                                          ).fetchone()[0]
    run([["clip02", "clip03"], ["clip04"], ["clip00"]])
    assert statuses() == [("clip00", "failed"), ("clip01", "failed"), ("clip02", "ok"), ("clip03", "ok"),
                          ("clip04", "ok")]
    assert "on this video, run alone" in _latest(out).execute(
        "select message from errors where uri like '%clip00%'").fetchone()[0]
    run([["clip01"], ["clip00"]])  # its failure is the older
    assert statuses()[:2] == [("clip00", "failed"), ("clip01", "ok")]
    run([["clip00"]])
    monkeypatch.setattr(captions.CaptionStage, "process", made)
    assert run_job(str(videos), str(out), config, progress=False).counts["videos_ok"] == 1
    assert {status for _, status in statuses()} == {"ok"}


def test_a_video_a_stage_failed_on_is_retried_in_its_place_in_a_full_batch(tmp_path, synthetic_clips, tiny_models,
                                                                          monkeypatch):
    """Only a video that failed as a whole waits for the others and runs alone: one a stage
    failed on (a captions model that failed all night: every video partial) is retried in its
    place in the listing, batched with the others."""
    import workers.captions as captions

    videos, out, made, fails = _one_video_and_failing_captions(tmp_path, synthetic_clips)
    monkeypatch.setattr(captions.CaptionStage, "process", fails)
    assert run_job(str(videos), str(out), _config(tiny_models), progress=False).status == "partial"
    for name in ("clip01.mp4", "clip02.mp4"):
        shutil.copy(synthetic_clips / "cuts.mp4", videos / name)
    calls = []

    def names(self, tasks):
        calls.append([Path(task.ref.uri).stem for task in tasks])
        made(self, tasks)

    monkeypatch.setattr(captions.CaptionStage, "process", names)
    again = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert again.reasons == {"previously failed": 1, "new": 2} and again.status == "succeeded"
    assert calls == [["clip00", "clip01"], ["clip02"]]


def test_only_a_video_the_gpu_failed_on_waits_for_the_others(tmp_path, synthetic_clips, tiny_models, monkeypatch):
    """A video that failed as a whole for another cause (a file that does not decode) is
    retried in its place in the listing, batched with the others, not last and alone: after a
    night on which every video failed (say, the bucket's credentials expired), the next run
    batches them as usual. The ledger keeps the cause."""
    from pipeline import local as local_executor

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    (videos / "clip00.mp4").unlink()
    (videos / "clip00.mp4").write_bytes(b"not a video")
    assert run_job(str(videos), str(out), _config(tiny_models), progress=False).counts["videos_failed"] == 1
    assert _latest(out).execute("select regexp_extract(uri, 'clip0.'), status, failure from ledger order by 1"
                                ).fetchall() == [("clip00", "failed", "VideoDecodeError"), ("clip01", "ok", None)]
    _videos(tmp_path / "more", 3, synthetic_clips)
    shutil.copy(tmp_path / "more" / "clip02.mp4", videos)
    run_local, given = local_executor.run_local, []

    def noted(tasks, *args, **kwargs):
        def each():
            for task in tasks:
                given.append((Path(task.ref.uri).stem, task.alone))
                yield task
        return run_local(each(), *args, **kwargs)

    monkeypatch.setattr(local_executor, "run_local", noted)
    again = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert again.reasons == {"previously failed": 1, "new": 1, "unchanged": 1}
    assert given == [("clip00", False), ("clip02", False)]


def test_a_file_that_fails_alike_every_night_is_given_up_and_run_again_once_it_changes(tmp_path, synthetic_clips,
                                                                                      tiny_models, capsys):
    """A file whose own bytes fail it as a whole (here not a video) is tried in
    `incremental.give_up_after` runs in a row, each giving an errors row and exit code 3; the
    runs after skip it as `given up`, exit code 0 with a warning, its last errors row kept. Gone
    and back unchanged, it is still given up; asked (--retry-failed), or changed, it runs again."""
    videos, out, settings = tmp_path / "videos", tmp_path / "out", tmp_path / "run.yaml"
    _videos(videos, 1, synthetic_clips)
    bad = videos / "bad.mp4"
    bad.write_bytes(b"not a video")
    config = _config(tiny_models).with_overrides({"incremental.give_up_after": 2})
    settings.write_text(config.to_json())  # (JSON is YAML)

    def run(**kwargs):
        return run_job(str(videos), str(out), config, progress=False, **kwargs)

    def ledger() -> tuple:
        return _latest(out).execute("select status, bad_file_runs, last_run_id from ledger where uri = ?",
                                    [str(bad)]).fetchone()

    def errors() -> list[tuple]:  # the errors view: the rows of the video's last attempt
        return _latest(out).execute("select run_id, error_type from errors where uri = ?", [str(bad)]).fetchall()

    first = run()
    assert (first.reasons, first.exit_code, first.counts["videos_failed"]) == ({"new": 2}, 3, 1)
    assert ledger() == ("failed", 1, first.run_id)
    second = run()
    assert (second.reasons, second.exit_code) == ({"previously failed": 1, "unchanged": 1}, 3)
    assert ledger() == ("failed", 2, second.run_id)
    third = run()
    assert third.reasons == {"given up": 1, "unchanged": 1} and third.given_up == [str(bad)]
    assert (third.status, third.exit_code, third.counts["videos_total"]) == ("succeeded", 0, 0)
    [warning] = third.warnings
    assert warning.startswith("1 video given up, not run: its file failed it as a whole in 2 or more runs in a row, "
                              "unchanged since (empty, cut short, not a video, not where a manifest names it; why: "
                              f"vidlens query {out} 'SELECT uri, message FROM errors'). Fix or replace the file (a "
                              "changed file runs again, as does one put where a manifest names it), or run once with "
                              "--retry-failed")
    assert warning.endswith(f": {bad}") and "warning 1 video given up" in third.render()
    assert ledger() == ("failed", 2, second.run_id) and errors() == [(second.run_id, "VideoDecodeError")]
    assert _latest(out).execute("select counts['listed: given up'] from runs where run_id = ?",
                                [third.run_id]).fetchone()[0] == 1
    assert json.loads(third.to_json())["given_up"] == [str(bad)]

    # a dry run says so, a line each as for the videos it would process
    capsys.readouterr()
    assert main(["run", str(videos), "--out", str(out), "--config", str(settings), "--dry-run"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines() == [f"given up\t{bad}"]
    assert said.err.startswith("dry run: 2 listed (1 given up, 1 unchanged): 0 to process, 2 to skip, 0 to mark")
    assert "vidlens: warning: 1 video given up, not run" in said.err
    assert main(["run", str(videos), "--out", str(out), "--config", str(settings), "--dry-run", "--retry-failed"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"previously failed\t{bad}"]
    # never, with 0; not yet, with the default 3
    for never in (config.with_overrides({"incremental.give_up_after": 0}), _config(tiny_models)):
        assert dry_run(str(videos), str(out), never).videos == [("previously failed", str(bad))]

    # gone from the source, and back unchanged: the same bad file, still failed, beside a new one tried
    os.replace(bad, tmp_path / "bad.mp4")
    assert run().missing == [str(bad)] and ledger()[:2] == ("missing", 2)
    os.replace(tmp_path / "bad.mp4", bad)
    (videos / "other.mp4").write_bytes(b"")
    back = run()
    assert back.reasons == {"given up": 1, "new": 1, "unchanged": 1} and ledger()[:2] == ("failed", 2)
    assert back.exit_code == 3 and back.counts["videos_failed"] == 1  # (other.mp4, which it ran)
    (videos / "other.mp4").unlink()

    # asked, once (the command's flag: mutation review)
    said = tmp_path / "retried.json"
    assert main(["run", str(videos), "--out", str(out), "--config", str(settings), "--no-progress", "--retry-failed",
                 "--summary-json", str(said)]) == 3
    retried = json.loads(said.read_text())
    assert retried["reasons"] == {"previously failed": 1, "unchanged": 1}
    assert ledger() == ("failed", 3, retried["run_id"]) and errors() == [(retried["run_id"], "VideoDecodeError")]
    assert run().reasons == {"given up": 1, "unchanged": 1}

    os.utime(bad, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: another version, counted anew
    touched = run()
    assert (touched.reasons, touched.exit_code, ledger()[:2]) == ({"changed": 1, "unchanged": 1}, 3, ("failed", 1))
    shutil.copy(synthetic_clips / "cuts.mp4", bad)  # replaced with a video
    fixed = run()
    assert (fixed.reasons, fixed.exit_code, ledger()[:2]) == ({"changed": 1, "unchanged": 1}, 0, ("ok", 0))
    assert errors() == []


def test_a_manifest_row_naming_no_file_is_given_up_like_a_bad_file_and_runs_once_the_file_is_there(
        tmp_path, synthetic_clips, tiny_models):
    """A manifest's row naming a file that was never there (a mistyped name) failed every night,
    exit code 3 and the same errors row each time: it is given up after `incremental.give_up_after`
    runs as a bad file is, and the file put there runs at the next run (another `video_id`). A
    row naming a video the output holds, gone since, is still marked missing."""
    videos, out, manifest = tmp_path / "videos", tmp_path / "out", tmp_path / "nightly.csv"
    _videos(videos, 1, synthetic_clips)
    held, typo = videos / "clip00.mp4", videos / "clip01.mp4"
    manifest.write_text(f"uri\n{held}\n{typo}\n")
    config = _config(tiny_models).with_overrides({"incremental.give_up_after": 2})

    def run():
        return run_job(str(manifest), str(out), config, progress=False)

    def ledger() -> tuple:
        return _latest(out).execute("select status, bad_file_runs from ledger where uri = ?", [str(typo)]).fetchone()

    assert (run().exit_code, ledger()) == (3, ("failed", 1))
    second = run()
    assert (second.reasons, second.exit_code, ledger()) == ({"previously failed": 1, "unchanged": 1}, 3, ("failed", 2))
    os.replace(held, tmp_path / "clip00.mp4")  # gone: its rows stay, it is missing, as before
    third = run()
    assert (third.reasons, third.given_up, third.missing, third.exit_code) == (
        {"given up": 1, "missing": 1}, [str(typo)], [str(held)], 0)
    assert "not where a manifest names it" in third.warnings[-1]
    shutil.copy(tmp_path / "clip00.mp4", typo)  # the file it names is there now
    fourth = run()
    assert (fourth.reasons, fourth.exit_code, fourth.counts["videos_ok"]) == ({"changed": 1, "missing": 1}, 0, 1)
    assert ledger() == ("ok", 0)
    assert _latest(out).execute("select status from ledger where uri = ?", [str(held)]).fetchone() == ("missing",)


def test_the_warning_of_the_videos_given_up_names_three_and_counts_the_rest():
    """(mutation review) Its words for one video and for several, and the videos it names."""
    from pipeline.job import _warn_given_up
    from pipeline.summary import RunSummary

    summary = RunSummary(run_id="r", source="videos", output="night out")
    _warn_given_up(summary, 3)
    assert summary.warnings == []
    summary.given_up = [f"videos/{name}.mp4" for name in "abcd"]
    _warn_given_up(summary, 3)
    [warning] = summary.warnings
    assert warning == ("4 videos given up, not run: their files failed them as a whole in 3 or more runs in a row, "
                       "unchanged since (empty, cut short, not a video, not where a manifest names it; why: vidlens "
                       "query 'night out' 'SELECT uri, message FROM errors'). Fix or replace each file (a changed file "
                       "runs again, as does one put where a manifest names it), or run once with --retry-failed "
                       "(incremental.give_up_after: 0 never gives up): videos/a.mp4, videos/b.mp4, videos/c.mp4 and 1 "
                       "more")

def test_a_run_that_stops_or_fails_still_warns_of_the_videos_it_gave_up(tmp_path, synthetic_clips, tiny_models,
                                                                         monkeypatch):
    """Its summary listed them (`given_up`) without the warning that says what to do."""
    from workers.stage import DeviceLostError

    import workers.captions as captions

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 1, synthetic_clips)
    (videos / "bad.mp4").write_bytes(b"not a video")
    config = _config(tiny_models).with_overrides({"incremental.give_up_after": 1})
    assert run_job(str(videos), str(out), config, progress=False).counts["videos_failed"] == 1
    (videos / "clip01.mp4").write_bytes((videos / "clip00.mp4").read_bytes())  # (a new video, for the next run)

    # stopped (Ctrl-C), and ended by an error (the GPU lost)
    for stop, ended_by in ((KeyboardInterrupt(), KeyboardInterrupt),
                           (RuntimeError("CUDA error: an illegal memory access was encountered"), DeviceLostError)):
        def stops(self, tasks, stop=stop):
            raise stop

        monkeypatch.setattr(captions.CaptionStage, "process", stops)
        with pytest.raises(ended_by) as raised:
            run_job(str(videos), str(out), config.with_overrides({"resources.videos_per_batch": 1}), progress=False)
        summary = raised.value.run_summary
        assert summary.status == ("stopped" if ended_by is KeyboardInterrupt else "error")
        assert summary.given_up == [str(videos / "bad.mp4")]
        [warning] = summary.warnings
        assert warning.startswith("1 video given up, not run: its file failed it as a whole in 1 or more runs")


def test_a_failure_another_run_may_not_meet_is_retried_every_run(tmp_path, synthetic_clips, tiny_models, monkeypatch):
    """A video failed as a whole by something other than its bytes (here decoding timed out, as
    under load) and one a stage failed on (partial) are retried by every run, never given up."""
    import workers.captions as captions
    import workers.sampling
    from workers.guard import DecodeTimeout

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    probe, caption = workers.sampling.probe, captions.CaptionStage.process

    def times_out(path, *limits):
        if Path(path).stem == "clip00":
            raise DecodeTimeout(f"{path}: decoding took longer than 300 s and was stopped")
        return probe(path, *limits)

    def fails_on_clip01(self, tasks):
        if any(Path(task.ref.uri).stem == "clip01" for task in tasks):
            raise RuntimeError("CUDA out of memory")
        caption(self, tasks)

    monkeypatch.setattr(workers.sampling, "probe", times_out)  # (the decode child, forked, has it too)
    monkeypatch.setattr(captions.CaptionStage, "process", fails_on_clip01)
    config = _config(tiny_models).with_overrides({"incremental.give_up_after": 1})
    for reasons in ({"new": 2}, {"previously failed": 2}):
        ran = run_job(str(videos), str(out), config, progress=False)
        assert (ran.reasons, ran.exit_code, ran.counts["videos_failed"], ran.counts["videos_partial"]) == (
            reasons, 3, 1, 1)
        assert _latest(out).execute("select regexp_extract(uri, 'clip0.'), status, failure, bad_file_runs from ledger "
                                    "order by 1").fetchall() == [("clip00", "failed", "DecodeTimeout", 0),
                                                                 ("clip01", "partial", "RuntimeError", 0)]


def test_a_ledger_written_before_bad_files_were_counted_counts_a_failure_there_once(tmp_path, synthetic_clips,
                                                                                   tiny_models):
    """An output's ledger (manifests and snapshot) made before the runs of a bad file were
    counted: a video failed there as a whole with a bad file's error has failed once, so it is
    tried `incremental.give_up_after` - 1 more times (here none)."""
    import pyarrow.parquet as pq

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 1, synthetic_clips)
    (videos / "bad.mp4").write_bytes(b"not a video")
    assert run_job(str(videos), str(out), _config(tiny_models), progress=False).exit_code == 3
    for manifest in (out / "_vidlens" / "commits").glob("*.json"):  # as an older vidlens wrote them
        body = json.loads(manifest.read_text())
        for entry in body.get("ledger", []):
            del entry["bad_file_runs"]
        manifest.write_text(json.dumps(body))
    for snapshot in (out / "_vidlens" / "snapshots").glob("ledger-*.parquet"):
        pq.write_table(pq.read_table(snapshot).drop_columns(["bad_file_runs"]), snapshot)
    assert _latest(out).execute("select count(*), count(bad_file_runs) from ledger").fetchone() == (2, 0)
    once = _config(tiny_models).with_overrides({"incremental.give_up_after": 1})
    again = run_job(str(videos), str(out), once, progress=False)
    assert (again.reasons, again.exit_code) == ({"given up": 1, "unchanged": 1}, 0)
    twice = run_job(str(videos), str(out), _config(tiny_models).with_overrides({"incremental.give_up_after": 2}),
                    progress=False)
    assert (twice.reasons, twice.exit_code) == ({"previously failed": 1, "unchanged": 1}, 3)
    assert _latest(out).execute("select bad_file_runs from ledger where uri like '%bad.mp4'").fetchone()[0] == 2


def test_a_dry_run_says_what_the_run_will_do_and_writes_nothing(tmp_path, synthetic_clips, tiny_models, capsys):
    """`vidlens run --dry-run` lists and judges the videos as the run does: its decisions and
    the videos it finds gone are the run's after it, and it writes nothing, in an output or
    where none is yet."""
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 4, synthetic_clips)
    clips = sorted(videos.iterdir())
    shutil.move(clips[3], tmp_path / clips[3].name)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    clips[0].unlink()
    os.utime(clips[1], ns=(10**18, 10**18))
    shutil.move(tmp_path / clips[3].name, clips[3])
    longer = _config(tiny_models).with_overrides({"captions.max_new_tokens": 4})
    files = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    planned = dry_run(str(videos), str(out), longer)
    assert planned.videos == [("changed", str(clips[1])), ("config changed: captions", str(clips[2])),
                              ("new", str(clips[3]))]
    assert planned.summary.missing == [str(clips[0])]
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == files
    ran = run_job(str(videos), str(out), longer, progress=False)
    assert (ran.reasons, ran.missing) == (planned.summary.reasons, planned.summary.missing)
    assert dry_run(str(videos), str(out), longer).videos == []

    capsys.readouterr()
    assert main(["run", str(videos), "--out", str(tmp_path / "none"), "--dry-run", "--executor", "local"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines() == [f"new\t{clip}" for clip in clips[1:]]
    assert said.err.startswith("dry run: 3 listed (3 new): 3 to process, 0 to skip, 0 to mark missing; nothing was")
    assert not (tmp_path / "none").exists()
    # a model folder not there stops the run before any video: the dry run said 0 and "3 to process"
    assert main(["run", str(videos), "--out", str(tmp_path / "none"), "--dry-run", "--executor", "local",
                 "--embed-model", str(tmp_path / "no-model")]) == 2
    said = capsys.readouterr()
    assert said.out == "" and f"the folder {tmp_path / 'no-model'} does not exist" in said.err
    assert main(["run", str(videos), "--out", str(out), "--dry-run", "--summary-json", str(tmp_path / "s.json")]) == 2
    assert "--dry-run writes nothing: drop --summary-json" in capsys.readouterr().err


def test_a_dry_run_prints_the_videos_to_process_and_to_mark_missing_and_counts_them(tmp_path, synthetic_clips,
                                                                                     tiny_models, capsys):
    """Over an output: a line per video it would process and per video it would mark missing,
    the counts of each (a video skipped is not one marked missing), `--full` as the run takes
    it, and the listing's warnings on standard error."""
    videos, out, settings = tmp_path / "videos", tmp_path / "out", tmp_path / "run.yaml"
    _videos(videos, 3, synthetic_clips)
    clips = sorted(videos.iterdir())
    settings.write_text(_config(tiny_models).to_json())  # (JSON is YAML)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    clips[0].unlink()
    os.utime(clips[1], ns=(10**18, 10**18))
    capsys.readouterr()
    assert main(["run", str(videos), "--out", str(out), "--config", str(settings), "--dry-run"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines() == [f"changed\t{clips[1]}", f"missing\t{clips[0]}"]
    assert said.err == ("dry run: 2 listed (1 changed, 1 unchanged): 1 to process, 1 to skip, 1 to mark missing; "
                        "nothing was run or written\n")
    assert main(["run", str(videos), "--out", str(out), "--config", str(settings), "--dry-run", "--full"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"full\t{clips[1]}", f"full\t{clips[2]}", f"missing\t{clips[0]}"]
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty"), "--out", str(out), "--config", str(settings), "--dry-run"]) == 0
    assert f"vidlens: warning: no videos found in {tmp_path / 'empty'}" in capsys.readouterr().err


def test_a_dry_run_line_holds_one_uri_whatever_its_name_holds(tmp_path, capsys, monkeypatch):
    """A file name with a newline or a tab broke the `reason<TAB>uri` lines (a line in two, a
    third field): such a URI is written as a JSON string; every other as it is."""
    import pipeline.job
    from pipeline.job import DryRun
    from pipeline.summary import RunSummary

    videos = tmp_path / "videos"
    videos.mkdir()
    names = ["a\nb.mp4", "c\td.mp4", "e\u2028f.mp4", '"g".mp4', "h %0A é.mp4"]
    for name in names:
        (videos / name).write_bytes(b"not decoded by a dry run")
    assert main(["run", str(videos), "--out", str(tmp_path / "out"), "--dry-run", "--executor", "local"]) == 0
    said = capsys.readouterr().out
    lines = said.split("\n")[:-1]  # (not splitlines: it splits at U+2028 too)
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 2 and f[0] == "new" for f in fields), lines
    uris = [json.loads(uri) if uri.startswith('"') else uri for _, uri in fields]
    assert sorted(uris) == sorted(str(videos / name) for name in names)
    assert f"new\t{videos / 'h %0A é.mp4'}" in lines  # (a name that needs nothing is as it is)
    # (mutation review) nor a line separator left as it is: splitlines, which ends a line at one, reads the same
    assert said.splitlines() == lines
    # and the lines of the videos it would give up on or mark missing
    summary = RunSummary(run_id="", source=str(videos), output=str(tmp_path / "out"))
    summary.given_up, summary.missing = ["/v/given\nup.mp4", '"quoted".mp4'], ["/v/miss\ting.mp4"]
    monkeypatch.setattr(pipeline.job, "dry_run", lambda *args, **kwargs: DryRun(summary))
    assert main(["run", str(videos), "--out", str(tmp_path / "out"), "--dry-run", "--executor", "local"]) == 0
    # (a URI that starts with a quote, as a manifest's row may name it, is quoted: as it is, it read as a JSON string)
    assert capsys.readouterr().out == ('given up\t"/v/given\\nup.mp4"\ngiven up\t"\\"quoted\\".mp4"\n'
                                       'missing\t"/v/miss\\ting.mp4"\n')


def test_a_dry_runs_warning_names_a_file_on_one_line(tmp_path, capsys, monkeypatch):
    """(mutation review) A dry run's warnings name URIs (a video given up on, a manifest's row), file names an
    uploader chose: printed as they were, a newline began a line of its choosing and an ESC [2J cleared
    the terminal. They are printed as one line, escaped."""
    import pipeline.job
    from pipeline.job import DryRun
    from pipeline.summary import RunSummary

    (tmp_path / "videos").mkdir()
    summary = RunSummary(run_id="", source=str(tmp_path / "videos"), output=str(tmp_path / "out"))
    summary.warnings.append("1 video given up, not run: /v/a\x1b[2J\nvidlens: warning: FAKE.mp4")
    monkeypatch.setattr(pipeline.job, "dry_run", lambda *args, **kwargs: DryRun(summary))
    assert main(["run", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "--dry-run", "--executor",
                 "local"]) == 0
    error = capsys.readouterr().err
    assert "\x1b" not in error and [line.startswith("vidlens: warning:") for line in error.splitlines()] == [
        False, True], error
    assert "vidlens: warning: 1 video given up, not run: /v/a\\x1b[2J\\nvidlens: warning: FAKE.mp4\n" in error, error


def test_a_dry_run_says_each_warning_of_its_listing_once(tmp_path, synthetic_clips):
    """A manifest row's warning was said twice, as the listing logged it and again as the dry
    run's own `vidlens: warning:` line."""
    shutil.copy(synthetic_clips / "cuts.mp4", tmp_path / "cuts.mp4")
    (tmp_path / "batch.csv").write_text("uri,size\ncuts.mp4,12kB\n")
    said = _vidlens("run", str(tmp_path / "batch.csv"), "--out", str(tmp_path / "out"), "--dry-run",
                    "--executor", "local")
    assert said.returncode == 0 and said.stdout == f"new\t{tmp_path / 'cuts.mp4'}\n", said.stderr
    assert said.stderr.count("size '12kB' is not a whole number of bytes") == 1, said.stderr
    assert f"vidlens: warning: manifest {tmp_path / 'batch.csv'}, row for {tmp_path / 'cuts.mp4'}: size" in said.stderr


def test_a_video_an_executor_delivers_twice_is_recorded_once_the_first_time(tmp_path, synthetic_clips, tiny_models,
                                                                             monkeypatch):
    """A retried batch (Ray runs a failed block again) can deliver a video a second time: the
    run keeps the first delivery and drops the second, so each video has one row and is counted
    once, and a failed second delivery does not overwrite the good first one."""
    import copy

    from pipeline import local as local_executor
    from workers.task import StageError

    run_local = local_executor.run_local

    def twice(*args, **kwargs):
        for task in run_local(*args, **kwargs):
            again = copy.deepcopy(task)
            again.meta = None  # the second delivery failed as a whole
            again.errors.append(StageError("captions", "Retried", "the retry failed"))
            yield task
            yield again

    monkeypatch.setattr(local_executor, "run_local", twice)
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    summary = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert summary.status == "succeeded" and summary.counts["videos_total"] == summary.counts["videos_ok"] == 2
    con = _latest(out)
    assert con.execute("select count(*), count(distinct video_id) from videos_history").fetchone() == (2, 2)
    assert con.execute("select count(*) from errors_history").fetchone() == (0,)
    assert con.execute("select count(*) from ledger where status = 'ok'").fetchone() == (2,)


def test_a_run_its_executor_fails_publishes_the_videos_it_finished_and_the_next_does_the_rest(
        tmp_path, synthetic_clips, tiny_models, monkeypatch):
    """(Ray review) Ray failing a run (a node lost that it cannot go on without) lost the videos the
    run had finished and not yet published: no rows, no runs row, all done again. They are published
    with the run's final row, status error, and the failure is raised as before."""
    from pipeline import local as local_executor

    run_local = local_executor.run_local

    def fails_after_two(*args, **kwargs):
        for count, task in enumerate(run_local(*args, **kwargs)):
            if count == 2:
                raise RuntimeError("the Ray cluster lost a node")
            yield task

    monkeypatch.setattr(local_executor, "run_local", fails_after_two)
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 4, synthetic_clips)
    config = _config(tiny_models, commit_every_videos=1000)  # (nothing published before the failure)
    with pytest.raises(RuntimeError, match="lost a node") as failed:
        run_job(str(videos), str(out), config, progress=False)
    assert failed.value.run_summary.status == "error" and failed.value.run_summary.run_id
    con = _latest(out)
    assert con.execute("select count(*), count(distinct video_id) from videos").fetchone() == (2, 2)
    assert con.execute("select status from runs").fetchall() == [("error",)]
    assert con.execute("select count(*) from ledger where status = 'ok'").fetchone() == (2,)
    monkeypatch.setattr(local_executor, "run_local", run_local)
    again = run_job(str(videos), str(out), config, progress=False)
    assert again.status == "succeeded" and again.reasons == {"new": 2, "unchanged": 2}
    assert _latest(out).execute("select count(*), count(distinct uri) from videos").fetchone() == (4, 4)


def test_a_run_its_executor_fails_before_any_video_is_finished_writes_no_runs_row(
        tmp_path, synthetic_clips, tiny_models, monkeypatch):
    """(mutation review) With no video finished there is nothing to keep: the failure is raised as before,
    and the output gets no runs row (its opening row goes with its first batch), not one saying error
    for a run that wrote nothing else."""
    from pipeline import local as local_executor

    def fails_at_once(*args, **kwargs):
        raise RuntimeError("the Ray cluster lost a node")
        yield  # (a generator, as the executors are)

    monkeypatch.setattr(local_executor, "run_local", fails_at_once)
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    with pytest.raises(RuntimeError, match="lost a node"):
        run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert Store(str(out)).committed_files("runs") == []


def test_a_video_an_executor_never_delivers_gets_a_worker_lost_row_and_runs_again(tmp_path, synthetic_clips,
                                                                                  tiny_models, monkeypatch):
    """A video whose worker died for good (Ray gives up on its block) never comes back from the
    executor: the run is not silent about it, but gives it a WorkerLost errors row and a failed
    ledger entry (the run is partial), and the next run does it again."""
    from pipeline import local as local_executor

    run_local = local_executor.run_local

    def loses_clip01(*args, **kwargs):
        for task in run_local(*args, **kwargs):
            if Path(task.ref.uri).stem != "clip01":
                yield task

    monkeypatch.setattr(local_executor, "run_local", loses_clip01)
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 3, synthetic_clips)
    summary = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert summary.status == "partial" and (summary.counts["videos_ok"], summary.counts["videos_failed"]) == (2, 1)
    con = _latest(out)
    assert con.execute("select regexp_extract(uri, 'clip0.'), stage, error_type from errors").fetchall() == [
        ("clip01", "worker", "WorkerLost")]
    assert con.execute("select regexp_extract(uri, 'clip0.'), status from ledger order by 1").fetchall() == [
        ("clip00", "ok"), ("clip01", "failed"), ("clip02", "ok")]
    monkeypatch.setattr(local_executor, "run_local", run_local)
    again = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert again.status == "succeeded" and again.reasons == {"previously failed": 1, "unchanged": 2}
    assert {status for (status,) in _latest(out).execute("select status from ledger").fetchall()} == {"ok"}


def _text_video(tmp_path: Path, synthetic_clips: Path) -> Path:
    """A folder holding the synthetic clip with text on screen."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(synthetic_clips / "text.mp4", videos / "text.mp4")
    return videos


def _ocr(tiny_models, min_confidence: float = 0.5) -> RunConfig:
    # min_confidence 1: the OCR reads the same text and keeps none of it
    return RunConfig.from_dict({"models": tiny_models, "stages": ["ocr"], "ocr": {"min_confidence": min_confidence},
                                "output": {"thumbnails": False}, "resources": {"executor": "local"}})


def _history(out: Path, view: str) -> list[tuple]:
    """(run date, run id) of each row of a history view."""
    return _latest(out).execute(f"select run_date::varchar, run_id from {view} order by all").fetchall()


def test_a_same_day_rerun_that_finds_no_text_leaves_that_day_no_text(tmp_path, synthetic_clips, tiny_models):
    # texts_history kept the first run's text for the day: the rerun wrote no texts row to hide it
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.compact import compact
    from pipeline.ledger import ATTEMPTS_SCHEMA, UNITS

    videos, out = _text_video(tmp_path, synthetic_clips), tmp_path / "out"
    first = run_job(str(videos), str(out), _ocr(tiny_models), progress=False, run_date="2024-05-01")
    assert first.counts["texts"] > 0
    rerun = run_job(str(videos), str(out), _ocr(tiny_models, 1.0), progress=False, run_date="2024-05-01")
    assert rerun.reasons == {"config changed: texts": 1} and rerun.counts["texts"] == 0
    assert _history(out, "texts_history") == [] and _history(out, "texts") == []
    assert _history(out, "videos_history") == [("2024-05-01", first.run_id)]  # core was not recomputed
    attempts = pa.concat_tables(pq.read_table(p) for p in sorted((out / "_vidlens" / "attempts").rglob("*.parquet")))
    assert attempts.schema.equals(ATTEMPTS_SCHEMA)
    assert sorted((r, u) for r, u in zip(attempts["run_id"].to_pylist(), attempts["units"].to_pylist())) \
        == [(first.run_id, list(UNITS)), (rerun.run_id, ["texts"])]
    views = ("texts", "texts_history", "videos", "videos_history", "errors_history")
    before = {view: _latest(out).execute(f"select * from {view} order by all").fetchall() for view in views}
    compact(str(out))  # (the two runs' attempts are one file now: the rerun's is kept)
    assert len(list((out / "_vidlens" / "attempts").rglob("*.parquet"))) == 1
    assert {view: _latest(out).execute(f"select * from {view} order by all").fetchall() for view in views} == before

    later = run_job(str(videos), str(out), _ocr(tiny_models), progress=False, run_date="2024-05-02")
    assert {d for d, _ in _history(out, "texts_history")} == {"2024-05-02"}
    assert {r for _, r in _history(out, "texts_history")} == {later.run_id}


def test_an_error_fixed_by_a_same_day_retry_leaves_that_day_no_error(tmp_path, synthetic_clips, tiny_models,
                                                                      monkeypatch):
    # errors_history kept the failed attempt's error for the day: the retry that fixed it wrote no errors row
    import workers.captions as captions

    videos, out, made, fails = _one_video_and_failing_captions(tmp_path, synthetic_clips)

    monkeypatch.setattr(captions.CaptionStage, "process", fails)
    failed = run_job(str(videos), str(out), _config(tiny_models), progress=False, run_date="2024-05-01")
    assert _history(out, "errors_history") == [("2024-05-01", failed.run_id)]
    monkeypatch.setattr(captions.CaptionStage, "process", made)
    retry = run_job(str(videos), str(out), _config(tiny_models), progress=False, run_date="2024-05-01")
    assert retry.reasons == {"previously failed": 1} and retry.counts["videos_ok"] == 1
    assert _history(out, "errors_history") == []
    assert {r for _, r in _history(out, "captions_history")} == {retry.run_id}
    assert _history(out, "videos_history") == [("2024-05-01", failed.run_id)]  # only captions were retried


def test_history_written_before_attempts_were_recorded_is_read_as_before(tmp_path, synthetic_clips, tiny_models,
                                                                          monkeypatch):
    # an output of an older vidlens has no record of what its runs attempted: a same-day rerun that
    # wrote no rows hid nothing then, and an upgrade must not change its history
    from pipeline.writer import BatchWriter

    videos, out = _text_video(tmp_path, synthetic_clips), tmp_path / "out"
    attempted = BatchWriter.attempted
    monkeypatch.setattr(BatchWriter, "attempted", lambda self, video_id, units: None)  # as before
    first = run_job(str(videos), str(out), _ocr(tiny_models), progress=False, run_date="2024-05-01")
    run_job(str(videos), str(out), _ocr(tiny_models, 1.0), progress=False, run_date="2024-05-01")
    assert not (out / "_vidlens" / "attempts").exists()
    shown = _history(out, "texts_history")
    assert shown and {r for _, r in shown} == {first.run_id}
    assert _history(out, "texts") == []  # the latest view always followed the ledger
    # upgraded: a run that records its attempt hides the day's rows from then on
    monkeypatch.setattr(BatchWriter, "attempted", attempted)
    run_job(str(videos), str(out), _ocr(tiny_models, 0.99), progress=False, run_date="2024-05-01")
    assert _history(out, "texts_history") == []


def _cli(videos: Path, out: Path, tiny_models, failpoint: str | None = None, wait: bool = True):
    command = [sys.executable, "-m", "pipeline", "run", str(videos), "--out", str(out), "--no-progress",
               "--executor", "local", "--videos-per-batch", "1", "--stages", ",".join(STAGES),
               "--embed-model", tiny_models["embed"], "--caption-model", tiny_models["captions"],
               "--set", "captions.max_new_tokens=3", "--set", "output.commit_every_videos=1"]
    env = {**os.environ, "VIDLENS_FAILPOINT": failpoint or ""}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _current(out: Path) -> dict[str, set]:
    """Per table, the (video_id, run_id) pairs of the latest view."""
    if not (out / "_vidlens" / "commits").exists():
        return {}
    con = _latest(out)
    rows = {}
    for table in ("videos", "frames", "labels", "captions"):
        pairs = con.execute(f"select video_id, run_id from {table}").fetchall()
        rows[table] = set(pairs)
        if table == "videos":
            assert len(pairs) == len(set(pairs)), "a video appears twice in the latest view"
    return rows


def test_killing_the_driver_at_any_point_loses_and_duplicates_nothing(tmp_path, synthetic_clips, tiny_models):
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 6, synthetic_clips)
    # each run is killed at a different point of the commit path, then one run finishes the work
    # (at the fourth video the first batch is published for sure: three are published at once,
    # in order, and the fourth waits for the first; the first run may leave four, two for the rest)
    kill_points = ["video:4", "staged:1", "committed:1", "moving:2"]
    seen: dict[str, set] = {}
    for point in kill_points:
        killed = _cli(videos, out, tiny_models, point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        now = _current(out)
        for table, pairs in seen.items():
            assert pairs <= now[table], f"after a kill at {point}, published rows of {table} disappeared"
        seen = now
    assert len(seen["videos"]) >= 3  # every killed run but the one killed before publishing left a batch
    final = _cli(videos, out, tiny_models)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "unchanged" in final.stdout
    now = _current(out)
    for table, pairs in seen.items():
        assert pairs <= now[table]
    con = _latest(out)
    assert con.execute("select count(*), count(distinct video_id), count(distinct uri) from videos").fetchone() \
        == (6, 6, 6)
    per_video = con.execute("select video_id, count(*) from captions where level = 'video' group by 1").fetchall()
    assert len(per_video) == 6 and all(n == 1 for _, n in per_video)
    assert not list((out / "_vidlens" / "staging").rglob("*.parquet"))
    # each run whose rows are shown is in the runs table once: the killed ones by the row they
    # opened with, so search knows the model behind their embeddings
    runs = dict(con.execute("select run_id, status from runs").fetchall())
    assert con.execute("select count(*) from runs").fetchone()[0] == len(runs)
    shown = {r for (r,) in con.execute("select distinct run_id from videos").fetchall()}
    assert len(shown) >= 3 and shown <= set(runs)
    statuses = [status for _, status in sorted(runs.items())]
    assert statuses[-1] == "succeeded" and set(statuses[:-1]) == {"interrupted"}
    from pipeline.search import embedding_source

    assert embedding_source(con).run_ids == tuple(sorted(shown))


def test_an_overlapping_run_refuses_to_start(tmp_path, clip_folder, tiny_models):
    out = tmp_path / "out"
    first = _cli(clip_folder, out, tiny_models, "locked:1:pause", wait=False)
    try:
        lock = out / "_vidlens" / "lock"
        deadline = time.time() + 120
        while not (lock.exists() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = _cli(clip_folder, out, tiny_models)
        assert second.returncode == EXIT_FAILED
        assert "is locked by run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert str(out) in second.stderr and "Wait for it to finish" in second.stderr
    finally:
        first.kill()
        first.communicate()
    # SIGKILL released the lock: the next run starts at once and finishes
    assert _cli(clip_folder, out, tiny_models).returncode == 0


def test_a_source_emptied_away_marks_its_videos_missing_and_a_mistyped_one_is_refused(tmp_path, synthetic_clips,
                                                                                       tiny_models):
    """A bucket prefix with no objects left no longer exists: the nightly run over it must still
    mark its videos missing, where a source the output never had videos from is a typo."""
    from pipeline.sources import SourceError

    videos, out = tmp_path / "incoming", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    kept = tmp_path / "kept" / "clip.mp4"
    kept.parent.mkdir()
    shutil.copy(next(videos.glob("*.mp4")), kept)
    config = _config(tiny_models)
    assert run_job(str(tmp_path), str(out), config, progress=False).exit_code == 0  # fed from the parent
    shutil.rmtree(videos)
    emptied = run_job(str(videos), str(out), config, progress=False)
    assert emptied.exit_code == 0 and len(emptied.missing) == 2 and str(kept) not in emptied.missing
    assert emptied.warnings == [f"{videos} no longer exists (emptied?): 2 videos the output has from it "
                                "marked missing"]
    status = dict(_latest(out).execute("select uri, status from ledger").fetchall())
    assert status.pop(str(kept)) == "ok" and set(status.values()) == {"missing"}
    again = run_job(str(videos), str(out), config, progress=False)  # the next night: said, not marked again
    assert again.missing == [] and again.warnings == [
        f"{videos} no longer exists (emptied?): the output's 2 videos from it were marked missing before"]
    with pytest.raises(SourceError, match="does not exist"):
        run_job(str(tmp_path / "incomming"), str(out), config, progress=False)
    # a run over one file, or a manifest, judges no other video deleted; a deleted file source is emptied
    assert run_job(str(kept), str(out), config, progress=False).missing == []
    manifest = tmp_path / "redo.csv"
    manifest.write_text(f"uri\n{kept}\n")
    assert run_job(str(manifest), str(out), config, progress=False, full=True).missing == []
    kept.unlink()
    assert run_job(str(kept), str(out), config, progress=False).missing == [str(kept)]


def test_a_manifest_naming_a_deleted_video_marks_it_missing_and_keeps_its_rows(tmp_path, synthetic_clips, tiny_models):
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    config = _config(tiny_models)
    run_job(str(videos), str(out), config, progress=False)
    gone = videos / "clip00.mp4"
    os.replace(gone, tmp_path / "clip00.mp4")
    manifest = tmp_path / "redo.csv"
    manifest.write_text(f"uri\n{os.path.relpath(gone, tmp_path)}\n")  # relative to the manifest
    assert dry_run(str(manifest), str(out), config).summary.missing == [str(gone)]
    redo = run_job(str(manifest), str(out), config, progress=False)
    assert redo.reasons == {"missing": 1} and redo.missing == [str(gone)] and redo.exit_code == 0
    con = _latest(out)
    assert con.execute("select status from ledger where uri = ?", [str(gone)]).fetchone() == ("missing",)
    assert con.execute("select count(*) from videos where uri = ?", [str(gone)]).fetchone() == (1,)
    assert con.execute("select count(*) from errors").fetchone() == (0,)
    again = run_job(str(manifest), str(out), config, progress=False)  # marked once, not again each night
    assert again.reasons == {"missing": 1} and again.missing == [] and again.counts["videos_missing"] == 0
    assert dry_run(str(manifest), str(out), config).summary.missing == []  # (the dry run says so too)
    os.replace(tmp_path / "clip00.mp4", gone)
    assert run_job(str(videos), str(out), config, progress=False).reasons == {"returned": 1, "unchanged": 1}


def test_a_run_over_one_folder_leaves_the_videos_of_another_in_the_same_output_alone(tmp_path, synthetic_clips,
                                                                                      tiny_models):
    # two cameras' folders into one output, each run nightly: neither run judges the other's videos
    # (a video deleted from one is that folder's run's to mark missing, and report)
    out, first, second = tmp_path / "out", tmp_path / "camera1", tmp_path / "camera2"
    _videos(first, 1, synthetic_clips)
    _videos(second, 1, synthetic_clips)
    config = _config(tiny_models)
    for source in (first, second):
        assert run_job(str(source), str(out), config, progress=False).reasons == {"new": 1}
    (deleted,) = second.iterdir()
    deleted.unlink()
    again = run_job(str(first), str(out), config, progress=False)
    assert again.reasons == {"unchanged": 1} and again.missing == []
    assert _latest(out).execute("select count(*) from ledger where status = 'missing'").fetchone() == (0,)
    emptied = run_job(str(second), str(out), config, progress=False)
    assert emptied.missing == [str(deleted)]
    assert not any("no videos found" in warning for warning in emptied.warnings)  # (its videos were deleted)


def test_a_manifest_naming_a_video_twice_runs_it_once_and_the_summary_counts_every_videos_rows(
        tmp_path, synthetic_clips, tiny_models):
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    first, second = sorted(videos.iterdir())
    manifest = tmp_path / "twice.csv"
    manifest.write_text(f"uri\n{first}\n{second}\n{first}\n")
    summary = run_job(str(manifest), str(out), _config(tiny_models), progress=False)
    assert summary.counts["videos_listed"] == summary.counts["videos_total"] == 2 and summary.reasons == {"new": 2}
    con = _latest(out)
    assert con.execute("select count(*) from videos_history").fetchone() == (2,)
    for table in ("videos", "labels", "captions"):  # the rows of both videos, not the last one's
        assert summary.counts[table] == con.execute(f"select count(*) from {table}_history").fetchone()[0] >= 2


def test_videos_a_folder_does_not_list_are_missing_only_once_deleted(tmp_path, synthetic_clips, tiny_models):
    """A video the output has from a run over one file, a manifest or a linked folder, that the
    folder's own listing leaves out (another extension, a hidden folder, a link the walk does not
    follow), was marked missing by a run over the folder though it was there; and a recursive
    glob's top-level videos, which it lists, were never marked missing once deleted."""
    videos, out, mounted = tmp_path / "videos", tmp_path / "out", tmp_path / "mounted"
    _videos(videos, 1, synthetic_clips)
    clip = next(videos.iterdir())
    (videos / ".incoming").mkdir()
    mounted.mkdir()
    left_out = [videos / "camera.h264x", videos / ".incoming" / "b.mp4", videos / "cam1" / "c.mp4"]
    shutil.copy(clip, left_out[0])
    shutil.copy(clip, left_out[1])
    shutil.copy(clip, mounted / "c.mp4")
    (videos / "cam1").symlink_to(mounted)
    manifest = tmp_path / "hidden.csv"
    manifest.write_text(f"uri\n{left_out[1]}\n")
    config = _config(tiny_models)
    for source in (left_out[0], manifest, videos / "cam1"):
        assert run_job(str(source), str(out), config, progress=False).reasons == {"new": 1}
    folder = run_job(str(videos), str(out), config, progress=False)
    assert folder.reasons == {"new": 1} and folder.missing == []
    for path in left_out:
        path.unlink()
    assert sorted(run_job(str(videos), str(out), config, progress=False).missing) == sorted(map(str, left_out))
    assert run_job(str(videos), str(out), config, progress=False).missing == []  # (marked once)
    glob = str(videos / "**" / "*.mp4")
    assert run_job(glob, str(out), config, progress=False).reasons == {"unchanged": 1}
    clip.unlink()
    assert run_job(glob, str(out), config, progress=False).missing == [str(clip)]


def test_a_file_the_listing_leaves_out_is_a_warning_of_the_summary(tmp_path, synthetic_clips, tiny_models):
    videos = tmp_path / "videos"
    _videos(videos, 1, synthetic_clips)
    shutil.copy(videos / "clip00.mp4", videos / os.fsdecode(b"caf\xe9.mp4"))  # a Latin-1 name
    summary = run_job(str(videos), str(tmp_path / "out"), _config(tiny_models), progress=False)
    assert summary.counts["videos_ok"] == 1 and summary.exit_code == 0
    assert summary.warnings == [f"{videos}/caf\\xe9.mp4: left out: its name is not UTF-8 (rename it, e.g. with "
                                "convmv, to process it)"]
    assert "left out" in summary.to_json()
    from pipeline.sources import SourceError

    # named as the source itself: an error saying so (it failed writing the name to the tables)
    with pytest.raises(SourceError, match=r"caf\\xe9.mp4: its name is not UTF-8 \(rename it"):
        run_job(str(videos / os.fsdecode(b"caf\xe9.mp4")), str(tmp_path / "out"), _config(tiny_models), progress=False)


def test_a_folder_that_cannot_be_read_is_said_and_its_videos_are_not_missing(tmp_path, synthetic_clips, tiny_models,
                                                                             monkeypatch):
    """A folder the job may not read (root has no such limit: the refusal is simulated) was left out
    by the walk without a word, and every video under it marked missing, the run a success."""
    from pipeline.sources import SourceError

    videos, out = tmp_path / "in" / "videos", tmp_path / "out"
    for sub in ("a", "b"):
        _videos(videos / sub, 1, synthetic_clips)
    config = _config(tiny_models)
    assert run_job(str(videos), str(out), config, progress=False).counts["videos_ok"] == 2
    refused = {str(videos / "b")}
    scandir, stat = os.scandir, os.stat

    def refusing(call, itself=True):  # (a folder's own stat needs only its parent's permission)
        def refuse(path=".", *args, **kwargs):
            if any(itself and str(path) == folder or str(path).startswith(folder + "/") for folder in refused):
                raise PermissionError(13, "Permission denied", str(path))
            return call(path, *args, **kwargs)
        return refuse

    monkeypatch.setattr(os, "scandir", refusing(scandir))
    monkeypatch.setattr(os, "stat", refusing(stat, itself=False))
    summary = run_job(str(videos), str(out), config, progress=False)
    assert summary.missing == [] and summary.reasons == {"unchanged": 1}
    assert summary.warnings == [f"{videos}/b: left out, with every video under it: the folder cannot be read "
                                "(Permission denied); give this job read access to it"]
    assert set(dict(_latest(out).execute("select uri, status from ledger").fetchall()).values()) == {"ok"}
    for pattern in ("*/*.mp4", "**/*.mp4"):  # a glob too said nothing of it
        summary = run_job(str(videos / pattern), str(out), config, progress=False)
        assert summary.missing == [] and summary.reasons == {"unchanged": 1}
        assert summary.warnings == [f"{videos}/b: left out, with every video under it: the folder cannot be read "
                                    "(Permission denied); give this job read access to it"]
    summary = run_job(str(videos / "*" / "sub" / "*.mp4"), str(out), config, progress=False)  # one it passes through
    assert summary.warnings[0] == (f"{videos}/b: left out, with every video under it: the folder cannot be read "
                                   "(Permission denied); give this job read access to it")
    for folder in (videos, videos.parent):  # the folder, or the one it is in (not "does not exist", or emptied)
        refused.add(str(folder))
        with pytest.raises(SourceError, match="cannot be read .Permission denied.: give this job read access"):
            run_job(str(videos), str(out), config, progress=False)
        with pytest.raises(SourceError, match="cannot be read"):  # (glob matched nothing there, without a word)
            run_job(str(videos / "*" / "*.mp4"), str(out), config, progress=False)
    # a folder that can be listed but not entered (chmod 644): its files cannot be looked at
    refused.clear()
    monkeypatch.setattr(os, "scandir", scandir)
    entered = {str(videos / "b")}
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(path))) if os.path.dirname(str(path)) in entered
        else stat(path, *args, **kwargs))
    summary = run_job(str(videos), str(out), config, progress=False)
    assert summary.missing == [] and summary.reasons == {"unchanged": 1} and summary.warnings == [
        f"{videos}/b: left out, with every video under it: the folder cannot be read (Permission denied); "
        "give this job read access to it"]
    entered.add(str(videos / "a"))
    with pytest.raises(SourceError, match="cannot be read"):
        run_job(str(videos / "a"), str(out), config, progress=False)
    access = os.access  # (root enters any folder: its check is simulated too)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(videos / "a") and access(path, mode))
    with pytest.raises(SourceError, match="cannot be read"):  # (a glob matched nothing there, without a word)
        run_job(str(videos / "a" / "*.mp4"), str(out), config, progress=False)
    assert set(dict(_latest(out).execute("select uri, status from ledger").fetchall()).values()) == {"ok"}


def test_a_source_judges_only_the_videos_it_would_list():
    from pipeline.sources import source_scope

    folder = source_scope("/data/in/")
    assert folder("/data/in/a.mp4") and folder("/data/in/x/b.mp4") and not folder("/data/inbox/c.mp4")
    files = source_scope("/data/in/*.mp4")
    assert files("/data/in/a.mp4") and not files("/data/in/x/b.mp4") and not files("/data/in/a.mkv")
    assert source_scope("/data/**/*.mp4")("/data/in/x/b.mp4")
    assert source_scope("/data/**/*.mp4")("/data/b.mp4")  # glob's "**/" is no folder too: it lists this one
    deeper = source_scope("/data/**/in/**/*.mp4")
    assert deeper("/data/in/a.mp4") and deeper("/data/x/in/y/a.mp4") and not deeper("/data/x/a.mp4")
    assert source_scope("s3://b/in")("s3://b/in/a.mp4") and not source_scope("s3://b/in")("s3://b/inbox/a.mp4")
    assert not source_scope("/data/list.csv")("/data/in/a.mp4")


def test_the_plan_starts_the_stages_its_videos_need(monkeypatch):
    from pipeline import run_listing
    from pipeline.plan import build_plan
    from workers.task import VideoRef, VideoTask

    def tasks(*stages):
        return iter([VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, 1, None, str(i)), stages=s) for i, s in enumerate(stages)])

    texts, captions = frozenset({"decode", "shots", "sample", "ocr"}), frozenset({"decode", "shots", "sample", "captions"})
    ahead, stages = run_listing.read_ahead(tasks(texts, captions, texts))
    assert len(ahead) == 3 and stages == texts | captions
    stream = tasks(texts, None, texts)  # a new video needs every stage: no need to read on
    ahead, stages = run_listing.read_ahead(stream)
    assert len(ahead) == 2 and stages is None and len(list(stream)) == 1
    monkeypatch.setattr(run_listing, "READ_AHEAD_VIDEOS", 2)  # a listing that goes on past the read-ahead
    assert run_listing.read_ahead(tasks(texts, texts, texts))[1] is None
    assert run_listing.read_ahead(iter([])) == ([], None)
    stream = tasks(texts, texts, texts, texts)  # read no further than READ_AHEAD_VIDEOS: the rest waits its turn
    ahead, stages = run_listing.read_ahead(stream)
    assert len(ahead) == 2 and stages is None and len(list(stream)) == 2

    config = RunConfig.from_dict({"stages": ["shots", "objects", "captions", "ocr"]})
    names = [spec.name for spec in build_plan(config, gpus_visible=0, stages=texts)]
    assert names == ["decode", "shots", "sample", "ocr"]
    assert [spec.name for spec in build_plan(config, gpus_visible=0, stages=captions)][-1] == "captions"


@pytest.mark.parametrize("bad", ["2024-13-01x", "yesterday"])
def test_a_bad_run_date_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="run date"):
        run_job(str(tmp_path), str(tmp_path / "out"), RunConfig(), run_date=bad)


def test_forgotten_videos_leave_no_row_in_any_view_or_file(tmp_path, synthetic_clips, tiny_models, capsys,
                                                           monkeypatch):
    import pyarrow.parquet as pq

    from pipeline.cli import main

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 4, synthetic_clips)
    (videos / "broken.mp4").write_bytes(b"not a video")  # a video with an errors row only
    config = _config(tiny_models, thumbnails=True)
    run_job(str(videos), str(out), config, progress=False)
    con = _latest(out)
    ids = dict(con.execute("select uri, video_id from videos").fetchall())
    ids |= dict(con.execute("select uri, video_id from errors").fetchall())
    gone, taken_down, broken = (str(videos / name) for name in ("clip01.mkv", "clip02.mp4", "broken.mp4"))
    os.remove(gone)
    run_job(str(videos), str(out), config, progress=False)  # the ledger marks clip01 missing

    forgotten = {ids[gone], ids[taken_down], ids[broken]}
    holding = [pq.read_table(path, columns=["video_id"])["video_id"].to_pylist() for path in out.rglob("*.parquet")
               if "_vidlens" not in path.parts and path.parent.parent.name != "runs"]
    rows = sum(len([v for v in ids_of_file if v in forgotten]) for ids_of_file in holding)
    files = sum(bool(set(ids_of_file) & forgotten) for ids_of_file in holding)
    assert main(["forget", str(out), taken_down, "--missing", broken]) == 0  # URIs before and after the flag
    # counted in the tables, as a user sees them: not the store's own record of attempts
    assert f"forgot 3 videos in {out}: {rows} rows removed from {files} files" in capsys.readouterr().out
    con = _latest(out)
    for table in ("videos", "segments", "frames", "labels", "captions", "thumbnails", "errors"):
        for view in (table, f"{table}_history"):
            shown = {v for (v,) in con.execute(f"select distinct video_id from {view}").fetchall()}
            assert not shown & forgotten, view
    kept = sorted(set(ids) - {gone, taken_down, broken})
    assert sorted(u for (u,) in con.execute("select uri from ledger").fetchall()) == kept
    assert sorted(u for (u,) in con.execute("select uri from videos").fetchall()) == kept
    assert list((out / "_vidlens" / "attempts").rglob("*.parquet"))
    for path in out.rglob("*.parquet"):  # (the store's record of what each run attempted too)
        if ("_vidlens" not in path.parts or "attempts" in path.parts) and path.parent.parent.name != "runs":
            assert not set(pq.read_table(path, columns=["video_id"])["video_id"].to_pylist()) & forgotten, path
    assert con.execute("select count(*) from runs").fetchone()[0] == 2  # the runs are history, kept
    for path in (out / "_vidlens").rglob("*"):  # manifests and ledger snapshots keep no name either
        if path.is_file():
            assert not any(name.encode() in path.read_bytes() for name in ("clip01", "clip02", "broken")), path

    # the next run: nothing to redo for the others
    os.remove(taken_down)
    os.remove(broken)
    after = run_job(str(videos), str(out), config, progress=False)
    assert after.reasons == {"unchanged": 2} and after.counts["videos_missing"] == 0
    assert main(["forget", str(out), "--missing"]) == 0
    assert "nothing to forget" in capsys.readouterr().out
    assert main(["forget", str(out)]) == 2  # neither URIs nor --missing
    with pytest.raises(SystemExit):  # a flag it does not know is still refused
        main(["forget", str(out), "--missing", "--everything"])
    assert "unrecognized arguments: --everything" in capsys.readouterr().err
    assert main(["forget", str(out), str(videos / "never-there.mp4")]) == 2
    assert "is not in" in capsys.readouterr().err
    monkeypatch.chdir(videos)
    assert main(["forget", str(out), "clip00.mp4"]) == 0  # relative to here, as paths are
    assert re.search(r"^forgot 1 video in .*, its ledger entry dropped from the ledger and 1 manifest$",
                     capsys.readouterr().out, re.MULTILINE)  # (it said "their ledger entries" of 1 video)
    assert main(["forget", str(tmp_path / "not-an-output"), "--missing"]) == 2  # and makes nothing there
    assert not (tmp_path / "not-an-output").exists() and "holds no vidlens outputs" in capsys.readouterr().err


def test_a_forget_interrupted_midway_finishes_when_run_again(tmp_path, synthetic_clips, tiny_models, monkeypatch):
    from pipeline import forget as forgetting

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    gone = str(videos / "clip00.mp4")
    os.remove(gone)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    rewrite, calls = forgetting._rewrite_without, []

    def dies_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed midway
        calls.append(args)
        return rewrite(*args)

    monkeypatch.setattr(forgetting, "_rewrite_without", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        forgetting.forget(str(out), missing=True)
    monkeypatch.setattr(forgetting, "_rewrite_without", rewrite)
    again = forgetting.forget(str(out), missing=True)  # the killed one is finished first
    assert again.finished == 1 and again.videos == 0
    con = _latest(out)
    for table in ("videos", "frames", "labels", "captions"):
        assert con.execute(f"select count(*) from {table}_history where video_id not in "
                           f"(select video_id from ledger)").fetchone()[0] == 0, table
    assert [u for (u,) in con.execute("select uri from ledger").fetchall()] == [str(videos / "clip01.mkv")]



def test_a_run_that_finishes_a_forget_then_fails_before_publishing_names_no_run(tmp_path, synthetic_clips,
                                                                                tiny_models, monkeypatch):
    """(mutation review) The manifests the run's recovery publishes (a forget killed midway) are
    not its own: a run that failed before it published a batch of its own has no runs row for
    its summary to name."""
    from pipeline import forget as forgetting
    from pipeline.sources import SourceError

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    os.remove(videos / "clip00.mp4")
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    rewrite = forgetting._rewrite_without

    def interrupted(*args):
        raise KeyboardInterrupt  # killed after its intent

    monkeypatch.setattr(forgetting, "_rewrite_without", interrupted)
    with pytest.raises(KeyboardInterrupt):
        forgetting.forget(str(out), missing=True)
    monkeypatch.setattr(forgetting, "_rewrite_without", rewrite)
    runs = _latest(out).execute("select run_id from runs order by run_id").fetchall()
    with pytest.raises(SourceError) as raised:
        run_job(str(tmp_path / "gone"), str(out), _config(tiny_models), progress=False)
    assert raised.value.run_summary.run_id == ""
    assert raised.value.run_summary.status == "error"  # (it said "running": `vidlens run` alone rewrote it)
    assert forgetting.forget(str(out), missing=True).finished == 0  # (the failed run's recovery finished it)
    assert _latest(out).execute("select run_id from runs order by run_id").fetchall() == runs

def _vidlens(*args: str, failpoint: str = "") -> subprocess.CompletedProcess:
    """`vidlens ARGS` in a new process, killed at `failpoint` (see `pipeline.failpoints.failpoint`) when given."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VIDLENS_FAILPOINT": failpoint})


def test_a_forget_killed_after_a_rewrite_deletes_the_replaced_file_when_run_again(tmp_path, synthetic_clips,
                                                                                  tiny_models):
    # the replaced file, listed nowhere once its rewrite is published, kept the forgotten rows
    import pyarrow.parquet as pq

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    gone = str(videos / "clip00.mp4")
    gone_id = _latest(out).execute("select video_id from videos where uri = ?", [gone]).fetchone()[0]
    assert _vidlens("forget", str(out), gone, failpoint="committed:2").returncode == -signal.SIGKILL  # (1: its intent)
    assert _vidlens("forget", str(out), gone).returncode == 0
    tables = [p for p in out.rglob("*.parquet") if "_vidlens" not in p.parts and p.parent.parent.name != "runs"]
    holding = [p.relative_to(out) for p in tables
               if gone_id in pq.read_table(p, columns=["video_id"])["video_id"].to_pylist()]
    assert holding == [], f"files still holding the forgotten video's rows: {holding}"


def test_a_compact_killed_after_a_group_deletes_its_old_files_when_run_again(tmp_path, synthetic_clips, tiny_models):
    # old files listed by no manifest stayed forever, and pd.read_parquet("out/<table>") read their rows twice
    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 3, synthetic_clips)
    run_job(str(videos), str(out), _config(tiny_models, commit_every_videos=1), progress=False)
    assert _vidlens("compact", str(out), failpoint="committed:1").returncode == -signal.SIGKILL
    assert _vidlens("compact", str(out)).returncode == 0
    live = {r["path"] for r in Store(str(out)).state().files.values()}
    orphans = [str(p.relative_to(out)) for p in out.rglob("*.parquet")
               if ("_vidlens" not in p.parts or "attempts" in p.parts) and str(p.relative_to(out)) not in live]
    assert orphans == [], f"replaced files never deleted: {orphans}"


def test_a_forget_killed_after_its_forget_manifest_finishes_when_run_again(tmp_path, synthetic_clips, tiny_models):
    # the rerun found the URI gone from the ledger and exited 2, and the old ledger snapshot kept its name
    from pipeline import forget as forgetting

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    gone = str(videos / "clip00.mp4")
    store = Store(str(out))
    state = store.state()
    rewrites = len(forgetting._files_holding(store, state, {state.entries[gone]["video_id"]}))
    assert _vidlens("forget", str(out), gone, failpoint=f"committed:{rewrites + 2}").returncode == -signal.SIGKILL
    again = _vidlens("forget", str(out), gone)
    naming = [p.relative_to(out) for p in (out / "_vidlens").rglob("*") if p.is_file() and b"clip00" in p.read_bytes()]
    assert again.returncode == 0 and naming == [], (again.returncode, again.stderr[-300:], naming)
    assert f"{gone} was forgotten already" in again.stdout


@pytest.mark.parametrize("manifests", [1, 3], ids=["after its intent", "after two rewrites"])
def test_a_run_after_a_forget_killed_midway_finishes_it(tmp_path, synthetic_clips, tiny_models, manifests):
    # the run took the half-forgotten video as unchanged (the ledger still said ok): it kept it so,
    # some or all of its rows gone, and wrote a snapshot naming it
    import pyarrow.parquet as pq

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    first = run_job(str(videos), str(out), _config(tiny_models), progress=False).run_id
    gone = str(videos / "clip00.mp4")
    killed = _vidlens("forget", str(out), gone, failpoint=f"committed:{manifests}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-500:]
    summary = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    # forgotten: a video in the source again is a new video, made again whole
    assert summary.reasons == {"new": 1, "unchanged": 1}, summary.render()
    con = _latest(out)
    gone_id = con.execute("select video_id from videos where uri = ?", [gone]).fetchone()[0]
    for table in ("videos", "segments", "frames", "labels"):
        runs = dict(con.execute(f"select video_id, list(distinct run_id) from {table}_history group by 1").fetchall())
        assert sorted(runs) == sorted(con.execute("select video_id from ledger").fetchall()[i][0] for i in range(2))
        assert runs[gone_id] == [summary.run_id], table
    for path in out.rglob("*.parquet"):
        if "_vidlens" not in path.parts and path.parent.parent.name != "runs":
            rows = pq.read_table(path, columns=["video_id", "run_id"]).to_pylist()
            assert {"video_id": gone_id, "run_id": first} not in rows, path


def test_a_forget_a_run_finishes_folds_before_the_runs_batches(tmp_path, synthetic_clips, tiny_models):
    # the run's id, taken before its recovery finished the forget, sorted before the forget manifest: folded
    # in name order (no snapshot, or one that cannot be read) the manifests dropped the video the run made again
    import shutil

    videos, out = tmp_path / "videos", tmp_path / "out"
    _videos(videos, 2, synthetic_clips)
    run_job(str(videos), str(out), _config(tiny_models), progress=False)
    gone = str(videos / "clip00.mp4")
    assert _vidlens("forget", str(out), gone, failpoint="committed:1").returncode == -signal.SIGKILL  # its intent
    summary = run_job(str(videos), str(out), _config(tiny_models), progress=False)
    assert summary.reasons == {"new": 1, "unchanged": 1}, summary.render()
    shutil.rmtree(out / "_vidlens" / "snapshots")  # the manifests alone, folded in name order
    assert sorted(Store(str(out)).ledger_entries()) == sorted(str(p) for p in videos.iterdir())
    names = Store(str(out)).manifests()
    assert names[-1].startswith(summary.run_id), names


def test_a_runs_end_walks_the_ledger_with_no_batch_being_published(tmp_path, synthetic_clips, tiny_models,
                                                                  monkeypatch):
    """A batch published on the publishing thread adds entries to the ledger the run's end walks
    for missing videos (the store's own dict, not a copy): "dictionary changed size during
    iteration" ended a run over a large output after all its videos were done."""
    import pipeline.job
    import pipeline.run_listing

    in_flight, at_walk = [0], []
    publish, scope = Store.publish, pipeline.run_listing.source_scope

    def slow(self, manifest, name, later=None):
        in_flight[0] += 1
        try:
            time.sleep(0.3)  # a bucket's round trips
            publish(self, manifest, name, later)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(Store, "publish", slow)
    monkeypatch.setattr(pipeline.run_listing, "source_scope", lambda source: at_walk.append(in_flight[0]) or scope(source))
    videos = tmp_path / "videos"
    _videos(videos, 3, synthetic_clips)
    summary = run_job(str(videos), str(tmp_path / "out"), _config(tiny_models, commit_every_videos=1), progress=False)
    assert summary.counts["videos_ok"] == 3 and summary.counts["batches"] == 4
    assert at_walk == [0]
