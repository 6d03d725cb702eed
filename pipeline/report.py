"""A static HTML report of a run's outputs: an index and one page per video, readable offline.

    DIR/index.html                 runs, counts, charts (labels, durations, failures), videos, queries
    DIR/videos/<video_id>.html     contact sheet, shot timeline, labels and their time ranges,
                                   captions, on-screen text, query matches, errors
    DIR/thumbs/<video_id>/<frame_index>.jpg   the thumbnails table's JPEGs, written as files

Everything comes from the output tables (through `pipeline.results`), so a report of a
bucket needs no access to the videos. CSS, the one script and the SVG charts are inlined:
the pages load nothing from the network. Every text from the data is escaped, and file
names are built from video ids (hex) only, never from URIs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import results
from pipeline.ledger import BAD_FILE_TYPES, given_up_advice
from pipeline.report_charts import bar_chart, histogram
from pipeline.report_pages import html_page, html_section, html_table, seconds, utc, video_page
from pipeline.sources import local_path
from pipeline.store import META
from pipeline.summary import over_shot_bound_said
from schemas.config import IncrementalConfig, ShotsConfig
from schemas.tables import TABLES
from workers.frame_selection import OVER_SHOTS_MAX_FRAMES

#: a video's status in the report once it is gone from the source (the ledger's "missing").
MISSING = "missing from the source"
#: tables counted on the index page, in this order.
_COUNTED = ("videos", "segments", "frames", "labels", "captions", "matches", "texts", "thumbnails", "errors")
#: videos given up on named on the index (the rest counted).
_GIVEN_UP_NAMED = 200
#: videos past `shots.max_frames` named on the index (the rest counted).
_OVER_SHOT_BOUND_NAMED = 200
#: runs (the latest) and failures (the latest) listed on the index page.
_RUNS_SHOWN = 20
_FAILURES_SHOWN = 200


def write_report(out: str, html_dir: str | Path, storage_options: dict[str, Any] | None = None,
                 max_videos: int = 1000) -> Path:
    """Write the report of the outputs at `out` into `html_dir`; returns the index page's path."""
    from pipeline.output_checks import check_folder_path, make_folder

    what = f"report folder {str(html_dir)!r} (--html)"
    check_folder_path(str(html_dir), what, bucket_ok=False, made_by="the report")
    root = Path(html_dir)
    with results.open(out, storage_options) as r:  # an output that holds nothing is refused first
        _check_outside_output(root, out, what)
        make_folder(root, what)
        try:  # (a folder there that cannot be written was said to be one that "cannot be made")
            (root / "videos").mkdir(exist_ok=True)
            return _write_pages(r, out, root, max_videos)
        except OSError as exc:  # (a bare "[Errno 13] Permission denied: 'html/thumbs'" named no option)
            if not (exc.filename and Path(exc.filename).absolute().is_relative_to(root.absolute())):
                raise
            raise ValueError(f"{what} cannot be written ({exc.strerror or exc}: {exc.filename}): name a folder "
                             "this user can write") from None


def _check_outside_output(root: Path, out: str, what: str) -> None:
    """ValueError where the report would be written into the output itself: its pages landed in the
    output's `videos` folder, among its Parquet files, and `pd.read_parquet("out/videos")` failed on them."""
    from workers.storage import is_remote

    if is_remote(out):
        return
    given = local_path(out)
    output, folder = Path(given).resolve(), root.resolve()
    if folder == output or any(folder.is_relative_to(output / name) for name in (*TABLES, META)):
        where = "the output folder" if folder == output else "inside the output folder"
        # (a path, where the output was given as a file:// URL: --html takes no URL)
        raise ValueError(f"{what} is {where} {out}: its pages would be written among the output's Parquet files; "
                         f"name another folder, e.g. {os.path.join(given.rstrip('/'), 'report')}")


