"""Log lines of the local executor's worker processes, written by the driver above its progress bar.

A worker process's warning written straight to stderr lands in the middle of the progress
bar's line ("4video [00:00, ...]WARNING workers.sampling: ..."). The workers send their log
records to the driver instead (`send_logs_to`), where `LogRelay` hands each to the driver's
own logger of that name: its handlers, formatting and secret redaction apply. While the bar
runs (`above_progress_bar`), whatever is written to the console (a console log handler,
Ray's lines from its workers, print) clears the bar, is written whole, and the bar is drawn again.
The command line's console handler prints each record's message as one line (`OneLineFormatter`),
and so does a Ray worker's (`log_like_the_command_line`), whose lines Ray relays to the driver.
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

from pipeline.summary import printable

#: how the command line prints a log record
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: a record larger than this is cut down: a pipe write of at most PIPE_BUF bytes is never
#: interleaved with another process's, and a worker's decode child may be killed at any moment
#: (Connection.send_bytes writes its 4-byte header and a payload of up to 16 KiB in one write)
_MAX_BYTES = getattr(select, "PIPE_BUF", 4096) - 4


class OneLineFormatter(logging.Formatter):
    """A record's message on one line, its control characters and line separators escaped (`printable`): a
    file name an uploader chose is logged as it is (a decode's warning, a listing's "left out"), and a newline
    in it began a forged line of the log, an ESC [2J cleared the terminal. A traceback, on lines of its own by
    design, is printed as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not record.message.isprintable():  # (a C loop: most messages pass unchanged at once)
            record.message = printable(record.message)
        return super().formatMessage(record)


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


def log_like_the_command_line(storage: Any) -> None:
    """In a Ray worker process: its log records printed to its stderr, which Ray relays to the driver after
    the worker's name, as the command line prints its own (`LOG_FORMAT`, one line, the credentials in
    `storage` and the environment as `***`). Until 2026-12-07 they reached Python's last-resort handler:
    the message alone, without its level or logger, a file name's terminal escapes raw on the user's
    terminal, and a credential whole. Called for each run's configuration a worker process serves (a
    worker outlives a run); a handler already there (a Ray `LoggingConfig`'s) is kept, and gets the
    redaction only."""
    from workers.redaction import install_log_redaction, register_secrets

    root = logging.getLogger()
    if not root.handlers:
        console = logging.StreamHandler()
        console.setFormatter(OneLineFormatter(LOG_FORMAT))
        root.addHandler(console)
    register_secrets(storage)
    install_log_redaction()


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
    """A text stream that writes whole lines above the progress bars: the bars are cleared,
    the lines written, the bars drawn again. A line written in pieces (print writes its text
    and its newline apart) is held until it is whole."""

    def __init__(self, stream: Any, bar_stream: Any) -> None:
        self.stream, self.bar_stream = stream, bar_stream
        self._held = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._held += text
            if "\n" not in self._held:
                return len(text)
            lines, self._held = self._held.rsplit("\n", 1)
        self._above(lines + "\n")
        return len(text)

    def _above(self, text: str) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.bar_stream):  # stdout and stderr share the terminal
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        pass  # a part line waits for its end: written now, the bar's next redraw would erase it

    def close_line(self) -> None:
        """Write what is held of a part line."""
        if self._held:
            self.stream.write(self._held)
            self.stream.flush()
            self._held = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)  # isatty, fileno, encoding: the console's


@contextlib.contextmanager
def above_progress_bar(enabled: bool = True) -> Iterator[Any]:
    """While the bar runs, console output is written above it: that of every logger's console
    handler, and whatever else writes to sys.stderr or sys.stdout (Ray's lines from its workers,
    Python's warnings). Yields the console's own stream (sys.stderr as it was), which the bar
    writes to."""
    if not enabled:
        yield sys.stderr
        return
    consoles = {id(sys.stderr): _AboveBar(sys.stderr, sys.stderr), id(sys.stdout): _AboveBar(sys.stdout, sys.stderr)}
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    swapped = [(handler, handler.stream) for logger in loggers for handler in logger.handlers
               if type(handler) is logging.StreamHandler and id(handler.stream) in consoles]
    for handler, stream in swapped:
        handler.setStream(consoles[id(stream)])
    standard = sys.stderr, sys.stdout
    sys.stderr, sys.stdout = consoles[id(sys.stderr)], consoles[id(sys.stdout)]
    try:
        yield standard[0]
    finally:
        sys.stderr, sys.stdout = standard
        for handler, stream in swapped:
            handler.setStream(stream)
        for console in consoles.values():
            console.close_line()
