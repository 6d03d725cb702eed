"""Reaching buckets: fsspec options from the config and the environment, retries.

The same `StorageConfig` travels with the run configuration to every worker, so the
driver (listing, writing) and the workers (downloading videos) reach a store the same way.
Credentials are best left to the environment each process already has (AWS_*, GOOGLE_*,
AZURE_*); wherever they come from, `workers.redaction` removes them from any text we print or
store.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from schemas.config import StorageConfig
from workers.redaction import environment_endpoint, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

#: adlfs's protocols (az:// and its aliases)
_AZURE = ("az", "abfs", "abfss", "adl")
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


class StorageError(OSError):
    """A store could not be reached or read; the message names the URI and never a credential."""


class EndpointWithoutScheme(StorageError):
    """A gs:// or az:// endpoint given without its scheme (127.0.0.1:4443), refused when the options
    are built: aiohttp took a gs:// one for no URL after gcsfs's 6 attempts (35 s), and the Azure SDK
    an az:// one for unreachable after its 4 (89 s)."""


class EndpointWithCredentials(StorageError):
    """An endpoint URL with a user name (and password) in it, for requests the store signs: aiohttp sends
    them as HTTP basic authentication, which it refuses to combine with a signed request's Authorization
    header ("Cannot combine AUTHORIZATION header with AUTH argument or credentials encoded in URL", a
    traceback, after botocore's retries on s3://); no store signs in with them. Refused when the options
    are built; an anonymous request (--anon) carries no header, and takes them (a proxy's password)."""


class UnknownProtocol(StorageError):
    """A URL's scheme is no filesystem's (s4://, a typo): the message names the schemes there are."""


def size_and_etag(info: dict[str, Any]) -> tuple[int, Any]:
    """An fsspec info dict's size and its ETag as the store gives it (ETag, etag or md5Hash;
    S3's and Azure's in quotes), or None: as a listing reads them, and a download checks them."""
    return int(info.get("size") or info.get("Size") or 0), info.get("ETag") or info.get("etag") or info.get("md5Hash")