def _write_pages(r: results.Results, out: str, root: Path, max_videos: int) -> Path:
    """Write the index, the video pages and the thumbnails into `root`; returns the index page's path."""
    videos = _frame(r, "SELECT {columns} FROM videos ORDER BY uri, video_id LIMIT "
                    f"{int(max_videos)}", "videos", exclude=("embedding",))
    ids = list(videos.video_id)
    # a video gone from the source keeps its rows; its status says it is gone
    gone = {video_id for (video_id,) in r.con.execute(
        "SELECT video_id FROM ledger WHERE status = 'missing' AND list_contains($1, video_id)", [ids]).fetchall()}
    videos["status"] = [MISSING if video_id in gone else status
                        for video_id, status in zip(videos.video_id, videos.status)]
    pages = {video_id: _file_id(video_id) for video_id in ids}
    thumbs = _write_thumbnails(r, ids, pages, root)
    details = {table: _rows_of(r, table, ids) for table in ("segments", "labels", "captions", "texts",
                                                              "matches", "errors")}
    index = _index_page(r, out, videos, pages, thumbs, details, max_videos)
    (root / "index.html").write_text(index, encoding="utf-8")
    # split each table by video once, rather than filtering every table for every page
    by_video = {table: dict(tuple(frame.groupby("video_id"))) for table, frame in details.items()}
    for video in videos.itertuples(index=False):
        parts = {table: groups.get(video.video_id, details[table].iloc[:0]) for table, groups in by_video.items()}
        page = video_page(video, parts, thumbs.get(video.video_id, pd.DataFrame()))
        (root / "videos" / f"{pages[video.video_id]}.html").write_text(page, encoding="utf-8")
    _remove_stale(root, set(pages.values()), thumbs)
    return root / "index.html"


def _remove_stale(root: Path, pages: set[str], thumbs: dict[str, pd.DataFrame]) -> None:
    """Remove what an earlier report into the same folder wrote for videos this one leaves out:
    a forgotten video's page and thumbnails must not stay readable there (a takedown). Only the
    report's own names (hex) are touched."""
    written = {src for rows in thumbs.values() for src in rows["src"]}
    for page in (root / "videos").glob("*.html"):
        if _REPORT_NAME.fullmatch(page.stem) and page.stem not in pages:
            page.unlink()
    for folder in (root / "thumbs").glob("*"):
        if not (folder.is_dir() and _REPORT_NAME.fullmatch(folder.name)):
            continue
        for jpeg in folder.glob("*.jpg"):
            if jpeg.stem.isdigit() and f"thumbs/{folder.name}/{jpeg.name}" not in written:
                jpeg.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


# --- reading -------------------------------------------------------------------------------


def _frame(r: results.Results, sql: str, table: str, exclude: tuple[str, ...] = ()) -> pd.DataFrame:
    """Run `sql` with {columns} replaced by the table's columns less `exclude` (large vectors)."""
    columns = ", ".join(f'"{c}"' for c in r.table(table).columns if c not in exclude)
    return r.sql(sql.format(columns=columns)).df()


def _rows_of(r: results.Results, table: str, ids: list[str]) -> pd.DataFrame:
    """The current rows of `table` for the report's videos, without embeddings."""
    if table not in r.views:
        return pd.DataFrame(columns=["video_id"])
    columns = ", ".join(f'"{c}"' for c in r.table(table).columns if c != "embedding")
    return r.con.execute(f"SELECT {columns} FROM {table} WHERE list_contains($1, video_id)", [ids]).df()


def _write_thumbnails(r: results.Results, ids: list[str], pages: dict[str, str], root: Path) -> dict[str, pd.DataFrame]:
    """Write each thumbnail's JPEG as a file; returns per video its thumbnails (with `src`), in time order."""
    if "thumbnails" not in r.views or not ids:
        return {}
    reader = r.con.sql(
        "SELECT video_id, frame_index, timestamp_s, segment_index, keyframe, width, height, jpeg "
        "FROM thumbnails WHERE list_contains($1, video_id) ORDER BY video_id, frame_index", params=[ids],
    ).to_arrow_reader(512)
    listed: list[dict[str, Any]] = []
    for batch in reader:
        for row in batch.to_pylist():
            folder = root / "thumbs" / pages[row["video_id"]]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{int(row['frame_index'])}.jpg").write_bytes(row.pop("jpeg"))
            # relative to the report's root; video pages sit one folder down
            row["src"] = f"thumbs/{pages[row['video_id']]}/{int(row['frame_index'])}.jpg"
            listed.append(row)
    if not listed:
        return {}
    frame = pd.DataFrame(listed)
    return {video_id: rows.reset_index(drop=True) for video_id, rows in frame.groupby("video_id")}


