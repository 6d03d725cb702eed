"""Buckets: a job from and to a real S3-compatible server, a GCS emulator and an Azure Blob emulator
(Azurite), paged listing, manifests, retries."""

import gc
import logging
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sources, views
from pipeline.job import dry_run, run_job
from pipeline.manifests import read_manifest
from pipeline.sources import SourceError, list_videos
from schemas.config import RunConfig, StorageConfig
from tests.azserver import ACCOUNT, ACCOUNT_KEY, az_server
from tests.gcsserver import gcs_server
from tests.s3server import free_port, s3_server
from workers.storage import EXPECT_CONTINUE_FROM, open_filesystem, storage_options
from workers.storage_retries import is_transient, with_retries

#: columns that differ between two runs of the same videos by design.
RUN_COLUMNS = {"run_id", "config_fingerprint", "processed_at", "occurred_at", "run_date", "mtime", "etag",
               "uri", "video_id"}
#: a key file gcsfs and google-auth take, offline: a user's credentials, as `gcloud auth application-default login` writes
USER_CREDENTIALS = '{"type": "authorized_user", "client_id": "id", "client_secret": "s3cret", "refresh_token": "r"}'


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


def _config(tiny_models, storage=None):
    return RunConfig.from_dict({
        "stages": ["embed", "objects", "scenes", "match"],
        "models": {"embed": tiny_models["embed"], "device": "cpu"},
        "match": {"queries": ["a red scene"]},
        "labels": {"objects": ["cat", "dog", "car"], "scenes": ["beach", "street"], "top_k": 2},
        "sampling": {"num_frames": 4},
        "output": {"thumbnails": False},
        "resources": {"executor": "local", "videos_per_batch": 2},
        "storage": storage or {},
    })


def _tables(read) -> dict[str, list[dict]]:
    """Every table's rows keyed by video file name, without run-specific columns, in a stable order."""
    videos = read("videos")
    names = {vid: Path(uri).name for vid, uri in zip(videos.video_id, videos.uri)}
    tables = {}
    for table in ("videos", "segments", "frames", "labels", "matches"):
        frame = read(table)
        frame.insert(0, "name", frame.video_id.map(names))
        frame = frame.drop(columns=[c for c in frame.columns if c in RUN_COLUMNS])
        rows = [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]
        tables[table] = sorted(rows, key=repr)
    return tables


