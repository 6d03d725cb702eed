"""Parquet files handed to pyarrow in memory it owns, never as a Python file or Python bytes.

Given a Python file (fsspec's, on a bucket or a local folder), pyarrow reads it on its own I/O
threads, and its readers keep the file and the bytes each read returned in state that its threads
let go of a moment after the read has returned; Python bytes (`pa.BufferReader(data)`) are kept
so too. Let go of while the interpreter exits, each needs the GIL, which a finalizing interpreter
answers by ending the thread inside Arrow's C++ code: "terminate called without an active
exception" (SIGABRT, exit 134) once the command's work was done (2 of 28 forgets of a chaos soak,
2026-12-07; gdb: `~PyBuffer` on an Arrow pool thread, in `PyGILState_Ensure` and `pthread_exit`).
Let go of after it, the thread waits for the GIL for good and the exit hangs in Arrow's pool
shutdown (`~PyReadableFile`; apache/arrow#33975, #50482).
A file read here into a buffer Arrow allocated holds no Python object: its threads let go of it
at any time.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def arrow_file(handle: Any) -> pa.BufferReader:
    """The rest of the open file `handle` (fsspec's) read into memory Arrow owns, for `pq.read_table`
    or `pq.ParquetFile`: the whole file at once (a bucket's in one request), read into that memory
    where its size is known."""
    size = getattr(handle, "size", None)
    if size is None:  # (a stream of unstated length: an HTTP server's without a Content-Length)
        data = handle.read()
        buffer = pa.allocate_buffer(len(data))
        memoryview(buffer).cast("B")[:] = data
        return pa.BufferReader(buffer)
    size -= handle.tell()
    buffer = pa.allocate_buffer(size)
    view = memoryview(buffer).cast("B")
    done = 0
    while done < size:
        read = handle.readinto(view[done:])
        if not read:
            raise EOFError(f"{getattr(handle, 'path', 'a file')} ended after {done} of its {size} bytes")
        done += read
    return pa.BufferReader(buffer)
