import io

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.parquet_reading import arrow_file


def _parquet_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"uri": ["a.mp4", "b.mp4"]}), sink)
    return sink.getvalue()


def test_the_rest_of_an_open_file_is_read_into_memory_arrow_allocated(tmp_path):
    body = _parquet_bytes()
    (tmp_path / "f.parquet").write_bytes(b"skipped" + body)
    with fsspec.filesystem("file").open(str(tmp_path / "f.parquet"), "rb") as handle:
        handle.seek(len(b"skipped"))
        reader = arrow_file(handle)
    assert pq.read_table(reader).column("uri").to_pylist() == ["a.mp4", "b.mp4"]
    assert reader.read_buffer().to_pybytes() == body


class _Stream(io.BytesIO):
    """A file of unstated length (an HTTP server's answer without a Content-Length)."""

    size = None


def test_a_file_of_unstated_length_is_read_whole():
    reader = arrow_file(_Stream(_parquet_bytes()))
    assert pq.ParquetFile(reader).read().column("uri").to_pylist() == ["a.mp4", "b.mp4"]


class _Truncated(io.BytesIO):
    """A file that ends before the size it states."""

    size = 100


def test_a_file_that_ends_before_its_size_is_an_error_not_zeros():
    with pytest.raises(EOFError, match="ended after 5 of its 100 bytes"):
        arrow_file(_Truncated(b"12345"))
