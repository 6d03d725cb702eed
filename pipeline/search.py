"""Text search over the stored embeddings: rank videos or segments by cosine similarity to a text.

The text is encoded by the very model that made the embeddings, as the `runs` table
records it (model id, revision, embedding size) and with the match stage's prompt
template (that of the current `matches` rows), through the same `VideoTextModel.text_bank` the match stage uses, in float32 (so
a run in bf16, a GPU's or a CPU's with bf16 instructions, has `matches` similarities within
about 2e-3 of the search scores). Outputs whose
embeddings come from different models, or a `--model` that is not the recorded one, are
refused: cosine similarities across two embedding spaces rank at random.

X-CLIP conditions its texts on each clip's visual tokens, which are not stored; its search
scores use the unconditioned text embedding, so they rank like, but do not equal, the
`matches` table's similarities.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from pipeline.summary import printable

LEVELS = ("video", "segment")
#: the view holding each level's embeddings.
_EMBEDDING_VIEW = {"video": "videos", "segment": "segments"}
#: a row's cosine similarity to the query (NULL for a row without an embedding), as arrays of the
#: query's size, not lists: a NULL fixed-size list read from Parquet holds NULLs, which
#: list_cosine_similarity refuses even where a CASE keeps it from that row (DuckDB 2.0), and one
#: segment without a frame failed every search
_SCORE = "array_cosine_similarity(embedding::FLOAT[{dim}], $1::FLOAT[{dim}])"


class SearchError(ValueError):
    """The outputs cannot be searched as asked; the message says why and what to do."""


@dataclass(frozen=True)
class EmbeddingSource:
    """The model that made a level's stored embeddings, and how its match stage read texts."""

    model_id: str
    revision: str | None
    embedding_dim: int
    template: str
    trust_remote_code: bool
    cache_dir: str | None
    run_ids: tuple[str, ...]


def _match_template(con: duckdb.DuckDBPyConnection) -> str | None:
    """The prompt template of the newest run whose matches rows are current, where there are
    any: a template changed since the embeddings were made reruns the matches alone."""
    rows = con.execute("SELECT config_json FROM runs WHERE run_id = (SELECT max(run_id) FROM matches)").fetchall()
    return json.loads(rows[0][0] or "{}").get("match", {}).get("template") if rows else None


def embedding_source(con: duckdb.DuckDBPyConnection, level: str = "video") -> EmbeddingSource:
    """The one embed model behind the current embeddings of `level`; SearchError if none or several."""
    if level not in LEVELS:
        raise SearchError(f"level {level!r} (--level): choose 'video' or 'segment'")
    view = _EMBEDDING_VIEW[level]
    if not con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0]:
        raise SearchError(f"nothing to search: the output's {view} table is empty (it holds no video that was "
                          "processed: run `vidlens run SOURCE --out OUT` over the videos first; any that failed are in "
                          "its errors table, with why)")
    if "embedding" not in con.table(view).columns:
        raise SearchError(f"the {view} table has no embeddings: rerun with the embed stage on")
    # (a filter on the view had DuckDB hash every row's ids: 190 MB for 750k segments)
    run_ids = [r[0] for r in con.sql(
        f"SELECT run_id FROM {view} GROUP BY run_id HAVING bool_or(embedding IS NOT NULL) ORDER BY run_id").fetchall()]
    if not run_ids:
        raise SearchError(f"no {level} embeddings to search: the {view} table has none")
    runs = con.execute(
        "SELECT run_id, config_json, models FROM runs WHERE list_contains($1, run_id) ORDER BY run_id",
        [run_ids],
    ).fetchall()
    missing = sorted(set(run_ids) - {r[0] for r in runs})
    if missing:
        runs = sorted([*runs, *_unrecorded_runs(con, view, missing)], key=lambda run: run[0])
    by_model: dict[tuple, list[str]] = {}
    settings = {}
    dims: dict[tuple, set[int]] = {}
    embeds = []
    for run_id, config_json, models in runs:
        embed = [m for m in models or [] if m["role"] == "embed"]
        if not embed:
            raise SearchError(f"run {run_id} stored embeddings but recorded no embed model in the runs table")
        embeds.append((run_id, config_json, embed[0]))
    # a hub model's commit went unrecorded (null) under transformers 5 until 2026-12-05: such runs
    # count as the one commit the other runs of that model recorded, not as another model
    commits: dict[str, set[str]] = {}
    for _, _, model in embeds:
        if model["revision"] is not None:
            commits.setdefault(model["model_id"], set()).add(model["revision"])
    for run_id, config_json, model in embeds:
        known = commits.get(model["model_id"], set())
        revision = model["revision"] if model["revision"] is not None or len(known) != 1 else next(iter(known))
        key = (model["model_id"], revision)
        by_model.setdefault(key, []).append(run_id)
        settings[key] = json.loads(config_json or "{}")
        # (none in the row a run killed before it made an embedding opened with)
        dims.setdefault(key, set()).update([model["embedding_dim"]] if model["embedding_dim"] is not None else [])
    if len(by_model) > 1 or any(len(sizes) > 1 for sizes in dims.values()):
        listed = "; ".join(f"{m} (revision {r}, {'/'.join(map(str, sorted(dims[(m, r)]))) or '?'} dims) in run(s) "
                           f"{', '.join(ids)}" for (m, r), ids in by_model.items())
        raise SearchError(
            f"the {level} embeddings were made by different models, which do not share one space: {listed}. "
            "Rerun the older videos with one model (`vidlens forget OUT --missing` drops those gone from the "
            "source), or query each run's rows on their own"
        )
    (model_id, revision), ids = next(iter(by_model.items()))
    config = settings[(model_id, revision)]
    dim = next(iter(dims[(model_id, revision)]), None)
    models_config = config.get("models", {})
    return EmbeddingSource(
        model_id=model_id,
        revision=revision,
        embedding_dim=int(dim) if dim is not None else _column_dim(con, view),
        template=_match_template(con) or config.get("match", {}).get("template", "{}"),
        trust_remote_code=bool(models_config.get("trust_remote_code", False)),
        cache_dir=models_config.get("cache_dir"),
        run_ids=tuple(ids),
    )