def _plain(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def gcs():
    with gcs_server() as server:
        yield server


@pytest.fixture(scope="module")
def az():
    with az_server() as server:
        yield server


def _server(protocol, request):
    """The running server of a protocol's test store, and vidlens' `storage` settings that reach it."""
    server = request.getfixturevalue({"s3": "s3", "gs": "gcs", "az": "az"}[protocol])
    storage = ({"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret}
               if protocol == "s3" else server.storage)
    return server, storage


@pytest.fixture
def azure_env(monkeypatch):
    """No Azure account from the environment: only what a test gives."""
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
                 "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("protocol", ["s3", "gs", "az"])
def test_a_job_from_a_bucket_to_the_bucket_matches_the_local_run(protocol, request, tmp_path, synthetic_clips,
                                                                 tiny_models, caplog):
    from pipeline import results

    server, storage = _server(protocol, request)
    fs = server.filesystem()
    for clip in sorted(p for p in synthetic_clips.rglob("*") if p.is_file()):
        fs.put_file(str(clip), f"{server.bucket}/videos/{clip.relative_to(synthetic_clips).as_posix()}")
    fs.pipe(f"{server.bucket}/videos/notes.txt", b"not a video")
    source, out = f"{protocol}://{server.bucket}/videos", f"{protocol}://{server.bucket}/out"

    remote = run_job(source, out, _config(tiny_models, storage), progress=False)
    local_videos = tmp_path / "videos"
    shutil.copytree(synthetic_clips, local_videos)
    local = run_job(str(local_videos), str(tmp_path / "out"), _config(tiny_models), progress=False)

    assert remote.status == local.status == "succeeded", remote.render()
    fs.invalidate_cache()

    def read_remote(table):
        return pq.read_table(f"{server.bucket}/out/{table}", filesystem=fs).to_pandas()

    def read_local(table):
        return pd.read_parquet(tmp_path / "out" / table)

    remote_tables, local_tables = _tables(read_remote), _tables(read_local)
    assert [r["name"] for r in remote_tables["videos"]] == ["cuts.mp4", "order.mkv", "text.mp4"]
    assert read_remote("videos").uri.str.startswith(f"{source}/").all()
    if protocol == "az":  # the connection string carries the account key
        assert ACCOUNT_KEY not in read_remote("runs").config_json.iloc[0]
    for table in remote_tables:
        assert remote_tables[table] == local_tables[table], table
    # the outputs are queried where they are (and DuckDB's dropped files leave no gcsfs
    # prefetcher task pending: "ERROR asyncio: Task was destroyed but it is pending!"), and
    # tonight's run finds nothing new
    gc.collect()  # the runs' own garbage is not the queries'
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with results.open(out, storage_options(out, RunConfig.from_dict({"storage": storage}).storage)) as r:
            assert r.sql("SELECT count(*) FROM labels").fetchall() == [(len(local_tables["labels"]),)]
            assert len(r.search("a red scene")) == 3
            # each file's footer, read as its view is made, waits a round trip: a thread each
            assert int(r.sql("SELECT current_setting('threads')").fetchall()[0][0]) >= views.REMOTE_THREADS
        gc.collect()
    # (only that leak: collecting an s3fs client made on another event loop can log its own
    # "Task exception was never retrieved", depending on which test files ran before)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio" and "was destroyed" in r.getMessage()] == []
    again = run_job(source, out, _config(tiny_models, storage), progress=False)
    assert again.status == "succeeded" and again.counts["videos_total"] == 0, again.render()


@pytest.mark.parametrize("ahead, ahead_bytes", [(0, None), (1, None), (2, 1)])
def test_a_run_from_a_bucket_leaves_no_download_behind(ahead, ahead_bytes, s3, tmp_path, synthetic_clips,
                                                       tiny_models, monkeypatch):
    """The local executor's copies of a bucket's videos: downloaded by the workers (`ahead` 0;
    each pool worker kept its last one past its end, a video a worker left in the temp folder
    by every run), or ahead by the driver and kept across the shot detector for the sample
    stage (`DownloadAhead`), or past `download_ahead_bytes` by the workers again. None is
    left, and the results are whole."""
    import tempfile

    fs = s3.filesystem()
    for clip in ("cuts.mp4", "text.mp4"):
        fs.put_file(str(synthetic_clips / clip), f"{s3.bucket}/leftover-{ahead}/{clip}")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the forked workers' too
    config = RunConfig.from_dict({
        "stages": ["shots", "embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
        "sampling": {"num_frames": 2}, "output": {"thumbnails": False},
        "resources": {"executor": "local", "decode_concurrency": 2, "download_ahead": ahead,
                      "videos_per_batch": 1, **({"download_ahead_bytes": ahead_bytes} if ahead_bytes else {})},
        "storage": {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret},
    })
    summary = run_job(f"s3://{s3.bucket}/leftover-{ahead}", str(tmp_path / "out"), config, progress=False)
    assert summary.status == "succeeded" and summary.counts["videos_ok"] == 2, summary.render()
    assert len(pd.read_parquet(tmp_path / "out" / "segments")) >= 4  # cuts.mp4's three shots, text.mp4's one
    assert sorted(p.name for p in temp.rglob("*")) == []


def test_a_video_overwritten_while_it_downloads_is_an_errors_row_not_a_spliced_copy(s3, tmp_path, monkeypatch):
    """s3fs reads an object over its block size as concurrent ranged GETs that no version pins:
    one replaced meanwhile was copied part old, part new, and processed from that copy without an
    error. The download looks the object up again, and the changed video is an errors row."""
    # guards against a bucket video overwritten mid-download being silently spliced from two versions
    import asyncio
    import tempfile

    import s3fs

    from workers.sampling import DecodeStage
    from workers.task import VideoTask

    block = 1 << 20
    key = f"{s3.bucket}/overwritten/clip.mp4"
    s3.filesystem().pipe(key, b"A" * (3 * block))
    config = RunConfig.from_dict({"storage": {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret}})
    ref, = list_videos(f"s3://{s3.bucket}/overwritten/", config.storage)
    fs, _ = open_filesystem(ref.uri, config.storage)  # the cached instance the download uses
    monkeypatch.setattr(fs, "default_block_size", block)  # ranged GETs from 1 MiB on, not 50
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    call_s3 = s3fs.S3FileSystem._call_s3

    async def replaced_after_the_first_range(self, method, *args, **kwargs):
        if method == "get_object" and kwargs.get("Range", "").startswith(f"bytes={block}-"):
            await asyncio.sleep(0.5)  # the first range reads the old version
            await self._pipe_file(key, b"B" * (3 * block))
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", replaced_after_the_first_range)
    task = VideoTask(ref=ref)
    DecodeStage(config).run([task])
    assert [error.error_type for error in task.errors] == ["StorageError"], task.errors
    assert task.errors[0].message.startswith(
        f"{ref.uri} changed while it was downloaded: the next run processes the new version")
    assert list(temp.iterdir()) == []  # the spliced copy is deleted


def test_s3_listing_goes_page_by_page(s3, monkeypatch):
    fs = s3.filesystem()
    for i in range(5):
        fs.pipe(f"{s3.bucket}/paged/clip{i}.mp4", b"x" * (i + 1))
    monkeypatch.setattr(sources, "_PAGE_KEYS", 2)
    calls = []
    real_call = type(fs).call_s3

    def counting(self, method, *args, **kwargs):
        calls.append(method)
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(type(fs), "call_s3", counting)
    storage = StorageConfig(endpoint_url=s3.endpoint_url, key=s3.key, secret=s3.secret)
    listing = list_videos(f"s3://{s3.bucket}/paged/", storage)
    first = next(listing)
    assert first.uri == f"s3://{s3.bucket}/paged/clip0.mp4" and first.size_bytes == 1 and first.etag
    assert calls.count("list_objects_v2") == 1  # the first video is out before the rest is listed
    rest = list(listing)
    assert [r.uri.rsplit("/", 1)[1] for r in rest] == [f"clip{i}.mp4" for i in range(1, 5)]
    assert calls.count("list_objects_v2") == 3
    # a source that is one object is that object (its size and etag from the one lookup)
    single = list(list_videos(f"s3://{s3.bucket}/paged/clip3.mp4", storage))
    assert [(r.uri, r.size_bytes) for r in single] == [(f"s3://{s3.bucket}/paged/clip3.mp4", 4)] and single[0].etag


def test_a_small_put_to_s3_goes_with_its_headers_and_a_large_one_asks_first(s3):
    # botocore asked the server before every PUT's body (Expect: 100-continue): a round trip
    # more for each Parquet file and manifest a run writes
    storage = StorageConfig(endpoint_url=s3.endpoint_url, key=s3.key, secret=s3.secret)
    fs, _ = open_filesystem(f"s3://{s3.bucket}/puts/", storage)
    fs.connect(refresh=True)  # (a session of its own: another test's may have made this one's first)
    asked = []
    fs.s3.meta.events.register("before-send.s3.PutObject", lambda request, **kwargs: asked.append(
        request.headers.get("Expect")))
    small, large = b"x" * 1000, b"y" * EXPECT_CONTINUE_FROM
    fs.pipe_file(f"{s3.bucket}/puts/small", small)
    fs.pipe_file(f"{s3.bucket}/puts/large", large)
    assert asked == [None, b"100-continue"]
    assert fs.cat_file(f"{s3.bucket}/puts/small") == small and fs.cat_file(f"{s3.bucket}/puts/large") == large


@pytest.mark.parametrize("protocol", ["s3", "gs", "az"])
def test_missing_bucket_prefix_says_so(protocol, request):
    # (gcsfs and adlfs raise FileNotFoundError listing it, which reached the user as
    # "[Errno 2] No such file or directory: 'bucket/nowhere'")
    server, storage = _server(protocol, request)
    with pytest.raises(SourceError, match=f"source '{protocol}://{server.bucket}/nowhere/' does not exist"):
        list(list_videos(f"{protocol}://{server.bucket}/nowhere/", RunConfig.from_dict({"storage": storage}).storage))


def test_a_missing_gcs_prefix_in_a_bucket_that_may_not_be_looked_up_is_said_missing(gcs, monkeypatch):
    """gcsfs refuses a bucket's lookup (HTTP 403: credentials that may list a managed folder's
    objects, not the bucket) with OSError("Forbidden: ..."), no PermissionError: since a gs://
    source's missing prefix looks its bucket up, it was said "access was denied: check that the
    credentials are right", its listing allowed (mutation review)."""
    from pipeline.storage_errors import storage_problem
    from workers.storage_retries import bucket_seen

    source = f"gs://{gcs.bucket}/nowhere/"
    storage = RunConfig.from_dict({"storage": gcs.storage}).storage
    fs, _ = open_filesystem(source, storage)  # (the listing gets the same: fsspec keeps it)
    info = fs.info

    def refused(path, **kwargs):
        if "/" not in fs._strip_protocol(path).rstrip("/"):  # (the bucket: gcsfs's GET b/, then its root's listing)
            raise OSError(f"Forbidden: https://storage.googleapis.com/storage/v1/b/{path}\nreader@p.iam."
                          "gserviceaccount.com does not have storage.objects.list access to the Google Cloud "
                          "Storage bucket.")
        return info(path, **kwargs)

    monkeypatch.setattr(fs, "info", refused)
    assert bucket_seen(fs, gcs.bucket) is False
    with pytest.raises(SourceError, match=f"source '{source}' does not exist: check the bucket and prefix") as raised:
        list(list_videos(source, storage))
    assert storage_problem(raised.value, [source]) is None

@pytest.mark.parametrize("protocol", ["s3", "gs", "az"])
def test_one_object_given_with_a_trailing_slash_is_the_object_its_listing_names(protocol, request):
    # gcsfs kept the "/": another URI and video id than the prefix's listing gives, and a download
    # of the key "single/a.mp4/", which does not exist
    from workers.remote_copy import download
    from workers.sampling import listed_version
    from workers.task import VideoTask

    server, storage = _server(protocol, request)
    storage = RunConfig.from_dict({"storage": storage}).storage
    server.filesystem().pipe(f"{server.bucket}/single/a.mp4", b"x" * 100)
    (listed,) = list_videos(f"{protocol}://{server.bucket}/single/", storage)
    (given,) = list_videos(f"{protocol}://{server.bucket}/single/a.mp4/", storage)
    assert (given.uri, given.video_id) == (listed.uri, listed.video_id)
    copy = download(given.uri, storage, listed_version(VideoTask(ref=given)))
    assert Path(copy).read_bytes() == b"x" * 100
    Path(copy).unlink()


def test_a_glob_in_a_bucket_says_globs_are_local_only(s3):
    # a bucket glob was called a missing prefix ("check the bucket and prefix"), never a glob
    storage = StorageConfig(endpoint_url=s3.endpoint_url, key=s3.key, secret=s3.secret)
    s3.filesystem().pipe(f"{s3.bucket}/globbed/Trip [2019]/a.mp4", b"x")
    with pytest.raises(SourceError, match=r"globs are matched only on local files: give a bucket prefix "
                                          rf"\(s3://{s3.bucket}/globbed/\) or a manifest"):
        list(list_videos(f"s3://{s3.bucket}/globbed/*.mp4", storage))
    # a prefix whose name has glob characters is that prefix
    assert [r.uri for r in list_videos(f"s3://{s3.bucket}/globbed/Trip [2019]/", storage)] == [
        f"s3://{s3.bucket}/globbed/Trip [2019]/a.mp4"]


def test_a_deleted_object_run_as_the_source_is_marked_missing(s3, tmp_path, synthetic_clips, tiny_models):
    # the object was outside its own scope: every night after its deletion the run exited 2
    from pipeline.sources import source_scope

    storage = {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret}
    fs = s3.filesystem()
    fs.put_file(str(synthetic_clips / "cuts.mp4"), f"{s3.bucket}/single/one.mp4")
    source, out = f"s3://{s3.bucket}/single/one.mp4", str(tmp_path / "out")
    assert run_job(source, out, _config(tiny_models, storage), progress=False).exit_code == 0
    fs.rm(f"{s3.bucket}/single/one.mp4")
    gone = run_job(source, out, _config(tiny_models, storage), progress=False)
    assert gone.exit_code == 0 and gone.missing == [source], gone.render()
    assert gone.warnings == [f"{source} no longer exists (emptied?): 1 video the output has from it marked missing"]
    # as the listing names the object: the protocol in lower case, an Azure URL's account kept
    assert source_scope(f"S3://{s3.bucket}/single/one.mp4")(source)
    named = f"abfs://c@{ACCOUNT}.dfs.core.windows.net/x/one.mp4"
    assert source_scope(named)(named) and not source_scope(named)(f"{named}.bak")


def test_a_source_and_output_whose_scheme_is_in_capitals_are_read_in_lower_case(s3, tmp_path, synthetic_clips,
                                                                                 tiny_models):
    # S3://... was refused as "s3:// is the scheme of no storage vidlens can read ... give an s3:// URL"
    # (a source), or "Protocol not known: S3" naming nothing (an output): fsspec knows lower case only
    from pipeline import results

    storage = {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret}
    fs = s3.filesystem()
    fs.put_file(str(synthetic_clips / "cuts.mp4"), f"{s3.bucket}/capitals/in/one.mp4")
    source, out = f"S3://{s3.bucket}/capitals/in", f"S3://{s3.bucket}/capitals/out"
    summary = run_job(source, out, _config(tiny_models, storage), progress=False)
    assert summary.exit_code == 0 and summary.counts["videos_ok"] == 1, summary.render()
    # the same bucket and output as its lower-case name: one video, under s3://
    videos = results.open(f"s3://{s3.bucket}/capitals/out", storage_options=s3.storage_options).df("videos")
    assert videos.uri.tolist() == [f"s3://{s3.bucket}/capitals/in/one.mp4"]
    again = run_job(f"s3://{s3.bucket}/capitals/in", out, _config(tiny_models, storage), progress=False)
    assert again.reasons == {"unchanged": 1} and again.counts["videos_ok"] == 0, again.render()


def test_objects_a_prefix_listing_leaves_out_are_missing_only_once_deleted(s3, tmp_path, synthetic_clips,
                                                                           tiny_models):
    """A hidden key or one of another extension, processed once as the source itself, was marked
    missing by the next run over its prefix, which does not list it, though it was there (as a
    local folder's walk no longer did): `forget --missing` would have deleted its rows."""
    storage = {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret}
    config = _config(tiny_models, storage)
    fs = s3.filesystem()
    prefix, out = f"s3://{s3.bucket}/left", str(tmp_path / "out")
    left_out = [f"{prefix}/.hidden/h.mp4", f"{prefix}/raw/cam1.dat"]
    for uri in (*left_out, f"{prefix}/v.mp4"):
        fs.put_file(str(synthetic_clips / "cuts.mp4"), uri.removeprefix("s3://"))
    for uri in left_out:
        assert run_job(uri, out, config, progress=False).reasons == {"new": 1}
    folder = run_job(prefix, out, config, progress=False)
    assert folder.reasons == {"new": 1} and folder.missing == [], folder.render()
    fs.rm(left_out[0].removeprefix("s3://"))
    fs.rm(f"{s3.bucket}/left/v.mp4")
    assert sorted(dry_run(prefix, out, config).summary.missing) == [left_out[0], f"{prefix}/v.mp4"]
    assert sorted(run_job(prefix, out, config, progress=False).missing) == [left_out[0], f"{prefix}/v.mp4"]


def test_azure_errors_are_named_with_the_fix(az, azure_env):
    """The Azure SDK's error codes are enums (StorageErrorCode): a wrong key was not
    recognised and reached the user as a traceback."""
    from pipeline.storage_errors import storage_problem

    endpoint = f"{az.endpoint_url}/{ACCOUNT}"
    wrong_key = StorageConfig(endpoint_url=endpoint, key=ACCOUNT, secret="d3Jvbmcta2V5LWZvci10aGUtdGVzdA==")
    uri = f"az://{az.bucket}/videos"
    with pytest.raises(Exception) as raised:
        list(list_videos(uri, wrong_key))
    said = storage_problem(raised.value, [uri]) or ""
    assert said.startswith(f"cannot use {uri}: access was denied") and "a wrong secret key" in said
    right_key = StorageConfig(endpoint_url=endpoint, key=ACCOUNT, secret=ACCOUNT_KEY)
    with pytest.raises(FileNotFoundError) as raised:
        list(list_videos("az://nocontainer/videos", right_key))
    assert (storage_problem(raised.value, ["az://nocontainer/videos"]) or "").startswith(
        "cannot use az://nocontainer/videos: the bucket does not exist")


# --- manifests ------------------------------------------------------------------------------


def test_csv_manifest_with_sizes_and_etags_costs_no_lookups(tmp_path):
    manifest = tmp_path / "batch.csv"
    manifest.write_text("uri,size,etag\ns3://b/a.mp4,100,e1\ns3://b/c.mov,200,\"e2\"\ns3a://b/d.mp4,300,e3\n\n")
    refs = list(list_videos(str(manifest)))
    assert [(r.uri, r.size_bytes, r.etag) for r in refs] == [("s3://b/a.mp4", 100, "e1"), ("s3://b/c.mov", 200, "e2"),
                                                             ("s3://b/d.mp4", 300, "e3")]  # (as a listing names it)
    assert refs[0].video_id != refs[1].video_id


def test_a_manifest_etag_gives_an_object_the_video_id_its_listing_gives(s3, tmp_path):
    # the manifest hashed the ETag bare, the listing as S3 gives it ("..." quoted): a new id, a rerun
    storage = StorageConfig(endpoint_url=s3.endpoint_url, key=s3.key, secret=s3.secret)
    s3.filesystem().pipe(f"{s3.bucket}/tagged/a.mp4", b"hello")
    listed = next(list_videos(f"s3://{s3.bucket}/tagged/", storage))
    manifest = tmp_path / "batch.csv"
    manifest.write_text(f'uri,size,etag\n{listed.uri},5,{listed.etag}\n{listed.uri},5,"""{listed.etag}"""\n')
    refs = list(read_manifest(str(manifest), storage))
    assert [(r.video_id, r.etag) for r in refs] == [(listed.video_id, listed.etag)] * 2


def test_a_bucket_manifests_relative_rows_are_keys_beside_it(s3, tmp_path, monkeypatch):
    # "clips/a.mp4" in s3://bucket/lists/batch.csv was a local path under the driver's working
    # folder: every row failed as "no such video file" (or a local file of that name was run)
    storage = StorageConfig(endpoint_url=s3.endpoint_url, key=s3.key, secret=s3.secret)
    fs = s3.filesystem()
    fs.pipe(f"{s3.bucket}/lists/clips/a.mp4", b"hello")
    fs.pipe(f"{s3.bucket}/elsewhere/b.mp4", b"bye!")
    fs.pipe(f"{s3.bucket}/lists/batch.csv", b"uri\nclips/a.mp4\n./clips/a.mp4\n../elsewhere/b.mp4\n")
    monkeypatch.chdir(tmp_path)
    refs = list(read_manifest(f"s3://{s3.bucket}/lists/batch.csv", storage))
    a, b = f"s3://{s3.bucket}/lists/clips/a.mp4", f"s3://{s3.bucket}/elsewhere/b.mp4"
    assert [(r.uri, r.size_bytes, r.absent) for r in refs] == [(a, 5, False), (a, 5, False), (b, 4, False)]
    assert refs[0].video_id == next(list_videos(a, storage)).video_id


def test_file_urls_in_manifests_and_sources_are_the_files_they_name(tmp_path, synthetic_clips):
    # file:/x was joined onto the manifest's folder, %20 never decoded, file:// kept with a size and etag
    shutil.copy(synthetic_clips / "cuts.mp4", tmp_path / "a b.mp4")
    clip = str(tmp_path / "a b.mp4")
    url = (tmp_path / "a b.mp4").as_uri()
    assert url.endswith("/a%20b.mp4") and [r.uri for r in list_videos(url)] == [clip]
    folder = tmp_path / "my lists"
    folder.mkdir()
    manifest = folder / "batch.csv"
    rows = [f"file:{tmp_path}/a%20b.mp4,,", f"{url},,", f"file://localhost{tmp_path}/a%20b.mp4,,", f"{url},7,e1",
            "../a b.mp4,,"]
    manifest.write_text("uri,size,etag\n" + "\n".join(rows) + "\n")
    refs = list(read_manifest(str(manifest)))
    assert [(r.uri, r.absent) for r in refs] == [(clip, False)] * 5
    # the manifest itself as a file URL (its folder's space as %20): "does not exist" before
    assert [r.uri for r in read_manifest(manifest.as_uri())] == [clip] * 5
    assert refs[0].video_id == refs[1].video_id == refs[2].video_id == next(list_videos(clip)).video_id


def test_manifest_paths_are_relative_to_it_and_looked_up_when_sizes_are_missing(tmp_path, synthetic_clips):
    shutil.copytree(synthetic_clips, tmp_path / "videos")
    table = pa.table({"URI": ["videos/cuts.mp4", str(tmp_path / "videos" / "text.mp4"), "videos/gone.mp4"]})
    pq.write_table(table, tmp_path / "batch.parquet")
    refs = list(list_videos(str(tmp_path / "batch.parquet")))
    assert [Path(r.uri).name for r in refs] == ["cuts.mp4", "text.mp4", "gone.mp4"]
    assert refs[0].size_bytes == (tmp_path / "videos" / "cuts.mp4").stat().st_size
    assert refs[2].size_bytes == 0  # listed but missing: the decode stage gives it an errors row


def test_a_parquet_manifest_is_read_from_memory_arrow_owns_not_on_its_threads(tmp_path, monkeypatch):
    """(mutation review) As the output's files are (`pipeline.parquet_reading`): given the Python file,
    pyarrow read it on its own threads, which let go of it as the process exits and abort it."""
    import threading

    from fsspec.implementations.local import LocalFileSystem

    uris = [str(tmp_path / f"{n}.mp4") for n in range(3)]
    pq.write_table(pa.table({"uri": uris}), tmp_path / "batch.parquet")
    callers = []
    opened = LocalFileSystem.open

    def watched(fs, path, mode="rb", **kwargs):
        handle = opened(fs, path, mode, **kwargs)
        for name in ("read", "readinto", "seek", "tell"):
            def called(*args, found=getattr(handle, name), **kw):
                callers.append(threading.current_thread())
                return found(*args, **kw)
            setattr(handle, name, called)
        return handle

    monkeypatch.setattr(LocalFileSystem, "open", watched)
    assert [ref.uri for ref in read_manifest(str(tmp_path / "batch.parquet"))] == uris
    assert callers
    # (a thread Python did not start, Arrow's, is a _DummyThread to Python)
    assert [t.name for t in callers if isinstance(t, threading._DummyThread)] == []


def test_a_manifests_bucket_lookups_run_at_once_and_keep_its_order(tmp_path, monkeypatch):
    """Looked up one at a time, a bucket's latency capped the job at the listing's rate (23
    videos/s at 40 ms a lookup): the lookups overlap, the videos come out in the manifest's order."""
    import importlib
    import threading
    import time

    from fsspec.implementations.memory import MemoryFileSystem

    calls = {"now": 0, "most": 0}
    lock = threading.Lock()

    class SlowFileSystem(MemoryFileSystem):  # a bucket whose every lookup takes 20 ms
        protocol = "slowbucket"
        root_marker = ""

        def info(self, path, **kwargs):
            with lock:
                calls["now"] += 1
                calls["most"] = max(calls["most"], calls["now"])
            time.sleep(0.02)
            with lock:
                calls["now"] -= 1
            if path.endswith("gone.mp4"):
                raise FileNotFoundError(path)
            return {"name": path, "type": "file", "size": int(path[-7:-4]) + 1, "ETag": f"e-{path}"}

    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "slowbucket", SlowFileSystem)
    names = [f"v{i:03d}.mp4" for i in range(60)] + ["gone.mp4", "local.mp4"]
    manifest = tmp_path / "batch.csv"
    manifest.write_text("uri,size,etag\n" + "".join(
        f"{name},1,e\n" if name == "local.mp4" else f"slowbucket://b/{name},,\n" for name in names))
    refs = list(read_manifest(str(manifest), lookups=8))
    assert [Path(r.uri).name for r in refs] == names
    assert [r.size_bytes for r in refs[:60]] == list(range(1, 61)) and refs[60].absent
    assert 1 < calls["most"] <= 8


def test_a_video_named_twice_in_a_manifest_is_processed_once(tmp_path, synthetic_clips, tiny_models):
    shutil.copytree(synthetic_clips, tmp_path / "videos")
    manifest = tmp_path / "batch.csv"
    manifest.write_text("uri\nvideos/cuts.mp4\nvideos/sub/order.mkv\nvideos/cuts.mp4\n")
    config = RunConfig.from_dict({"stages": ["embed"], "models": tiny_models, "output": {"thumbnails": False},
                                  "resources": {"executor": "local"}})
    summary = run_job(str(manifest), str(tmp_path / "out"), config, progress=False)
    assert summary.counts["videos_listed"] == 2 and summary.counts["videos_ok"] == 2
    assert len(pd.read_parquet(tmp_path / "out" / "videos")) == 2


def test_a_manifest_row_with_a_mistyped_scheme_is_an_errors_row(tmp_path, synthetic_clips, tiny_models):
    # "s4://" stopped the whole run with "vidlens: error: Protocol not known: s4", naming no row
    shutil.copy(synthetic_clips / "cuts.mp4", tmp_path / "cuts.mp4")
    manifest = tmp_path / "batch.csv"
    manifest.write_text("uri\ncuts.mp4\ns4://bucket/typo.mp4\n")
    config = RunConfig.from_dict({"stages": ["embed"], "models": tiny_models, "output": {"thumbnails": False},
                                  "resources": {"executor": "local"}})
    summary = run_job(str(manifest), str(tmp_path / "out"), config, progress=False)
    assert summary.exit_code == 3 and summary.counts["videos_ok"] == 1 and summary.counts["videos_failed"] == 1
    errors = pd.read_parquet(tmp_path / "out" / "errors")
    [(uri, message)] = errors[["uri", "message"]].itertuples(index=False)
    # the URI in its column, not again in the message: one failure of many videos is one message
    assert uri == "s4://bucket/typo.mp4"
    assert message.startswith("s4:// is the scheme of no storage") and "s3://" in message


def test_a_manifest_row_whose_size_is_no_number_is_looked_up_with_a_warning(tmp_path, synthetic_clips, tiny_models):
    """A size such as "12kB" stopped the run at its row, every night, and lost the videos
    processed since the last published batch."""
    shutil.copy(synthetic_clips / "cuts.mp4", tmp_path / "cuts.mp4")
    shutil.copy(synthetic_clips / "text.mp4", tmp_path / "text.mp4")
    size = (tmp_path / "text.mp4").stat().st_size
    manifest = tmp_path / "batch.csv"
    manifest.write_text(f"uri,size,etag\ncuts.mp4,12kB,x\ntext.mp4,{size},e1\n")
    refs = list(read_manifest(str(manifest)))
    assert [(Path(r.uri).name, r.size_bytes, r.etag) for r in refs] == [
        ("cuts.mp4", (tmp_path / "cuts.mp4").stat().st_size, None), ("text.mp4", size, "e1")]
    config = RunConfig.from_dict({"stages": ["embed"], "models": tiny_models, "output": {"thumbnails": False},
                                  "resources": {"executor": "local"}})
    summary = run_job(str(manifest), str(tmp_path / "out"), config, progress=False)
    assert summary.exit_code == 0 and summary.counts["videos_ok"] == 2
    assert summary.warnings == [f"manifest {manifest}, row for {tmp_path / 'cuts.mp4'}: size '12kB' is not a whole "
                                "number of bytes; the video is looked up instead (mend the row, or leave its size "
                                "empty)"]
    from decimal import Decimal

    from pipeline.manifests import _size

    assert [_size(value) for value in (12, "12", " 12 ", 12.0, "1234.0", Decimal("7.00"), float("nan"), "", None)] == [
        12, 12, 12, 12, 1234, 7, None, None, None]
    for value in ("-1", 1.5, float("inf"), "12kB", 2**63, "99999999999999999999", True):
        with pytest.raises(ValueError):
            _size(value)
    # one warning a row for the first few; the rest counted in one (a pandas export of a million)
    manifest.write_text("uri,size,etag\n" + "".join(f"cuts.mp4,{i}kB,x\n" for i in range(9)))
    assert len(run_job(str(manifest), str(tmp_path / "out"), config, progress=False).warnings) == 6


def test_manifest_without_uri_column_says_what_to_add(tmp_path):
    manifest = tmp_path / "batch.csv"
    manifest.write_text("path\nvideos/a.mp4\n")
    with pytest.raises(SourceError, match="no 'uri' column"):
        list(list_videos(str(manifest)))


def test_a_spreadsheets_csv_manifest_is_read_as_its_rows_say(tmp_path, caplog):
    # as Excel saves it: a BOM before the header, an upper-case name, spaced headers and cells, a row of
    # blanks; the size under `size_bytes`, the version under `version`: none of it looked up
    manifest = tmp_path / "batch.CSV"
    manifest.write_text("URI , Size_Bytes, Version\n  a.mp4  ,100,v1\n   , ,\nb.mp4, ,\nc.mp4,0,v3\n",
                        encoding="utf-8-sig")
    with caplog.at_level(logging.WARNING, logger="pipeline.manifests"):
        refs = list(read_manifest(str(manifest)))
    assert [(r.uri, r.size_bytes, r.etag, r.absent) for r in refs] == [
        (str(tmp_path / "a.mp4"), 100, "v1", False),  # (no file there: taken as the row says)
        (str(tmp_path / "b.mp4"), 0, None, True),  # a blank size: looked up, without a warning
        (str(tmp_path / "c.mp4"), 0, "v3", False)]  # an empty file is 0 bytes, a whole number
    assert caplog.records == []
    # as many rows with a bad size as are said one by one: no line for "0 more rows"
    manifest.write_text("uri,size,etag\n" + "".join(f"x{i}.mp4,{i}kB,e\n" for i in range(5)))
    with caplog.at_level(logging.WARNING, logger="pipeline.manifests"):
        assert len(list(read_manifest(str(manifest)))) == 5
    assert len(caplog.records) == 5 and "more rows" not in caplog.text
    manifest.write_text("")  # an export that failed: no header, not no videos
    with pytest.raises(SourceError, match="no 'uri' column"):
        list(read_manifest(str(manifest)))


# --- storage options and retries ------------------------------------------------------------


def test_storage_options_per_protocol(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    storage = StorageConfig(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", key="k", secret="s",
                            options={"use_ssl": False})
    s3 = storage_options("s3://bucket/x", storage)
    assert s3["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}
    assert (s3["key"], s3["secret"], s3["use_ssl"]) == ("k", "s", False)
    assert s3["config_kwargs"]["retries"]["max_attempts"] == storage.retries
    assert storage_options("/local/path", storage) == {}
    assert storage_options("gs://bucket/x", StorageConfig(anon=True))["token"] == "anon"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    assert storage_options("s3://b", StorageConfig())["client_kwargs"]["endpoint_url"] == "http://from-env:9000"


def test_an_azure_endpoint_is_reached_with_the_account_and_its_key(az, azure_env, synthetic_clips):
    """adlfs takes no endpoint: `--endpoint-url` with the account (storage.key) and its key
    (storage.secret) reach an Azurite-like store through a connection string (it was ignored)."""
    az.filesystem().put_file(str(synthetic_clips / "cuts.mp4"), f"{az.bucket}/endpoint/cuts.mp4")
    storage = StorageConfig(endpoint_url=f"{az.endpoint_url}/{ACCOUNT}", key=ACCOUNT, secret=ACCOUNT_KEY)
    assert [Path(v.uri).name for v in list_videos(f"az://{az.bucket}/endpoint", storage)] == ["cuts.mp4"]
    sas = storage_options("az://c/x", StorageConfig(endpoint_url="http://127.0.0.1:1/acct", token="?sv=1&sig=x"))
    assert sas == {"connection_string": "BlobEndpoint=http://127.0.0.1:1/acct;SharedAccessSignature=sv=1&sig=x;"}


def test_an_https_azure_endpoint_takes_any_azure_credential(azure_env):
    """An https endpoint (Azure's other clouds, Azure Stack, a private endpoint) is adlfs's
    account_host: Azure AD's credentials reach it too, where a connection string without a key
    or SAS reached it anonymously. The account is the endpoint's first label unless named."""
    china = "https://acct.blob.core.chinacloudapi.cn"
    fs, path = open_filesystem("az://c/x", StorageConfig(endpoint_url=china))
    assert (fs.account_url, fs.account_name, path) == (china, "acct", "c/x")
    assert type(fs.service_client.credential).__name__ == "DefaultAzureCredential"
    fs, _ = open_filesystem("az://c/x", StorageConfig(endpoint_url=f"{china}/", key="named", secret=ACCOUNT_KEY))
    assert (fs.account_url, fs.account_name) == (china, "named") and fs.account_key == ACCOUNT_KEY
    fs, _ = open_filesystem("az://c/x", StorageConfig(endpoint_url=china, token="sv=1&sig=x"))
    assert fs.service_client.url == f"{china}/?sv=1&sig=x"


def test_a_failed_azure_credential_chain_is_logged_once(caplog, azure_env):
    """azure-identity's 12-line warning for each failed try of DefaultAzureCredential came 4
    times a listing (a machine without Azure credentials, an https endpoint) before vidlens'
    own error; once says which credentials were tried."""
    open_filesystem("az://c/x", StorageConfig(endpoint_url="https://acct.blob.core.chinacloudapi.cn"))
    chained = logging.getLogger("azure.identity.aio._credentials.chained")
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            chained.warning("DefaultAzureCredential failed to retrieve a token.\nAttempted credentials: %s", "none")
        chained.warning("another warning")
    said = [r.getMessage().split("\n")[0] for r in caplog.records if r.name.startswith("azure.identity")]
    assert said == ["DefaultAzureCredential failed to retrieve a token.", "another warning"]


def test_an_azure_url_naming_its_account_keeps_it_in_every_video_uri(az, azure_env, synthetic_clips, tiny_models):
    """abfs://container@account.dfs.core.windows.net/...: adlfs's listing drops the account, so the
    videos were named abfs://container/..., which a worker cannot open without the account in its
    environment and which the source's scope did not match (a video deleted from the bucket was
    never noticed). Each URI now keeps the account as the source wrote it."""
    fs = az.filesystem()
    for clip in ("cuts.mp4", "text.mp4"):
        fs.put_file(str(synthetic_clips / clip), f"{az.bucket}/named/{clip}")
    bucket = f"abfs://{az.bucket}@{ACCOUNT}.dfs.core.windows.net"
    source, out = f"{bucket}/named", f"{bucket}/named-out"
    config = _config(tiny_models, az.storage)
    summary = run_job(source, out, config, progress=False)
    assert summary.status == "succeeded" and summary.counts["videos_ok"] == 2, summary.render()
    videos = pq.read_table(f"{az.bucket}/named-out/videos", filesystem=fs).to_pandas()
    assert sorted(videos.uri) == [f"{source}/cuts.mp4", f"{source}/text.mp4"]
    # the account a worker opens a video with comes from its URI
    opened, path = open_filesystem(videos.uri.iloc[0], StorageConfig())
    assert opened.account_name == ACCOUNT and path == f"{az.bucket}/named/{Path(videos.uri.iloc[0]).name}"
    # and with storage.key naming the account too (fsspec gave adlfs two account names: a TypeError)
    assert open_filesystem(videos.uri.iloc[0], StorageConfig(key=ACCOUNT))[0].account_name == ACCOUNT
    with pytest.raises(OSError, match=f"names the Azure account '{ACCOUNT}', and the storage config"):
        open_filesystem(videos.uri.iloc[0], StorageConfig(key="another"))
    from pipeline import results

    with results.open(out, storage_options(out, config.storage)) as r:  # queried where it is
        assert r.sql("SELECT count(*) FROM videos").fetchall() == [(2,)]
    fs.rm(f"{az.bucket}/named/text.mp4")
    again = run_job(source, out, config, progress=False)
    assert again.counts["videos_total"] == 0 and again.counts["videos_missing"] == 1, again.render()
    assert [Path(uri).name for uri in again.missing] == ["text.mp4"]


def test_a_gcs_store_reached_through_an_endpoint_gets_gcsfs_plain_filesystem():
    # gcsfs 2026.10's default asks Google's control plane for each bucket's layout: through an
    # emulator's endpoint every operation waited 60 s for it
    import gcsfs.core

    fs, path = open_filesystem("gs://bucket/videos", StorageConfig(endpoint_url="http://127.0.0.1:1", anon=True))
    assert type(fs) is gcsfs.core.GCSFileSystem and path == "bucket/videos"
    assert fs._endpoint == "http://127.0.0.1:1"


def test_transient_errors_are_retried_with_backoff_and_others_are_not():
    attempts, waits = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("Connection reset by peer")
        return "read"

    storage = StorageConfig(retries=4, retry_backoff_s=0.5)
    assert with_retries(flaky, "read clip", storage, sleep=waits.append) == "read"
    assert len(attempts) == 3 and len(waits) == 2 and waits[1] > waits[0] >= 0.5

    def missing():
        attempts.append(1)
        raise FileNotFoundError("s3://b/gone.mp4")

    attempts.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, "read clip", storage, sleep=waits.append)
    assert len(attempts) == 1
    assert is_transient(OSError("An error occurred (SlowDown) when calling the GetObject operation"))
    assert not is_transient(PermissionError("Access Denied"))


def test_errors_botocore_has_retried_are_not_retried_again():
    """botocore makes storage.retries attempts itself (s3://): retried here too, a wrong
    endpoint took 25 attempts and 108 s to be reported."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    attempts = []

    def unreachable():
        attempts.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket")

    def throttled():  # as s3fs passes botocore's error on: translated, with botocore's as its cause
        attempts.append(1)
        try:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "GetObject")
        except ClientError as exc:
            raise OSError("An error occurred (SlowDown) when calling the GetObject operation") from exc

    storage = StorageConfig(retries=4, retry_backoff_s=0.5)
    for call in (unreachable, throttled):
        attempts.clear()
        with pytest.raises((OSError, EndpointConnectionError)):
            with_retries(call, "list s3://bucket/", storage, sleep=lambda s: None)
        assert len(attempts) == 1, call.__name__


def test_errors_the_azure_sdk_has_retried_are_not_retried_again():
    """azure-core's retry policy (under adlfs, az://) retries a connection 3 times with 15 s
    and more between: retried here too, an unreachable account took 435 s to be reported.
    adlfs is optional (not installed for the tests): the error is azure-core's by its module."""
    ServiceRequestError = type("ServiceRequestError", (Exception,), {"__module__": "azure.core.exceptions"})
    attempts = []

    def unreachable():
        attempts.append(1)
        try:
            raise ConnectionRefusedError("[Errno 111] Connect call failed ('127.0.0.1', 9)")
        except ConnectionRefusedError as exc:
            raise ServiceRequestError("Cannot connect to host 127.0.0.1:9") from exc

    def reset():  # a connection error of adlfs' own, not from the SDK: retried here
        attempts.append(1)
        raise ConnectionResetError("Connection reset by peer")

    storage = StorageConfig(retries=4, retry_backoff_s=0.5)
    for call, expected in ((unreachable, 1), (reset, 4)):
        attempts.clear()
        with pytest.raises(Exception):
            with_retries(call, "list az://videos/", storage, sleep=lambda s: None)
        assert len(attempts) == expected, call.__name__


# --- bucket problems at the command line: one line naming the URI and the fix, exit code 2 ----------


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No AWS identity from the environment, files or instance metadata, and no cached filesystems."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # one with other credentials would be reused
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def _cli_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_run_to_a_bucket_without_credentials_says_what_to_set(aws_env, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["run", str(tmp_path), "--out", "s3://nobucket/out", "--endpoint-url", "http://127.0.0.1:9",
                 "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert err.startswith("vidlens: error: cannot use s3://nobucket/out: no credentials were found")
    assert "AWS_ACCESS_KEY_ID" in err and "--anon" in err


def test_an_azure_url_without_an_account_says_how_to_name_one(azure_env, tmp_path, capsys):
    """Without an account name adlfs cannot even build its client: its ValueError ("unable to
    connect to account for Must provide either a connection_string or account_name with
    credentials!!") was the whole message, naming neither the URL nor what to set."""
    from pipeline.cli import main

    for command in (["query", "az://vidlens/out", "SELECT 1"],
                    ["run", "az://vidlens/videos", "--out", str(tmp_path / "out"), "--executor", "local"]):
        assert main(command) == 2
        err = _cli_error(capsys)
        assert err.startswith(f"vidlens: error: cannot use {command[1]}: no Azure storage account was named: set "
                              "AZURE_STORAGE_ACCOUNT_NAME"), err
        assert "AZURE_STORAGE_CONNECTION_STRING" in err and "abfs://CONTAINER@ACCOUNT" in err


def test_azure_credentials_found_nowhere_are_not_called_refused():
    """An account named (abfs://container@account...) without a key or SAS is reached with
    DefaultAzureCredential; where it finds no credential to try, nothing was sent to the store,
    which was said to have refused the credentials."""
    from azure.core.exceptions import ClientAuthenticationError

    from pipeline.storage_errors import storage_problem

    uri = "abfs://vidlens@acct.dfs.core.windows.net/out"
    none_found = ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token from the included "
                                           "credentials.\nAttempted credentials:\n\tEnvironmentCredential: ...")
    assert (storage_problem(none_found, [uri]) or "").startswith(
        f"cannot use {uri}: no credentials were found: set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY")
    refused = ClientAuthenticationError("Server failed to authenticate the request.")
    assert (storage_problem(refused, [uri]) or "").startswith(f"cannot use {uri}: the store refused the credentials")


@pytest.mark.parametrize("command", [["query", "gs://vidlens/out", "SELECT 1"],
                                     ["run", "{tmp}", "--out", "gs://vidlens/out", "--executor", "local"]])
def test_a_bucket_output_without_its_filesystem_installed_says_what_to_install(command, tmp_path, capsys,
                                                                                monkeypatch):
    """A source's missing gcsfs was named; an output's (run --out, query) was fsspec's ImportError,
    a traceback."""
    import importlib
    import sys

    from pipeline.cli import main

    monkeypatch.setitem(sys.modules, "gcsfs", None)
    registry = importlib.import_module("fsspec.registry")  # (`fsspec.registry` is its read-only view)
    for protocol in ("gs", "gcs"):  # imported by an earlier test: fsspec keeps the class
        monkeypatch.delitem(registry._registry, protocol, raising=False)
    assert main([part.format(tmp=tmp_path) for part in command] + ["--anon"]) == 2
    err = _cli_error(capsys)
    assert err.startswith("vidlens: error: gs://vidlens/out: no filesystem for gs:// is installed"), err


def test_a_profile_that_is_not_there_is_named_not_called_no_credentials(aws_env, tmp_path, capsys):
    """A mistyped AWS_PROFILE was told to set AWS_PROFILE ("no credentials were found")."""
    from pipeline.cli import main

    (tmp_path / "credentials").write_text("[team]\naws_access_key_id = a\naws_secret_access_key = b\n")
    aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    aws_env.setenv("AWS_PROFILE", "teem")
    assert main(["query", "s3://vidlens/out", "SELECT 1", "--endpoint-url", "http://127.0.0.1:9"]) == 2
    err = _cli_error(capsys)
    assert err.startswith("vidlens: error: cannot use s3://vidlens/out: AWS_PROFILE names a profile that is not "
                          "there: check its name"), err
    assert "no credentials were found" not in err and "(teem)" in err


@pytest.mark.parametrize("command", [["run", "{source}", "--out", "{out}", "--executor", "local", "--no-progress",
                                      "--stages", "embed", "--embed-model", "{embed}"],
                                     ["query", "{out}", "SELECT 1"], ["compact", "{out}"]])
def test_a_bucket_output_whose_prefix_has_pattern_characters_is_refused_before_writing(command, s3, aws_env,
                                                                                       synthetic_clips, tiny_models,
                                                                                       capsys):
    # fsspec's deletes and DuckDB's reads take * ? [ as patterns: a run published its first batch,
    # then stopped with "vidlens: error: ['bucket/out [2019]/_vidlens/staging/...']", its lock left
    # behind, and every query said "No files found that match the pattern"
    from pipeline.cli import main

    fs = s3.filesystem()
    fs.put_file(str(synthetic_clips / "cuts.mp4"), f"{s3.bucket}/patterned/in/cuts.mp4")
    source, out = f"s3://{s3.bucket}/patterned/in", f"s3://{s3.bucket}/patterned/out [2019]"
    command = [part.format(source=source, out=out, embed=tiny_models["embed"]) for part in command]
    assert main(command + ["--endpoint-url", s3.endpoint_url, "--storage-option", f"key={s3.key}",
                           "--storage-option", f"secret={s3.secret}"]) == 2
    err = _cli_error(capsys)
    assert f"output {out!r} has '[' in its path" in err and "give a prefix without" in err, err
    assert fs.find(f"{s3.bucket}/patterned/") == [f"{s3.bucket}/patterned/in/cuts.mp4"]


def test_a_bucket_manifest_without_credentials_is_not_called_missing(aws_env, tmp_path, capsys):
    """fs.isfile answers False for any error: the manifest was said not to exist."""
    from pipeline.cli import main

    assert main(["run", "s3://vidlens/batch.csv", "--out", str(tmp_path / "out"), "--endpoint-url",
                 "http://127.0.0.1:9", "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert err.startswith("vidlens: error: cannot use s3://vidlens/batch.csv: no credentials were found"), err


@pytest.mark.parametrize("command", [["query", "s3://vidlens/out", "SELECT 1"],
                                     ["report", "s3://vidlens/out", "--html", "{tmp}/report"],
                                     ["compact", "s3://vidlens/out"],
                                     ["run", "s3://vidlens/videos", "--out", "{tmp}/out", "--executor", "local"]])
def test_an_unreachable_endpoint_says_to_check_endpoint_url(command, aws_env, tmp_path, capsys):
    from pipeline.cli import main

    aws_env.setenv("AWS_ACCESS_KEY_ID", "someone")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "something")
    config = tmp_path / "one-try.yaml"
    config.write_text("storage:\n  retries: 1\n")  # botocore's attempts: fail fast
    command = [part.format(tmp=tmp_path) for part in command]
    assert main(command + ["--endpoint-url", "http://127.0.0.1:9", "--config", str(config)]) == 2
    err = _cli_error(capsys)
    uri = command[1]
    assert f"cannot use {uri}: the storage endpoint could not be reached: check --endpoint-url" in err
    assert "EndpointConnectionError" in err


def test_a_store_that_goes_down_during_a_run_is_not_said_misconfigured(s3, tmp_path, synthetic_clips, tiny_models,
                                                                        aws_env, capsys, monkeypatch):
    """A store that stopped answering once a run had listed its videos (soak of Ray on S3, 2026-12-07:
    SeaweedFS killed for 40 s mid-run) was said to need its --endpoint-url checked, MinIO's given as
    the example, and the user told nothing of the run: the endpoint was right and the run can go on."""
    import yaml
    from botocore.exceptions import EndpointConnectionError

    from pipeline.cli import main
    from pipeline.store import Store

    def down(*args, **kwargs):
        raise EndpointConnectionError(endpoint_url=s3.endpoint_url)

    monkeypatch.setattr(Store, "stage_file", down)
    for name, value in s3.env.items():
        aws_env.setenv(name, value)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
                                      "sampling": {"num_frames": 2}, "output": {"thumbnails": False}}))
    out = f"s3://{s3.bucket}/went-down/"
    assert main(["run", str(synthetic_clips), "--out", out, "--executor", "local", "--no-progress",
                 "--config", str(config)]) == 2
    said = capsys.readouterr().err
    assert "Traceback" not in said, said
    err = said.splitlines()[-1]  # (the plan before it)
    assert f"cannot use {out}: the storage endpoint stopped answering during the run" in err, err
    assert "run the same command again once the store is up" in err and "EndpointConnectionError" in err
    assert "check --endpoint-url" not in err


def test_only_an_unreachable_store_is_said_to_have_gone_down_during_a_run():
    """(mutation review) `answered` turns "unreachable" into "stopped answering during the run", no other
    kind: credentials refused midway (a token that expired) are still said to be refused."""
    from azure.core.exceptions import ClientAuthenticationError
    from botocore.exceptions import EndpointConnectionError

    from pipeline.storage_errors import storage_problem

    uri = "s3://vidlens/out"
    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert "check --endpoint-url" in (storage_problem(down, [uri]) or "")
    assert (storage_problem(down, [uri], answered=True) or "").startswith(
        f"cannot use {uri}: the storage endpoint stopped answering during the run")
    refused = ClientAuthenticationError("Server failed to authenticate the request.")
    assert (storage_problem(refused, [uri], answered=True) or "").startswith(
        f"cannot use {uri}: the store refused the credentials")



def test_a_run_stopped_while_its_bucket_is_down_says_what_it_left_and_the_next_run_finishes(
        s3, tmp_path, synthetic_clips, tiny_models, aws_env):
    """A run stopped (SIGTERM) once its output's S3 no longer answered waited 37 s on botocore's retries in
    its cleanup (its last batch, its lock given back), and over 400 s on an S3 that hung, past a supervisor's
    grace period, then said only that it stopped. It now gives up on the store within the time its cleanup
    has (`pipeline.stop_deadline`), says what it left, as a killed run would, and the next run, the store
    back, takes the lock over and does the rest: each video once."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import duckdb

    from pipeline.store import Store
    from tests.cutoff import Cutoff

    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(6):
        shutil.copy(synthetic_clips / "cuts.mp4", videos / f"{index}.mp4")
    out, summary = f"s3://{s3.bucket}/stopped-store-down", tmp_path / "s.json"
    direct = s3.filesystem()
    commits = f"{s3.bucket}/stopped-store-down/_vidlens/commits"
    with Cutoff(int(s3.endpoint_url.rsplit(":", 1)[1])) as proxy:
        environment = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        command = [sys.executable, "-m", "pipeline", "run", str(videos), "--out", out, "--executor", "local",
                   "--stages", "embed", "--embed-model", tiny_models["embed"], "--no-progress",
                   "--set", "output.commit_every_videos=2", "--summary-json", str(summary)]
        # (its first batch published, it holds on at its third video, not yet published)
        process = subprocess.Popen(command, env={**environment, "VIDLENS_FAILPOINT": "video:3:pause"},
                                   cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 300
            while not (direct.invalidate_cache() or direct.exists(commits) and direct.ls(commits)):
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()
                time.sleep(0.1)
            proxy.cut()
            process.send_signal(signal.SIGTERM)
            err = process.communicate(timeout=240)[1]
        finally:
            process.kill()
        assert process.returncode == 143, err[-3000:]
        stopped = json.loads(summary.read_text())
        run = stopped["run_id"]
        assert stopped["status"] == "stopped" and run
        said = err.splitlines()[-1]
        assert said.startswith(
            f"vidlens: run {run} stopped (SIGTERM): the batches it published stay; the same command goes on from "
            "there. Its cleanup could not finish on the output's store within 5 s, and left, as a killed job does: "
            "its last batch (the videos finished since the one before, and its final row): the next run rolls it "
            "forward where its manifest was written, else clears it and does them again; "), said
        # (and the first batch's staged copies being deleted, where the store was cut off before they were)
        assert said.endswith(
            f"; its lock {out}/_vidlens/lock, which the next job on the output takes over at once on this host (its "
            "pid gone), from another host after 600 s without heartbeat"), said
        assert stopped["warnings"] == [said.split("from there. ", 1)[1]]  # (what it left, for a watcher)
        direct.invalidate_cache()
        assert json.loads(direct.cat_file(f"{s3.bucket}/stopped-store-down/_vidlens/lock"))["run_id"] == run
        assert [name.rsplit("/", 1)[1] for name in direct.ls(commits)] == [f"{run}-00000.json"]

        proxy.put_back()
        done = subprocess.run(command, env=environment, cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads(summary.read_text())
    assert after["status"] == "succeeded" and after["counts"]["videos_total"] == 4
    con = duckdb.connect()
    Store(out, s3.storage_options).register_duckdb(con)
    assert con.sql("SELECT uri, count(*) FROM videos GROUP BY uri ORDER BY uri").fetchall() == [
        (str(videos / f"{index}.mp4"), 1) for index in range(6)]
    assert con.sql("SELECT count(*) FROM ledger").fetchall() == [(6,)]
    assert con.sql("SELECT run_id, status FROM runs ORDER BY run_id").fetchall() == [
        (run, "interrupted"), (after["run_id"], "succeeded")]
    direct.invalidate_cache()
    assert not direct.exists(f"{s3.bucket}/stopped-store-down/_vidlens/lock")
    staged = direct.find(f"{s3.bucket}/stopped-store-down/_vidlens/staging/")  # (SeaweedFS lists empty folders)
    assert not [path for path in staged if path.endswith(".parquet")], staged


def test_an_unreachable_gcs_endpoint_is_reported_after_gcsfs_retries_once(tmp_path, capsys, caplog, monkeypatch):
    """gcsfs makes 6 attempts at each call itself: retried here too, a wrong endpoint took 30
    attempts and 210 s to be reported, each give-up logged with a 30-line traceback."""
    import types

    import gcsfs.retry

    from pipeline.cli import main

    async def no_wait(seconds):
        pass

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))  # gcsfs's backoff only
    command = ["run", "gs://vidlens/videos", "--out", str(tmp_path / "out"), "--executor", "local",
               "--endpoint-url", "http://127.0.0.1:9", "--anon", "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("cannot use gs://vidlens/videos: the storage endpoint could not be reached: check the network, and "
            "--endpoint-url") in err and "MinIO" not in err and "ClientConnectorError" in err
    gave_up = [r for r in caplog.records if r.name == "gcsfs" and "out of retries" in r.getMessage()]
    # each of the source's lookups given up on once (3 here); storage.retries attempts each before (5 per call)
    assert 1 <= len(gave_up) <= 3, len(gave_up)
    assert all(r.exc_info is None for r in gave_up)


@pytest.mark.parametrize("option", ["region=eu-west-1", "aws_session_token=abc"])
def test_a_storage_option_the_filesystem_does_not_take_is_named(option, aws_env, tmp_path, capsys):
    from pipeline.cli import main

    aws_env.setenv("AWS_ACCESS_KEY_ID", "someone")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "something")
    assert main(["query", "s3://vidlens/out", "SELECT 1", "--endpoint-url", "http://127.0.0.1:9",
                 "--storage-option", option]) == 2
    err = _cli_error(capsys)  # was a TypeError's traceback, exit 1
    assert "cannot use s3://vidlens/out: a storage option (--storage-option, or storage.options in --config) " \
           "is not one the filesystem takes" in err and option.split("=")[0] in err


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_an_endpoint_without_its_scheme_is_named_with_the_fix(where, aws_env, capsys):
    """MinIO's address written as host:port was botocore's bare "Invalid endpoint: 127.0.0.1:9000"."""
    from pipeline.cli import main

    aws_env.setenv("AWS_ACCESS_KEY_ID", "someone")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "something")
    command = ["query", "s3://vidlens/out", "SELECT 1"]
    if where == "flag":
        command += ["--endpoint-url", "127.0.0.1:9"]
    else:
        aws_env.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9")
    assert main(command) == 2
    err = _cli_error(capsys)
    assert err.startswith("vidlens: error: cannot use s3://vidlens/out: the endpoint is no URL: give it with its "
                          "scheme, e.g. --endpoint-url http://minio:9000"), err
    assert "AWS_ENDPOINT_URL" in err and "127.0.0.1:9" in err


def test_a_gcs_endpoint_without_its_scheme_is_named_with_the_fix(tmp_path, capsys, caplog, monkeypatch):
    """A GCS emulator's address written as host:port was aiohttp's NonHttpUrlClientError, a traceback;
    then named, but after gcsfs's 6 attempts (35 s): it is now refused before any request."""
    import types

    import gcsfs.retry

    from pipeline.cli import main

    async def no_wait(seconds):
        pass

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))  # gcsfs's backoff only
    for command in (["query", "gs://vidlens/out", "SELECT 1", "--endpoint-url", "127.0.0.1:9", "--anon"],
                    ["run", "gs://vidlens/out", "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress",
                     "--storage-option", "endpoint_url=127.0.0.1:9", "--anon"]):
        assert main(command) == 2
        err = _cli_error(capsys)
        assert err.startswith("vidlens: error: cannot use gs://vidlens/out: the endpoint is no URL: give it with its "
                              "scheme, e.g. --endpoint-url http://127.0.0.1:4443"), err
        assert "127.0.0.1:9" in err and "AWS_ENDPOINT_URL" not in err and "minio" not in err
    assert not [r for r in caplog.records if r.name == "gcsfs" and "out of retries" in r.getMessage()]


