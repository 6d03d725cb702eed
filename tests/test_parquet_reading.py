import io
import sys
import weakref

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


class _Kept(io.BytesIO):
    """A file that keeps what each of its reads returned, to count who else holds it."""

    def __init__(self, data: bytes, size: int | None) -> None:
        super().__init__(data)
        self.size, self.returned = size, []

    def read(self, *args) -> bytes:
        self.returned.append(bytes(bytearray(super().read(*args))))  # (not BytesIO's own)
        return self.returned[-1]


def test_the_reader_holds_neither_the_file_nor_its_bytes_as_python_objects():
    """(mutation review) The point of `arrow_file`: Arrow's threads let go of nothing that needs the GIL, so
    neither the file nor bytes it returned (as `pa.BufferReader(handle.read())` would keep them) are held."""
    for size in (len(_parquet_bytes()), None):
        handle = _Kept(_parquet_bytes(), size)
        reader = arrow_file(handle)
        assert all(sys.getrefcount(handle.returned[i]) == 2 for i in range(len(handle.returned))), size  # (list, call)
        held = weakref.ref(handle)
        del handle
        assert held() is None, size
        assert pq.read_table(reader).num_rows == 2