#: the file names the report gives videos (`_file_id`).
_REPORT_NAME = re.compile(r"[0-9a-f]{1,64}")


def _file_id(video_id: str) -> str:
    """A file name for a video: its id when it is hex (always, for vidlens ids), else a hash of it."""
    if _REPORT_NAME.fullmatch(str(video_id)):
        return str(video_id)
    return hashlib.sha256(str(video_id).encode()).hexdigest()[:20]


# --- the index page ------------------------------------------------------------------------


def _index_page(r: results.Results, out: str, videos: pd.DataFrame, pages: dict[str, str],
                thumbs: dict[str, pd.DataFrame], details: dict[str, pd.DataFrame], max_videos: int) -> str:
    counts = {t: r.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in _COUNTED if t in r.views}
    runs = _frame(r, f"SELECT {{columns}} FROM runs ORDER BY run_id DESC LIMIT {_RUNS_SHOWN}", "runs",
                  exclude=("config_json", "packages"))
    all_runs = r.sql("SELECT count(*) FROM runs").fetchall()[0][0]  # (nightly runs: past the list within a month)
    runs_note = _shown(len(runs), all_runs, "runs", out, "SELECT * FROM runs ORDER BY run_id")
    body = [_runs_section(runs, runs_note), html_section("Counts", '<div class="counts">' + "".join(
        f'<div class="count" data-table="{t}"><b>{n:,}</b>{t}</div>' for t, n in counts.items()) + "</div>")]

    charts = []
    for kind in ("object", "scene"):
        top = r.sql(f"SELECT label, count(DISTINCT video_id) AS n FROM labels WHERE level = 'video' "
                    f"AND kind = '{kind}' GROUP BY label ORDER BY n DESC, label LIMIT 15").fetchall()
        charts.append(bar_chart([(label, n) for label, n in top], f"{kind} labels: videos where they rank"))
    charts.append(histogram(*_duration_bins(r), "video durations"))
    failures = r.sql("SELECT stage, count(*) FROM errors GROUP BY stage ORDER BY 2 DESC").fetchall()
    charts.append(bar_chart([(stage, n) for stage, n in failures], "failures by stage"))
    body.append(html_section("Charts", f'<div class="charts">{"".join(charts)}</div>'))

    body.append(_given_up_section(r))
    errors = r.sql("SELECT uri, stage, error_type, message FROM errors ORDER BY occurred_at DESC "
                   f"LIMIT {_FAILURES_SHOWN}").df()
    failures = _shown(len(errors), counts.get("errors", 0), "failures", out, "SELECT uri, stage, message FROM errors")
    body.append(html_section("Failures", failures + html_table(errors, ["uri", "stage", "error_type", "message"])
                         if len(errors) else '<p class="muted">no failures</p>'))
    body.append(_over_shot_bound_section(r, pages))

    captions = details["captions"]
    video_captions = dict(zip(captions[captions.level == "video"].video_id, captions[captions.level == "video"].caption))
    rows = []
    for video in videos.itertuples(index=False):
        sheet = thumbs.get(video.video_id)
        image = (f'<img class="thumb" alt="" src="{escape(sheet.src.iloc[0])}">'
                 if sheet is not None and len(sheet) else "")
        link = f'videos/{pages[video.video_id]}.html'
        rows.append(f"<tr><td>{image}</td><td><a href=\"{link}\">{escape(str(video.uri))}</a>"
                    f'<div class="muted">{escape(str(video_captions.get(video.video_id, "")))}</div></td>'
                    f'<td class="num">{seconds(video.duration_s)}</td><td class="num">{video.num_segments}</td>'
                    f"<td>{escape(str(video.status))}</td></tr>")
    more = (f'<p class="muted">showing the first {max_videos:,} of {counts.get("videos", 0):,} videos '
            "(--max-videos)</p>" if counts.get("videos", 0) > len(videos) else "")
    body.append(html_section("Videos", more + "<table><tr><th></th><th>video</th><th class=\"num\">duration</th>"
                         "<th class=\"num\">shots</th><th>status</th></tr>" + "".join(rows) + "</table>"))

    # of the videos in the source: one gone from it keeps its scores for queries since changed.
    # The 3 best of each query are kept as the matches are read (a window over every match row,
    # joined to its uri first, held ~180 bytes a row: 1 GB at 2M videos and 3 queries)
    best = r.sql("SELECT b.query, b.video_id, v.uri, b.similarity FROM (SELECT query, unnest(max_by("
                 "{'video_id': video_id, 'similarity': similarity}, similarity, 3), recursive := true) "
                 "FROM matches WHERE level = 'video' AND video_id NOT IN "
                 "(SELECT video_id FROM ledger WHERE status = 'missing') GROUP BY query) b "
                 "JOIN videos v USING (video_id) ORDER BY b.query, b.similarity DESC").df()
    if len(best):
        uris = dict(zip(best.video_id, best.uri))  # also of the videos past --max-videos, which have no page
        lines = "".join(
            f"<tr><td>{escape(str(m.query))}</td><td>{_video_link(m.video_id, uris, pages)}</td>"
            f'<td class="num score">{m.similarity:.3f}</td></tr>' for m in best.itertuples())
        body.append(html_section("Queries: best videos", "<table><tr><th>query</th><th>video</th>"
                             f'<th class="num">similarity</th></tr>{lines}</table>'))
    return html_page("vidlens report", escape(out), "".join(body))


