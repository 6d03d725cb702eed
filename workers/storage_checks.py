"""Checks of a store's options before any request: what they name to sign in with, and endpoints.

Each refusal is a `StorageError` naming the setting and what to give instead, raised when the
options are built (`workers.storage.storage_options`), not after a library's retries: gcsfs
took a missing key file for "no credentials were found", botocore retried an endpoint holding a
password for a minute before its traceback, and the Azure SDK took an endpoint without its
scheme for an unreachable one.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from schemas.config import StorageConfig
from schemas.secrets import redacted_url, url_userinfo
from workers.redaction import (connection_string_fields, endpoints_given, environment_endpoint, is_gcs_key_file,
                                is_key_file_contents)
from workers.storage import EndpointWithCredentials, StorageError
from workers.storage_retries import one_line


def checked_credentials(url: str, store: str, storage: StorageConfig, options: dict[str, Any]) -> dict[str, Any]:
    """`options` for the store of `url`, a gs:// key file's token read as gcsfs takes it; a StorageError
    where what they name cannot sign in or would be refused."""
    _require_endpoint_without_credentials(url, store, storage, options)
    if store == "gs" and options.get("token") is not None:
        setting = ("storage.options' token (--storage-option token=...)" if "token" in storage.options
                   else "storage.token")
        options["token"] = _gcs_token(url, options["token"], setting)
    elif store == "gs":
        _require_credentials_file(url)
    if store == "az":
        _require_usable_blob_endpoint(url, options.get("connection_string"))
    return options


#: how each store is given credentials, for a message that refuses them in an endpoint
_CREDENTIALS_SETTINGS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (or storage.key and storage.secret)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS in the environment (or storage.token)",
    "az": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY in the environment (or storage.key and "
          "storage.secret, or storage.token: a SAS)",
}


def _require_endpoint_without_credentials(url: str, store: str, storage: StorageConfig,
                                          options: dict[str, Any]) -> None:
    """`EndpointWithCredentials`, before any request, where the endpoint the store gets names a user (and
    password) and its requests are signed (not --anon). The message names the setting it came from and the
    endpoint with its password as `***`."""
    given = endpoints_given(storage)
    if not any(endpoint for endpoint, _ in given):  # (`_s3_options` and gcsfs read it then)
        given += [environment_endpoint(store) or (None, "")]
    found = next(((endpoint, setting) for endpoint, setting in given if url_userinfo(endpoint)), None)
    anon = storage.anon or options.get("anon") is True or options.get("token") == "anon"
    if found is None or anon or store not in _CREDENTIALS_SETTINGS:
        return
    endpoint, setting = found
    raise EndpointWithCredentials(
        f"cannot use {url}: {setting} is {redacted_url(endpoint)}, with a user name and password in it, which "
        f"the store does not sign in with: give the endpoint without them, and the credentials through "
        f"{_CREDENTIALS_SETTINGS[store]}")


def _require_usable_blob_endpoint(url: str, connection_string: str | None) -> None:
    """StorageError, before any request, where the connection string adlfs uses (storage.options',
    else AZURE_STORAGE_CONNECTION_STRING) has a BlobEndpoint the Azure SDK cannot use: one without its
    scheme (127.0.0.1:10000/devstoreaccount1), which it reached over https, and an Azurite one was said
    to be unreachable after its 4 attempts (86 s); or one with a user name and password beside the
    account key, which signs each request with a header aiohttp does not combine with them ("Cannot
    combine AUTHORIZATION header ..."; a SAS goes in the query, and the password reaches a proxy). The
    message names the endpoint, its password as `***`, never the string's key."""
    setting = "storage.options' connection_string (--storage-option connection_string=...)"
    if not connection_string:  # (adlfs's own fallback)
        setting = "AZURE_STORAGE_CONNECTION_STRING"
        connection_string = os.environ.get(setting)
    if not isinstance(connection_string, str):
        return
    fields = connection_string_fields(connection_string)
    endpoint = fields.get("BLOBENDPOINT")
    if endpoint and "://" not in endpoint:
        raise StorageError(f"cannot use {url}: the connection string's BlobEndpoint, in {setting}, is {endpoint}, "
                           "with no scheme: write it with http:// or https://, e.g. "
                           "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1 (Azurite)")
    if url_userinfo(endpoint) and fields.get("ACCOUNTKEY"):
        raise EndpointWithCredentials(
            f"cannot use {url}: the connection string's BlobEndpoint, in {setting}, is {redacted_url(endpoint)}, "
            "with a user name and password in it, which the store does not sign in with beside the AccountKey: "
            "give the endpoint without them")


def _gcs_token(url: str, token: Any, setting: str) -> Any:
    """The token gcsfs is to sign in with: a key file's path (storage.token) with its ~ expanded, which
    gcsfs does not do; any other as it is (anon, gcsfs's other ways to sign in, a raw token, a mapping).

    A StorageError, before any request, where that file is not there: gcsfs takes a token naming no
    file for a raw access token (a mistyped path was sent to Google's oauth2 endpoint as one). So it
    took a key file's contents given inline, which the refusal of a path quoted, private key and all:
    they are refused too, without a word of them."""
    if isinstance(token, str) and is_key_file_contents(token):
        raise StorageError(f"cannot use {url}: {setting} holds a key file's contents (JSON), which gcsfs does not "
                           "take: give the path of the key file instead")
    if not (isinstance(token, str) and is_gcs_key_file(token)):
        return token
    path = os.path.expanduser(token)
    named = token if path == token else f"{token} ({path})"
    if not os.path.exists(path):
        raise StorageError(f"cannot use {url}: {setting} names {named}, which does not exist: give the path of a "
                           "service account's key file (JSON) that is there, on every machine of the run")
    problem = _unusable_key_file(path, by_gcsfs=True)
    if problem:
        raise StorageError(f"cannot use {url}: {setting} names {named}, which {problem}: give the path of a service "
                           "account's key file (JSON, as the Google Cloud console downloads it) or of a user's "
                           "credentials (`gcloud auth application-default login` writes them)")
    return path


#: what gcsfs reads from a key file that is a user's credentials (`gcloud auth application-default login`'s)
_USER_CREDENTIAL_FIELDS = ("client_id", "client_secret", "refresh_token")
#: the kinds of credentials file google-auth reads from GOOGLE_APPLICATION_CREDENTIALS (its "type")
_GOOGLE_AUTH_KINDS = ("service_account", "authorized_user", "external_account", "external_account_authorized_user",
                      "impersonated_service_account", "gdch_service_account")


def _unusable_key_file(path: str, by_gcsfs: bool) -> str | None:
    """Why the key file at `path` signs in nowhere, in words that follow "which"; None where it may. Its
    contents are never quoted. gcsfs (storage.token) takes a service account's key or a user's credentials,
    and said "KeyError: 'refresh_token'" or "Expecting value: line 1 column 1 (char 0)" of anything else;
    google-auth (GOOGLE_APPLICATION_CREDENTIALS) takes those and its other kinds, and where it refused the
    file, gcsfs read the bucket anonymously, without a word."""
    try:
        status = os.stat(path)
    except OSError as exc:
        return f"cannot be read ({one_line(exc)})"
    # once a version of the file: loading a service account's private key takes 40 ms, and every
    # download opens its filesystem
    return _key_file_problem(path, status.st_mtime_ns, status.st_size, by_gcsfs)


@functools.lru_cache(maxsize=16)
def _key_file_problem(path: str, mtime_ns: int, size: int, by_gcsfs: bool) -> str | None:
    """`_unusable_key_file`'s answer for one version (`mtime_ns`, `size`) of the file."""
    try:
        from google.auth.exceptions import GoogleAuthError
        from google.oauth2 import service_account
    except ImportError:  # (no gcsfs: `url_to_fs` says what to install)
        return None
    try:
        with open(path, encoding="utf-8") as file:
            key = json.load(file)
    except (OSError, ValueError) as exc:  # (a JSONDecodeError or UnicodeDecodeError is a ValueError)
        return f"cannot be read as JSON ({one_line(exc)})"
    if not isinstance(key, dict):
        return "holds no JSON object"
    kind = key.get("type")
    missing = [name for name in _USER_CREDENTIAL_FIELDS if not key.get(name)]
    if kind == "authorized_user" or (by_gcsfs and not missing):  # (gcsfs reads the fields, not the type)
        return f"is a user's credentials without {', '.join(missing)}" if missing else None
    if not by_gcsfs and kind not in _GOOGLE_AUTH_KINDS:
        return f"has no \"type\" google-auth takes ({', '.join(_GOOGLE_AUTH_KINDS)})"
    if by_gcsfs or kind == "service_account":  # (google-auth checks its other kinds as it signs in)
        try:
            service_account.Credentials.from_service_account_info(key)
        except (GoogleAuthError, ValueError, KeyError, TypeError) as exc:
            return f"is no service account's key google-auth can sign in with ({one_line(exc)})"
    return None


def _require_credentials_file(url: str) -> None:
    """StorageError, before any request, where GOOGLE_APPLICATION_CREDENTIALS names no file, or one it
    cannot sign in with: google-auth, which reads it, took that for no credentials at all, and gcsfs then
    read the bucket anonymously, without a word. google-auth does not expand a ~ in it, so neither is it
    expanded here (the check would pass a file google-auth then does not find): the message gives the full
    path instead."""
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path:
        return
    if os.path.exists(path):
        problem = _unusable_key_file(path, by_gcsfs=False)
        if problem:  # (google-auth's refusal too left gcsfs reading anonymously)
            raise StorageError(f"cannot use {url}: GOOGLE_APPLICATION_CREDENTIALS names {path}, which {problem}: "
                               "give the path of a service account's key file (JSON) or other credentials file, or "
                               "unset it to sign in as `gcloud auth application-default login` did")
        return
    if path.startswith("~"):
        raise StorageError(f"cannot use {url}: GOOGLE_APPLICATION_CREDENTIALS names {path}, whose ~ google-auth "
                           f"does not expand: give the full path, {os.path.expanduser(path)}")
    raise StorageError(f"cannot use {url}: GOOGLE_APPLICATION_CREDENTIALS names {path}, which does not exist: "
                       "give the path of a service account's key file (JSON) that is there, or unset it to sign in "
                       "as `gcloud auth application-default login` did (or use --anon for a public bucket)")