def _key_file_named_in_refusals(missing: str, tmp_path, capsys) -> list[str]:
    """`vidlens run` given `storage.token`, and `vidlens query` given `--storage-option token=`, a gs:// key
    file `missing` that is not there: each refused, the path named (a key file's path is no secret).
    Returns the run's command."""
    from pipeline.cli import main

    run = ["run", "gs://vidlens/videos", "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress"]
    for command, setting in (([*run, "--set", f"storage.token={missing}"], "storage.token"),
                             (["query", "gs://vidlens/out", "SELECT 1", "--storage-option", f"token={missing}"],
                              "storage.options' token (--storage-option token=...)")):
        assert main(command) == 2
        err = _cli_error(capsys)
        assert err.startswith(f"vidlens: error: cannot use {command[1]}: {setting} names {missing}, which does "
                              "not exist: give the path of a service account's key file"), err
    return run


def test_a_gcs_key_file_that_is_not_there_is_refused_before_any_request(tmp_path, capsys, monkeypatch):
    """gcsfs took a token naming no file for a raw access token (offline, Google's oauth2 endpoint
    was said to be unreachable), and google-auth's refusal of a GOOGLE_APPLICATION_CREDENTIALS
    naming no file for no credentials: the bucket was read anonymously, without a word."""
    from pipeline.cli import main

    missing = tmp_path / "missing.json"
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    run = _key_file_named_in_refusals(str(missing), tmp_path, capsys)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    assert main(run) == 2
    err = _cli_error(capsys)
    assert err.startswith(f"vidlens: error: cannot use gs://vidlens/videos: GOOGLE_APPLICATION_CREDENTIALS names "
                          f"{missing}, which does not exist"), err
    # nothing is asked of a token that names no file, or of a run that signs in another way
    assert storage_options("gs://b/x", StorageConfig(anon=True))["token"] == "anon"
    assert storage_options("gs://b/x", StorageConfig(token="ya29.a0-raw_token"))["token"] == "ya29.a0-raw_token"
    missing.write_text(USER_CREDENTIALS)
    assert "token" not in storage_options("gs://b/x", StorageConfig())  # GOOGLE_APPLICATION_CREDENTIALS's file is there
    assert storage_options("gs://b/x", StorageConfig(token=str(missing)))["token"] == str(missing)


