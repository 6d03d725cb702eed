"""Credentials kept out of every text vidlens prints or stores: the run configuration's storage
settings and the environment's (AWS_*, AZURE_*, GOOGLE_*), replaced by `***` in messages,
errors rows and log lines."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Collection, Iterable
from typing import Any

from schemas.config import StorageConfig
from schemas.secrets import REDACTED, is_secret_option, url_userinfo

#: environment variables whose values are credentials, redacted like the config's own.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN",
)


#: environment variables that may give an s3:// endpoint, in botocore's order (the first set is used); an
#: endpoint's password is a credential
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: the environment variable gcsfs reads a gs:// endpoint from where none is given (an emulator's)
GCS_ENDPOINT_ENV_VAR = "STORAGE_EMULATOR_HOST"
#: a URL's user name and password in any text (http://user:password@host): a store's error or a log line
#: may quote the endpoint (group 1: up to the user name, group 2: the password)
_URL_PASSWORD = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/?#@:]*):([^\s/?#@]*)@")


#: gcsfs's ways to sign in that a string token names (`GCSFileSystem(token="google_default")`)
GCS_SIGN_IN_METHODS = frozenset({"google_default", "cache", "anon", "browser", "cloud"})


def is_gcs_key_file(token: str) -> bool:
    """Whether a gs:// string token is taken for a key file's path: it has a "/" or ends in .json (a
    file in the working folder, as gcsfs looks for it). Any other is a way to sign in or a raw access
    token (ya29...), which gcsfs takes a token naming no file for; a key file's contents (JSON, whose
    private key has "/") are no path (`is_key_file_contents`)."""
    return not is_key_file_contents(token) and ("/" in token or os.sep in token or token.endswith(".json"))


def is_key_file_path(token: Any) -> bool:
    """Whether a string token is a JSON key file's path whatever store gets it: from / or ~, ending in
    .json, without = & or ?. No credential has that shape (an S3 session token is base64, with no ".";
    a SAS has "=" and "&"; a raw access token (ya29...) or a JWT starts with a letter), so messages name
    it where the stores are not known too: a worker's, a manifest's run (a worker without the file said
    "storage.token names ***")."""
    return (isinstance(token, str) and token.startswith(("/", "~")) and token.endswith(".json")
            and not any(mark in token for mark in "=&?"))


def is_key_file_contents(token: str) -> bool:
    """Whether a string token is a key file's contents given inline (a JSON object), a secret on every store."""
    return token.lstrip().startswith("{")


def secrets_of(storage: StorageConfig | dict[str, Any] | None = None,
               stores: Collection[str] | None = None) -> list[str]:
    """Every credential this process knows of: the config's and the environment's.

    `stores`: the stores ("s3", "gs", "az") the config reaches, where they are known. Where it is
    gs:// alone, a string token that names a key file or a way to sign in is no secret (the file's
    contents are), and messages name it; on s3:// and az:// the same setting is a session token or a
    SAS, so where another store may get it, or the stores are not known, it is one, unless it has a
    key file path's shape no credential has (`is_key_file_path`).
    """
    gcs_only = stores is not None and set(stores) == {"gs"}
    values: list[str] = []
    if isinstance(storage, StorageConfig):
        token = None if _names_no_secret(storage.token, gcs_only) else storage.token
        values += [v for v in (storage.key, storage.secret, token) if v]
        values += list(_secret_values(_without_gcs_token(storage.options, gcs_only)))
    elif isinstance(storage, dict):
        values += list(_secret_values(_without_gcs_token(storage, gcs_only)))
    values += [os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name)]
    endpoints = [url for url, _ in endpoints_given(storage)]
    endpoints += [os.environ.get(name) for name in (*ENDPOINT_ENV_VARS, GCS_ENDPOINT_ENV_VAR)]
    values += [_password_of(url) for url in endpoints]
    values += [part for value in values for part in _connection_string_secrets(value)]
    # longest first, so a secret containing another is replaced whole; tiny values are not secrets
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def endpoints_given(storage: StorageConfig | dict[str, Any] | None) -> list[tuple[Any, str]]:
    """Each endpoint URL the configuration may give a store (None where not given), with the setting
    it is given in: `storage.endpoint_url`, its options' and s3fs' client_kwargs' (ready-made options:
    the dict's own). The environment's are `environment_endpoint`'s."""
    options = storage.options if isinstance(storage, StorageConfig) else storage or {}
    client_kwargs = options.get("client_kwargs")
    return [(storage.endpoint_url if isinstance(storage, StorageConfig) else None,
             "storage.endpoint_url (--endpoint-url)"),
            (options.get("endpoint_url"), "storage.options' endpoint_url"),
            (client_kwargs.get("endpoint_url") if isinstance(client_kwargs, dict) else None,
             "storage.options' client_kwargs.endpoint_url")]


