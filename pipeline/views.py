"""The DuckDB views of an output: each table's current rows and its history, and the ledger.

`register_views` (`Store.register_duckdb`) is how every reader sees an output: the query and
search commands, the report, `pipeline.results` and a user's own DuckDB connection.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.ledger import ATTEMPTS, ATTEMPTS_SCHEMA, unit_of
from pipeline.read_ahead import READS_AT_ONCE
from schemas.tables import TABLES, table_schema

if TYPE_CHECKING:
    from pipeline.snapshot import State
    from pipeline.store import Store

#: threads at least of a DuckDB connection reading an output on a bucket (`register_views`): as
#: many as the reads compact and forget keep under way.
REMOTE_THREADS = READS_AT_ONCE


def register_views(store: "Store", con: Any) -> list[str]:
    """Create the views of `store`'s output on a DuckDB connection; returns their names.

    For every table: `<table>` holds each video's current rows (those of the run the
    ledger names for the table's unit; for errors, the video's last attempt; for runs,
    every run, once: its final row, else the row it opened with) and `<table>_history` every
    run's rows, keeping for each video and run date only those of the latest run of that date
    that recomputed the table's unit (`_history_sql`). Both have a `run_date` column. Also `ledger`.
    A path where nothing was ever published is refused (a typo would give empty views).

    On a bucket the connection is given at least `REMOTE_THREADS` threads: DuckDB reads the
    footer of every file of a view as it creates it (its columns, `union_by_name`), one file
    a thread, and each read waits a round trip. And DuckDB keeps the blocks it read of remote
    files without checking them again (`validate_external_file_cache`; on the connection's
    database, for every remote file it reads): it cannot tell whether a file read through
    fsspec changed, so it read each again for every view that names it (every history view
    names the attempts) and for every query. An output's files never change once published.
    """
    store.require_outputs()
    if not store.is_local:
        con.register_filesystem(for_duckdb(store.fs))
        threads = con.sql("SELECT current_setting('threads')").fetchall()[0][0]
        con.execute(f"SET threads = {max(int(threads), REMOTE_THREADS)}")
        _cache_without_checks(con)
    state = store.state(entries=False)
    con.register("_vidlens_ledger", store.ledger(state))
    dates = pa.table({"run_id": list(state.run_dates),
                      "run_date": pa.array(list(state.run_dates.values()), pa.string())})
    con.register("_vidlens_run_dates", dates)
    con.execute("CREATE OR REPLACE VIEW ledger AS SELECT * FROM _vidlens_ledger")
    con.execute(f"CREATE OR REPLACE VIEW _vidlens_attempts AS SELECT a.video_id, a.run_id, a.units, "
                f"CAST(d.run_date AS DATE) AS run_date FROM ({_rows_sql(store, con, ATTEMPTS, state)}) a "
                f"JOIN _vidlens_run_dates d ON a.run_id = d.run_id")
    names = ["ledger"]
    tables = list(dict.fromkeys([*TABLES, *sorted({r["table"] for r in state.files.values()} - {ATTEMPTS})]))
    rows_of = {table: _rows_sql(store, con, table, state) for table in tables}  # (errors': videos' too)
    for table in tables:
        rows = rows_of[table]
        # (videos.mtime as TIMESTAMPTZ: DuckDB hands a TIMESTAMPTZ_NS to pandas without its time
        # zone, and `processed_at - mtime` failed there; the ledger's mtime_ns keeps nanoseconds)
        columns = "r.* REPLACE (CAST(r.mtime AS TIMESTAMPTZ) AS mtime)" if table == "videos" else "r.*"
        dated = (f"SELECT {columns}, CAST(d.run_date AS DATE) AS run_date FROM ({rows}) r "
                 f"JOIN _vidlens_run_dates d ON r.run_id = d.run_id")
        if table == "runs":
            # a run's opening row (no finish) until its final one is published; one that never
            # was, where a later run started, was interrupted (killed, or its machine lost)
            history = latest = (
                f"SELECT * REPLACE (CASE WHEN finished_at IS NULL AND run_id < max(run_id) OVER () "
                f"THEN 'interrupted' ELSE status END AS status) FROM ({dated}) "
                f"QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY finished_at DESC NULLS LAST) = 1")
        else:
            history = _history_sql(dated, unit_of(table))
            column = "last_run_id" if table == "errors" else f"{unit_of(table)}_run_id"
            latest = (f"SELECT t.* FROM ({dated}) t SEMI JOIN _vidlens_ledger c "
                      f"ON t.video_id = c.video_id AND t.run_id = c.{column}")
            if table == "videos":
                latest = _videos_status_now(dated, rows_of["errors"])
        con.execute(f'CREATE OR REPLACE VIEW "{table}_history" AS {history}')
        con.execute(f'CREATE OR REPLACE VIEW "{table}" AS {latest}')
        names += [table, f"{table}_history"]
    return names


def _cache_without_checks(con: Any) -> None:
    """DuckDB's cache of remote files' blocks, kept without checking them (see `register_views`)."""
    import duckdb

    try:
        con.execute("SET validate_external_file_cache = 'NO_VALIDATION'")
    except duckdb.Error:  # (a DuckDB before its external file cache, 1.3: nothing kept to check)
        pass


def _as_read(schema: pa.Schema) -> pa.Schema:
    """`schema` with the types DuckDB reads from its Parquet files: a fixed-size list (a box, an
    embedding) is a list there, and a union with FLOAT[8] made it one."""
    return pa.schema([pa.field(f.name, pa.list_(f.type.value_type), f.nullable)
                      if pa.types.is_fixed_size_list(f.type) else f for f in schema], metadata=schema.metadata)


def _history_sql(dated: str, unit: str | None) -> str:
    """Per video and run date, the rows of the latest run of that date that recomputed `unit`
    for the video (None: that attempted it, for errors), and none where that run wrote none.

    The attempts join the rows as rows of their own, so that a run that wrote rows without
    recording attempts (one from before they were recorded) still counts as it did.
    """
    recomputed = "" if unit is None else f" WHERE list_contains(units, '{unit}')"
    return (f"SELECT * EXCLUDE (_attempt) FROM (SELECT *, false AS _attempt FROM ({dated}) UNION ALL BY NAME "
            f"SELECT video_id, run_id, run_date, true AS _attempt FROM _vidlens_attempts{recomputed}) "
            f"QUALIFY NOT _attempt AND run_id = max(run_id) OVER (PARTITION BY video_id, run_date)")


def _videos_status_now(dated: str, errors: str) -> str:
    """The current `videos` rows with the status the ledger gives each video now: a stage that
    failed and was retried alone since its core rows were written (or failed on a later retry)
    changed it. A video gone from the source (its ledger status `missing`) has the status its last
    attempt gave it: its core row's where that attempt wrote it, else partial where the attempt
    left errors rows (each attempt retries every unit that failed before). Its core row's status
    was shown: "partial" for a video fixed since, "ok" beside the errors of its last attempt.
    `errors`: the SQL of the errors table's rows (its view is made after this one)."""
    return (f"SELECT t.* REPLACE (CASE WHEN c.status = 'ok' THEN 'ok' WHEN c.status IN ('partial', 'failed') "
            f"THEN 'partial' WHEN c.last_run_id = c.core_run_id OR c.last_run_id IS NULL THEN t.status "
            f"WHEN EXISTS (SELECT 1 FROM ({errors}) e WHERE e.video_id = c.video_id AND e.run_id = c.last_run_id) "
            f"THEN 'partial' ELSE 'ok' END AS status) FROM ({dated}) t "
            f"JOIN _vidlens_ledger c ON t.video_id = c.video_id AND t.run_id = c.core_run_id")


