"""The report's HTML: a video's page (`video_page`), and the pieces every page is built of (`html_page`,
`html_section`, `html_table`, and the cells' formats). Every text from the data is escaped here; the index
page and the files are `pipeline.report`'s.
"""

from __future__ import annotations

import re
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.report_charts import timeline
from workers.frame_selection import OVER_SHOTS_MAX_FRAMES

#: labels drawn as rows of a video's timeline.
_TIMELINE_LABELS = 8


def video_page(video: Any, parts: dict[str, pd.DataFrame], sheet: pd.DataFrame) -> str:
    segments = parts["segments"].sort_values("segment_index")
    labels, captions = parts["labels"], parts["captions"]
    facts = [("duration", seconds(video.duration_s)), ("fps", f"{video.fps:.3g}" if video.fps else "?"),
             ("size", f"{video.width}x{video.height}"), ("codec", video.codec), ("decoder", video.decoder),
             ("shots", video.num_segments), ("status", video.status), ("video_id", video.video_id)]
    facts[4:4] = _unusual(video)
    head = '<div class="facts">' + "".join(f"<span>{k} <b>{escape(str(v))}</b></span>" for k, v in facts) + "</div>"
    caption = captions[captions.level == "video"]
    if len(caption):
        head += f'<p class="caption" id="video-caption">{escape(str(caption.caption.iloc[0]))}</p>'
    body = [html_section("Video", head)]

    video_labels = labels[labels.level == "video"].sort_values(["kind", "rank"])
    rows = [(f"{lb.label}", [(tr["start_s"], tr["end_s"]) for tr in (lb.time_ranges if lb.time_ranges is not None else [])])
            for lb in video_labels.head(_TIMELINE_LABELS).itertuples()]
    shots = [(s.segment_index, s.start_s, s.end_s) for s in segments.itertuples()]
    ticks = list(sheet.timestamp_s) if len(sheet) else []
    body.append(html_section("Shot timeline", timeline(video.duration_s, shots, rows, ticks)))

    if len(sheet):
        figures = "".join(
            f'<figure class="{"keyframe" if t.keyframe else "frame"}"><img src="../{escape(t.src)}" '
            f'width="{t.width}" height="{t.height}" alt="frame {t.frame_index}">'
            f"<figcaption>{t.timestamp_s:.2f}s · shot {t.segment_index}"
            f'{" · keyframe" if t.keyframe else ""}</figcaption></figure>' for t in sheet.itertuples())
        body.append(html_section("Contact sheet", f'<div class="sheet">{figures}</div>'))
    else:
        body.append(html_section("Contact sheet", '<p class="muted">no thumbnails (output.thumbnails was off)</p>'))

    if len(video_labels):
        lines = "".join(
            f"<tr><td>{escape(str(lb.kind))}</td><td class=\"num\">{lb.rank}</td><td>{escape(str(lb.label))}</td>"
            f'<td class="num score">{lb.score:.3f}</td><td>{_ranges(lb.time_ranges)}</td></tr>'
            for lb in video_labels.itertuples())
        body.append(html_section("Labels", "<table><tr><th>kind</th><th class=\"num\">rank</th><th>label</th>"
                             f'<th class="num">score</th><th>where</th></tr>{lines}</table>'))

    shots_table = _shots_table(segments, labels, captions, sheet)
    body.append(html_section("Shots", _over_shot_bound(video, segments) + shots_table))
    texts = parts["texts"].sort_values(["timestamp_s", "line_index"], kind="stable")  # (null: written in order)
    if len(texts):
        body.append(html_section("On-screen text", html_table(texts, ["timestamp_s", "text", "confidence"])))
    matches = parts["matches"].sort_values("similarity", ascending=False)
    if len(matches):
        body.append(html_section("Query matches", html_table(
            matches, ["query", "level", "segment_index", "start_s", "end_s", "similarity", "probability"])))
    if len(parts["errors"]):
        body.append(html_section("Errors", html_table(parts["errors"], ["stage", "error_type", "message"])))
    nav = '<a href="../index.html">← all videos</a> · '
    return html_page(escape(Path(str(video.uri)).name or str(video.uri)), nav + escape(str(video.uri)), "".join(body))


