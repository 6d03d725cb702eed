"""Declared table schemas and the Parquet writer that must follow them."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.writer import rows_to_table
from schemas.tables import SCHEMA_VERSION, TABLES, check_table, table_schema


def test_every_table_has_keys_and_version():
    for table in TABLES:
        schema = table_schema(table, 16)
        assert "run_id" in schema.names and "config_fingerprint" in schema.names
        assert ("video_id" in schema.names) == (table != "runs")
        assert schema.metadata[b"vidlens.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table_schema("frames", 16).field("embedding").type == pa.list_(pa.float32(), 16)
    assert "embedding" not in table_schema("frames").names


def test_rows_become_a_table_of_the_declared_schema_with_null_embeddings_where_none():
    keys = {"video_id": "v", "run_id": "run1", "config_fingerprint": "f"}
    rows = [{**keys, "frame_index": i, "timestamp_s": i / 10, "segment_index": 0,
             "embedding": np.arange(4, dtype=np.float32) + i if i != 1 else None} for i in range(3)]
    del rows[2]["segment_index"]  # (a key a row lacks is null)
    data = rows_to_table("frames", rows, 4)
    check_table("frames", data, 4)
    assert data.schema.metadata[b"vidlens.table"] == b"frames"  # (as written in each file)
    assert data.column("embedding").to_pylist() == [[0.0, 1.0, 2.0, 3.0], None, [2.0, 3.0, 4.0, 5.0]]
    assert data.column("segment_index").to_pylist() == [0, 0, None]
    assert rows_to_table("frames", [], 4).num_rows == 0


def test_a_wrong_row_is_refused():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError)):
        rows_to_table("frames", [{"video_id": "v", "run_id": "r", "config_fingerprint": "f",
                                  "frame_index": "seven", "timestamp_s": 0.0, "segment_index": 0}], None)
    with pytest.raises(ValueError, match="size"):
        rows_to_table("frames", [{"video_id": "v", "run_id": "r", "config_fingerprint": "f", "frame_index": 1,
                                  "timestamp_s": 0.0, "segment_index": 0,
                                  "embedding": np.zeros(3, np.float32)}], 4)


def test_a_batch_whose_first_video_has_no_embedding_is_staged_with_the_batchs_size(tmp_path):
    # each video's rows are converted as it is recorded: the first of a batch, its embed stage
    # failed, had no embedding column, the next videos one of the batch's size, and the batch's
    # tables did not concatenate
    from datetime import datetime, timezone

    from pipeline.store import Store
    from pipeline.writer import BatchWriter

    store = Store(str(tmp_path / "out"))
    writer = BatchWriter(store, "run1", "2024-01-01", rows_per_file=1)
    for video, embedding in (("a", None), ("b", np.arange(4, dtype=np.float32))):
        if embedding is not None:
            writer.embedding_dim = 4  # (as the driver learns it: from the first video that has one)
        keys = {"video_id": video, "run_id": "run1", "config_fingerprint": "f"}
        writer.add("videos", [{**keys, "uri": f"/{video}.mp4", "status": "ok",
                               "processed_at": datetime.now(timezone.utc), "embedding": embedding}])
        writer.add("captions", [{**keys, "level": "video", "caption": video}])
    files = writer.stage(0)
    assert sorted(record["table"] for record in files) == ["captions", "captions", "videos", "videos"]
    data = pa.concat_tables(pq.read_table(store.path(record["staged"])) for record in files
                            if record["table"] == "videos")
    check_table("videos", data, 4)
    assert data.column("embedding").to_pylist() == [None, [0.0, 1.0, 2.0, 3.0]]


def test_a_batch_stages_an_empty_file_for_each_empty_table_and_its_next_batch_keeps_its_settings(tmp_path):
    # a dataset reader of a table's folder finds its schema before any row; a later batch keeps the run's
    # file size and the embedding size learnt from its first video (the runs row records it)
    from pipeline.store import Store
    from pipeline.writer import BatchWriter

    store = Store(str(tmp_path / "out"))
    writer = BatchWriter(store, "run1", "2024-01-01", rows_per_file=2)
    writer.embedding_dim = 4
    assert writer.converted({"captions": []}) == {} and not writer.pending  # no rows: no table
    writer.attempted("a", frozenset({"captions"}))
    assert writer.pending  # a rerun that found no caption still publishes its attempt
    keys = {"video_id": "a", "run_id": "run1", "config_fingerprint": "f"}
    writer.add("captions", [{**keys, "level": "segment", "segment_index": i, "caption": str(i)} for i in range(3)])
    files = writer.stage(0, empty_tables=("captions", "texts"))
    assert sorted((record["table"], pq.read_table(store.path(record["staged"])).num_rows) for record in files) == [
        ("attempts", 1), ("captions", 1), ("captions", 2), ("texts", 0)]
    assert not writer.pending  # staged: its rows are not staged again
    later = writer.next_batch()
    assert (later.embedding_dim, later.rows_per_file, later.pending) == (4, 2, False)
