"""The `vidlens query`, `vidlens search` and `vidlens report` subcommands (their flags added by
`pipeline.arguments`, run by `pipeline.cli`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

#: the subcommands this module adds.
COMMANDS = ("query", "search", "report")


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the flag when it fails)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_commands(commands: Any) -> None:
    """Add the three subcommands to the CLI's subparsers."""
    query = commands.add_parser("query", help="SQL (DuckDB) over the output tables")
    query.add_argument("out", help="output folder or bucket URL (what `vidlens run --out` wrote)")
    query.add_argument("sql", help="SQL over the views: <table> (each video's latest results) and "
                                   "<table>_history (every run date), e.g. "
                                   "\"SELECT label, count(*) FROM labels GROUP BY 1\"")
    query.add_argument("--format", choices=("table", "csv", "json", "parquet"),
                       help="table on screen (default), or csv / json (one object per line) / parquet")
    query.add_argument("--output", metavar="FILE",
                       help="write csv/json/parquet to FILE (csv/json default: stdout); without --format, the "
                            "format FILE's name ends with (.csv, .json, .parquet)")
    query.add_argument("--max-rows", type=at_least_one, default=40, help="rows shown in table format (default 40)")
    _add_storage(query)

    search = commands.add_parser("search", help="rank videos or segments by similarity to a text")
    search.add_argument("out", help="output folder or bucket URL")
    search.add_argument("text", help="what to look for, e.g. \"a child reading a book\"")
    search.add_argument("--top", type=int, default=10, help="how many results (default 10)")
    search.add_argument("--level", choices=("video", "segment"), default="video", help="rank videos or shots")
    search.add_argument("--model", help="a local copy of the embed model the runs recorded (default: that model)")
    search.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (an Apple GPU)")
    search.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _add_storage(search)

    report = commands.add_parser("report", help="write a static HTML report (index + a page per video)")
    report.add_argument("out", help="output folder or bucket URL")
    report.add_argument("--html", required=True, metavar="DIR", help="folder to write the report into")
    report.add_argument("--max-videos", type=at_least_one, default=1000,
                        help="pages for at most this many videos (default 1000)")
    _add_storage(report)


def _add_storage(parser: argparse.ArgumentParser) -> None:
    """The run command's ways to reach a bucket: a config's `storage:` section and the same flags."""
    from pipeline.arguments import add_storage_arguments

    parser.add_argument("--config", help="YAML (or .toml) configuration whose `storage:` section reaches the bucket")
    add_storage_arguments(parser)
    # what `config_from_args` reads of the run command's flags
    parser.set_defaults(query=[], set=[])


def run_command(args: argparse.Namespace) -> int:
    """Run one of the subcommands; returns the exit code. Bad input raises ValueError (one line)."""
    import duckdb

    options = storage_options(args)
    try:
        if args.command == "query":
            return _query(args, options)
        if args.command == "search":
            return _search(args, options)
        return _report(args, options)
    except duckdb.Error as exc:
        hint = ""
        if isinstance(exc, duckdb.CatalogException) and str(exc).startswith("Catalog Error: Table"):
            from schemas.tables import TABLES

            # (not for a function's name: "the views are" said nothing of it)
            hint = f" (the views are: {', '.join(TABLES)}, each also as <table>_history, and ledger)"
        raise ValueError(f"{args.command} over {args.out}: {str(exc).strip()}{hint}") from exc


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """fsspec options for `args.out`, from the config file, the storage flags and the environment."""
    from pipeline.arguments import config_from_args
    from workers.redaction import register_secrets
    from workers.storage import store_of
    from workers.storage import storage_options as options_for

    # (search's --device is for its query, checked there: read as the config's models.device, a wrong
    # one was refused as "models.device: 'gpu' is not one of ...", a key the command has no flag for)
    read = argparse.Namespace(**{**vars(args), "device": None})
    config = config_from_args(read)
    args.anon = read.anon  # (set where the config file asks for it: a denied request is then told to drop it)
    register_secrets(config.storage, {store_of(args.out)})  # hidden from every message from here on
    return options_for(args.out, config.storage)


#: what `vidlens query --output FILE` writes, by FILE's suffix, where --format is not given.
_FORMATS_BY_SUFFIX = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
                      ".pq": "parquet"}


def _query(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from pipeline import results

    form = args.format
    if args.output == "":  # (an unset variable: the table was shown, and no file written)
        raise ValueError("--output is empty: name a file, e.g. result.csv (or leave --output out to see a table)")
    if args.output and form is None:  # the format its name ends with, else said
        form = _FORMATS_BY_SUFFIX.get(os.path.splitext(args.output)[1].lower())
        if form is None:
            raise ValueError(f"--output {args.output}: name a .csv, .json or .parquet file, or give --format "
                             "csv, json or parquet")
    elif args.output and form == "table":
        raise ValueError("--output needs --format csv, json or parquet (a table is shown on screen)")
    if args.output:  # (DuckDB's COPY said "IO Error: Cannot open file", as if the query were wrong)
        from pipeline.output_checks import check_file_path

        check_file_path(args.output, "--output", f"result.{form}")
    with results.open(args.out, options) as r:
        if form in (None, "table"):
            # the first --max-rows rows, read no further (DuckDB's own cut showed the first and
            # last halves, and up to 3 rows more than asked; it read and counted every row)
            first = r.query(args.sql).limit(args.max_rows + 1).to_arrow_table()
            r.con.from_arrow(first.slice(0, args.max_rows)).show(max_rows=args.max_rows, max_width=200)
            if first.num_rows > args.max_rows:
                print(f"(the first {args.max_rows} rows: more with --max-rows, every one with --format csv)")
        else:
            r.export(args.sql, form, args.output or "-")
    return 0


def _search(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from pipeline import results
    from pipeline.search import as_json_lines, render

    with results.open(args.out, options) as r:
        found = r.search(args.text, top=args.top, level=args.level, model=args.model, device=args.device)
    if args.format == "csv":
        print(found.to_csv(index=False), end="")
    elif args.format == "json":
        print(as_json_lines(found), end="")
    else:
        print(render(found))
    return 0


def _report(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from pipeline.report import write_report

    index = write_report(args.out, args.html, options, max_videos=args.max_videos)
    print(f"report written: {index}")
    return 0