def _unrecorded_runs(con: duckdb.DuckDBPyConnection, view: str, missing: list[str]) -> list[tuple[str, str, Any]]:
    """Runs that stored embeddings in `view` and have no `runs` row, each as (run_id, config_json,
    models) of the recorded run of its configuration nearest it; SearchError where one has none.

    Until 2026-12-04 a run wrote its row at its end only, so one killed after publishing a batch
    left rows that no row describes, and the runs after it skip those unchanged videos. Its rows'
    `config_fingerprint` hashes the whole configuration, `models.embed` with it: the runs of that
    fingerprint ran its embedding model (as the night before it, where nothing else changed)."""
    fingerprints: dict[str, set[str]] = {}
    for run_id, fingerprint in con.execute(
            f"SELECT DISTINCT run_id, config_fingerprint FROM {view} WHERE list_contains($1, run_id)",
            [missing]).fetchall():
        fingerprints.setdefault(run_id, set()).add(fingerprint)
    recorded = con.execute(
        "SELECT run_id, config_fingerprint, config_json, models FROM runs WHERE list_contains($1, config_fingerprint) "
        "ORDER BY run_id", [sorted(set().union(*fingerprints.values()))]).fetchall()
    stand_ins, unknown = [], []
    for run_id in missing:
        same = [run for run in recorded if run[1] in fingerprints.get(run_id, ())]
        if not same:
            unknown.append(run_id)
            continue
        before = [run for run in same if run[0] < run_id]
        nearest = before[-1] if before else same[0]
        stand_ins.append((run_id, nearest[2], nearest[3]))
    if unknown:
        ids = ", ".join(f"'{run_id}'" for run_id in unknown)
        raise SearchError(
            f"the runs table has no row for run(s) {', '.join(unknown)} whose embeddings are stored (a run killed "
            "before its end by a vidlens from before 2026-12-04 wrote none), and no recorded run has its "
            "configuration, so the model that made them is unknown. A run skips those videos, unchanged: redo "
            f"them with `vidlens run --full` over a manifest of their URIs (`vidlens query OUT \"SELECT uri FROM "
            f"videos WHERE run_id IN ({ids})\" --format csv --output redo.csv`), which records it"
        )
    return stand_ins