def _latest_setting(r: results.Results, section: str, name: str, default: int) -> int:
    """The integer setting `section.name` as the latest run set it (its `config_json`); `default`
    where no run, or the latest run's configuration, says it."""
    latest = r.sql("SELECT config_json FROM runs ORDER BY run_id DESC LIMIT 1").fetchall()
    if not (latest and latest[0][0]):
        return default
    return int(json.loads(latest[0][0]).get(section, {}).get(name, default))


def _given_up_section(r: results.Results) -> str:
    """The videos that runs skip as given up (`pipeline.ledger.decide`), as the latest run's
    `incremental.give_up_after` counts them, with what brings them back; "" where there are none.
    Without it a reader never learnt of them: they have no page, and no run fails on them."""
    after = _latest_setting(r, "incremental", "give_up_after", IncrementalConfig().give_up_after)
    if not after:
        return ""
    # `ledger.bad_file_runs` in SQL (the ledger as Python dicts held 2M entries): an entry written
    # before the runs were counted has failed once where a bad file's error left it no core rows
    runs = "coalesce(bad_file_runs, (list_contains($types, failure) AND core_fingerprint IS NULL)::INT)"
    given_up = f"SELECT uri, video_id FROM ledger WHERE status = 'failed' AND {runs} >= $after"
    params = {"types": sorted(BAD_FILE_TYPES), "after": after}
    [(total,)] = r.con.execute(f"SELECT count(*) FROM ({given_up})", params).fetchall()
    if not total:
        return ""
    if "errors" in r.views:  # the errors row of its last attempt, which the errors view keeps
        last = ("arg_max(e.error_type, e.occurred_at) AS error_type, arg_max(e.message, e.occurred_at) AS message",
                "LEFT JOIN errors e USING (video_id)")
    else:
        last = ("NULL AS error_type, NULL AS message", "")
    named = r.con.execute(f"SELECT g.uri, {last[0]} FROM ({given_up}) g {last[1]} GROUP BY g.uri ORDER BY g.uri "
                          f"LIMIT {_GIVEN_UP_NAMED}", params).df()
    advice = given_up_advice(total, after, f"incremental.give_up_after is {after} in the latest run",
                             "<code>vidlens run --retry-failed</code>")
    said = f'<p class="warn">{total:,} video{"" if total == 1 else "s"} given up, skipped by the runs: {advice}.</p>'
    if total > len(named):
        said += f'<p class="muted">showing the first {len(named):,} of {total:,}</p>'
    return html_section("Given up", said + html_table(named, ["uri", "error_type", "message"]))


