"""Benchmark 4: memory and overheads as the number of videos grows.

    python -m bench.memory            # 100 and 1,000 short clips, Ray executor, tiny models
    python -m bench.memory --quick    # 4 and 12 clips, local executor: a plumbing check
    python -m bench.memory --executor local --sizes 1000,10000 --rerun
                                      # also a second run over each unchanged output (nightly)
    python -m bench.memory --ledger 20000,200000   # the driver's ledger, synthetic outputs
    python -m bench.memory --videos-per-task 8     # several short clips per Ray decode task

Tiny random models keep the model time near zero, so what is measured is the pipeline's
own cost: scheduling, moving tasks between stages, writing. Peak memory is sampled every
0.1 s from /proc: the driver (this process) and the worker processes (Ray's, or the local
executor's pool and decode children): the largest single one (resident), and all of them
together, as resident memory summed and as proportional set size (PSS: each shared page
divided among the processes that map it, so torch's libraries loaded in every worker count
once). On Ray, the instance's own processes (raylet, GCS server, log monitor) are summed
apart, by PSS; its agents that title themselves `ray::` (DashboardAgent, RuntimeEnvAgent)
count with the workers. The driver and its workers are also summed by PSS: a forked worker's
pages shared with the driver become the worker's alone as the driver writes to its copies, so
the workers' PSS can grow while no process allocates more; the sum with the driver is the
memory the run holds. A pipeline that streams must keep them flat from 100 to 1,000 videos. On Ray it
starts an instance of its own for each size, and refuses to run where a Ray cluster is already
running on the machine (its workers would not be counted).
"""

from __future__ import annotations

import os
import sys
import shutil
import tempfile
import time
from pathlib import Path

from bench.clips import clip_folder
from bench.common import CACHE, BackgroundSampler, Report, arguments, verdict
from bench.runs import timed_run
from schemas.config import RunConfig

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


class PeakMemory(BackgroundSampler):
    """Samples the memory of this process and of its worker processes in a thread."""

    def __init__(self, interval_s: float = 0.1, ray_only: bool = True):
        super().__init__(interval_s)
        self.ray_only = ray_only
        self.driver = self.worker_max = self.workers_total = self.workers_pss = self.worker_count = 0
        #: Ray's own processes (raylet, GCS server, log monitor), summed by PSS at their peak
        self.servers_pss = 0
        #: this process and its workers summed by PSS at their peak: the memory the run holds. A
        #: page a forked worker shares with this process counts half to each; once this process
        #: writes to it, the copy is this process's and the page the worker's alone: the workers'
        #: PSS grows as the driver works, though no process allocates more
        self.everything_pss = 0
        #: CPU seconds this sampler's own thread used: the driver's figure leaves them out (reading
        #: /proc for every worker ten times a second cost more than the run's own driver work)
        self.own_cpu_s = 0.0
        #: (PSS, process) of every worker process at the moment their PSS summed to its peak
        self.at_pss_peak: list[tuple[int, str]] = []
        #: CPU seconds each worker process had used when last seen (a process that ends between
        #: two samples loses at most the last interval's)
        self.worker_cpu: dict[int, float] = {}

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.driver = max(self.driver, _rss(me))
            workers, servers = _workers(self.ray_only)
            resident = [_rss(pid) for pid in workers]
            if resident:
                self.worker_max = max(self.worker_max, max(resident))
                self.workers_total = max(self.workers_total, sum(resident))
                processes = {pid: (_pss(pid), name, parent) for pid, (name, parent) in workers.items()}
                pss = sum(size for size, _, _ in processes.values())
                if pss > self.workers_pss:
                    self.workers_pss = pss
                    self.at_pss_peak = _composition(processes)
                driver_pss = _pss(me)
                # a worker that ended while the processes were read left its pages counted twice
                # (its own before, the driver's after): such a sample is not the run's memory
                if all(Path(f"/proc/{pid}").exists() for pid in processes):
                    self.everything_pss = max(self.everything_pss, pss + driver_pss)
                self.worker_count = max(self.worker_count, len(resident))
                for pid in workers:
                    self.worker_cpu[pid] = max(self.worker_cpu.get(pid, 0.0), _cpu_s(pid))
            if servers:
                self.servers_pss = max(self.servers_pss, sum(_pss(pid) for pid in servers))
            self.own_cpu_s = time.thread_time()
            self._stop.wait(self.interval_s)