def test_a_gcs_key_files_path_is_named_in_the_refusal_whatever_its_ending(tmp_path, capsys, monkeypatch):
    """A key file's path (--storage-option token=/var/secrets/key, storage.token) was redacted from its own
    refusal unless it ended in .json ("storage.token names ***"): on gs:// alone a path is no secret, the
    file's contents are. Where another store may get the same token (an S3 session token), it stays hidden."""
    from pipeline.cli import main

    missing = str(tmp_path / "secrets" / "key")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    _key_file_named_in_refusals(missing, tmp_path, capsys)
    other = str(tmp_path / "session" / "token")  # (s3:// reads the same setting as its session token)
    assert main(["run", "s3://vidlens/videos", "--out", "gs://vidlens/out", "--executor", "local", "--no-progress",
                 "--set", f"storage.token={other}"]) == 2
    err = _cli_error(capsys)
    assert "storage.token names ***, which does not exist" in err and other not in err, err


def test_a_gcs_key_files_path_has_its_tilde_expanded(tmp_path, monkeypatch):
    """token=~/keys/sa.json was said not to exist though it did: neither vidlens nor gcsfs expanded the ~.
    gcsfs now gets the full path; GOOGLE_APPLICATION_CREDENTIALS, which google-auth reads without expanding
    it either, is refused with the full path to give instead."""
    from workers.storage import StorageError

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "sa.json").write_text(USER_CREDENTIALS)
    key = str(tmp_path / "keys" / "sa.json")
    assert storage_options("gs://b/x", StorageConfig(token="~/keys/sa.json"))["token"] == key
    assert storage_options("gs://b/x", StorageConfig(options={"token": "~/keys/sa.json"}))["token"] == key
    gone = re.escape(f"~/keys/gone.json ({tmp_path / 'keys' / 'gone.json'}), which does not exist")
    with pytest.raises(StorageError, match=f"storage.token names {gone}"):
        storage_options("gs://b/x", StorageConfig(token="~/keys/gone.json"))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "~/keys/sa.json")
    with pytest.raises(StorageError, match=re.escape("GOOGLE_APPLICATION_CREDENTIALS names ~/keys/sa.json, whose ~ "
                                                     f"google-auth does not expand: give the full path, {key}")):
        storage_options("gs://b/x", StorageConfig())
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", key)
    assert "token" not in storage_options("gs://b/x", StorageConfig())


