"""The output tables, declared once with pyarrow: every writer and reader uses these.

Each table is a folder of Parquet files under the output location. Every row carries
`video_id` (except `runs`), `run_id` and `config_fingerprint`. Embedding columns are
fixed-size float32 lists whose size is the embedding model's dimension; they are left out
of a table when the run computes no embeddings, so `table_schema` takes that size.
"""

from __future__ import annotations

import functools

import pyarrow as pa

# 2: videos.hdr and videos.pixel_aspect (2026-12-03); 3: texts.line_index (2026-12-06). Files
# written before a column read it as null
SCHEMA_VERSION = 3
TABLES = ("videos", "segments", "frames", "labels", "captions", "matches", "texts", "thumbnails", "errors",
          "runs")

_KEYS = [
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("config_fingerprint", pa.string(), nullable=False),
]
_TIME_RANGE = pa.struct([pa.field("start_s", pa.float64()), pa.field("end_s", pa.float64())])
_SPAN = [pa.field("start_s", pa.float64()), pa.field("end_s", pa.float64())]
_LEVEL = [
    pa.field("level", pa.string(), nullable=False),  # "video" | "segment"
    pa.field("segment_index", pa.int32()),  # null at video level
]

_COLUMNS: dict[str, list[pa.Field]] = {
    "videos": [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime", pa.timestamp("ns", tz="UTC")),
        pa.field("etag", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),
        pa.field("frame_count", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("codec", pa.string()),
        pa.field("rotation", pa.int32()),
        pa.field("pixel_aspect", pa.float64()),  # a coded pixel's width to its height (4/3 for HDV), 1 mostly
        pa.field("hdr", pa.string()),  # "pq" | "hlg": frames tone mapped to SDR from it; null for SDR
        pa.field("has_audio", pa.bool_()),
        pa.field("container", pa.string()),
        pa.field("decoder", pa.string()),
        pa.field("num_segments", pa.int32()),
        pa.field("num_sampled_frames", pa.int32()),
        # "ok" | "partial" (some stage failed); the latest view's follows a stage retried since
        pa.field("status", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    "segments": [
        pa.field("segment_index", pa.int32(), nullable=False),
        pa.field("start_frame", pa.int64(), nullable=False),
        pa.field("end_frame", pa.int64(), nullable=False),  # inclusive
        *_SPAN,
        pa.field("confidence", pa.float32()),
        pa.field("source", pa.string()),
        pa.field("keyframe_index", pa.int64()),
    ],
    "frames": [
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp_s", pa.float64(), nullable=False),
        pa.field("segment_index", pa.int32(), nullable=False),
    ],
    "labels": [
        pa.field("kind", pa.string(), nullable=False),  # "object" | "scene"
        *_LEVEL,
        *_SPAN,
        pa.field("label", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("similarity", pa.float32()),
        pa.field("time_ranges", pa.list_(_TIME_RANGE)),
    ],
    "captions": [
        *_LEVEL,
        *_SPAN,
        pa.field("caption", pa.string()),
        pa.field("model", pa.string()),
    ],
    "matches": [
        pa.field("query", pa.string(), nullable=False),
        *_LEVEL,
        *_SPAN,
        pa.field("similarity", pa.float32()),
        pa.field("probability", pa.float32()),
    ],
    "texts": [
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp_s", pa.float64()),
        pa.field("segment_index", pa.int32()),
        pa.field("line_index", pa.int32()),  # the line's place in its frame, in reading order, from 0
        pa.field("text", pa.string(), nullable=False),
        pa.field("confidence", pa.float32()),
        pa.field("box", pa.list_(pa.float32(), 8)),  # x0,y0 .. x3,y3 in source pixels
    ],
    "thumbnails": [
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp_s", pa.float64(), nullable=False),
        pa.field("segment_index", pa.int32(), nullable=False),
        pa.field("keyframe", pa.bool_(), nullable=False),  # the frame is its segment's keyframe
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("jpeg", pa.binary(), nullable=False),
    ],
    "errors": [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("occurred_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    "runs": [
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        # "succeeded" | "partial" | "failed"; "error" for a run that stopped on an error it could
        # not go on from (a GPU that failed, local executor); "running" in the row a run opens with
        # (its views show "interrupted" for a run that never published its final row, once a later
        # one started)
        pa.field("status", pa.string()),
        pa.field("source", pa.string()),
        pa.field("output", pa.string()),
        pa.field("vidlens_version", pa.string()),
        pa.field("schema_version", pa.int32()),
        pa.field("config_json", pa.string()),
        pa.field("stages", pa.list_(pa.string())),
        # device and dtype: as the workers ran each model ("cpu,cuda" or "bfloat16,float32" where
        # they differed; "int8" for models.quantize: int8); the driver's resolution only for a
        # model that ran on no video
        pa.field("models", pa.list_(pa.struct([
            pa.field("role", pa.string()), pa.field("model_id", pa.string()),
            pa.field("revision", pa.string()), pa.field("device", pa.string()),
            pa.field("dtype", pa.string()), pa.field("embedding_dim", pa.int32()),
        ]))),
        pa.field("packages", pa.map_(pa.string(), pa.string())),
        pa.field("counts", pa.map_(pa.string(), pa.int64())),
        pa.field("stage_seconds", pa.map_(pa.string(), pa.float64())),
        pa.field("wall_seconds", pa.float64()),
        pa.field("host", pa.string()),
    ],
}

#: tables that hold an embedding column when the run computes embeddings.
EMBEDDING_TABLES = ("videos", "segments", "frames")


@functools.lru_cache(maxsize=None)  # (a schema is immutable: the driver asks for one a table a video)
def table_schema(table: str, embedding_dim: int | None = None) -> pa.Schema:
    """The schema of `table`; embedding tables get an `embedding` column when embedding_dim is set."""
    if table not in _COLUMNS:
        raise KeyError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
    keys = [f for f in _KEYS if not (table == "runs" and f.name == "video_id")]
    if table == "errors":
        # a run-level failure (e.g. listing) has no video
        keys = [pa.field("video_id", pa.string()), *keys[1:]]
    fields = keys + _COLUMNS[table]
    if embedding_dim and table in EMBEDDING_TABLES:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    metadata = {b"vidlens.table": table.encode(), b"vidlens.schema_version": str(SCHEMA_VERSION).encode()}
    return pa.schema(fields, metadata=metadata)


def check_table(table: str, data: pa.Table, embedding_dim: int | None = None) -> None:
    """Raise ValueError when `data` does not match the declared schema of `table` exactly."""
    expected = table_schema(table, embedding_dim)
    if not data.schema.equals(expected, check_metadata=False):
        raise ValueError(
            f"table {table!r} does not match its declared schema:\n"
            f"expected {expected.to_string(show_schema_metadata=False)}\n"
            f"got {data.schema.to_string(show_schema_metadata=False)}"
        )
