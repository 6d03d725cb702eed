"""The `vidlens` command line on bad input: one line naming the input and the fix, exit code 2.

Bucket errors are tested next to the S3 server in tests/test_buckets.py.
"""

import os
import re

import pytest

from pipeline.cli import main
from pipeline.storage_errors import storage_problem
from pipeline.compact import compact
from pipeline.job import run_job
from pipeline.summary import RunSummary
from schemas.config import RunConfig


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- run dates ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["run", "videos", "--out", "out"],
    ["compact", "out"],
    ["submit", "videos", "--out", "out", "--address", "http://127.0.0.1:9"],
])
@pytest.mark.parametrize("date", ["2024-13-40", "2023-02-29", "2024-5-31"])
def test_every_run_date_flag_refuses_a_day_that_does_not_exist(command, date, capsys):
    assert main(command + ["--run-date", date]) == 2
    err = _error(capsys)
    assert f"--run-date: run date '{date}' is not a" in err and "YYYY-MM-DD" in err
    assert "usage:" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command, said", [
    (["compact", ""], "vidlens compact: no output given (it is an empty path)"),
    (["forget", "", "--missing"], "vidlens forget: no output given (it is an empty path)"),
    (["query", "", "select 1"], "vidlens query: no output given (it is an empty path)"),
    (["report", "", "--html", "report"], "vidlens report: no output given (it is an empty path)"),
    (["search", "", "a cat"], "vidlens search: no output given (it is an empty path)"),
    (["run", "", "--out", "out"], "vidlens run: no source given (it is an empty path)"),
    (["run", "videos", "--out", "", "--dry-run"], "vidlens run: no output given (--out is an empty path)"),
    (["schedule", "videos", "--out", ""], "vidlens schedule: no output given (--out is an empty path)"),
    (["submit", "videos", "--out", "", "--address", "http://127.0.0.1:9"],
     "vidlens submit: no output given (--out is an empty path)"),
    (["run", "videos", "--out", "out", "--config", ""], "--config is an empty path (an unset variable?)"),
    (["run", "videos", "--out", "out", "--queries-file", ""], "--queries-file is an empty path (an unset variable?)"),
    (["run", "videos", "--out", "out", "--summary-json", ""], "--summary-json is an empty path (an unset variable?)"),
    (["schedule", "videos", "--out", "out", "--log-dir", ""], "--log-dir is an empty path (an unset variable?)"),
    (["query", "out", "select 1", "--config", ""], "--config is an empty path (an unset variable?)"),
    (["doctor", "--keep", ""], "--keep is an empty path (an unset variable?)"),
])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(command, said, tmp_path, monkeypatch, capsys):
    # `run VIDEOS --out ""` planned a run into the current folder and `schedule` wrote it into a cron
    # line; `compact ""` said " holds no vidlens outputs", naming nothing. An empty path flag was left
    # out without a word: `--config "$CONFIG"` unset ran every default (a nightly run redid every
    # video with the default models), and `doctor --keep ""` ran the doctor without keeping anything
    monkeypatch.chdir(tmp_path)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip.mp4").write_bytes(b"not decoded")
    assert main(command) == 2
    err = _error(capsys)
    assert err.startswith(f"vidlens: error: {said}: give ") and len(err.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["videos"]


def test_the_api_refuses_an_impossible_run_date_before_writing(tmp_path):
    with pytest.raises(ValueError, match="'2024-13-40' is not a calendar date"):
        run_job(str(tmp_path), str(tmp_path / "out"), RunConfig(), progress=False, run_date="2024-13-40")
    with pytest.raises(ValueError, match="'2024-02-30' is not a calendar date"):
        compact(str(tmp_path / "out"), run_date="2024-02-30")
    assert not (tmp_path / "out").exists()


def test_a_run_that_fails_before_writing_leaves_no_output_behind(tmp_path, capsys):
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "out", tmp_path / "kept"):
        assert main(["run", str(tmp_path / "no-such-videos"), "--out", str(out), "--executor", "local",
                     "--no-progress"]) == 2
        assert "does not exist" in _error(capsys)
    # (a query would have said the folder holds no vidlens tables)
    assert not (tmp_path / "new").exists() and list((tmp_path / "kept").iterdir()) == []


def test_a_leap_day_is_a_run_date(tmp_path):
    (tmp_path / "videos").mkdir()
    summary = run_job(str(tmp_path / "videos"), str(tmp_path / "out"), RunConfig(), progress=False,
                      run_date="2024-02-29")
    assert summary.exit_code == 0 and (tmp_path / "out" / "runs" / "run_date=2024-02-29").is_dir()


# --- paths that cannot be what they are given as ---------------------------------------------


def test_schedule_refuses_a_config_file_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nightly.yaml"
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(missing)]) == 2
    err = _error(capsys)
    assert f"--config {missing}: no such file" in err
    assert capsys.readouterr().out == ""  # no cron line printed


def test_schedule_given_a_config_folder_says_it_is_one(tmp_path, capsys):
    # it said "no such file" of a folder that is there
    folder = tmp_path / "configs"
    folder.mkdir()
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(folder)]) == 2
    said = capsys.readouterr()
    assert said.err.strip() == f"vidlens: error: --config {folder} is a folder: give the YAML or TOML file in it"
    assert said.out == ""  # no cron line printed


def test_schedule_refuses_a_config_that_would_fail_every_night(tmp_path, capsys):
    config = tmp_path / "nightly.yaml"
    config.write_text("sampling:\n  num_framez: 8\n")
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert "num_framez" in _error(capsys)
    # what only a run's plan and model stages said: a stage misspelled in per_stage, a precision
    for text, said in (("resources:\n  per_stage: {captoins: {num_gpus: 0.5}}\n", "per_stage.captoins: not a stage"),
                       ("models:\n  dtype: bf16\n", "models.dtype: 'bf16' is not one of")):
        config.write_text(text)
        assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
        assert said in _error(capsys)
        # and `vidlens submit` says it before it reaches the cluster (none is at this address)
        assert main(["submit", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config),
                     "--address", "http://127.0.0.1:1"]) == 2
        assert said in _error(capsys)
    # checked as the cluster runs it, on Ray, whatever executor it was tried with here
    config.write_text("models:\n  device: 'cuda:1'\nresources:\n  executor: local\n")
    for command in (["schedule", "--submit", "http://head:8265"], ["submit", "--address", "http://127.0.0.1:1"]):
        assert main([command[0], str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config),
                     *command[1:]]) == 2
        assert "on Ray each model actor sees only the GPU Ray gives it" in _error(capsys)


