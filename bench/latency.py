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

from bench.common import CACHE, SHARED_VIDEOS, Report, arguments, interleaved_medians, verdict
from pipeline.manifests import LOOKUPS_AT_ONCE, read_manifest

DELAYS_MS = (20, 50)
#: part 2: copies of each real clip, and the store's delay
COPIES, QUICK_COPIES = 12, 1
RUN_DELAY_MS = 40
#: benchmark 2 on an H200 after the first batch (docs/benchmarks.md, "GPU")
GPU_VIDEOS_PER_S = 118
VIDEOS = 400
QUICK_VIDEOS = 20


class _SlowServer(ThreadingHTTPServer):
    request_queue_size = 256  # every lookup's connection is accepted at once, none dropped and resent
    daemon_threads = True


@contextlib.contextmanager
def slow_store(folder: Path, delay_s: float) -> Iterator[str]:
    """An HTTP server over `folder` on loopback answering each request after `delay_s`; its URL."""
    class Handler(SimpleHTTPRequestHandler):
        def send_head(self):
            time.sleep(delay_s)
            return super().send_head()

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


def download_rows(copies: int, repeats: int, executor: str = "local") -> list[list[object]]:
    """Seconds of `vidlens run` from local files, and from the store without and with downloads
    ahead; with Ray, one instance for every run, warmed by one run first."""
    from pipeline.job import run_job
    from schemas.config import RunConfig
    from workers.tiny_models import build_tiny_clip

    clips = sorted(p for p in SHARED_VIDEOS.iterdir() if p.suffix in (".mp4", ".avi"))
    model = CACHE / "tiny-clip"
    if not (model / "config.json").exists():
        build_tiny_clip(model)
    with tempfile.TemporaryDirectory(prefix="vidlens-bench-downloads-") as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for copy in range(copies):
            for clip in clips:
                (folder / f"{copy:03d}_{clip.name}").write_bytes(clip.read_bytes())
        names = sorted(p.name for p in folder.iterdir())

        def run(source: str, ahead: int | None) -> None:
            config = RunConfig.from_dict({
                "stages": ["embed"], "models": {"embed": str(model), "device": "cpu"},
                "output": {"thumbnails": False}, "resources": {"executor": executor, "download_ahead": ahead}})
            out = Path(tmp) / "out"
            summary = run_job(source, str(out), config, progress=False)
            assert summary.counts["videos_ok"] == len(names), summary.render()
            shutil.rmtree(out)

        with slow_store(folder, RUN_DELAY_MS / 1000) as url:
            manifest = Path(tmp) / "batch.csv"
            manifest.write_text("uri\n" + "".join(f"{url}/{name}\n" for name in names))
            variants = {"local": lambda: run(str(folder), None),
                        "store, each worker its own": lambda: run(str(manifest), 0),
                        "store, ahead": lambda: run(str(manifest), None)}
            if executor == "ray":
                from pipeline.ray_executor import ensure_ray

                ensure_ray(None)
                run(str(folder), None)  # Ray's workers started and their imports done
            medians = interleaved_medians(variants, repeats)
    return [[name, len(names), round(seconds, 2), f"{medians['local'] / seconds:.2f}x"]
            for name, seconds in medians.items()]


def main(argv: list[str] | None = None) -> int:
    """Run the parts (the third with --ray), print their tables and append them to docs/benchmarks.md."""
    parser = arguments(__doc__, "a few videos, one round: a plumbing check", repeats=3)
    parser.add_argument("--ray", action="store_true", help="part 3: part 2 again with the Ray executor")
    args = parser.parse_args(argv)
    videos, repeats = (QUICK_VIDEOS, 1) if args.quick else (VIDEOS, args.repeats)
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
                    "or each its own with download_ahead 0.",
        )
    report.publish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
