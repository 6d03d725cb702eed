"""Each benchmark runs in its quick mode and appends a table to the document it is given.

Quick mode checks the plumbing (clips generated, models built, every variant run, table
written); it measures nothing, so nothing here asserts on a speed.
"""

from __future__ import annotations

import subprocess
import time

import pytest


@pytest.fixture(autouse=True)
def bench_cache(tmp_path_factory, monkeypatch):
    """Generated clips and models go to a temporary cache, not the repository's bench/.cache."""
    import bench.clips
    import bench.common
    import bench.latency
    import bench.memory
    import bench.pipeline
    import bench.precision
    import bench.vocabulary

    cache = tmp_path_factory.getbasetemp() / "bench-cache"
    for module in (bench.common, bench.clips, bench.latency, bench.pipeline, bench.memory, bench.precision,
                   bench.vocabulary):
        monkeypatch.setattr(module, "CACHE", cache)
    return cache


def _section(doc) -> str:
    text = doc.read_text()
    assert "quick mode" in text and "| target | measured | verdict |" in text
    assert "- machine:" in text and "- versions:" in text
    return text


def test_sampling_benchmark_quick(tmp_path):
    from bench import sampling

    doc = tmp_path / "benchmarks.md"
    assert sampling.main(["--quick", "--doc", str(doc)]) == 0
    text = _section(doc)
    for method in sampling.METHODS:
        assert f"| {method} | 8 |" in text and f"| {method} | 32 |" in text