def test_a_dry_run_refuses_the_resources_the_run_refuses_in_its_words(tmp_path, capsys):
    """A bad `resources.per_stage` was found only once the real run started: the dry run, which
    users check a configuration with, said "1 to process" (exit 0)."""
    from pipeline.plan import PlanError, build_plan

    videos, config = tmp_path / "videos", tmp_path / "nightly.yaml"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"not decoded by a dry run")
    for text in ("resources:\n  per_stage: {captoins: {num_gpus: 0.5}}\n",
                 "resources:\n  per_stage: {embed: {num_gpus: -1}}\n",
                 "resources:\n  per_stage: {embed: {min_actors: 3}}\n",  # (max_actors: 1, the default)
                 # (mutation review) the resources' own min_actors where per_stage sets none
                 "resources:\n  min_actors: 2\n  max_actors: 2\n  per_stage: {embed: {max_actors: 1}}\n"):
        config.write_text(text)
        with pytest.raises(PlanError) as planned:  # what the run says at its start
            build_plan(RunConfig.from_file(str(config)), gpus_visible=0)
        assert main(["run", str(videos), "--out", str(tmp_path / "out"), "--config", str(config), "--dry-run",
                     "--executor", "local"]) == 2
        said = capsys.readouterr()
        assert said.err == f"vidlens: error: {planned.value}\n" and said.out == ""
        # and `vidlens schedule` before writing a schedule
        assert main(["schedule", str(videos), "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
        assert _error(capsys) == f"vidlens: error: --config {config}: {planned.value}\n"
    assert not (tmp_path / "out").exists()


def test_schedule_notes_no_aws_keys_where_the_config_gives_them(tmp_path, capsys, monkeypatch):
    """The nightly job reads a bucket's keys from the config's storage section: the note that it
    would not see the shell's AWS keys, and to keep them in ~/.aws/credentials, was noise there."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "something")
    command = ["schedule", "s3://media/videos", "--out", "s3://media/out"]
    assert main(command) == 0
    assert "the nightly job will not see AWS_ACCESS_KEY_ID" in capsys.readouterr().err
    config = tmp_path / "nightly.yaml"
    config.write_text("storage:\n  key: someone\n  secret: something\n")
    assert main(command + ["--config", str(config)]) == 0
    assert "AWS_" not in capsys.readouterr().err


def test_schedule_refuses_a_model_folder_that_is_not_there(tmp_path, capsys, monkeypatch, tiny_models):
    # accepted, it failed every night ("cannot load the embed model: the folder ... does not exist")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "nightly.yaml"
    config.write_text("models:\n  embed: ./doctor/tiny-clip\n")
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert (f"--config {config}: cannot load the embed model: the folder ./doctor/tiny-clip does not exist. Fix: "
            f"check the path (a relative one starts from {tmp_path})") in _error(capsys)
    # a captions model only where captions run; a cluster's nodes read their own folders
    config.write_text(f"stages: [embed]\nmodels:\n  embed: {tiny_models['embed']}\n  captions: ./models/git\n")
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 0
    config.write_text(f"stages: [embed, captions]\nmodels:\n  embed: {tiny_models['embed']}\n"
                      "  captions: ./models/git\n")
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert "cannot load the captions model: the folder ./models/git does not exist" in _error(capsys)
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config),
                 "--submit", "http://head:8265"]) == 0
    # a hub id beside a folder named as its owner is a hub id (the run finds no such folder in it)
    (tmp_path / "openai").mkdir()
    config.write_text("stages: [embed]\nmodels:\n  embed: openai/clip-vit-base-patch32\n")
    assert main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 0


def test_schedule_refuses_a_queries_file_that_is_not_there(tmp_path, capsys, monkeypatch):
    # accepted, every nightly run failed at its start (exit 2: "match.queries_file: ... does not exist")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "nightly.yaml"
    config.write_text("stages: [embed, match]\nmatch:\n  queries_file: queries.txt\n")
    command = ["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]
    assert main(command) == 2
    said = capsys.readouterr()
    assert f"--config {config}: match.queries_file: queries.txt does not exist" in said.err
    assert said.out == "" and "Traceback" not in said.err  # no cron line printed
    # read where match runs, from the folder the nightly runs start in; a cluster's nodes read their own
    assert main([*command, "--submit", "http://head:8265"]) == 0
    config.write_text("stages: [embed]\nmatch:\n  queries_file: queries.txt\n")
    assert main(command) == 0
    config.write_text("stages: [embed, match]\nmatch:\n  queries_file: queries.txt\n")
    (tmp_path / "queries.txt").write_text("a dog\n")
    assert main(command) == 0


def test_schedule_install_failures_are_one_line_saying_what_to_do(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no crontab here
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    command = ["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs")]
    assert main([*command, "--install"]) == 2
    assert "there is no `crontab` command on this machine: install cron, or use --systemd" in _error(capsys)
    # a systemctl that cannot reach the user's bus (SSH without a login session): the timer is not enabled
    systemctl = bin_dir / "systemctl"
    systemctl.write_text("#!/bin/sh\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n")
    systemctl.chmod(0o755)
    assert main([*command, "--systemd", "--install"]) == 2
    err = _error(capsys)
    assert "systemctl --user daemon-reload failed (Failed to connect to bus: No medium found)" in err
    assert "the timer is not enabled" in err and "installed" not in err
    assert list((tmp_path / "config" / "systemd" / "user").glob("vidlens-*.timer"))  # written, for later


def test_schedule_given_a_run_flag_says_where_the_runs_settings_go(tmp_path, capsys):
    # `vidlens schedule ... --embed-model m` was "unrecognized arguments" and nothing more
    with pytest.raises(SystemExit):
        main(["schedule", str(tmp_path), "--out", str(tmp_path / "out"), "--embed-model", "m"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --embed-model m (vidlens schedule takes the nightly runs' settings from a " \
           "--config YAML file" in err
    with pytest.raises(SystemExit):  # another command's unknown flag: no word of schedule's settings
        main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--nightly"])
    assert capsys.readouterr().err.endswith("unrecognized arguments: --nightly\n")


def test_argument_errors_do_not_repeat_a_secret(tmp_path, capsys):
    secret = "s3cr3t-value-0123"
    with pytest.raises(SystemExit):  # schedule takes no storage flags
        main(["schedule", str(tmp_path), "--out", "s3://b/out", "--storage-option", f"secret={secret}",
              "--aws_secret_access_key=" + secret])
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "secret=***" in err and secret not in err
    assert main(["query", str(tmp_path), "SELECT 1", "--storage-option", f"secret{secret}"]) == 2  # no '='
    err = _error(capsys)
    assert "--storage-option number 1 has no '='" in err and secret not in err


@pytest.mark.parametrize("command", [["query", "s4://b/out", "SELECT 1"], ["compact", "s4://b/out"],
                                     ["forget", "s4://b/out", "--missing"], ["run", "in", "--out", "s4://b/out"]])
def test_an_output_with_a_mistyped_scheme_is_named_with_the_schemes_there_are(command, tmp_path, capsys,
                                                                              monkeypatch):
    # said "vidlens: error: Protocol not known: s4": neither the output nor what to give instead
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    assert main(command) == 2
    err = _error(capsys)
    assert "error: s4://b/out: s4:// is the scheme of no storage vidlens can read" in err, err
    assert "s3://" in err and not (tmp_path / "s4:").exists()


def test_an_output_that_is_a_file_is_refused_by_name(tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("not a folder")
    assert main(["run", str(tmp_path), "--out", str(taken), "--executor", "local", "--no-progress"]) == 2
    err = _error(capsys)
    assert f"output '{taken}' is a file, not a folder" in err and "Errno" not in err
    assert main(["run", str(tmp_path), "--out", str(taken / "out"), "--executor", "local"]) == 2
    assert f"is inside {taken}, which is a file" in _error(capsys)
    assert main(["query", str(taken), "SELECT 1"]) == 2
    # (it said "a run or a report creates it if missing": a report makes its own folder, not an output)
    assert f"output '{taken}' is a file, not a folder: name a folder (a run makes it if missing)" in _error(capsys)


def test_a_run_that_the_machine_ran_out_of_something_for_says_what_and_what_to_do(tmp_path, capsys, monkeypatch):
    """A full disk, too many open files or no memory where the run itself fails (its batch not
    published): one line that says which and what to do, not "[Errno 28] No space left on device"
    alone, nor a MemoryError's traceback."""
    import errno

    import pipeline.cli

    out = tmp_path / "out"
    said = {
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)): f"no space left on device: free space in the output ({out}) "
                                                          "or the temp folder (",
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{out}/videos/part-0.parquet"):
            f"no space left on device: free space in {out}/videos: [Errno 28]",
        OSError(errno.EMFILE, os.strerror(errno.EMFILE)): "too many open files (this process may open ",
        MemoryError(): "out of memory: give the job more memory (ulimit -v, the container's limit) or run fewer "
                       "workers: MemoryError",
        # onnxruntime's (an Exception of its own) loading OCR's model: it ended the run with a traceback
        type("Fail", (Exception,), {})("[ONNXRuntimeError] : 1 : FAIL : Load model failed:std::bad_alloc"):
            "out of memory: give the job more memory (ulimit -v, the container's limit) or run fewer workers: [ONNX",
    }
    for error, told in said.items():
        def fails(*args, error=error):
            raise error

        monkeypatch.setattr(pipeline.cli, "_run", fails)
        assert main(["run", str(tmp_path), "--out", str(out), "--no-progress"]) == 2
        assert told in _error(capsys), told
    # (mutation review) an error that says it already (a model's, loaded out of memory) says it once
    from workers.model_sources import explain_load_failure
    from workers.models import ModelLoadError

    loading = ModelLoadError(explain_load_failure(str(tmp_path), "embed", MemoryError()))  # (a folder that is there)
    loading.__cause__ = MemoryError()  # (`workers.models.load_pretrained`'s raise ... from)
    assert "out of memory: give the job more memory" in str(loading)

    def fails_to_load(*args):
        raise loading

    monkeypatch.setattr(pipeline.cli, "_run", fails_to_load)
    assert main(["run", str(tmp_path), "--out", str(out), "--no-progress"]) == 2
    assert _error(capsys) == f"vidlens: error: {loading}\n"


def test_a_report_folder_that_is_a_file_is_refused_by_name(tmp_path, capsys):
    taken = tmp_path / "report.html"
    taken.write_text("")
    assert main(["report", str(tmp_path / "out"), "--html", str(taken)]) == 2
    err = _error(capsys)
    assert f"report folder '{taken}' (--html) is a file, not a folder: name a folder (the report makes it if " \
           "missing)" in err and "Errno" not in err


@pytest.mark.parametrize("model", ["/nonexistent/clip", "./models/nonexistent-clip", "~/nonexistent-clip"])
def test_a_model_path_that_does_not_exist_is_called_a_missing_folder(model, tmp_path, synthetic_clips, capsys):
    command = ["run", str(synthetic_clips / "cuts.mp4"), "--out", str(tmp_path / "out"), "--executor", "local",
               "--stages", "embed", "--embed-model", model, "--no-progress"]
    assert main(command) == 2
    err = _error(capsys)
    assert f"the folder {model} does not exist" in err
    assert f"hf download {model}" not in err and "Repo id" not in err


# --- what the run summary says ----------------------------------------------------------------


