"""`vidlens query` and the Python API (`pipeline.results`) over a local folder and an S3 bucket."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import results
from pipeline.cli import main
from pipeline.job import run_job
from pipeline.store import Store
from schemas.config import RunConfig
from schemas.tables import TABLES

QUERIES = ["a red scene", "white text on a page"]

#: SQL that ends in comments as DuckDB accepts it; the `;` and `--` in the literal and the comment
#: in the middle must be left as they are.
COMMENTED_SQL = [
    "SELECT uri, 'a;--b' AS note FROM videos -- every video",
    "SELECT uri, 'a;--b' AS note /* the note stays */ FROM videos; -- every video",
    "SELECT uri, 'a;--b' AS note -- one line of it\nFROM videos;\n/* the end */ ;\n",
]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, synthetic_clips, tiny_models):
    """One quick local run (no shots, no OCR) over the synthetic clips."""
    root = tmp_path_factory.mktemp("results")
    config = RunConfig.from_dict({
        "stages": ["embed", "objects", "scenes", "match", "captions"],
        "models": {**tiny_models, "dtype": "float32"},  # as search encodes its query
        "match": {"queries": QUERIES},
        "captions": {"max_new_tokens": 4},
        "sampling": {"num_frames": 4},
        "resources": {"executor": "local", "videos_per_batch": 3},
    })
    summary = run_job(str(synthetic_clips), str(root / "out"), config, progress=False)
    assert summary.exit_code == 0
    return root / "out"


def test_open_gives_a_view_per_table_and_its_history(outputs):
    with results.open(str(outputs)) as r:
        assert set(r.tables) == set(TABLES)
        assert {f"{t}_history" for t in TABLES} <= set(r.views)
        videos = r.df("videos")
        assert sorted(videos.uri.str.rsplit("/", n=1).str[-1]) == ["cuts.mp4", "order.mkv", "text.mp4"]
        assert len(r.history("videos")) >= len(videos)
        # the ledger has no history ("no table 'ledger_history'" named a table no one asked for)
        with pytest.raises(results.ResultsError, match=r"^no history of 'ledger' in .*: the tables with one are "
                                                       r".*videos.*\(the ledger holds each video's entry now"):
            r.history("ledger")
        # views as attributes and relations, for notebooks
        assert r.videos.count("*").fetchall()[0][0] == 3
        top = r.sql("SELECT video_id, label FROM labels WHERE level = 'video' AND rank = 1").df()
        assert len(top) == 2 * 3  # an object and a scene per video
        matches = r.df("matches")
        assert set(matches["query"]) == set(QUERIES)
        assert len(r.df("thumbnails")) == len(r.df("frames"))  # 4 frames a video, all under the bound
        assert r.df("runs").run_id.nunique() == 1
        # a local folder's connection keeps DuckDB's threads (a bucket's gets more: test_buckets)
        import duckdb

        assert r.sql("SELECT current_setting('threads')").fetchall() == \
            duckdb.connect().sql("SELECT current_setting('threads')").fetchall()


def test_mtime_keeps_its_nanoseconds_in_the_files_and_its_time_zone_in_pandas(outputs, synthetic_clips):
    # written through a float, it kept microseconds only; and pandas got the views' TIMESTAMPTZ_NS
    # without its time zone, so `processed_at - mtime` raised TypeError
    files = pd.concat([pd.read_parquet(path) for path in sorted((outputs / "videos").rglob("*.parquet"))])
    exact = {uri: Path(uri).stat().st_mtime_ns for uri in files.uri}
    assert {row.uri: row.mtime.value for row in files.itertuples()} == exact
    with results.open(str(outputs)) as r:
        videos = r.df("videos")
        ledger = dict(r.sql("SELECT uri, mtime_ns FROM ledger").fetchall())
    assert str(videos.mtime.dt.tz) in ("UTC", "Etc/UTC") and (videos.processed_at - videos.mtime).min().days >= 0
    assert ledger == exact


def test_a_missing_table_or_output_is_a_clear_error(outputs, tmp_path):
    with results.open(str(outputs)) as r, pytest.raises(results.ResultsError, match="no table 'shots'"):
        r.table("shots")
    missing = tmp_path / "empty"
    with pytest.raises(results.ResultsError, match=f"^{re.escape(str(missing))} does not exist: give the folder `vidlens run "):
        results.open(str(missing))  # (it said the folder held no vidlens tables)
    missing.mkdir()
    with pytest.raises(results.ResultsError, match="holds no vidlens tables"):
        results.open(str(missing))
    missing.rmdir()
    # the views in one's own DuckDB: a mistyped folder is refused, where its views were empty, and
    # so is a folder that holds no output (the source folder given for OUT)
    (tmp_path / "videos").mkdir()
    for path in (tmp_path / "empty", tmp_path / "videos"):
        with pytest.raises(ValueError, match="holds no vidlens outputs: check the path"):
            Store(str(path)).register_duckdb(duckdb.connect())


def test_a_new_output_whose_first_run_is_under_way_is_said_to_be_so(tmp_path, capsys):
    """A query while an output's first run was going said it "holds no vidlens tables" (check the
    path): its lock shows a run under way, whose first batch is to be waited for."""
    import platform

    from pipeline.compact import compact
    from pipeline.lock import OutputLock
    from workers.remote_copy import pid_space

    run_id = "20261207T000000000000Z-a1b2c3"
    for out in (str(tmp_path / "out"), "memory://vidlens-first-run/out"):
        said = f"{out} holds no vidlens outputs yet: its first run, run {run_id} (host {platform.node()}, pid "
        with OutputLock(Store(out), run_id):
            with pytest.raises(results.ResultsError, match=f"^{re.escape(said)}.* query it once its first batch is"):
                results.open(out)
            with pytest.raises(ValueError, match=f"^{re.escape(said)}.* run this command again once its first"):
                compact(out)
            if "://" not in out:
                assert main(["query", out, "select 1"]) == 2
                assert capsys.readouterr().err.startswith(f"vidlens: error: {said}")
                # a local lock's heartbeat is never refreshed: its live process holds it, however long
                lock = tmp_path / "out" / "_vidlens" / "lock"
                lock.write_text(json.dumps({**json.loads(lock.read_text()), "heartbeat": 0}))
                with pytest.raises(results.ResultsError, match=f"^{re.escape(said)}"):
                    results.open(out)
    # a lock file left by a job killed before its first batch (its pid dead) is no run under way
    left = tmp_path / "left" / "_vidlens" / "lock"
    left.parent.mkdir(parents=True)
    left.write_text(json.dumps({"host": platform.node(), "pid": 2**22 + 12345, "pids": pid_space(), "run_id": run_id,
                                "heartbeat": time.time()}))
    with pytest.raises(results.ResultsError, match="holds no vidlens tables: expected folders"):
        results.open(str(tmp_path / "left"))
    # (mutation review) one of another pid namespace on this host name (a container beside this one): its pid
    # names no process here, and its heartbeat holds it, as it does for a job taking the lock
    other = tmp_path / "other" / "_vidlens" / "lock"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"host": platform.node(), "pid": 2**22 + 12345, "pids": "another-namespace",
                                 "run_id": run_id, "heartbeat": time.time()}))
    with pytest.raises(results.ResultsError, match=f"holds no vidlens outputs yet: its first run, run {run_id} "):
        results.open(str(tmp_path / "other"))


def test_a_lock_no_job_holds_now_or_that_cannot_be_read_leaves_the_message_as_it_was(monkeypatch):
    """(mutation review) A bucket's lock without a heartbeat for longer than a job waits is a
    killed job's, no first run under way; and a lock the store fails to read, with an error of
    its own (no OSError), leaves the reader's message as it was, not a traceback."""
    from pipeline.lock import OutputLock

    out = "memory://vidlens-no-run-under-way/out"
    store = Store(out)
    killed = {"host": "elsewhere", "pid": 7, "pids": "", "run_id": "20261207T000000000000Z-a1b2c3", "heartbeat": 0}
    store.fs.pipe_file(store.path("_vidlens", "lock"), json.dumps(killed).encode())
    with pytest.raises(results.ResultsError, match=f"^{re.escape(out)} holds no vidlens tables: expected folders"):
        results.open(out)
    store.fs.pipe_file(store.path("_vidlens", "lock"), json.dumps({**killed, "heartbeat": time.time()}).encode())

    def unreadable(self):
        raise type("StoreError", (Exception,), {})("the store's own error")

    monkeypatch.setattr(OutputLock, "_read_holder", unreadable)
    with pytest.raises(results.ResultsError, match=f"^{re.escape(out)} holds no vidlens tables: expected folders"):
        results.open(out)


