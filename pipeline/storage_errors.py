"""What went wrong with a bucket, said in one line at the command line's boundary.

The storage layers (botocore/s3fs, google-auth/gcsfs, azure/adlfs, aiohttp, and DuckDB, which
passes their errors on as text) raise errors that name neither the bucket nor the fix:
`storage_problem` finds one in an exception's cause chain and says which URL could not be
used, why (no credentials, refused credentials, endpoint unreachable, no such bucket, access
denied) and what to set.
"""

from __future__ import annotations

import re
import traceback
from urllib.parse import parse_qs, urlsplit

from workers.storage import store_of
from workers.storage_retries import cause_chain, one_line

#: exception class names, anywhere in the cause chain, of the storage layers (botocore/s3fs,
#: google-auth/gcsfs, azure/adlfs, aiohttp) and the kind of problem each means.
_STORAGE_ERROR_KINDS = {
    "NoCredentialsError": "credentials", "PartialCredentialsError": "credentials",
    "CredentialRetrievalError": "credentials", "ProfileNotFound": "profile",
    "DefaultCredentialsError": "credentials", "ClientAuthenticationError": "refused", "RefreshError": "refused",
    "EndpointConnectionError": "unreachable", "ConnectTimeoutError": "unreachable",
    "ConnectionClosedError": "unreachable", "ClientConnectorError": "unreachable",
    "ServiceRequestError": "unreachable",
    "NonHttpUrlClientError": "endpoint",  # aiohttp's (gcsfs) for an endpoint without its scheme
    "EndpointWithoutScheme": "endpoint",  # a gs:// or az:// one, found before any request (`storage_options`)
}
#: error codes of S3 (botocore's ClientError) and Azure, HTTP statuses (gcsfs's HttpError), and the
#: kind of problem each means.
_STORAGE_CODE_KINDS = {
    "NoSuchBucket": "bucket", "ContainerNotFound": "bucket", "InvalidBucketName": "bucket",
    "AccessDenied": "denied", "AllAccessDisabled": "denied", "Forbidden": "denied", "403": "denied",
    "AuthorizationPermissionMismatch": "denied", "AuthorizationFailure": "denied",
    "InvalidAccessKeyId": "refused", "SignatureDoesNotMatch": "refused", "ExpiredToken": "refused",
    "InvalidToken": "refused", "InvalidClientTokenId": "refused", "AuthenticationFailed": "refused",
    "InvalidAuthenticationInfo": "refused", "401": "refused", "NoAuthenticationInformation": "credentials",
    # Azure's for a container name with characters it does not take, or too short or long (a 400 without them)
    "InvalidResourceName": "name", "OutOfRangeInput": "name",
}
#: the same problems as a message says them, for errors that reach us as text only (DuckDB's).
_STORAGE_WORDS = {
    "Unable to locate credentials": "credentials", "Could not connect to the endpoint URL": "unreachable",
    "The specified bucket does not exist": "bucket", "NoSuchBucket": "bucket", "AccessDenied": "denied",
    "InvalidAccessKeyId": "refused", "SignatureDoesNotMatch": "refused",
    "Forbidden": "denied",  # and gcsfs's 403: OSError("Forbidden: URL")
    "Invalid endpoint: ": "endpoint",  # botocore's ValueError for one without its scheme (minio:9000)
    # adlfs's ValueError where nothing names the account: it cannot build a client at all
    "Must provide either a connection_string or account_name": "account",
}
#: a container name Azure takes: 3 to 63 lower-case letters, digits and single hyphens, a letter or digit at each end
_AZURE_CONTAINER = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
#: how azure-identity's ClientAuthenticationError begins where no credential in its chain gave a token
_NO_AZURE_CREDENTIAL = "DefaultAzureCredential failed to retrieve a token"
_CREDENTIALS_HINT = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (or `gcloud auth application-default login`)",
    "az": "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_CONNECTION_STRING, "
          "or Azure AD's: `az login`, a managed identity, AZURE_CLIENT_ID/SECRET/TENANT_ID)",
}

#: where a `storage:` section holds each store's credentials (`_azure_options`, `storage_options`)
_CONFIG_CREDENTIALS = {
    "s3": "storage.key/secret", "gs": "storage.token: a service account file or a token",
    "az": "storage.key/secret, or storage.token: a SAS",
}

#: an endpoint with its scheme, for each store, and where one is set
_ENDPOINT_EXAMPLE = {
    "s3": "http://minio:9000 (where it was set: --endpoint-url, storage.endpoint_url or AWS_ENDPOINT_URL)",
    "gs": "http://127.0.0.1:4443 (where it was set: --endpoint-url or storage.endpoint_url)",
    "az": "http://127.0.0.1:10000/devstoreaccount1 (where it was set: --endpoint-url or storage.endpoint_url)",
}

