"""A bucket's latency: a manifest's lookups and the videos' downloads, with and without overlap.

Part 1. A manifest without `size` and `etag` columns costs one lookup (a HEAD request) per
video, so that a video's id still changes when it does. Made one at a time, a store's latency
caps the whole job at the listing's rate. The manifest lists N URLs of the store, read with
`pipeline.manifests.read_manifest` as `vidlens run` reads it, one lookup at a time and
`LOOKUPS_AT_ONCE` at a time, interleaved.

Part 2. The local executor's workers each download a bucket's video before decoding it, so a
core waits out the store's latency and the transfer; `resources.download_ahead` has the
driver download the next videos while the workers decode. `vidlens run` (local executor,
CLIP, 8 frames a video) on copies of the real clips of ../shared/videos: from local files
(the floor), and from the store with `download_ahead` 0 and by default, interleaved.
Part 3 (`--ray`): the same with the Ray executor, whose decode tasks of several videos
download the next of them while they decode one (`download_ahead` 0: each its own).
Part 4 (`--ray`): videos over 8 MiB, each a Ray task of its own, so that no task downloads one
ahead: the same clips, each padded with an MP4 `free` box to 11 MB (its download that of an
11 MB video, its decoding the clip's), from the store answering after 40 ms at 100 MB/s a
connection (a cloud store's rate for one stream). From a bucket the plan runs two decode tasks
a CPU share, one decoding while the other downloads (`pipeline.plan.TASKS_A_SHARE_FROM_A_BUCKET`):
against one a share (`resources.per_stage`), from the store and from local files. Then the
same with copies of a generated 30 s 720p H.264 clip (15.6 MB), whose decoding costs what a
real video of its size does.
Part 5 (`--ray`, or `--shots` alone): Ray with shot detection, so that each video is decoded
in a task and sampled in another after the shot detector, from local files and from the store,
with the bytes the store sent: each task downloaded the video before 2026-12-05, twice its
bytes; now the sample task reads the copy its decode task left on the node.

The store is an HTTP file server on loopback that answers each request after a set delay
(20-50 ms is a cloud store's first-byte latency from the same region).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.clips import clip
from bench.common import CACHE, SHARED_VIDEOS, Report, arguments, interleaved_medians, verdict
from pipeline.manifests import LOOKUPS_AT_ONCE, read_manifest
from schemas.config import RunConfig

DELAYS_MS = (20, 50)
#: part 2: copies of each real clip, and the store's delay
COPIES, QUICK_COPIES = 12, 1
RUN_DELAY_MS = 40
#: part 4: copies of each real MP4 clip, the bytes each is padded to, and the store's rate a connection
LARGE_COPIES, QUICK_LARGE_COPIES = 24, 1
LARGE_BYTES = 11 * 10**6
#: part 5: copies of each real MP4 clip (shot detection reads every frame: minutes a run on 2 cores)
SHOTS_COPIES, QUICK_SHOTS_COPIES = 4, 1
#: part 4 again: the seconds of the generated 720p clip (15.6 MB at 30 s)
REAL_SECONDS, QUICK_REAL_SECONDS = 30, 12
RATE_BYTES_S = 100e6
#: benchmark 2 on an H200 after the first batch (docs/benchmarks.md, "GPU")
GPU_VIDEOS_PER_S = 118
VIDEOS = 400
QUICK_VIDEOS = 20


class _SlowServer(ThreadingHTTPServer):
    request_queue_size = 256  # every lookup's connection is accepted at once, none dropped and resent
    daemon_threads = True


@contextlib.contextmanager
def slow_store(folder: Path, delay_s: float, rate: float | None = None,
               sent: list[int] | None = None) -> Iterator[str]:
    """An HTTP server over `folder` on loopback answering each request after `delay_s`, and
    sending each response at `rate` bytes a second at most; its URL. `sent`: a list whose one
    item counts the bytes of the files it sent."""
    class Handler(SimpleHTTPRequestHandler):
        def send_head(self):
            time.sleep(delay_s)
            return super().send_head()

        def copyfile(self, source, outputfile) -> None:
            while chunk := source.read(2**20):
                start = time.perf_counter()
                outputfile.write(chunk)
                if sent is not None:
                    sent[0] += len(chunk)
                if rate is not None:
                    time.sleep(max(0.0, len(chunk) / rate - (time.perf_counter() - start)))

        def log_message(self, *args: object) -> None:
            pass

    server = _SlowServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def listing_rows(videos: int, delays_ms: tuple[int, ...], repeats: int) -> list[list[object]]:
    """Per delay: videos/s listed one lookup at a time and `LOOKUPS_AT_ONCE` at a time, and the ratio."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="vidlens-bench-listing-") as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for index in range(videos):
            (folder / f"clip{index:05d}.mp4").write_bytes(b"\0" * (1000 + index))
        for delay_ms in delays_ms:
            with slow_store(folder, delay_ms / 1000) as url:
                manifest = Path(tmp) / "batch.csv"
                manifest.write_text("uri\n" + "".join(f"{url}/clip{i:05d}.mp4\n" for i in range(videos)))

                def listing(lookups: int) -> None:
                    refs = list(read_manifest(str(manifest), lookups=lookups))
                    assert len(refs) == videos and not any(ref.absent for ref in refs)

                medians = interleaved_medians({"one": lambda: listing(1),
                                               "at once": lambda: listing(LOOKUPS_AT_ONCE)}, repeats)
            one, at_once = videos / medians["one"], videos / medians["at once"]
            rows.append([f"{delay_ms} ms", videos, round(one, 1), round(at_once, 1), f"{at_once / one:.1f}x"])
    return rows