def _over_shot_bound_section(r: results.Results, pages: dict[str, str]) -> str:
    """The videos past `shots.max_frames` (one segment each, `segments.source` "over_shots_max_frames"),
    counted, named with their frame counts, and what brings their shots; "" where there are none.
    The run's summary warned of them, the tables hold them, and the report showed one shot each."""
    if "segments" not in r.views:
        return ""
    # (not those gone from the source since, which no setting brings back: as "Given up" leaves them out)
    over = ("SELECT v.video_id, v.uri, v.frame_count, v.duration_s FROM videos v WHERE v.video_id IN "
            "(SELECT video_id FROM segments WHERE source = $source) AND v.video_id NOT IN "
            "(SELECT video_id FROM ledger WHERE status = 'missing')")
    params = {"source": OVER_SHOTS_MAX_FRAMES}
    [(total,)] = r.con.execute(f"SELECT count(*) FROM ({over})", params).fetchall()
    if not total:
        return ""
    named = r.con.execute(f"{over} ORDER BY v.uri LIMIT {_OVER_SHOT_BOUND_NAMED}", params).df()
    bound = _latest_setting(r, "shots", "max_frames", ShotsConfig().max_frames)
    said = f'<p class="warn">{escape(over_shot_bound_said(total, bound, " in the latest run"))}.</p>'
    if total > len(named):
        said += f'<p class="muted">showing the first {len(named):,} of {total:,}</p>'
    uris = dict(zip(named.video_id, named.uri))
    rows = "".join(f"<tr><td>{_video_link(v.video_id, uris, pages)}</td><td class=\"num\">{v.frame_count:,}</td>"
                   f'<td class="num">{seconds(v.duration_s)}</td></tr>' for v in named.itertuples())
    return html_section("Over shots.max_frames", said + "<table><tr><th>video</th><th class=\"num\">frames</th>"
                        f'<th class="num">duration</th></tr>{rows}</table>')


def _duration_bins(r: results.Results, bins: int = 12) -> tuple[list[int], float, float]:
    """The videos' durations counted in `bins` equal-width bins, and the lowest and highest, by
    DuckDB: every video's duration as a Python list took ~200 MB on the driver at 2M videos."""
    low, high = r.sql("SELECT min(duration_s), max(duration_s) FROM videos WHERE isfinite(duration_s)").fetchall()[0]
    if low is None:
        return [0] * bins, 0.0, 1.0
    high = high if high > low else low + 1.0
    counts = [0] * bins
    # numpy.histogram's arithmetic; the highest value goes in the last bin
    for index, n in r.con.execute(
            "SELECT least(floor((duration_s - $1) * ($3 / ($2 - $1))), $3 - 1)::INTEGER, count(*) FROM videos "
            "WHERE isfinite(duration_s) GROUP BY ALL", [low, high, bins]).fetchall():
        counts[index] = n
    return counts, low, high


def _shown(shown: int, total: int, what: str, out: str, sql: str) -> str:
    """A note where a list shows the latest `shown` of `total` rows (none where it shows them all)."""
    if total <= shown:
        return ""
    command = shlex.join(["vidlens", "query", out, sql])  # (as a shell takes it: an output's path may have spaces)
    return (f'<p class="muted">the latest {shown:,} of {total:,} {what}: every one with '
            f"<code>{escape(command)}</code></p>")


def _runs_section(runs: pd.DataFrame, note: str = "") -> str:
    rows = []
    for run in runs.itertuples(index=False):
        models = ", ".join(f"{m['role']}: {m['model_id']}" for m in (run.models if run.models is not None else []))
        counts = dict(run.counts) if run.counts is not None else {}
        # a finished run counts only what it met (a run that found no videos has no videos_total); a
        # run under way has no counts yet, and its cell stays blank
        videos = counts.get("videos_total", "" if pd.isna(run.finished_at) else 0)
        rows.append(
            f"<tr><td>{escape(str(run.run_id))}</td><td>{escape(str(run.status))}</td>"
            f"<td>{utc(run.started_at)}</td><td class=\"num\">{seconds(run.wall_seconds)}</td>"
            f'<td class="num">{videos}</td><td>{escape(str(run.source))}</td>'
            f"<td>{escape(models)}</td></tr>")
    return html_section("Runs", note + "<table><tr><th>run</th><th>status</th><th>started (UTC)</th><th class=\"num\">"
                    "wall</th><th class=\"num\">videos</th><th>source</th><th>models</th></tr>"
                    + "".join(rows) + "</table>")


def _video_link(video_id: str, uris: dict[str, str], pages: dict[str, str]) -> str:
    """A link from the index to a video's page (its id alone when it has no page)."""
    uri = escape(str(uris.get(video_id, video_id)))
    return f'<a href="videos/{pages[video_id]}.html">{uri}</a>' if video_id in pages else uri