_UNREACHABLE_HINT = {
    "s3": "the storage endpoint could not be reached: check --endpoint-url (or storage.endpoint_url, "
          "AWS_ENDPOINT_URL) - an S3-compatible store such as MinIO needs it, e.g. "
          "--endpoint-url http://minio:9000 - and that the server is up",
    "gs": "the storage endpoint could not be reached: check the network, and --endpoint-url (or "
          "storage.endpoint_url) where one is set - Google Cloud Storage needs none, an emulator or a "
          "GCS-compatible store does - and that the server is up",
    "az": "the storage endpoint could not be reached: check the account name (storage.key, "
          "AZURE_STORAGE_ACCOUNT_NAME), --endpoint-url or the connection string's BlobEndpoint "
          "(AZURE_STORAGE_CONNECTION_STRING) where one is set - Azurite needs one - and the network",
}


def storage_problem(exc: BaseException, uris: list[str], anon: bool = False, answered: bool = False) -> str | None:
    """One line saying which store could not be reached, why and what to do; None when `exc`
    is not the storage layer failing (no credentials, endpoint unreachable, no bucket, denied).
    `anon`: the command asked for anonymous access (--anon), so sent no credentials. `answered`:
    the stores had answered this command before (a run that had listed videos), so an endpoint
    that cannot be reached now went down: its settings are right, and are not what to check."""
    found = _storage_error_kind(exc)
    if found is None:
        return None
    kind, cause = found
    if answered and kind == "unreachable":
        kind = "went down"
    if anon and kind in ("denied", "refused", "unsent"):
        kind = "anonymous"
    uris = _narrow(uris, exc) or ["the bucket"]
    if kind == "name":  # (Azure's answer names no container: the one it cannot take is the one to name)
        uris = [uri for uri in uris if not _AZURE_CONTAINER.fullmatch(_container(uri))] or uris
    where = " or ".join(uris)
    protocol = store_of(uris[0]) if "://" in uris[0] else "s3"
    credentials = _CREDENTIALS_HINT.get(protocol, _CREDENTIALS_HINT["s3"])
    in_config = _CONFIG_CREDENTIALS.get(protocol, _CONFIG_CREDENTIALS["s3"])
    fix = {
        "credentials": f"no credentials were found: set {credentials} in the environment, or a `storage:` "
                       f"section in --config, or use --anon for a public bucket",
        "unsent": "no credentials were given (the request went without a key or SAS): set AZURE_STORAGE_ACCOUNT_KEY "
                  "or AZURE_STORAGE_SAS_TOKEN, or the config's storage.secret or storage.token (a SAS), or a "
                  "connection string's AccountKey or SharedAccessSignature; or use --anon for a public container",
        "profile": "AWS_PROFILE names a profile that is not there: check its name against the profiles in "
                   "~/.aws/credentials and ~/.aws/config (or the files AWS_SHARED_CREDENTIALS_FILE and "
                   "AWS_CONFIG_FILE name), or unset it",
        "refused": f"the store refused the credentials: check {credentials}, or the config's {in_config}, "
                   f"whichever gives them, and that they belong to this endpoint",
        "unreachable": _UNREACHABLE_HINT.get(protocol, _UNREACHABLE_HINT["s3"]),
        "went down": "the storage endpoint stopped answering during the run (it had answered it before: its "
                     "address is right); the batches the run published stay: run the same command again once the "
                     "store is up, to go on from there",
        "endpoint": "the endpoint is no URL: give it with its scheme, e.g. --endpoint-url "
                    + _ENDPOINT_EXAMPLE.get(protocol, _ENDPOINT_EXAMPLE["s3"]),
        "anonymous": "access was denied to an anonymous request (--anon, or storage.anon in --config): the "
                     f"bucket or prefix is not public; drop it and give credentials: {credentials}",
        "account": "no Azure storage account was named: set AZURE_STORAGE_ACCOUNT_NAME (with its key "
                   "AZURE_STORAGE_ACCOUNT_KEY, or Azure AD's credentials) or AZURE_STORAGE_CONNECTION_STRING, or "
                   "storage.key in --config, or name it in the URL: abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/...",
        "request": "the store could not make sense of the request (HTTP 400): check --endpoint-url (or "
                   "storage.endpoint_url, or the connection string's BlobEndpoint): Azurite's ends with the account, "
                   "e.g. http://127.0.0.1:10000/devstoreaccount1",
        "bucket": "the bucket does not exist: check the bucket name (and the endpoint and region it lives at)",
        "name": "the store refused the name: check the container (bucket) name and the path - an Azure container's "
                "is 3 to 63 lower-case letters, digits and single hyphens, starting and ending with a letter or digit",
        "denied": "access was denied: check that the credentials are right (a wrong secret key is also "
                  "denied this way, where the store's answer gives no reason) and may read (and, for an "
                  "output, write) this bucket and prefix, and the bucket name",
        "option": "a storage option (--storage-option, or storage.options in --config) is not one the "
                  "filesystem takes: see its documentation (s3fs: a session token is `token`, a region "
                  "--region or `client_kwargs.region_name`)",
    }[kind]
    return f"cannot use {where}: {fix} ({cause})"