def test_a_source_without_videos_succeeds_with_a_warning(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "notes.txt").write_text("no video here")
    assert main(["run", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "--executor", "local",
                 "--no-progress", "--summary-json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert f"warning no videos found in {tmp_path / 'videos'}" in out and ".mp4" in out and ".mkv" in out
    assert "1 batch published" in out  # the runs row of this run, published all the same
    assert "no videos found" in (tmp_path / "s.json").read_text()


def test_a_summary_json_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import pipeline.job

    monkeypatch.setattr(pipeline.job, "run_job", lambda *args, **kwargs: pytest.fail("the run started"))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder").mkdir()
    for path, message in ((tmp_path / "folder", "is a folder: name a file"),
                          (f"{tmp_path}/new/", "is a folder: name a file"),
                          (tmp_path / "a_file" / "s.json", f"{tmp_path / 'a_file'} is a file, not a folder")):
        assert main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--summary-json", str(path)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


def test_a_stopped_compact_or_forget_says_so_and_what_to_do(tmp_path, capsys, monkeypatch):
    """A compact or forget stopped by SIGTERM or Ctrl-C exited 143 or 130 without a word (chaos soak on
    az:// and gs://), where a stopped run says so and that the same command goes on."""
    import signal
    import time

    import pipeline.compact
    import pipeline.forget

    def stopped_by(signum):
        def stopped(*args, **kwargs):
            os.kill(os.getpid(), signum)
            time.sleep(10)  # (the handler raises the stop here, on the main thread)
        return stopped

    out = str(tmp_path / "out")
    monkeypatch.setattr(pipeline.compact, "compact", stopped_by(signal.SIGTERM))
    with pytest.raises(SystemExit) as stop:
        main(["compact", out])
    assert stop.value.code == 143
    assert capsys.readouterr().err.endswith(f"vidlens: compacting {out} stopped (SIGTERM): what every view shows is "
                                            "as it was; run the same command again to compact it\n")
    monkeypatch.setattr(pipeline.forget, "forget", stopped_by(signal.SIGINT))
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a pytest-xdist worker ignores it)
    try:
        assert main(["forget", out, "--missing"]) == 130
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert capsys.readouterr().err.endswith(f"vidlens: forgetting videos in {out} stopped (Ctrl-C): run the same "
                                            "command again to finish it\n")


def test_a_run_that_fails_or_is_stopped_writes_its_summary_json_too(tmp_path, capsys, monkeypatch):
    # a nightly job's watcher found no summary for the night whose run failed or was stopped
    import json
    import os
    import signal
    import time

    import pipeline.job

    path = tmp_path / "logs" / "s.json"
    assert main(["run", str(tmp_path / "gone"), "--out", str(tmp_path / "out"), "--executor", "local",
                 "--no-progress", "--summary-json", str(path)]) == 2
    failed = json.loads(path.read_text())
    assert failed["status"] == "error" and failed["exit_code"] == 2 and failed["output"] == str(tmp_path / "out")
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gone'}' does not exist" in failed["error"] and failed["error"] in err
    assert "stopped" not in err  # (a run that failed is not said to be stopped)
    assert failed["run_id"] is None and failed["counts"] == {}  # (it listed nothing, and published no runs row)

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    (tmp_path / "videos").mkdir()
    monkeypatch.setattr(pipeline.job, "_run_locked", stopped)
    with pytest.raises(SystemExit) as stop:
        main(["run", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "--executor", "local",
              "--no-progress", "--summary-json", str(path)])
    assert stop.value.code == 143
    ended = json.loads(path.read_text())
    assert ended["status"] == "stopped" and ended["exit_code"] == 143 and ended["error"] is None
    assert ended["run_id"] is None and 0 < ended["wall_seconds"] < 10  # (stopped before its first batch)
    assert capsys.readouterr().err.endswith("vidlens: the run stopped (SIGTERM): the batches it published stay; "
                                            "the same command goes on from there\n")
    # a Ctrl-C before the run had an id: "the run", not "run " and nothing
    monkeypatch.setattr(pipeline.job, "run_job", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress"])
    assert capsys.readouterr().err.endswith("vidlens: the run stopped (Ctrl-C): the batches it published stay; the "
                                            "same command goes on from there\n")


def _embed_run(tmp_path, synthetic_clips, *clips: str) -> tuple:
    """A folder of copies of the synthetic clips `clips` (cuts.mp4 alone by default), named a.mp4,
    b.mp4, ...; the output, the summary JSON's path, and `vidlens run`'s options for a local
    embed-only run of the folder into the output with that summary (`run`, the folder first)."""
    import shutil

    videos, out, path = tmp_path / "videos", tmp_path / "out", tmp_path / "s.json"
    videos.mkdir()
    for index, clip in enumerate(clips or ("cuts.mp4",)):
        shutil.copy(synthetic_clips / clip, videos / f"{chr(ord('a') + index)}.mp4")
    options = ["--out", str(out), "--executor", "local", "--stages", "embed", "--no-progress", "--summary-json",
               str(path)]
    return videos, out, path, options


def _sigterm_after_the_first_batch(monkeypatch) -> list[str]:
    """Store.publish made to send this process SIGTERM once it has published a run's first batch,
    on the publishing thread, as a supervisor stops a run; the name of that batch, once published.
    The run's later videos wait for the stop before they are recorded: with them all done first,
    the run would be at its end as the batch was published, and let the stop go (`pipeline.stops`)."""
    import os
    import signal
    import time

    import pipeline.recording
    from pipeline.store import Store

    publish, published = Store.publish, []
    record, recorded, waited = pipeline.recording.record, [], []

    def stopped_after_one(self, manifest, name, later=None):
        publish(self, manifest, name, later)
        if not published:
            published.append(name)
            os.kill(os.getpid(), signal.SIGTERM)

    def after_the_stop(*args, **kwargs):
        if recorded and not waited:  # (the stop is raised in this wait, on the main thread; once)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            finally:
                waited.append(True)
        recorded.append(True)
        return record(*args, **kwargs)

    monkeypatch.setattr(Store, "publish", stopped_after_one)
    monkeypatch.setattr(pipeline.recording, "record", after_the_stop)
    return published


def test_a_failed_runs_summary_names_it_only_where_the_runs_table_has_it(tmp_path, synthetic_clips, tiny_models,
                                                                        monkeypatch):
    # a run that failed before it published anything (a model folder that does not load) wrote
    # a run id in its summary that no runs row, nor any other row of the output, ever had
    import json
    import shutil

    import duckdb

    from pipeline.store import Store

    videos, out, path, options = _embed_run(tmp_path, synthetic_clips)
    command = ["run", str(videos), *options, "--set", "output.commit_every_videos=1"]

    def runs() -> list[tuple[str, str]]:
        con = duckdb.connect()
        Store(str(out)).register_duckdb(con)
        return con.execute("select run_id, status from runs order by run_id").fetchall()

    assert main([*command, "--embed-model", tiny_models["embed"]]) == 0
    first = json.loads(path.read_text())["run_id"]
    assert runs() == [(first, "succeeded")]
    broken = tmp_path / "broken-clip"
    shutil.copytree(tiny_models["embed"], broken)
    (broken / "config.json").write_text("{")
    shutil.copy(synthetic_clips / "text.mp4", videos / "b.mp4")
    assert main([*command, "--embed-model", str(broken)]) == 2
    failed = json.loads(path.read_text())
    assert failed["status"] == "error" and "cannot load the embed model" in failed["error"]
    assert failed["run_id"] is None and runs() == [(first, "succeeded")]
    # its first batch's manifest not written (mutation review): nothing was published either
    write_manifest = Store._write_manifest

    def disk_full(self, name, body):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "_write_manifest", disk_full)
    assert main([*command, "--embed-model", tiny_models["embed"]]) == 2
    assert json.loads(path.read_text())["run_id"] is None
    monkeypatch.setattr(Store, "_write_manifest", write_manifest)
    assert runs() == [(first, "succeeded")]

    # failed after its first batch was published: that batch's opening row describes its rows
    shutil.copy(synthetic_clips / "sub" / "order.mkv", videos / "c.mkv")
    publish, published = Store.publish, []

    def refused_after_one(self, manifest, name, later=None):
        if published:
            raise OSError("the disk is full")
        published.append(name)
        publish(self, manifest, name, later)

    monkeypatch.setattr(Store, "publish", refused_after_one)
    assert main([*command, "--embed-model", tiny_models["embed"]]) == 2
    ended = json.loads(path.read_text())
    assert ended["status"] == "error" and ended["run_id"] and published[0].startswith(ended["run_id"])
    assert runs() == [(first, "succeeded"), (ended["run_id"], "running")]

    # stopped by SIGTERM once its first batch was published, on the publishing thread (mutation review)
    shutil.copy(synthetic_clips / "sub" / "order.mkv", videos / "d.mkv")
    monkeypatch.setattr(Store, "publish", publish)
    stopped_after = _sigterm_after_the_first_batch(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        main([*command, "--embed-model", tiny_models["embed"]])
    stopped = json.loads(path.read_text())
    assert stop.value.code == 143 and stopped["status"] == "stopped" and stopped_after[0].startswith(stopped["run_id"])
    assert [run for run, _ in runs()] == [first, ended["run_id"], stopped["run_id"]]
    # its final row says it stopped, with what it did: it was shown running until a later run started
    assert runs()[-1] == (stopped["run_id"], "stopped")
    con = duckdb.connect()
    Store(str(out)).register_duckdb(con)
    finished, videos_total = con.execute("select finished_at, counts['videos_total'] from runs where run_id = ?",
                                         [stopped["run_id"]]).fetchone()
    assert finished is not None and videos_total == stopped["counts"]["videos_total"] >= 1

    def of_stopped_run() -> list[str]:
        con = duckdb.connect()
        Store(str(out)).register_duckdb(con)
        return sorted(uri for (uri,) in con.execute("select uri from ledger where last_run_id = ?",
                                                    [stopped["run_id"]]).fetchall())

    # every video it finished is published, the batch it was filling too, and not done again
    done = of_stopped_run()
    assert len(done) == stopped["counts"]["videos_total"]
    monkeypatch.setattr(Store, "publish", publish)
    assert main([*command, "--embed-model", tiny_models["embed"]]) == 0
    assert of_stopped_run() == done
    assert runs()[-2] == (stopped["run_id"], "stopped")  # (not "interrupted": it has its final row)


def test_a_stopped_runs_final_row_counts_the_videos_it_marked_missing(tmp_path, synthetic_clips, tiny_models,
                                                                        monkeypatch):
    # a manifest's video not there is marked missing as it is listed, and published with the
    # stopped run's last batch: its final row and summary had no count of them
    import json
    import os

    import duckdb

    from pipeline.store import Store

    videos, out, path, options = _embed_run(tmp_path, synthetic_clips, "cuts.mp4", "cuts.mp4", "cuts.mp4")
    command = [*options, "--set", "output.commit_every_videos=1", "--embed-model", tiny_models["embed"]]
    assert main(["run", str(videos), *command]) == 0
    os.remove(videos / "a.mp4")
    manifest = tmp_path / "redo.csv"
    manifest.write_text("uri\n" + "".join(f"{videos / name}\n" for name in ("a.mp4", "b.mp4", "c.mp4")))
    _sigterm_after_the_first_batch(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        main(["run", str(manifest), "--full", *command])
    stopped = json.loads(path.read_text())
    assert stop.value.code == 143 and stopped["status"] == "stopped" and stopped["missing"] == [str(videos / "a.mp4")]
    assert stopped["counts"]["videos_missing"] == 1
    con = duckdb.connect()
    Store(str(out)).register_duckdb(con)
    assert con.execute("select status, counts['videos_missing'] from runs where run_id = ?",
                       [stopped["run_id"]]).fetchone() == ("stopped", 1)
    assert con.execute("select status from ledger where uri = ?", [str(videos / "a.mp4")]).fetchone() == ("missing",)


def test_counts_are_said_in_words_that_agree_with_them():
    from pipeline.summary import counted

    assert [counted(n, "row") for n in (0, 1, 2)] == ["0 rows", "1 row", "2 rows"]


def test_the_progress_line_gives_the_whole_runs_rates():
    from pipeline.summary import progress_line

    assert progress_line(1, 6, 2.0) == "1 video [00:02, 0.50 videos/s, 3.0 sampled frames/s]"
    assert progress_line(30, 480, 75.0) == "30 videos [01:15, 0.40 videos/s, 6.4 sampled frames/s]"


def test_summary_lines_keep_paths_whole():
    uri = "/tmp/walk/my videos/broken.mp4"
    summary = RunSummary("r", "/tmp/walk/my videos", "out", run_date="2024-05-31", status="partial")
    summary.counts.update(batches=2, frames_sampled=30)
    summary.wall_seconds = 10.0
    message = (f"{uri}: not a media file or unsupported container ([Errno 1094995529] Invalid data found "
               f"when processing input: '{uri}')")
    summary.failures.append((uri, "decode", message))
    long_path = "/data/" + "/".join(["a-rather-long-folder-name"] * 12) + "/clip.mp4"
    summary.failures.append(("x.mp4", "captions", "x " * 140 + f"failed on '{long_path}' again"))
    text = summary.render()
    assert "2 batches published" in text and "3.0 sampled frames/s" in text
    first, second = [line for line in text.splitlines() if line.startswith("  error")]
    assert first == f"  error   {uri} [decode] not a media file or unsupported container ([Errno 1094995529] " \
                    f"Invalid data found when processing input: '{uri}')"
    assert long_path not in second and "/data/" not in second  # cut before the quoted path, not inside it
    assert second.endswith("(the whole message is in the errors table)")
    # an apostrophe opens no quote: the line was cut before it, at "the decoder ..."
    summary.failures[:] = [("y.mp4", "decode", "the decoder can't read frame 12 of this stream: " + "data " * 100)]
    (line,) = [line for line in summary.render().splitlines() if line.startswith("  error")]
    assert "can't read frame 12 of this stream: data data" in line and line.endswith("in the errors table)")
    # where in the code a failure was raised is for the errors table, not the summary's line
    summary.failures[:] = [(uri, "decode", f"{uri}: empty file (0 bytes) (at decode.py:121 in check_readable)")]
    assert [line for line in summary.render().splitlines() if line.startswith("  error")] == \
        [f"  error   {uri} [decode] empty file (0 bytes)"]


def test_a_file_name_puts_no_line_nor_escape_sequence_into_the_summary():
    """The summary names videos by their URIs, which an uploader chooses: a newline in a file name
    began a line of its choosing in the nightly log ("FAKE ..."), and an escape sequence (ESC [2J)
    cleared the terminal the summary was printed on (found in a security review)."""
    uri = "/up/a\x1b[2J\nFAKE run succeeded\r\u2028b.mp4"
    summary = RunSummary("r", "/up", "out", run_date="2024-05-31", status="partial")
    summary.failures.append((uri, "decode", f"{uri}: not a media file or unsupported container"))
    summary.missing.append(uri)
    summary.warnings.append(f"1 video given up, not run: {uri}")
    text = summary.render()
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]", text)
    shown = r"/up/a\x1b[2J\nFAKE run succeeded\r\u2028b.mp4"
    assert f"  error   {shown} [decode] not a media file or unsupported container" in text.split("\n")
    assert f"  warning 1 video given up, not run: {shown}" in text.split("\n")
    assert not any(line.startswith("FAKE") for line in text.split("\n"))


def test_a_log_record_prints_its_message_as_one_line():
    """(security review) A warning logged while a run goes names a file as it is: a newline in its name
    began a forged line of the log, an ESC [2J cleared the terminal. A traceback keeps its lines."""
    import io
    import logging

    from pipeline.log_relay import LOG_FORMAT, OneLineFormatter

    logger, said = logging.getLogger("vidlens.test.one_line"), io.StringIO()
    handler = logging.StreamHandler(said)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("stage decode failed on %s: empty file", "/up/a\x1b[2J\nWARNING forged\r\u2028b.mp4")
        logger.warning("plain é line")
        try:
            raise ValueError("two\nlines")
        except ValueError:
            logger.exception("failed on /up/c\n.mp4")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = said.getvalue().splitlines()
    assert lines[:3] == [r"WARNING vidlens.test.one_line: stage decode failed on /up/a\x1b[2J\nWARNING forged"
                         r"\r\u2028b.mp4: empty file", "WARNING vidlens.test.one_line: plain é line",
                         r"ERROR vidlens.test.one_line: failed on /up/c\n.mp4"], lines
    assert lines[3] == "Traceback (most recent call last):" and lines[-2:] == ["ValueError: two", "lines"], lines


def test_a_workers_warning_names_a_file_on_one_line(tmp_path, tiny_models):
    """(security review) A worker process's warning, relayed to the command's log (`pipeline.log_relay`),
    printed a file name's newline and ESC [2J as they were: the decode's warning of a hostile upload's
    name forged a log line and cleared the terminal."""
    import subprocess
    import sys
    from pathlib import Path

    source = tmp_path / "uploads"
    source.mkdir()
    (source / "bad\nWARNING forged: all good\x1b[2J.mp4").write_bytes(os.urandom(3000))
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(source), "--out", str(tmp_path / "out"),
                           "--executor", "local", "--no-progress", "--stages", "embed", "--embed-model",
                           tiny_models["embed"]], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "\x1b" not in done.stderr and not re.search("^WARNING forged", done.stderr, re.M), done.stderr
    assert (f"WARNING workers.stage: stage decode failed on {source}/bad\\nWARNING forged: all good\\x1b[2J.mp4: "
            "not a media file") in done.stderr, done.stderr


def test_a_rerun_that_samples_reports_the_frames_it_sampled(tmp_path, synthetic_clips, tiny_models):
    config = RunConfig.from_dict({
        "stages": ["embed", "match"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
        "match": {"queries": ["a red scene"]}, "sampling": {"num_frames": 4},
        "resources": {"executor": "local"}, "output": {"thumbnails": False},
    })
    source = str(synthetic_clips / "cuts.mp4")
    first = run_job(source, str(tmp_path / "out"), config, progress=False)
    assert first.counts["frames"] == first.counts["frames_sampled"] > 0
    # a new query reruns the matches only: frames are sampled again, the frames table is not rewritten
    second = run_job(source, str(tmp_path / "out"), config.with_overrides({"match.queries": ["a cat"]}),
                     progress=False)
    assert second.counts["frames"] == 0 and second.counts["frames_sampled"] == first.counts["frames_sampled"]
    assert " 0.0 sampled frames/s" not in second.render()


# --- storage errors, as the command line words them ---------------------------------------------


def _raised(error: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise error from inner
    except BaseException as outer:
        return outer


def test_storage_errors_of_every_layer_are_named_with_the_fix():
    class DefaultCredentialsError(Exception):  # google.auth's
        pass

    class ResourceNotFoundError(Exception):  # azure.core's, as adlfs raises it
        error_code = "ContainerNotFound"

    class ClientError(Exception):  # botocore's, as s3fs wraps it
        response = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}

    gs = storage_problem(DefaultCredentialsError("File not found"), ["gs://media/out"])
    assert gs.startswith("cannot use gs://media/out: no credentials") and "GOOGLE_APPLICATION_CREDENTIALS" in gs
    az = storage_problem(_raised(FileNotFoundError("media"), ResourceNotFoundError("gone")), ["az://media/out"])
    assert "az://media/out: the bucket does not exist" in az
    # adlfs's aliases of az:// get Azure's fix, not S3's
    class ClientAuthenticationError(Exception):  # azure.core's
        pass

    for alias in ("abfs", "abfss", "adl"):
        said = storage_problem(ClientAuthenticationError("refused"), [f"{alias}://media/out"])
        assert "AZURE_STORAGE_ACCOUNT_NAME" in said and "AWS_" not in said
    s3 = storage_problem(_raised(PermissionError("Access Denied"), ClientError("denied")),
                         ["s3://in/videos", "s3://out/results"])
    assert "s3://in/videos or s3://out/results: access was denied" in s3
    # gcsfs turns a 403 into OSError("Forbidden: URL ..."), a 401 into its HttpError (a traceback)
    from gcsfs.retry import validate_response

    for status, expected in ((403, "access was denied"), (401, "the store refused the credentials")):
        with pytest.raises(Exception) as raised:
            validate_response(status, b'{"error": {"message": "anon does not have storage.objects.list access"}}',
                              "https://storage.googleapis.com/storage/v1/b/media/o")
        problem = storage_problem(raised.value, ["gs://media/videos"])
        assert problem.startswith(f"cannot use gs://media/videos: {expected}")
        assert status == 403 or "storage.token" in problem  # gcsfs's credential is a token, not a key
    # a host name not found: aiohttp's subclass of its connection error (gcsfs, offline) was told as nothing
    import socket

    from aiohttp.client_exceptions import ClientConnectorDNSError
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("storage.googleapis.com", 443, True, True, None, None, None, None)
    unfound = ClientConnectorDNSError(key, OSError(socket.EAI_NONAME, "Name or service not known"))
    assert storage_problem(unfound, ["gs://media/out"]).startswith(
        "cannot use gs://media/out: the storage endpoint could not be reached")
    # DuckDB passes a filesystem's errors on as text only
    text = storage_problem(ValueError("query over s3://m/o: IO Error: NoSuchBucket"), ["s3://m/o"])
    assert "the bucket does not exist" in text
    assert storage_problem(FileNotFoundError("videos/missing.mp4"), ["s3://m/o"]) is None
    assert storage_problem(PermissionError("[Errno 13] Permission denied: 'out'"), []) is None


def test_a_ctrl_c_ends_the_command_with_130_and_no_traceback(monkeypatch):
    # its KeyboardInterrupt left the command: a 20-line traceback, and the process killed by SIGINT
    import signal

    from pipeline import cli, command_stops

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's (the tests may run under nohup)
    try:
        monkeypatch.setattr(cli, "_run", lambda args: command_stops.on_stop(signal.SIGINT, None))
        assert main(["run", "videos", "--out", "out"]) == 130
        monkeypatch.setattr(cli, "_run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))  # not a stop said
        with pytest.raises(KeyboardInterrupt):
            main(["run", "videos", "--out", "out"])
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost stop
@pytest.mark.parametrize("stop, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_whose_exception_a_del_lost_still_ends_the_command_as_stopped(stop, code, monkeypatch, capsys):
    # the SIGTERM handler's SystemExit (Ctrl-C's KeyboardInterrupt), raised inside a `__del__`
    # (the garbage collector runs them anywhere), is printed as "Exception ignored" and lost: the
    # run went on, failed on its stopped workers ("A process in the process pool was terminated
    # abruptly") and exited 2, "error"
    import signal

    from pipeline import cli, command_stops

    class Collected:
        def __del__(self):
            command_stops.on_stop(getattr(signal, stop), None)

    def stopped_run(args):
        Collected()  # collected at once: its exception is lost
        raise RuntimeError("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(cli, "_run", stopped_run)
    with pytest.raises(SystemExit) as stopped:
        main(["run", "videos", "--out", "out"])
    assert stopped.value.code == code
    assert "vidlens: error" not in capsys.readouterr().err

    # a later command in the same process is not taken for stopped
    monkeypatch.setattr(cli, "_run", lambda args: 0)
    assert main(["run", "videos", "--out", "out"]) == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost stop
def test_a_stop_lost_before_the_run_was_at_its_end_still_ends_the_command_as_stopped(monkeypatch):
    # (mutation review) a stop whose exception a `__del__` lost while videos were still running,
    # the run going on to its end (`pipeline.stops.at_the_end`): the command exited 0, as the run
    # ended, its summary saying the stop came as the run was publishing its last batch
    import signal

    import pipeline.stops
    from pipeline import cli, command_stops
    from pipeline.summary import RunSummary

    class Collected:
        def __del__(self):
            command_stops.on_stop(signal.SIGTERM, None)

    summary = RunSummary(run_id="r", source="videos", output="out")

    def lost_then_at_the_end(args):
        Collected()  # mid-videos, collected at once: its exception is lost
        pipeline.stops.at_the_end()  # every video done: from here a stop would be let go
        cli._note_a_stop_let_go(summary)
        return 0

    monkeypatch.setattr(cli, "_run", lost_then_at_the_end)
    assert main(["run", "videos", "--out", "out"]) == 143
    assert summary.warnings == [] and not pipeline.stops.ending.is_set()

def test_only_vidlens_runs_own_run_lets_a_stop_at_its_end_go(tmp_path):
    # (mutation review) `vidlens doctor` runs one inside the command line's handler, and a program
    # calling `run_job` keeps Python's Ctrl-C: neither goes on to its end through a stop
    import pipeline.stops

    videos = tmp_path / "videos"
    videos.mkdir()  # (no video: the run is at its end once it has listed them)

    def ends_through_stops(finish_through_stops: bool) -> bool:
        summary = run_job(str(videos), str(tmp_path / "out"), RunConfig(), progress=False,
                          finish_through_stops=finish_through_stops)
        assert summary.status == "succeeded"
        return pipeline.stops.ending.is_set()

    try:
        assert not ends_through_stops(True)  # (no handler raises the stops)
        pipeline.stops.handled.set()
        assert not ends_through_stops(False)
        assert ends_through_stops(True)
    finally:
        pipeline.stops.handled.clear()
        pipeline.stops.ending.clear()

def test_a_stop_in_lines_that_run_whole_is_raised_as_they_end(monkeypatch):
    # a stop raised between a video's rows and its ledger entry being queued left the publisher's
    # queue half made, so a stopped run could not publish its final row (`pipeline.stops`)
    import signal

    from pipeline import cli, command_stops, stops

    ran = []

    def stopped_in_a_section(args):
        assert stops.handled.is_set()  # (the command line's handler raises the stops)
        with stops.whole():
            with stops.whole():
                command_stops.on_stop(signal.SIGTERM, None)
                ran.append("inner")
            ran.append("outer")  # (held to the end of the outermost)
        ran.append("not run")

    monkeypatch.setattr(cli, "_run", stopped_in_a_section)
    with pytest.raises(SystemExit) as stopped:
        main(["run", "videos", "--out", "out"])
    assert stopped.value.code == 143 and ran == ["inner", "outer"] and not stops.handled.is_set()
    # outside them, at once; and a later section holds nothing back
    ran.clear()
    monkeypatch.setattr(cli, "_run", lambda args: command_stops.on_stop(signal.SIGTERM, None) or ran.append("not run"))
    with pytest.raises(SystemExit):
        main(["run", "videos", "--out", "out"])
    with stops.whole():
        ran.append("whole")
    assert ran == ["whole"]


def test_a_stop_while_a_video_is_queued_comes_after_its_counts(monkeypatch):
    # a stop between a video's rows being counted and queued: the stopped run's final row counted
    # rows it did not publish; now queued and counted whole, it is not published before the stop
    from types import SimpleNamespace

    import pipeline.recording
    from pipeline import stops
    from pipeline.ledger import Decision
    from pipeline.summary import RunSummary
    from workers.task import VideoRef, VideoTask

    monkeypatch.setattr(pipeline.recording, "tables_of", lambda *args: {})
    monkeypatch.setattr(pipeline.recording, "entry_after", lambda *args: {})
    queued = []

    class Stopping:
        writer = SimpleNamespace(embedding_dim=512)

        def queue(self, tables, entry, units):
            queued.append(entry)
            assert stops.held(SystemExit(143))  # a stop, as the command line's handler holds it

        def publish_if_due(self):
            pytest.fail("the stop came after the video was queued: it is the stopped run's to publish")

    summary = RunSummary(run_id="r", source="s", output="o")
    task = VideoTask(ref=VideoRef("a.mp4", 1, 1, None, "id"))
    with pytest.raises(SystemExit):
        pipeline.recording.record(task, (task.ref, Decision("new", frozenset()), None), SimpleNamespace(run_id="r"),
                                  RunConfig(), Stopping(), summary, {})
    assert queued == [{}] and summary.counts["videos_total"] == summary.counts["videos_failed"] == 1


def _stop_here(then=None, stop="SIGTERM"):
    """A function that sends this process SIGTERM (or `stop`), as a supervisor stops a run, then runs `then`."""
    import os
    import signal

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, stop))
        return then(*args, **kwargs) if then is not None else None
    return stopped


@pytest.mark.parametrize("stop_at, stop", [("missing lookups", "SIGTERM"), ("last batch made", "SIGTERM"),
                                           ("last batch committed", "SIGTERM"), ("last batch committed", "SIGINT"),
                                           ("staging dropped", "SIGTERM"), ("snapshot", "SIGTERM")])
def test_a_stop_once_the_videos_are_done_lets_the_run_finish_and_says_so(stop_at, stop, tmp_path, synthetic_clips,
                                                                         tiny_models, monkeypatch, capfd):
    # a SIGTERM as the run published its last batch: runs said succeeded (or running, where it came
    # before the final row was committed), the summary JSON said stopped, and the command exited 143
    import json
    import signal

    import duckdb

    import pipeline.job
    import pipeline.run_listing
    import pipeline.stops
    from pipeline.publisher import Publisher
    from pipeline.store import Store

    videos, out, path, options = _embed_run(tmp_path, synthetic_clips, "cuts.mp4", "text.mp4")
    if stop_at == "missing lookups":  # every video done, before the last batch: those gone from the source
        monkeypatch.setattr(pipeline.run_listing, "gone", _stop_here(pipeline.run_listing.gone, stop))
    elif stop_at == "last batch made":  # on the main thread, before the final row is committed
        publish = Publisher.publish
        monkeypatch.setattr(Publisher, "publish", lambda self, empty_tables=(), **extra: (
            _stop_here(publish, stop) if extra.get("final") else publish)(self, empty_tables, **extra))
    elif stop_at == "last batch committed":  # on the publishing thread, as the driver waits for it
        store_publish = Store.publish

        def committed(self, manifest, name, later=None):
            store_publish(self, manifest, name, later)
            if manifest.get("final"):
                _stop_here(stop=stop)()
        monkeypatch.setattr(Store, "publish", committed)
    elif stop_at == "staging dropped":
        monkeypatch.setattr(Store, "drop_staging", _stop_here(Store.drop_staging, stop))
    else:
        monkeypatch.setattr(Store, "write_snapshot", _stop_here(Store.write_snapshot, stop))
    # a terminal's Ctrl-C: run in the background (CI under nohup), the tests inherit it ignored,
    # and the command then leaves it so (no stop at all)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["run", str(videos), *options, "--embed-model", tiny_models["embed"],
                     "--set", "output.commit_every_videos=1"])
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = json.loads(path.read_text())
    con = duckdb.connect()
    Store(str(out)).register_duckdb(con)
    # the summary, the exit code and the runs table agree: the run finished, as it would have unstopped
    assert (code, summary["status"], summary["exit_code"]) == (0, "succeeded", 0)
    assert con.execute("select run_id, status from runs").fetchall() == [(summary["run_id"], "succeeded")]
    assert con.execute("select count(*) from ledger where last_run_id = ?", [summary["run_id"]]).fetchone() == (2,)
    assert not (out / "_vidlens" / "staging" / summary["run_id"]).exists()
    assert list((out / "_vidlens" / "snapshots").iterdir())
    said = capfd.readouterr()  # (the handler's line written to the file descriptor)
    name = "Ctrl-C" if stop == "SIGINT" else stop
    assert summary["warnings"] == [f"{name} came as the run was publishing its last batch: it finished that rather "
                                   "than stop"]
    assert f"  warning {summary['warnings'][0]}" in said.out.splitlines()
    assert "vidlens: the run is publishing its last batch: it finishes that rather than stop (stop it twice more to " \
           "end it at once)" in said.err
    assert not pipeline.stops.ending.is_set()  # (set until the command ends: a later command's stop is its own)


def test_a_stop_at_the_end_of_a_run_with_nothing_to_process_lets_it_finish(tmp_path, synthetic_clips, tiny_models,
                                                                          monkeypatch):
    # (mutation review) every video unchanged, the run is at its end once its listing is: a stop
    # there (its lookups of the videos gone) lets it publish its final row, as one that ran videos
    import json

    import duckdb

    import pipeline.job
    import pipeline.run_listing
    import pipeline.stops
    from pipeline.store import Store

    videos, out, path, options = _embed_run(tmp_path, synthetic_clips)
    command = ["run", str(videos), *options, "--embed-model", tiny_models["embed"]]
    assert main(command) == 0
    first = json.loads(path.read_text())["run_id"]
    monkeypatch.setattr(pipeline.run_listing, "gone", _stop_here(pipeline.run_listing.gone))
    assert main(command) == 0
    summary = json.loads(path.read_text())
    assert (summary["status"], summary["reasons"]) == ("succeeded", {"unchanged": 1})
    assert summary["warnings"] == ["SIGTERM came as the run was publishing its last batch: it finished that rather "
                                   "than stop"]
    con = duckdb.connect()
    Store(str(out)).register_duckdb(con)
    assert con.execute("select run_id, status from runs order by run_id").fetchall() == [
        (first, "succeeded"), (summary["run_id"], "succeeded")]
    assert not pipeline.stops.ending.is_set()


def test_a_stop_as_a_run_ends_on_the_gpus_failure_leaves_it_ending_on_that_error(tmp_path, synthetic_clips,
                                                                                 tiny_models, monkeypatch):
    # a SIGTERM as the run published its last batch after the GPU failed: runs said error, the
    # summary said stopped and the command exited 143
    import json

    import duckdb

    from pipeline.store import Store
    from workers.embed import EmbedStage

    videos, out, path, options = _embed_run(tmp_path, synthetic_clips, "cuts.mp4", "text.mp4")
    embed, calls = EmbedStage.process, []

    def breaks_the_second(self, tasks):
        calls.append(len(tasks))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered")
        embed(self, tasks)

    store_publish = Store.publish

    def committed(self, manifest, name, later=None):
        store_publish(self, manifest, name, later)
        if manifest.get("final"):
            _stop_here()()

    monkeypatch.setattr(EmbedStage, "process", breaks_the_second)
    monkeypatch.setattr(Store, "publish", committed)
    code = main(["run", str(videos), *options, "--embed-model", tiny_models["embed"], "--videos-per-batch", "1",
                 "--set", "output.commit_every_videos=1"])
    summary = json.loads(path.read_text())
    con = duckdb.connect()
    Store(str(out)).register_duckdb(con)
    assert (code, summary["status"], summary["exit_code"]) == (2, "error", 2)
    assert "the GPU failed on" in summary["error"]
    assert con.execute("select run_id, status from runs").fetchall() == [(summary["run_id"], "error")]
    assert summary["warnings"] == ["SIGTERM came as the run was publishing its last batch: it finished that rather "
                                   "than stop"]


def test_a_run_publishing_its_last_batch_still_ends_at_once_at_the_third_stop(tmp_path, synthetic_clips,
                                                                              tiny_models):
    # held through its last batch, a run whose store does not answer is not waited for ever
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    shutil.copy(synthetic_clips / "cuts.mp4", videos / "a.mp4")
    command = [sys.executable, "-m", "pipeline", "run", str(videos), "--out", str(out), "--executor", "local",
               "--stages", "embed", "--embed-model", tiny_models["embed"], "--no-progress"]
    # (the run's one batch is its last: its manifest written, it hangs before its files are moved into place)
    process = subprocess.Popen(command, env={**os.environ, "VIDLENS_FAILPOINT": "committed:1:pause"},
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "_vidlens" / "commits").glob("*.json")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        for _ in range(2):
            process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert process.poll() is None  # (held: it goes on with its last batch)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        err = process.stderr.read()
    finally:
        process.kill()
    assert process.returncode == 143, err[-2000:]
    assert err.splitlines()[-3:] == [
        "vidlens: the run is publishing its last batch: it finishes that rather than stop (stop it twice more to end "
        "it at once)",
        "vidlens: already stopping, cleaning up (stop it once more to end it at once)",
        "vidlens: stopped at once, its cleanup cut short"]


def test_a_ctrl_c_ignored_by_the_shell_stays_ignored(monkeypatch):
    # a script's `vidlens run ... &` starts with SIGINT ignored: a Ctrl-C meant for the script
    # must not stop it
    import signal

    from pipeline import cli, command_stops

    seen = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(signal.getsignal(signal.SIGINT)) or 0)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # (pytest itself may run so: a CI's nohup)
    try:
        assert main(["run", "videos", "--out", "out"]) == 0
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's command
        assert main(["run", "videos", "--out", "out"]) == 0
        assert seen[-1] is command_stops.on_stop and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_stop_lets_the_first_ones_cleanup_finish(monkeypatch, capfd):
    """A supervisor's second SIGTERM (or a second Ctrl-C) raised again inside the cleanup of the
    first: cut short, with a model thread still inside torch, the process aborted (exit 134)."""
    import os
    import signal
    import time

    from pipeline import cli

    cleaned = []

    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the stop
            time.sleep(10)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # another, while the run cleans up
            time.sleep(0.2)
            cleaned.append(True)

    monkeypatch.setattr(cli, "_run", run)
    with pytest.raises(SystemExit) as stopped:
        main(["run", "videos", "--out", "out"])
    assert stopped.value.code == 143 and cleaned == [True] and "already stopping" in capfd.readouterr().err


