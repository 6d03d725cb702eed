"""Storage credentials never show: not in the runs table, the errors table, logs or error messages."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from schemas.config import RunConfig, StorageConfig
from tests.s3server import free_port, s3_server
from workers.remote_copy import local_copy
from workers.redaction import RedactingFilter, redact, register_secrets, secrets_of
from workers.storage import StorageError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(synthetic_clips):
    with s3_server() as server:
        fs = server.filesystem()
        fs.put_file(str(synthetic_clips / "cuts.mp4"), f"{server.bucket}/videos/cuts.mp4")
        fs.pipe(f"{server.bucket}/videos/broken.mp4", os.urandom(4000))  # an errors row
        yield server


def _write_config(path: Path, tiny_models, storage: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "stages": ["embed"], "models": {"embed": tiny_models["embed"], "device": "cpu"},
        "sampling": {"num_frames": 2}, "output": {"thumbnails": False},
        "resources": {"executor": "local"}, "storage": storage,
    }))
    return path


def _vidlens(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        if not env_extra or name not in env_extra:
            env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "pipeline", "-v", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _read(s3, prefix, table):
    fs = s3.filesystem()
    return pq.read_table(f"{s3.bucket}/{prefix}/{table}", filesystem=fs).to_pandas()


@pytest.mark.parametrize("where", ["config", "environment"])
def test_credentials_never_reach_the_tables_or_the_logs(s3, tmp_path, tiny_models, where):
    storage = {"endpoint_url": s3.endpoint_url}
    env = {}
    if where == "config":
        storage.update(key=s3.key, secret=s3.secret)
    else:
        env = {"AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret}
    config = _write_config(tmp_path / "config.yaml", tiny_models, storage)
    out = f"out-{where}"
    done = _vidlens(["run", f"s3://{s3.bucket}/videos", "--out", f"s3://{s3.bucket}/{out}",
                     "--config", str(config), "--no-progress"], env)
    assert done.returncode == 3, done.stdout + done.stderr  # one good video, one broken
    assert s3.secret not in done.stdout + done.stderr

    runs = _read(s3, out, "runs")
    assert len(runs) == 1 and s3.secret not in runs.config_json.iloc[0]
    if where == "config":
        assert '"secret":"***"' in runs.config_json.iloc[0] and s3.key not in runs.config_json.iloc[0]
    errors = _read(s3, out, "errors")
    assert len(errors) >= 1
    assert not errors.astype(str).apply(lambda column: column.str.contains(s3.secret)).any().any()


def test_a_failing_store_names_the_uri_but_not_the_secret(tmp_path, tiny_models):
    secret = "not-a-real-secret-7f3a9c"
    dead = f"http://127.0.0.1:{free_port()}"
    config = _write_config(tmp_path / "config.yaml", tiny_models,
                           {"endpoint_url": dead, "key": "some-access-key", "secret": secret, "retries": 1})
    done = _vidlens(["run", "s3://bucket/videos", "--out", str(tmp_path / "out"), "--config", str(config),
                     "--no-progress"])
    assert done.returncode != 0
    assert secret not in done.stdout + done.stderr
    assert "s3://bucket/videos" in done.stderr or "bucket" in done.stderr

    storage = StorageConfig(endpoint_url=dead, key="some-access-key", secret=secret, retries=1)
    with pytest.raises(StorageError) as raised:
        with local_copy("s3://bucket/clip.mp4", storage):
            pass
    assert "s3://bucket/clip.mp4" in str(raised.value) and secret not in str(raised.value)


def test_configs_print_and_log_without_secrets(caplog):
    connection = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c0nn-account-key"
    config = RunConfig.from_dict({"storage": {"key": "AKIA-EXAMPLE", "secret": "s3cr3t-value",
                                              "options": {"client_kwargs": {"aws_session_token": "tok-123456"},
                                                          "connection_string": connection}}})
    for text in (repr(config), str(config.storage), config.to_json()):
        assert "s3cr3t-value" not in text and "AKIA-EXAMPLE" not in text and "tok-123456" not in text
        assert "c0nn-account-key" not in text
    assert config.fingerprint() == RunConfig().fingerprint()  # credentials never change a result

    register_secrets(config.storage)
    assert redact("failed with s3cr3t-value and tok-123456") == "failed with *** and ***"
    assert redact("signed with c0nn-account-key") == "signed with ***"
    logger = logging.getLogger("vidlens.test.secrets")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.WARNING, logger="vidlens.test.secrets"):
        logger.warning("reaching the store with %s", "s3cr3t-value")
    assert "s3cr3t-value" not in caplog.text and "***" in caplog.text


def test_a_gcs_token_is_a_secret_unless_it_names_a_key_file_or_a_way_to_sign_in():
    """On gs:// alone a string token is a key file's path or one of gcsfs's ways to sign in, which
    messages name, or a raw access token, a secret; where another store may get it (s3://'s session
    token, az://'s SAS) or the stores are not known, any token is a secret, one ending in .json too
    (secrets ending in .json were shown, to show a key file's path), unless it has the shape of an
    absolute or ~ path to a .json file, which no credential has (`test_a_key_files_path_is_shown_...`)."""
    for token in ("/var/secrets/key", "keys/sa.json", "sa.json", "google_default"):
        assert token not in secrets_of(StorageConfig(token=token), {"gs"})
        assert token not in secrets_of(StorageConfig(options={"token": token}), {"gs"})
        assert token in secrets_of(StorageConfig(token=token), {"gs", "s3"})
        assert token in secrets_of(StorageConfig(token=token))
    assert "ya29.a0-raw-access-token" in secrets_of(StorageConfig(token="ya29.a0-raw-access-token"), {"gs"})
    key = {"type": "authorized_user", "client_secret": "cl13nt-secret", "refresh_token": "r3fresh-token"}
    assert {"cl13nt-secret", "r3fresh-token"} <= set(secrets_of(StorageConfig(options={"token": key}), {"gs"}))
    assert "sv=2024&sig=abc.json" in secrets_of(StorageConfig(token="sv=2024&sig=abc.json"), {"az"})
    # the runs table stores the token as *** on every store: it cannot tell a key file's path from a secret
    assert '"token":"***"' in RunConfig.from_dict({"storage": {"token": "/var/secrets/key"}}).to_json()



def test_a_gcs_key_files_contents_given_as_the_token_are_refused_unquoted(tmp_path, capsys):
    """storage.token holding a key file's contents (its JSON, whose private key has a "/") was taken
    for a key file's path, no secret on gs:// alone: its refusal quoted it, private key and all."""
    from pipeline.cli import main

    key = ('{"type": "service_account", "client_email": "vidlens@example.iam.gserviceaccount.com", '
           '"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEv/pr1vate+key\\n-----END PRIVATE KEY-----\\n"}')
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"token": key, "endpoint_url": f"http://127.0.0.1:{free_port()}"}}))
    assert main(["run", "gs://vidlens/videos", "--out", str(tmp_path / "out"), "--config", str(config),
                 "--executor", "local", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "storage.token holds a key file's contents (JSON), which gcsfs does not take: give the path" in err, err
    assert "pr1vate" not in err and "vidlens@example" not in err, err
    assert key in secrets_of(StorageConfig(token=key), {"gs"})
    assert "\n " + key in secrets_of(StorageConfig(token="\n " + key), {"gs"})  # (white space before its JSON)


def test_a_key_files_path_is_shown_where_the_stores_are_not_known(tmp_path, capsys):
    """A worker knows not which stores a run reaches, nor does a manifest's run: there an absolute or ~
    path to a .json key file, which was hidden ("storage.token names ***, which does not exist"), is
    named, on a worker without the file too; a secret of another store never has that shape, so one
    ending in .json (a SAS with =, a relative name) stays hidden."""
    from pipeline.cli import main

    missing = str(tmp_path / "keys" / "sa.json")
    dead = f"http://127.0.0.1:{free_port()}"
    for token in (missing, "~/keys/sa.json"):
        assert token not in secrets_of(StorageConfig(token=token))
        assert token not in secrets_of(StorageConfig(options={"token": token}), {"s3", "gs"})
    for token in ("sv=2024&sig=/abc.json", "/sig?x.json", "keys/sa.json", "FwoGZXIvYXdzEBYaDH/session+token"):
        assert token in secrets_of(StorageConfig(token=token))
    with pytest.raises(StorageError, match=f"storage.token names {missing}, which does not exist"):
        with local_copy("gs://vidlens/videos/a.mp4", StorageConfig(endpoint_url=dead, token=missing)):
            pass
    manifest = tmp_path / "videos.csv"
    manifest.write_text("uri\ngs://vidlens/videos/a.mp4\n")
    assert main(["run", str(manifest), "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress",
                 "--endpoint-url", dead, "--set", f"storage.token={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"storage.token names {missing}, which does not exist" in err, err


def test_a_traceback_shows_no_secret(tmp_path, caplog, monkeypatch):
    """`vidlens -v` raises every error, and Python printed its traceback as it was: a raw access token
    (storage.token) that gcsfs put in the URL of a request that failed (Google's tokeninfo, here through
    a proxy that does not answer) was printed whole. So were tracebacks logged with a record."""
    token = "ya29.a0-s3cr3t-raw-access-token-1234"
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{free_port()}", "https_proxy": "", "NO_PROXY": "", "no_proxy": ""}
    done = _vidlens(["run", "gs://vidlens/videos", "--out", str(tmp_path / "out"), "--executor", "local",
                     "--no-progress", "--endpoint-url", f"http://127.0.0.1:{free_port()}",
                     "--set", f"storage.token={token}"], env)
    assert done.returncode == 1 and "tokeninfo?access_token=***" in done.stderr, done.stderr[-3000:]
    assert token not in done.stdout + done.stderr

    logger = logging.getLogger("vidlens.test.secrets")
    caplog.handler.addFilter(RedactingFilter())
    register_secrets(StorageConfig(secret="tr4ceback-secret"))
    with caplog.at_level(logging.WARNING, logger="vidlens.test.secrets"):
        try:
            raise ValueError("cannot reach ...?sig=tr4ceback-secret")
        except ValueError:
            logger.exception("failed")
    assert "tr4ceback-secret" not in caplog.text and "sig=***" in caplog.text, caplog.text
    # (mutation review) the command line's handler is the only one: no other formatted the traceback
    # before the filter saw the record, and a formatter would print it as the exception said it
    alone, said = logging.getLogger("vidlens.test.secrets.alone"), io.StringIO()
    handler = logging.StreamHandler(said)
    handler.addFilter(RedactingFilter())
    monkeypatch.setattr(alone, "propagate", False)
    monkeypatch.setattr(alone, "handlers", [handler])
    try:
        raise ValueError("cannot reach ...?sig=tr4ceback-secret")
    except ValueError:
        alone.exception("failed")
    assert "tr4ceback-secret" not in said.getvalue() and "sig=***" in said.getvalue(), said.getvalue()

def test_where_a_manifest_lists_the_videos_any_token_is_a_secret():
    """(mutation review) A manifest's rows may name any store, whichever store holds it: a token is
    then a secret though the manifest is on gs:// (an S3 session token has a "/", as a key file's path has)."""
    from argparse import Namespace

    from pipeline.failure_lines import stores_reached

    assert stores_reached(Namespace(source="gs://media/videos", out="/data/out")) == {"gs"}
    assert stores_reached(Namespace(source="/data/videos", out="s3://media/out")) == {"s3"}
    manifest = Namespace(source="gs://media/nightly.csv", out="gs://media/out")
    assert stores_reached(manifest) is None
    session = "FwoGZXIvYXdzEBYaDH/session+token"
    assert session in secrets_of(StorageConfig(token=session), stores_reached(manifest))


def test_an_endpoints_password_is_never_stored_nor_printed(monkeypatch):
    """(security review) storage.endpoint_url given as http://user:password@host went into the runs
    table's config_json whole, in every row; its password is now shown as `***` wherever the
    configuration is stored or shown, and is a secret every message and log line hides."""
    from pipeline.submit import shipped_config

    endpoint = "http://admin:end-p01nt-pass@minio.internal:9000"
    config = RunConfig.from_dict({"storage": {"endpoint_url": endpoint,
                                              "options": {"client_kwargs": {"endpoint_url": endpoint}}}})
    for text in (config.to_json(), repr(config), str(config.storage)):
        assert "end-p01nt-pass" not in text and "http://admin:***@minio.internal:9000" in text, text
    assert config.fingerprint() == RunConfig().fingerprint()
    assert shipped_config(config)["storage"]["endpoint_url"] == "http://minio.internal:9000"  # (not to the cluster)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:env-p4ssword@minio:9000")
    assert {"end-p01nt-pass", "env-p4ssword"} <= set(secrets_of(config.storage))
    register_secrets(config.storage)
    assert redact(f"could not reach {endpoint}/bucket (end-p01nt-pass)") == (
        "could not reach http://admin:***@minio.internal:9000/bucket (***)")
    # any URL's password, known or not (one under 4 characters too); a URL's container or key stays
    assert redact("at https://u:pw@proxy:3128 and abfs://media@acct.dfs.core.windows.net/a:b@c.mp4") == (
        "at https://u:***@proxy:3128 and abfs://media@acct.dfs.core.windows.net/a:b@c.mp4")


def test_an_endpoints_user_name_alone_is_taken_for_a_token_and_hidden():
    """(mutation review) http://TOKEN@host names a token where a password would be: it is shown as `***`
    wherever the configuration is stored or shown, and is a secret a message hides; a URL's container
    (abfs://CONTAINER@ACCOUNT) is no such name, and stays."""
    endpoint = "https://t0ken-as-user@minio.internal:9000"
    config = RunConfig.from_dict({"storage": {"endpoint_url": endpoint}})
    for text in (config.to_json(), repr(config), str(config.storage)):
        assert "t0ken-as-user" not in text and "https://***@minio.internal:9000" in text, text
    assert "t0ken-as-user" in secrets_of(config.storage)
    container = "abfs://media@acct.dfs.core.windows.net"
    assert container in str(StorageConfig(endpoint_url=container))


def test_a_run_stores_an_endpoints_password_as_stars(tmp_path, tiny_models, synthetic_clips, capsys):
    """(security review) A run given --endpoint-url with a password stored it in runs.config_json."""
    from pipeline.cli import main

    source = tmp_path / "videos"
    source.mkdir()
    (source / "cuts.mp4").write_bytes((synthetic_clips / "cuts.mp4").read_bytes())
    config = _write_config(tmp_path / "config.yaml", tiny_models, {})
    out = tmp_path / "out"
    assert main(["run", str(source), "--out", str(out), "--config", str(config), "--no-progress",
                 "--endpoint-url", "http://admin:st0red-pass@127.0.0.1:9"]) == 0
    said = capsys.readouterr()
    assert "st0red-pass" not in said.out + said.err
    [stored] = pq.read_table(out / "runs").to_pandas().config_json
    assert "st0red-pass" not in stored and '"endpoint_url":"http://admin:***@127.0.0.1:9"' in stored, stored


@pytest.mark.parametrize("where", ["--endpoint-url", "AWS_ENDPOINT_URL"])
def test_an_s3_endpoint_with_a_password_is_refused_in_one_line(s3, tmp_path, capsys, monkeypatch, where):
    """(security review) botocore signs every request, and aiohttp refuses one that also has a user name
    and password in its URL: a run on s3:// ended with a traceback ("Cannot combine AUTHORIZATION header
    with AUTH argument or credentials encoded in URL") and exit 1. It is refused before any request."""
    from pipeline.cli import main

    endpoint = s3.endpoint_url.replace("://", f"://admin:{s3.secret}@")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    args = ["run", f"s3://{s3.bucket}/videos", "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress"]
    if where == "AWS_ENDPOINT_URL":
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        setting = "AWS_ENDPOINT_URL"
    else:
        args += ["--endpoint-url", endpoint]
        setting = "storage.endpoint_url (--endpoint-url)"
    assert main(args) == 2
    err = capsys.readouterr().err
    shown = s3.endpoint_url.replace("://", "://admin:***@")
    assert err.startswith(f"vidlens: error: cannot use s3://{s3.bucket}/videos: {setting} is {shown}, with a user "
                          "name and password in it, which the store does not sign in with: give the endpoint "
                          "without them, and the credentials through AWS_ACCESS_KEY_ID"), err
    assert len(err.splitlines()) == 1 and s3.secret not in err, err


def test_gcs_and_azure_endpoints_with_a_password_are_refused_unless_anonymous():
    """(security review) gcsfs and the Azure SDK put their own Authorization header on a request, which
    aiohttp refuses beside an endpoint's user name and password ("Cannot combine AUTHORIZATION header
    ..."); an anonymous request sends them as basic authentication (a proxy's), and reaches the store."""
    from workers.storage import EndpointWithCredentials, open_filesystem, storage_options
    from tests.gcsserver import gcs_server

    for url, storage, named in (
            ("gs://media/videos", StorageConfig(endpoint_url="http://u:gs-pass@127.0.0.1:9", token="ya29.t0ken"),
             "GOOGLE_APPLICATION_CREDENTIALS"),
            ("az://media/videos", StorageConfig(endpoint_url="http://u:az-pass@127.0.0.1:9/acct", key="acct",
                                                secret="YWNjb3VudC1rZXk="), "AZURE_STORAGE_ACCOUNT_NAME")):
        with pytest.raises(EndpointWithCredentials) as raised:
            storage_options(url, storage)
        assert "-pass" not in str(raised.value) and named in str(raised.value), raised.value
    with gcs_server() as gcs:
        gcs.filesystem().pipe(f"{gcs.bucket}/videos/a.mp4", b"video")
        anonymous = StorageConfig(endpoint_url=gcs.endpoint_url.replace("://", "://u:gs-pass@"), anon=True)
        fs, path = open_filesystem(f"gs://{gcs.bucket}/videos", anonymous)
        assert fs.ls(path) == [f"{gcs.bucket}/videos/a.mp4"]


def test_passwords_in_a_blob_endpoint_and_the_gcs_emulator_host_are_hidden_and_refused_where_signed(monkeypatch):
    """(security review) A connection string's BlobEndpoint=http://user:password@host and gcsfs' own
    STORAGE_EMULATOR_HOST were neither checked nor their passwords hidden: beside an AccountKey (or a
    token) the request failed with aiohttp's "Cannot combine AUTHORIZATION header ...". Both are refused
    before any request, naming the setting; with a SAS alone the password reaches a proxy, and passes."""
    from workers.storage import EndpointWithCredentials, storage_options

    key = "YWNjb3VudC1rZXk="
    connection = f"BlobEndpoint=http://u:bl0b-pass@127.0.0.1:9/acct;AccountName=acct;AccountKey={key};"
    assert {"bl0b-pass", key} <= set(secrets_of(StorageConfig(options={"connection_string": connection})))
    with pytest.raises(EndpointWithCredentials) as raised:
        storage_options("az://media/videos", StorageConfig(options={"connection_string": connection}))
    assert str(raised.value) == (
        "cannot use az://media/videos: the connection string's BlobEndpoint, in storage.options' connection_string "
        "(--storage-option connection_string=...), is http://u:***@127.0.0.1:9/acct, with a user name and password "
        "in it, which the store does not sign in with beside the AccountKey: give the endpoint without them")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection.lower().replace("accountkey", "AccountKey"))
    with pytest.raises(EndpointWithCredentials, match="in AZURE_STORAGE_CONNECTION_STRING, is http://u:\\*\\*\\*@"):
        storage_options("az://media/videos", StorageConfig())
    sas = "BlobEndpoint=http://u:bl0b-pass@127.0.0.1:9/acct;SharedAccessSignature=sv=1&sig=x;"
    assert storage_options("az://media/videos", StorageConfig(options={"connection_string": sas}))

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://u:em-pass@127.0.0.1:9")
    assert "em-pass" in secrets_of(StorageConfig())
    with pytest.raises(EndpointWithCredentials) as raised:
        storage_options("gs://media/videos", StorageConfig(token="ya29.t0ken"))
    assert "STORAGE_EMULATOR_HOST is http://u:***@127.0.0.1:9" in str(raised.value), raised.value
    assert storage_options("gs://media/videos", StorageConfig(anon=True))  # (a proxy's password)
    # a given endpoint is the one gcsfs uses, not the environment's
    assert storage_options("gs://media/videos", StorageConfig(endpoint_url="http://127.0.0.1:9", token="ya29.t0ken"))