#: where a filesystem's code lives: a TypeError raised there about a keyword is a storage option it does not take
_FILESYSTEM_MODULES = ("/fsspec/", "/s3fs/", "/aiobotocore/", "/botocore/", "/gcsfs/", "/adlfs/")


def _storage_error_kind(exc: BaseException) -> tuple[str, str] | None:
    """(kind, "ErrorName: first line") of the first storage error in the cause chain, if any."""
    chain = cause_chain(exc)
    for error in chain:
        if isinstance(error, TypeError) and "keyword argument" in str(error) and any(
                module in frame.filename for frame in traceback.extract_tb(error.__traceback__)
                for module in _FILESYSTEM_MODULES):
            return "option", one_line(error)
    for error in chain:
        kind = _class_kind(error) or _STORAGE_CODE_KINDS.get(_error_code(error) or "")
        if kind == "refused" and str(error).startswith(_NO_AZURE_CREDENTIAL):
            kind = "credentials"  # none was found to try: the store was not asked
        if kind is None and _is_azure_bad_request(error):
            kind = "request"
        if kind in ("denied", "refused") and _sent_without_credentials(error):
            kind = "unsent"  # none was given: there was nothing to refuse
        if kind:
            return kind, one_line(error)
    for error in chain:
        for words, kind in _STORAGE_WORDS.items():
            if words in str(error):
                return kind, one_line(error)
    return None


def _is_azure_bad_request(error: BaseException) -> bool:
    """An Azure SDK error for a 400 without an error code: Azurite's answer to a request whose
    path lacks the account (an endpoint without it), the container taken for the account."""
    return (type(error).__name__ == "HttpResponseError" and getattr(error, "status_code", None) == 400
            and not _error_code(error))


def _sent_without_credentials(error: BaseException) -> bool:
    """Whether an Azure SDK error answers a request that carried no credentials, neither an
    Authorization header (a key's, Azure AD's) nor a SAS: what a connection string without
    AccountKey or SharedAccessSignature sends (an Azurite endpoint given without them)."""
    request = getattr(getattr(error, "response", None), "request", None)
    headers = getattr(request, "headers", None)
    if headers is None or not isinstance(getattr(request, "url", None), str):
        return False
    return ("authorization" not in {name.lower() for name in headers}
            and "sig" not in parse_qs(urlsplit(request.url).query))


def _class_kind(error: BaseException) -> str | None:
    """The kind of problem an error's class means, or a class it derives from (aiohttp's
    ClientConnectorDNSError, a host name not found, is a ClientConnectorError)."""
    names = (cls.__name__ for cls in type(error).__mro__)
    return next((_STORAGE_ERROR_KINDS[name] for name in names if name in _STORAGE_ERROR_KINDS), None)


def _error_code(error: BaseException) -> str | None:
    """The error code of a botocore ClientError, an Azure HttpResponseError or a gcsfs HttpError
    (its HTTP status), else None."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or "") or None
    if type(error).__name__ == "HttpError" and getattr(error, "code", None):
        return str(error.code)
    code = getattr(error, "error_code", None)  # the Azure SDK's: a str, or a StorageErrorCode enum
    return str(getattr(code, "value", code)) if code else None


def _narrow(uris: list[str], exc: BaseException) -> list[str]:
    """Of several bucket URLs, those whose bucket the error names (all of them when it names none)."""
    if len(uris) < 2:
        return uris
    # (S3's NoSuchBucket names the bucket in its response only, not in its message)
    text = " ".join(f"{error} {_named_bucket(error)}" for error in cause_chain(exc))
    named = [u for u in uris if u.split("://", 1)[1].split("/", 1)[0] in text]
    return named or uris


def _container(uri: str) -> str:
    """The bucket (container) a URL names: abfs://container@account.dfs.core.windows.net/... gives "container"."""
    return uri.split("://", 1)[-1].split("/", 1)[0].split("@", 1)[0]


def _named_bucket(error: BaseException) -> str:
    """The bucket a botocore ClientError's response names (S3's NoSuchBucket does), else ""."""
    response = getattr(error, "response", None)
    return str(response.get("Error", {}).get("BucketName") or "") if isinstance(response, dict) else ""