_HUNG_CLEANUP = """
import os, signal, sys, time
import pipeline.cli as cli

def run(args):
    try:
        print("running", flush=True)
        time.sleep(60)
    finally:  # a cleanup that takes argv[1] seconds (60: it hangs, as on a store that does not answer)
        print("cleaning up", flush=True)
        time.sleep(float(sys.argv[1]))
        print("cleaned up", flush=True)

cli._run = run
sys.exit(cli.main(["run", "videos", "--out", "out"]))
"""


@pytest.mark.parametrize("stops, cleanup_s, stderr_closed", [(3, 60, False), (2, 2, True)])
def test_a_second_stop_lets_the_cleanup_finish_and_a_third_ends_it_at_once(stops, cleanup_s, stderr_closed):
    # with stderr a closed pipe (`| tee`, ended by the same Ctrl-C), the second stop's message
    # raised BrokenPipeError inside the cleanup, and cut it short
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", _HUNG_CLEANUP, str(cleanup_s)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "running\n"  # (the stop's handlers in place)
        if stderr_closed:
            process.stderr.close()
        process.send_signal(signal.SIGTERM)
        assert process.stdout.readline() == "cleaning up\n"
        for _ in range(stops - 1):  # (SIGTERM: a job started in the background, as CI's, ignores SIGINT)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        process.wait(timeout=30)
        out, err = process.stdout.read(), "" if stderr_closed else process.stderr.read()
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert ("cleaned up" in out) == (stops == 2)
    if not stderr_closed:
        assert err.splitlines()[-2:] == [
            "vidlens: already stopping, cleaning up (stop it once more to end it at once)",
            "vidlens: stopped at once, its cleanup cut short"]


