"""End to end: `run_job` and the `vidlens` command over synthetic and real clips, with tiny models."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import decord
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.job import run_job
from pipeline.summary import EXIT_FAILED, EXIT_PARTIAL
from schemas.config import RunConfig
from schemas.tables import TABLES, table_schema

QUERIES = ["a red scene", "white text on a page"]


def _config(tiny_models, **resources):
    return RunConfig.from_dict(_settings(tiny_models, **resources))


def _settings(tiny_models, **resources):
    return {
        # float32, whatever this CPU computes fastest: embeddings are compared with the model's own
        "models": {**tiny_models, "dtype": "float32"},
        "match": {"queries": QUERIES},
        "captions": {"max_new_tokens": 4},
        "resources": {"executor": "local", "videos_per_batch": 2, **resources},
    }


def _read(out: Path) -> dict[str, pd.DataFrame]:
    # each table is a hive-partitioned folder (run_date=...); these outputs hold one run each
    return {table: pd.read_parquet(out / table).drop(columns="run_date") for table in TABLES}


def _by_name(tables, name):
    videos = tables["videos"]
    return videos[videos.uri.str.endswith(name)].iloc[0]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, synthetic_clips, tiny_models):
    """One local run over the synthetic clips plus a broken file, shared by the checks below."""
    root = tmp_path_factory.mktemp("local_run")
    videos = root / "videos"
    shutil.copytree(synthetic_clips, videos)
    (videos / "broken.mp4").write_bytes(os.urandom(5000))
    summary = run_job(str(videos), str(root / "out"), _config(tiny_models), progress=False)
    return summary, root / "out", videos


def test_every_table_written_matches_its_declared_schema(local_run):
    _, out, _ = local_run
    dim = pd.read_parquet(out / "videos").embedding.iloc[0].shape[0]
    for table in TABLES:
        files = sorted((out / table).glob("run_date=*/*.parquet"))
        assert files, f"no file for table {table}"
        for path in files:
            schema = pq.read_schema(path)
            expected = table_schema(table, dim)
            assert schema.equals(expected, check_metadata=False), f"{path} differs from its schema"
            assert schema.metadata[b"vidlens.table"] == table.encode()


def test_a_broken_file_gives_one_error_row_and_the_others_complete(local_run):
    summary, out, videos = local_run
    tables = _read(out)
    assert summary.counts["videos_total"] == 4
    assert summary.counts["videos_ok"] == 3 and summary.counts["videos_failed"] == 1
    assert summary.exit_code == EXIT_PARTIAL
    errors = tables["errors"]
    assert len(errors) == 1
    assert errors.uri.iloc[0].endswith("broken.mp4") and errors.stage.iloc[0] == "decode"
    assert "broken.mp4" not in errors.message.iloc[0]  # (in the uri column, not again in the message)
    assert sorted(Path(u).name for u in tables["videos"].uri) == ["cuts.mp4", "order.mkv", "text.mp4"]


def test_rows_carry_run_and_fingerprint_and_runs_row_describes_the_run(local_run, tiny_models):
    summary, out, _ = local_run
    tables = _read(out)
    fingerprint = _config(tiny_models).fingerprint()
    for table in TABLES:
        frame = tables[table]
        assert set(frame.run_id) <= {summary.run_id}
        assert set(frame.config_fingerprint) <= {fingerprint}
    run = tables["runs"].iloc[0]
    assert run.status == "partial"
    assert dict(run.counts)["videos_total"] == 4
    roles = {m["role"]: m for m in run.models}
    assert roles["embed"]["model_id"] == tiny_models["embed"] and roles["embed"]["embedding_dim"] > 0
    assert RunConfig.from_dict(__import__("json").loads(run.config_json)).fingerprint() == fingerprint
    assert dict(run.packages)["torch"] == torch.__version__
    assert roles["embed"]["dtype"] == "float32"  # as configured
    assert run.vidlens_version == _version_here()


def _version_here() -> str:
    """vidlens' version as this checkout should say it: 0.1.0, with git's commit where it is a git checkout."""
    import subprocess
    from importlib import metadata

    root = Path(__file__).resolve().parent.parent
    version = metadata.version("vidlens")
    if not (root / ".git").exists():
        return version
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD"]).returncode != 0
    return f"{version}+g{commit}" + ("-dirty" if dirty else "")


def test_version_names_the_commit_of_a_checkout_and_the_version_alone_without_git(capsys, monkeypatch):
    # every build said 0.1.0, so the runs table could not tell the runs before an upgrade from those after it
    import subprocess

    from pipeline import preflight
    from pipeline.cli import main

    preflight.vidlens_version.cache_clear()
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"vidlens {_version_here()}\n"

    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "git")

    monkeypatch.setattr(subprocess, "run", no_git)
    preflight.vidlens_version.cache_clear()
    try:
        assert preflight.vidlens_version() == preflight.package_version("vidlens") == "0.1.0"
    finally:
        preflight.vidlens_version.cache_clear()


def test_version_asks_git_without_its_optional_locks_nor_a_hooks_git_variables(monkeypatch):
    """(mutation review) `git describe --dirty` refreshes the checkout's index, taking its lock where the
    user's own git may want it: the version is asked with GIT_OPTIONAL_LOCKS=0. A GIT_DIR or GIT_WORK_TREE
    set around vidlens (a hook's) named another repository: the commit is the checkout's all the same."""
    import subprocess

    from pipeline import preflight

    asked, run = [], subprocess.run

    def spied(command, *args, **kwargs):
        asked.append(kwargs.get("env"))
        return run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spied)
    monkeypatch.setenv("GIT_DIR", "/nonexistent/.git")
    monkeypatch.setenv("GIT_WORK_TREE", "/nonexistent")
    preflight.vidlens_version.cache_clear()
    try:
        version = preflight.vidlens_version()
    finally:
        preflight.vidlens_version.cache_clear()
    [env] = asked
    assert env["GIT_OPTIONAL_LOCKS"] == "0" and not {"GIT_DIR", "GIT_WORK_TREE"} & set(env), env
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_WORK_TREE")
    assert version == _version_here()


def test_preflight_leaves_cuda_uninitialised_and_the_dtype_is_filled_in_after_the_run(tiny_models, monkeypatch):
    """Asking CUDA for bf16 support initialises it; the local executor's workers, started after
    preflight, are then forked (0.1 s) instead of started through a forkserver (about 5 s)."""
    from pipeline.preflight import preflight, resolve_precision
    from workers import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def initialises_cuda(*args, **kwargs):
        raise AssertionError("preflight initialised CUDA")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", initialises_cuda)
    monkeypatch.setattr(models, "cuda_computes_bf16", initialises_cuda)
    config = RunConfig.from_dict({"stages": ["shots", "embed"], "models": {"embed": tiny_models["embed"]}})
    records, _ = preflight(config)
    assert {r["role"]: r["dtype"] for r in records} == {"embed": None, "shots": "float32"}
    for native, expected in ((True, "bfloat16"), (False, "float16")):  # (a T4 or V100: fp16)
        monkeypatch.setattr(models, "cuda_computes_bf16", lambda device: native)
        for record in records:
            record["dtype"] = None if record["role"] == "embed" else record["dtype"]
        resolve_precision(records, config)
        assert {r["role"]: r["dtype"] for r in records} == {"embed": expected, "shots": "float32"}


def test_bf16_on_cuda_is_asked_of_the_device_without_emulation(monkeypatch):
    """torch's is_bf16_supported() counts emulation: a T4 or V100, where bf16 runs slower than
    fp16, said yes, and `models.dtype: auto` chose bf16 there."""
    from workers import models

    asked = []

    class Device:
        def __init__(self, device):
            asked.append(("device", str(device)))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(("emulation", including_emulation)) or False)
    assert models.resolve_dtype(models.ModelsConfig(), torch.device("cuda", 1)) == torch.float16
    assert asked == [("device", "cuda:1"), ("emulation", False)]


def test_preflight_describes_the_dtype_auto_gives_on_this_cpu(tiny_models, monkeypatch):
    from pipeline.preflight import preflight
    from workers import models

    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"}})
    for computes, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(models, "cpu_computes_bf16", lambda: computes)
        records, _ = preflight(config)
        assert {r["role"]: r["dtype"] for r in records} == {"embed": expected}
    quantised = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu",
                                                                    "quantize": "int8"}})
    assert [r["dtype"] for r in preflight(quantised)[0]] == ["int8"]


def test_a_ray_runs_driver_without_a_gpu_takes_models_device_cuda_for_its_workers(tiny_models, monkeypatch):
    """The driver of a Ray run may sit on a CPU-only head node of a GPU cluster: `models.device:
    cuda` is for the workers, which check it, and the run started (it was refused here). The
    local executor's models run in this process: refused here, before any video."""
    from pipeline.preflight import preflight, resolve_precision
    from workers.models import ModelLoadError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = {"stages": ["shots", "embed"], "models": {"embed": tiny_models["embed"], "device": "cuda"}}
    on_ray = RunConfig.from_dict({**settings, "resources": {"executor": "ray"}})
    records, _ = preflight(on_ray)
    assert {r["role"]: (r["device"], r["dtype"]) for r in records} == {"embed": ("cuda", None),
                                                                       "shots": ("cuda", "float32")}
    resolve_precision(records, on_ray, {"embed": {("cuda:0", "bfloat16")}})
    assert {r["role"]: r["dtype"] for r in records} == {"embed": "bfloat16", "shots": "float32"}
    records, _ = preflight(on_ray)
    resolve_precision(records, on_ray)  # no video reached the model: described, not refused after the run
    assert {r["role"]: r["dtype"] for r in records} == {"embed": "float16", "shots": "float32"}
    explicit = RunConfig.from_dict({**settings, "models": {**settings["models"], "dtype": "float16"},
                                    "resources": {"executor": "ray"}})
    assert {r["dtype"] for r in preflight(explicit)[0]} == {"float16", "float32"}
    with pytest.raises(ModelLoadError, match="no CUDA device is visible"):
        preflight(RunConfig.from_dict({**settings, "resources": {"executor": "local"}}))


def test_shots_metadata_and_segments(local_run):
    _, out, _ = local_run
    tables = _read(out)
    cuts = _by_name(tables, "cuts.mp4")
    assert cuts.frame_count == 90 and cuts.fps == pytest.approx(25) and (cuts.width, cuts.height) == (160, 96)
    assert cuts.codec == "h264" and not cuts.has_audio and cuts.decoder == "decord"
    assert _by_name(tables, "text.mp4").has_audio
    segments = tables["segments"][tables["segments"].video_id == cuts.video_id].sort_values("segment_index")
    assert list(segments.start_frame[1:]) == pytest.approx([30, 60], abs=2)
    assert segments.start_frame.iloc[0] == 0 and segments.end_frame.iloc[-1] == 89
    assert segments.start_s.iloc[1] == pytest.approx(segments.start_frame.iloc[1] / 25)


def test_frames_labels_captions_matches_and_texts(local_run, tiny_models):
    _, out, _ = local_run
    tables = _read(out)
    cuts = _by_name(tables, "cuts.mp4")
    frames = tables["frames"][tables["frames"].video_id == cuts.video_id]
    assert len(frames) >= 8 and frames.frame_index.is_monotonic_increasing
    assert set(frames.segment_index) == {0, 1, 2}  # every shot has a sampled frame
    labels = tables["labels"][tables["labels"].video_id == cuts.video_id]
    video_objects = labels[(labels.level == "video") & (labels.kind == "object")]
    assert list(video_objects["rank"]) == [1, 2, 3, 4, 5]
    assert set(labels.kind) == {"object", "scene"}
    captions = tables["captions"][tables["captions"].video_id == cuts.video_id]
    assert sorted(captions.level) == ["segment"] * 3 + ["video"]
    matches = tables["matches"]
    n_videos, n_segments = len(tables["videos"]), len(tables["segments"])
    assert len(matches) == len(QUERIES) * (n_videos + n_segments)
    assert matches.probability.between(0, 1).all()
    text_video = _by_name(tables, "text.mp4")
    read = " ".join(tables["texts"][tables["texts"].video_id == text_video.video_id].text).upper()
    assert "HELLO" in read and "VIDLENS" in read


def test_more_shots_than_max_frames_keeps_the_embeddings_of_the_shots_with_frames(tmp_path, synthetic_clips,
                                                                                   tiny_models):
    # guards against a video of more shots than sampling.max_frames losing every embed output to an errors row
    import shutil

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(synthetic_clips / "cuts.mp4", videos)  # three shots of 30 frames
    config = _config(tiny_models).with_overrides(
        {"stages": ["shots", "embed", "objects"], "sampling": {"max_frames": 2}})
    summary = run_job(str(videos), str(tmp_path / "out"), config, progress=False)
    tables = _read(tmp_path / "out")
    assert summary.counts["videos_ok"] == 1 and tables["errors"].empty, tables["errors"].message.tolist()
    video = tables["videos"].iloc[0]
    assert video.status == "ok" and video.embedding is not None and video.num_sampled_frames == 2
    segments = tables["segments"].sort_values("segment_index")
    assert len(segments) == 3
    sampled = set(tables["frames"].segment_index)
    assert len(sampled) == 2  # the cap leaves one shot without a frame
    assert [e is not None for e in segments.embedding] == [i in sampled for i in segments.segment_index]
    labelled = set(tables["labels"][tables["labels"].level == "segment"].segment_index)
    assert labelled == sampled


def test_a_video_past_shots_max_frames_gets_one_segment_and_the_summary_names_it(tmp_path, tiny_models):
    # a long recording (or a small file of many tiny frames) read every frame at 48x27 for TransNetV2:
    # hours on a CPU, 3,888 bytes a frame in the decode child and the worker
    from workers.synthetic import scene_frames, write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "at_bound.mp4", scene_frames([40, 95], 150), fps=25)
    write_video(videos / "past_bound.mp4", scene_frames([40, 95], 151), fps=25)
    config = _config(tiny_models).with_overrides({"stages": ["shots", "embed"], "shots.max_frames": 150})
    summary = run_job(str(videos), str(tmp_path / "out"), config, progress=False)
    tables = _read(tmp_path / "out")
    assert summary.status == "succeeded" and tables["errors"].empty, tables["errors"].message.tolist()
    segments = tables["segments"].merge(tables["videos"][["video_id", "uri"]]).sort_values(["uri", "segment_index"])
    past = segments[segments.uri.str.endswith("past_bound.mp4")]
    assert past[["start_frame", "end_frame", "source"]].values.tolist() == [[0, 150, "over_shots_max_frames"]]
    at = segments[segments.uri.str.endswith("at_bound.mp4")]
    assert list(at.source) == ["transnetv2"] * 3 and list(at.start_frame[1:]) == pytest.approx([40, 95], abs=2)
    assert _by_name(tables, "past_bound.mp4").status == "ok"
    assert summary.counts["videos_over_shots_max_frames"] == 1
    [warning] = [w for w in summary.warnings if "shots.max_frames" in w]
    assert warning.startswith("1 video of more than 150 frames (shots.max_frames) got no shot detection")
    assert str(videos / "past_bound.mp4") in warning and "at_bound" not in warning
    assert dict(tables["runs"].counts.iloc[0])["videos_over_shots_max_frames"] == 1


