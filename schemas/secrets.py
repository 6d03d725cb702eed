"""Which configuration values are credentials, and how they are shown: never printed, stored or
fingerprinted (`RunConfig.redacted_dict`, `workers.redaction` for messages and logs)."""

from __future__ import annotations

from typing import Any

#: settings of `storage` whose values are secrets: never printed, stored or fingerprinted.
SECRET_STORAGE_KEYS = ("key", "secret", "token")
#: what a secret is replaced with wherever a configuration is shown or stored.
REDACTED = "***"
#: those settings by their dotted names.
SECRET_SETTINGS = frozenset(f"storage.{name}" for name in SECRET_STORAGE_KEYS)


def is_secret_option(name: str) -> bool:
    """Whether an fsspec option name holds a credential (key, secret, token, password, ...; an
    Azure connection string carries the account key)."""
    lowered = name.lower()
    return any(word in lowered for word in ("key", "secret", "token", "password", "credential",
                                            "sas", "signature", "connection_string", "conn_str"))


def url_userinfo(url: Any) -> tuple[str, str | None] | None:
    """(user, password or None) of a URL that names them before its host (http://user:password@host),
    else None."""
    if not isinstance(url, str) or "://" not in url:
        return None
    authority = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" not in authority:
        return None
    user, colon, password = authority.rpartition("@")[0].partition(":")
    return user, password if colon else None


def redacted_url(url: Any) -> Any:
    """An http(s) URL with its password shown as `***` (http://user:***@host); a user name alone may be
    a token (http://TOKEN@host), and is shown so too. Anything else as it is (abfs://CONTAINER@ACCOUNT...
    names a container there)."""
    userinfo = url_userinfo(url)
    if userinfo is None or not url.lower().startswith(("http://", "https://")):
        return url
    scheme, rest = url.split("://", 1)
    user, password = userinfo
    given = user if password is None else f"{user}:{password}"
    shown = REDACTED if password is None else f"{user}:{REDACTED}"
    return f"{scheme}://{shown}{rest[len(given):]}"


def redact_options(options: Any) -> Any:
    """fsspec options with every secret-looking one's value shown as `***`, at any depth."""
    if isinstance(options, dict):
        return {k: REDACTED if is_secret_option(str(k)) and v is not None else redact_options(v)
                for k, v in options.items()}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    return redacted_url(options)  # (an endpoint_url, in s3fs' client_kwargs too)