def protocol_of(url: str) -> str:
    """The fsspec protocol of a URL ("file" for a plain path)."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_remote(uri: str) -> bool:
    """True for fsspec URLs other than local files (s3://, gs://, az://, memory://, ...)."""
    return "://" in uri and not uri.startswith("file://")


#: protocols that are another's alias, with the same URL form (Azure's have other forms: `_AZURE`)
_ALIASES = {"s3a": "s3", "gcs": "gs"}


def store_of(url: str) -> str:
    """The store a URL names, its protocol's aliases as one: "s3" (s3a://), "gs" (gcs://), "az"
    (abfs://, abfss://, adl://), else the protocol itself ("file" for a plain path)."""
    return "az" if protocol_of(url) in _AZURE else listed_protocol(url)


def listed_protocol(url: str) -> str:
    """The protocol a video's URI is given under: the URL's, in lower case, "s3" for s3a:// and "gs"
    for gcs:// (one URI a video, whichever alias named its bucket)."""
    protocol = protocol_of(url)
    return _ALIASES.get(protocol, protocol)


def storage_options(url: str, storage: StorageConfig | dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options for the filesystem of `url`, from the config and the environment.

    A plain dict is taken as ready-made fsspec options (the API's escape hatch). A gs:// or az://
    endpoint without its scheme is an `EndpointWithoutScheme`; the credentials the options name
    are checked before any request by `workers.storage_checks` (a gs:// key file that is not
    there or signs in nowhere, a user name and password in an endpoint, an Azure connection
    string's BlobEndpoint without its scheme).
    """
    if storage is None:
        storage = StorageConfig()
    if isinstance(storage, dict):
        return dict(storage)
    store = store_of(url)
    options: dict[str, Any] = {}
    if store == "s3":
        options = _s3_options(storage)
    elif store == "gs":
        options = {"token": "anon" if storage.anon else storage.token, "endpoint_url": storage.endpoint_url}
    elif store == "az":
        options = _azure_options(storage)
    options = {k: v for k, v in options.items() if v is not None}
    if store == "file":
        return {}
    options = deep_merge(options, storage.options)
    endpoint = options.get("endpoint_url") if store == "gs" else storage.endpoint_url if store == "az" else None
    if isinstance(endpoint, str) and endpoint and "://" not in endpoint:
        # (`pipeline.storage_errors` says where it may have been set, and the fix; an empty one is
        # none, as gcsfs, `_azure_options` and `_s3_options` take it)
        raise EndpointWithoutScheme(f"the endpoint {endpoint} has no scheme")
    from workers.storage_checks import checked_credentials  # (it raises this module's errors)

    return checked_credentials(url, store, storage, options)


def _s3_options(storage: StorageConfig) -> dict[str, Any]:
    from_environment = environment_endpoint()
    endpoint = storage.endpoint_url or (from_environment[0] if from_environment else None)
    client_kwargs = {"endpoint_url": endpoint, "region_name": storage.region}
    return {
        "anon": storage.anon or None,
        "key": storage.key,
        "secret": storage.secret,
        "token": storage.token,
        "client_kwargs": {k: v for k, v in client_kwargs.items() if v} or None,
        # botocore's own retries, with exponential backoff, cover every read, write and listing call
        "config_kwargs": {"retries": {"max_attempts": max(1, storage.retries), "mode": "standard"}},
    }


def _azure_options(storage: StorageConfig) -> dict[str, Any]:
    """adlfs options. An https endpoint (Azure's other clouds, as ...blob.core.chinacloudapi.cn,
    Azure Stack, a private endpoint) is adlfs's `account_host`, reached with any of Azure's
    credentials, Azure AD's (DefaultAzureCredential) too; the account is storage.key, else
    AZURE_STORAGE_ACCOUNT_NAME, else the endpoint's first label, as Azure names its hosts. adlfs
    reaches a host only over https: a plain http one (Azurite) goes into a connection string with
    the account and its key or SAS token, as Azure's own tools write one; the environment's,
    which adlfs reads only without one, too."""
    options = {"account_name": storage.key, "account_key": storage.secret, "sas_token": storage.token,
               "anon": storage.anon or None}
    if not storage.endpoint_url:
        return options
    account = storage.key or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    scheme, _, host = storage.endpoint_url.partition("://")
    if scheme.lower() == "https":
        return {**options, "account_name": account or host.split(".", 1)[0], "account_host": host.rstrip("/")}
    key = None if storage.anon else storage.secret or os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
    sas = None if storage.anon else storage.token or os.environ.get("AZURE_STORAGE_SAS_TOKEN")
    fields = {"BlobEndpoint": storage.endpoint_url, "AccountName": account,
              "AccountKey": key, "SharedAccessSignature": sas.lstrip("?") if sas else None}
    return {"connection_string": "".join(f"{name}={value};" for name, value in fields.items() if value)}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra`'s keys added or replacing, mappings in both merged the same way."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def url_to_fs(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """`fsspec.core.url_to_fs`, but a gs:// store reached through an `endpoint_url` (an
    emulator, a GCS-compatible store) gets gcsfs's plain filesystem.

    From gcsfs 2026.10 its default filesystem asks Google's control plane over gRPC for the
    layout of each bucket it touches, and does not remember a failed answer: through another
    endpoint, every operation waited 60 s for that call (measured against an emulator). The
    first gs:// filesystem also quiets gcsfs's tracebacks (`_gcsfs_gives_up_in_one_line`). A
    store whose filesystem is not installed is a StorageError that says which to install, and a
    scheme that is no store's (s4://, a typo) an `UnknownProtocol` naming the URL. The scheme is
    read in any case (S3://, as a URL's scheme is): fsspec knows only the lower-case names.
    """
    lower_case = f"{protocol_of(url)}://{url.split('://', 1)[1]}" if "://" in url else url
    try:
        return _url_to_fs(lower_case, options)
    except ImportError as exc:  # the output's store too (`Store`), not only a source's
        raise StorageError(
            f"{url}: no filesystem for {protocol_of(url)}:// is installed ({exc}); install s3fs, "
            f"gcsfs or adlfs for s3://, gs:// or az://"
        ) from None
    except ValueError as exc:
        if not str(exc).startswith("Protocol not known"):  # fsspec's words for a scheme it has no filesystem for
            raise
        raise UnknownProtocol(
            f"{url}: {protocol_of(url)}:// is the scheme of no storage vidlens can read (a typo?); give a local "
            f"path or a file:// URL, or an s3:// (s3a://), gs:// (gcs://) or az:// (abfs://, abfss://) URL"
        ) from None


def _url_to_fs(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    import fsspec

    if store_of(url) == "s3":
        _small_puts_sent_at_once()
    if store_of(url) == "gs":
        _gcsfs_gives_up_in_one_line()
        if options.get("endpoint_url"):
            from gcsfs.core import GCSFileSystem

            return GCSFileSystem(**options), GCSFileSystem._strip_protocol(url)
    if store_of(url) == "az":
        _azure_credentials_said_once()
        if options.get("account_name"):
            options = _without_the_urls_account(url, options)
    return fsspec.core.url_to_fs(url, **options)


def azure_account_host(url: str) -> str | None:
    """The host after the container of an Azure URL that names its account
    (abfs://container@account.dfs.core.windows.net/... gives "account.dfs.core.windows.net"),
    else None (az://container/..., and any other store's URL)."""
    if store_of(url) != "az":
        return None
    authority = url.split("://", 1)[1].split("/", 1)[0]
    return authority.split("@", 1)[1] if "@" in authority else None


def _without_the_urls_account(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """An Azure URL naming its account (abfs://container@account.dfs.core.windows.net/...) and
    an account in the options (storage.key): fsspec gave adlfs both ("got multiple values for
    keyword argument 'account_name'"). The same account is given once; two are refused."""
    host = azure_account_host(url) or ""
    if not host.endswith((".dfs.core.windows.net", ".blob.core.windows.net")):
        return options
    named = host.split(".", 1)[0]
    if options["account_name"] != named:
        raise StorageError(f"{url} names the Azure account {named!r}, and the storage config (storage.key) "
                           f"another: leave storage.key out, or name that account in the URL")
    return {k: v for k, v in options.items() if k != "account_name"}


class _WithoutTraceback(logging.Filter):
    """Drops a record's traceback, keeping its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


@functools.cache
def _gcsfs_gives_up_in_one_line() -> None:
    """gcsfs logs a call it gives up on ("_request out of retries on exception: ...") with a
    30-line traceback at ERROR; vidlens reports the error itself (a message, an errors row), so
    the line stays and the traceback goes."""
    logging.getLogger("gcsfs").addFilter(_WithoutTraceback())


#: bytes from which an S3 PUT asks the server to accept it before its body is sent.
EXPECT_CONTINUE_FROM = 2**20


@functools.cache
def _small_puts_sent_at_once() -> None:
    """botocore has each PUT to S3 ask the server to accept it before its body is sent (`Expect:
    100-continue`), whatever its size: a round trip more for each Parquet file and manifest a
    run writes. A body under `EXPECT_CONTINUE_FROM` bytes is now sent with its headers (a server
    refusing it does so having read it); a larger one, or one of unknown size, still asks first.
    Applies to every botocore session this process makes from then on (s3fs makes its own at
    its first call), and to no session made before."""
    try:
        from botocore import handlers, utils
    except ImportError:  # (no s3fs: nothing sends to S3)
        return

    def expect_for_large_bodies(model: Any, params: dict, **kwargs: Any) -> None:
        body = params.get("body")
        size = utils.determine_content_length(body) if hasattr(body, "read") else None
        if size is not None and size < EXPECT_CONTINUE_FROM:
            return
        handlers.add_expect_header(model, params, **kwargs)

    handlers.BUILTIN_HANDLERS[:] = [(event, expect_for_large_bodies, *rest) if handler is handlers.add_expect_header
                                    else (event, handler, *rest) for event, handler, *rest in handlers.BUILTIN_HANDLERS]


class _OnlyOnce(logging.Filter):
    """Lets each message through once: the same one again is dropped (the first `limit` kept)."""

    def __init__(self, limit: int = 100) -> None:
        super().__init__()
        self._seen: set[str] = set()
        self._limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        if len(self._seen) < self._limit:
            self._seen.add(message)
        return True


@functools.cache
def _azure_credentials_said_once() -> None:
    """azure-identity logs each failed try of its credential chain (DefaultAzureCredential,
    which adlfs uses where an account is named without a key or SAS) as a 12-line warning: one
    listing on a machine without Azure credentials printed it 4 times, then vidlens' own error.
    The first says which credentials were tried; the same one again is dropped."""
    once = _OnlyOnce()
    for name in ("azure.identity._credentials.chained", "azure.identity.aio._credentials.chained"):
        logging.getLogger(name).addFilter(once)


def open_filesystem(url: str, storage: StorageConfig | dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`, reached as `storage` says."""
    return url_to_fs(url, storage_options(url, storage))


# --- retries ------------------------------------------------------------------------------


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