def test_the_warning_of_videos_past_shots_max_frames_names_three_and_counts_the_rest_once():
    """(mutation review) The summary's warning names the first three videos past the bound and counts
    the others, and is given once where it is asked for again (a run ending on an error at its end)."""
    from pipeline import recording
    from pipeline.summary import RunSummary

    config = RunConfig().with_overrides({"shots.max_frames": 1500})
    summary = RunSummary(run_id="r1", source="/v", output="/o", status="succeeded")
    summary.over_shot_bound = [f"/v/{name}.mp4" for name in "abc"]
    recording.warn_over_shot_bound(summary, config)
    assert summary.warnings == ["3 videos of more than 1,500 frames (shots.max_frames) got no shot detection, one "
                                "segment each (segments.source 'over_shots_max_frames'): /v/a.mp4, /v/b.mp4, /v/c.mp4. "
                                "Raise the setting (0: no bound) to find their shots; that reruns every video's rows, "
                                "as any shots setting"]
    summary.warnings, summary.over_shot_bound = [], [f"/v/{name}.mp4" for name in "abcde"]
    recording.warn_over_shot_bound(summary, config)
    recording.warn_over_shot_bound(summary, config)
    [warning] = summary.warnings
    assert warning.startswith("5 videos of more than 1,500 frames") and "/v/c.mp4 and 2 more. Raise" in warning
    assert "/v/d.mp4" not in warning
    summary.warnings, summary.over_shot_bound = [], []
    recording.warn_over_shot_bound(summary, config)
    assert summary.warnings == []