#: a model stage's thread (its name the local executor's), inside torch's C++ code when the process exits
_BUSY_THREAD = """
import runpy, sys, threading, time
import torch
import pipeline.cli as cli, pipeline.local as local

def busy():
    x = torch.randn(1000, 1000)
    while True:
        x @ x

threading.Thread(target=busy, name=local.THREAD_PREFIX + "shots", daemon=True).start()
"""


_BUSY_AT_EXIT = _BUSY_THREAD + """
def ended(argv=None):
    time.sleep(1)
    if sys.argv[1] == "stopped":
        raise SystemExit(143)
    if sys.argv[1] == "interrupted":
        raise KeyboardInterrupt
    if sys.argv[1] in ("exit()", "exit(message)"):  # (a library's, as the run ended)
        raise SystemExit() if sys.argv[1] == "exit()" else SystemExit("a library's message")
    print("vidlens: error: the run failed", file=sys.stderr)
    return 2

cli.main = ended
cli.command()
"""


_MODULE_BUSY_AT_EXIT = _BUSY_THREAD + """
sys.argv = ["vidlens", "run", sys.argv[1], "--out", sys.argv[2]]
runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
"""


def test_python_m_pipeline_cli_exits_as_the_command_does(tmp_path):
    """`python -m pipeline.cli` ran `sys.exit(main())`, not `command()`: a local run stopped with
    SIGTERM during a model batch exited 134 ("terminate called ..."), not 143."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _MODULE_BUSY_AT_EXIT, str(tmp_path / "none"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "terminate called" not in done.stderr, done.stderr[-2000:]
    assert "source" in done.stderr and "does not exist" in done.stderr


@pytest.mark.parametrize("ending, code", [("stopped", 143), ("interrupted", 130), ("failed", 2), ("exit()", 0),
                                          ("exit(message)", 1)])
def test_the_command_exits_with_its_code_while_a_model_thread_is_inside_torch(ending, code):
    """Python ends a daemon thread at its exit where it is, and through torch's C++ code that is
    std::terminate: a local run stopped or failed during a model batch exited 134 (SIGABRT). (mutation
    review) An exit raised in the command, a library's, ends it as Python would: 0 for none, 1 for a message."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BUSY_AT_EXIT, ending], capture_output=True, text=True, timeout=120)
    assert done.returncode == code and "terminate called" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("stops", [1, 2])