def test_a_views_columns_are_in_the_declared_order_over_files_written_before_a_column(tmp_path, synthetic_clips):
    """In a view whose first file predated a column (texts.line_index, videos.hdr), that column
    came after the file's last ones (texts: after box): union_by_name orders them as the first
    file has them. The declared order (schemas/tables.py), then the embedding, then run_date."""
    from schemas.tables import table_schema

    clip = tmp_path / "videos" / "text.mp4"
    clip.parent.mkdir()
    clip.write_bytes((synthetic_clips / "text.mp4").read_bytes())
    config = RunConfig.from_dict({"stages": ["ocr"], "sampling": {"num_frames": 2},
                                  "resources": {"executor": "local"}})
    assert run_job(str(clip.parent), str(tmp_path / "out"), config, progress=False).exit_code == 0
    added = {"texts": ["line_index"], "videos": ["hdr", "pixel_aspect"]}  # (SCHEMA_VERSION 3 and 2)
    for table, columns in added.items():
        files = list((tmp_path / "out" / table).rglob("*.parquet"))
        assert files
        for path in files:  # as an earlier version wrote them
            pq.write_table(pq.read_table(path).drop_columns(columns), path)
    with results.open(str(tmp_path / "out")) as r:
        assert r.df("texts").line_index.isna().all() and len(r.df("texts"))
        for table in TABLES:
            for view in (table, f"{table}_history"):
                declared = table_schema(table).names
                extra = ["embedding"] if "embedding" in r.sql(f"SELECT * FROM {view}").columns else []
                assert r.sql(f"SELECT * FROM {view}").columns == [*declared, *extra, "run_date"], view