def test_which_gcs_tokens_are_taken_for_a_key_files_path(tmp_path, monkeypatch):
    """(mutation review) A token is a key file's path where it has a "/" or ends in .json (a file
    in the working folder, as gcsfs looks for it); with no token, a GOOGLE_APPLICATION_CREDENTIALS
    unset or empty asks for nothing (gcloud's own sign-in); a token's mapping is no path."""
    from workers.storage import StorageError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    assert "token" not in storage_options("gs://b/x", StorageConfig())
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "")
    assert "token" not in storage_options("gs://b/x", StorageConfig())
    for token in (str(tmp_path / "keys" / "vidlens"), "vidlens-key.json"):
        with pytest.raises(StorageError, match=f"storage.token names {re.escape(token)}, which does not exist"):
            storage_options("gs://b/x", StorageConfig(token=token))
    (tmp_path / "vidlens-key.json").write_text(USER_CREDENTIALS)
    assert storage_options("gs://b/x", StorageConfig(token="vidlens-key.json"))["token"] == "vidlens-key.json"
    key = {"type": "authorized_user", "client_id": "id", "client_secret": "s", "refresh_token": "r"}
    assert storage_options("gs://b/x", StorageConfig(options={"token": key}))["token"] == key


def test_a_gcs_key_file_that_signs_in_nowhere_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    """A storage.token key file that was no JSON failed the run with "vidlens: error: Expecting value: line 1
    column 1 (char 0)", naming nothing, and one of another shape with "no credentials were found" (or gcsfs's
    "KeyError: 'refresh_token'"); GOOGLE_APPLICATION_CREDENTIALS naming such a file was refused by google-auth,
    and gcsfs read the bucket anonymously, without a word. Each is refused before any request, naming the file."""
    from pipeline.cli import main
    from workers.storage import StorageError

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    key = tmp_path / "sa.json"
    for contents, problem in (("not json {", "cannot be read as JSON (JSONDecodeError: Expecting value"),
                              ("[1, 2]", "holds no JSON object"),
                              ("{}", "is no service account's key google-auth can sign in with (MalformedError: Service account "
                                     "info was not in the expected format, missing fields"),
                              ('{"type": "authorized_user", "client_id": "id"}',
                               "is a user's credentials without client_secret, refresh_token")):
        key.write_text(contents)
        with pytest.raises(StorageError, match=re.escape(f"storage.token names {key}, which {problem}")):
            storage_options("gs://b/x", StorageConfig(token=str(key)))
    key.write_text("not json {")
    assert main(["run", "gs://vidlens/videos", "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress",
                 "--endpoint-url", f"http://127.0.0.1:{free_port()}", "--set", f"storage.token={key}"]) == 2
    err = _cli_error(capsys)
    assert err.startswith(f"vidlens: error: cannot use gs://vidlens/videos: storage.token names {key}, which cannot "
                          "be read as JSON"), err
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    with pytest.raises(StorageError, match=re.escape(f"GOOGLE_APPLICATION_CREDENTIALS names {key}, which cannot be "
                                                     "read as JSON")):
        storage_options("gs://b/x", StorageConfig())
    key.write_text("{}")
    with pytest.raises(StorageError, match=re.escape(f"GOOGLE_APPLICATION_CREDENTIALS names {key}, which has no "
                                                     '"type" google-auth takes (service_account, authorized_user')):
        storage_options("gs://b/x", StorageConfig())
    key.write_text(USER_CREDENTIALS)
    assert storage_options("gs://b/x", StorageConfig(token=str(key)))["token"] == str(key)
    assert "token" not in storage_options("gs://b/x", StorageConfig())
    # (mutation review) gcsfs reads a user's credentials by their fields, whatever "type" the file says
    key.write_text('{"client_id": "id", "client_secret": "s3cret", "refresh_token": "r"}')
    assert storage_options("gs://b/x", StorageConfig(token=str(key)))["token"] == str(key)