def test_a_stop_as_ray_shuts_down_after_the_run_keeps_the_runs_exit_code(stops):
    # Ray's own handler at the exit shut it down with SIGTERM back to its default: a stop in that
    # second ended with 143 a run whose summary said it had succeeded. (A stand-in for Ray, whose
    # shutdown is stopped, once or twice: the second ends the process at once.)
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import atexit, os, signal, sys, types
import pipeline.cli as cli
from pipeline import ray_cluster

def shutdown():
    for _ in range({stops}):
        os.kill(os.getpid(), signal.SIGTERM)
    ray.up = False
    print("shut down")

ray = types.SimpleNamespace(up=True, is_initialized=lambda: ray.up, shutdown=shutdown)
sys.modules["ray"] = ray
atexit.register(lambda: ray.is_initialized() and ray.shutdown())  # (as Ray's own)
cli._main = lambda argv=None: ray_cluster.note_connected() or 3  # (a command that connected Ray, as ensure_ray)
cli.command()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stderr == "vidlens: the run has ended: Ray is shutting down (stop it once more to end it at once)\n"
    assert done.stdout == ("shut down\n" if stops == 1 else "")


#: `vidlens run --executor ray` ended as argv[1] says, in a process of its own, on a stand-in for Ray that the
#: run starts and whose shutdown prints Ray's last line; argv[2] stops (SIGTERM) sent as Ray shuts down
_RAY_RUN_ENDED = """
import atexit, os, signal, sys, time, types
import pipeline.cli as cli, pipeline.job as job
from pipeline import ray_cluster

signal.signal(signal.SIGINT, signal.default_int_handler)  # (a terminal's Ctrl-C: pytest in a script's background ignores it)
ending, stops, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
summary_file = os.path.join(folder, "summary.json")

def shutdown():
    for _ in range(stops):
        os.kill(os.getpid(), signal.SIGTERM)
    filed = "after the summary file" if os.path.exists(summary_file) else "before the summary file"
    print(f"(raylet) Ray's last line, {filed}", file=sys.stderr, flush=True)
    ray.up = False

ray = types.SimpleNamespace(up=False, is_initialized=lambda: ray.up, shutdown=shutdown)
sys.modules["ray"] = ray
atexit.register(lambda: ray.is_initialized() and ray.shutdown())  # (as Ray's own, at the exit)

def run_job(*args, **kwargs):
    ray.up = True  # (the run starts Ray, as ray_cluster.ensure_ray, and notes it)
    ray_cluster.note_connected()
    if ending in ("SIGTERM", "SIGINT"):
        os.kill(os.getpid(), getattr(signal, ending))
        time.sleep(60)
    raise ValueError("no such model") if ending in ("failed", "-v") else KeyError("a bug")

job.run_job = run_job
sys.argv = ["vidlens", *(["-v"] if ending == "-v" else []), "run", folder, "--out", os.path.join(folder, "out"),
            "--executor", "ray", "--no-progress", "--summary-json", summary_file]
cli.command()
"""


