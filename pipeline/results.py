"""The Python API over a run's outputs: DuckDB views, pandas frames and text search.

    from pipeline import results
    r = results.open("out")                      # or "s3://bucket/out", storage_options={...}
    r.sql("SELECT label, count(*) FROM labels GROUP BY 1").df()
    r.df("captions")                             # one table, latest results of every video
    r.history("videos")                          # every run date's rows (its latest run's)
    r.search("a child reading a book", top=5)    # ranked videos (or level="segment")

Each table is a view named after it showing each video's latest results, and
`<table>_history` holds every run date's rows (per video and date, the latest run's; `runs`
lists every run). The views come from the output store (`pipeline.store.Store.register_duckdb`),
so the query command, the report and this API all agree on what "latest" means.
"""

from __future__ import annotations

import builtins
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd


#: formats `Results.export` (and `vidlens query --format`) writes.
EXPORT_FORMATS = ("csv", "json", "parquet")


class ResultsError(ValueError):
    """The output location holds no tables, or a table asked for does not exist."""


def connect_outputs(con: duckdb.DuckDBPyConnection, out: str,
                    storage_options: dict[str, Any] | None = None) -> list[str]:
    """Create the views of the outputs at `out` in `con`; returns the view names.

    For a bucket, the fsspec filesystem is registered with DuckDB (its `httpfs` extension
    would need a download), so DuckDB reads `s3://...` through s3fs with the same options.
    """
    from pipeline.sources import local_path
    from pipeline.store import NoOutputs, Store
    from workers.storage import is_remote

    _check_not_inside_an_output(out)
    store = Store(out, storage_options)
    try:
        views = store.register_duckdb(con)  # a mistyped bucket is named as one
    except NoOutputs:
        views = []
    if not views or not con.sql("SELECT (SELECT count(*) FROM ledger) + (SELECT count(*) FROM runs)").fetchall()[0][0]:
        if not is_remote(out) and not os.path.exists(local_path(out)):  # (a mistyped folder: said so, not "no tables")
            raise ResultsError(f"{out} does not exist: give the folder `vidlens run ... --out` wrote")
        if not views:  # a new output whose first run is under way: not a wrong path
            from pipeline.store import first_run_message

            running = first_run_message(store, "query it")
            if running:
                raise ResultsError(running)
        raise ResultsError(
            f"{out} holds no vidlens tables: expected folders such as {out.rstrip('/')}/videos "
            "written by `vidlens run ... --out` (check the path and, for a bucket, the storage options)"
        )
    return views


def _check_not_inside_an_output(out: str) -> None:
    """ResultsError where local `out` is a folder or file inside an output (a table's folder, one of
    its Parquet files), as `pd.read_parquet("out/labels")` reads it: it was said to hold no vidlens
    tables, "expected folders such as out/labels/videos", or to be a file a run would make a folder."""
    from pipeline.sources import local_path
    from pipeline.store import META
    from schemas.tables import TABLES
    from workers.storage import is_remote

    if is_remote(out):
        return
    given = local_path(out)
    path = Path(given).absolute()
    output = next((folder for folder in path.parents if (folder / META / "commits").is_dir()), None)
    if output is None or (path / META / "commits").is_dir():
        return
    folder = path.relative_to(output).parts[0]
    shown = output if os.path.isabs(given) else os.path.relpath(output)
    raise ResultsError(f"{out} is inside the output {shown} (its {folder} folder): give the output folder itself, "
                       f"{shown}, where each table is a view (SELECT count(*) FROM "
                       f"{folder if folder in TABLES else 'videos'})")