def check_model(source: EmbeddingSource, model: str | None) -> str:
    """The model to load: the recorded one, or `model` when it is that same model (a local copy).

    A local copy counts as the same model when its folder has the recorded hub id's name
    (as `hf download ID --local-dir ./models/NAME` makes it).
    """
    if model is None or model == source.model_id:
        return source.model_id
    recorded, given = Path(source.model_id), Path(model)
    same_folder = recorded.exists() and given.exists() and recorded.resolve() == given.resolve()
    local_copy = given.is_dir() and not recorded.exists() and given.name == source.model_id.rstrip("/").split("/")[-1]
    if same_folder or local_copy:
        return model
    if recorded.is_dir():
        other = ("another folder: another model, as far as search can tell" if given.is_dir()
                 else "another model")  # (a hub id is no folder)
        raise SearchError(
            f"these outputs were embedded with the folder {source.model_id!r}, which is on this machine: "
            f"drop --model to search with it (--model {model!r} is {other})"
        )
    name = source.model_id.rstrip("/").split("/")[-1]
    if given.name == name and not given.is_dir():  # (a copy's path mistyped: it was called "another model")
        raise SearchError(f"--model {model!r} is no folder on this machine (check the path): give the folder "
                          f"a copy of {source.model_id!r} is in")
    raise SearchError(
        f"these outputs were embedded with {source.model_id!r} (revision {source.revision}, "
        f"{source.embedding_dim} dims); --model {model!r} is another model, and its text embeddings "
        f"would rank the videos at random. Drop --model, or give a local copy of {source.model_id!r} "
        f"(a folder named {name!r})"
    )


def encode_query(source: EmbeddingSource, text: str, model: str | None = None, device: str = "auto") -> np.ndarray:
    """The text's embedding float32 [D], as the match stage encodes a query, by the recorded model
    (cut to the model's text positions, with a warning, where it is longer)."""
    from schemas.config import ConfigError, ModelsConfig
    from workers.embedding import VideoTextModel
    from workers.models import ModelLoadError, resolve_device

    model_id = check_model(source, model)
    local = Path(model_id).is_dir()
    try:
        ModelsConfig(device=device)
    except ConfigError:
        raise SearchError(f"device {device!r} (--device): choose auto, cpu, cuda, cuda:N or mps") from None
    try:
        resolve_device(device)  # before the model: its loader's advice would be about the model
    except ModelLoadError:
        missing = ("this machine has no Apple GPU (MPS) that PyTorch can use" if device == "mps"
                   else "no CUDA device is visible here")
        raise SearchError(f"device {device!r} (--device): {missing}; use --device cpu, or auto") from None
    models = ModelsConfig(
        embed=model_id,
        # a hub model is loaded at the commit the run recorded; a folder is what it is
        embed_revision=None if local or source.revision in (None, "local") else source.revision,
        trust_remote_code=source.trust_remote_code,
        cache_dir=source.cache_dir,
        device=device,
        dtype="float32",
    )
    try:
        encoder = VideoTextModel(models)
    except ModelLoadError as exc:
        if model is not None:
            raise
        # what went wrong, without the loader's advice for a run's configuration
        reason = str(exc).split(". Fix:")[0].removeprefix("cannot load the embed model")
        raise SearchError(
            f"the runs recorded the embed model as {model_id!r}, which cannot be loaded here ({reason.strip(': ')}). "
            f"If it was a local folder, or this machine is offline, give a copy of it with --model (model= in "
            f"Python; a folder named {model_id.rstrip('/').split('/')[-1]!r})"
        ) from exc
    if encoder.dim != source.embedding_dim:
        raise SearchError(
            f"{model_id!r} makes {encoder.dim}-dim embeddings but the stored ones have "
            f"{source.embedding_dim}: it is not the model that made them"
        )
    return encoder.text_bank([text], (source.template,)).embeddings[0]


def search(con: duckdb.DuckDBPyConnection, text: str, top: int = 10, level: str = "video",
           model: str | None = None, device: str = "auto") -> pd.DataFrame:
    """The `top` videos or segments most similar to `text`, best first.

    Columns: rank, video_id, uri, segment_index (None at video level), start_s, end_s,
    score (cosine similarity), caption (the segment's, else the video's).
    """
    text = text.strip()  # as the match stage strips its queries: "car " would be encoded as "car ."
    if not text:
        raise SearchError('the search text is empty: say in words what to look for, e.g. "a dog running on a beach"')
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise SearchError(f"top (--top) must be a whole number of at least 1, got {top!r}")
    source = embedding_source(con, level)
    query = encode_query(source, text, model, device)
    return rank(con, query, top, level)