def test_a_folder_or_file_inside_an_output_is_refused_naming_the_output(outputs, capsys):
    # as `pd.read_parquet("out/labels")` reads it: "out/labels holds no vidlens tables: expected folders such as
    # out/labels/videos", and a Parquet file was "a file, not a folder: name a folder (a run ... creates it)"
    part = next((outputs / "labels").rglob("*.parquet"))
    for path in (outputs / "labels", part.parent, part):
        with pytest.raises(results.ResultsError) as refused:
            results.open(str(path))
        assert (f"is inside the output {outputs} (its labels folder): give the output folder itself, {outputs}, "
                "where each table is a view (SELECT count(*) FROM labels)") in str(refused.value)
    assert main(["query", str(outputs / "videos"), "SELECT count(*) FROM videos"]) == 2
    assert "(SELECT count(*) FROM videos)" in capsys.readouterr().err
    assert main(["search", str(outputs / "segments"), "a red scene"]) == 2
    assert f"{outputs / 'segments'} is inside the output {outputs} (its segments folder)" in capsys.readouterr().err


def test_query_prints_a_table(outputs, capsys):
    assert main(["query", str(outputs), "SELECT kind, count(*) AS n FROM labels GROUP BY kind ORDER BY kind"]) == 0
    shown = capsys.readouterr().out
    assert "object" in shown and "scene" in shown and "│" in shown