def test_a_run_that_fails_at_its_end_names_its_videos_past_shots_max_frames_too(tmp_path, tiny_models, monkeypatch):
    """(mutation review) A run that ends on an error once its videos are recorded (`vidlens run
    --summary-json` writes its summary) warns of the videos past `shots.max_frames` as a finished one does."""
    from pipeline import local as local_executor
    from workers.synthetic import scene_frames, write_video

    def fails_at_the_end(*args, **kwargs):
        yield from run_local(*args, **kwargs)
        raise RuntimeError("the Ray cluster lost a node")

    run_local = local_executor.run_local
    monkeypatch.setattr(local_executor, "run_local", fails_at_the_end)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "at_bound.mp4", scene_frames([40, 95], 150), fps=25)
    write_video(videos / "past_bound.mp4", scene_frames([40, 95], 151), fps=25)
    config = _config(tiny_models).with_overrides({"stages": ["shots", "embed"], "shots.max_frames": 150})
    with pytest.raises(RuntimeError, match="lost a node") as failed:
        run_job(str(videos), str(tmp_path / "out"), config, progress=False)
    summary = failed.value.run_summary
    assert summary.status == "error" and summary.counts["videos_over_shots_max_frames"] == 1
    [warning] = [w for w in summary.warnings if "shots.max_frames" in w]
    assert warning.startswith("1 video of more than 150 frames (shots.max_frames) got no shot detection")
    assert str(videos / "past_bound.mp4") in warning and "at_bound" not in warning