def _driver_cpu_s() -> float:
    """CPU seconds this process (the driver: listing, scheduling, collecting, writing) has used."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss(pid: int) -> int:
    """Resident bytes of a process (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def _pss(pid: int) -> int:
    """Proportional set size of a process in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _composition(processes: dict[int, tuple[int, str, int]]) -> list[tuple[int, str]]:
    """(PSS, name) of these processes, largest first; a process forked by another of them (a
    decode child) is named as a child: the two share their pages, and PSS splits them."""
    return sorted(((size, name + (" (child)" if parent in processes else ""))
                   for size, name, parent in processes.values()), reverse=True)


def _workers(ray_only: bool) -> tuple[dict[int, tuple[str, int]], list[int]]:
    """This run's worker processes, all descended from this process, each with its command's
    first word (where Ray's workers put their title, less "ray::") and its parent: with
    `ray_only`, Ray's workers ("ray::..." command lines), else every descendant (the local
    executor's pool and their decode children). Also, with `ray_only`, the other descendants:
    the Ray instance's own processes (raylet, GCS server, log monitor), counted apart; its
    agents title themselves "ray::" and count with the workers.

    Other Ray instances on a shared machine are left out: only descendants are counted.
    """
    parents, names, others = {}, {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            command = (entry / "cmdline").read_bytes()
            if not ray_only or command.startswith(b"ray::"):
                names[int(entry.name)] = command.split(b"\0")[0].decode(errors="replace").removeprefix("ray::")
            elif not _starting_worker(command):
                others.add(int(entry.name))
        except (OSError, ValueError):
            continue
    me = os.getpid()
    return ({pid: (name or "(exiting)", parents[pid]) for pid, name in names.items()
             if _descends_from(pid, me, parents)},
            sorted(pid for pid in others if _descends_from(pid, me, parents)))


def _starting_worker(command: bytes) -> bool:
    """Whether a command line is a Ray worker's before it names itself (`python setup_worker.py
    ... default_worker.py --options`): the script is one of its words. Not the raylet's, whose
    `--python_worker_command=...` option names that script inside a longer word."""
    return any(word.rsplit(b"/", 1)[-1] == b"default_worker.py" for word in command.split(b"\0"))


def _descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    seen = 0
    while pid in parents and seen < 64:
        pid, seen = parents[pid], seen + 1
        if pid == ancestor:
            return True
    return False


def measure(count: int, executor: str, embed: str, recycle: int | None = None,
            rerun: bool = False, videos_per_task: int | None = None) -> dict[str, float]:
    """Run the pipeline on `count` short clips and return its peaks and timings; with `rerun`,
    also those of a second run over the same, unchanged output (`rerun_output`)."""
    source = clip_folder("memory", count, (1, 1), 96, 64, distinct=10)
    settings = {
        "stages": ["embed", "objects", "scenes"],
        "models": {"embed": embed, "device": "cpu"},
        "sampling": {"num_frames": 4},
        "resources": {"executor": executor,
                      **({} if recycle is None else {"max_videos_per_worker": recycle}),
                      **({} if videos_per_task is None else {"per_stage": {
                          stage: {"videos_per_batch": videos_per_task} for stage in ("decode", "sample")}})},
    }
    folder = Path(tempfile.mkdtemp(prefix="vidlens-memory-"))
    try:
        cpu_before = _driver_cpu_s()
        with PeakMemory(ray_only=executor == "ray") as peak:
            run = timed_run(source, RunConfig.from_dict(settings), out=folder)
        driver_cpu_s = _driver_cpu_s() - cpu_before - peak.own_cpu_s
        ray = sys.modules.get("ray")  # imported by a run on the Ray executor only
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # the next size starts from fresh workers
        return {"videos": run.videos, "wall_s": run.wall_s, "first_s": run.first_result_s, "driver_cpu_s": driver_cpu_s,
                "workers_cpu_s": sum(peak.worker_cpu.values()), "worker_processes": len(peak.worker_cpu),
                "driver": peak.driver, "worker_max": peak.worker_max, "workers_total": peak.workers_total,
                "workers_pss": peak.workers_pss, "worker_count": peak.worker_count, "at_pss_peak": peak.at_pss_peak,
                "servers_pss": peak.servers_pss, "everything_pss": peak.everything_pss,
                "status": run.status, **(rerun_output(source, folder / "out", settings) if rerun else {})}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: defines `peak()` in a script run by `in_fresh_process`: that process's own peak resident
#: memory (getrusage's ru_maxrss would include its parent's size at the fork)
_PEAK = """
import json, sys, time
def peak():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
"""

#: a second run over an output with nothing new.
_RERUN = """
from pipeline.job import run_job
from schemas.config import RunConfig
source, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
summary = run_job(source, out, RunConfig.from_dict(settings), progress=False)
print(json.dumps({"rerun_s": time.perf_counter() - start, "rerun_processed": summary.counts["videos_total"],
                  "rerun_driver": peak()}))
"""


def in_fresh_process(script: str, *args: str) -> dict[str, float]:
    """Run `script` (after `_PEAK`) in a new Python process from the repository root; the JSON it prints last."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK + script, *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rerun_output(source: Path, out: Path, settings: dict) -> dict[str, float]:
    """Run again over `out` with nothing new (the nightly case): the driver's peak and the wall time."""
    import json

    return in_fresh_process(_RERUN, str(source), str(out), json.dumps(settings))


#: loads an output's ledger and writes its snapshot in a fresh process: the driver's peaks.
_LEDGER = """
from pipeline.store import Store
import pyarrow.parquet, fsspec  # imported before the baseline
base = peak()
store = Store(sys.argv[1])
ledger = store.ledger_entries()
loaded = peak()
store.write_snapshot()
print(json.dumps({"entries": len(ledger), "base": base, "loaded": loaded, "written": peak()}))
"""


def synthetic_output(out: Path, entries: int, per_batch: int = 10_000) -> None:
    """An output whose ledger holds `entries` videos (no tables), published in batches, with a snapshot."""
    from pipeline.store import Store

    store, run_id = Store(str(out)), "20261130T000000000000Z-bench0"
    units = ("core", "labels", "matches", "captions", "texts")
    for batch, first in enumerate(range(0, entries, per_batch)):
        ledger = [{"uri": f"s3://bucket/videos/{i // 1000:05d}/{i:09d}.mp4", "video_id": f"{i:016x}",
                   "size_bytes": 1000 * i, "mtime_ns": 10**9 * i, "etag": f"{i:032x}", "status": "ok",
                   "last_run_id": run_id, **{f"{u}_fingerprint": f"{u}-0123456789abcdef" for u in units},
                   **{f"{u}_run_id": run_id for u in units}} for i in range(first, min(entries, first + per_batch))]
        store.publish({"kind": "batch", "run_id": run_id, "batch": batch, "run_date": "2026-11-30",
                       "files": [], "ledger": ledger}, f"{run_id}-{batch:05d}.json")
    store.write_snapshot()


def measure_ledger(entries: int) -> dict[str, float]:
    """The driver's peak after loading a synthetic ledger of `entries` videos, and after writing its snapshot."""
    folder = Path(tempfile.mkdtemp(prefix="vidlens-ledger-"))
    try:
        synthetic_output(folder / "out", entries)
        return in_fresh_process(_LEDGER, str(folder / "out"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ledger_report(sizes: list[int], report: Report) -> None:
    """Benchmark 4's ledger part: driver memory against the number of videos in the output."""
    mib = 2**20
    results = [measure_ledger(size) for size in sizes]
    report.add_table(["videos in the ledger", "process before MiB", "ledger loaded MiB", "snapshot written MiB"],
                     [[r["entries"], r["base"] / mib, r["loaded"] / mib, r["written"] / mib] for r in results],
                     caption="The driver's ledger: a synthetic output (ledger entries only), loaded by "
                             "`Store.ledger_entries` and its snapshot written, in a fresh process (peak resident "
                             "memory, VmHWM).")
    small, large = results[0], results[-1]
    span = max(1, large["entries"] - small["entries"])
    report.add_table(["target", "measured", "verdict"], [
        [f"driver memory per video in the output, {label}", f"{(large[key] - small[key]) / span / 1024:.2f} KB", ""]
        for key, label in (("loaded", "ledger loaded"), ("written", "snapshot written (peak)"))])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its table and append it to docs/benchmarks.md."""
    parser = arguments(__doc__, "4 and 12 clips, local executor")
    parser.add_argument("--sizes", default=None, help="comma-separated clip counts (default 100,1000)")
    parser.add_argument("--executor", default=None, choices=("ray", "local"), help="default: ray (quick: local)")
    parser.add_argument("--max-videos-per-worker", type=int, default=None, metavar="N",
                        help="recycle Ray's decode workers after N videos (0: never; default: the config's)")
    parser.add_argument("--videos-per-task", type=int, default=None, metavar="N",
                        help="videos per Ray decode and sample task (resources.per_stage; default: the plan's, "
                             "4 without shot detection)")
    parser.add_argument("--rerun", action="store_true",
                        help="also run again over each size's unchanged output (nothing new), in a fresh process")
    parser.add_argument("--ledger", default=None, metavar="SIZES",
                        help="instead: the driver's memory for ledgers of these sizes (comma-separated, "
                             "e.g. 20000,200000), from synthetic outputs")
    parser.add_argument("--no-warmup", action="store_true",
                        help="leave out the throwaway run of 4 clips that takes this process's one-off costs "
                             "(imports, first builds) before the measured sizes")
    args = parser.parse_args(argv)
    if args.ledger:
        report = Report("Benchmark 4: the ledger's memory on the driver", args.quick, args.doc)
        ledger_report([int(size) for size in args.ledger.split(",")], report)
        report.publish()
        return 0
    from workers.tiny_models import build_tiny_clip

    sizes = [int(s) for s in (args.sizes or ("4,12" if args.quick else "100,1000")).split(",")]
    executor = args.executor or ("local" if args.quick else "ray")
    if executor == "ray" and not _starts_own_ray():
        print("bench.memory: a Ray cluster is running on this machine (ray start) or RAY_ADDRESS names "
              "one: the runs would join it, and its workers, not this process's descendants, would not be "
              "counted. Stop it (ray stop; unset RAY_ADDRESS), or use --executor local.", file=sys.stderr)
        return 2
    embed = str(build_tiny_clip(CACHE / "models" / "tiny-clip"))
    report = Report("Benchmark 4: memory and overheads", args.quick, args.doc)
    if not args.no_warmup:
        # the driver's first run imports Ray Data and the models' libraries and builds what it
        # keeps: charged to the first size, they made the driver's CPU per extra video read low
        measure(4, executor, embed, args.max_videos_per_worker, False, args.videos_per_task)
    results = [measure(count, executor, embed, args.max_videos_per_worker, args.rerun, args.videos_per_task)
               for count in sizes]
    mib = 2**20
    rows = [[r["videos"], r["status"], r["wall_s"], r["first_s"], 1000 * r["wall_s"] / r["videos"],
             r["driver"] / mib, r["worker_max"] / mib if r["worker_max"] else "-",
             r["workers_total"] / mib if r["workers_total"] else "-",
             r["workers_pss"] / mib if r["workers_pss"] else "-",
             r["everything_pss"] / mib if r["everything_pss"] else "-", r["worker_count"] or "-",
             r["servers_pss"] / mib if r["servers_pss"] else "-"] for r in results]
    report.add_table(
        ["videos", "status", "wall s", "first result s", "ms per video", "driver peak MiB",
         "largest worker peak MiB", "all workers peak MiB (resident, summed)", "all workers peak MiB (PSS)",
         "driver and workers peak MiB (PSS)", "most workers at once",
         "Ray's own processes peak MiB (PSS: raylet, GCS, helpers)"], rows,
        caption=f"1-s clips at 96x64, tiny random CLIP, stages embed, objects, scenes, 4 frames a video, "
                f"{executor} executor, default resources"
                + ("" if args.max_videos_per_worker is None
                   else f" but resources.max_videos_per_worker {args.max_videos_per_worker}")
                + ("" if args.videos_per_task is None
                   else f", {args.videos_per_task} videos per decode and sample task")
                + ("; each size in a fresh Ray instance" if executor == "ray"
                   else "; each size with a fresh pool of decode workers")
                + ("." if args.no_warmup else ", after a throwaway run of 4 clips (this process's one-off costs)."),
    )
    small, large = results[0], results[-1]
    marginal_ms = 1000 * (large["wall_s"] - small["wall_s"]) / max(1, large["videos"] - small["videos"])
    targets = [
        [f"driver peak at {large['videos']} within 10% of {small['videos']}",
         f"{large['driver'] / small['driver']:.2f}x", verdict(large["driver"] <= 1.1 * small["driver"])],
    ]
    if small["worker_max"]:
        targets.append([f"largest worker's peak at {large['videos']} within 10% of {small['videos']}",
                        f"{large['worker_max'] / small['worker_max']:.2f}x",
                        verdict(large["worker_max"] <= 1.1 * small["worker_max"])])
    if small["workers_total"]:
        targets.append([f"all workers' peak (resident, summed) at {large['videos']} within 10% of {small['videos']}",
                        f"{large['workers_total'] / small['workers_total']:.2f}x",
                        verdict(large["workers_total"] <= 1.1 * small["workers_total"])])
    if small["workers_pss"]:
        targets.append([f"all workers' peak (PSS) at {large['videos']} within 10% of {small['videos']}",
                        f"{large['workers_pss'] / small['workers_pss']:.2f}x",
                        verdict(large["workers_pss"] <= 1.1 * small["workers_pss"])])
    if small["everything_pss"]:
        targets.append([f"the driver and its workers together (PSS) at {large['videos']} within 10% of "
                        f"{small['videos']}", f"{large['everything_pss'] / small['everything_pss']:.2f}x",
                        verdict(large["everything_pss"] <= 1.1 * small["everything_pss"])])
    if small["servers_pss"]:
        targets.append([f"Ray's own processes' peak (PSS) at {large['videos']} within 10% of {small['videos']}",
                        f"{large['servers_pss'] / small['servers_pss']:.2f}x",
                        verdict(large["servers_pss"] <= 1.1 * small["servers_pss"])])
    targets.append(["per-video overhead (scheduling, moving, writing): marginal wall time per extra video",
                    f"{marginal_ms:.0f} ms", ""])
    driver_ms = 1000 * (large["driver_cpu_s"] - small["driver_cpu_s"]) / max(1, large["videos"] - small["videos"])
    targets.append(["the driver's CPU per extra video (listing, scheduling, collecting, writing; not this sampler's)",
                    f"{driver_ms:.1f} ms", ""])
    workers_ms = 1000 * (large["workers_cpu_s"] - small["workers_cpu_s"]) / max(1, large["videos"] - small["videos"])
    targets.append([f"the workers' CPU per extra video (all worker processes: {small['worker_processes']} "
                    f"and {large['worker_processes']} in the two runs)", f"{workers_ms:.0f} ms", ""])
    report.add_table(["target", "measured", "verdict"], targets)
    report.add_table(
        ["videos", "worker processes at the PSS peak (MiB, largest first)"],
        [[r["videos"], ", ".join(f"{name} {size / mib:.0f}" for size, name in r["at_pss_peak"]) or "-"]
         for r in results],
        caption="What the workers' summed PSS was made of at its peak: a decode child shares its pages with "
                "the worker that forked it, so which workers and children are alive at that instant moves the sum.")
    if args.rerun:
        report.add_table(
            ["videos in the output", "videos processed again", "wall s", "driver peak MiB"],
            [[r["videos"], r["rerun_processed"], r["rerun_s"], r["rerun_driver"] / mib] for r in results],
            caption="The nightly case: `vidlens run` again over each output with nothing new or changed, in a "
                    "fresh process (its peak resident memory, imports included).")
        growth = (large["rerun_driver"] - small["rerun_driver"]) / max(1, large["videos"] - small["videos"])
        report.add_table(["target", "measured", "verdict"],
                         [["re-run's driver peak: growth per video in the output", f"{growth / 1024:.2f} KB", ""]])
    report.publish()
    return 0


def _starts_own_ray() -> bool:
    """Whether a run here starts a Ray instance of its own (whose processes descend from this
    one, so they can be counted) rather than joining a running cluster."""
    from pipeline.ray_cluster import _starts_local_instance

    return _starts_local_instance(None)


if __name__ == "__main__":
    raise SystemExit(main())