def test_query_shows_the_rows_asked_for_and_takes_format_table_as_said(outputs, tmp_path, capsys):
    # --max-rows is how many rows the table shows (40 unless given); `--format table` is the default, said
    sql = "SELECT * FROM range(100) t(n)"

    def shown(max_rows: int) -> list[int]:
        lines = capsys.readouterr().out.splitlines()
        assert lines[-1] == f"(the first {max_rows} rows: more with --max-rows, every one with --format csv)"
        return [int(line.strip("│ ")) for line in lines if line.strip("│ ").isdigit()]

    assert main(["query", str(outputs), sql, "--max-rows", "5"]) == 0
    assert shown(5) == [0, 1, 2, 3, 4]
    assert main(["query", str(outputs), sql, "--format", "table"]) == 0
    assert shown(40) == list(range(40))
    assert main(["query", str(outputs), "SELECT * FROM range(5) t(n)", "--max-rows", "2"]) == 0
    assert shown(2) == [0, 1]  # (DuckDB's own cut showed all 5)
    assert main(["query", str(outputs), "SELECT * FROM range(5) t(n)", "--max-rows", "5"]) == 0
    assert "first" not in capsys.readouterr().out
    # a .pq file is Parquet too, as a .jsonl one is JSON lines
    assert main(["query", str(outputs), sql, "--output", str(tmp_path / "n.pq")]) == 0
    assert pq.read_table(tmp_path / "n.pq").num_rows == 100
    assert main(["query", str(outputs), sql, "--output", str(tmp_path / "n.jsonl")]) == 0
    assert len((tmp_path / "n.jsonl").read_text().splitlines()) == 100


