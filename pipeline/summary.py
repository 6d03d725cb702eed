"""What a run did: the summary printed at its end (and written as JSON), and the progress line."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field


#: exit codes that tell a scheduler what happened.
EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 2, 3
#: longest failure message on a line of the printed summary (the errors table holds it whole).
_FAILURE_CHARS = 300


@dataclass
class RunSummary:
    """What a run did, printed at the end and stored (in part) in the runs table."""

    #: "" where the run has no row in the runs table: it ended before it published anything
    #: (or before it started); null in the JSON
    run_id: str
    source: str
    output: str
    run_date: str = ""
    status: str = "running"
    counts: Counter = field(default_factory=Counter)
    #: listed videos per decision: "unchanged" (skipped), "new", "changed", "config changed: captions", ...
    reasons: Counter = field(default_factory=Counter)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    #: the URIs of the videos given up on: skipped, their files having failed them in too many runs
    #: in a row (`pipeline.ledger.decide`)
    given_up: list[str] = field(default_factory=list)
    #: the URIs of the videos longer than `shots.max_frames`: processed as one segment each, without
    #: shot detection (`pipeline.recording.warn_over_shot_bound`)
    over_shot_bound: list[str] = field(default_factory=list)
    #: things the user should know that did not fail the run (a source without videos).
    warnings: list[str] = field(default_factory=list)
    #: a run that ended before its end (status "stopped" or "error"): its error, and its exit code
    error: str | None = None
    ended_with: int | None = None

    def warn(self, warning: str) -> None:
        """Add `warning` once: a run that ends on an error once its videos are done is warned at its
        end and again as it fails (`pipeline.job.run_job`)."""
        if warning not in self.warnings:
            self.warnings.append(warning)

    @property
    def exit_code(self) -> int:
        """0 when every video succeeded, 3 when some (even all) failed, 2 when the run did not finish.

        A run whose every video failed still finished and wrote their errors rows: rerunning it
        will not help, looking at the errors will, so it is 3 ("some videos failed"), not 2.
        Videos given up on are not run, so not failed by this run: 0 where they are all it left
        (a warning names them), or a nightly alert would fire every night for the same files.
        """
        if self.ended_with is not None:
            return self.ended_with
        return {"succeeded": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_PARTIAL}.get(
            self.status, EXIT_FAILED)

    def to_json(self) -> str:
        """The summary as JSON, for schedulers and logs."""
        return json.dumps({
            "run_id": self.run_id or None, "run_date": self.run_date, "source": self.source, "output": self.output,
            "status": self.status, "exit_code": self.exit_code, "counts": dict(self.counts),
            "reasons": dict(self.reasons), "missing": self.missing[:1000], "given_up": self.given_up[:1000],
            "stage_seconds": self.stage_seconds,
            "wall_seconds": round(self.wall_seconds, 3),
            "videos_per_second": round(self.counts["videos_total"] / self.wall_seconds, 4) if self.wall_seconds else None,
            "failures": [{"uri": u, "stage": s, "message": m} for u, s, m in self.failures[:1000]],
            "warnings": self.warnings, "error": self.error,
        }, indent=2)

    def render(self) -> str:
        """A one-screen text summary."""
        c = self.counts
        lines = [
            f"run {self.run_id} ({self.run_date}): {self.status}",
            f"  source  {self.source}",
            f"  output  {self.output}",
            f"  listed  {c['videos_listed']}: " + (", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
                                                     or "nothing"),
            f"  videos  {c['videos_total']} processed, {c['videos_ok']} ok, {c['videos_partial']} partial, "
            f"{c['videos_failed']} failed, {c['videos_missing']} newly missing from the source",
            f"  rows    {c['segments']} segments, {c['frames']} frames, {c['labels']} labels, "
            f"{c['captions']} captions, {c['matches']} matches, {c['texts']} texts, {c['errors']} errors",
            f"  time    {self.wall_seconds:.1f} s"
            + (f", {c['frames_sampled'] / self.wall_seconds:.1f} sampled frames/s" if self.wall_seconds else "")
            + f", {c['batches']} {'batch' if c['batches'] == 1 else 'batches'} published",
        ]
        lines += [f"  warning {warning}" for warning in self.warnings]
        if self.stage_seconds:
            lines.append("  stages  " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items()))
        for uri, stage, message in self.failures[:10]:
            lines.append(f"  error   {uri} [{stage}] {_failure_text(uri, message)}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more in the errors table")
        for uri in self.missing[:5]:
            lines.append(f"  missing {uri} (gone from the source; its rows are kept)")
        # (URIs are file names an uploader chose: a newline in one began a line of its own in the log)
        return "\n".join(printable(line) for line in lines)


def counted(count: int, thing: str) -> str:
    """"1 video", "2 videos"."""
    return f"{count} {thing}{'' if count == 1 else 's'}"


def over_shot_bound_said(count: int, max_frames: int, aside: str = "", named: str = "") -> str:
    """What `count` videos past `shots.max_frames` got and what brings their shots, as the run's
    summary and the report's index both say it: `aside` ends the parenthesis that names the
    setting, `named` lists them."""
    from workers.frame_selection import OVER_SHOTS_MAX_FRAMES  # (late: it imports numpy, every command this module)

    return (f"{counted(count, 'video')} of more than {max_frames:,} frames (shots.max_frames{aside}) got no shot "
            f"detection, one segment each (segments.source '{OVER_SHOTS_MAX_FRAMES}'){': ' + named if named else ''}. "
            "Raise the setting (0: no bound) to find their shots; that reruns every video's rows, as any shots setting")


def named_uris(uris: list[str], shown: int = 3) -> str:
    """The first `shown` of `uris`, and how many more: "a.mp4, b.mp4, c.mp4 and 4 more"."""
    return ", ".join(uris[:shown]) + (f" and {len(uris) - shown} more" if len(uris) > shown else "")


#: where an errors row's message says it was raised: "... (at decode.py:189 in probe)"
_RAISED_AT = re.compile(r" \(at [\w.]+:\d+ in [\w<>]+\)$")


def printable(text: str) -> str:
    """`text` as one line of a terminal or a log: a control character (a newline, a carriage
    return, the escape that starts a terminal's escape sequence) or a line separator, which a
    file name may hold, shown escaped (`\\n`, `\\x1b`)."""
    return "".join(repr(char)[1:-1] if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char for char in text)


def _failure_text(uri: str, message: str) -> str:
    """A failure's message on one summary line: its first line without the URI the line already
    names nor where in vidlens' code it was raised (the errors table keeps both); a long one is
    cut at a space outside quotes, never inside a quoted path."""
    text = message.strip()
    if text.startswith(f"{uri}: "):  # (before its first line is taken: a URI may hold a newline)
        text = text[len(uri) + 2:]
    text = (text.splitlines() or [""])[0]
    text = _RAISED_AT.sub("", text)
    if len(text) <= _FAILURE_CHARS:
        return text
    cut, quote = 0, ""
    for i, char in enumerate(text[:_FAILURE_CHARS]):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and (i == 0 or text[i - 1] in " ([{=:,"):  # not an apostrophe (can't)
            quote = char
        elif char == " ":
            cut = i
    if not cut:
        return text  # no safe place to cut: whole
    return text[:cut].rstrip(" ,;:(") + " ... (the whole message is in the errors table)"


def progress_line(videos: int, frames: int, seconds: float) -> str:
    """The progress bar's line: rates over the whole run so far, as the summary gives them."""
    from tqdm import tqdm

    seconds = max(seconds, 1e-9)
    return (f"{videos} video{'s' if videos != 1 else ''} [{tqdm.format_interval(seconds)}, "
            f"{videos / seconds:.2f} videos/s, {frames / seconds:.1f} sampled frames/s]")
