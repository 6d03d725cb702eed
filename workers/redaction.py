"""Credentials kept out of every text vidlens prints or stores: the run configuration's storage
settings and the environment's (AWS_*, AZURE_*, GOOGLE_*), replaced by `***` in messages,
errors rows and log lines."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from schemas.config import REDACTED, StorageConfig, is_secret_option

#: environment variables whose values are credentials, redacted like the config's own.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN",
)


def secrets_of(storage: StorageConfig | dict[str, Any] | None = None) -> list[str]:
    """Every credential this process knows of: the config's and the environment's."""
    values: list[str] = []
    if isinstance(storage, StorageConfig):
        values += [v for v in (storage.key, storage.secret, storage.token) if v]
        values += list(_secret_values(storage.options))
    elif isinstance(storage, dict):
        values += list(_secret_values(storage))
    values += [os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name)]
    values += [part for value in values for part in _connection_string_secrets(value)]
    # longest first, so a secret containing another is replaced whole; tiny values are not secrets, nor
    # the path of a key file (gs:// storage.token), which a message names where it is not there
    return sorted({v for v in values if len(v) >= 4 and not v.endswith(".json")}, key=len, reverse=True)


def _connection_string_secrets(value: str) -> list[str]:
    """The account key and signature in an Azure connection string ("...;AccountKey=...;"), which
    a message may quote without the rest of the string."""
    fields = dict(part.split("=", 1) for part in value.split(";") if "=" in part)
    return [fields[name] for name in ("AccountKey", "SharedAccessSignature") if fields.get(name)]


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
    """`text` with every known credential replaced by `***`."""
    for value in sorted(set(secrets_of(storage)) | _REGISTERED, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


_REGISTERED: set[str] = set()


def register_secrets(storage: StorageConfig | None) -> None:
    """Remember this run's credentials so `redact()` and the log filter hide them everywhere."""
    _REGISTERED.update(secrets_of(storage))


class RedactingFilter(logging.Filter):
    """A logging filter that replaces known credentials in every record with `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message in place; never drops a record."""
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (the root logger by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