def _over_shot_bound(video: Any, segments: pd.DataFrame) -> str:
    """A note where the video is past `shots.max_frames` (its one segment says so), else ""."""
    if not (len(segments) and (segments.source == OVER_SHOTS_MAX_FRAMES).any()):
        return ""
    return (f'<p class="warn">no shot detection: its {video.frame_count:,} frames are more than shots.max_frames, '
            f"and one segment covers it (segments.source '{OVER_SHOTS_MAX_FRAMES}'); raise the setting "
            "(0: no bound) to find its shots</p>")


def _unusual(video: Any) -> list[tuple[str, str]]:
    """Facts shown only where a video has them: HDR, non-square pixels, a turned picture
    (outputs written before a column existed read it as null)."""
    def given(name: str) -> Any:
        value = getattr(video, name, None)
        return None if value is None or pd.isna(value) else value

    hdr, aspect, rotation = given("hdr"), given("pixel_aspect"), given("rotation")
    facts = [("HDR", str(hdr).upper())] if hdr else []
    if aspect and abs(aspect - 1) > 1e-3:
        facts.append(("pixel aspect", f"{aspect:.4g}"))
    if rotation:
        facts.append(("rotation", f"{int(rotation)}°"))
    return facts


def _shots_table(segments: pd.DataFrame, labels: pd.DataFrame, captions: pd.DataFrame, sheet: pd.DataFrame) -> str:
    if not len(segments):
        return '<p class="muted">no shots</p>'
    rows = []
    for s in segments.itertuples():
        own = labels[(labels.level == "segment") & (labels.segment_index == s.segment_index) & (labels["rank"] == 1)]
        text = captions[(captions.level == "segment") & (captions.segment_index == s.segment_index)]
        frame = sheet[(sheet.segment_index == s.segment_index)] if len(sheet) else sheet
        image = f'<img class="thumb" alt="" src="../{escape(frame.src.iloc[0])}">' if len(frame) else ""
        tags = ", ".join(f"{lb.kind}: {lb.label}" for lb in own.itertuples())
        rows.append(f"<tr data-segment=\"{s.segment_index}\"><td>{image}</td><td class=\"num\">{s.segment_index}</td>"
                    f'<td class="num">{s.start_s:.2f}-{s.end_s:.2f}s</td>'
                    f"<td>{escape(str(text.caption.iloc[0])) if len(text) else ''}</td><td>{escape(tags)}</td></tr>")
    return ("<table><tr><th></th><th class=\"num\">shot</th><th class=\"num\">time</th><th>caption</th>"
            "<th>top labels</th></tr>" + "".join(rows) + "</table>")


def html_page(title: str, subtitle: str, body: str) -> str:
    """A whole page; `title` and `subtitle` are already escaped (the subtitle may hold a link)."""
    assets = resources.files("pipeline") / "report_assets"
    css = (assets / "report.css").read_text(encoding="utf-8")
    script = (assets / "report.js").read_text(encoding="utf-8")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{css}</style></head><body>"
            f"<header><h1>{title}</h1><p>{subtitle}</p></header><main>{body}</main>"
            f"<script>{script}</script></body></html>")


def html_section(title: str, content: str) -> str:
    anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{content}</section>'


def html_table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(getattr(row, c))}</td>" for c in columns) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return ""  # a video-level match has no segment_index: pandas gives <NA>
    if isinstance(value, float):
        return f"{value:.3f}"
    return escape(str(value))


def _ranges(ranges: Any) -> str:
    if ranges is None:
        return ""
    return escape(", ".join(f"{r['start_s']:.1f}-{r['end_s']:.1f}s" for r in ranges))


def seconds(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):.1f}s"


def utc(value: Any) -> str:
    """A stored time in UTC, to the second (DuckDB hands it over in the machine's time zone)."""
    if value is None or pd.isna(value):
        return ""
    stamp = pd.Timestamp(value)
    return (stamp.tz_convert("UTC") if stamp.tzinfo else stamp).strftime("%Y-%m-%d %H:%M:%S")
