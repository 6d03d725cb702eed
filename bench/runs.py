"""Running `vidlens run` in-process for a benchmark, with the time of every finished video.

`timed_run` calls `pipeline.job.run_job` exactly as the CLI does and records when each
video comes back from the executor (the plan's `run_ray` / `run_local`), so a benchmark can
tell start-up (Ray, model loading, text vocabularies) from steady-state throughput.

Once this process has initialised CUDA (a ceiling pass on a GPU does), the run goes to a new
process started with spawn, as `vidlens run` starts: the local executor's workers then fork
as a user's run's do, instead of starting through a forkserver (12-16 s on the H200 machine).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from schemas.config import RunConfig


@dataclass
class RunTiming:
    """Wall time of one run and when each of its videos came back, in seconds from its start."""

    wall_s: float
    videos: int
    frames: int
    result_s: list[float] = field(default_factory=list)
    status: str = ""
    # videos per model batch: start-up is the first `batch` videos (the first batch, which the
    # local executor sends in pieces, `pipeline.local._feed`)
    batch: int = 1

    @property
    def first_result_s(self) -> float:
        """Seconds until the first video was finished."""
        return self.result_s[0] if self.result_s else float("nan")

    @property
    def steady_videos_per_s(self) -> float:
        """Videos a second after the first batch came back (start-up excluded), where two batches or
        more came after it."""
        # the videos after the first batch, over the time since its last one came back; one partial
        # batch after the first measures little: 60 clips in batches of 32, with shot detection,
        # read 3.05 and 34.7 videos/s in two runs of the same code (2026-12-07)
        times, first = self.result_s, min(self.batch, len(self.result_s))
        if first < 1 or len(times) - first < 2 * self.batch or times[-1] <= times[first - 1]:
            return float("nan")  # under three batches: no steady state to speak of
        return (len(times) - first) / (times[-1] - times[first - 1])

    @property
    def videos_per_s(self) -> float:
        """Videos a second over the whole run, start-up included."""
        return self.videos / self.wall_s


@contextlib.contextmanager
def result_clock(start: float) -> Iterator[list[float]]:
    """Record the time (from `start`) at which each task leaves the executor."""
    from pipeline import local, ray_executor

    times: list[float] = []
    originals = {(ray_executor, "run_ray"): ray_executor.run_ray, (local, "run_local"): local.run_local}

    def clocked(runner):
        def run(*args, **kwargs):
            for task in runner(*args, **kwargs):
                times.append(time.perf_counter() - start)
                yield task
        return run

    for (module, name), runner in originals.items():
        setattr(module, name, clocked(runner))
    try:
        yield times
    finally:
        for (module, name), runner in originals.items():
            setattr(module, name, runner)


def timed_run(source: Path, config: RunConfig, out: Path | None = None, fresh: bool | None = None) -> RunTiming:
    """Run the pipeline on `source` (output in a temporary folder unless `out`) and time it;
    with `fresh` (by default, once this process has initialised CUDA) in a new process."""
    if fresh is None:
        cuda = getattr(sys.modules.get("torch"), "cuda", None)
        fresh = cuda is not None and cuda.is_initialized()
    if fresh:
        # (a ProcessPoolExecutor's worker is no daemon: it may start the run's own workers)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
            return process.submit(timed_run, source, config, out, False).result()
    from pipeline.job import run_job

    folder = Path(tempfile.mkdtemp(prefix="vidlens-bench-")) if out is None else out
    start = time.perf_counter()
    try:
        with result_clock(start) as times:
            summary = run_job(str(source), str(folder / "out"), config, progress=False)
        wall = time.perf_counter() - start
        if config.resources.executor == "ray":
            import ray

            # the next run starts its own instance, as each `vidlens run` does: left up, only a
            # series' first run paid Ray's start, and a mean of rounds mixed the two kinds
            ray.shutdown()
        return RunTiming(wall, int(summary.counts["videos_total"]), int(summary.counts["frames"]),
                         list(times), summary.status, config.resources.videos_per_batch)
    finally:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
