"""What every benchmark shares: timing by interleaved medians, the machine header, the report.

Every figure a benchmark records is a ratio of two timings taken in the same run, with the
variants interleaved and repeated, because this machine's cores are shared and absolute
times drift with whatever else runs. `Report` prints a Markdown table and appends it, with
the command, date, machine and library versions, to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: generated clips and model folders; never committed (see .gitignore).
CACHE = Path(os.environ.get("VIDLENS_BENCH_CACHE", ROOT / "bench" / ".cache"))
#: the real clips beside the repository (see their MANIFEST.md)
SHARED_VIDEOS = Path(os.environ.get("VIDLENS_SHARED_VIDEOS", ROOT.parent / "shared" / "videos"))
DOC = ROOT / "docs" / "benchmarks.md"
#: distribution -> module; an imported module's own __version__ is what ran (an installed
#: distribution's metadata can be a stale one's: a wheel upgraded with pip --target left it)
_VERSIONS = {"torch": "torch", "transformers": "transformers", "decord": "decord", "av": "av",
             "opencv-python": "cv2", "ray": "ray", "pyarrow": "pyarrow", "numpy": "numpy"}


def arguments(doc: str | None, quick: str, repeats: int | None = None,
              rounds: str = "interleaved rounds of each variant") -> argparse.ArgumentParser:
    """The command line every benchmark starts from: `--quick` (`quick` says what it runs),
    `--repeats` where its variants run in interleaved rounds (default `repeats`), `--doc`."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help=f"{rounds} (default {repeats})")
    parser.add_argument("--doc", type=Path, default=None, help="append to this file instead of docs/benchmarks.md")
    return parser


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant, run round-robin `repeats` times so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def timed(run: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def on_thread(run: Callable[[], object]) -> object:
    """`run()` on a thread of its own, as the local executor runs each model stage; its result.

    A variant compared with a run's model stages (a ceiling, the naive loop) runs its models as
    they do: on this 2-core machine, under load, torch ran the same forward passes 1.7-4x slower
    on the main thread than on another thread (2026-12-05, within the benchmarks; cause not
    established; full-size CLIP alone on a quiet machine: the same speed on both).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="vidlens-bench") as thread:
        return thread.submit(run).result()


def load_average() -> str:
    """The 1/5/15-minute load averages: how busy the shared machine was during the run."""
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def machine() -> str:
    """Cores, memory, accelerator and OS of this machine, in one line."""
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = f", torch threads {torch.get_num_threads()}"
    except ImportError:
        gpu, threads = "torch missing", ""
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {memory}, {gpu}{threads}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def versions() -> str:
    """Versions of the libraries the figures depend on."""
    found = []
    for name, module in _VERSIONS.items():
        version = getattr(sys.modules.get(module), "__version__", None)
        if version:
            found.append(f"{name} {version}")
            continue
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats are shown with 3 significant digits."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    """How a target reads in a table."""
    return "met" if met else "**missed**"


class BackgroundSampler:
    """Runs `_sample` on a thread while a `with` block runs; `_sample` loops until `_stop` is set."""

    def __init__(self, interval_s: float):
        import threading

        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        raise NotImplementedError


class GpuUtilisation(BackgroundSampler):
    """Mean GPU utilisation (%) while the block runs, sampled twice a second; None without a GPU."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(interval_s)
        self.samples: list[float] = []

    def mean(self) -> float | None:
        """The mean of the samples, or None when none could be taken."""
        return statistics.fmean(self.samples) if self.samples else None

    def _sample(self) -> None:
        try:
            import pynvml  # nvidia-ml-py: read through NVML, never through torch (see pipeline.local)

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self._stop.is_set():
                self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                self._stop.wait(self.interval_s)
        except Exception:  # noqa: BLE001 - no NVML or no GPU: utilisation is simply not reported
            return


class Report:
    """One benchmark's output: tables and notes, printed and appended to docs/benchmarks.md."""

    def __init__(self, title: str, quick: bool, doc: Path | None = None):
        self.title = title
        self.quick = quick
        self.doc = doc or DOC
        self.started = datetime.now(timezone.utc)
        self.load_at_start = load_average()
        self.parts: list[str] = []

    def add_table(self, headers: list[str], rows: list[list[object]], caption: str = "") -> None:
        """Add a table (with an optional caption line above it)."""
        self.parts.append((f"{caption}\n\n" if caption else "") + table(headers, rows))

    def note(self, text: str) -> None:
        """Add a paragraph."""
        self.parts.append(text)

    def render(self) -> str:
        """The whole section as Markdown."""
        script = Path(sys.argv[0]).resolve()  # (`-c` where Python has no file to name: as given)
        program = "python -m " + script.with_suffix("").relative_to(ROOT).as_posix().replace("/", ".") \
            if script.is_file() and script.is_relative_to(ROOT) else sys.argv[0]
        command = " ".join([program, *sys.argv[1:]])
        header = [
            f"## {self.title}{' (quick mode: plumbing check, not a measurement)' if self.quick else ''}",
            "",
            f"- command: `{command}`",
            f"- date: {self.started:%Y-%m-%d %H:%M} UTC, took {(datetime.now(timezone.utc) - self.started).total_seconds():.0f} s",
            f"- machine: {machine()}",
            f"- load average (1/5/15 min) at start: {self.load_at_start}, at end: {load_average()}",
            f"- versions: {versions()}",
        ]
        return "\n".join(header) + "\n\n" + "\n\n".join(self.parts) + "\n"

    def publish(self) -> str:
        """Print the section and append it to the benchmarks document."""
        text = self.render()
        print(text)
        self.doc.parent.mkdir(parents=True, exist_ok=True)
        with self.doc.open("a") as handle:
            handle.write("\n" + text)
        return text