@pytest.mark.parametrize("ending, stops, code", [("SIGTERM", 0, 143), ("SIGINT", 0, 130), ("SIGTERM", 1, 143),
                                                 ("failed", 0, 2), ("-v", 0, 1), ("bug", 0, 1)])
def test_rays_last_lines_come_before_the_commands_last_word_however_a_run_ends(ending, stops, code, tmp_path):
    """A stopped run on Ray said it stopped, then Ray's last lines came as Ray shut down (a worker's lines
    in flight, "(raylet)" notes); a run that failed with -v, or on a bug (exit 1), printed its traceback
    before them. Ray is shut down first now, its summary file written before, and the stopped line, error
    line or traceback comes last, as a summary does; a stop as Ray shuts down is said and waited through."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _RAY_RUN_ENDED, ending, str(stops), str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    err = done.stderr.splitlines()
    assert err.count("(raylet) Ray's last line, after the summary file") == 1, done.stderr
    ray_said = err.index("(raylet) Ray's last line, after the summary file")
    if ending in ("SIGTERM", "SIGINT"):
        stop = "SIGTERM" if ending == "SIGTERM" else "Ctrl-C"
        assert err[ray_said + 1:] == [f"vidlens: the run stopped ({stop}): the batches it published stay; the same "
                                      "command goes on from there"]
        said_at_the_stop = "vidlens: the run has ended: Ray is shutting down (stop it once more to end it at once)"
        assert err[ray_said - stops:ray_said] == [said_at_the_stop] * stops
    elif ending == "failed":
        assert err[ray_said + 1:] == ["vidlens: error: no such model"]
    else:
        assert err[ray_said + 1] == "Traceback (most recent call last):" and "Traceback" not in done.stderr[:ray_said]
        assert err[-1] == ("ValueError: no such model" if ending == "-v" else "KeyError: 'a bug'")


def test_a_second_stop_as_a_stopped_run_shuts_ray_down_ends_it_at_once_with_its_code(tmp_path):
    """(as after a summary) The stopped run's summary file is written before Ray's shutdown, which a second
    stop then ends at once, exit 143 still: Ray's last line and the stopped line are not waited for."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _RAY_RUN_ENDED, "SIGTERM", "2", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr == "vidlens: the run has ended: Ray is shutting down (stop it once more to end it at once)\n"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "stopped"


@pytest.mark.parametrize("ending, code", [("failed", 2), ("-v", 1), ("bug", 1)])
def test_a_second_stop_as_a_failed_run_shuts_ray_down_ends_it_at_once_with_its_code(ending, code, tmp_path):
    """(mutation review) A failed run's second stop while Ray shuts down ends the process at once with the
    code the failure would have: 2 for an error line, 1 for a traceback (-v, or a bug), not another."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _RAY_RUN_ENDED, ending, "2", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stderr == "vidlens: the run has ended: Ray is shutting down (stop it once more to end it at once)\n"


@pytest.mark.parametrize("ending", ["succeeded", "failed", "stopped", "bug"])
def test_main_as_a_library_leaves_its_callers_ray_connected(ending, tmp_path, monkeypatch):
    """`pipeline.cli.main` called by a program that had started Ray itself (`ray.init()`) shut that Ray down
    as its run ended (succeeded, failed or stopped). It shuts down only a Ray its run started or joined."""
    import os
    import signal
    import sys
    import time
    import types

    import pipeline.job
    from pipeline import cli, ray_cluster, ray_relayed

    said = []

    def shutdown():
        said.append("shut down")
        ray.up = False

    ray = types.SimpleNamespace(up=False, is_initialized=lambda: ray.up, shutdown=shutdown)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(ray_relayed, "settle", lambda: None)

    def run_job(*args, **kwargs):
        if not ray.is_initialized():  # (as ray_cluster.ensure_ray: one started and noted, or the caller's used)
            ray.up = True
            ray_cluster.note_connected()
        if ending == "stopped":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        if ending in ("failed", "bug"):
            raise ValueError("no such model") if ending == "failed" else KeyError("a bug")
        return RunSummary(run_id="r1", source=str(tmp_path), output=str(tmp_path / "out"), status="succeeded")

    monkeypatch.setattr(pipeline.job, "run_job", run_job)

    def ended(callers_ray: bool) -> object:
        ray.up, said[:] = callers_ray, []
        try:
            return cli.main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray",
                             "--no-progress"])
        except (SystemExit, KeyError) as exc:
            return type(exc).__name__

    expected = {"succeeded": 0, "failed": 2, "stopped": "SystemExit", "bug": "KeyError"}[ending]
    assert ended(callers_ray=True) == expected
    assert said == [] and ray.up  # (the caller's: connected still)
    assert ended(callers_ray=False) == expected
    assert said == ["shut down"] and not ray.up  # (the run's own)
    if ending in ("succeeded", "failed"):
        # called on a thread of the caller's, where no stop handler can be set: a ValueError ("signal only
        # works in main thread") came out of the run's shutdown of its own Ray in place of its exit code
        import threading

        on_a_thread = []
        thread = threading.Thread(target=lambda: on_a_thread.append(ended(callers_ray=False)))
        thread.start()
        thread.join(60)
        assert on_a_thread == [expected] and said == ["shut down"]


def test_main_as_a_library_shuts_down_the_ray_its_run_started_where_standard_output_closed(tmp_path):
    """(mutation review) A run on Ray whose standard output closed (exit 141) left the Ray it had started
    connected, and `main` called next in that process took it for its caller's: no run shut it down."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import sys, types
import pipeline.cli as cli, pipeline.job as job
from pipeline import ray_cluster, ray_relayed
from pipeline.summary import RunSummary

said, folder = [], sys.argv[1]
ray = types.SimpleNamespace(up=False, is_initialized=lambda: ray.up,
                            shutdown=lambda: (said.append("shut down"), setattr(ray, "up", False)))
sys.modules["ray"] = ray
ray_relayed.settle = lambda: None

def run_job(*args, **kwargs):
    ray.up = True  # (the run starts Ray, as ray_cluster.ensure_ray, and notes it)
    ray_cluster.note_connected()
    if not said:
        raise BrokenPipeError()  # (as a summary printed to a reader that has gone)
    return RunSummary(run_id="r1", source=folder, output=folder + "/out", status="succeeded")