class Results:
    """The outputs of one location, opened for queries: a DuckDB connection with a view per table."""

    def __init__(self, out: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        out = os.fspath(out)
        self.out = out
        self.storage_options = storage_options
        self.con = duckdb.connect()
        self.views = connect_outputs(self.con, out, storage_options)

    @property
    def tables(self) -> list[str]:
        """The tables present (each also has a `<table>_history` view)."""
        return [v for v in self.views if not v.endswith("_history") and v != "ledger"]

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """A DuckDB relation for any SQL over the views (`.df()`, `.to_arrow_table()`, `.show()` on it; its
        `.arrow()` is a stream that holds the connection until it is read through)."""
        return self.con.sql(query)

    def query(self, sql: str, doing: str = "to show") -> duckdb.DuckDBPyRelation:
        """The relation of the one query `sql` holds (what `vidlens query` shows or writes), parsed
        and bound as written: its errors quote the user's SQL. ResultsError where it holds no query,
        or several statements (DuckDB would run each and return the last: the others' results
        were dropped without a word)."""
        return self._statement(query_body(sql), doing)[0]

    def _statement(self, body: str, doing: str) -> tuple[duckdb.DuckDBPyRelation, Any]:
        """`query`'s relation of `body`, and its statement's type (DuckDB's StatementType)."""
        statements = self.con.extract_statements(body) if body else []
        if len(statements) > 1:
            raise ResultsError(f"the SQL holds {len(statements)} statements: give one query, whose result is the one "
                               f"{doing} (a query can hold several with UNION ALL, or WITH ... AS)")
        if not statements:
            raise ResultsError(f"the SQL holds no query {doing}: give one, e.g. \"SELECT count(*) FROM videos\"")
        relation = self.con.sql(body)
        if relation is None:  # a statement that returns nothing
            raise ResultsError(f"the SQL returns no rows {doing}: give a query, e.g. \"SELECT count(*) FROM videos\"")
        return relation, statements[0].type

    def table(self, name: str) -> duckdb.DuckDBPyRelation:
        """The relation of one view: `videos` (latest results) or `videos_history` (every run date's)."""
        if name not in self.views:
            raise ResultsError(f"no table {name!r} in {self.out}; there are: {', '.join(self.views)}")
        return self.con.table(name)

    def df(self, name: str) -> pd.DataFrame:
        """One table's latest results as a pandas DataFrame."""
        return self.table(name).df()

    def history(self, name: str) -> pd.DataFrame:
        """Every run date's rows of one table (those of the date's latest run) as a pandas DataFrame."""
        if f"{name}_history" not in self.views:  # ("no table 'ledger_history'" named a table no one asked for)
            raise ResultsError(f"no history of {name!r} in {self.out}: the tables with one are "
                               f"{', '.join(self.tables)}" + (" (the ledger holds each video's entry now: "
                                                             "r.df('ledger'))" if name == "ledger" else ""))
        return self.table(f"{name}_history").df()

    def export(self, query: str, fmt: str, path: str) -> None:
        """Write the result of `query` to `path` ("-": standard output) as csv, json lines or parquet."""
        if fmt not in EXPORT_FORMATS:
            raise ResultsError(f"format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
        body = query_body(query)
        if not body:  # (wrapped in COPY, DuckDB's error showed SQL the user never wrote, a temp path in it)
            raise ResultsError(f"the SQL holds no query to write as {fmt}: give one, e.g. \"SELECT * FROM videos\"")
        # its errors as the user wrote it, before it is wrapped in COPY
        relation, kind = self._statement(body, f"to write as {fmt}")
        if kind != duckdb.StatementType.SELECT:
            # a PRAGMA, EXPLAIN, SET ... has run and returned rows, as a table shows them, but
            # COPY takes only a query ("syntax error at or near SET", on a line the user never wrote)
            self.con.register(_EXPORTED, relation.to_arrow_table())
            body = f"FROM {_EXPORTED}"
        if fmt == "json":
            body = _finite_json(body, relation.columns, relation.types)
        options = "FORMAT csv, HEADER true" if fmt == "csv" else f"FORMAT {fmt}"
        try:
            self._copy(body, options, fmt, path)
        finally:
            if kind != duckdb.StatementType.SELECT:
                self.con.unregister(_EXPORTED)

    def _copy(self, body: str, options: str, fmt: str, path: str) -> None:
        """COPY the query `body` to `path`, or to standard output by way of a temp file."""
        if path != "-":
            from pipeline.output_checks import check_file_path

            try:  # (DuckDB's COPY said "IO Error: Cannot open file" where the folder was missing or a file)
                check_file_path(path, "export to", f"result.{fmt}")
            except ValueError as exc:
                raise ResultsError(str(exc)) from None
            self.con.execute(f"COPY (\n{body}\n) TO '{_quoted(path)}' ({options})")
            return
        if fmt == "parquet":
            raise ResultsError("parquet is binary: give a file to write it to (--output FILE)")
        # DuckDB reopens the path it is given; /dev/stdout would start over a redirected file
        with tempfile.TemporaryDirectory() as folder:
            staged = os.path.join(folder, f"result.{fmt}")
            self.con.execute(f"COPY (\n{body}\n) TO '{_quoted(staged)}' ({options})")
            with builtins.open(staged, "rb") as handle:
                shutil.copyfileobj(handle, sys.stdout.buffer)
            sys.stdout.flush()

    def search(self, text: str, top: int = 10, level: str = "video", model: str | None = None,
               device: str = "auto") -> pd.DataFrame:
        """Videos or segments ranked by cosine similarity to `text` (see `pipeline.search`)."""
        from pipeline.search import search

        return search(self.con, text, top=top, level=level, model=model, device=device)

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __getattr__(self, name: str) -> duckdb.DuckDBPyRelation:
        # r.videos, r.labels_history: the views as attributes, for notebooks
        if name.startswith("_") or name not in self.__dict__.get("views", ()):
            raise AttributeError(name)
        return self.con.table(name)

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Results({self.out!r}, tables={self.tables})"


def open(out: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Results:  # noqa: A001 - results.open
    """Open the outputs at a folder or bucket URL for queries."""
    return Results(out, storage_options)


def query_body(sql: str) -> str:
    """The SQL without its trailing comments, semicolons and whitespace: a query to wrap in a subquery.

    DuckDB's tokenizer finds them, so a `;` or `--` inside a string literal or a comment
    within the query is left as it is.
    """
    end = len(sql)
    for start, kind in reversed(duckdb.tokenize(sql)):
        token = sql[start:end].strip()
        closed = kind == duckdb.token_type.comment and (token.startswith("--") or token.endswith("*/"))
        if not (closed or (kind == duckdb.token_type.operator and token == ";")):
            break
        end = start
    return sql[:end].strip()


#: the name the rows of an exported statement other than a query are registered under.
_EXPORTED = "vidlens_exported_rows"


def _finite_json(body: str, names: list[str], types: list[Any]) -> str:
    """`body` with every NaN and infinity, in lists and structs too, written as null.

    DuckDB's JSON writes them as NaN and Infinity, which JSON has no words for: jq, JSON.parse
    and most parsers other than Python's refuse the line.
    """
    columns = [_finite(f"#{i}", kind) for i, kind in enumerate(types, 1)]
    if all(column == f"#{i}" for i, column in enumerate(columns, 1)):
        return body
    named = (f"{column} AS {_identifier(name)}" for column, name in zip(columns, names))
    return f"SELECT {', '.join(named)} FROM (\n{body}\n)"


def _finite(value: str, kind: Any, depth: int = 1) -> str:
    """An expression of `value` (of DuckDB type `kind`) with its non-finite floats null; `value` where it has none."""
    parts = dict(kind.children) if kind.id in ("list", "array", "struct") else {}
    if kind.id in ("float", "double"):
        return f"CASE WHEN isfinite({value}) THEN {value} END"
    if kind.id in ("list", "array"):
        item = f"v{depth}"
        inner = _finite(item, parts["child"], depth + 1)
        return value if inner == item else f"list_transform({value}, lambda {item}: {inner})"
    if kind.id == "struct":
        fields = {name: _finite(_field(value, name), field, depth) for name, field in parts.items()}
        if all(field == _field(value, name) for name, field in fields.items()):
            return value
        packed = ", ".join(f"{_identifier(name)} := {field}" for name, field in fields.items())
        return f"CASE WHEN {value} IS NOT NULL THEN struct_pack({packed}) END"
    return value


def _field(value: str, name: str) -> str:
    """An expression of the field `name` of the struct `value`."""
    return f"struct_extract({value}, '{_quoted(name)}')"


def _identifier(name: str) -> str:
    """A name as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _quoted(path: str) -> str:
    """A path inside a single-quoted SQL string."""
    return path.replace("'", "''")