def for_duckdb(fs: Any) -> Any:
    """`fs` as DuckDB should read through it.

    gcsfs (2026.10 and later) gives every file it opens a background prefetcher ("adaptive"
    cache). DuckDB reads the byte ranges it needs itself and drops its files without closing
    them, so each dropped file left a pending task behind ("ERROR asyncio: Task was destroyed
    but it is pending!", a line per file on every query of a gs:// output). DuckDB's reads of
    a gs:// output go through the plain "readahead" cache instead, as s3fs's do by default.
    """
    from pipeline.output_files import protocols_of

    if not set(protocols_of(fs)) & {"gs", "gcs"}:
        return fs
    return _readahead_class(type(fs))(*fs.storage_args, **fs.storage_options)


@functools.cache
def _readahead_class(cls: type) -> type:
    """`cls` opening its files with the "readahead" cache unless told otherwise."""

    class Readahead(cls):
        def _open(self, path, mode="rb", *args, **kwargs):
            kwargs.setdefault("cache_type", "readahead")
            return super()._open(path, mode, *args, **kwargs)

    Readahead.__name__ = Readahead.__qualname__ = f"Readahead{cls.__name__}"
    return Readahead


def _rows_sql(store: "Store", con: Any, table: str, state: "State") -> str:
    files = store.committed_files(table, state)
    try:
        empty = _as_read(ATTEMPTS_SCHEMA if table == ATTEMPTS else table_schema(table)).empty_table()
    except KeyError:  # a table this version does not know (a later one's)
        empty = None
    if empty is not None:
        con.register(f"_vidlens_empty_{table}", empty)
    if files:
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        # hive_partitioning off: run_date comes from the manifests, not a second path column
        read = f"SELECT * FROM read_parquet([{listed}], union_by_name = true, hive_partitioning = false)"
        # a column added since (`SCHEMA_VERSION`) is null in the files written before it, and
        # there where no file has it yet: union_by_name knows only the columns the files have.
        # The declared columns first, in their order: union_by_name orders them as the first file
        # has them, and one added since came after those of a file written before it
        return read if empty is None else f'SELECT * FROM "_vidlens_empty_{table}" UNION ALL BY NAME {read}'
    if empty is None:
        return "SELECT NULL::VARCHAR AS video_id, NULL::VARCHAR AS run_id WHERE false"
    return f'SELECT * FROM "_vidlens_empty_{table}"'
