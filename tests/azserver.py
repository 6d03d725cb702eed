"""A throwaway Azure Blob Storage server (Azurite, in memory) on loopback, for tests.

    with az_server() as az:
        fs = az.filesystem()            # an adlfs filesystem that reaches the server
        fs.put("clip.mp4", f"{az.bucket}/videos/clip.mp4")
        ... az.storage ...              # vidlens' `storage` config that reaches it

Azurite is a Node.js program, not a Python package: `.ci/run` installs it with npm into
`.cache/azurite` (ignored by git) where npm is present; `VIDLENS_AZURITE` names another
`azurite-blob`. Without it the tests that need it are skipped, saying how to install it.
The account is the test's own (not Azurite's well-known one), so a leak of its key is easy
to spot; telemetry is off and nothing listens beyond loopback.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.s3server import start_on_a_free_port

ACCOUNT = "vidlenstest"
#: the account's key: base64, as Azure's are; recognisable in a leak
ACCOUNT_KEY = base64.b64encode(b"vidlens-test-azure-account-key-0123456789").decode()
INSTALL = "npm install --prefix .cache/azurite azurite@3.37.0"


def azurite_command() -> str | None:
    """The `azurite-blob` to run: $VIDLENS_AZURITE, the one `.ci/run` installs, or one on PATH."""
    installed = Path(__file__).resolve().parents[1] / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    for candidate in (os.environ.get("VIDLENS_AZURITE"), str(installed), shutil.which("azurite-blob")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class AZServer:
    """A running server and one container in it."""

    endpoint_url: str
    bucket: str

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint={self.endpoint_url}/{ACCOUNT};")

    @property
    def storage(self) -> dict[str, Any]:
        """vidlens' `storage` settings that reach this server."""
        return {"options": {"connection_string": self.connection_string}}

    def filesystem(self):
        import adlfs

        return adlfs.AzureBlobFileSystem(connection_string=self.connection_string, skip_instance_cache=True)


@contextmanager
def az_server(bucket: str = "vidlens") -> Iterator[AZServer]:
    """Start Azurite with `bucket` (a container) in it; stop it (and forget its data) at the end.
    Skips the test when Azurite or adlfs is not installed."""
    pytest.importorskip("adlfs", reason="adlfs is not installed: pip install -e '.[test]'")
    command = azurite_command()
    if command is None:
        pytest.skip(f"Azurite (Node.js) is not installed: {INSTALL}, or set VIDLENS_AZURITE")
    with tempfile.TemporaryDirectory(prefix="vidlens-az-") as folder:
        log_path = os.path.join(folder, "azurite.log")
        env = dict(os.environ, AZURITE_ACCOUNTS=f"{ACCOUNT}:{ACCOUNT_KEY}")

        def start(port: int) -> subprocess.Popen:
            with open(log_path, "wb") as log:
                return subprocess.Popen(
                    [command, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                     "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)

        process, port = start_on_a_free_port(start, _stop, log_path, 60, "Azurite")
        try:
            server = AZServer(f"http://127.0.0.1:{port}", bucket)
            server.filesystem().mkdir(bucket)
            yield server
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited on its own
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