def rank(con: duckdb.DuckDBPyConnection, query: np.ndarray, top: int, level: str) -> pd.DataFrame:
    """Rank the current embeddings of `level` against a query embedding (cosine, in DuckDB).

    An embedding of NaNs or zeros (a model's overflow) has a NaN score, which DuckDB sorts above
    every number: such rows rank last.
    """
    views = {row[0] for row in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    has_captions = "captions" in views
    video_caption = (
        "(SELECT first(caption ORDER BY caption) FROM captions c "
        "WHERE c.video_id = v.video_id AND c.level = 'video')" if has_captions else "NULL"
    )
    # The best `top` are found first, from the ids and scores alone, then given their uri and
    # caption. A filter on the view (embedding IS NOT NULL) or a join over every row had DuckDB
    # hold every row's embedding in a hash table: 3.8 GB for 750k segments. Rows without an
    # embedding have no score: they sort last and are dropped after the limit.
    score = _SCORE.format(dim=len(query))
    if level == "video":
        sql = f"""
            SELECT v.video_id, v.uri, NULL::INTEGER AS segment_index, 0.0 AS start_s, v.end_s, v.score,
                   {video_caption} AS caption
            FROM (SELECT video_id, uri, duration_s AS end_s, {score} AS score
                  FROM videos ORDER BY score IS NULL, isnan(score), score DESC, video_id LIMIT {int(top)}) v
            WHERE v.score IS NOT NULL
            ORDER BY isnan(v.score), v.score DESC, v.video_id"""
    else:
        segment_caption = (
            "(SELECT first(caption ORDER BY caption) FROM captions c WHERE c.video_id = s.video_id "
            "AND c.level = 'segment' AND c.segment_index = s.segment_index)" if has_captions else "NULL"
        )
        sql = f"""
            SELECT s.video_id, v.uri, s.segment_index, s.start_s, s.end_s, s.score,
                   coalesce({segment_caption}, {video_caption}) AS caption
            FROM (SELECT video_id, segment_index, start_s, end_s, {score} AS score
                  FROM segments ORDER BY score IS NULL, isnan(score), score DESC, video_id, segment_index
                  LIMIT {int(top)}) s
            JOIN videos v ON v.video_id = s.video_id
            WHERE s.score IS NOT NULL
            ORDER BY isnan(s.score), s.score DESC, s.video_id, s.segment_index"""
    found = con.execute(sql, [np.asarray(query, dtype=np.float32).tolist()]).df()
    found.insert(0, "rank", range(1, len(found) + 1))
    return found


def as_json_lines(found: pd.DataFrame) -> str:
    """One JSON object per hit, as `vidlens query --format json` writes rows: UTF-8 and slashes
    as they are (pandas writes "\\/tmp\\/a.mp4"), null for a video-level hit's shot."""
    rows = found.astype(object).where(found.notna(), None).to_dict("records")
    return "".join(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def render(found: pd.DataFrame) -> str:
    """One line per hit: rank, score, video, time range, caption."""
    if found.empty:
        return "no matches"
    names = [printable(hit.uri) + ("" if pd.isna(hit.segment_index) else f" #{int(hit.segment_index)}")
             for hit in found.itertuples()]
    width = max(map(_shown_width, names))  # the time ranges and captions line up after the longest name
    lines = []
    for hit, name in zip(found.itertuples(), names):
        where = f"{hit.start_s:7.2f}-{hit.end_s:7.2f}s"
        caption = "" if hit.caption is None or pd.isna(hit.caption) else f"  {printable(hit.caption)}"
        padding = " " * (width - _shown_width(name))
        lines.append(f"{hit.rank:3d}  {hit.score:6.3f}  {name}{padding}  {where}{caption}")
    return "\n".join(lines)


def _shown_width(text: str) -> int:
    """Columns `text` takes in a terminal: two for each wide (East Asian) character."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _column_dim(con: duckdb.DuckDBPyConnection, view: str) -> int:
    row = con.sql(f"SELECT len(embedding) FROM {view} WHERE embedding IS NOT NULL LIMIT 1").fetchall()
    return int(row[0][0])