job.run_job = run_job
argv = ["run", folder, "--out", folder + "/out", "--executor", "ray", "--no-progress"]
closed = cli.main(argv), ray.up, list(said)
print(closed, (cli.main(argv), ray.up, said), file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.stderr.splitlines()[-1] == "(141, False, ['shut down']) (0, False, ['shut down', 'shut down'])", \
        done.stderr[-2000:]


class StandInRay:
    """Ray as a command sees it (`sys.modules["ray"]`): connected or not; each shutdown said, with the
    thread it came from where that is not the main thread."""

    def __init__(self) -> None:
        self.up, self.said = False, []

    def is_initialized(self) -> bool:
        return self.up

    def shutdown(self) -> None:
        import threading

        thread = threading.current_thread()
        self.said.append("shut down" + ("" if thread is threading.main_thread() else f" on {thread.name}"))
        self.up = False

    def ensure_ray(self, *args, **kwargs) -> None:
        """As `ray_cluster.ensure_ray`: an instance started and noted, or the one connected used as it is."""
        from pipeline import ray_cluster

        if not self.up:
            self.up = True
            ray_cluster.note_connected()

    def run_job(self, source: str, out: str, *args, **kwargs) -> RunSummary:
        """A run on this Ray that succeeds (`pipeline.job.run_job`'s stand-in)."""
        self.ensure_ray()
        return RunSummary(run_id="r1", source=source, output=out, status="succeeded")


@pytest.fixture
def stand_in_ray(monkeypatch) -> StandInRay:
    """A `StandInRay` in place of Ray, whose last lines nobody waits for."""
    import sys

    from pipeline import ray_relayed

    ray = StandInRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(ray_relayed, "settle", lambda: None)
    return ray


@pytest.mark.parametrize("ending", ["doctor", "doctor interrupted", "two threads"])
def test_main_as_a_library_shuts_down_the_ray_its_command_connected_and_no_other(ending, tmp_path, monkeypatch,
                                                                                  stand_in_ray):
    """Until 2026-12-08 `main` told its caller's Ray from its own by "connected as `main` began", a flag of
    the module's. `vidlens doctor --executor ray` left the Ray it had started connected, however it ended
    (a KeyboardInterrupt with no stop recorded: a caller's own); and a second `main` on a thread of the
    caller's, begun while the first's run had Ray connected, set that flag: the first left its own Ray
    connected as it ended. The command now shuts down the Ray its own `ensure_ray` connected, and no other."""
    import threading

    import pipeline.doctor
    import pipeline.job
    from pipeline import cli

    ray, ensure_ray = stand_in_ray, stand_in_ray.ensure_ray

    def run_doctor(**kwargs):
        ensure_ray()
        if ending == "doctor interrupted":
            raise KeyboardInterrupt
        return 0

    def argv(name: str) -> list:
        return ["run", str(tmp_path), "--out", str(tmp_path / name), "--executor", "ray", "--no-progress"]

    second = []

    def run_job(source, out, *args, **kwargs):
        ensure_ray()
        if out.endswith("first"):  # (the second run, on a thread of the caller's, begins and ends meanwhile)
            thread = threading.Thread(target=lambda: second.append((cli.main(argv("second")), ray.up)),
                                      name="second")
            thread.start()
            thread.join(60)
        return RunSummary(run_id="r1", source=source, output=out, status="succeeded")

    monkeypatch.setattr(pipeline.doctor, "run_doctor", run_doctor)
    monkeypatch.setattr(pipeline.job, "run_job", run_job)
    if ending == "two threads":
        assert cli.main(argv("first")) == 0
        assert second == [(0, True)]  # (the second left the first's Ray connected)
    elif ending == "doctor":
        assert cli.main(["doctor", "--executor", "ray"]) == 0
    else:
        with pytest.raises(KeyboardInterrupt):
            cli.main(["doctor", "--executor", "ray"])
    assert ray.said == ["shut down"] and not ray.up  # (on the main thread: the first's)


def test_main_as_a_library_leaves_the_ray_its_caller_started_after_a_command_shut_its_own_down(
        tmp_path, monkeypatch, stand_in_ray):
    """(mutation review) `vidlens doctor --executor ray`, then the caller's own `ray.init()`, then a run: the run
    leaves the caller's Ray connected. The doctor's note that it connected Ray is forgotten as its Ray is shut
    down: kept, the run took the caller's Ray for the doctor's, and shut it down as it ended."""
    import pipeline.doctor
    import pipeline.job
    from pipeline import cli

    ray, said, run_job = stand_in_ray, stand_in_ray.said, stand_in_ray.run_job
    monkeypatch.setattr(pipeline.doctor, "run_doctor", lambda **kwargs: ray.ensure_ray() or 0)
    monkeypatch.setattr(pipeline.job, "run_job", run_job)
    assert cli.main(["doctor", "--executor", "ray"]) == 0
    assert said == ["shut down"] and not ray.up
    ray.up = True  # (the caller's own ray.init())
    assert cli.main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--no-progress"]) == 0
    assert said == ["shut down"] and ray.up


@pytest.mark.parametrize("command", ["run", "doctor"])
def test_main_as_a_library_leaves_the_ray_its_callers_run_job_connected(command, tmp_path, monkeypatch,
                                                                        stand_in_ray):
    """(mutation review) A program that ran `pipeline.job.run_job` on Ray, which leaves Ray up (its `ensure_ray`
    connected it and noted so on the program's thread), then called `main`: that Ray was connected before the
    command began, the caller's, and stays connected, as one the program's own `ray.init()` connected. `main`
    took the note for its own and shut that Ray down as the command ended (since 2026-12-08, until the fix)."""
    import pipeline.doctor
    import pipeline.job
    from pipeline import cli

    ray, said, run_job = stand_in_ray, stand_in_ray.said, stand_in_ray.run_job
    monkeypatch.setattr(pipeline.doctor, "run_doctor", lambda **kwargs: ray.ensure_ray() or 0)
    monkeypatch.setattr(pipeline.job, "run_job", run_job)
    run_job(str(tmp_path), str(tmp_path / "out"))  # (the program's own run, on Ray)
    argv = {"run": ["run", str(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--no-progress"],
            "doctor": ["doctor", "--executor", "ray"]}[command]
    assert cli.main(argv) == 0
    assert said == [] and ray.up  # (the caller's: connected still)
    ray.up = False  # (the caller shuts it down: a command then starts its own, and shuts that down)
    assert cli.main(argv) == 0
    assert said == ["shut down"] and not ray.up


#: `vidlens doctor --executor ray` ended as argv[1] says (a check failed: 1; stopped by SIGTERM: 143, its stop
#: raised or lost), in a process of its own, on a stand-in for Ray that it starts, whose shutdown is stopped twice
_DOCTOR_ON_RAY_STOPPED_AS_RAY_SHUTS_DOWN = """
import os, signal, sys, time, types
import pipeline.cli as cli, pipeline.doctor as doctor
from pipeline import ray_cluster

ending = sys.argv[1]

def shutdown():
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGTERM)
    ray.up = False

ray = types.SimpleNamespace(up=False, is_initialized=lambda: ray.up, shutdown=shutdown)
sys.modules["ray"] = ray

class Dropped:  # (a stop whose exception is lost: raised in a __del__, Python prints it as "Exception ignored")
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # (the handler runs here)

def run_doctor(**kwargs):
    ray.up = True  # (its Ray check starts Ray, as ray_cluster.ensure_ray, and notes it)
    ray_cluster.note_connected()
    if ending == "stopped":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    if ending == "stopped in a __del__":
        Dropped()
    return 1

doctor.run_doctor = run_doctor
sys.argv = ["vidlens", "doctor", "--executor", "ray"]
cli.command()
"""


@pytest.mark.parametrize("ending, code", [("a check failed", 1), ("stopped", 143), ("stopped in a __del__", 143)])
def test_a_second_stop_as_doctor_shuts_its_ray_down_ends_it_at_once_with_its_code(ending, code):
    """(mutation review) `vidlens doctor --executor ray` shuts down the Ray it started as `main` ends (a run's
    is shut down before its last word, in `_run`): a second stop there ends the process at once with the
    command's exit code, 1 where a check failed, 143 where a first SIGTERM stopped it (its exception raised,
    or lost in a `__del__`, the doctor going on to its end), not another."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _DOCTOR_ON_RAY_STOPPED_AS_RAY_SHUTS_DOWN, ending],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stderr.endswith("vidlens: the run has ended: Ray is shutting down (stop it once more to end it "
                                "at once)\n"), done.stderr[-2000:]


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "submit", "schedule", "query", "search", "report", "compact",
                                     "forget", "doctor"])
def test_every_config_flag_says_it_reads_toml_too(command, capsys):
    # every command's --config reads a .toml file as TOML (`RunConfig.from_file`), but query, search,
    # report, compact, forget and doctor said "YAML configuration" alone
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = text[text.index("options:"):]
    config = options[options.index("--config CONFIG"):][:200]
    assert ".toml" in config, config


def test_the_command_starts_without_numpy_or_the_heavy_libraries():
    """`vidlens --help`, `--version`, a typo's usage line answer in half a second: the command's own modules
    import none of numpy, pyarrow, pandas, torch, Ray (each command imports what it uses as it runs). A
    helper's shared summary line once imported numpy at the start of every command (2026-12-08)."""
    import subprocess
    import sys
    from pathlib import Path

    heavy = ("numpy", "pyarrow", "pandas", "torch", "ray", "duckdb", "transformers", "av", "decord", "cv2")
    script = f"import sys, pipeline.cli; print([name for name in {heavy!r} if name in sys.modules])"
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == "[]\n", done.stderr[-2000:]


def test_the_reports_page_bound_says_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "(default 1000)" in " ".join(capsys.readouterr().out.split())


def test_the_dry_runs_help_names_every_kind_of_line_it_writes(capsys):
    # docs/incremental.md: a line for each video to process, each given up on, each marked missing
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "skip as given up or mark missing" in text[text.index("--dry-run "):]


def test_the_schedules_log_folder_says_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["schedule", "--help"])
    assert "(default ~/.local/state/vidlens/vidlens-<hash>, under $XDG_STATE_HOME where set)" in " ".join(
        capsys.readouterr().out.split())


def test_a_schedule_config_that_is_not_there_is_asked_for_as_yaml_or_toml(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    assert main(["schedule", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
                 "--config", str(tmp_path / "nightly.toml")]) == 2
    assert "give an existing YAML or TOML configuration" in _error(capsys)


@pytest.mark.parametrize("ending, code", [("succeeded", 0), ("stopped", 143), ("failed", 2)])
@pytest.mark.parametrize("stops", [1, 2])
def test_a_stop_as_the_process_exits_after_the_command_keeps_its_exit_code(stops, ending, code):
    """(chaos soak) `main` gives the stop's handlers back as it returns, and Python's exit takes a
    second or more after it (threads joined, finalizers): a stop there killed a run that had
    succeeded by SIGTERM (143 to a shell, its summary and runs row saying succeeded), and the
    second stop that a stopped run's cleanup waits through killed it alike. (A stand-in for the
    exit's finalizers, stopped once or twice: the second ends the process at once.)"""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import atexit, os, signal
import pipeline.cli as cli

def finalizer():
    for _ in range({stops}):
        os.kill(os.getpid(), signal.SIGTERM)
    print("finalized")

def ended(argv=None):
    atexit.register(finalizer)  # (during the command, as torch's and multiprocessing's are)
    if "{ending}" == "stopped":  # a stopped run's SystemExit, raised through main
        raise SystemExit(143)
    return 0 if "{ending}" == "succeeded" else 2

cli.main = ended
cli.command()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stderr == "vidlens: the command has ended and is exiting (stop it once more to end it at once)\n"
    assert done.stdout == ("finalized\n" if stops == 1 else "")


def test_a_ctrl_c_ignored_by_the_shell_stays_ignored_as_the_process_exits():
    """(mutation review) A script's `vidlens run &` starts with Ctrl-C ignored: the handler that says and
    waits through a stop once the command has ended (`keep_the_exit_code`) leaves it ignored, and a Ctrl-C
    meant for the script neither says a word nor ends the process before its exit functions ran."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = """
import atexit, os, signal
import pipeline.cli as cli

def finalizer():
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGINT)
    print("finalized")

def ended(argv=None):
    atexit.register(finalizer)
    return 3

cli.main = ended
cli.command()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (done.returncode, done.stdout, done.stderr) == (3, "finalized\n", ""), done


def test_a_stop_in_the_last_part_of_the_exit_is_ignored():
    """(chaos soak) After the exit functions, Python gives a signal whose handler is a Python function
    back to its default as it frees its modules, and a stop then killed a stopped run by SIGTERM (-15)
    in place of its 143. The exit functions registered before the command runs (a stand-in for that
    last part: two stops, which `keep_the_exit_code`'s handler would have said and ended the process
    at) find the stops ignored."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import atexit, os, signal, time
import pipeline.cli as cli

def last():
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("exited")

atexit.register(last)  # (before the command: it runs after the command's own)

def stopped(argv=None):
    raise SystemExit(143)

cli.main = stopped
cli.command()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (143, "exited\n", ""), done