def _tiny_clip() -> Path:
    from workers.tiny_models import build_tiny_clip

    model = CACHE / "tiny-clip"
    if not (model / "config.json").exists():
        build_tiny_clip(model)
    return model


def _config(executor: str, ahead: int | None = None, per_stage: dict | None = None, shots: bool = False) -> RunConfig:
    return RunConfig.from_dict({
        "stages": ["shots", "embed"] if shots else ["embed"], "models": {"embed": str(_tiny_clip()), "device": "cpu"},
        "output": {"thumbnails": False},
        "resources": {"executor": executor, "download_ahead": ahead, "per_stage": per_stage or {}}})


def _task_shares(remote: bool) -> dict:
    """`resources.per_stage` setting the decode and sample tasks' CPUs the plan gives them on Ray
    (this process's instance) for local files or, with `remote`, for a bucket's videos."""
    from pipeline.plan import build_plan

    return {s.name: {"num_cpus": s.num_cpus} for s in build_plan(_config("ray"), remote=remote) if s.kind == "task"}


def _runs(clips: dict[str, Path], executor: str, variants: dict, repeats: int,
          rate: float | None = None, size: int | None = None, shots: bool = False,
          served: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds of `vidlens run` for each of `variants` (name: (source, download_ahead,
    per_stage), the source "local" or "store"), interleaved, on copies of `clips` (file name:
    real clip; each `padded` to `size` bytes if given) in a folder and behind the store; with
    Ray, one instance for every run, warmed by one run first. `shots`: with shot detection.
    `served`: filled with the bytes the store sent in each variant's last run, over the bytes
    of the videos."""
    from pipeline.job import run_job

    with tempfile.TemporaryDirectory(prefix="vidlens-bench-downloads-") as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for name, original in clips.items():
            (folder / name).write_bytes(padded(original.read_bytes(), size) if size else original.read_bytes())

        sent = [0]
        videos_bytes = sum(p.stat().st_size for p in folder.iterdir())

        def run(name: str, source: str, ahead: int | None, per_stage: dict | None) -> None:
            out = Path(tmp) / "out"
            sent[0] = 0
            summary = run_job(source, str(out), _config(executor, ahead, per_stage, shots), progress=False)
            assert summary.counts["videos_ok"] == len(clips), summary.render()
            shutil.rmtree(out)
            if served is not None:
                served[name] = sent[0] / videos_bytes

        with slow_store(folder, RUN_DELAY_MS / 1000, rate, sent) as url:
            manifest = Path(tmp) / "batch.csv"
            manifest.write_text("uri\n" + "".join(f"{url}/{name}\n" for name in sorted(clips)))
            sources = {"local": str(folder), "store": str(manifest)}
            if executor == "ray":
                run("warm-up", str(folder), None, None)  # Ray's workers started and their imports done
            return interleaved_medians({name: functools.partial(run, name, sources[source], ahead, per_stage)
                                        for name, (source, ahead, per_stage) in variants.items()}, repeats)


def _copies(copies: int, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """The real clips with one of `suffixes`, `copies` times each, by the copies' names."""
    clips = sorted(p for p in SHARED_VIDEOS.iterdir() if p.suffix in suffixes)
    return {f"{copy:03d}_{clip.name}": clip for copy in range(copies) for clip in clips}


def _rows(medians: dict[str, float], videos: int, *extra: object) -> list[list[object]]:
    """A table row for each variant: its name, `extra`, the videos, its seconds, and its speed
    against the first variant's (the baseline)."""
    base = next(iter(medians.values()))
    return [[name, *extra, videos, round(seconds, 2), f"{base / seconds:.2f}x"] for name, seconds in medians.items()]


def download_rows(copies: int, repeats: int, executor: str = "local") -> list[list[object]]:
    """Seconds of `vidlens run` from local files, and from the store without and with downloads
    ahead; on Ray also with a decode task a CPU share (before 2026-12-04 21:33) and two (since)."""
    clips = _copies(copies, (".mp4", ".avi"))
    if executor == "ray":
        from pipeline.ray_cluster import ensure_ray

        ensure_ray(None)
        one = _task_shares(remote=False)
        variants = {"local": ("local", None, None),
                    "store, each task its own, a task a share": ("store", 0, one),
                    "store, ahead, a task a share": ("store", None, one),
                    "store, ahead, two tasks a share (the default)": ("store", None, None)}
    else:
        variants = {"local": ("local", None, None), "store, each worker its own": ("store", 0, None),
                    "store, ahead": ("store", None, None)}
    return _rows(_runs(clips, executor, variants, repeats), len(clips))


def padded(data: bytes, size: int) -> bytes:
    """An MP4 file's bytes followed by a `free` box (which every demuxer skips) to `size` bytes."""
    pad = max(0, size - len(data) - 8)
    return data + (pad + 8).to_bytes(4, "big") + b"free" + bytes(pad)


def large_video_rows(clips: dict[str, Path], repeats: int, size: int | None = None) -> list[list[object]]:
    """Seconds of `vidlens run` on Ray with videos over 8 MiB, each a task of its own (`clips`,
    each `padded` to `size` bytes if given): from local files and from the store, with the
    decode and sample tasks one and two a CPU share."""
    from pipeline.ray_cluster import ensure_ray

    ensure_ray(None)
    one, two = _task_shares(remote=False), _task_shares(remote=True)
    medians = _runs(clips, "ray", {"local files, a task a share": ("local", None, one),
                                   "local files, two a share": ("local", None, two),
                                   "store, a task a share": ("store", None, one),
                                   "store, two a share (the default)": ("store", None, None)},
                    repeats, RATE_BYTES_S, size)
    share = f"{one['decode']['num_cpus']:g} / {two['decode']['num_cpus']:g} CPU"
    return _rows(medians, len(clips), share)


def shots_rows(clips: dict[str, Path], repeats: int) -> list[list[object]]:
    """Seconds of `vidlens run` on Ray with shot detection, whose decode and sample tasks are
    tasks of their own, from local files and from the store, and the bytes the store sent over
    the videos' bytes: 1.0 where the sample task reads the copy its decode task left on the node
    (`workers.remote_copy.hand_on_download`), 2.0 where each task downloaded the video."""
    from pipeline.ray_cluster import ensure_ray

    ensure_ray(None)
    served: dict[str, float] = {}
    medians = _runs(clips, "ray", {"local files": ("local", None, None), "store": ("store", None, None)},
                    repeats, RATE_BYTES_S, shots=True, served=served)
    return [[*row, f"{served.get(row[0], 0.0):.2f}"] for row in _rows(medians, len(clips))]


def _add_shots_table(report: Report, quick: bool, repeats: int) -> None:
    """Part 5's table (`--ray`, or alone with `--shots`)."""
    copies = QUICK_SHOTS_COPIES if quick else SHOTS_COPIES
    report.add_table(
        ["source", "videos", "seconds", "local files / this", "bytes sent / the videos' bytes"],
        shots_rows(_copies(copies, (".mp4",)), repeats),
        caption=f"Part 5: Ray with shot detection (TransNetV2 reads every frame at 48x27), so that each video "
                f"is decoded in a task and sampled in another after the shot detector; the real MP4 clips, "
                f"{copies} copies, from local files and from the store answering after {RUN_DELAY_MS} ms at "
                f"{RATE_BYTES_S / 1e6:.0f} MB/s a connection; medians of {repeats} interleaved rounds. The "
                f"store's bytes are counted over each variant's last run.",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the parts (the third to fifth with --ray; the fifth alone with --shots), print their tables and
    append them to docs/benchmarks.md."""
    parser = arguments(__doc__, "a few videos, one round: a plumbing check", repeats=3)
    parser.add_argument("--ray", action="store_true", help="parts 3 to 5: part 2 again with the Ray executor, "
                                                           "videos over 8 MiB on Ray, and Ray with shots")
    parser.add_argument("--shots", action="store_true", help="part 5 alone: Ray with shot detection")
    args = parser.parse_args(argv)
    videos, repeats = (QUICK_VIDEOS, 1) if args.quick else (VIDEOS, args.repeats)
    if args.shots:
        report = Report("A bucket's latency: a Ray run with shot detection", args.quick, args.doc)
        _add_shots_table(report, args.quick, repeats)
        report.publish()
        return 0
    copies = QUICK_COPIES if args.quick else COPIES
    report = Report("A bucket's latency: a manifest's lookups and the videos' downloads", args.quick, args.doc)
    rows = listing_rows(videos, DELAYS_MS, repeats)
    report.add_table(
        ["latency a request", "videos", "videos/s, one lookup at a time", f"videos/s, {LOOKUPS_AT_ONCE} at once",
         "at once / one"],
        rows,
        caption=f"Part 1: an HTTP file server on loopback answering each request after the latency; the manifest "
                f"lists {videos} of its URLs without size or etag; medians of {repeats} interleaved rounds.",
    )
    slowest = min(row[3] for row in rows)
    report.add_table(
        ["target", "measured", "verdict"],
        [[f"the listing outpaces the fastest run recorded here ({GPU_VIDEOS_PER_S} videos/s: CLIP ViT-B/32 "
          f"on an H200) at every latency, so that it is not what limits a job", f"{slowest:.0f} videos/s",
          verdict(slowest >= GPU_VIDEOS_PER_S)]],
    )
    report.add_table(
        ["source", "videos", "seconds", "local / this"],
        download_rows(copies, repeats),
        caption=f"Part 2: `vidlens run` (local executor, one decoding worker a core, a tiny CLIP so that "
                f"decoding bounds the run, 8 frames a video) on copies of the real clips, from local files "
                f"and from the store answering after {RUN_DELAY_MS} ms; medians of {repeats} interleaved rounds.",
    )
    if args.ray:
        report.add_table(
            ["source", "videos", "seconds", "local / this"],
            download_rows(copies, repeats, "ray"),
            caption="Part 3: as part 2 with the Ray executor (one local instance for every run, warmed by "
                    "a run first): its decode tasks of 4 videos each download the next while they decode one, "
                    "or each its own with download_ahead 0; from a bucket the plan gives two decode tasks each "
                    "CPU share, or one as for local files (resources.per_stage).",
        )
        large = QUICK_LARGE_COPIES if args.quick else LARGE_COPIES
        headers = ["source, decode and sample tasks", "share: one / two", "videos", "seconds", "local files, one / this"]
        store = f"the store answering after {RUN_DELAY_MS} ms at {RATE_BYTES_S / 1e6:.0f} MB/s a connection"
        real = _copies(large, (".mp4",))
        report.add_table(
            headers, large_video_rows(real, repeats, LARGE_BYTES),
            caption=f"Part 4: Ray, the real MP4 clips each padded to {LARGE_BYTES / 1e6:.0f} MB with a `free` box "
                    f"(each a task of its own), {large} copies, {store}; medians of {repeats} interleaved rounds.",
        )
        seconds = QUICK_REAL_SECONDS if args.quick else REAL_SECONDS
        generated = clip(seconds, 1280, 720, gop=50)
        count = len(real)
        report.add_table(
            headers, large_video_rows({f"{i:03d}_{generated.name}": generated for i in range(count)}, repeats),
            caption=f"Part 4 again with {count} copies of a generated {seconds:g} s 720p H.264 clip "
                    f"({generated.stat().st_size / 1e6:.1f} MB, a keyframe every 2 s), whose decoding costs what "
                    f"its size says; {store}; medians of {repeats} interleaved rounds.",
        )
        _add_shots_table(report, args.quick, repeats)
    report.publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