def test_query_output_that_cannot_be_a_file_is_named_with_what_to_do(outputs, tmp_path, capsys, monkeypatch):
    # DuckDB's COPY said "query over OUT: IO Error: Cannot open file ...", as if the SQL were wrong
    (tmp_path / "afile").write_text("")
    assert main(["query", str(outputs), "SELECT 1 AS n", "--output", str(tmp_path / "afile" / "n.csv")]) == 2
    assert f"--output {tmp_path / 'afile' / 'n.csv'}: {tmp_path / 'afile'} is a file, not a folder" in \
        capsys.readouterr().err
    assert main(["query", str(outputs), "SELECT 1 AS n", "--format", "csv", "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a folder: name a file, e.g. {tmp_path / 'result.csv'}" in capsys.readouterr().err
    # a folder not there yet is made, as for --summary-json
    assert main(["query", str(outputs), "SELECT 1 AS n", "--output", str(tmp_path / "new" / "n.csv")]) == 0
    assert (tmp_path / "new" / "n.csv").read_text() == "n\n1\n"
    # a bucket URL is no local file: it made a local folder "s3:", then DuckDB tried to download its
    # httpfs extension (or wrote through the output's own bucket, where the output was one)
    monkeypatch.chdir(tmp_path)
    assert main(["query", str(outputs), "SELECT 1 AS n", "--output", "s3://bucket/n.csv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--output s3://bucket/n.csv is a URL: give a local file, then copy it" in err
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_query_writes_csv_json_and_parquet(outputs, tmp_path, fmt):
    target = tmp_path / f"videos.{fmt}"
    sql = "SELECT uri, duration_s FROM videos ORDER BY uri;"
    assert main(["query", str(outputs), sql, "--format", fmt, "--output", str(target)]) == 0
    if fmt == "csv":
        table = pd.read_csv(target)
    elif fmt == "json":
        table = pd.DataFrame([json.loads(line) for line in target.read_text().splitlines()])
    else:
        table = pq.read_table(target).to_pandas()
    assert list(table.columns) == ["uri", "duration_s"] and len(table) == 3
    assert table.uri.iloc[0].endswith("cuts.mp4")


def test_query_csv_goes_to_stdout_and_bad_sql_names_the_views(outputs, capfd):
    assert main(["query", str(outputs), "SELECT count(*) AS n FROM segments", "--format", "csv"]) == 0
    assert capfd.readouterr().out.splitlines() == ["n", "3"]
    assert main(["query", str(outputs), "SELECT * FROM shots"]) == 2
    error = capfd.readouterr().err
    assert "shots" in error and "videos" in error and "_history" in error


@pytest.mark.parametrize("sql", COMMENTED_SQL)
@pytest.mark.parametrize("fmt", ["table", "csv", "parquet"])
def test_query_takes_sql_that_ends_in_a_comment(outputs, tmp_path, capfd, fmt, sql):
    target = tmp_path / "videos.parquet"
    written = ["--format", fmt] + (["--output", str(target)] if fmt == "parquet" else [])
    assert main(["query", str(outputs), sql, *written]) == 0, capfd.readouterr().err
    shown = capfd.readouterr().out
    if fmt == "table":
        assert shown.count("a;--b") == 3
    elif fmt == "csv":
        lines = shown.splitlines()
        assert lines[0] == "uri,note" and len(lines) == 4 and all(line.endswith(",a;--b") for line in lines[1:])
    else:
        assert pq.read_table(target).column("note").to_pylist() == ["a;--b"] * 3
    # a comment left open is still DuckDB's error, not cut away
    assert main(["query", str(outputs), "SELECT uri FROM videos /* left open", *written]) == 2
    assert "unterminated /* comment" in capfd.readouterr().err


@pytest.mark.parametrize("sql", COMMENTED_SQL)
def test_export_takes_sql_that_ends_in_a_comment(outputs, tmp_path, sql):
    with results.open(str(outputs)) as r:
        for fmt in results.EXPORT_FORMATS:
            r.export(sql, fmt, str(tmp_path / f"videos.{fmt}"))
    assert pd.read_csv(tmp_path / "videos.csv").note.tolist() == ["a;--b"] * 3
    lines = (tmp_path / "videos.json").read_text().splitlines()
    assert [json.loads(line)["note"] for line in lines] == ["a;--b"] * 3
    assert pq.read_table(tmp_path / "videos.parquet").column("note").to_pylist() == ["a;--b"] * 3


def test_a_reader_that_stops_early_ends_the_query_quietly(outputs):
    command = [sys.executable, "-m", "pipeline", "query", str(outputs), "SELECT * FROM range(2000000)",
               "--format", "csv"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=Path(__file__).parents[1]) as query:
        assert query.stdout.readline() == b"range\n"
        query.stdout.close()  # as `| head -1` does, long before the 2 million rows are written
        error = query.stderr.read().decode()
        code = query.wait(timeout=120)
    # 128 + SIGPIPE, as a shell reports it; 2 is for bad input
    assert code == 141 and "error" not in error and "Traceback" not in error, error


def test_query_of_nothing_to_show_and_bad_counts_are_refused_in_one_line(outputs, tmp_path, capfd):
    from pipeline.compact import compact

    for sql in ("", "-- only a comment"):
        assert main(["query", str(outputs), sql]) == 2
        assert "the SQL holds no query to show: give one" in capfd.readouterr().err
    # --output without --format: the format its name ends with
    assert main(["query", str(outputs), "SELECT 1 AS one", "--output", str(tmp_path / "one.CSV")]) == 0
    assert (tmp_path / "one.CSV").read_text().splitlines() == ["one", "1"]
    assert main(["query", str(outputs), "SELECT 1 AS one", "--output", str(tmp_path / "one.txt")]) == 2
    assert "--output " + str(tmp_path / "one.txt") + ": name a .csv, .json or .parquet file" in capfd.readouterr().err
    assert main(["query", str(outputs), "SELECT 1", "--format", "table", "--output", str(tmp_path / "t.csv")]) == 2
    assert "--output needs --format csv, json or parquet" in capfd.readouterr().err  # (as asked: not a CSV)
    assert not (tmp_path / "t.csv").exists()
    for sql, fmt in (("", "csv"), ("-- only a comment", "json")):  # a parser error on a COPY never written
        assert main(["query", str(outputs), sql, "--format", fmt]) == 2
        error = capfd.readouterr().err
        assert f"the SQL holds no query to write as {fmt}" in error and "COPY" not in error
    for command in (["query", str(outputs), "SELECT 1", "--max-rows", "0"],
                    ["report", str(outputs), "--html", str(tmp_path / "r"), "--max-videos", "-1"],
                    ["compact", str(outputs), "--rows-per-file", "0"]):
        with pytest.raises(SystemExit) as refused:
            main(command)
        assert refused.value.code == 2 and "at least 1" in capfd.readouterr().err
    with pytest.raises(ValueError, match="at least 1"):
        compact(str(outputs), rows_per_file=-5)  # (it published every table empty)
    assert main(["query", str(outputs), "SELECT count(*) AS n FROM videos", "--format", "csv"]) == 0
    assert capfd.readouterr().out.splitlines() == ["n", "3"]


def test_query_and_api_over_an_s3_bucket(outputs, monkeypatch, capfd):
    from tests.s3server import s3_server

    with s3_server() as s3:
        fs = s3.filesystem()
        fs.put(str(outputs), f"{s3.bucket}/out", recursive=True)
        url = f"s3://{s3.bucket}/out"
        with results.open(url, s3.storage_options) as r:
            assert len(r.df("videos")) == 3
            local = results.open(str(outputs))
            assert sorted(r.df("captions").caption) == sorted(local.df("captions").caption)
            local.close()
        # the keys from the environment, the endpoint from the same flag `vidlens run` takes
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        assert main(["query", url, "SELECT count(*) AS n FROM labels_history", "--format", "csv",
                     "--endpoint-url", s3.endpoint_url]) == 0
        with results.open(str(outputs)) as local:
            expected = local.sql("SELECT count(*) FROM labels_history").fetchall()[0][0]
        assert capfd.readouterr().out.splitlines() == ["n", str(expected)]


def test_search_scores_equal_the_match_stage_similarities(outputs):
    with results.open(str(outputs)) as r:
        found = r.search(QUERIES[0], top=10)
        matches = r.sql(f"SELECT video_id, similarity FROM matches WHERE level = 'video' "
                        f"AND query = '{QUERIES[0]}'").df()
    scored = found.merge(matches, on="video_id")
    assert len(scored) == 3
    assert (scored.score - scored.similarity).abs().max() < 1e-5


def test_a_query_is_one_statement_its_errors_quote_it_as_written_and_a_path_opens(outputs, capfd):
    """Found in review: table format ran several statements and showed the last, dropping the
    others' results without a word (csv refused the same SQL); an error in an exported query
    quoted the COPY it was wrapped in, with a temp path and the wrong line; a function's name
    got the list of views as its hint; `results.open(Path)` raised TypeError."""
    two = "SELECT count(*) AS videos FROM videos; SELECT count(*) AS errors FROM errors"
    for fmt in ("table", "csv"):
        assert main(["query", str(outputs), two, "--format", fmt]) == 2
        assert "the SQL holds 2 statements: give one query" in capfd.readouterr().err
    for sql in ("SELECT uri FROM videos WHERE", "SELEC uri FROM videos"):
        for fmt in ("table", "json"):
            assert main(["query", str(outputs), sql, "--format", fmt]) == 2
            error = capfd.readouterr().err
            assert "LINE 1:" in error and "COPY" not in error and "result." not in error, error
    assert main(["query", str(outputs), "SELECT no_such_function(uri) FROM videos"]) == 2
    assert "the views are" not in capfd.readouterr().err
    assert main(["query", str(outputs), "SELECT * FROM no_such_view"]) == 2
    assert "the views are: videos" in capfd.readouterr().err
    with results.open(Path(outputs)) as r:
        assert r.query("SELECT count(*) FROM videos; -- how many").fetchall() == [(3,)]


def test_export_makes_its_folder_and_names_a_path_it_cannot_write(outputs, tmp_path):
    # DuckDB's COPY said "IO Error: Cannot open file" for both, as `vidlens query --output` once did
    with results.open(str(outputs)) as r:
        r.export("SELECT 1 AS n", "csv", str(tmp_path / "new" / "n.csv"))
        (tmp_path / "afile").write_text("")
        with pytest.raises(results.ResultsError, match=f"export to {tmp_path / 'afile' / 'n.csv'}: "
                                                       f"{tmp_path / 'afile'} is a file, not a folder"):
            r.export("SELECT 1 AS n", "csv", str(tmp_path / "afile" / "n.csv"))
    assert (tmp_path / "new" / "n.csv").read_text() == "n\n1\n"


def test_an_empty_output_file_is_refused_and_nothing_is_written(outputs, tmp_path, monkeypatch, capsys):
    # an unset variable: the query showed its table and wrote no file; export's COPY TO '' wrote data_0.csv here
    monkeypatch.chdir(tmp_path)
    assert main(["query", str(outputs), "SELECT 1 AS n", "--output", ""]) == 2
    said = capsys.readouterr()
    assert said.err.strip() == ("vidlens: error: --output is empty: name a file, e.g. result.csv (or leave --output "
                                "out to see a table)") and not said.out
    with results.open(str(outputs)) as r, pytest.raises(results.ResultsError, match="^export to is empty: name a "
                                                                                    "file, e.g. result.csv$"):
        r.export("SELECT 1 AS n", "csv", "")
    assert not list(tmp_path.iterdir())


def _strict(line: str) -> dict:
    """A JSON line parsed as JSON defines it: NaN and Infinity refused, as jq and JSON.parse refuse them."""
    def refuse(word: str) -> None:
        raise ValueError(f"{word} is no JSON: {line}")
    return json.loads(line, parse_constant=refuse)


def test_json_writes_nan_and_infinity_as_null_in_lists_and_structs_too(outputs, tmp_path, capfd):
    # DuckDB's JSON wrote NaN and Infinity, which strict parsers refuse (`vidlens query ... | jq` stopped there)
    sql = ("SELECT uri, 'nan'::DOUBLE AS a, -'inf'::FLOAT AS b, [1.5, 'inf'::DOUBLE] AS l, "
           "{'x': 'nan'::FLOAT, 'y z': [[2.5::DOUBLE, 'nan']]} AS s, 'NaN' AS t, fps FROM videos ORDER BY uri LIMIT 1")
    assert main(["query", str(outputs), sql, "--format", "json"]) == 0
    written = _strict(capfd.readouterr().out)
    with results.open(str(outputs)) as r:
        first = r.sql("SELECT uri, fps FROM videos ORDER BY uri LIMIT 1").fetchall()[0]
        r.export(sql, "json", str(tmp_path / "rows.json"))
    assert written == {"uri": first[0], "a": None, "b": None, "l": [1.5, None], "s": {"x": None, "y z": [[2.5, None]]},
                       "t": "NaN", "fps": first[1]}
    assert [_strict(line) for line in (tmp_path / "rows.json").read_text().splitlines()] == [written]
    # csv and parquet keep the values: their readers take nan and inf
    assert main(["query", str(outputs), "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b", "--format", "csv"]) == 0
    assert capfd.readouterr().out.splitlines() == ["a,b", "nan,inf"]


def test_a_statement_other_than_a_query_is_written_as_its_table_shows_it(outputs, tmp_path, capfd):
    # COPY takes only a query: csv and json said "syntax error at or near SET" on a line the user never wrote
    assert main(["query", str(outputs), "SET threads=1", "--format", "csv"]) == 0
    assert capfd.readouterr().out.splitlines() == ["Success"]
    assert main(["query", str(outputs), "PRAGMA table_info('videos')", "--format", "json"]) == 0
    columns = [_strict(line)["name"] for line in capfd.readouterr().out.splitlines()]
    assert columns[:2] == ["video_id", "run_id"] and "uri" in columns
    with results.open(str(outputs)) as r:
        r.export("EXPLAIN SELECT count(*) FROM videos", "parquet", str(tmp_path / "plan.parquet"))
        assert "vidlens_exported_rows" not in r.sql("SHOW TABLES").df().name.tolist()
    assert pq.read_table(tmp_path / "plan.parquet").column_names == ["explain_key", "explain_value"]
