"""Reaching buckets: fsspec options from the config and the environment (retries: `workers.storage_retries`).

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
from typing import Any

from schemas.config import StorageConfig
from workers.redaction import environment_endpoint

log = logging.getLogger(__name__)
#: adlfs's protocols (az:// and its aliases)
_AZURE = ("az", "abfs", "abfss", "adl")
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
