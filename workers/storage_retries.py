"""Trying a store again: which errors another attempt may fix, retries with backoff, and lookups
(a file's info, a bucket's existence) that tell a missing thing from a store that cannot be read.

The store's own clients retry too (botocore, gcsfs, the Azure SDK); an error they have retried
already is not tried again here (`_retried_below`).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from schemas.config import StorageConfig
from workers.redaction import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

#: exception class names (anywhere in the cause chain) that mean "try again": network and throttling.
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "HTTPClientError", "ResponseStreamingError", "IncompleteRead", "IncompleteReadError",
    "ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError",
    "ServerTimeoutError", "FSTimeoutError", "TransportError", "ServiceUnavailable",
    "TooManyRequests", "InternalServerError", "GatewayTimeout", "BadGateway",
})
#: words in an error message that mean the store is busy or briefly unwell.
_TRANSIENT_WORDS = ("SlowDown", "ServiceUnavailable", "Service Unavailable", "InternalError",
                    "RequestTimeout", "Throttl", "TooManyRequests", "Connection reset", "timed out",
                    "503", "502", "504", "500 Internal")
#: errors that another attempt cannot fix.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              FileExistsError, ValueError, TypeError, KeyError)



def cause_chain(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """`exc` and what it was raised from or while handling, in turn (at most `limit`, no cycles)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < limit:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: timeouts, dropped connections, throttling, 5xx."""
    for error in cause_chain(exc, limit=5):
        if isinstance(error, (TimeoutError, ConnectionError)):
            return True
        if {cls.__name__ for cls in type(error).__mro__} & _TRANSIENT_NAMES:
            return True
        if not isinstance(error, _PERMANENT) and any(w in str(error) for w in _TRANSIENT_WORDS):
            return True
    return False


def with_retries(call: Callable[[], T], what: str, storage: StorageConfig | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, tried again with exponential backoff (and jitter) while it fails transiently.

    An error the store's own client has retried is not tried again (`_retried_below`): botocore
    (s3://) makes `storage.retries` attempts with backoff at every transient error
    (`_s3_options`), s3fs retries interrupted reads, gcsfs (gs://) makes 6 attempts, the Azure
    SDK (az://, under adlfs) 4 with 15 s and more between. Retried here too, a wrong endpoint took
    25 attempts and 108 s to be reported on s3://, 30 and 210 s on gs://, 5 rounds of the SDK's
    85 s on az:// (435 s).
    """
    storage = storage if isinstance(storage, StorageConfig) else StorageConfig()
    attempts = max(1, storage.retries)
    delay = storage.retry_backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc) or _retried_below(exc):
                raise
            wait = delay * (1 + random.random() / 2)
            log.warning("%s failed (%s); retry %d of %d in %.1fs", what,
                        redact(one_line(exc), storage), attempt, attempts - 1, wait)
            sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")


def file_info(fs: Any, path: str, what: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """`fs.info(path)` (with retries) when `path` is a file; None for a folder, a prefix or nothing.

    Not `fs.isfile`: it answers False for any error, so a store that cannot be reached or read
    passed for a missing file (a manifest "does not exist" without credentials), after a
    lookup's retries in silence (34 s on an unreachable gs:// store).
    """
    try:
        info = with_retries(lambda: fs.info(path), what, storage)
    except FileNotFoundError:
        return None
    return info if info.get("type") == "file" else None


def bucket_seen(fs: Any, bucket: str) -> bool:
    """True where `bucket` exists; FileNotFoundError in the store's words where it does not
    (`pipeline.storage_errors` names it "the bucket does not exist"); False where looking was
    refused: refused credentials, a policy that allows a prefix only, an Azure container's SAS
    that may not read its properties (the SDK's 403); a HEAD's refusal does not say which."""
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise FileNotFoundError(f"The specified bucket does not exist: {bucket}") from None
    except Exception as exc:  # noqa: BLE001 - a refusal is told apart here; anything else is raised
        # (gcsfs's 403 is OSError("Forbidden: URL"): its GET of the bucket refused, then its root's listing)
        if (isinstance(exc, PermissionError) or getattr(exc, "status_code", None) == 403
                or type(exc) is OSError and str(exc).startswith("Forbidden: ")):
            return False
        raise
    return True


def bucket_looked_up(fs: Any, path: str, retry: StorageConfig | None = None) -> bool:
    """`bucket_seen` for the bucket of `path` (a URL, or the filesystem's path: its first part),
    retried as any lookup (`with_retries`)."""
    bucket = path.split("://", 1)[-1].split("/", 1)[0]
    return with_retries(lambda: bucket_seen(fs, bucket), f"look up bucket {bucket}", retry)


def _retried_below(exc: BaseException) -> bool:
    """Whether `exc`, or an error in its cause chain, comes from a store client that retried it
    already: raised by botocore or the Azure SDK (azure-core's retry policy), or passed up
    through gcsfs's retry loop (`retry_request`)."""
    for error in cause_chain(exc, limit=5):
        if type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "azure"):
            return True
        if any(frame.f_code.co_name == "retry_request" and frame.f_globals.get("__name__") == "gcsfs.retry"
               for frame, _ in traceback.walk_tb(error.__traceback__)):
            return True
    return False


def one_line(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