def environment_endpoint(store: str = "s3") -> tuple[str, str] | None:
    """The endpoint the environment gives `store`, and the variable's name: s3://'s as botocore reads it
    (the first of `ENDPOINT_ENV_VARS` set), gs://'s as gcsfs does (`GCS_ENDPOINT_ENV_VAR`); None where
    none is set."""
    names = ENDPOINT_ENV_VARS if store == "s3" else (GCS_ENDPOINT_ENV_VAR,) if store == "gs" else ()
    return next(((os.environ[name], name) for name in names if os.environ.get(name)), None)


def _password_of(url: Any) -> str:
    """The password in an endpoint URL (http://user:password@host), or its user name alone (a token), or ""."""
    userinfo = url_userinfo(url)
    return "" if userinfo is None else userinfo[0] if userinfo[1] is None else userinfo[1]


def _names_no_secret(token: Any, gcs_only: bool) -> bool:
    """Whether a token is a key file's path (`is_key_file_path`), or, on gs:// alone, any key file's path
    or a way to sign in (a raw access token is a secret)."""
    return is_key_file_path(token) or (gcs_only and isinstance(token, str)
                                       and (token in GCS_SIGN_IN_METHODS or is_gcs_key_file(token)))


def _without_gcs_token(options: dict[str, Any], gcs_only: bool) -> dict[str, Any]:
    """Options less a token that names no secret; a token's mapping stays (its client_secret,
    refresh_token and private_key are secrets)."""
    return {k: v for k, v in options.items() if not (k == "token" and _names_no_secret(v, gcs_only))}


def connection_string_fields(value: str) -> dict[str, str]:
    """An Azure connection string's fields ("BlobEndpoint=...;AccountKey=..."), by their names in
    capitals: the Azure SDK reads the names in any case."""
    return {name.upper(): field for name, _, field in (part.partition("=") for part in value.split(";") if "=" in part)}


def _connection_string_secrets(value: str) -> list[str]:
    """The account key, signature and BlobEndpoint's password in an Azure connection string
    ("...;AccountKey=...;"), which a message may quote without the rest of the string."""
    fields = connection_string_fields(value)
    secrets = [fields[name] for name in ("ACCOUNTKEY", "SHAREDACCESSSIGNATURE") if fields.get(name)]
    return secrets + [_password_of(fields.get("BLOBENDPOINT"))]


def _secret_values(options: Any, secret: bool = False) -> Iterable[str]:
    if isinstance(options, dict):
        for key, value in options.items():
            yield from _secret_values(value, secret or is_secret_option(str(key)))
    elif isinstance(options, (list, tuple)):
        for value in options:
            yield from _secret_values(value, secret)
    elif secret and isinstance(options, str):
        yield options


def redact(text: str, storage: StorageConfig | dict[str, Any] | None = None) -> str:
    """`text` with every known credential replaced by `***`, and any URL's password (http://user:***@host)."""
    for value in sorted(set(secrets_of(storage)) | _REGISTERED, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text) if "@" in text else text


_REGISTERED: set[str] = set()


def register_secrets(storage: StorageConfig | None, stores: Collection[str] | None = None) -> None:
    """Remember this run's credentials so `redact()` and the log filter hide them everywhere;
    `stores`: the stores the config reaches, where known (`secrets_of`)."""
    _REGISTERED.update(secrets_of(storage, stores))


class RedactingFilter(logging.Filter):
    """A logging filter that replaces known credentials in every record with `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message, and its traceback's text, in place; never drops a record."""
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:  # (a formatter prints exc_text where it is set)
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def print_redacted_traceback(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    """Print an exception's traceback as Python does, every known credential replaced by `***` (a
    `sys.excepthook`): `vidlens -v` raises every error, and printed a raw access token that gcsfs had
    put in a URL it could not reach, whole."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, error, trace))))


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (the root logger by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
