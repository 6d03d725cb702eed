"""Declared table schemas and the Parquet writer that must follow them."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.writer import OutputWriter, rows_to_table
from schemas.tables import SCHEMA_VERSION, TABLES, check_table, table_schema


def test_every_table_has_keys_and_version():
    for table in TABLES:
        schema = table_schema(table, 16)
        assert "run_id" in schema.names and "config_fingerprint" in schema.names
        assert ("video_id" in schema.names) == (table != "runs")
        assert schema.metadata[b"vidlens.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table_schema("frames", 16).field("embedding").type == pa.list_(pa.float32(), 16)
    assert "embedding" not in table_schema("frames").names


def test_writer_output_matches_schema_and_is_atomic(tmp_path):
    writer = OutputWriter(str(tmp_path), "run1", rows_per_file=2)
    writer.embedding_dim = 4
    keys = {"video_id": "v", "run_id": "run1", "config_fingerprint": "f"}
    rows = [{**keys, "frame_index": i, "timestamp_s": i / 10, "segment_index": 0,
             "embedding": np.arange(4, dtype=np.float32) + i if i != 1 else None} for i in range(3)]
    writer.add("frames", rows)
    files = writer.close()
    assert len(files["frames"]) == 2  # 2 rows then 1 row
    assert len(files["texts"]) == 1  # empty table still written, with its schema
    data = pq.read_table(tmp_path / "frames")
    check_table("frames", data.select(table_schema("frames", 4).names), 4)
    assert data.num_rows == 3
    column = data.sort_by("frame_index").column("embedding").to_pylist()
    assert column[1] is None and column[2] == [2.0, 3.0, 4.0, 5.0]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_a_wrong_row_is_refused():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError)):
        rows_to_table("frames", [{"video_id": "v", "run_id": "r", "config_fingerprint": "f",
                                  "frame_index": "seven", "timestamp_s": 0.0, "segment_index": 0}], None)
    with pytest.raises(ValueError, match="size"):
        rows_to_table("frames", [{"video_id": "v", "run_id": "r", "config_fingerprint": "f", "frame_index": 1,
                                  "timestamp_s": 0.0, "segment_index": 0,
                                  "embedding": np.zeros(3, np.float32)}], 4)