def test_video_embedding_equals_the_model_called_directly(local_run, tiny_models):
    """Catches RGB/BGR, resize, normalisation and frame-order mistakes anywhere on the path."""
    from transformers import AutoModel, AutoProcessor

    _, out, videos = local_run
    tables = _read(out)
    model = AutoModel.from_pretrained(tiny_models["embed"]).eval()
    processor = AutoProcessor.from_pretrained(tiny_models["embed"])
    for name in ("cuts.mp4", "order.mkv"):
        video = _by_name(tables, name)
        indices = tables["frames"][tables["frames"].video_id == video.video_id].frame_index.tolist()
        frames = decord.VideoReader(video.uri).get_batch(indices).asnumpy()
        with torch.no_grad():
            features = model.get_image_features(**processor(images=list(frames), return_tensors="pt"))
        features = getattr(features, "pooler_output", features)
        features = torch.nn.functional.normalize(features, dim=-1).mean(0)
        expected = torch.nn.functional.normalize(features, dim=0).numpy()
        assert np.abs(video.embedding - expected).max() < 1e-4


def test_command_line_exit_codes_and_messages(tmp_path, clip_folder, tiny_models):
    base = [sys.executable, "-m", "pipeline", "run", str(clip_folder), "--out", str(tmp_path / "out"),
            "--executor", "local", "--no-progress", "--embed-model", tiny_models["embed"],
            "--caption-model", tiny_models["captions"], "--stages", "shots,embed,match", "--query", "red"]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert "3 ok" in ok.stdout and "succeeded" in ok.stdout

    (clip_folder / "empty.mp4").write_bytes(b"")
    partial = subprocess.run(base + ["--full", "--summary-json", str(tmp_path / "s.json")], capture_output=True,
                             text=True, timeout=600)
    assert partial.returncode == EXIT_PARTIAL, partial.stderr
    assert "empty.mp4" in partial.stdout
    assert '"videos_failed": 1' in (tmp_path / "s.json").read_text()

    missing = subprocess.run(base[:-8] + ["--embed-model", str(tmp_path / "no-such-model")],
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == EXIT_FAILED
    assert "cannot load the embed model" in missing.stderr and "no-such-model" in missing.stderr


def test_real_clips(tmp_path, shared_videos, tiny_models):
    """The five real clips in ../shared/videos: every one decodes, with the manifest's facts."""
    # (bf16 where this CPU has it: the shot detector reads every frame, 1.9x as fast as in float32)
    config = _config(tiny_models).with_overrides({"stages": ["shots", "embed", "objects", "ocr"],
                                                  "models.dtype": "auto"})
    summary = run_job(str(shared_videos), str(tmp_path / "out"), config, progress=False)
    tables = _read(tmp_path / "out")
    assert summary.counts["videos_ok"] == 5, summary.render()
    expected = {  # name: (width, height, fps, frames, codec, audio)
        "pool_skimming.mp4": (340, 256, 30, 300, "h264", False),
        "eye_makeup.avi": (320, 240, 25, 164, "mpeg4", True),
        "peppers_tray.mp4": (596, 336, 23.976, 219, "h264", True),
        "drummer_portrait.mp4": (204, 360, 30, 1090, "h264", True),
        "keynote_subtitles.mp4": (576, 1024, 30, 524, "h264", True),
    }
    for name, (width, height, fps, frames, codec, audio) in expected.items():
        video = _by_name(tables, name)
        assert (video.width, video.height, video.codec, video.has_audio) == (width, height, codec, audio)
        assert video.fps == pytest.approx(fps, rel=0.02) and abs(video.frame_count - frames) <= 2
    keynote = _by_name(tables, "keynote_subtitles.mp4")
    assert len(tables["texts"][tables["texts"].video_id == keynote.video_id]) > 0
    # a label's time ranges lie within its segment, or its video (rounded to the millisecond, a
    # range of keynote's first shot ended at 15.167, past the shot's end at 15.166667)
    spans = {(row.video_id, row.segment_index): (row.start_s, row.end_s) for row in tables["segments"].itertuples()}
    spans.update({(row.video_id, None): (0.0, row.duration_s) for row in tables["videos"].itertuples()})
    for label in tables["labels"].itertuples():
        start, end = spans[(label.video_id, None if label.level == "video" else int(label.segment_index))]
        assert all(start <= r["start_s"] < r["end_s"] <= end for r in label.time_ranges), label


@pytest.mark.ray
def test_ray_run_gives_the_same_rows_as_the_local_run(tmp_path, local_run, tiny_models):
    """`vidlens run --executor ray`, in a process of its own as a user's is: the Ray instance it
    starts lives and ends with it (a second instance started and shut down in pytest's process,
    after test_cluster's, is nothing a user does, and Ray's threads left from the first can abort it)."""
    import yaml

    _, local_out, videos = local_run
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_settings(tiny_models, executor="ray")))
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    # a temp folder of its own (short: Ray puts Unix sockets under it), so no running Ray is joined
    ray_temp = tempfile.mkdtemp(prefix="vlr", dir="/tmp")
    env.update(RAY_TMPDIR=ray_temp, RAY_USAGE_STATS_ENABLED="0")
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(videos), "--out", str(tmp_path / "out"),
                               "--config", str(config), "--no-progress", "--summary-json", str(tmp_path / "s.json")],
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert done.returncode == EXIT_PARTIAL, done.stderr[-3000:]
    counts = json.loads((tmp_path / "s.json").read_text())["counts"]
    assert counts["videos_ok"] == 3 and counts["videos_failed"] == 1
    ray_tables, local_tables = _read(tmp_path / "out"), _read(local_out)
    for table, keys in (("segments", ["video_id", "segment_index"]), ("frames", ["video_id", "frame_index"]),
                        ("captions", ["video_id", "level", "segment_index"]),
                        ("texts", ["video_id", "frame_index", "text"])):
        a = ray_tables[table].drop(columns=["run_id"]).sort_values(keys).reset_index(drop=True)
        b = local_tables[table].drop(columns=["run_id"]).sort_values(keys).reset_index(drop=True)
        if "embedding" in a:
            assert np.abs(np.stack(a.pop("embedding")) - np.stack(b.pop("embedding"))).max() < 1e-5
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4)
