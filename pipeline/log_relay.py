"""Log lines of the local executor's worker processes, written by the driver above its progress bar.

A worker process's warning written straight to stderr lands in the middle of the progress
bar's line ("4video [00:00, ...]WARNING workers.sampling: ..."). The workers send their log
records to the driver instead (`send_logs_to`), where `LogRelay` hands each to the driver's
own logger of that name: its handlers, formatting and secret redaction apply, and while the
bar runs (`above_progress_bar`) a console handler clears the bar, writes and redraws it.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import select
import sys
import threading
from collections.abc import Iterator
from typing import Any

#: a record larger than this is cut down: a pipe write of at most PIPE_BUF bytes is never
#: interleaved with another process's, and a worker's decode child may be killed at any moment
#: (Connection.send_bytes writes its 4-byte header and a payload of up to 16 KiB in one write)
_MAX_BYTES = getattr(select, "PIPE_BUF", 4096) - 4


class _Sender(logging.Handler):
    """In a worker: each record, its message formatted, pickled and written to the driver in one write."""

    def __init__(self, writer: Any) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = record.exc_text or (logging.Formatter().formatException(record.exc_info)
                                           if record.exc_info else None)
            # what a record holds, as plain values (a `extra=` object need not pickle)
            fields = {key: value if isinstance(value, (str, int, float, type(None))) else str(value)
                      for key, value in record.__dict__.items() if key not in ("args", "exc_info", "message")}
            for cut in (None, 700, 100):  # a long message or traceback keeps its start and end
                fields.update(msg=_shorter(record.getMessage(), cut), exc_text=_shorter(exc_text, cut))
                payload = pickle.dumps(fields)
                if len(payload) <= _MAX_BYTES:
                    self.writer.send_bytes(payload)
                    return
        except Exception:  # noqa: BLE001 - logging must never stop the work
            self.handleError(record)


def _shorter(text: str | None, cut: int | None) -> str | None:
    return text if text is None or cut is None or len(text) <= 2 * cut else f"{text[:cut]} ... {text[-cut:]}"


def send_logs_to(writer: Any, level: int) -> None:
    """In a new worker process: its log records at `level` and above go to the driver's `LogRelay`."""
    root = logging.getLogger()
    root.handlers[:] = [_Sender(writer)]
    root.setLevel(level)


class LogRelay:
    """In the driver: a thread that logs the records the workers send, as if logged here.

    `writer` goes to the workers (`send_logs_to`). Start it once they have started (no thread
    of this process may run while they fork); `close` after they have stopped.
    """

    def __init__(self, context: Any) -> None:
        self._reader, self.writer = context.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._pump, name="vidlens-log-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                payload = self._reader.recv_bytes()
            except (EOFError, OSError):
                return
            if not payload:
                return  # `close`: every record sent before it has been logged
            record = logging.makeLogRecord(pickle.loads(payload))
            logging.getLogger(record.name).handle(record)

    def close(self, wait: bool = True) -> None:
        """Stop once what the workers sent before now is logged. Without `wait` (workers left
        running, as a cancelled pool's), go on logging what they send: a worker whose writes
        nobody read would block once the pipe is full."""
        if wait and self._thread.is_alive():
            self.writer.send_bytes(b"")
            self._thread.join(timeout=10)


class _AboveBar:
    """A stream for a console log handler: each write clears the progress bars, then redraws them."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def above_progress_bar(enabled: bool = True) -> Iterator[None]:
    """While the bar runs: the root logger's handlers that write to the console write above it."""
    swapped = [handler for handler in logging.getLogger().handlers
               if enabled and type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout)]
    for handler in swapped:
        handler.setStream(_AboveBar(handler.stream))
    try:
        yield
    finally:
        for handler in swapped:
            handler.setStream(handler.stream.stream)