def test_nvdec_benchmark_quick_runs_without_a_gpu(tmp_path):
    from bench import nvdec

    doc = tmp_path / "benchmarks.md"
    assert nvdec.main(["--quick", "--processes", "2", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "quick mode" in text and "- machine:" in text
    assert "| software, 1 thread |" in text and "| software, all cores |" in text
    # without a GPU the NVDEC rows are left out and the reason said; with one they are there
    assert ("NVDEC not measured: " in text) != ("| NVDEC |" in text)


def test_pipeline_benchmark_quick(tmp_path, monkeypatch):
    import threading

    import bench.naive
    from bench import pipeline
    from workers.embed import EmbedStage
    from workers.embedding import VideoTextModel

    # where the models ran: the ceilings' and the naive loop's as the runs', off the main thread
    on_main: dict[str, list[bool]] = {"embed stage": [], "naive loop": []}
    for owner, name, label in ((EmbedStage, "process", "embed stage"), (bench.naive, "run_naive", "naive loop")):
        def recorded(*args, original=getattr(owner, name), label=label, **kwargs):
            on_main[label].append(threading.current_thread() is threading.main_thread())
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    # prompts encoded by each timed run: the ceiling pass before it leaves the vocabularies on
    # disk, which the naive loop, encoding its own, cannot read
    encoded, per_run = [], []
    text_features, timed_run = VideoTextModel._text_features, pipeline.timed_run
    monkeypatch.setattr(VideoTextModel, "_text_features",
                        lambda self, texts: encoded.append(len(texts)) or text_features(self, texts))

    def counted(*args, **kwargs):
        before = sum(encoded)
        run = timed_run(*args, **kwargs)
        per_run.append(sum(encoded) - before)
        return run

    monkeypatch.setattr(pipeline, "timed_run", counted)
    doc = tmp_path / "benchmarks.md"
    assert pipeline.main(["--quick", "--executors", "local", "--repeats", "2", "--doc", str(doc)]) == 0
    text = _section(doc)
    assert "decode ceiling" in text and "`vidlens run` (local executor)" in text and "naive loop" in text
    assert "whole run (mean of 2 runs: " in text  # each run repeated, the mean reported
    # each run encodes the object and scene vocabularies, as the naive loop does
    prompts = pipeline.RunConfig.from_dict({}).labels
    assert per_run == [len(prompts.objects) * len(prompts.object_templates)
                       + len(prompts.scenes) * len(prompts.scene_templates)] * 2
    assert "encode the label vocabularies" in text
    assert on_main["embed stage"] and on_main["naive loop"] == [False, False]
    assert not any(on_main["embed stage"])


def test_vocabulary_benchmark_quick(tmp_path):
    from bench import vocabulary

    doc = tmp_path / "benchmarks.md"
    assert vocabulary.main(["--quick", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "quick mode" in text and "- machine:" in text
    # the two ways give the same embeddings (float32 on a CPU without bf16, bf16 rounding otherwise)
    [row] = [line for line in text.splitlines() if line.startswith("| tiny CLIP")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "424" and cells[6] == "1.00x" and float(cells[-1]) > 0.999


def test_the_naive_loop_reads_the_frames_and_shots_the_pipeline_reads(bench_cache, tmp_path):
    """Benchmark 3's baseline is fair: the same models, shots and sampled frames as the pipeline's stages."""
    import pandas as pd

    from bench.clips import clip_folder
    from bench.naive import run_naive
    from bench.pipeline import bench_config, stage_ceilings
    from workers.tiny_captions import build_tiny_git
    from workers.tiny_models import build_tiny_clip

    source = clip_folder("naive", 1, (2, 2), 96, 64, distinct=1)
    clip = str(build_tiny_clip(bench_cache / "models" / "tiny-clip"))
    git = str(build_tiny_git(bench_cache / "models" / "tiny-git"))
    config = bench_config(clip, git, ("shots", "embed", "objects", "scenes", "captions"), 3, "local", 2)
    ceilings = stage_ceilings(config, source)
    assert run_naive(sorted(source.glob("*.mp4")), config, tmp_path / "naive.parquet") == 1
    rows = pd.read_parquet(tmp_path / "naive.parquet")
    assert ceilings["failed"] == 0 and rows["frames"].sum() == ceilings["frames"]
    assert (rows["segments"] >= 1).all() and rows["caption"].notna().all()


def test_a_run_timed_in_a_fresh_process_comes_back_with_every_videos_time(bench_cache):
    # what the benchmarks do on a GPU once a ceiling pass has initialised CUDA
    from bench.clips import clip_folder
    from bench.pipeline import bench_config
    from bench.runs import timed_run
    from workers.tiny_models import build_tiny_clip

    source = clip_folder("fresh", 3, (1, 2), 96, 64, distinct=2)
    clip = str(build_tiny_clip(bench_cache / "models" / "tiny-clip"))
    run = timed_run(source, bench_config(clip, clip, ("embed", "objects", "scenes"), 1, "local", 2, 64, "decord"),
                    fresh=True)
    assert run.status == "succeeded" and run.videos == 3 and len(run.result_s) == 3
    assert 0 < run.first_result_s <= run.wall_s


def test_memory_benchmark_quick(tmp_path):
    from bench import memory

    doc = tmp_path / "benchmarks.md"
    assert memory.main(["--quick", "--rerun", "--doc", str(doc)]) == 0
    text = _section(doc)
    assert "driver peak at 12 within 10% of 4" in text
    assert "after a throwaway run of 4 clips" in text  # one-off costs not charged to the first size
    assert "worker processes at the PSS peak" in text
    # the second run over each output found nothing new: no video processed again
    assert "| 4 | 0 |" in text and "| 12 | 0 |" in text and "growth per video in the output" in text


def test_the_peak_table_names_a_decode_child_as_one():
    """Whether a decode child is alive at the sampled peak depends on timing; how one is named does not."""
    from bench.memory import _composition

    processes = {10: (300 * 2**20, "MapBatches", 1), 11: (200 * 2**20, "MapBatches", 10), 12: (100 * 2**20, "IDLE", 1)}
    assert _composition(processes) == [(300 * 2**20, "MapBatches"), (200 * 2**20, "MapBatches (child)"),
                                       (100 * 2**20, "IDLE")]


def test_ledger_memory_benchmark_quick(tmp_path):
    from bench import memory

    doc = tmp_path / "benchmarks.md"
    assert memory.main(["--quick", "--ledger", "50,300", "--doc", str(doc)]) == 0
    text = _section(doc)
    assert "| 50 |" in text and "| 300 |" in text  # each synthetic ledger loaded back whole
    assert "driver memory per video in the output, snapshot written (peak)" in text


def test_precision_benchmark_quick(tmp_path, monkeypatch):
    import threading

    from bench import precision
    from workers.embed import EmbedStage

    on_main = []  # the embed stage runs off the main thread, as the local executor runs it
    process = EmbedStage.process
    monkeypatch.setattr(EmbedStage, "process", lambda self, tasks: on_main.append(
        threading.current_thread() is threading.main_thread()) or process(self, tasks))
    doc = tmp_path / "benchmarks.md"
    assert precision.main(["--quick", "--captions", "2", "--doc", str(doc)]) == 0
    assert on_main and not any(on_main)
    text = doc.read_text()
    assert "quick mode" in text and "- machine:" in text and "`models.dtype: auto` gives" in text
    for name in precision.PRECISIONS:
        assert f"| {name} |" in text
    for table in ("Shots:", "Captions:"):
        assert "| float32 | " in text.split(table)[1] and "| bfloat16 | " in text.split(table)[1]
    # the baseline against itself
    assert " | 1 | 1.00000 / 1.00000 | 1.00 |" in text and " | 1 | 0.0000 | 1.00 |" in text


def test_shots_benchmark_quick(tmp_path):
    from bench import shots

    doc = tmp_path / "benchmarks.md"
    assert shots.main(["--quick", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "quick mode" in text and "- machine:" in text
    for precision in shots.PRECISIONS:
        for name, _, _ in shots.VARIANTS:
            assert f"| {precision} | {name} |" in text
    assert "| float32 | upstream model, 8 windows a pass |" in text and " | 1 | 1 | 0 | 1/1 |" in text


def test_preparation_benchmark_quick(tmp_path):
    from bench import preparation

    doc = tmp_path / "benchmarks.md"
    assert preparation.main(["--quick", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "quick mode" in text and "- machine:" in text
    for way in ("processor", "pil"):
        assert f"| 160x90 | {way} |" in text and f"| 320x180 | {way} |" in text
    for flow in ("earlier", "+ direct ways", "+ one open", "now"):
        assert f"| 160x90, 2 s | {flow} |" in text


def test_latency_benchmark_quick(tmp_path):
    from bench import latency

    doc = tmp_path / "benchmarks.md"
    assert latency.main(["--quick", "--doc", str(doc)]) == 0
    text = _section(doc)
    assert "| 20 ms | 20 |" in text and "| 50 ms | 20 |" in text
    assert "| store, each worker its own | 5 |" in text and "| store, ahead | 5 |" in text


def test_the_memory_sampler_counts_rays_own_processes_apart_from_its_workers(tmp_path):
    """bench.memory on Ray left the raylet and the GCS server out of every figure. The raylet's
    own arguments name the worker script (`--python_worker_command=... default_worker.py ...`):
    it was taken for a worker not yet named, and left out of Ray's own processes too."""
    import sys

    from bench.memory import _workers

    script = tmp_path / "ray" / "_private" / "workers" / "default_worker.py"
    script.parent.mkdir(parents=True)
    script.write_text("import time\ntime.sleep(30)\n")
    raylet = ("--python_worker_command=/venv/bin/python /venv/lib/ray/_private/workers/setup_worker.py "
              "/venv/lib/ray/_private/workers/default_worker.py --node-ip-address=127.0.0.1 "
              "RAY_WORKER_DYNAMIC_OPTION_PLACEHOLDER")
    started = [
        subprocess.Popen(["bash", "-c", 'exec -a "ray::Decode" sleep 30']),
        subprocess.Popen(["bash", "-c", 'exec -a /venv/lib/ray/core/src/ray/raylet/raylet "$0" -c "$1" "$2"',
                          sys.executable, "import time; time.sleep(30)", raylet]),
        subprocess.Popen(["bash", "-c", 'exec -a gcs_server sleep 30']),
        # a worker before it names itself: `python setup_worker.py default_worker.py ...`
        subprocess.Popen([sys.executable, str(script), "--node-ip-address=127.0.0.1"]),
    ]
    try:
        ours = {p.pid for p in started}  # (not what earlier tests left: a multiprocessing resource tracker)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # (until each has exec'd the command it is named by)
            workers, servers = _workers(ray_only=True)
            workers, servers = {p: w for p, w in workers.items() if p in ours}, sorted(set(servers) & ours)
            if list(workers) == [started[0].pid] and servers == sorted(p.pid for p in started[1:3]):
                break
            time.sleep(0.05)
        assert [name for name, _ in workers.values()] == ["Decode"]
        assert servers == sorted(p.pid for p in started[1:3])
        everything, none = _workers(ray_only=False)  # the local executor: every descendant is a worker
        assert len(everything) >= 4 and none == []
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_the_memory_benchmark_refuses_to_join_a_running_ray_cluster(tmp_path, monkeypatch, capsys):
    """Joined, a running cluster's workers are not this process's descendants: every worker
    figure would have been zero (or another run's), reported as a measurement."""
    from bench import memory

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    doc = tmp_path / "benchmarks.md"
    assert memory.main(["--executor", "ray", "--sizes", "2,3", "--doc", str(doc)]) == 2
    assert "ray stop" in capsys.readouterr().err and not doc.exists()


def test_outputs_benchmark_quick(tmp_path):
    from bench import outputs

    doc = tmp_path / "benchmarks.md"
    assert outputs.main(["--quick", "--doc", str(doc)]) == 0
    text = _section(doc)
    for variant in ("local folder", "bucket, one at a time, on the driver", "bucket, at once, on a thread, the lock's pause",
                    "bucket, at once, on a thread, the lock created, a batch at a time",
                    "bucket, at once, on a thread, the lock created, 3 batches at a time, every PUT asking first",
                    "bucket, at once, on a thread, the lock created, 3 batches at a time (the default)"):
        assert f"| {variant} | 8 |" in text
    for where in ("S3 (SeaweedFS), 5 ms a request", "local folder"):
        assert f"| {where} | `vidlens compact` |" in text and f"| {where} | `vidlens forget` |" in text
    assert "| seconds, pyarrow given Python files (before 2026-12-07) | those / at once |" in text
    assert "Part 3: opening the views" in text and text.count("| S3 (SeaweedFS), 5 ms a request |") == 3
    assert "| target | measured | verdict |" in text


@pytest.mark.parametrize("argv, command", [
    (["bench/outputs.py", "--quick"], "python -m bench.outputs --quick"),
    (["-c", "--quick"], "-c --quick"),  # (python -c, as pytest-xdist's workers run; a file of that name is none)
])
def test_a_report_names_the_command_it_was_run_by(argv, command, monkeypatch):
    from bench import common

    monkeypatch.chdir(common.ROOT)
    monkeypatch.setattr("sys.argv", argv)
    assert f"- command: `{command}`" in common.Report("A", quick=True).render()