def test_an_empty_endpoint_is_none_on_gcs_and_azure_as_on_s3(tmp_path, monkeypatch):
    """An empty endpoint (--endpoint-url "$UNSET", `endpoint_url: ""`) is no endpoint on s3://, and
    was on gs:// and az://, until the check of an endpoint without its scheme refused it as "the
    endpoint is no URL" (mutation review)."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    assert "client_kwargs" not in storage_options("s3://b/x", StorageConfig(endpoint_url=""))
    assert not storage_options("gs://b/x", StorageConfig(endpoint_url="", anon=True)).get("endpoint_url")
    assert storage_options("az://c/x", StorageConfig(endpoint_url="", key="acct", secret="a2V5")) == {
        "account_name": "acct", "account_key": "a2V5"}

def test_an_azure_endpoint_without_its_scheme_is_refused_before_any_request(azure_env, capsys, monkeypatch):
    """The Azure SDK took an Azurite address written as host:port/account for an unreachable one,
    after its 4 attempts (89 s)."""
    from pipeline.cli import main

    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    assert main(["query", "az://vidlens/out", "SELECT 1", "--endpoint-url", f"127.0.0.1:9/{ACCOUNT}"]) == 2
    err = _cli_error(capsys)
    assert err.startswith("vidlens: error: cannot use az://vidlens/out: the endpoint is no URL: give it with its "
                          "scheme, e.g. --endpoint-url http://127.0.0.1:10000/devstoreaccount1"), err
    assert f"127.0.0.1:9/{ACCOUNT}" in err


def test_a_connection_strings_blob_endpoint_without_its_scheme_is_refused_before_any_request(azure_env, capsys,
                                                                                               monkeypatch):
    """A connection string's BlobEndpoint=127.0.0.1:9/ACCOUNT (--storage-option connection_string=..., or
    AZURE_STORAGE_CONNECTION_STRING) was reached over https by the Azure SDK and said to be unreachable after
    its 4 attempts (86 s), where --endpoint-url without its scheme is refused at once. The key stays hidden."""
    from pipeline.cli import main
    from workers.storage import StorageError

    connection = f"BlobEndpoint=127.0.0.1:9/{ACCOUNT};AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
    query = ["query", "az://vidlens/out", "SELECT 1"]
    assert main([*query, "--storage-option", f"connection_string={connection}"]) == 2
    option = _cli_error(capsys)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
    assert main(query) == 2
    environment = _cli_error(capsys)
    for err, setting in ((option, "storage.options' connection_string (--storage-option connection_string=...)"),
                         (environment, "AZURE_STORAGE_CONNECTION_STRING")):
        assert err.startswith(f"vidlens: error: cannot use az://vidlens/out: the connection string's BlobEndpoint, "
                              f"in {setting}, is 127.0.0.1:9/{ACCOUNT}, with no scheme: write it with http:// or "
                              "https://, e.g. BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1"), err
        assert ACCOUNT_KEY not in err
    # names in any case, as the SDK reads them; one with its scheme, or none (the account's own), passes
    with pytest.raises(StorageError, match="BlobEndpoint"):
        storage_options("az://c/x", StorageConfig(options={"connection_string": "blobendpoint=127.0.0.1:9/a;"}))
    for fine in (f"BlobEndpoint=http://127.0.0.1:9/{ACCOUNT};AccountName={ACCOUNT};",
                 f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"):
        assert storage_options("az://c/x", StorageConfig(options={"connection_string": fine}))


def test_an_azurite_endpoint_without_its_account_is_named_with_the_fix(az, azure_env, tmp_path, capsys,
                                                                       monkeypatch):
    """Azurite's endpoint without the account in its path: the container was taken for the account,
    and Azurite's bare 400 (no error code) reached the user as a traceback."""
    from pipeline.cli import main

    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    assert main(["run", f"az://{az.bucket}/videos", "--out", str(tmp_path / "out"), "--dry-run",
                 "--endpoint-url", az.endpoint_url, "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert err.startswith(f"vidlens: error: cannot use az://{az.bucket}/videos: the store could not make sense of "
                          "the request (HTTP 400): check --endpoint-url"), err
    assert "/devstoreaccount1" in err


def test_an_azurite_endpoint_without_a_key_or_sas_is_told_none_was_given(az, azure_env, tmp_path, capsys):
    """A connection string without AccountKey or SharedAccessSignature (an Azurite endpoint with
    neither set) sends requests without credentials: Azurite's refusal was told to check that the
    credentials are right."""
    from pipeline.cli import main

    endpoint = ["--endpoint-url", f"{az.endpoint_url}/{ACCOUNT}"]
    for command in (["run", f"az://{az.bucket}/videos", "--out", str(tmp_path / "out"), "--executor", "local",
                     "--no-progress", *endpoint], ["query", f"az://{az.bucket}/out", "SELECT 1", *endpoint],
                    ["query", f"az://{az.bucket}/out", "SELECT 1", "--storage-option",
                     f"connection_string=BlobEndpoint={az.endpoint_url}/{ACCOUNT};AccountName={ACCOUNT};"]):
        assert main(command) == 2
        err = _cli_error(capsys)
        assert err.startswith(f"vidlens: error: cannot use {command[1]}: no credentials were given (the request "
                              "went without a key or SAS): set AZURE_STORAGE_ACCOUNT_KEY"), err
    # with --anon, the anonymous request is named as such
    assert main(["query", f"az://{az.bucket}/out", "SELECT 1", *endpoint, "--anon"]) == 2
    assert "access was denied to an anonymous request (--anon" in _cli_error(capsys)


def test_an_azure_refusal_is_said_unsent_only_where_the_request_had_no_key_or_sas():
    """(mutation review) A denied (403 AuthorizationFailure) or refused (AuthenticationFailed)
    request that went without an Authorization header or a SAS signature was sent without
    credentials; one that carried either was not: those were refused or may not do this."""
    import types

    from pipeline.storage_errors import storage_problem

    class HttpResponseError(Exception):  # (the Azure SDK's, as far as it is read)
        pass

    def answered(code: str, headers: dict, query: str) -> HttpResponseError:
        error = HttpResponseError(f"This request is not authorized to perform this operation.\nErrorCode:{code}")
        error.error_code = code
        url = f"http://127.0.0.1:10000/devstoreaccount1/vidlens?restype=container&comp=list{query}"
        error.response = types.SimpleNamespace(request=types.SimpleNamespace(headers=headers, url=url))
        return error

    uri = "az://vidlens/out"
    for code, sent in (("AuthorizationFailure", "access was denied: check that the credentials are right"),
                       ("AuthenticationFailed", "the store refused the credentials")):
        said = storage_problem(answered(code, {"x-ms-version": "2025-01-05"}, ""), [uri]) or ""
        assert said.startswith(f"cannot use {uri}: no credentials were given (the request went without"), said
        for headers, query in (({"x-ms-version": "2025-01-05"}, "&sv=2025-01-05&sig=c2lnbmF0dXJl"),
                               ({"Authorization": "SharedKey devstoreaccount1:c2lnbmF0dXJl"}, "")):
            said = storage_problem(answered(code, headers, query), [uri]) or ""
            assert said.startswith(f"cannot use {uri}: {sent}"), said

def test_a_missing_bucket_and_refused_credentials_are_named(s3, aws_env, tmp_path, capsys):
    import s3fs

    from pipeline.cli import main

    aws_env.setenv("AWS_ACCESS_KEY_ID", s3.key)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    assert main(["run", "s3://no-such-bucket/videos", "--out", str(tmp_path / "out"),
                 "--endpoint-url", s3.endpoint_url, "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert "cannot use s3://no-such-bucket/videos: the bucket does not exist: check the bucket name" in err
    # of a source and an output, the one in the bucket the store named (S3's NoSuchBucket says which)
    assert main(["run", "s3://no-such-bucket/videos", "--out", f"s3://{s3.bucket}/out",
                 "--endpoint-url", s3.endpoint_url, "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert "cannot use s3://no-such-bucket/videos: the bucket does not exist" in err, err
    # a manifest in it likewise: it was "manifest ... does not exist", the bucket left unsaid
    assert main(["run", "s3://no-such-bucket/batch.csv", "--out", str(tmp_path / "out"),
                 "--endpoint-url", s3.endpoint_url, "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert "cannot use s3://no-such-bucket/batch.csv: the bucket does not exist: check the bucket name" in err, err
    # an output bucket that does not exist is not created (s3fs would, where the credentials allow)
    (tmp_path / "videos").mkdir()
    assert main(["run", str(tmp_path / "videos"), "--out", "s3://no-such-out-bucket/out",
                 "--endpoint-url", s3.endpoint_url, "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert "cannot use s3://no-such-out-bucket/out: the bucket does not exist: check the bucket name" in err
    for command in (["query", "s3://no-such-out-bucket/out", "SELECT 1"], ["compact", "s3://no-such-out-bucket/out"]):
        assert main(command + ["--endpoint-url", s3.endpoint_url]) == 2
        assert "s3://no-such-out-bucket/out: the bucket does not exist" in _cli_error(capsys)
    assert "no-such-out-bucket" not in s3fs.S3FileSystem(
        key=s3.key, secret=s3.secret, client_kwargs={"endpoint_url": s3.endpoint_url}).ls("")

    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()  # the cached one signs with the right secret
    for command in (["query", f"s3://{s3.bucket}/out", "SELECT 1"],
                    ["run", str(tmp_path), "--out", f"s3://{s3.bucket}/refused", "--executor", "local"]):
        assert main(command + ["--endpoint-url", s3.endpoint_url]) == 2
        err = _cli_error(capsys)
        uri = command[1] if command[0] == "query" else command[3]
        assert f"cannot use {uri}: the store refused the credentials: check AWS_ACCESS_KEY_ID" in err
        assert "not-the-secret" not in err


@pytest.mark.parametrize("protocol", ["gs", "az"])
def test_a_missing_gcs_bucket_or_azure_container_is_named_as_s3s_is(protocol, request, azure_env, tmp_path, capsys):
    """gcsfs and adlfs list a prefix of a bucket (container) that does not exist as empty: the
    source was said not to exist ("check the bucket and prefix"), and an Azure manifest in one
    too, where S3's names the bucket."""
    from pipeline.cli import main

    server, _ = _server(protocol, request)
    flags = (["--endpoint-url", server.endpoint_url, "--anon"] if protocol == "gs"
             else ["--storage-option", f"connection_string={server.connection_string}"])
    for source, out in ((f"{protocol}://nobucket/videos", str(tmp_path / "out")),
                        (f"{protocol}://nobucket/batch.csv", str(tmp_path / "out")),
                        (f"{protocol}://nobucket/videos", f"{protocol}://{server.bucket}/out")):
        assert main(["run", source, "--out", out, "--executor", "local", "--no-progress", *flags]) == 2
        err = _cli_error(capsys)
        assert f"cannot use {source}: the bucket does not exist: check the bucket name" in err, err


def test_anon_on_a_private_bucket_says_to_drop_it(s3, aws_env, tmp_path, capsys):
    """--anon sends no credentials: "check that the credentials are right" asked after none. So
    does storage.anon in the config file."""
    from pipeline.cli import main

    (tmp_path / "anon.yaml").write_text("storage:\n  anon: true\n")
    for anon in (["--anon"], ["--config", str(tmp_path / "anon.yaml")]):
        assert main(["query", f"s3://{s3.bucket}/out", "SELECT 1", "--endpoint-url", s3.endpoint_url, *anon]) == 2
        err = _cli_error(capsys)
        assert f"cannot use s3://{s3.bucket}/out: access was denied to an anonymous request (--anon, or " \
               "storage.anon in --config): the bucket or prefix is not public; drop it and give credentials" in err, err


def test_a_dry_run_into_a_missing_bucket_is_refused_as_the_run_is(s3, aws_env, tmp_path, capsys):
    """It listed the source and said every video would be processed (exit 0): the run is refused."""
    from pipeline.cli import main

    aws_env.setenv("AWS_ACCESS_KEY_ID", s3.key)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not really a video")
    assert main(["run", str(tmp_path / "videos"), "--out", "s3://no-such-out-bucket/out", "--dry-run",
                 "--endpoint-url", s3.endpoint_url, "--executor", "local", "--no-progress"]) == 2
    err = _cli_error(capsys)
    assert "cannot use s3://no-such-out-bucket/out: the bucket does not exist: check the bucket name" in err


def test_a_missing_azure_container_is_named_by_a_dry_run_and_a_query(az, azure_env, tmp_path, capsys):
    """The output's container was not checked on Azure: a dry run into one that does not exist
    planned every video (exit 0), a query said the output "holds no vidlens tables". A SAS of
    the container alone, which may not read the container's properties, still reaches it."""
    import datetime

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    from pipeline.cli import main
    from pipeline.store import Store

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not really a video")
    bucket_flags = ["--storage-option", f"connection_string={az.connection_string}"]
    for command in (["run", str(tmp_path / "videos"), "--out", "az://nocontainer/out", "--dry-run", "--executor",
                     "local", "--no-progress"], ["query", "az://nocontainer/out", "SELECT 1"]):
        assert main(command + bucket_flags) == 2
        err = _cli_error(capsys)
        assert "cannot use az://nocontainer/out: the bucket does not exist: check the bucket name" in err, err
    sas = generate_container_sas(ACCOUNT, az.bucket, account_key=ACCOUNT_KEY,
                                 permission=ContainerSasPermissions(read=True, list=True, write=True),
                                 expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
    Store(f"az://{az.bucket}/sas-out", {"connection_string": f"BlobEndpoint={az.endpoint_url}/{ACCOUNT};"
                                                             f"SharedAccessSignature={sas};"}).require_bucket()



def test_an_azure_container_name_it_does_not_take_is_named_as_the_problem(az, azure_env, tmp_path, capsys):
    """A container name with characters Azure does not take, or too short, was said to be a request the
    store could not make sense of, with the fix "check --endpoint-url" (Azure's 400 InvalidResourceName,
    OutOfRangeInput)."""
    from pipeline.cli import main

    bucket_flags = ["--storage-option", f"connection_string={az.connection_string}"]
    for source in ("az://Bad_Container!/videos", "az://ab/videos"):
        assert main(["run", source, "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress",
                     *bucket_flags]) == 2
        err = _cli_error(capsys)
        assert f"cannot use {source}: the store refused the name: check the container (bucket) name" in err, err
        assert "--endpoint-url" not in err, err
    # of a source and an output, the one whose container Azure cannot take is named (its answer names none)
    assert main(["run", f"az://{az.bucket}/videos", "--out", "az://Bad_Container!/out", "--executor", "local",
                 "--no-progress", *bucket_flags]) == 2
    assert "cannot use az://Bad_Container!/out: the store refused the name" in _cli_error(capsys)


def test_of_several_containers_the_one_whose_name_azure_refuses_is_named():
    """(mutation review) Azure's InvalidResourceName names no container: of a source and an output,
    the one whose name breaks Azure's rules (a double hyphen, a hyphen at an end, 3 to 63 characters)
    is named, and both where neither does."""
    from pipeline.storage_errors import storage_problem

    class Refused(Exception):
        error_code = "InvalidResourceName"

    for wrong in ("my--videos", "videos-", "-videos", "ab", "v" * 64):
        said = storage_problem(Refused("The specified resource name contains invalid characters."),
                               ["az://videos/in", f"az://{wrong}/out"])
        assert said.startswith(f"cannot use az://{wrong}/out: the store refused the name"), said
    said = storage_problem(Refused("The specified resource name contains invalid characters."),
                           ["az://videos/in", f"az://{'v' * 63}/out"])
    assert said.startswith(f"cannot use az://videos/in or az://{'v' * 63}/out: the store refused the name"), said

def test_compact_and_forget_on_a_bucket_keep_the_views_and_leave_no_replaced_file(s3):
    """On a bucket their reads, copies and deletes go several at once (one request deletes many)."""
    import duckdb

    from bench.outputs import build_output
    from pipeline.compact import compact
    from pipeline.forget import forget
    from pipeline.store import Store

    out = f"s3://{s3.bucket}/maintained"
    uris = build_output(out, s3.storage_options, batches=6)  # 8 videos a batch, 3 files a batch

    def shown() -> dict[str, list]:
        con = duckdb.connect()
        Store(out, s3.storage_options).register_duckdb(con)
        return {view: con.execute(f"select * exclude (processed_at) from {view} order by all").fetchall()
                if view == "videos" else con.execute(f"select * from {view} order by all").fetchall()
                for view in ("videos", "captions", "captions_history")}

    before = shown()
    counts = compact(out, s3.storage_options)
    assert (counts["files_before"], counts["files_after"]) == (12, 2)
    assert shown() == before

    def objects() -> list[str]:  # listed by a new filesystem each time: one caches its listings
        return s3.filesystem().find(f"{s3.bucket}/maintained")

    parquet = [p for p in objects() if p.endswith(".parquet") and "snapshots" not in p]
    assert len(parquet) == 3  # videos, captions and the attempts record: the replaced files are gone
    done = forget(out, [uris[3]], storage_options=s3.storage_options)
    assert (done.videos, done.rows_removed, done.files_rewritten) == (1, 2, 2)
    after = shown()
    assert len(after["videos"]) == len(before["videos"]) - 1 and len(after["captions"]) == len(before["captions"]) - 1
    parquet = [p for p in objects() if p.endswith(".parquet") and "snapshots" not in p]
    assert len(parquet) == 3
    fs = s3.filesystem()
    assert not any(uris[3].encode() in fs.cat_file(p) for p in objects())


@pytest.mark.parametrize("protocol", ["s3", "gs", "az"])
def test_a_bucket_lock_is_created_only_where_none_is(protocol, request, monkeypatch):
    """Taken with a conditional write (no pause: the last writer held it after half a second);
    a job that looked before another's create is refused by the store, not let in beside it."""
    from pipeline.lock import LockedError, OutputLock
    from pipeline.store import Store
    from workers.storage import storage_options

    server, storage = _server(protocol, request)
    out = f"{protocol}://{server.bucket}/locked"
    options = storage_options(out, RunConfig.from_dict({"storage": storage}).storage)
    pauses = []
    last_writer_wins = OutputLock._last_writer_wins
    monkeypatch.setattr(OutputLock, "_last_writer_wins", lambda self: (pauses.append(self.run_id),
                                                                        last_writer_wins(self))[1])

    honours = protocol != "gs"  # the GCS emulator here ignores ifGenerationMatch (GCS does not)
    with OutputLock(Store(out, options), "first"):
        assert pauses == ([] if honours else ["first"])  # the pause where a second create went through
        with pytest.raises(LockedError, match="locked by run first"):
            OutputLock(Store(out, options), "second").__enter__()
        if honours:
            # its read of the lock came before the first job's create (or after a job before that
            # released it): it creates the lock, which the store refuses, and never writes over it
            late = Store(out, options)
            with monkeypatch.context() as patch:  # (fsspec may hand every Store the same filesystem)
                cat_file, reads = late.fs.cat_file, []

                def read_before_its_create(path, *args, **kwargs):
                    reads.append(path)
                    if len(reads) == 1:
                        raise FileNotFoundError(path)
                    return cat_file(path, *args, **kwargs)

                patch.setattr(late.fs, "cat_file", read_before_its_create)
                with pytest.raises(LockedError, match="locked by run first"):
                    OutputLock(late, "late").__enter__()
    assert not Store(out, options).fs.exists(Store(out, options).path("_vidlens", "lock"))

    # a store that ignores the condition (an S3-compatible server may): the pause, as before
    pauses.clear()
    ignoring = Store(out, options)
    with monkeypatch.context() as patch:
        pipe_file = ignoring.fs.pipe_file
        patch.setattr(ignoring.fs, "pipe_file", lambda path, value, mode="overwrite", **kwargs:
                      pipe_file(path, value, **kwargs))
        third = OutputLock(ignoring, "third").__enter__()
    try:
        assert pauses == ["third"]
        with pytest.raises(LockedError, match="locked by run third"):
            OutputLock(Store(out, options), "fourth").__enter__()
    finally:
        third.release()
